"""Where the backbone runs and in what precision: device and dtype requests resolved.

``"auto"`` picks CUDA, then MPS, then the CPU; an absent or unknown device is a
ValueError listing the choices on this machine. ``int8`` is a CPU precision: the towers
quantised and run by ONNX Runtime (:mod:`awt_engine.backbone.int8`) from float32 inputs.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Quantised precisions -> the dtype their inputs and unquantised parts compute in.
QUANTISED = {"int8": torch.float32}


def _available_devices() -> list[str]:
    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        choices.append("mps")
    return choices


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a device request into a :class:`torch.device` that exists on this machine.

    ``"auto"`` picks CUDA, then MPS, then the CPU. ``"cuda"`` means the current CUDA
    device, returned with its index (``cuda:0``) so that device comparisons work.
    Anything unknown or absent raises ValueError listing the choices on this machine.
    """
    spec = str(device).strip().lower() if isinstance(device, str | torch.device) else None
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", spec or "")
    if match is None:
        raise ValueError(
            f"Unknown device {device!r}. Valid choices on this machine: "
            f"{', '.join(_available_devices())}."
        )
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise ValueError(
                f"Device {device!r} requested but MPS is not available. "
                f"Valid choices on this machine: {', '.join(_available_devices())}."
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ValueError(
            f"Device {device!r} requested but CUDA is not available. "
            f"Valid choices on this machine: {', '.join(_available_devices())}."
        )
    idx = torch.cuda.current_device() if index is None else int(index)
    if idx >= torch.cuda.device_count():
        raise ValueError(
            f"Device {device!r} requested but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s). "
            f"Valid choices: {', '.join(_available_devices())}."
        )
    return torch.device("cuda", idx)


def resolve_precision(precision: str | None, device: torch.device) -> str:
    if precision is None:
        # Half precision on CUDA: the OpenAI CLIP recipe, ~2x faster, and the cosine
        # similarities move by ~1e-3. MPS and CPU stay fp32: fp16 kernels there are slow
        # or incomplete, depending on the torch version.
        return "fp16" if device.type == "cuda" else "fp32"
    if precision in QUANTISED:
        if device.type != "cpu":
            raise ValueError(
                f"precision {precision!r} is a CPU path (dynamic int8 quantisation of the "
                f"towers); on {device} use fp16 or bf16, or pass device='cpu'."
            )
        return precision
    if precision not in PRECISIONS:
        raise ValueError(
            f"Unknown precision {precision!r}. Valid choices: "
            f"{', '.join([*PRECISIONS, *QUANTISED])} (or None: fp16 on CUDA, fp32 elsewhere)."
        )
    return precision


def default_threads() -> int:
    """The cores this process may run on (its CPU affinity, as a container or ``taskset``
    limits it), not the machine's count; the machine's where affinity is not known."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads (intra-op) to ``threads`` (None: :func:`default_threads`);
    returns the number set. ONNX Runtime sessions take the same number
    (:func:`awt_engine.backbone.onnx_export.ort_session`)."""
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


@contextmanager
def seeded_rng(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Global RNG draws from ``seed`` inside; the caller's RNG states untouched after.

    The CPU generator is forked and seeded, and so is ``device``'s own generator when it
    is a CUDA or MPS device: that one device's, not the current CUDA device's (which
    ``torch.cuda.manual_seed`` would seed) nor every device's (``torch.manual_seed``
    seeds all CUDA devices, outside a CPU-only ``fork_rng``). No other device's state is
    read, seeded or restored.
    """
    dev = None if device is None else torch.device(device)
    if dev is not None and dev.type == "cuda":
        idx = torch.cuda.current_device() if dev.index is None else dev.index
        with torch.random.fork_rng(devices=[idx], device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            with torch.cuda.device(idx):  # torch.cuda.manual_seed seeds the current device
                torch.cuda.manual_seed(seed)
            yield
    elif dev is not None and dev.type == "mps":
        with torch.random.fork_rng(devices=["mps"], device_type="mps"):
            torch.default_generator.manual_seed(seed)
            torch.mps.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield
