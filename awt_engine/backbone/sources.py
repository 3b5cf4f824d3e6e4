"""Where a backbone's weights come from: model names, tags, files, folders and the Hub.

The resolution happens before anything is built, so a wrong name or a missing file is a
:class:`BackboneLoadError` naming it and the fix. This module is the engine's only
importer of ``open_clip`` (lazily, through :func:`open_clip_module`); the model
wrapper in :mod:`awt_engine.backbone.model` reaches it from here.

The combinations are tabled in :mod:`awt_engine.backbone`.

OpenAI weights were trained with QuickGELU. open_clip's plain names (``ViT-B-16``) use
exact GELU, so a plain name with a QuickGELU tag (``openai``, ``metaclip_*``, …) is mapped
to its ``-quickgelu`` variant (``ViT-B-16`` + ``openai`` -> ``ViT-B-16-quickgelu``), which
is the architecture the weights were trained with; the identity names the mapped model.
With a checkpoint *file* nothing is mapped: name the ``-quickgelu`` model yourself for
OpenAI weights.

A ``local-dir:`` folder holds ``open_clip_config.json`` (``{"model_cfg": {...},
"preprocess_cfg": {...}}``) and one weights file (``open_clip_model.safetensors``,
``open_clip_pytorch_model.bin``, ... as open_clip's loader looks for them).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from awt_engine._io import file_sha256

logger = logging.getLogger(__name__)

LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
# Weight files open_clip's local-dir loader picks from (any of these suffixes).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")
# Seed for random initialisation: a model built without weights is the same model on every
# load, so its identity (and any cache keyed on it) stays truthful.
RANDOM_INIT_SEED = 0
_RANDOM_WEIGHTS = "none"  # the record of a randomly initialised model's weights


class BackboneLoadError(ValueError):
    """The backbone could not be loaded; the message names the model, weights and a fix."""


_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime) so a reload does not re-read it."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = file_sha256(path)
    return _SHA_MEMO[key]


def open_clip_module() -> ModuleType:
    import open_clip  # heavy (~4 s cold): imported on first use only

    return open_clip


@dataclass(frozen=True)
class WeightSource:
    """What to hand open_clip, resolved and checked before anything is built."""

    create_name: str  # model name as open_clip's create_model takes it
    pretrained: str | None  # tag or file for create_model (None for schemas / random)
    identity: str
    random_init: bool
    weights: str  # what was loaded, for records: a tag, a file, a folder, a hub revision
    force_quick_gelu: bool = False
    downloads: bool = False  # weights come from the network (a pretrained tag)


def _suggest(name: str, choices: list[str]) -> str:
    lowered = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=5, cutoff=0.5)
    return ", ".join(lowered[c] for c in close) if close else "(no close match)"


def _resolve_local_dir(model: str, pretrained: str | None) -> WeightSource:
    if pretrained is not None:
        raise BackboneLoadError(
            f"{model!r} brings its own weights; pretrained must be None, got {pretrained!r}."
        )
    folder = Path(model[len(LOCAL_DIR) :]).expanduser().resolve()
    if not folder.is_dir():
        raise BackboneLoadError(
            f"Model folder not found: {folder} (from {model!r}). A local-dir: model is a folder "
            "holding open_clip_config.json and a weights file."
        )
    config = folder / "open_clip_config.json"
    if not config.is_file():
        raise BackboneLoadError(
            f"Model folder {folder} has no open_clip_config.json; a local-dir: model needs it "
            '({"model_cfg": {...}, "preprocess_cfg": {...}}) next to the weights file.'
        )
    weights = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise BackboneLoadError(
            f"Model folder {folder} has no weights file (*.safetensors, *.bin, *.pth). "
            "Copy the checkpoint next to open_clip_config.json."
        )
    # The identity covers the config and every candidate weights file, so it changes
    # whichever file open_clip picks and whatever is edited.
    h = hashlib.sha256(config.read_bytes())
    for w in weights:
        h.update(f"\0{w.name}\0{_file_sha256(w)}".encode())
    return WeightSource(
        create_name=f"{LOCAL_DIR}{folder}",
        pretrained=None,
        identity=f"{LOCAL_DIR}{folder}|sha256:{h.hexdigest()}",
        random_init=False,
        weights=f"{LOCAL_DIR}{folder}",
    )


def _resolve_hf_hub(model: str, pretrained: str | None, cache_dir: str | None) -> WeightSource:
    if pretrained is not None:
        raise BackboneLoadError(
            f"{model!r} brings its own weights; pretrained must be None, got {pretrained!r}."
        )
    repo = model[len(HF_HUB) :]
    try:  # fetched now to name the exact revision; create_model then reads the cached file
        path = Path(
            open_clip_module().pretrained.download_pretrained_from_hf(repo, cache_dir=cache_dir)
        )
    except Exception as e:
        raise BackboneLoadError(
            f"Could not download the weights of {model!r} from the Hugging Face Hub: {e}. "
            "On an offline machine, download the repository elsewhere, copy it here and load it "
            "with 'local-dir:/path/to/repo' (or point cache_dir / HF_HOME at a filled cache)."
        ) from e
    snapshot = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", str(path))
    version = f"rev:{snapshot.group(1)}" if snapshot else f"sha256:{_file_sha256(path)}"
    return WeightSource(
        create_name=model,
        pretrained=None,
        identity=f"{model}|{version}",
        random_init=False,
        weights=f"{model}@{version}",
    )


_REGISTERED_CONFIGS: dict[str, Path] = {}  # open_clip name -> config file we registered


def _resolve_config_file(model: str, pretrained: str | None) -> WeightSource:
    oc = open_clip_module()
    path = Path(model).expanduser().resolve()
    if not path.is_file():
        raise BackboneLoadError(
            f"Model config file not found: {path} (from {model!r}). Pass an open_clip model name "
            "(see open_clip.list_models()), a path to a model config .json, "
            "'local-dir:/path' or 'hf-hub:org/repo'."
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BackboneLoadError(f"Model config {path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict) or "model_cfg" in cfg:
        raise BackboneLoadError(
            f"Model config {path} looks like an open_clip_config.json (it has 'model_cfg'): put "
            "it in a folder next to its weights file and load 'local-dir:/that/folder'."
        )
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise BackboneLoadError(
            f"Model config {path} needs the keys embed_dim, vision_cfg and text_cfg "
            "(the format of open_clip's model_configs/*.json)."
        )
    name = path.stem  # open_clip registers a config file under its stem
    known = oc.get_model_config(name)
    if known is None or _REGISTERED_CONFIGS.get(name) == path:
        oc.add_model_config(path)  # (re-)reads the file, so an edited config is picked up
        _REGISTERED_CONFIGS[name] = path
    elif known != cfg:
        raise BackboneLoadError(
            f"Model config {path} would be registered under its file name {name!r}, which "
            "already names a different open_clip model config; rename the file."
        )
    weights = _weights_file(name, pretrained) if pretrained is not None else None
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()
    w_id = f"sha256:{_file_sha256(weights)}" if weights else f"random-init-seed{RANDOM_INIT_SEED}"
    return WeightSource(
        create_name=name,
        pretrained=str(weights) if weights else None,
        identity=f"config:{path}|sha256:{h}|{w_id}",
        random_init=weights is None,
        weights=str(weights) if weights else _RANDOM_WEIGHTS,
    )


def _weights_file(name: str, pretrained: str, tags: list[str] | None = None) -> Path:
    path = Path(pretrained).expanduser()
    if path.is_file():
        return path.resolve()
    looks_like_path = (
        os.sep in pretrained or "/" in pretrained or path.suffix in (*_WEIGHT_SUFFIXES, ".pt")
    )
    if looks_like_path or not tags:
        raise BackboneLoadError(
            f"Weights file not found: {path.resolve()} (pretrained={pretrained!r} for model "
            f"{name!r}). Check the path"
            + (f", or use a pretrained tag: {', '.join(tags)}." if tags else ".")
        )
    raise BackboneLoadError(
        f"{pretrained!r} is neither a pretrained tag of {name!r} nor an existing file. "
        f"Tags for {name!r}: {', '.join(tags)}."
    )


def _resolve_builtin(model: str, pretrained: str | None) -> WeightSource:
    oc = open_clip_module()
    name = model.replace("/", "-")  # open_clip accepts "ViT-B/16" for "ViT-B-16"
    models = oc.list_models()
    if name not in models:
        raise BackboneLoadError(
            f"Unknown model {model!r}. Close matches: {_suggest(name, models)}. "
            f"All {len(models)} names: open_clip.list_models(); or pass a model config .json, "
            "'local-dir:/path' or 'hf-hub:org/repo'."
        )
    if pretrained is None:
        return WeightSource(
            name,
            None,
            f"{name}|random-init-seed{RANDOM_INIT_SEED}",
            random_init=True,
            weights=_RANDOM_WEIGHTS,
        )
    tag_cfg = oc.pretrained.get_pretrained_cfg(name, pretrained)
    if tag_cfg:
        tag = pretrained.lower().replace("-", "_")  # open_clip's own tag normalisation
        force_quick_gelu = False
        model_quick_gelu = bool(oc.get_model_config(name).get("quick_gelu", False))
        if tag_cfg.get("quick_gelu", False) and not model_quick_gelu:
            variant = f"{name}-quickgelu"
            logger.info("%s weights '%s' were trained with QuickGELU: using %s", name, tag, variant)
            if variant in models:
                name = variant
            else:
                force_quick_gelu = True
                variant = f"{name}+quickgelu"
            return WeightSource(
                name,
                pretrained,
                f"{variant}|{tag}",
                random_init=False,
                weights=tag,
                force_quick_gelu=force_quick_gelu,
                downloads=True,
            )
        return WeightSource(
            name, pretrained, f"{name}|{tag}", random_init=False, weights=tag, downloads=True
        )
    tags = oc.list_pretrained_tags_by_model(name)
    weights = _weights_file(name, pretrained, tags)
    return WeightSource(
        name,
        str(weights),
        f"{name}|sha256:{_file_sha256(weights)}",
        random_init=False,
        weights=str(weights),
    )


def fingerprint_of(identity: str) -> str:
    """``identity`` with the path of a local folder or config file dropped."""
    head, _, rest = identity.partition("|")
    if head.startswith(LOCAL_DIR):
        return f"{LOCAL_DIR.rstrip(':')}|{rest}"
    if head.startswith("config:"):
        return f"config|{rest}"
    return identity


def normalize_pretrained(pretrained: str | None) -> str | None:
    """The CLI's spelling of random weights, ``"none"`` (any case), as the API's None; any
    other value unchanged. Every API that takes ``pretrained`` accepts both."""
    if isinstance(pretrained, str) and pretrained.strip().lower() == _RANDOM_WEIGHTS:
        return None
    return pretrained


def resolve_source(model: str, pretrained: str | None, cache_dir: str | None) -> WeightSource:
    """What to build and load for (model, pretrained); BackboneLoadError if it cannot be."""
    pretrained = normalize_pretrained(pretrained)
    if not isinstance(model, str) or not model.strip():
        raise BackboneLoadError(f"model must be a non-empty string, got {model!r}")
    model = model.strip()
    if model.startswith(LOCAL_DIR):
        return _resolve_local_dir(model, pretrained)
    if model.startswith(HF_HUB):
        return _resolve_hf_hub(model, pretrained, cache_dir)
    if model.endswith(".json"):
        return _resolve_config_file(model, pretrained)
    return _resolve_builtin(model, pretrained)
