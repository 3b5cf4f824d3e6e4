"""vLLM offline inference on a GPU: every conversation of a step goes to ``LLM.chat`` in one
call, so the engine schedules and batches them itself (continuous batching, shared prefixes).

vLLM is an optional extra (``pip install awt-engine[vllm]``) and is imported only here, when
the backend first runs.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
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
    # vLLM's own default: weights take what they need, the KV cache gets the rest.
    gpu_memory_utilization: float = 0.9
    # Our prompts are ~1-1.5k tokens plus a 512-token answer. Capping the context keeps the
    # KV-cache reservation small for models that advertise 32k-128k contexts.
    max_model_len: int | None = 4096
    trust_remote_code: bool = False  # never run code from a model repo unless asked

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
        }

    def _load(self) -> None:
        if self._llm is None:
            self._vllm = import_vllm()
            try:
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
