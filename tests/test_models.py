"""The model interface: zero-shot CLIP behind it, identities that follow learned tensors."""

import pytest
import torch

from awt_engine.backbone import load_backbone
from awt_engine.labels import LabelSet
from awt_engine.models.base import (
    Embedder,
    LogitModel,
    check_model,
    learned_identity,
    tensors_sha256,
)
from awt_engine.models.clip import ClipEmbedder


def test_identity_changes_when_any_learned_tensor_changes():
    ctx = {"ctx": torch.zeros(4, 8), "scale": torch.ones(1)}
    base = learned_identity("clip|fp32", "coop", ctx)
    assert base == learned_identity("clip|fp32", "coop", {k: v.clone() for k, v in ctx.items()})
    moved = {"ctx": ctx["ctx"].clone(), "scale": ctx["scale"]}
    moved["ctx"][2, 3] = 1e-6  # one value, slightly
    assert learned_identity("clip|fp32", "coop", moved) != base
    assert learned_identity("clip|fp16", "coop", ctx) != base  # another base model
    assert learned_identity("clip|fp32", "lamm", ctx) != base  # another method
    renamed = {"context": ctx["ctx"], "scale": ctx["scale"]}
    assert tensors_sha256(renamed) != tensors_sha256(ctx)
    assert tensors_sha256({"x": torch.zeros(2, 3)}) != tensors_sha256({"x": torch.zeros(3, 2)})
    assert tensors_sha256({"x": torch.zeros(2)}) != tensors_sha256({"x": torch.zeros(2).half()})


def test_clip_embedder_builds_the_design_prompts(tiny_clip_dir):
    bb = load_backbone(tiny_clip_dir, device="cpu")
    model = ClipEmbedder(bb)
    assert isinstance(model, Embedder) and not isinstance(model, LogitModel)
    labels = LabelSet(("cat", "sea_lion"), "a photo of a {}", (("furry",), ("wet",)))
    got = model.class_embeddings(labels)  # [C, P, D]
    texts = ["a photo of a cat.", "a photo of a cat. furry", "a photo of a sea lion."]
    texts.append("a photo of a sea lion. wet")
    want = bb.encode_text(texts).view(2, 2, -1)
    torch.testing.assert_close(got, want)
    views = torch.randn(2, 3, 3, 32, 32)
    torch.testing.assert_close(
        model.embed_views(views), bb.encode_images(views.flatten(0, 1)).view(2, 3, -1)
    )


def test_encoders_run_with_gradients_only_when_asked(tiny_clip_dir):
    bb = load_backbone(tiny_clip_dir, device="cpu")
    pixels = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = bb.encode_images(pixels, grad=True)
    out.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert not bb.encode_images(pixels).requires_grad  # inference: no graph
    with torch.inference_mode():
        assert bb.encode_images(pixels.detach()).is_inference()  # the fast path
    assert not any(p.requires_grad for p in bb.model.parameters())  # the backbone is frozen


def test_objects_that_are_neither_kind_are_refused():
    with pytest.raises(TypeError, match="neither an Embedder"):
        check_model(object())


def test_llm_loading_errors_name_the_bad_value(tmp_path):
    from awt_engine.models.llm import LLMLoadError, load_causal_lm

    with pytest.raises(LLMLoadError, match="does not exist"):
        load_causal_lm(str(tmp_path / "no-such-lm"), device="cpu")
    with pytest.raises(ValueError, match="unknown dtype 'float17'") as err:
        load_causal_lm(str(tmp_path), device="cpu", dtype="float17")
    assert not isinstance(err.value, LLMLoadError)  # not dressed up as a loading failure
