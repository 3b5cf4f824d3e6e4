"""The CLIP backbone wrapper: a loaded open_clip model, and pixels and texts to embeddings.

:func:`load_backbone` resolves the weights (:mod:`awt_engine.backbone.sources`), builds
the model in eval mode with every parameter frozen, and wraps it in a
:class:`ClipBackbone`. Inference encodes under ``torch.inference_mode`` (the fast path);
``grad=True`` runs the same forward with autograd, for trainable methods whose own
parameters sit inside or in front of the frozen towers.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from awt_engine._progress import progress_bar
from awt_engine.backbone.devices import (
    PRECISIONS,
    QUANTISED,
    resolve_device,
    resolve_precision,
    seeded_rng,
)
from awt_engine.backbone.sources import (
    RANDOM_INIT_SEED,
    BackboneLoadError,
    fingerprint_of,
    open_clip_module,
    resolve_source,
)
from awt_engine.models.base import PreprocessConfig

logger = logging.getLogger(__name__)


def _batched(encode, n: int, bs: int, dim: int, device, grad: bool) -> torch.Tensor:
    """[n, dim] from ``encode(start)`` blocks of ``bs`` rows: written into one buffer
    (no second copy of a large result), or concatenated when a graph is kept."""
    if grad:
        parts = [encode(s) for s in range(0, n, bs)]
        return torch.cat(parts) if parts else torch.empty(0, dim, device=device)
    out = torch.empty(n, dim, dtype=torch.float32, device=device)
    for start in range(0, n, bs):
        out[start : start + bs] = encode(start)
    return out


def _grad_mode(grad: bool):
    """Autograd on (``grad``), else no graph: inference mode where nothing outside wants
    gradients, ``no_grad`` inside a training step (inference tensors cannot mix with it)."""
    if grad:
        return nullcontext()
    return torch.no_grad() if torch.is_grad_enabled() else torch.inference_mode()


@dataclass(frozen=True)
class TowerBlocks:
    """The residual blocks of one open_clip tower, as the methods reach into them.

    ``blocks[i]`` is block i (a forward pre-hook on it sees the block's input, in the
    tower's own layout: [B, L, W] when ``batch_first``, else [L, B, W]);
    ``branches[i]`` the modules whose outputs are block i's attention and MLP branch
    outputs before the residual add (open_clip's LayerScale or Identity), for forward
    hooks; ``width`` the tower's width W.
    """

    blocks: tuple[torch.nn.Module, ...]
    branches: tuple[tuple[torch.nn.Module, torch.nn.Module], ...]
    width: int
    batch_first: bool


def tower_blocks(tower: torch.nn.Module, what: str = "tower") -> TowerBlocks:
    """The :class:`TowerBlocks` of an open_clip text transformer or ViT (ValueError naming
    ``what`` when the tower is not open_clip's own transformer)."""
    transformer = getattr(tower, "transformer", None)
    blocks = getattr(transformer, "resblocks", None)
    if blocks is None or not all(hasattr(b, "ls_1") and hasattr(b, "ls_2") for b in blocks):
        raise ValueError(
            f"the {what} ({type(tower).__name__}) is not open_clip's own transformer (residual "
            "blocks with attention and MLP branches): this method needs one"
        )
    blocks = tuple(blocks)
    width = int(blocks[0].ln_1.normalized_shape[0])  # the real width, from the model
    branches = tuple((b.ls_1, b.ls_2) for b in blocks)
    return TowerBlocks(blocks, branches, width, bool(getattr(transformer, "batch_first", True)))


class ClipBackbone:
    """A loaded CLIP model in eval mode, plus what the rest of the engine needs to know.

    ``encode_images`` and ``encode_text`` return L2-normalised float32 embeddings on
    ``device`` whatever the compute ``dtype`` is. ``precision`` names what the towers
    compute in, for identities and records: the dtype's name (``float32``, ``float16``,
    ``bfloat16``), or ``int8`` for quantised towers (whose inputs are float32, ``dtype``).
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
        precision: str | None = None,
    ) -> None:
        self.model = model
        self._tokenizer = tokenizer
        self.identity = identity
        self.weights = weights  # what was loaded (tag, file, folder, hub revision, "none")
        self.fingerprint = fingerprint_of(identity)  # the weights, wherever they are stored
        self.device = device
        self.dtype = dtype
        self.precision = precision or str(dtype).removeprefix("torch.")
        self.int8 = None  # Int8Towers at precision int8 (awt_engine.backbone.int8)
        self.preprocess = preprocess
        self.logit_scale = float(model.logit_scale.exp().item())
        self.embed_dim = self._find_embed_dim()

    def __repr__(self) -> str:
        return (
            f"ClipBackbone(identity={self.identity!r}, device={self.device}, "
            f"precision={self.precision}, "
            f"R={self.preprocess.size}, D={self.embed_dim})"
        )

    # -- the towers' parts, for methods that reach inside the frozen model ---------------
    # The one place that knows open_clip's layout (as its ``lock_image_tower`` does): every
    # part returned is the model's own module or parameter, never a copy.

    @property
    def text_tower(self) -> torch.nn.Module:
        """The module holding the text transformer: the CLIP model itself (OpenAI layout)
        or its ``text`` tower (CustomTextCLIP)."""
        model = self.model
        return model if hasattr(model, "token_embedding") else getattr(model, "text", model)

    @property
    def vision_tower(self) -> torch.nn.Module:
        """The image tower (open_clip's ``visual``)."""
        return self.model.visual

    @property
    def text_token_embedding(self) -> torch.nn.Embedding | None:
        """The text tower's token embedding table [vocab, W] (None: the tower has none)."""
        emb = getattr(self.text_tower, "token_embedding", None)
        return emb if isinstance(emb, torch.nn.Embedding) else None

    @property
    def text_positional_embedding(self) -> torch.Tensor:
        """The text tower's positional embedding [L, W] (a frozen parameter)."""
        return self.text_tower.positional_embedding

    @property
    def text_blocks(self) -> TowerBlocks:
        """The text transformer's residual blocks (:class:`TowerBlocks`)."""
        return tower_blocks(self.text_tower, "text tower")

    @property
    def vision_blocks(self) -> TowerBlocks:
        """The vision transformer's residual blocks (:class:`TowerBlocks`)."""
        return tower_blocks(self.vision_tower, "vision tower")

    @property
    def vision_pre_norm(self) -> torch.nn.Module | None:
        """The ViT's norm before its first block (``ln_pre``): a pre-hook on it sees the
        token sequence [B, 1 + HW, Wv] ([CLS] first). None: not a ViT."""
        return getattr(self.vision_tower, "ln_pre", None)

    @property
    def vision_positional_embedding(self) -> torch.Tensor | None:
        """The ViT's positional embedding [1 + HW, Wv] (None: not a ViT)."""
        return getattr(self.vision_tower, "positional_embedding", None)

    @property
    def vision_pools_cls(self) -> bool:
        """Whether the image embedding is read from the [CLS] token (no attention pool)."""
        tower = self.vision_tower
        return (
            getattr(tower, "pool_type", "tok") == "tok"
            and getattr(tower, "attn_pool", None) is None
        )

    def text_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The text tower on token ids [N, L] (on the model's device): [N, D] features,
        unnormalised, in the compute dtype, with a graph when the caller's context keeps
        one (hooks on :attr:`text_token_embedding` or :attr:`text_blocks` act inside)."""
        return self.model.encode_text(ids)

    def vision_intermediates(self, pixels: torch.Tensor, n_levels: int) -> list[torch.Tensor]:
        """The [CLS] token after each of the last ``n_levels`` ViT blocks, normalised by the
        tower's final norm, shallowest first: ``n_levels`` tensors [N, Wv] (no graph)."""
        tower = self.vision_tower
        if not hasattr(tower, "forward_intermediates"):
            raise ValueError(f"the vision tower ({type(tower).__name__}) is not an open_clip ViT")
        with torch.no_grad():
            out = tower.forward_intermediates(
                pixels,
                indices=n_levels,
                output_extra_tokens=True,
                normalize_intermediates=True,
                intermediates_only=True,
            )
        return [t[:, 0] for t in out["image_intermediates_prefix"]]

    def _find_embed_dim(self) -> int:
        dim = getattr(getattr(self.model, "visual", None), "output_dim", None)
        if isinstance(dim, int) and dim > 0:
            return dim
        with torch.inference_mode():  # towers without the attribute: one tiny forward pass
            tokens = self._tokenizer([""]).to(self.device)
            return int(self.model.encode_text(tokens).shape[-1])

    def encode_images(
        self, pixels: torch.Tensor, *, batch_size: int | None = None, grad: bool = False
    ) -> torch.Tensor:
        """Normalised pixels [N, 3, R, R] (any float dtype/device) -> [N, D] unit float32.

        ``grad=True`` keeps the autograd graph (for parameters a trainable method placed in
        or before the tower); otherwise no graph is built.
        """
        r = self.preprocess.size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, r, r):
            raise ValueError(
                f"encode_images expects pixels of shape [N, 3, {r}, {r}], got {tuple(pixels.shape)}"
            )
        if not pixels.is_floating_point():
            raise ValueError(
                f"encode_images expects normalised float pixels, got dtype {pixels.dtype} "
                "(make them with awt_engine.inputs.make_views)"
            )
        bs = self.image_batch_size if batch_size is None else batch_size
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")

        def encode(start: int) -> torch.Tensor:
            if self.int8 is not None and not grad:  # int8: the quantised graph, in ONNX Runtime
                return self.int8.encode_images(pixels[start : start + bs])
            # non_blocking only into CUDA: from a CPU tensor freed right after, an
            # asynchronous copy to MPS can read memory already reused (a PyTorch issue)
            cuda = self.device.type == "cuda"
            chunk = pixels[start : start + bs].to(self.device, self.dtype, non_blocking=cuda)
            return F.normalize(self.model.encode_image(chunk).float(), dim=-1)  # [b, D]

        with _grad_mode(grad):
            return _batched(encode, pixels.shape[0], bs, self.embed_dim, self.device, grad)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids [N, L] with the model's own tokenizer, on the model's device."""
        return self._tokenizer(list(texts)).to(self.device)

    def encode_text(
        self,
        texts: Sequence[str],
        batch_size: int = 256,
        *,
        progress: bool = False,
        grad: bool = False,
    ) -> torch.Tensor:
        """Texts -> [N, D] unit float32, tokenised with the model's own tokenizer.

        ``progress`` draws a bar over the batches (on a terminal); ``grad`` as for
        :meth:`encode_images`.
        """
        if isinstance(texts, str):
            raise ValueError("encode_text expects a list of strings, got a single string")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = list(texts)
        bar = progress_bar(
            len(texts), progress and len(texts) > batch_size, desc="text", unit="txt"
        )

        def encode(start: int) -> torch.Tensor:
            tokens = self.tokenize(texts[start : start + batch_size])  # [b, L]
            if self.int8 is not None and not grad:  # int8: the quantised graph, in ONNX Runtime
                feats = self.int8.encode_text(tokens)  # [b, D]
            else:
                feats = F.normalize(self.model.encode_text(tokens).float(), dim=-1)  # [b, D]
            bar.update(tokens.shape[0])
            return feats

        with _grad_mode(grad), bar:
            return _batched(encode, len(texts), batch_size, self.embed_dim, self.device, grad)


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextmanager
def _quiet_random_init_log() -> Iterator[None]:
    """open_clip logs its own random-init notice on the root logger; the engine's warning
    already says so, once."""
    drop = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


@contextmanager
def _seeded_init(seed: int) -> Iterator[None]:
    """Deterministic random init without touching the caller's global RNG state (the
    weights are built on the CPU; ``torch.manual_seed`` would also seed every CUDA device)."""
    with seeded_rng(seed):
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
    if resize_mode != "shortest":  # views follow docs/design.md: shorter side to R, centre crop
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
    cache_root: str | Path | None = None,
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
        precision: ``fp32``, ``fp16``, ``bf16``, or ``int8`` on the CPU (the towers exported
            to ONNX, quantised and run by ONNX Runtime, written once under the cache root:
            :mod:`awt_engine.backbone.int8`); None means fp16 on CUDA, fp32 elsewhere.
        cache_dir: where open_clip keeps downloaded weights (its default if None).
        cache_root: the engine's cache root, where int8 keeps its quantised graphs (None:
            ``$AWT_ENGINE_CACHE``, else ``./cache``).

    Raises:
        BackboneLoadError (a ValueError): unknown model, missing file, failed download, ...
        ValueError: unknown device or precision.
    """
    torch_device = resolve_device(device)
    prec = resolve_precision(precision, torch_device)
    source = resolve_source(model, pretrained, cache_dir)
    model = model.strip()

    if source.random_init:
        msg = (
            f"No pretrained weights for model {model!r}: it is RANDOMLY INITIALISED and its "
            "predictions are meaningless. Pass pretrained=<tag or checkpoint file>."
        )
        warnings.warn(msg, UserWarning, stacklevel=2)

    oc = open_clip_module()
    described = f"model {model!r}" + (f" with pretrained={pretrained!r}" if pretrained else "")
    try:
        seeded = _seeded_init(RANDOM_INIT_SEED) if source.random_init else nullcontext()
        with seeded, _quiet_random_init_log():
            clip = oc.create_model(
                source.create_name,
                pretrained=source.pretrained,
                precision="fp32" if prec in QUANTISED else prec,
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
        dtype=QUANTISED.get(prec) or PRECISIONS[prec],
        preprocess=_read_preprocess(clip),
    )
    if prec in QUANTISED:  # the towers exported and quantised once, then run in ONNX Runtime
        from awt_engine.backbone.int8 import int8_towers

        backbone.int8 = int8_towers(backbone, model, cache_root)
        backbone.precision = prec
    logger.info("Loaded %r", backbone)
    return backbone
