"""The CLIP backbone: loads an open_clip model and turns pixels and texts into embeddings.

This is the only module of the engine that imports ``open_clip`` (lazily, on the first
:func:`load_backbone` call, so that reading :class:`PreprocessConfig` stays cheap).

Where the weights come from (``load_backbone(model, pretrained)``):

=================================  ===============================  ==========================
``model``                          ``pretrained``                   weights
=================================  ===============================  ==========================
built-in name (``ViT-B-16``)       tag (``openai``, ``laion2b_…``)  downloaded by open_clip
built-in name                      path to a checkpoint file        that file
path to a model config ``.json``   path to a checkpoint file        that file
``local-dir:/path/to/folder``      ``None``                         the folder's weights file
``hf-hub:org/repo``                ``None``                         downloaded from the Hub
built-in name or config ``.json``  ``None``                         RANDOM (loud warning)
=================================  ===============================  ==========================

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
import importlib.util
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from awt_engine._io import file_sha256

logger = logging.getLogger(__name__)

_LOCAL_DIR = "local-dir:"
_HF_HUB = "hf-hub:"
# Weight files open_clip's local-dir loader picks from (any of these suffixes).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")
_PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Seed for random initialisation: a model built without weights is the same model on every
# load, so its identity (and any cache keyed on it) stays truthful.
_RANDOM_INIT_SEED = 0
_RANDOM_WEIGHTS = "none"  # the record of a randomly initialised model's weights


class BackboneLoadError(ValueError):
    """The backbone could not be loaded; the message names the model, weights and a fix."""


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels must be prepared for the model, as read from the model itself."""

    size: int  # R: the square input size, pixels
    mean: tuple[float, float, float]  # per-channel mean of [0, 1] RGB values
    std: tuple[float, float, float]  # per-channel std of [0, 1] RGB values
    interpolation: str  # "bicubic" | "bilinear": the model's resize interpolation


# ---------------------------------------------------------------------------- devices


def _available_devices() -> list[str]:
    choices = ["auto", "cpu"]
    if torch.cuda.is_available():
        choices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        choices.append("mps")
    return choices


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Turn a device request into a :class:`torch.device` that exists on this machine.

    ``"auto"`` picks CUDA, then MPS, then the CPU. ``"cuda"`` means the current CUDA
    device, returned with its index (``cuda:0``) so that device comparisons work.
    Anything unknown or absent raises ValueError listing the choices on this machine.
    """
    spec = str(device).strip().lower() if isinstance(device, str | torch.device) else None
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    match = re.fullmatch(r"(cpu|cuda|mps)(?::(\d+))?", spec or "")
    if match is None:
        raise ValueError(
            f"Unknown device {device!r}. Valid choices on this machine: "
            f"{', '.join(_available_devices())}."
        )
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not _mps_available():
            raise ValueError(
                f"Device {device!r} requested but MPS is not available. "
                f"Valid choices on this machine: {', '.join(_available_devices())}."
            )
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise ValueError(
            f"Device {device!r} requested but CUDA is not available. "
            f"Valid choices on this machine: {', '.join(_available_devices())}."
        )
    idx = torch.cuda.current_device() if index is None else int(index)
    if idx >= torch.cuda.device_count():
        raise ValueError(
            f"Device {device!r} requested but this machine has "
            f"{torch.cuda.device_count()} CUDA device(s). "
            f"Valid choices: {', '.join(_available_devices())}."
        )
    return torch.device("cuda", idx)


def _resolve_precision(precision: str | None, device: torch.device) -> str:
    if precision is None:
        # Half precision on CUDA: the OpenAI CLIP recipe, ~2x faster, and the cosine
        # similarities move by ~1e-3. MPS and CPU stay fp32: fp16 kernels there are slow
        # or incomplete, depending on the torch version.
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in _PRECISIONS:
        raise ValueError(
            f"Unknown precision {precision!r}. Valid choices: {', '.join(_PRECISIONS)} "
            "(or None: fp16 on CUDA, fp32 elsewhere)."
        )
    return precision


# ---------------------------------------------------------------------------- hashing

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime) so a reload does not re-read it."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = file_sha256(path)
    return _SHA_MEMO[key]


# ---------------------------------------------------------------------------- the backbone


class ClipBackbone:
    """A loaded CLIP model in eval mode, plus what the rest of the engine needs to know.

    ``encode_images`` and ``encode_text`` return L2-normalised float32 embeddings on
    ``device`` whatever the compute ``dtype`` is.
    """

    image_batch_size: int = 256  # images per forward pass: the views of ~5 images at V = 51

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        identity: str,
        device: torch.device,
        dtype: torch.dtype,
        preprocess: PreprocessConfig,
        weights: str = "unknown",
    ) -> None:
        self.model = model
        self._tokenizer = tokenizer
        self.identity = identity
        self.weights = weights  # what was loaded (tag, file, folder, hub revision, "none")
        self.device = device
        self.dtype = dtype
        self.preprocess = preprocess
        self.logit_scale = float(model.logit_scale.exp().item())
        self.embed_dim = self._find_embed_dim()

    def __repr__(self) -> str:
        return (
            f"ClipBackbone(identity={self.identity!r}, device={self.device}, dtype={self.dtype}, "
            f"R={self.preprocess.size}, D={self.embed_dim})"
        )

    def _find_embed_dim(self) -> int:
        dim = getattr(getattr(self.model, "visual", None), "output_dim", None)
        if isinstance(dim, int) and dim > 0:
            return dim
        with torch.inference_mode():  # towers without the attribute: one tiny forward pass
            tokens = self._tokenizer([""]).to(self.device)
            return int(self.model.encode_text(tokens).shape[-1])

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, *, batch_size: int | None = None) -> torch.Tensor:
        """Normalised pixels [N, 3, R, R] (any float dtype/device) -> [N, D] unit float32."""
        r = self.preprocess.size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, r, r):
            raise ValueError(
                f"encode_images expects pixels of shape [N, 3, {r}, {r}], got {tuple(pixels.shape)}"
            )
        if not pixels.is_floating_point():
            raise ValueError(
                f"encode_images expects normalised float pixels, got dtype {pixels.dtype} "
                "(make them with awt_engine.views.make_views)"
            )
        bs = self.image_batch_size if batch_size is None else batch_size
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        out = torch.empty(pixels.shape[0], self.embed_dim, dtype=torch.float32, device=self.device)
        for start in range(0, pixels.shape[0], bs):
            chunk = pixels[start : start + bs].to(self.device, self.dtype, non_blocking=True)
            feats = self.model.encode_image(chunk)  # [b, D] in the compute dtype
            out[start : start + bs] = F.normalize(feats.float(), dim=-1)
        return out  # [N, D]

    @torch.inference_mode()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> [N, D] unit float32, tokenised with the model's own tokenizer."""
        if isinstance(texts, str):
            raise ValueError("encode_text expects a list of strings, got a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        out = torch.empty(len(texts), self.embed_dim, dtype=torch.float32, device=self.device)
        for start in range(0, len(texts), batch_size):
            tokens = self._tokenizer(texts[start : start + batch_size]).to(self.device)  # [b, L]
            feats = self.model.encode_text(tokens)  # [b, D]
            out[start : start + batch_size] = F.normalize(feats.float(), dim=-1)
        return out  # [N, D]


# ---------------------------------------------------------------------------- loading


def _open_clip() -> ModuleType:
    import open_clip  # heavy (~4 s cold): imported on first use only

    return open_clip


@dataclass(frozen=True)
class _Source:
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


def _resolve_local_dir(model: str, pretrained: str | None) -> _Source:
    if pretrained is not None:
        raise BackboneLoadError(
            f"{model!r} brings its own weights; pretrained must be None, got {pretrained!r}."
        )
    folder = Path(model[len(_LOCAL_DIR) :]).expanduser().resolve()
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
    return _Source(
        create_name=f"{_LOCAL_DIR}{folder}",
        pretrained=None,
        identity=f"{_LOCAL_DIR}{folder}|sha256:{h.hexdigest()}",
        random_init=False,
        weights=f"{_LOCAL_DIR}{folder}",
    )


def _resolve_hf_hub(model: str, pretrained: str | None, cache_dir: str | None) -> _Source:
    if pretrained is not None:
        raise BackboneLoadError(
            f"{model!r} brings its own weights; pretrained must be None, got {pretrained!r}."
        )
    repo = model[len(_HF_HUB) :]
    try:  # fetched now to name the exact revision; create_model then reads the cached file
        path = Path(_open_clip().pretrained.download_pretrained_from_hf(repo, cache_dir=cache_dir))
    except Exception as e:
        raise BackboneLoadError(
            f"Could not download the weights of {model!r} from the Hugging Face Hub: {e}. "
            "On an offline machine, download the repository elsewhere, copy it here and load it "
            "with 'local-dir:/path/to/repo' (or point cache_dir / HF_HOME at a filled cache)."
        ) from e
    snapshot = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", str(path))
    version = f"rev:{snapshot.group(1)}" if snapshot else f"sha256:{_file_sha256(path)}"
    return _Source(
        create_name=model,
        pretrained=None,
        identity=f"{model}|{version}",
        random_init=False,
        weights=f"{model}@{version}",
    )


_REGISTERED_CONFIGS: dict[str, Path] = {}  # open_clip name -> config file we registered


def _resolve_config_file(model: str, pretrained: str | None) -> _Source:
    oc = _open_clip()
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
    w_id = f"sha256:{_file_sha256(weights)}" if weights else f"random-init-seed{_RANDOM_INIT_SEED}"
    return _Source(
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


def _resolve_builtin(model: str, pretrained: str | None) -> _Source:
    oc = _open_clip()
    name = model.replace("/", "-")  # open_clip accepts "ViT-B/16" for "ViT-B-16"
    models = oc.list_models()
    if name not in models:
        raise BackboneLoadError(
            f"Unknown model {model!r}. Close matches: {_suggest(name, models)}. "
            f"All {len(models)} names: open_clip.list_models(); or pass a model config .json, "
            "'local-dir:/path' or 'hf-hub:org/repo'."
        )
    if pretrained is None:
        return _Source(
            name,
            None,
            f"{name}|random-init-seed{_RANDOM_INIT_SEED}",
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
            return _Source(
                name,
                pretrained,
                f"{variant}|{tag}",
                random_init=False,
                weights=tag,
                force_quick_gelu=force_quick_gelu,
                downloads=True,
            )
        return _Source(
            name, pretrained, f"{name}|{tag}", random_init=False, weights=tag, downloads=True
        )
    tags = oc.list_pretrained_tags_by_model(name)
    weights = _weights_file(name, pretrained, tags)
    return _Source(
        name,
        str(weights),
        f"{name}|sha256:{_file_sha256(weights)}",
        random_init=False,
        weights=str(weights),
    )


@contextmanager
def _seeded_init(seed: int) -> Iterator[None]:
    """Deterministic random init without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _read_preprocess(model: torch.nn.Module) -> PreprocessConfig:
    visual = getattr(model, "visual", model)
    cfg = dict(getattr(visual, "preprocess_cfg", None) or {})
    size = cfg.get("size", getattr(visual, "image_size", None))
    mean = cfg.get("mean", getattr(visual, "image_mean", None))
    std = cfg.get("std", getattr(visual, "image_std", None))
    interpolation = cfg.get("interpolation", "bicubic")
    if isinstance(size, Sequence):
        if len(size) != 2 or size[0] != size[1]:
            raise BackboneLoadError(f"Non-square model input size {tuple(size)} is not supported.")
        size = size[0]
    if size is None or mean is None or std is None:
        raise BackboneLoadError(
            f"The model does not state its preprocessing (size={size}, mean={mean}, std={std})."
        )
    if interpolation not in ("bicubic", "bilinear"):
        logger.warning("Model interpolation %r is not supported; using bicubic", interpolation)
        interpolation = "bicubic"
    resize_mode = cfg.get("resize_mode", "shortest")
    if resize_mode != "shortest":  # views follow DESIGN.md: shorter side to R, centre crop
        logger.warning(
            "The model was trained with resize_mode=%r; the engine's view 0 resizes the "
            "shorter side and centre-crops (resize_mode='shortest')",
            resize_mode,
        )
    mean_t = tuple(float(m) for m in mean)
    std_t = tuple(float(s) for s in std)
    if len(mean_t) != 3 or len(std_t) != 3:
        raise BackboneLoadError(f"Expected 3-channel mean/std, got mean={mean} std={std}.")
    return PreprocessConfig(int(size), mean_t, std_t, interpolation)  # type: ignore[arg-type]


def load_backbone(
    model: str,
    pretrained: str | None = None,
    *,
    device: str = "auto",
    precision: str | None = None,
    cache_dir: str | None = None,
) -> ClipBackbone:
    """Load a CLIP model with its weights, in eval mode, on ``device``.

    Args:
        model: an open_clip model name (``ViT-B-16``, ``ViT-B-16-quickgelu``), a path to
            a model config ``.json`` (open_clip's model_configs format), ``local-dir:PATH``
            or ``hf-hub:ORG/REPO``. See the module docstring for the combinations.
        pretrained: a pretrained tag (``openai``) or a checkpoint file for a model name or
            config; None with ``local-dir:``/``hf-hub:``. None with a name or config builds
            RANDOM weights (seeded, so identical on every load) and warns.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        precision: ``fp32``, ``fp16``, ``bf16``; None means fp16 on CUDA, fp32 elsewhere.
        cache_dir: where open_clip keeps downloaded weights (its default if None).

    Raises:
        BackboneLoadError (a ValueError): unknown model, missing file, failed download, ...
        ValueError: unknown device or precision.
    """
    torch_device = resolve_device(device)
    prec = _resolve_precision(precision, torch_device)
    if not isinstance(model, str) or not model.strip():
        raise BackboneLoadError(f"model must be a non-empty string, got {model!r}")
    model = model.strip()

    if model.startswith(_LOCAL_DIR):
        source = _resolve_local_dir(model, pretrained)
    elif model.startswith(_HF_HUB):
        source = _resolve_hf_hub(model, pretrained, cache_dir)
    elif model.endswith(".json"):
        source = _resolve_config_file(model, pretrained)
    else:
        source = _resolve_builtin(model, pretrained)

    if source.random_init:
        msg = (
            f"No pretrained weights for model {model!r}: it is RANDOMLY INITIALISED and its "
            "predictions are meaningless. Pass pretrained=<tag or checkpoint file>."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)
        logger.warning(msg)

    oc = _open_clip()
    described = f"model {model!r}" + (f" with pretrained={pretrained!r}" if pretrained else "")
    try:
        with _seeded_init(_RANDOM_INIT_SEED) if source.random_init else nullcontext():
            clip = oc.create_model(
                source.create_name,
                pretrained=source.pretrained,
                precision=prec,
                device=torch_device,
                force_quick_gelu=source.force_quick_gelu,
                pretrained_image=False,  # never fetch tower weights behind the user's back
                pretrained_text=False,
                cache_dir=cache_dir,
            )
        tokenizer = oc.get_tokenizer(source.create_name, cache_dir=cache_dir)
    except Exception as e:
        if source.downloads:
            hint = (
                "Downloading tagged weights needs internet access; on an offline machine "
                "download the checkpoint elsewhere and pass pretrained=/path/to/file "
                "(or point cache_dir at a copy of open_clip's download cache)."
            )
        elif source.random_init:
            hint = "Check the model config."
        else:
            hint = "Check that the weights file is a CLIP checkpoint for this architecture."
        raise BackboneLoadError(f"Could not load {described}: {e}. {hint}") from e

    clip.eval()  # open_clip returns train mode
    clip.requires_grad_(False)
    backbone = ClipBackbone(
        clip,
        tokenizer,
        identity=source.identity,
        weights=source.weights,
        device=torch_device,
        dtype=_PRECISIONS[prec],
        preprocess=_read_preprocess(clip),
    )
    logger.info("Loaded %r", backbone)
    return backbone


# --------------------------------------------------------------------------- metadata


def open_clip_imagenet_classnames() -> tuple[str, ...]:
    """ImageNet-1k's 1000 class names in label order, as open_clip ships them."""
    return tuple(_open_clip_metadata().IMAGENET_CLASSNAMES)


def _open_clip_metadata() -> ModuleType:
    """``open_clip.zero_shot_metadata`` without paying for ``import open_clip`` when possible.

    The metadata module is plain data with no imports, but importing it the usual way runs
    open_clip's package ``__init__`` (torch, timm, ...: seconds). When open_clip is not
    loaded yet, load the file on its own; fall back to the normal import otherwise.
    """
    module = sys.modules.get("open_clip.zero_shot_metadata")
    if module is not None:
        return module
    if "open_clip" not in sys.modules:
        try:
            spec = importlib.util.find_spec("open_clip")  # locates, does not import
            if spec is not None and spec.submodule_search_locations:
                path = Path(next(iter(spec.submodule_search_locations))) / "zero_shot_metadata.py"
                file_spec = importlib.util.spec_from_file_location(
                    "_awt_engine_open_clip_zero_shot_metadata", path
                )
                if file_spec is not None and file_spec.loader is not None and path.is_file():
                    module = importlib.util.module_from_spec(file_spec)
                    file_spec.loader.exec_module(module)
                    if len(getattr(module, "IMAGENET_CLASSNAMES", ())) == 1000:
                        return module
        except Exception:  # any surprise: use the ordinary import below
            pass
    import open_clip.zero_shot_metadata as module  # lazy on purpose: see module docstring

    return module
