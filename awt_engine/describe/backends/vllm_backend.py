"""vLLM offline inference on a GPU: every conversation of a step goes to ``LLM.chat`` in one
call, so the engine schedules and batches them itself (continuous batching, shared prefixes).

vLLM is an optional extra (``pip install awt-engine[vllm]``) and is imported only here, when
the backend first runs. It runs on CUDA GPUs only; ``device="cuda:N"`` picks the GPU through
``CUDA_VISIBLE_DEVICES`` (vLLM's own way), set while the engine starts.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from awt_engine.describe.backends.base import (
    ChatBackend,
    ChatRequest,
    Completion,
    OnResult,
    SamplingConfig,
)
from awt_engine.describe.errors import BackendError


@dataclass(frozen=True)
class VLLMConfig:
    model: str  # hub id or local folder
    dtype: str = "auto"  # the checkpoint's dtype (bf16 for current instruct models)
    tensor_parallel_size: int = 1  # GPUs to shard the model over
    # Share of the GPU's whole memory vLLM takes (weights, then KV cache up to it). vLLM's own
    # default: describe is an offline stage run on its own, and a larger KV cache batches more
    # requests. To share the GPU (CLIP, another process), lower it: 0.9 of a 24 GB GPU leaves
    # 2.4 GB; at 0.75 a 7B model in bf16 (~15 GB of weights) still has ~3 GB of KV cache and
    # 6 GB stay free.
    gpu_memory_utilization: float = 0.9
    # None, "auto" or "cuda": the GPUs CUDA_VISIBLE_DEVICES shows, from the first; "cuda:N":
    # the N-th of them (and the next ones with tensor_parallel_size > 1). No cpu or mps.
    device: str | None = None
    # Our prompts are ~1-1.5k tokens plus a 512-token answer. Capping the context keeps the
    # KV-cache reservation small for models that advertise 32k-128k contexts.
    max_model_len: int | None = 4096
    trust_remote_code: bool = False  # never run code from a model repo unless asked

    def __post_init__(self) -> None:
        g = self.gpu_memory_utilization
        if not isinstance(g, (int, float)) or not math.isfinite(g) or not 0 < g <= 1:
            raise ValueError(
                f"--gpu-memory-utilization must be a fraction in (0, 1], got {g!r} (the share "
                "of the GPU's memory vLLM may take)"
            )
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        cuda_index(self.device)  # refuses cpu, mps and malformed names now, not at load

    def visible_devices(self, current: str | None) -> str | None:
        """CUDA_VISIBLE_DEVICES that makes vLLM use :attr:`device`, given the current value
        (None: unset); None: leave it as it is."""
        index = cuda_index(self.device)
        if index is None:
            return None
        tp = self.tensor_parallel_size
        if current is None:
            return ",".join(str(i) for i in range(index, index + tp))
        ids = [d.strip() for d in current.split(",") if d.strip()]
        if index + tp > len(ids):
            raise ValueError(
                f"--device {self.device}: {'GPUs' if tp > 1 else 'GPU'} {index}"
                f"{f'-{index + tp - 1}' if tp > 1 else ''} asked for, but "
                f"CUDA_VISIBLE_DEVICES={current!r} shows {len(ids)}"
            )
        return ",".join(ids[index : index + tp])

    def llm_kwargs(self, seed: int) -> dict:
        kwargs = {
            "model": self.model,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "trust_remote_code": self.trust_remote_code,
            "seed": seed,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        return kwargs


def cuda_index(device: str | None) -> int | None:
    """The N of ``cuda:N``; None for no device, "auto" or "cuda"; ValueError for the rest."""
    if device is None or device in ("auto", "cuda"):
        return None
    m = re.fullmatch(r"cuda:(\d{1,4})", device.strip())
    if m:
        return int(m.group(1))
    if device.split(":")[0] in ("cpu", "mps", "xpu", "meta"):
        raise ValueError(
            f"--device {device}: the vllm backend runs on CUDA GPUs only; use --backend "
            "transformers to describe on this device"
        )
    raise ValueError(f"--device {device!r}: the vllm backend takes cuda or cuda:N")


@contextlib.contextmanager
def visible_devices(value: str | None) -> Iterator[None]:
    """CUDA_VISIBLE_DEVICES set to ``value`` (None: untouched) until the block ends. vLLM reads
    it when its engine starts (in a process of its own), so it is put back afterwards."""
    if value is None:
        yield
        return
    name = "CUDA_VISIBLE_DEVICES"
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as e:
        raise BackendError(
            f"the vllm backend needs the optional 'vllm' package ({e}); install it with "
            "`uv sync --extra vllm` on a GPU machine, or use --backend transformers / openai"
        ) from None


class VLLMBackend(ChatBackend):
    name = "vllm"

    def __init__(self, config: VLLMConfig, *, seed: int = 0) -> None:
        super().__init__(config.model)
        self.config = config
        self._seed = seed
        self._llm = None
        self._vllm = None

    def settings(self) -> dict:
        c = self.config
        return {
            "dtype": c.dtype,
            "tensor_parallel_size": c.tensor_parallel_size,
            "max_model_len": c.max_model_len,
            "gpu_memory_utilization": c.gpu_memory_utilization,
            "device": c.device,
        }

    def _load(self) -> None:
        if self._llm is None:
            self._vllm = import_vllm()
            try:
                devices = self.config.visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
            except ValueError as e:
                raise BackendError(str(e)) from None
            try:
                with visible_devices(devices):
                    self._llm = self._vllm.LLM(**self.config.llm_kwargs(self._seed))
            except Exception as e:  # no GPU, model not found, out of memory, ...
                raise BackendError(
                    f"vLLM could not start model {self.config.model!r}: {type(e).__name__}: {e}"
                ) from e

    def sampling_params(self, requests: Sequence[ChatRequest], sampling: SamplingConfig) -> list:
        """One ``SamplingParams`` per request: same settings, each request's own seed (the
        same seed on identical prompts would give identical answers)."""
        sp = self._vllm.SamplingParams
        return [
            sp(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=r.seed,
            )
            for r in requests
        ]

    def chat(
        self,
        requests: Sequence[ChatRequest],
        sampling: SamplingConfig,
        on_result: OnResult | None = None,
    ) -> list[list[Completion]]:
        if not requests:
            return []
        self._load()
        start = time.perf_counter()
        try:
            outputs = self._llm.chat(
                [r.messages for r in requests],
                sampling_params=self.sampling_params(requests, sampling),
                use_tqdm=False,
            )
        except Exception as e:  # e.g. a chat template that rejects the system role
            raise BackendError(
                f"vLLM generation with {self.config.model!r} failed: {type(e).__name__}: {e}"
            ) from e
        finally:
            self.stats.add(seconds=time.perf_counter() - start)
        results = parse_outputs(outputs, len(requests))
        self.stats.add(
            requests=len(requests),
            generated_tokens=sum(
                len(getattr(o, "token_ids", None) or ()) for ro in outputs for o in ro.outputs
            ),
        )
        if on_result is not None:
            for i, comps in enumerate(results):
                on_result(i, comps)
        return results

    def close(self) -> None:
        self._llm = None


def parse_outputs(outputs: Sequence, expected: int) -> list[list[Completion]]:
    """``RequestOutput``s (same order as the prompts) -> completions per request.

    Each ``RequestOutput.outputs`` holds ``n`` ``CompletionOutput``s with ``index``, ``text``
    and ``finish_reason`` ("stop" or "length")."""
    if len(outputs) != expected:
        raise BackendError(f"vLLM returned {len(outputs)} outputs for {expected} prompts")
    results = []
    for ro in outputs:
        comps = sorted(ro.outputs, key=lambda o: getattr(o, "index", 0))
        results.append(
            [
                Completion(o.text or "", truncated=getattr(o, "finish_reason", None) == "length")
                for o in comps
            ]
        )
    return results
