"""Only ``backbone/`` knows open_clip's module layout: methods and models use the parts
the backbone exposes, and those parts are the open_clip model's own modules."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from awt_engine.backbone import load_backbone

PACKAGE = Path(__file__).resolve().parents[1] / "awt_engine"

# open_clip's internal names (attributes of its CLIP, towers and residual blocks)
OPEN_CLIP_NAMES = re.compile(
    r"\bresblocks\b|\btoken_embedding\b|\bln_pre\b|\bln_post\b|\bln_final\b"
    r"|\btext_projection\b|\bpositional_embedding\b|\bclass_embedding\b|\.transformer\b"
    r"|[\"']transformer[\"']|\bvisual\.|\.visual\b|[\"']visual[\"']|\bmodel\.text\b"
    r"|\bforward_intermediates\b|\bls_[12]\b|\bln_[12]\b|\battn_pool\b|\bpool_type\b"
    r"|(?<!awt_engine\.)backbone\.model\b|\bbb\.model\b"
)


def _sources() -> list[Path]:
    files = [*(PACKAGE / "methods").rglob("*.py"), *(PACKAGE / "models").rglob("*.py")]
    assert len(files) > 10, files  # the folders are where this test thinks
    return sorted(files)


def test_methods_and_models_name_no_open_clip_internals():
    found = []
    for path in _sources():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for m in OPEN_CLIP_NAMES.finditer(line):
                found.append(f"{path.relative_to(PACKAGE)}:{n}: {m.group(0)!r}")
    assert not found, "open_clip internals outside backbone/:\n" + "\n".join(found)


def test_the_pattern_catches_what_it_is_for():
    for line in (
        "blocks = tower.transformer.resblocks",
        "emb = model.token_embedding",
        "visual = backbone.model.visual",
        'getattr(model, "visual", None)',
        "visual.ln_pre.register_forward_pre_hook(f)",
        "block.ls_1.register_forward_hook(h)",
        "feats = self.backbone.model.encode_text(ids)",
    ):
        assert OPEN_CLIP_NAMES.search(line), line
    for line in (
        "self.visual_adapters = x",
        "bb.vision_blocks",
        "bb.text_token_embedding",
        ":class:`~awt_engine.backbone.model.TowerBlocks`",
    ):
        assert not OPEN_CLIP_NAMES.search(line), line


@pytest.fixture(scope="module")
def backbone(tiny_clip_dir):
    return load_backbone(tiny_clip_dir, device="cpu")


def test_exposed_parts_are_the_models_own_modules(backbone):
    model = backbone.model  # the open_clip CLIP; this test may know its layout
    assert backbone.vision_tower is model.visual
    assert backbone.text_tower is (model if hasattr(model, "token_embedding") else model.text)
    tower = backbone.text_tower
    assert backbone.text_token_embedding is tower.token_embedding
    assert backbone.text_positional_embedding is tower.positional_embedding
    assert backbone.vision_pre_norm is model.visual.ln_pre
    assert backbone.vision_positional_embedding is model.visual.positional_embedding
    for exposed, own in (
        (backbone.text_blocks, tower.transformer),
        (backbone.vision_blocks, model.visual.transformer),
    ):
        assert len(exposed.blocks) == len(own.resblocks) > 0
        for block, mine, (attn_out, mlp_out) in zip(
            own.resblocks, exposed.blocks, exposed.branches, strict=True
        ):
            assert mine is block and attn_out is block.ls_1 and mlp_out is block.ls_2
        assert exposed.width == own.width
        assert exposed.batch_first == getattr(own, "batch_first", True)
    assert backbone.vision_pools_cls


def test_exposed_calls_equal_open_clips_own(backbone):
    ids = backbone.tokenize(["a photo of a cat", "a dog"])
    with torch.no_grad():
        assert torch.equal(backbone.text_forward(ids), backbone.model.encode_text(ids))
        g = torch.Generator().manual_seed(0)
        pixels = torch.randn(2, 3, backbone.preprocess.size, backbone.preprocess.size, generator=g)
        n = len(backbone.vision_blocks.blocks)
        levels = backbone.vision_intermediates(pixels, n)
        out = backbone.model.visual.forward_intermediates(
            pixels,
            indices=n,
            output_extra_tokens=True,
            normalize_intermediates=True,
            intermediates_only=True,
        )
    assert len(levels) == n
    for mine, theirs in zip(levels, out["image_intermediates_prefix"], strict=True):
        assert torch.equal(mine, theirs[:, 0])
