"""A tiny randomly initialised open_clip model saved the ways users bring real ones.

``make_tiny_clip(path)`` writes, under ``path``:

- ``local-dir/``: ``open_clip_config.json`` + ``open_clip_model.safetensors``, loadable as
  ``load_backbone("local-dir:<path>/local-dir")``;
- ``tiny-test-clip.json`` + ``tiny-test-clip.pt``: a model config in open_clip's
  model_configs format and a plain checkpoint, loadable as
  ``load_backbone("<path>/tiny-test-clip.json", pretrained="<path>/tiny-test-clip.pt")``.

The preprocessing in ``open_clip_config.json`` is deliberately not CLIP's default (mean
0.5, std 0.25, bilinear, R = 32) so tests can see that it is read from the model.

Building takes well under a second once open_clip is imported. Session fixtures:
``tiny_clip`` (a :class:`TinyClip` of paths) and ``tiny_clip_dir`` (the ``local-dir:``
model name). To use them in a test module, bind them at module level
(``tiny_clip_dir = fixtures_clip.tiny_clip_dir``) or import them in conftest.py.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

TINY_MODEL_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_PREPROCESS_CFG = {
    "size": 32,
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
    "interpolation": "bilinear",
    "resize_mode": "shortest",
}
TINY_NAME = "tiny-test-clip"

# A still tiny model whose random image features separate the toy task's classes (the
# 1-layer one above collapses them: mean cosine 0.91), for the training tests.
TRAIN_MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class TinyClip:
    root: Path
    local_dir: Path  # folder for "local-dir:" loading
    config_json: Path  # model config in open_clip's model_configs format
    checkpoint: Path  # plain state-dict checkpoint for config_json

    @property
    def local_dir_name(self) -> str:
        return f"local-dir:{self.local_dir}"


def build_tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the tiny model, the same for the same seed."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**copy.deepcopy(TINY_MODEL_CFG))
        # A non-default temperature, so tests can see logit_scale is read from the weights.
        model.logit_scale.data.fill_(float(torch.log(torch.tensor(50.0))))
    return {k: v.contiguous() for k, v in model.state_dict().items()}


def write_local_dir(
    folder: Path, state_dict: dict[str, torch.Tensor], preprocess=None, model_cfg=None
) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": TINY_MODEL_CFG if model_cfg is None else model_cfg,
        "preprocess_cfg": TINY_PREPROCESS_CFG if preprocess is None else preprocess,
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    save_file(state_dict, str(folder / "open_clip_model.safetensors"))
    return folder


def make_tiny_clip(path: Path, seed: int = 0) -> TinyClip:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state_dict = build_tiny_state_dict(seed)
    local_dir = write_local_dir(path / "local-dir", state_dict)
    config_json = path / f"{TINY_NAME}.json"
    config_json.write_text(json.dumps(TINY_MODEL_CFG, indent=2))
    checkpoint = path / f"{TINY_NAME}.pt"
    torch.save({"state_dict": state_dict}, checkpoint)
    return TinyClip(path, local_dir, config_json, checkpoint)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> TinyClip:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_clip) -> str:
    """The ``local-dir:`` model name of the tiny model, ready for ``load_backbone``."""
    return tiny_clip.local_dir_name


def make_train_clip(path: Path, seed: int = 0) -> str:
    """The training tests' model (TRAIN_MODEL_CFG, random, CLIP's initial temperature) as a
    ``local-dir:`` folder; returns the model name to load."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**copy.deepcopy(TRAIN_MODEL_CFG))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder = write_local_dir(Path(path), state, model_cfg=TRAIN_MODEL_CFG)
    return f"local-dir:{folder}"


@pytest.fixture(scope="session")
def train_clip_dir(tmp_path_factory) -> str:
    return make_train_clip(tmp_path_factory.mktemp("train-clip"))
