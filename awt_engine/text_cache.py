"""On-disk cache of class-prompt embeddings [C, P, D], for every model.

One file per (model identity, label set), named by a SHA-256 of both: a safetensors
file holding the float32 tensor, with its key, identity, shape and a checksum of its
bytes in the header (:mod:`awt_engine._tensorfile`). An entry is used only when all of
it checks out, including that its rows are unit vectors of the expected width; anything
else (a flipped bit, an integer dtype, huge values, a wrong width) is recomputed and
rewritten, with a warning naming the file. A cache that cannot be written (read-only
folder, full disk) is reported once per folder and the run carries on without it.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from awt_engine import __version__
from awt_engine._io import sha256_hex, warn_unwritable
from awt_engine._tensorfile import DamagedEntry, check_unit_rows, load_tensors, save_tensors
from awt_engine.labels import LabelSet

FORMAT = 2  # 2: safetensors with checksums (1 was a torch.save pickle)
log = logging.getLogger(__name__)


def text_cache_key(identity: str, labels: LabelSet | Sequence[Sequence[str]]) -> str:
    """SHA-256 over the model identity and the label set (or a [C][P] prompt list).

    The identity names the weights and a hash of any learned tensors, so a trained
    model never reads the embeddings of its untrained self.
    """
    body = labels.key() if isinstance(labels, LabelSet) else json.dumps(labels)
    return sha256_hex("awt-text-embeddings", str(FORMAT), identity, body)


def text_cache_path(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / "text_embeddings" / f"{key}.safetensors"


def _read(path: Path, key: str, C: int, P: int, dim: int | None) -> Tensor | None:
    try:
        tensors, meta = load_tensors(path, {"embeds": (torch.float32, (C, P, dim))})
        if meta.get("key") != key:
            raise DamagedEntry("its header names another key")
        check_unit_rows(tensors["embeds"], "embeds")
    except (DamagedEntry, OSError) as exc:
        warnings.warn(
            f"text-embedding cache {path} is not usable ({exc}); recomputing", stacklevel=4
        )
        return None
    return tensors["embeds"]


def cached_class_embeddings(
    model, labels: LabelSet, cache_root: Path | None, *, progress: bool = False
) -> Tensor:
    """``model.class_embeddings(labels)`` [C, P, D] (float32, CPU), from the cache when valid."""

    def compute() -> Tensor:
        if hasattr(model, "text_progress"):  # a bar over long text encodes, where offered
            model.text_progress = progress
        return model.class_embeddings(labels)

    return load_or_compute(
        compute,
        model.identity,
        labels,
        (labels.n_classes, labels.n_prompts),
        cache_root,
        dim=getattr(model, "dim", None),
    )


def load_or_encode(
    encode: Callable[[list[str]], Tensor],
    identity: str,
    prompts: Sequence[Sequence[str]],
    cache_root: Path | None,
    *,
    dim: int | None = None,
) -> Tensor:
    """[C, P, D] for a [C][P] prompt list, ``encode`` mapping a flat list to [C*P, D]."""
    C, P = len(prompts), len(prompts[0])
    assert all(len(p) == P for p in prompts), "every class needs the same prompt count"
    flat = [t for row in prompts for t in row]
    return load_or_compute(
        lambda: encode(flat).reshape(C, P, -1), identity, prompts, (C, P), cache_root, dim=dim
    )


def load_or_compute(
    compute: Callable[[], Tensor],
    identity: str,
    labels: LabelSet | Sequence[Sequence[str]],
    shape: tuple[int, int],
    cache_root: Path | None,
    *,
    dim: int | None = None,
) -> Tensor:
    """Class-prompt embeddings [C, P, D] (float32, CPU), from the cache when valid.

    ``compute()`` gives them; it is called only when the cache has no valid entry.
    ``dim`` is the expected width D (checked on cached entries when given).
    ``cache_root=None`` disables the cache.
    """
    C, P = shape
    key = text_cache_key(identity, labels)
    path = text_cache_path(cache_root, key) if cache_root is not None else None
    if path is not None and path.exists():
        hit = _read(path, key, C, P, dim)
        if hit is not None:
            log.info("text embeddings from cache %s", path)
            return hit
    embeds = compute().detach().float().cpu().contiguous()
    if tuple(embeds.shape[:2]) != (C, P):
        raise ValueError(
            f"the model gave class embeddings of shape {tuple(embeds.shape)}; expected "
            f"[{C}, {P}, D] (classes, prompts, width)"
        )
    if path is not None:
        meta = {
            "format": str(FORMAT),
            "key": key,
            "identity": identity,
            "engine_version": __version__,
        }
        try:
            save_tensors(path, {"embeds": embeds}, meta)
        except OSError as exc:
            warn_unwritable(path.parent, exc, "text-embedding")
    return embeds
