"""LLM backends of the description stage and how one is chosen.

- ``vllm``: in-process offline inference on a GPU (optional extra, imported lazily).
- ``transformers``: batched ``generate`` anywhere, CPU included.
- ``openai``: any OpenAI-compatible chat-completions endpoint.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from awt_engine.describe.backends.base import (
    BackendStats,
    ChatBackend,
    ChatRequest,
    Completion,
    Conversation,
    SamplingConfig,
)
from awt_engine.describe.backends.hf_backend import TransformersBackend, TransformersConfig
from awt_engine.describe.backends.openai_backend import OpenAIBackend, OpenAIConfig
from awt_engine.describe.backends.vllm_backend import VLLMBackend, VLLMConfig

BACKENDS = ("vllm", "transformers", "openai")

# Strong enough to follow the two-step instructions, open weights, fits one 24 GB GPU in bf16.
DEFAULT_LOCAL_MODEL = "Qwen/Qwen2.5-7B-Instruct"


def default_backend_name() -> str:
    """vllm when it is installed and a GPU is present, else transformers."""
    if importlib.util.find_spec("vllm") is not None:
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "transformers"


@dataclass(frozen=True)
class BackendSpec:
    """Which backend to build and its settings (what the CLI collects)."""

    name: str | None = None  # None: default_backend_name()
    model: str | None = None  # None: DEFAULT_LOCAL_MODEL (vllm, transformers); openai needs one
    base_url: str | None = None  # openai
    api_key_env: str | None = None  # openai
    concurrency: int = OpenAIConfig.concurrency
    timeout_s: float = OpenAIConfig.timeout_s
    max_retries: int = OpenAIConfig.max_retries
    max_answer_bytes: int = OpenAIConfig.max_answer_bytes
    device: str | None = None  # transformers (any torch device), vllm (cuda or cuda:N)
    dtype: str = "auto"  # vllm, transformers
    batch_size: int = TransformersConfig.batch_size
    tensor_parallel_size: int = VLLMConfig.tensor_parallel_size
    max_model_len: int | None = VLLMConfig.max_model_len
    gpu_memory_utilization: float = VLLMConfig.gpu_memory_utilization
    progress: bool = True  # transformers: its loading bars (drawn on a terminal only)


def make_backend(spec: BackendSpec, *, seed: int = 0) -> ChatBackend:
    """Build the backend (cheaply: models load on the first request)."""
    name = spec.name or default_backend_name()
    if spec.name is None and name == "vllm" and not _is_cuda(spec.device):
        name = "transformers"  # --device cpu / mps without --backend: the backend that can
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "openai":
        if not spec.base_url:
            raise ValueError("the openai backend needs --base-url (e.g. http://localhost:8000/v1)")
        if not spec.model:
            raise ValueError("the openai backend needs --model (the model name the server serves)")
        return OpenAIBackend(
            OpenAIConfig(
                base_url=spec.base_url,
                model=spec.model,
                api_key_env=spec.api_key_env,
                concurrency=spec.concurrency,
                timeout_s=spec.timeout_s,
                max_retries=spec.max_retries,
                max_answer_bytes=spec.max_answer_bytes,
            )
        )
    if spec.base_url or spec.api_key_env:
        raise ValueError(f"--base-url / --api-key-env apply to the openai backend, not {name}")
    model = spec.model or DEFAULT_LOCAL_MODEL
    if name == "vllm":
        return VLLMBackend(
            VLLMConfig(
                model=model,
                dtype=spec.dtype,
                tensor_parallel_size=spec.tensor_parallel_size,
                max_model_len=spec.max_model_len,
                gpu_memory_utilization=spec.gpu_memory_utilization,
                device=spec.device,
            ),
            seed=seed,
        )
    return TransformersBackend(
        TransformersConfig(
            model=model,
            device=spec.device,
            dtype=spec.dtype,
            batch_size=spec.batch_size,
            progress=spec.progress,
        )
    )


def _is_cuda(device: str | None) -> bool:
    """True for no device (the default), "auto" and cuda devices."""
    return device is None or device == "auto" or device.split(":")[0] == "cuda"


__all__ = [
    "BACKENDS",
    "DEFAULT_LOCAL_MODEL",
    "BackendSpec",
    "BackendStats",
    "ChatBackend",
    "ChatRequest",
    "Completion",
    "Conversation",
    "OpenAIBackend",
    "OpenAIConfig",
    "SamplingConfig",
    "TransformersBackend",
    "TransformersConfig",
    "VLLMBackend",
    "VLLMConfig",
    "default_backend_name",
    "make_backend",
]
