"""The vllm backend: request building and output parsing against vLLM's documented objects
(``LLM(...).chat(conversations, sampling_params=[SamplingParams...])`` returning
``RequestOutput``s with ``outputs: list[CompletionOutput(index, text, token_ids,
finish_reason)]``), with a stand-in module; plus a real run when vllm and a GPU are present."""

import importlib.util
import sys
import types
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from awt_engine.describe import BackendError, InstructionSet, SamplingConfig
from awt_engine.describe.backends import (
    ChatRequest,
    VLLMBackend,
    VLLMConfig,
    default_backend_name,
)


@dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    seed: int | None = None


@dataclass
class FakeCompletionOutput:
    index: int
    text: str
    token_ids: list = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: object = None
    finish_reason: str | None = "stop"


@dataclass
class FakeRequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    outputs: list
    finished: bool = True


class FakeLLM:
    instances: ClassVar[list] = []

    def __init__(self, model, **kwargs):
        self.model = model
        self.kwargs = kwargs
        self.calls = []
        FakeLLM.instances.append(self)

    def chat(self, messages, sampling_params=None, use_tqdm=True, **kwargs):
        self.calls.append((messages, sampling_params, use_tqdm))
        outs = []
        for i, (conv, sp) in enumerate(zip(messages, sampling_params, strict=True)):
            # n samples, listed out of index order; the second one hits the token limit
            comps = [
                FakeCompletionOutput(
                    index=j,
                    text=f"answer {i}.{j} to {conv[-1]['content'][:10]}",
                    token_ids=list(range(3 + j)),
                    finish_reason="length" if j == 1 else "stop",
                )
                for j in reversed(range(sp.n))
            ]
            outs.append(FakeRequestOutput(str(i), None, [1, 2], comps))
        return outs


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM = FakeLLM
    mod.SamplingParams = FakeSamplingParams
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", mod)
    return mod


def test_all_conversations_go_to_one_chat_call_with_per_request_seeds(fake_vllm):
    prompts = InstructionSet.load()
    reqs = [
        ChatRequest(prompts.description_conversation("toy", c, "What is {}?", 4), seed=100 + i)
        for i, c in enumerate(["ant", "bee", "cat"])
    ]
    backend = VLLMBackend(VLLMConfig("org/model", max_model_len=2048), seed=9)
    seen = []
    sampling = SamplingConfig(max_tokens=77, temperature=0.6, top_p=0.9, n=2)
    out = backend.chat(reqs, sampling, on_result=lambda i, c: seen.append(i))

    (llm,) = FakeLLM.instances
    assert llm.model == "org/model"
    assert llm.kwargs["seed"] == 9 and llm.kwargs["max_model_len"] == 2048
    assert llm.kwargs["dtype"] == "auto" and llm.kwargs["tensor_parallel_size"] == 1
    (call,) = llm.calls  # one call: the engine batches everything
    messages, params, use_tqdm = call
    assert messages == [r.messages for r in reqs]
    assert use_tqdm is False
    assert [p.seed for p in params] == [100, 101, 102]
    assert {(p.n, p.temperature, p.top_p, p.max_tokens) for p in params} == {(2, 0.6, 0.9, 77)}

    assert seen == [0, 1, 2]
    assert [[c.text[:10] for c in o] for o in out] == [
        ["answer 0.0", "answer 0.1"],
        ["answer 1.0", "answer 1.1"],
        ["answer 2.0", "answer 2.1"],
    ]
    assert [[c.truncated for c in o] for o in out] == [[False, True]] * 3
    assert backend.stats.requests == 3
    assert backend.stats.generated_tokens == 3 * (3 + 4)

    backend.chat(reqs[:1], sampling)
    assert len(FakeLLM.instances) == 1  # the engine is built once


def test_output_count_mismatch_is_an_error(fake_vllm, monkeypatch):
    backend = VLLMBackend(VLLMConfig("m"))
    backend._load()
    monkeypatch.setattr(backend._llm, "chat", lambda *a, **k: [])
    with pytest.raises(BackendError, match="0 outputs for 1 prompts"):
        backend.chat([ChatRequest([{"role": "user", "content": "x"}], 0)], SamplingConfig())


def test_missing_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    backend = VLLMBackend(VLLMConfig("m"))
    with pytest.raises(BackendError, match="optional 'vllm' package"):
        backend.chat([ChatRequest([{"role": "user", "content": "x"}], 0)], SamplingConfig())


def test_default_backend_is_transformers_without_vllm_or_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert default_backend_name() == "transformers"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_backend_name() == "transformers"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_backend_name() == "vllm"


def _real_vllm_available():
    if importlib.util.find_spec("vllm") is None:
        return False
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _real_vllm_available(), reason="needs vllm and a CUDA GPU")
def test_real_vllm_engine_with_a_tiny_model(tmp_path):  # pragma: no cover - GPU only
    from tests.fixtures_llm import build_tiny_chat_model

    # head dim 64 (hidden 256 / 4 heads): a size every vLLM attention kernel supports
    folder = build_tiny_chat_model(tmp_path / "tiny", hidden=256)
    backend = VLLMBackend(
        VLLMConfig(str(folder), dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3)
    )
    prompts = InstructionSet.load()
    reqs = [
        ChatRequest(prompts.description_conversation("toy", c, "What is {}?", 3), seed=i)
        for i, c in enumerate(["ant", "bee"])
    ]
    out = backend.chat(reqs, SamplingConfig(max_tokens=8, n=2))
    assert [len(o) for o in out] == [2, 2]
    assert all(isinstance(c.text, str) for o in out for c in o)


def test_engine_start_failure_is_a_clear_error(fake_vllm, monkeypatch):
    def no_gpu(model, **kwargs):
        raise RuntimeError("No CUDA GPUs are available")

    monkeypatch.setattr(fake_vllm, "LLM", no_gpu)
    backend = VLLMBackend(VLLMConfig("org/model"))
    with pytest.raises(BackendError, match=r"could not start model 'org/model'.*No CUDA GPUs"):
        backend.chat([ChatRequest([{"role": "user", "content": "x"}], 0)], SamplingConfig())
