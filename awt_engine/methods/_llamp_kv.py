"""LLaMP's offline knowledge cache: the last decoder layer's keys and values of prefixes.

Each prefix runs through the whole frozen LLM once; only the **last decoder layer's**
keys and values (post-rotary, ``[N, kv_heads, T, head_dim]``, left-padded, with the
prefix lengths) are kept, on disk under ``<cache>/llamp_kv/<sha>.safetensors``, keyed by
the LLM fingerprint, its dtype and the prefix texts (checksummed; a damaged file is
rebuilt with a warning naming it). Prefix tokens sit at positions 0..len-1
(``cumsum(mask) - 1``). The values are kept at the LLM's precision (float16 for a float16
LLM, else float32): C x P x T x 2 x kv_width of them, e.g. about 8 GB for 100 classes x
51 prompts x 100 tokens at Llama-2-7B in float16.

Axes: N prefixes, T the longest prefix's token count.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from awt_engine._io import sha256_hex, warn_unwritable
from awt_engine._tensorfile import DamagedEntry, load_tensors, save_tensors

KV_FORMAT = "1"  # what a K/V cache file holds; part of its key
LLM_BATCH = 16  # prefixes per full-LLM pass when building the cache (the code's batch)


@dataclass
class PrefixCache:
    """The last decoder layer's keys and values of N left-padded prefixes."""

    keys: Tensor  # [N, kv_heads, T, head_dim] post-rotary, zero at padding (LLM precision)
    values: Tensor  # [N, kv_heads, T, head_dim]
    mask: Tensor  # [N, T] int64, 1 on prefix tokens (left padding)
    lengths: Tensor  # [N] int64 prefix lengths
    texts: tuple[str, ...]
    path: Path | None = None  # the file it lives in (None: not written)


@contextmanager
def autocast_off(device: torch.device) -> Iterator[None]:
    """No autocast around the frozen LLM's cached outputs (self-descriptions, K/V): their
    key names the LLM's own dtype, so they are computed in it, the same whether the first
    training step (under the training autocast) or classify builds them."""
    with torch.autocast("cpu", enabled=False):
        if device.type == "cpu":
            yield
            return
        with torch.autocast(device.type, enabled=False):
            yield


def tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """The LLM token ids of each text, no special tokens added (ValueError on an empty one)."""
    ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    if any(not row for row in ids):
        raise ValueError("an LLM prefix has no tokens")
    return ids


def pad_left(tokenizer, rows: Sequence[list[int]], T: int) -> tuple[Tensor, Tensor]:
    """Token ids [n, T] left-padded with the pad (else EOS) token, and their mask [n, T]."""
    tok = tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return ids, mask


def cache_key(llm, kind: str, texts: Sequence[str], *extra: str) -> str:
    """The key of a cache entry of ``kind`` (``kv``, ``describe``) for ``texts``: the
    format, the LLM's fingerprint and dtype, the texts and ``extra``."""
    return sha256_hex(
        f"awt-engine/llamp-{kind}",
        KV_FORMAT,
        llm.fingerprint,
        str(llm.model.dtype),
        json.dumps(list(texts), ensure_ascii=False),
        *extra,
    )


def kv_dtype(llm) -> torch.dtype:
    """The LLM's own precision: float16 for a float16 LLM, else float32 (the cache files
    hold no bfloat16, and float16 cannot hold every bfloat16 value)."""
    return torch.float16 if llm.model.dtype == torch.float16 else torch.float32


@dataclass(frozen=True)
class KVLayout:
    """What one cache holds per prefix token: ``heads`` K/V heads of ``dim``, in ``dtype``."""

    heads: int
    dim: int
    dtype: torch.dtype


def read_kv(path: Path, key: str, texts, ids, layout: KVLayout, device) -> PrefixCache | None:
    """The cache file at ``path`` when it holds exactly this entry (None: absent; a damaged
    or foreign file warns, naming it, and gives None so the caller rebuilds it)."""
    if not path.exists():
        return None
    N, T = len(texts), max(map(len, ids))
    shape = (N, layout.heads, T, layout.dim)
    expect = {
        "keys": (layout.dtype, shape),
        "values": (layout.dtype, shape),
        "mask": (torch.int64, (N, T)),
        "lengths": (torch.int64, (N,)),
    }
    try:
        t, meta = load_tensors(path, expect)
        if meta.get("key") != key or meta.get("format") != KV_FORMAT:
            raise DamagedEntry("its header names another cache entry")
        lengths = torch.tensor([len(r) for r in ids])
        left = (torch.arange(T)[None] >= (T - lengths)[:, None]).long()
        if not torch.equal(t["lengths"], lengths) or not torch.equal(t["mask"], left):
            raise DamagedEntry("its prefix lengths or padding do not match the prefixes")
    except DamagedEntry as exc:
        warnings.warn(f"LLaMP K/V cache {path} is damaged ({exc}); rebuilding it", stacklevel=3)
        return None
    parts = (t["keys"], t["values"], t["mask"], t["lengths"])
    return PrefixCache(*(p.to(device) for p in parts), tuple(texts), path)


def build_kv(llm, texts, ids, layout: KVLayout, device) -> PrefixCache:
    """Run the whole LLM once over the left-padded prefixes (positions 0..len-1) and
    keep its last layer's keys and values, zeroed at the padding."""
    model = llm.model
    N, T = len(texts), max(map(len, ids))
    keys = torch.zeros(N, layout.heads, T, layout.dim, dtype=layout.dtype)
    values = torch.zeros(N, layout.heads, T, layout.dim, dtype=layout.dtype)
    _, mask = pad_left(llm.tokenizer, ids, T)
    for s in range(0, N, LLM_BATCH):
        inp, m = pad_left(llm.tokenizer, ids[s : s + LLM_BATCH], T)
        inp, m = inp.to(model.device), m.to(model.device)
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        with autocast_off(model.device):
            out = model.model(input_ids=inp, attention_mask=m, position_ids=pos, use_cache=True)
        last = out.past_key_values.layers[-1]
        keep = m[:, None, :, None].to(last.keys.dtype)
        keys[s : s + len(inp)] = (last.keys * keep).to(keys.dtype).cpu()
        values[s : s + len(inp)] = (last.values * keep).to(keys.dtype).cpu()
    dev = device
    return PrefixCache(
        keys.to(dev), values.to(dev), mask.to(dev), mask.sum(-1).to(dev), tuple(texts)
    )


def write_kv(cache: PrefixCache, path: Path, key: str, llm) -> None:
    """Write ``cache`` to ``path`` (atomic, checksummed) and record the path on it; an
    unwritable folder warns once and leaves the cache in memory only."""
    meta = {"format": KV_FORMAT, "key": key, "llm": llm.fingerprint}
    tensors = {
        "keys": cache.keys,
        "values": cache.values,
        "mask": cache.mask,
        "lengths": cache.lengths,
    }
    try:
        save_tensors(path, tensors, meta)
        cache.path = path
    except OSError as exc:
        warn_unwritable(path.parent, exc, "LLaMP K/V")
