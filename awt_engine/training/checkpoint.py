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
    """(header, tensors) of a checkpoint, every checksum verified; CheckpointError else."""
    from safetensors import safe_open

    from awt_engine._tensorfile import load_tensors

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as sf:
            meta = sf.metadata() or {}
            names = list(sf.keys())
        header = json.loads(meta[HEADER_KEY])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise DamagedEntry(f"unknown checkpoint format {header.get('format')!r}")
        tensors, _ = load_tensors(path, {n: (torch.float32, _any_shape(path, n)) for n in names})
    except KeyError:
        raise CheckpointError(
            f"{path} is a safetensors file but not an awt-engine checkpoint"
        ) from None
    except (DamagedEntry, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from None
    return header, tensors


def _any_shape(path: Path, name: str) -> tuple[None, ...]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as sf:
        return (None,) * len(sf.get_slice(name).get_shape())


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
    """(meta, learned tensors, optimizer state dict) written by :func:`save_state`."""
    from safetensors import safe_open

    from awt_engine._tensorfile import load_tensors

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as sf:
            body = json.loads((sf.metadata() or {})[HEADER_KEY])
            shapes = {n: (None,) * len(sf.get_slice(n).get_shape()) for n in sf.keys()}
        expect = {n: (_DTYPES[body["dtypes"][n]], shapes[n]) for n in shapes}
        tensors, _ = load_tensors(path, expect)
    except (KeyError, DamagedEntry, OSError, ValueError) as exc:
        raise CheckpointError(
            f"training state {path} cannot be read ({exc}); delete it to start the run afresh"
        ) from None
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
    return body["meta"], learned, {"state": state, "param_groups": body["param_groups"]}
