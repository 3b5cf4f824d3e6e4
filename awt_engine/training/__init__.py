"""Few-shot training: the API (:func:`train`) and loading what it wrote (:func:`load_trained`).

``train`` reads the training split of a labelled data set (every layout ``eval`` reads),
keeps ``shots`` images per class (CoOp's protocol, :mod:`~awt_engine.training.data`),
builds the method's model on a frozen backbone, runs the one fit loop
(:mod:`~awt_engine.training.loop`) and writes a checkpoint
(:mod:`~awt_engine.checkpoints`). ``load_trained`` (the model factory's,
:mod:`awt_engine.models.factory`, re-exported here) rebuilds the model from a checkpoint
and the backbone weights it names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from awt_engine._io import resolve_cache_root, sha256_hex, utc_now
from awt_engine.checkpoints import (
    CheckpointError,
    labels_record,
    save_checkpoint,
    state_path,
)
from awt_engine.models.factory import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    load_trained,
    weights_for,
)
from awt_engine.options import convert
from awt_engine.training.data import check_classes, few_shot, fingerprint, subsample_classes
from awt_engine.training.held_out import val_accuracy, val_data
from awt_engine.training.llm_checks import check_llm_depth as check_llm_depth
from awt_engine.training.llm_checks import llm_depth as llm_depth
from awt_engine.training.loop import (
    TrainConfig,
    TrainResult,
    deterministic_env,
    deterministic_mode,
    fit,
)
from awt_engine.training.plot import plot_log
from awt_engine.training.watch import LOG_EVERY, RunWatch, check_watching, log_path

log = logging.getLogger("awt_engine.training")


@dataclass(frozen=True)
class Trained:
    """What :func:`train` wrote and how it went."""

    path: Path  # the checkpoint
    result: TrainResult
    header: dict[str, Any]
    val_accuracy: float | None  # top-1 on min(shots, 4) val images per class, if a val split exists
    log: Path | None = None  # the JSONL training log (training.watch.log_path)
    plot: Path | None = None  # the training curves (PNG), when asked for


def apply_options(spec, method_config, train_config: TrainConfig, options: dict[str, Any] | None):
    """``options`` (name -> value, strings allowed) onto the method's and the training
    config; ValueError naming an unknown name or a bad value."""
    method_fields = {f.name: f for f in dataclasses.fields(method_config)}
    train_fields = {f.name: f for f in dataclasses.fields(train_config)}
    m_over, t_over = {}, {}
    for raw, value in (options or {}).items():
        name = raw.replace("-", "_")
        if name in method_fields:
            m_over[name] = _convert(method_config, method_fields[name], value)
        elif name in train_fields:
            t_over[name] = _convert(train_config, train_fields[name], value)
        else:
            raise ValueError(
                f"unknown option {raw!r} for {spec.name}; method options: "
                f"{', '.join(method_fields)}; training options: {', '.join(train_fields)}"
            )
    from awt_engine.methods.base import check_config

    try:
        configs = (
            dataclasses.replace(method_config, **m_over),
            dataclasses.replace(train_config, **t_over),
        )
        for config in configs:
            check_config(config)  # types and the sizes a method allocates from, before loading
        return configs
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{spec.name}: {exc}") from None


def _convert(config, f: dataclasses.Field, value):
    return convert(type(config), f.name, value)


def train(
    method: str,
    *,
    data_root: str | Path,
    output: str | Path,
    dataset: str | None = None,
    classes=None,
    template: str | None = None,
    descriptions: int | None = None,
    shots: int = 16,
    seed: int = 1,
    subsample: str = "all",
    model: str | None = None,
    pretrained: str | None = DEFAULT_PRETRAINED,
    device: str = "auto",
    precision: str | None = None,
    cache_dir: str | Path | None = None,
    workers: int = 2,
    resume: bool = False,
    progress: bool = False,
    options: dict[str, Any] | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    deterministic: bool = False,
    backbone=None,
    log: bool | None = None,
    log_every: int = LOG_EVERY,
    plot: bool = False,
    tensorboard: str | Path | None = None,
    val_split: str | None = None,
    val_every: int = 0,
    preset: str | None = None,
) -> Trained:
    """Few-shot train ``method`` and write its checkpoint to ``output``.

    The label set (classes, template, descriptions) comes from ``dataset`` and the data's
    own class folders, as for ``eval``; ``options`` override the method's and the training
    defaults (the paper's, see ``awt-engine methods``); ``epochs``, ``lr`` and
    ``batch_size`` are shorthands; ``pretrained`` takes the CLI's spellings ("none":
    random weights). ``resume`` continues an interrupted run from the state saved beside
    ``output`` after its last finished epoch. ``deterministic``: deterministic kernels
    (:func:`~awt_engine.training.loop.deterministic_mode`), so a CUDA run repeats bit for
    bit; recorded in the header's ``train_config``. ``preset``: one of the method's named
    option sets (``MethodSpec.presets``; None: its default preset), under ``options``;
    recorded in the header's ``preset``.

    Watching the run (:mod:`~awt_engine.training.watch`): ``log`` (default: ``progress``)
    prints a line per epoch on stderr; the JSONL log ``<output stem>.log.jsonl`` gets a
    record every ``log_every`` steps and one per epoch; ``plot`` draws it into
    ``<output stem>.png`` at the end; ``tensorboard`` (a folder) gets TensorBoard scalars.
    ``val_split`` (default: ``val`` when the data has one; a named split must exist) gives
    min(shots, 4) held-out images per class, scored (clip scorer) every ``val_every``
    epochs (0: only after the last) and after the last; in the log and the header.

    Options, the data and the label set are checked before any weights load (ValueError);
    a second run to the same ``output`` while one holds it is refused at once
    (:func:`output_lock`). FloatingPointError when training diverges: the state of the
    last finished epoch is kept, no checkpoint is written.
    """
    from awt_engine.backbone.sources import normalize_pretrained
    from awt_engine.methods import get_method

    spec = get_method(method)
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"--output {output}: a checkpoint is a .safetensors file")
    pretrained = normalize_pretrained(pretrained)
    shorthands = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "precision": precision}
    if deterministic:
        shorthands["deterministic"] = True
    preset = spec.default_preset if preset is None else preset
    options = {**spec.preset_options(preset), **_spelled(options)}
    method_config, train_config = _configs(spec, shots, dataset, seed, options, shorthands)
    check_llm_depth(method_config)  # the LLM's config.json only: no weights yet
    check_watching(log_every, val_every, plot, tensorboard)
    if train_config.deterministic:
        deterministic_env()  # before anything starts CUDA
    with output_lock(output), deterministic_mode(train_config.deterministic):
        full, data, labels = _training_data(
            spec, data_root, dataset, classes, template, descriptions, shots, seed, subsample,
            cache_dir,
        )  # fmt: skip
        _check_labels(spec, method_config, labels)
        val = val_data(
            full, subsample, shots, seed, dataset, data_root, _class_list(classes), cache_dir,
            val_split,
        )  # fmt: skip
        model_name = model or (DEFAULT_MODEL if backbone is None else backbone.identity)
        pretrained = weights_for(model_name, pretrained)  # local-dir:/hf-hub: carry their own
        if backbone is None:
            from awt_engine.backbone import load_backbone

            backbone = load_backbone(model_name, pretrained, device=device, precision=precision)
        net = spec.build(backbone, method_config)
        net.use_cache_root(resolve_cache_root(cache_dir))
        net.prepare(labels, seed)
        data = net.training_data(data)
        data_fp = fingerprint(data)
        run_key = sha256_hex(
            spec.name, repr(method_config), repr(train_config), data_fp, backbone.fingerprint,
            labels.key(), str(shots), subsample,
        )  # fmt: skip
        watch = RunWatch(
            log_path(output), train_config, len(data.items), spec.name,
            held_out=val, validate=partial(val_accuracy, net, val, labels), val_every=val_every,
            lines=progress if log is None else log, log_every=log_every, resume=resume,
            tensorboard=tensorboard,
        )  # fmt: skip
        with watch:
            result = fit(
                net, data, train_config, state_file=state_path(output), resume=resume,
                run_key=run_key, progress=progress, workers=workers,
                after_epoch=watch.after_epoch, after_step=watch.after_step,
            )  # fmt: skip
            top1 = watch.final_val()
        header = {
            "method": spec.name,
            "preset": preset,
            "method_config": net.header(),
            "train_config": dataclasses.asdict(train_config),
            "compute_precision": result.precision,  # what the steps ran in (autocast)
            "backbone": _backbone_record(backbone, model_name, pretrained),
            "frozen": net.frozen_parts(),
            "labels": labels_record(labels),
            **{"shots": shots, "seed": seed, "subsample": subsample},
            "data": _data_record(data, data_fp, data_root),
            "losses": result.losses,
            "epoch": len(result.losses),  # the epoch these weights are after (the last)
            **{"val_accuracy": top1, "val": watch.record(), "created": utc_now()},
        }
        path = save_checkpoint(output, net.learned_state(), header)
        state_path(output).unlink(missing_ok=True)
        drawn = _plot(output) if plot else None
    return Trained(path, result, header, top1, log_path(output), drawn)


def _plot(output: Path) -> Path | None:
    """The training curves beside the written checkpoint; a failure to draw them is a
    warning (the checkpoint stands; `awt-engine plot-training` can draw them later)."""
    try:
        return plot_log(log_path(output), output.with_suffix(".png"))
    except (OSError, ValueError) as exc:
        warnings.warn(f"--plot: the training curves were not drawn: {exc}", stacklevel=3)
        return None


def _configs(spec, shots, dataset, seed, options, shorthands):
    """(method config, training config): the paper's defaults for ``shots``, ``options``
    and the keyword ``shorthands`` (None: not given) over them, every value checked."""
    method_config, train_config = apply_options(
        spec,
        spec.default_config(shots, dataset),
        dataclasses.replace(spec.train_defaults(shots, dataset), seed=seed),
        options,
    )
    given = {k: v for k, v in shorthands.items() if v is not None}
    return method_config, dataclasses.replace(train_config, **given)


def _spelled(options: dict[str, Any] | None) -> dict[str, Any]:
    """Option names as the configs spell them (``--set foo-bar`` is ``foo_bar``)."""
    return {k.replace("-", "_"): v for k, v in (options or {}).items()}


def _backbone_record(backbone, model_name: str, pretrained: str | None) -> dict[str, Any]:
    return {
        "model": model_name,
        "pretrained": pretrained,
        "identity": backbone.identity,
        "fingerprint": backbone.fingerprint,
        "weights": getattr(backbone, "weights", None),
    }


def _data_record(data, data_fp: str, data_root) -> dict[str, Any]:
    return {
        "fingerprint": data_fp,
        "images": len(data.items),
        "root": str(data_root),
        "name": data.name,
        "source": data.source,
    }


def _class_list(classes):
    from awt_engine.registry import read_class_list

    return read_class_list(classes) if isinstance(classes, str) else classes


def _training_data(
    spec, data_root, dataset, classes, template, descriptions, shots, seed, subsample, cache_dir
):
    """(all training images, the few-shot draw, the label set), the data checked
    (:func:`~awt_engine.training.data.check_classes`)."""
    from awt_engine.descriptions import descriptions_path
    from awt_engine.labelled import load_labelled
    from awt_engine.labels import resolve_label_set

    class_list = _class_list(classes)
    full = load_labelled(
        data_root, dataset=dataset, classes=class_list, split="train", cache_dir=cache_dir
    )
    part = subsample_classes(full, subsample)
    if class_list is not None:
        whose = "classes of --classes"
    elif dataset is not None:
        whose = f"classes of data set {dataset!r}"
    else:
        whose = "classes"
    check_classes(part, shots, whose)
    data = few_shot(part, shots, seed)
    root = resolve_cache_root(cache_dir)
    if descriptions is None and not spec.needs_descriptions:
        # descriptions are for scoring later; without a cache the model trains all the same
        has_cache = dataset is not None and descriptions_path(dataset, root).exists()
        descriptions = None if has_cache else 0
    labels = resolve_label_set(dataset, list(data.classes), template, descriptions, root)
    return full, data, labels


def _check_labels(spec, method_config, labels) -> None:
    """What a method needs of its label set, checked before any weights load: the AWT
    adapter trains on descriptions (unless ``prompts_per_step=1``)."""
    per_step = getattr(method_config, "prompts_per_step", 1)
    if spec.needs_descriptions and per_step > 1 and labels.n_descriptions == 0:
        named = f" {labels.name!r}" if labels.name else ""
        raise ValueError(
            f"{spec.name} trains on class descriptions (the bare prompt plus {per_step - 1} "
            f"descriptions per step), but the label set{named} has none: generate them with "
            "`awt-engine describe --dataset NAME` and train with --dataset NAME (and "
            "--descriptions N > 0), or set prompts_per_step=1 to train on the bare prompts "
            "alone (not the paper's setting)"
        )


@contextlib.contextmanager
def output_lock(output: str | os.PathLike) -> Iterator[None]:
    """Hold ``<output>.lock`` (``flock``, as the description caches' writers do) for a whole
    training run. A second run to the same output is refused at once with a ValueError
    naming it: it would overwrite the first's checkpoint, and the first, finishing, would
    delete the state the second resumes from. The lock file goes when the run ends. Where
    no lock can be had (no ``fcntl`` on Windows, a file system without ``flock``) the run
    goes on unlocked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    output = Path(output)
    lock = output.with_name(output.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _locked_fd(lock, output, fcntl)
    try:
        yield
    finally:
        if fd is not None:
            lock.unlink(missing_ok=True)  # still holding it: a waiter's file is a fresh one
            os.close(fd)


def _locked_fd(lock: Path, output: Path, fcntl) -> int | None:
    """An open, flock-held descriptor of ``lock`` (None where flock is not supported)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise ValueError(
                    f"--output {output}: another training run is writing it (it holds "
                    f"{lock.name}); wait for it to finish, or train to another --output"
                ) from None
            log.warning("%s: cannot lock (%s); training without a lock", lock, e)
            return None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the run before removed this file as it finished: lock the new one


__all__ = ["CheckpointError", "TrainConfig", "Trained", "load_trained", "train"]
