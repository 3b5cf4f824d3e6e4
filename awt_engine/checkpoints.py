"""Checkpoints: only the learned tensors, in safetensors, with a JSON header.

A checkpoint (``x.safetensors``) holds the tensors of ``model.learned_state()`` (never the
frozen backbone) with checksums (:mod:`awt_engine._tensorfile`), and under the metadata key
``awt_engine`` a JSON header: the method and its hyper-parameters, the training settings,
the backbone (model, weights, identity), the label set it learned (classes, template,
the descriptions themselves with their cache name and hash), shots, seed, the
training-data fingerprint, the engine version and the loss history. Everything needed to
rebuild the model is in the file and the backbone weights it names.

The training state beside it (``x.safetensors.state``) is what ``--resume`` continues
from: the learned tensors and optimizer state after the last finished epoch, written
atomically at the end of every epoch and removed once the checkpoint is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from awt_engine import __version__
from awt_engine._tensorfile import DamagedEntry, save_tensors
from awt_engine.labels import LabelSet

HEADER_KEY = "awt_engine"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here; the message names the file and why."""


def state_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".state")


def labels_record(labels: LabelSet) -> dict[str, Any]:
    return {**labels.record(), "descriptions": [list(d) for d in labels.descriptions]}


def labels_from_record(rec: dict[str, Any]) -> LabelSet:
    return LabelSet(
        tuple(rec["classes"]),
        rec["template"],
        tuple(tuple(d) for d in rec.get("descriptions") or ()),
        rec.get("name"),
        rec.get("descriptions_sha256"),
    )


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], header: dict) -> Path:
    """Write the learned ``tensors`` and ``header`` atomically; returns the path."""
    path = Path(path)
    head = {"format": FORMAT, "engine_version": __version__, **header}
    save_tensors(
        path,
        {k: v.detach().float().cpu() for k, v in tensors.items()},
        {HEADER_KEY: json.dumps(head, ensure_ascii=False, allow_nan=False)},
    )
    return path


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(header, tensors) of a checkpoint, its header checked against the schema
    (:func:`check_header`), every checksum verified, every value finite; CheckpointError
    naming the file and what is wrong else."""
    from awt_engine._tensorfile import load_tensors

    path = Path(path)
    header, entries = _read_header(path)
    try:
        expect = {n: (torch.float32, (None,) * len(e["shape"])) for n, e in entries.items()}
        tensors, _ = load_tensors(path, expect)
    except (DamagedEntry, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None
    return header, tensors


def read_checkpoint_header(path: str | os.PathLike) -> dict[str, Any]:
    """The checked header of a checkpoint without reading its tensors (cheap)."""
    return _read_header(Path(path))[0]


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, dict]]:
    from awt_engine._tensorfile import read_header

    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        entries, meta = read_header(path)
        if HEADER_KEY not in meta:
            raise CheckpointError(f"{path} is a safetensors file but not an awt-engine checkpoint")
        header = check_header(parse_json(meta[HEADER_KEY]))
    except (DamagedEntry, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None
    return header, entries


MAX_DEPTH = 16  # nesting of a header's JSON: what this module writes is 4 deep at most


def parse_json(text: str) -> Any:
    """A header's JSON, with no NaN or infinity and nested at most MAX_DEPTH deep;
    DamagedEntry else (never a RecursionError)."""

    def no_constant(name):
        raise ValueError(f"{name} is not a number JSON allows")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise DamagedEntry(f"the header is nested more than {MAX_DEPTH} deep") from None
    except ValueError as exc:
        raise DamagedEntry(f"the header is not valid JSON ({exc})") from None
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise DamagedEntry(f"the header is nested more than {MAX_DEPTH} deep")
        level = [v for x in level if isinstance(x, dict | list) for v in _children(x)]
    return value


def _children(x: dict | list) -> list:
    return [v for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, dict | list)]


_OPTIONAL = object()
_JSON_NAMES = {
    str: "string",
    int: "whole number",
    float: "number",
    bool: "true/false",
    dict: "JSON object",
    list: "list",
    type(None): "null",
}


def _field(obj: dict, key: str, kind, where: str, default=_OPTIONAL):
    """``obj[key]`` when it is a ``kind``; DamagedEntry naming ``where.key`` else."""
    if key not in obj and default is not _OPTIONAL:
        return default
    value = obj.get(key)
    ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is int)
    if not ok:
        kinds = kind.__args__ if hasattr(kind, "__args__") else (kind,)
        name = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        got = "missing" if key not in obj else f"a {_JSON_NAMES.get(type(value), 'value')}"
        raise DamagedEntry(f"header field {where}{key} must be a {name}, is {got}")
    return value


def check_header(header: Any) -> dict[str, Any]:
    """``header`` if it has the fields loading reads, of the right types (the method's
    own bounds are checked where the method is known); DamagedEntry naming the field."""
    if not isinstance(header, dict):
        raise DamagedEntry(f"the header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != FORMAT:
        raise DamagedEntry(
            f"unknown checkpoint format {header.get('format')!r} (this engine reads {FORMAT})"
        )
    _field(header, "method", str, "")
    _field(header, "method_config", dict, "")
    bb = _field(header, "backbone", dict, "")
    for key in ("model", "fingerprint"):
        _field(bb, key, str, "backbone.")
    _field(bb, "pretrained", str | None, "backbone.", None)
    frozen = _field(header, "frozen", dict, "", {})
    for key in frozen:
        _field(frozen, key, str, "frozen.")
    _field(header, "seed", int, "", 0)
    labels = _field(header, "labels", dict, "")
    classes = _field(labels, "classes", list, "labels.")
    if not classes or not all(isinstance(c, str) for c in classes):
        raise DamagedEntry("header field labels.classes must be a non-empty list of names")
    _field(labels, "template", str, "labels.")
    rows = _field(labels, "descriptions", list, "labels.", [])
    if not all(isinstance(r, list) and all(isinstance(d, str) for d in r) for r in rows):
        raise DamagedEntry("header field labels.descriptions must be lists of texts")
    for key in ("name", "descriptions_sha256"):
        _field(labels, key, str | None, "labels.", None)
    try:
        labels_from_record(labels)
    except ValueError as exc:
        raise DamagedEntry(f"header field labels: {exc}") from None
    return header


_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
}


def save_state(
    path: str | os.PathLike, learned: dict[str, Tensor], optimizer_state: dict, meta: dict
) -> None:
    """The resumable training state: learned tensors, optimizer state and ``meta`` (epoch,
    run fingerprint, losses), in one checksummed file (no pickle), written atomically."""
    tensors: dict[str, Tensor] = {f"learned/{k}": v.detach().cpu() for k, v in learned.items()}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in optimizer_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{pid}/{key}"] = value.detach().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    dtypes = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}
    body = {
        "meta": meta,
        "param_groups": optimizer_state["param_groups"],
        "optim_scalars": scalars,
        "dtypes": dtypes,
    }
    save_tensors(path, tensors, {HEADER_KEY: json.dumps(body, allow_nan=False)})


def load_state(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor], dict]:
    """(meta, learned tensors, optimizer state dict) written by :func:`save_state`;
    CheckpointError naming the file and what is wrong when it cannot be used."""
    from awt_engine._tensorfile import load_tensors, read_header

    path = Path(path)
    try:
        entries, meta = read_header(path)
        if HEADER_KEY not in meta:
            raise DamagedEntry("not a training state of awt-engine")
        body = _check_state_body(parse_json(meta[HEADER_KEY]), entries)
        expect = {
            n: (_DTYPES[body["dtypes"][n]], (None,) * len(e["shape"])) for n, e in entries.items()
        }
        tensors, _ = load_tensors(path, expect)
        return body["meta"], *_state_parts(tensors, body)
    except KeyError as exc:
        why = f"no {exc}"
    except (DamagedEntry, OSError, ValueError) as exc:
        why = str(exc)
    raise CheckpointError(
        f"training state {path} cannot be read ({why}); delete it to start the run afresh"
    )


def _check_state_body(body: Any, entries: dict[str, dict]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise DamagedEntry(f"its header is a JSON {type(body).__name__}, not an object")
    meta = _field(body, "meta", dict, "")
    _field(meta, "run_key", str, "meta.")
    _field(meta, "epochs_done", int, "meta.")
    _field(meta, "losses", list, "meta.")
    _field(meta, "scaler", dict, "meta.", {})
    groups = _field(body, "param_groups", list, "")
    scalars = _field(body, "optim_scalars", dict, "")
    dtypes = _field(body, "dtypes", dict, "")
    if not all(isinstance(g, dict) for g in groups) or not all(
        isinstance(v, dict) for v in scalars.values()
    ):
        raise DamagedEntry("its optimizer state is malformed")
    unknown = [n for n in entries if dtypes.get(n) not in _DTYPES]
    if unknown:
        raise DamagedEntry(f"no known dtype for tensor {unknown[0]!r}")
    return body


def _state_parts(tensors: dict[str, Tensor], body: dict) -> tuple[dict[str, Tensor], dict]:
    learned = {
        k.removeprefix("learned/"): v for k, v in tensors.items() if k.startswith("learned/")
    }
    state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, pid, key = k.split("/", 2)
            state.setdefault(int(pid), {})[key] = v
    for pid, entry in body["optim_scalars"].items():
        state.setdefault(int(pid), {}).update(entry)
    return learned, {"state": state, "param_groups": body["param_groups"]}
