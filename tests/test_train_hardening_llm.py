"""Issue 17, item 28: the fit loop's autocast over the real LLM methods (CPU stand-ins for
CUDA): CLAMP and eP-ALM with bf16 LLM weights compute in bf16, not fp16; with float32
LLM weights they keep the default fp16. And eP-ALM's early depth check agrees with the
layer count the model itself finds."""

import pytest
import torch

from awt_engine.backbone import load_backbone
from awt_engine.labels import LabelSet
from awt_engine.methods import get_method
from awt_engine.training import llm_depth
from awt_engine.training.loop import autocast_precision, frozen_llm_dtype
from tests.fixtures_llm import build_tiny_chat_model

pytestmark = pytest.mark.slow  # a tiny LLM and its tokenizer are built first (~25 s loaded)
CUDA = torch.device("cuda")
LABELS = LabelSet(("amber", "cobalt"), "a photo of a {}")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    return str(build_tiny_chat_model(tmp_path_factory.mktemp("hardening-lm"), hidden=64, layers=4))


def test_clamp_over_a_bf16_llm_autocasts_to_bf16(train_clip_dir, tiny_lm):
    spec = get_method("clamp")
    bb = load_backbone(train_clip_dir, device="cpu")
    small = {"n_prompt_tokens": 2, "lora_r": 2, "lora_alpha": 2.0, "pool_heads": 4}
    bf16 = spec.build(bb, spec.config(llm=tiny_lm, llm_dtype="bfloat16", **small))
    assert frozen_llm_dtype(bf16) == torch.bfloat16
    assert autocast_precision(None, CUDA, bf16) == "bf16"
    fp32 = spec.build(bb, spec.config(llm=tiny_lm, llm_dtype="float32", **small))
    assert autocast_precision(None, CUDA, fp32) == "fp16"
    assert frozen_llm_dtype(bb) is None and autocast_precision(None, CUDA, bb) == "fp16"


def test_epalm_over_a_bf16_llm_autocasts_to_bf16(train_clip_dir, tiny_lm):
    spec = get_method("epalm")
    cfg = spec.config(llm=tiny_lm, start_layer=0, end_layer=4, n_levels=2, prompt_len=2)
    net = spec.build(load_backbone(train_clip_dir, device="cpu"), cfg)
    assert autocast_precision(None, CUDA, net) == "fp16"  # float32 on the CPU
    net.llm.model.to(torch.bfloat16)  # as "auto" loads a bf16 checkpoint on a GPU
    assert autocast_precision(None, CUDA, net) == "bf16"
    assert llm_depth(tiny_lm) == 4  # what the early check reads, from config.json
    with pytest.raises(ValueError, match=r"\[0, 5\) do not fit .*'s 4 layers"):
        spec.build(net.backbone, spec.config(llm=tiny_lm, start_layer=0, end_layer=5, n_levels=2))
