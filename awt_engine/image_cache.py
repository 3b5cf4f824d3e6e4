"""Per-image view-embedding cache, so an interrupted evaluation resumes where it stopped.

Layout: ``<root>/image_embeddings/<config key>/shard-*.safetensors``. The config key
hashes (model identity, every view setting, stored dtype); within it an image is found by the
SHA-256 of its file's bytes. A shard holds the ``[n, V, D]`` embeddings of ``n`` images
(float16 by default: half the bytes, and cosine similarities move by ~1e-3 at most)
and, in its header, their content keys and a checksum (:mod:`awt_engine._tensorfile`).

Writes are batched: new entries collect in memory and go out as one shard every
``flush_rows`` images or ``flush_s`` seconds and at :meth:`close` (so one fsync per
shard, not per image; a kill -9 loses at most the unwritten batch, which the next run
recomputes). Concurrent runs write separate shards and never contend. A shard that
fails any check (checksum, dtype, shape, values) is skipped with a warning naming the
file and its images are recomputed; a cache that cannot be written is reported once and
the run carries on without it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
import warnings
from pathlib import Path

import torch
from torch import Tensor

from awt_engine._io import file_sha256, sha256_hex, warn_unwritable
from awt_engine._tensorfile import DamagedEntry, check_unit_rows, load_tensors, save_tensors

FORMAT = 3  # 3: keyed by every view setting (2: by V and seed only; 1: torch.save files)
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class ImageEmbeddingCache:
    """View embeddings ``[V, D]`` by image content, for one (model, views, seed) setting."""

    def __init__(
        self,
        root: str | os.PathLike,
        identity: str,
        view_config,
        dim: int,
        *,
        dtype: str = "float16",
        flush_rows: int = 512,  # ~26 MB per shard at V=51, D=512 in float16
        flush_s: float = 60.0,  # a slow run still saves its work every minute
    ):
        if dtype not in _DTYPES:
            raise ValueError(
                f"image cache dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}"
            )
        from awt_engine.inputs.views import VIDEO_SEED_VERSION, VIEW_SEED_VERSION

        views = json.dumps(dataclasses.asdict(view_config), sort_keys=True)
        seeds = f"{VIEW_SEED_VERSION}|{VIDEO_SEED_VERSION}"  # images' and videos' views
        key = sha256_hex("awt-image-embeddings", str(FORMAT), identity, views, seeds, dtype)
        self.key = key[:24]
        self.folder = Path(root) / "image_embeddings" / self.key
        self.n_views, self.dim = view_config.n_views, dim
        self.dtype = _DTYPES[dtype]
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self._index: dict[str, tuple[Path, int]] = {}  # content key -> (shard, row)
        self._loaded: tuple[Path, Tensor] | None = None  # the last shard read
        self._bad: set[Path] = set()
        self._pending_keys: list[str] = []
        self._pending: list[Tensor] = []
        self._last_flush = time.monotonic()
        self._writable = True
        self._scan()

    # -- reading ----------------------------------------------------------------------

    def _scan(self) -> None:
        """Index every shard by its header (the tensors are read on first use)."""
        from safetensors import safe_open

        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as sf:
                    keys = json.loads((sf.metadata() or {}).get("keys", "null"))
                if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                    raise ValueError("no content keys in its header")
            except Exception as exc:  # unreadable header: its images are recomputed
                self._skip(shard, str(exc))
                continue
            for row, k in enumerate(keys):
                self._index.setdefault(k, (shard, row))

    def _skip(self, shard: Path, reason: str) -> None:
        if shard not in self._bad:
            self._bad.add(shard)
            warnings.warn(
                f"image-embedding cache file {shard} is not usable ({reason}); "
                "its images are recomputed",
                stacklevel=3,
            )
        self._index = {k: v for k, v in self._index.items() if v[0] != shard}

    def _shard(self, shard: Path) -> Tensor | None:
        if self._loaded is not None and self._loaded[0] == shard:
            return self._loaded[1]
        try:
            tensors, meta = load_tensors(
                shard, {"embeds": (self.dtype, (None, self.n_views, self.dim))}
            )
            embeds = tensors["embeds"]
            if len(json.loads(meta.get("keys", "[]"))) != embeds.shape[0]:
                raise DamagedEntry("its header and tensor disagree on the image count")
            check_unit_rows(embeds, "embeds")
        except (DamagedEntry, OSError, ValueError) as exc:
            self._skip(shard, str(exc))
            return None
        self._loaded = (shard, embeds)
        return embeds

    @staticmethod
    def content_key(path: str | os.PathLike) -> str:
        return file_sha256(path)

    def shard_of(self, key: str) -> Path | None:
        """The shard holding ``key`` (group lookups by it to read each shard once)."""
        hit = self._index.get(key)
        return hit[0] if hit else None

    def get(self, key: str) -> Tensor | None:
        """[V, D] float32, or None when the image is not (validly) cached."""
        hit = self._index.get(key)
        if hit is None:
            return None
        embeds = self._shard(hit[0])
        return None if embeds is None else embeds[hit[1]].float()

    # -- writing ----------------------------------------------------------------------

    def stored(self, embeds: Tensor) -> Tensor:
        """``embeds`` as the cache stores and returns them ([..., V, D] float32).

        Scoring fresh embeddings through this too makes a resumed run equal an
        uninterrupted one exactly.
        """
        return embeds.detach().to("cpu", self.dtype).float()

    def put(self, key: str, embeds: Tensor) -> None:
        if not self._writable or key in self._index:
            return
        self._pending_keys.append(key)
        self._pending.append(embeds.detach().to("cpu", self.dtype))
        if (
            len(self._pending) >= self.flush_rows
            or time.monotonic() - self._last_flush >= self.flush_s
        ):
            self.flush()

    def flush(self) -> None:
        """Write the pending entries as one shard."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        keys, rows = self._pending_keys, self._pending
        self._pending_keys, self._pending = [], []
        name = f"shard-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.safetensors"
        shard = self.folder / name
        meta = {"format": str(FORMAT), "config": self.key, "keys": json.dumps(keys)}
        try:
            save_tensors(shard, {"embeds": torch.stack(rows)}, meta)
        except OSError as exc:
            self._writable = False
            warn_unwritable(self.folder, exc, "image-embedding")
            return
        for row, k in enumerate(keys):
            self._index.setdefault(k, (shard, row))

    def close(self) -> None:
        self.flush()

    def __enter__(self) -> ImageEmbeddingCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
