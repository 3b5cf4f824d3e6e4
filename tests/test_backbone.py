"""Backbone loading and encoding, with a tiny random open_clip model saved to local files."""

from __future__ import annotations

import copy
import json
import shutil
import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F

from awt_engine.backbone import (
    BackboneLoadError,
    ClipBackbone,
    PreprocessConfig,
    load_backbone,
    resolve_device,
)
from tests.fixtures_clip import (
    TINY_MODEL_CFG,
    build_tiny_state_dict,
    make_tiny_clip,
    write_local_dir,
)

TEXTS = ["a photo of a cat.", "a photo of a dog.", "", "a very " * 40 + "long prompt"]


def _reference_model(seed: int = 0) -> torch.nn.Module:
    """The tiny model built directly with open_clip from the same weights: the reference."""
    model = open_clip.CLIP(**copy.deepcopy(TINY_MODEL_CFG))
    model.load_state_dict(build_tiny_state_dict(seed))
    return model.eval()


@pytest.fixture(scope="module")
def backbone(tiny_clip_dir) -> ClipBackbone:
    return load_backbone(tiny_clip_dir, device="cpu")


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- loading


def test_local_dir_backbone_reads_everything_from_the_model(backbone, tiny_clip):
    assert isinstance(backbone, ClipBackbone)
    assert not any(m.training for m in backbone.model.modules())  # eval mode throughout
    # The folder's preprocess_cfg (not CLIP's defaults) and the model's input size.
    assert backbone.preprocess == PreprocessConfig(32, (0.5,) * 3, (0.25,) * 3, "bilinear")
    assert backbone.embed_dim == 16
    assert backbone.logit_scale == pytest.approx(50.0, rel=1e-5)  # from the weights
    assert backbone.device == torch.device("cpu") and backbone.dtype == torch.float32
    assert backbone.identity.startswith(f"local-dir:{tiny_clip.local_dir.resolve()}|sha256:")


def test_encode_images_matches_open_clip_directly(backbone, pixels):
    emb = backbone.encode_images(pixels)
    assert emb.shape == (5, 16) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-5)
    with torch.no_grad():
        ref = F.normalize(_reference_model().encode_image(pixels), dim=-1)
    assert torch.allclose(emb, ref, atol=1e-5)
    assert torch.equal(emb, backbone.encode_images(pixels))  # deterministic
    in_pairs = backbone.encode_images(pixels.double(), batch_size=2)  # any float dtype
    assert torch.allclose(in_pairs, emb, atol=1e-5)  # batching does not change results
    assert backbone.encode_images(pixels[:0]).shape == (0, 16)


def test_encode_text_matches_open_clip_directly(backbone):
    emb = backbone.encode_text(TEXTS, batch_size=3)
    assert emb.shape == (4, 16) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
    tokens = open_clip.SimpleTokenizer(context_length=16)(TEXTS)  # the config's context
    with torch.no_grad():
        ref = F.normalize(_reference_model().encode_text(tokens), dim=-1)
    assert torch.allclose(emb, ref, atol=1e-5)
    assert torch.equal(emb, backbone.encode_text(TEXTS, batch_size=3))
    assert backbone.encode_text([]).shape == (0, 16)


def test_encode_rejects_bad_input(backbone):
    with pytest.raises(ValueError, match=r"\[N, 3, 32, 32\]"):
        backbone.encode_images(torch.zeros(2, 3, 224, 224))
    with pytest.raises(ValueError, match="float"):
        backbone.encode_images(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="list"):
        backbone.encode_text("a photo of a cat")
    with pytest.raises(ValueError, match="0"):
        backbone.encode_text(["x"], batch_size=0)


def test_config_json_plus_checkpoint_file_gives_the_same_model(backbone, tiny_clip, pixels):
    other = load_backbone(str(tiny_clip.config_json), pretrained=str(tiny_clip.checkpoint))
    assert torch.allclose(other.encode_images(pixels), backbone.encode_images(pixels), atol=1e-6)
    assert torch.allclose(other.encode_text(TEXTS), backbone.encode_text(TEXTS), atol=1e-6)
    # A bare model config states no preprocessing: open_clip's (OpenAI CLIP) defaults apply.
    assert other.preprocess.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert other.preprocess.interpolation == "bicubic" and other.preprocess.size == 32
    assert other.identity.startswith(f"config:{tiny_clip.config_json.resolve()}|")
    assert other.identity != backbone.identity


def test_identity_follows_the_weights(tmp_path, pixels):
    folder = write_local_dir(tmp_path / "m", build_tiny_state_dict(seed=0))
    first = load_backbone(f"local-dir:{folder}")
    assert load_backbone(f"local-dir:{folder}").identity == first.identity  # stable
    write_local_dir(folder, build_tiny_state_dict(seed=1))  # new weights, same path
    second = load_backbone(f"local-dir:{folder}")
    assert second.identity != first.identity
    assert not torch.allclose(second.encode_images(pixels), first.encode_images(pixels))

    made = make_tiny_clip(tmp_path / "c", seed=0)
    a = load_backbone(str(made.config_json), pretrained=str(made.checkpoint))
    torch.save(build_tiny_state_dict(seed=2), made.checkpoint)  # plain state dict this time
    b = load_backbone(str(made.config_json), pretrained=str(made.checkpoint))
    assert a.identity != b.identity


def test_no_weights_warns_loudly_and_is_reproducible(tiny_clip, pixels):
    with pytest.warns(UserWarning, match="RANDOM"):
        first = load_backbone(str(tiny_clip.config_json))
    with pytest.warns(UserWarning, match="RANDOM"):
        second = load_backbone(str(tiny_clip.config_json))
    assert "random" in first.identity and first.identity == second.identity
    assert torch.equal(first.encode_images(pixels), second.encode_images(pixels))
    before = torch.random.get_rng_state()
    with pytest.warns(UserWarning):
        load_backbone(str(tiny_clip.config_json))
    assert torch.equal(before, torch.random.get_rng_state())  # caller's RNG untouched


def test_bf16_precision_on_cpu(tiny_clip_dir, backbone, pixels):
    low = load_backbone(tiny_clip_dir, device="cpu", precision="bf16")
    assert low.dtype == torch.bfloat16
    emb = low.encode_images(pixels)
    assert emb.dtype == torch.float32
    cosine = (emb * backbone.encode_images(pixels)).sum(-1)
    assert (cosine > 0.98).all()


# ---------------------------------------------------------------------------- errors


def test_missing_files_name_the_path(tmp_path, tiny_clip):
    missing = tmp_path / "nope" / "weights.pt"
    with pytest.raises(BackboneLoadError, match=r"weights\.pt") as info:
        load_backbone(str(tiny_clip.config_json), pretrained=str(missing))
    assert str(missing) in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(BackboneLoadError, match=r"weights\.pt"):
        load_backbone("ViT-B-32", pretrained=str(missing))  # fails before building anything
    with pytest.raises(BackboneLoadError, match="not found") as info:
        load_backbone(f"local-dir:{tmp_path / 'absent'}")
    assert str(tmp_path / "absent") in str(info.value)
    with pytest.raises(BackboneLoadError, match="not found"):
        load_backbone(str(tmp_path / "absent.json"))


def test_local_dir_without_config_or_weights(tmp_path, tiny_clip):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BackboneLoadError, match=r"open_clip_config\.json"):
        load_backbone(f"local-dir:{empty}")
    shutil.copy(tiny_clip.local_dir / "open_clip_config.json", empty)
    with pytest.raises(BackboneLoadError, match="no weights file"):
        load_backbone(f"local-dir:{empty}")
    with pytest.raises(BackboneLoadError, match="pretrained must be None"):
        load_backbone(f"local-dir:{tiny_clip.local_dir}", pretrained="openai")


def test_unreadable_checkpoint_is_a_clear_error(tmp_path, tiny_clip):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneLoadError, match=r"broken\.pt"):
        load_backbone(str(tiny_clip.config_json), pretrained=str(bad))


def test_unknown_model_suggests_close_names():
    with pytest.raises(BackboneLoadError, match="Unknown model") as info:
        load_backbone("ViT-B-61")
    assert "ViT-B-16" in str(info.value)
    with pytest.raises(BackboneLoadError, match="vit-b-32") as info:
        load_backbone("vit-b-32")
    assert "ViT-B-32" in str(info.value)  # suggestions match case-insensitively


def test_unknown_tag_lists_the_tags():
    with pytest.raises(BackboneLoadError, match="openai"):
        load_backbone("ViT-B-32", pretrained="not_a_tag")


def test_failed_download_is_a_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(BackboneLoadError) as info:
        load_backbone("ViT-B-32", pretrained="openai", device="cpu")
    message = str(info.value)
    assert "ViT-B-32" in message and "openai" in message and "Network is unreachable" in message
    assert "pretrained=/path/to/file" in message  # what to do about it


def _fake_hub(monkeypatch, snapshot):
    """Serve hf-hub downloads from a folder laid out like the Hugging Face cache."""
    calls = []

    def download(model_id, filename=None, revision=None, cache_dir=None):
        calls.append((model_id, filename))
        if snapshot is None:
            raise OSError("Network is unreachable")
        return str(snapshot / (filename or "open_clip_model.safetensors"))

    monkeypatch.setattr(open_clip.pretrained, "download_pretrained_from_hf", download)
    monkeypatch.setattr(open_clip.factory, "download_pretrained_from_hf", download)
    return calls


def test_hf_hub_model_names_its_revision(monkeypatch, tmp_path, tiny_clip, backbone, pixels):
    revision = "0123456789abcdef" * 2 + "01234567"
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / revision
    shutil.copytree(tiny_clip.local_dir, snapshot)
    calls = _fake_hub(monkeypatch, snapshot)
    hub = load_backbone("hf-hub:org/tiny", device="cpu")
    assert {model_id for model_id, _ in calls} == {"org/tiny"}
    assert hub.identity == f"hf-hub:org/tiny|rev:{revision}"
    assert hub.preprocess == backbone.preprocess
    assert torch.allclose(hub.encode_images(pixels), backbone.encode_images(pixels), atol=1e-6)


def test_hf_hub_offline_is_a_clear_error(monkeypatch):
    _fake_hub(monkeypatch, None)
    with pytest.raises(BackboneLoadError, match="local-dir:") as info:
        load_backbone("hf-hub:org/tiny", device="cpu")
    assert "org/tiny" in str(info.value) and "Network is unreachable" in str(info.value)
    with pytest.raises(BackboneLoadError, match="pretrained must be None"):
        load_backbone("hf-hub:org/tiny", pretrained="openai")


def test_openai_weights_get_the_quickgelu_architecture(monkeypatch):
    seen = []

    def record(name, *args, **kwargs):
        seen.append(name)
        raise RuntimeError("stop before downloading")

    monkeypatch.setattr(open_clip, "create_model", record)
    for model in ("ViT-B-16", "ViT-B/16", "ViT-B-16-quickgelu"):
        with pytest.raises(BackboneLoadError):
            load_backbone(model, pretrained="OpenAI", device="cpu")
    with pytest.raises(BackboneLoadError):
        load_backbone("ViT-B-16", pretrained="laion2b_s34b_b88k", device="cpu")
    assert seen == ["ViT-B-16-quickgelu"] * 3 + ["ViT-B-16"]


def test_config_file_name_clash_with_a_builtin(tmp_path):
    clash = tmp_path / "ViT-B-32.json"
    clash.write_text(json.dumps(TINY_MODEL_CFG))
    with pytest.raises(BackboneLoadError, match="rename"):
        load_backbone(str(clash))


def test_unknown_device_and_precision(tiny_clip_dir):
    with pytest.raises(ValueError, match="cpu") as info:
        load_backbone(tiny_clip_dir, device="tpu")
    assert "tpu" in str(info.value) and "auto" in str(info.value)
    with pytest.raises(ValueError, match="fp16"):
        load_backbone(tiny_clip_dir, device="cpu", precision="fp8")


def test_resolve_device():
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    auto = resolve_device()
    if torch.cuda.is_available():
        assert auto.type == "cuda" and auto.index is not None
    elif not torch.backends.mps.is_available():
        assert auto == torch.device("cpu")
    n = torch.cuda.device_count()
    with pytest.raises(ValueError, match=f"cuda:{n}"):
        resolve_device(f"cuda:{n}")  # one past the last device (or no CUDA at all)
    for bad in ("gpu", "cuda:x", "", "cuda:0:1"):
        with pytest.raises(ValueError, match="Valid choices"):
            resolve_device(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_half_precision(tiny_clip_dir, backbone, pixels):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warnings on the GPU path
        gpu = load_backbone(tiny_clip_dir, device="cuda")
    assert gpu.dtype == torch.float16 and gpu.device.type == "cuda"
    img = gpu.encode_images(pixels)  # CPU float32 in, CUDA float32 out
    txt = gpu.encode_text(TEXTS)
    assert img.device == gpu.device and img.dtype == torch.float32
    assert (img.cpu() * backbone.encode_images(pixels)).sum(-1).min() > 0.99
    assert (txt.cpu() * backbone.encode_text(TEXTS)).sum(-1).min() > 0.99
