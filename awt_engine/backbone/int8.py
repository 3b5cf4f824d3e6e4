"""int8 on the CPU: the towers exported to ONNX, quantised and run by ONNX Runtime.

``load_backbone(..., precision="int8")`` builds the model in float32, then
:func:`int8_towers` writes (once per weights, under ``<cache root>/onnx-int8/``) the image
tower (pixels -> unit embeddings) and the text tower (token ids -> unit embeddings) as ONNX
graphs (:mod:`awt_engine.backbone.onnx_export`) and quantises them with ONNX Runtime's dynamic
quantisation (:func:`~awt_engine.backbone.onnx_export.quantise_onnx`): every block's MatMul
weight in int8 (symmetric, one scale per output channel), its input quantised as it comes
(uint8, one scale per tensor per call); the patch embedding, the token embedding and the
final projection stay float32. :class:`Int8Towers` runs them in
ONNX Runtime sessions with the process's torch thread count (``--threads``).
Why ONNX Runtime and not torchao or OpenVINO: docs/design.md (measured side by side in
``benchmarks/bench_cpu.py``).

:meth:`~awt_engine.backbone.ClipBackbone.encode_images` and ``encode_text`` without gradients
use these sessions; the torch modules stay float32 and serve everything that reaches inside a
tower: ``text_forward`` (CoOp's, LAMM's and CLAMP's learned prompts enter the frozen text
tower there, so their class embeddings stay float32 while their images go through int8), the
vision intermediates (eP-ALM), and ``grad=True``. A method that changes a tower's inside
(adapters on its branches, LoRA on its weights) declares ``int8_refusal`` and is refused on
an int8 backbone (:func:`check_int8_method`): the exported graph would not hold its changes.

Axes: N rows (images or token sequences), R image side, L context length, D embedding width.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from awt_engine._io import resolve_cache_root, sha256_hex
from awt_engine._progress import progress_bar
from awt_engine.backbone.onnx_export import MANIFEST, export_onnx, onnx_modules, ort_session
from awt_engine.descriptions import locked

logger = logging.getLogger(__name__)
INSTALL_HINT = (
    "int8 runs in ONNX Runtime: pip install 'awt-engine[onnx]' (or: uv sync --extra onnx)"
)
FILES = ("image.int8.onnx", "text.int8.onnx")
# Part of the folder's key: bumped whenever the export or the quantisation changes what the
# graphs compute (design.md section 6: a change to what a cache holds bumps its FORMAT).
FORMAT = 2  # 2: per-channel weights, MatMuls only, the projection in float32
# How long a process waits for another one exporting the same graphs (ViT-B-16: about a
# minute on 2 cores; a ViT-L or a slow disk: several).
LOCK_TIMEOUT_S = 1800.0


class Int8Towers:
    """The two quantised towers in ONNX Runtime sessions (``threads`` intra-op threads)."""

    def __init__(self, folder: Path, threads: int) -> None:
        self.folder = folder
        self.image = ort_session(folder / FILES[0], threads)
        self.text = ort_session(folder / FILES[1], threads)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, R, R] float -> [N, D] unit float32 rows (CPU)."""
        x = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.image.run(None, {"pixels": x})[0])

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """[N, L] token ids -> [N, D] unit float32 rows (CPU)."""
        x = np.ascontiguousarray(ids.detach().to("cpu", torch.int64).numpy())
        return torch.from_numpy(self.text.run(None, {"ids": x})[0])


def _cached(folder: Path, fingerprint: str) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("fingerprint") == fingerprint and all((folder / f).is_file() for f in FILES)


def int8_towers(backbone, model_name: str, cache_root: str | Path | None = None) -> Int8Towers:
    """The :class:`Int8Towers` of a float32 CPU ``backbone``: read from
    ``<cache root>/onnx-int8/<hash of FORMAT and the fingerprint>/`` when written before, else exported,
    quantised and written there first (atomically: a folder renamed into place; under the
    folder's lock, so concurrent first loads export once)."""
    try:
        onnx_modules()
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    base = resolve_cache_root(cache_root) / "onnx-int8"
    folder = base / sha256_hex("awt-int8-onnx", str(FORMAT), backbone.fingerprint)[:32]
    if not _cached(folder, backbone.fingerprint):
        base.mkdir(parents=True, exist_ok=True)
        # one writer: processes starting together (Ray actors on one machine) wait for the
        # first one's graphs instead of exporting them N times and replacing each other's
        with locked(folder, timeout_s=LOCK_TIMEOUT_S):
            if not _cached(folder, backbone.fingerprint):
                _export_into(backbone, model_name, base, folder)
    return Int8Towers(folder, torch.get_num_threads())


def _export_into(backbone, model_name: str, base: Path, folder: Path) -> None:
    """Export and quantise into a fresh temporary folder, then rename it to ``folder``."""
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=base))
    logger.info("int8: exporting and quantising %s's towers into %s", model_name, folder)
    desc = "int8: export + quantise the towers (once per model)"
    try:
        with progress_bar(4, desc=desc, unit="graph") as bar:  # drawn on a terminal only
            export_onnx(
                backbone, tmp, model_name=model_name, int8=True, on_file=lambda _: bar.update(1)
            )
        for name in ("image.onnx", "text.onnx"):  # the float32 graphs: not needed here
            (tmp / name).unlink()
        if folder.exists():  # a damaged or stale entry
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_int8_method(method: str, reason: str, precision: str | None) -> None:
    """Refuse a method that changes a tower's inside (``reason``, its own words) on an int8
    backbone: its learned parts act on weights or branches the exported graphs do not hold."""
    if precision == "int8" and reason:
        raise ValueError(
            f"{method} cannot run at precision int8: {reason}; int8 runs the towers as "
            "quantised ONNX graphs of the frozen weights, so use fp32 (or fp16/bf16 on a GPU)"
        )


__all__ = ["INSTALL_HINT", "Int8Towers", "check_int8_method", "int8_towers"]
