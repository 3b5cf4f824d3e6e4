"""On-disk cache of class-prompt embeddings [C, P, D].

One file per (backbone identity, prompt list), named by a SHA-256 of both, holding the
tensor and a small JSON-able header. A file whose header does not match, or that
cannot be read, is recomputed and rewritten, never trusted (DESIGN.md section 3).
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
from awt_engine._io import atomic_write, sha256_hex

FORMAT = 1
log = logging.getLogger(__name__)


def text_cache_key(identity: str, prompts: Sequence[Sequence[str]]) -> str:
    """SHA-256 over the backbone identity and every prompt (with its class/prompt position)."""
    return sha256_hex("awt-text-embeddings", str(FORMAT), identity, json.dumps(prompts))


def text_cache_path(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / "text_embeddings" / f"{key}.pt"


def _read(path: Path, key: str, shape: tuple[int, int]) -> Tensor | None:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        header, embeds = blob["header"], blob["embeds"]
        ok = (
            header.get("format") == FORMAT
            and header.get("key") == key
            and isinstance(embeds, Tensor)
            and embeds.dim() == 3
            and tuple(embeds.shape[:2]) == shape
            and list(embeds.shape) == header.get("shape")
            and bool(torch.isfinite(embeds).all())
        )
    except Exception as exc:  # damaged, truncated, foreign: recompute
        warnings.warn(
            f"text-embedding cache {path} is unreadable ({exc}); recomputing", stacklevel=3
        )
        return None
    if not ok:
        warnings.warn(
            f"text-embedding cache {path} does not match its key; recomputing", stacklevel=3
        )
        return None
    return embeds


def load_or_encode(
    encode: Callable[[list[str]], Tensor],
    identity: str,
    prompts: Sequence[Sequence[str]],
    cache_root: Path | None,
) -> Tensor:
    """Class-prompt embeddings [C, P, D] (float32, CPU), from the cache when valid.

    ``encode`` maps a flat list of strings to [N, D]; it is called once, on all the
    prompts, only when the cache has no valid entry. ``cache_root=None`` disables it.
    """
    C, P = len(prompts), len(prompts[0])
    assert all(len(p) == P for p in prompts), "every class needs the same prompt count"
    key = text_cache_key(identity, prompts)
    path = text_cache_path(cache_root, key) if cache_root is not None else None
    if path is not None and path.exists():
        hit = _read(path, key, (C, P))
        if hit is not None:
            log.info("text embeddings from cache %s", path)
            return hit
    flat = [t for row in prompts for t in row]
    embeds = encode(flat).detach().float().cpu().reshape(C, P, -1)  # [C,P,D]
    if path is not None:
        header = {
            "format": FORMAT,
            "key": key,
            "identity": identity,
            "shape": list(embeds.shape),
            "engine_version": __version__,
        }
        blob = {"header": header, "embeds": embeds.contiguous()}
        atomic_write(path, lambda f: torch.save(blob, f))
    return embeds
