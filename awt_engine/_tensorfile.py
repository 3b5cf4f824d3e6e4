"""Cached tensors on disk, verified on load: safetensors files with a checksum per tensor.

A cache entry is trusted only if everything about it checks out: the file parses, every
expected tensor is there with the expected dtype and shape, the SHA-256 of each
tensor's bytes equals the one recorded in the header, and the values are finite. Any
mismatch raises :class:`DamagedEntry` with the reason; callers then recompute the
entry (with a warning naming the file) and never use it.

The files are plain `safetensors <https://huggingface.co/docs/safetensors>`_ (no pickle,
readable by any safetensors reader); the checksums and the caller's own header fields
live in its ``__metadata__`` (string values). The writer streams each tensor's bytes
into the file, hashing them on the way, so a multi-GB tensor is never copied in memory.

Before anything is read, :func:`read_header` checks the file's layout against its size:
a header that does not fit, a declared tensor that would overrun the file (a truncated
file, or sizes of 2^62 in a crafted header) or bytes no tensor covers are refused without
allocating anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from typing import BinaryIO

import torch
from torch import Tensor

from awt_engine._io import atomic_write

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_SHA_PREFIX = "sha256:"
_CHUNK = 1 << 24  # 16 MiB of tensor bytes per write
# bytes per element of every safetensors dtype (the ones this module writes and others)
_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header (100 MB)


class DamagedEntry(ValueError):
    """A cache file that must not be used; ``str()`` says why."""


def _raw_bytes(t: Tensor) -> memoryview:
    # bytes of a contiguous CPU tensor without a copy (numpy has no bf16: not stored here)
    return memoryview(t.reshape(-1).numpy()).cast("B")


def write_tensors(f: BinaryIO, tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> None:
    """Write ``tensors`` and string ``meta`` to the open binary file ``f`` as safetensors."""
    cpu = {}
    header: dict[str, object] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be cached")
        t = t.detach().to("cpu").contiguous()
        cpu[name] = t
        n = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    digests = {name: hashlib.sha256(_raw_bytes(t)).hexdigest() for name, t in cpu.items()}
    metadata = {str(k): str(v) for k, v in meta.items()}
    metadata.update({_SHA_PREFIX + name: d for name, d in digests.items()})
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # pad the header so the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for t in cpu.values():
        raw = _raw_bytes(t)
        for start in range(0, len(raw), _CHUNK):
            f.write(raw[start : start + _CHUNK])


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], meta: Mapping[str, str]):
    """:func:`write_tensors` into ``path`` atomically (OSError when it cannot be written)."""
    atomic_write(path, lambda f: write_tensors(f, tensors, meta))


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries, string metadata) of a safetensors file, its layout checked
    against the file's size before anything is allocated.

    Each entry is ``{"dtype", "shape", "data_offsets"}``. Raises :class:`DamagedEntry`
    saying what is wrong (empty, truncated, not safetensors, sizes the file cannot hold),
    FileNotFoundError when there is no file.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if size < 8:
            raise DamagedEntry(f"the file is {'empty' if not size else f'{size} bytes'}")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, MAX_HEADER_BYTES):
            # a safetensors header is JSON: '{' follows its length
            if _foreign(head) or n > MAX_HEADER_BYTES or f.read(1) not in (b"{", b""):
                raise DamagedEntry(f"not a safetensors file{_foreign(head)}")
            raise DamagedEntry(f"truncated: its header needs {n + 8} bytes, the file has {size}")
        blob = f.read(n)
    try:
        header = json.loads(blob)
    except (ValueError, RecursionError):
        raise DamagedEntry(f"not a safetensors file{_foreign(head)}: no JSON header") from None
    if not isinstance(header, dict):
        raise DamagedEntry("not a safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DamagedEntry("the header's __metadata__ is not a map of strings")
    _check_layout(header, size - 8 - n)
    return header, meta


def _foreign(head: bytes) -> str:
    """What a file that is not safetensors looks like, from its first bytes."""
    if head[:1] == b"\x80":
        return " (it looks like a pickle, which is never loaded)"
    if head[:2] == b"PK":
        return " (it looks like a zip archive, e.g. torch.save's, which is never loaded)"
    return ""


def _check_layout(entries: dict, data_size: int) -> None:
    """Every entry well-formed, its byte range inside the data and of its shape's size,
    and the ranges tiling the data exactly (as safetensors requires)."""
    spans = []
    for name, e in entries.items():
        ok = isinstance(e, dict) and e.get("dtype") in _ITEMSIZE
        shape, offsets = (e.get("shape"), e.get("data_offsets")) if ok else (None, None)
        ok = ok and isinstance(shape, list) and all(_whole(d) for d in shape)
        ok = ok and isinstance(offsets, list) and len(offsets) == 2
        ok = ok and all(_whole(x) for x in offsets) and offsets[0] <= offsets[1]
        if not ok:
            raise DamagedEntry(f"tensor {name!r} has a malformed entry in the header")
        start, end = offsets
        need = math.prod(shape) * _ITEMSIZE[e["dtype"]]
        if end - start != need:
            raise DamagedEntry(
                f"tensor {name!r} declares shape {shape} ({need} bytes) over {end - start} bytes"
            )
        if end > data_size:
            raise DamagedEntry(
                f"truncated, or sizes it cannot hold: tensor {name!r} needs bytes up to {end}, "
                f"the file holds {data_size} bytes of tensor data"
            )
        spans.append((start, end))
    pos = 0
    for start, end in sorted(spans):
        if start != pos:
            raise DamagedEntry("the tensors' byte ranges overlap or leave gaps")
        pos = end
    if pos != data_size:
        raise DamagedEntry(f"{data_size - pos} bytes after the last tensor belong to none")


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def load_tensors(
    path: str | os.PathLike,
    expect: Mapping[str, tuple[torch.dtype, tuple[int | None, ...]]],
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read and verify a file written by :func:`save_tensors`.

    ``expect`` maps each tensor name to (dtype, shape); a ``None`` in the shape matches
    any size. Returns (tensors, metadata). Raises :class:`DamagedEntry` when anything is
    off, FileNotFoundError when there is no file.
    """
    from safetensors import SafetensorError, safe_open

    try:
        read_header(path)  # the layout, against the file's size, before safetensors maps it
        with safe_open(os.fspath(path), framework="pt") as sf:
            meta = dict(sf.metadata() or {})
            names = set(sf.keys())
            missing = [n for n in expect if n not in names]
            if missing:
                raise DamagedEntry(f"no tensor {', '.join(missing)}")
            # a fresh (aligned) copy: BLAS rounds differently on differently aligned memory,
            # and a cached tensor must give the very same scores as a computed one
            out = {n: sf.get_tensor(n).clone() for n in expect}
    except FileNotFoundError:
        raise
    except DamagedEntry:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DamagedEntry(f"not a readable tensor file ({' '.join(str(exc).split())})") from None
    for name, (dtype, shape) in expect.items():
        t = out[name]
        if t.dtype != dtype:
            raise DamagedEntry(f"tensor {name!r} has dtype {t.dtype}, expected {dtype}")
        if t.dim() != len(shape) or any(
            s is not None and s != n for s, n in zip(shape, t.shape, strict=True)
        ):
            want = "x".join("*" if s is None else str(s) for s in shape)
            raise DamagedEntry(f"tensor {name!r} has shape {tuple(t.shape)}, expected [{want}]")
        recorded = meta.get(_SHA_PREFIX + name)
        if recorded is None:
            raise DamagedEntry(f"tensor {name!r} has no checksum in the header")
        if hashlib.sha256(_raw_bytes(t.contiguous())).hexdigest() != recorded:
            raise DamagedEntry(f"tensor {name!r} does not match its checksum")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DamagedEntry(f"tensor {name!r} holds NaN or infinite values")
    return out, meta


def check_unit_rows(t: Tensor, name: str, atol: float = 1e-2) -> None:
    """Raise :class:`DamagedEntry` unless every row along the last axis has norm ~1.

    Cached embeddings are L2-normalised; a row that is not says the values are foreign
    (a checksum matches any bytes its writer chose).
    """
    norms = t.float().norm(dim=-1)
    if norms.numel() and not bool(((norms - 1).abs() <= atol).all()):
        worst = float((norms - 1).abs().max())
        raise DamagedEntry(
            f"tensor {name!r} rows are not unit vectors (|norm - 1| up to {worst:.3g})"
        )
