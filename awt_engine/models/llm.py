"""Causal language models for the methods that put an LLM in the path (LLaMP, CLAMP, eP-ALM)
and for the description stage: one way to load them, with clear offline errors.

``load_causal_lm(name)`` takes a local folder (``config.json``, weights, tokenizer) or a
Hugging Face hub id (read from the local cache; the hub is only reached when the files are
missing and the network is there). The model comes back frozen, in eval mode, with its
tokenizer; ``fingerprint`` names the weights (a local folder's content hash, or the hub
revision) so checkpoints can check that they are scored with the LLM they learned with.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awt_engine._io import atomic_write_json, file_sha256, resolve_cache_root, sha256_hex
from awt_engine._progress import library_bars, stderr_is_terminal

_WEIGHT_FILES = (".safetensors", ".bin", ".json", ".model", ".txt", ".tiktoken")
# (resolved path, size, mtime_ns) -> SHA-256 of the file: hashed once per process
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


class LLMLoadError(ValueError):
    """The language model could not be loaded; the message names it and the way forward."""


@dataclass
class LoadedLLM:
    model: Any  # a transformers PreTrainedModel (causal LM), frozen, eval mode
    tokenizer: Any
    name: str
    fingerprint: str


def resolve_dtype(dtype: str, device: str):
    """``auto``: the checkpoint's dtype on a GPU, float32 on CPU (bf16 matmuls are slow there)."""
    import torch

    if dtype == "auto":
        return "auto" if device != "cpu" else torch.float32
    value = getattr(torch, dtype, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, float16 or bfloat16")
    return value


def load_causal_lm(
    name: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    frozen: bool = True,
) -> LoadedLLM:
    """A causal LM and its tokenizer from a folder or hub id (see the module docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name, str) or not name.strip():
        raise LLMLoadError(f"the LLM must be a hub id or a folder, got {name!r}")
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_like_path and not path.exists():
        raise LLMLoadError(
            f"LLM folder {path} does not exist (a local model is a folder with config.json, "
            "weights and tokenizer files; a hub id looks like org/name)"
        )
    torch_dtype = resolve_dtype(dtype, device)  # a bad dtype is its own error, not a load's
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        with library_bars(stderr_is_terminal()):  # no "Loading weights" bars in a log file
            model = AutoModelForCausalLM.from_pretrained(
                name, dtype=torch_dtype, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError) as e:
        raise LLMLoadError(
            f"cannot load LLM {name!r} with transformers: {str(e).rstrip('.')}. Give a local "
            "folder with config.json, weights and tokenizer, or a hub id already in the local "
            "cache (offline: set HF_HUB_OFFLINE=1 so a missing model fails at once)."
        ) from None
    model.to(device)
    model.eval()
    if frozen:
        model.requires_grad_(False)
    return LoadedLLM(model, tokenizer, name, llm_fingerprint(name, model))


def llm_fingerprint(name: str, model) -> str:
    """A local folder: SHA-256 over its config and weight files; a hub id: its revision."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_FILES and p.is_file())
        hashes = weight_hashes(files)
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}\0{hashes[f.name]}\0".encode())
        return f"llm|sha256:{h.hexdigest()}"
    commit = getattr(getattr(model, "config", None), "_commit_hash", None)
    if commit and re.fullmatch(r"[0-9a-f]{40}", str(commit)):
        return f"llm|{name}@{commit}"
    return f"llm|{name}"


def weight_hashes(files: list[Path], cache_dir=None) -> dict[str, str]:
    """{file name: SHA-256} of a model folder's files, each read only when its (path, size,
    mtime_ns) is new to this process and to the cache folder's record of the folder
    (``<cache root>/llm-fingerprints``, written atomically; unwritable: memory only)."""
    record = _fingerprint_record(files[0].parent, cache_dir) if files else None
    saved = _read_record(record)
    out, changed = {}, False
    for f in files:
        st = f.stat()
        key = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        entry = saved.get(f.name)
        if key not in _FILE_HASHES and entry and entry[:2] == [st.st_size, st.st_mtime_ns]:
            _FILE_HASHES[key] = entry[2]
        if key not in _FILE_HASHES:
            _FILE_HASHES[key] = file_sha256(f)
        out[f.name] = _FILE_HASHES[key]
        changed |= entry != [st.st_size, st.st_mtime_ns, out[f.name]]
    if record is not None and changed:
        files_record = {f.name: [k[1], k[2], out[f.name]] for f, k in _keys(files)}
        try:
            atomic_write_json(
                record, {"folder": str(files[0].parent.resolve()), "files": files_record}
            )
        except OSError:
            pass  # a read-only cache: the hashes stay in memory
    return out


def _keys(files: list[Path]):
    for f in files:
        st = f.stat()
        yield f, (str(f.resolve()), st.st_size, st.st_mtime_ns)


def _fingerprint_record(folder: Path, cache_dir) -> Path:
    name = sha256_hex("awt-llm-fingerprint", str(folder.resolve()))[:32]
    return resolve_cache_root(cache_dir) / "llm-fingerprints" / f"{name}.json"


def _read_record(record: Path | None) -> dict[str, list]:
    if record is None:
        return {}
    try:
        files = json.loads(record.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return files if isinstance(files, dict) else {}
