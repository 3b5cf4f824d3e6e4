"""Few-shot training: the API (:func:`train`) and loading what it wrote (:func:`load_trained`).

``train`` reads the training split of a labelled data set (every layout ``eval`` reads),
keeps ``shots`` images per class (CoOp's protocol, :mod:`~awt_engine.training.data`),
builds the method's model on a frozen backbone, runs the one fit loop
(:mod:`~awt_engine.training.loop`) and writes a checkpoint
(:mod:`~awt_engine.training.checkpoint`). ``load_trained`` rebuilds the model from a
checkpoint and the backbone weights it names.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awt_engine._io import resolve_cache_root, sha256_hex, utc_now
from awt_engine.training.checkpoint import (
    CheckpointError,
    labels_from_record,
    labels_record,
    read_checkpoint,
    save_checkpoint,
    state_path,
)
from awt_engine.training.data import few_shot, fingerprint, subsample_classes
from awt_engine.training.loop import TrainConfig, TrainResult, fit

DEFAULT_MODEL = "ViT-B-16-quickgelu"  # the AWT, CoOp and LAMM papers' backbone
DEFAULT_PRETRAINED = "openai"


@dataclass(frozen=True)
class Trained:
    """What :func:`train` wrote and how it went."""

    path: Path  # the checkpoint
    result: TrainResult
    header: dict[str, Any]
    val_accuracy: float | None  # top-1 on min(shots, 4) val images per class, if a val split exists


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
    try:
        return (
            dataclasses.replace(method_config, **m_over),
            dataclasses.replace(train_config, **t_over),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{spec.name}: {exc}") from None


def _convert(config, f: dataclasses.Field, value):
    if not isinstance(value, str):
        return value
    hints = typing.get_type_hints(type(config))
    kind = hints.get(f.name, str)
    text = value.strip()
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if text.lower() == "none":
            return None
        for candidate in typing.get_args(kind):
            if candidate in (int, float):
                return candidate(text)
        if typing.get_origin(kind) is tuple:
            return tuple(float(x) for x in text.split(","))
        return text
    except ValueError:
        raise ValueError(f"option {f.name}: cannot read {value!r} as {kind}") from None


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
    backbone=None,
) -> Trained:
    """Few-shot train ``method`` and write its checkpoint to ``output``.

    The label set (classes, template, descriptions) comes from ``dataset`` and the data's
    own class folders, as for ``eval``; ``options`` override the method's and the training
    defaults (the paper's, see ``awt-engine methods``); ``epochs``, ``lr`` and
    ``batch_size`` are shorthands. ``resume`` continues an interrupted run from the state
    saved beside ``output`` after its last finished epoch.
    """
    from awt_engine.descriptions import descriptions_path
    from awt_engine.labelled import load_labelled
    from awt_engine.labels import resolve_label_set
    from awt_engine.methods import get_method
    from awt_engine.registry import read_class_list

    spec = get_method(method)
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"--output {output}: a checkpoint is a .safetensors file")
    class_list = read_class_list(classes) if isinstance(classes, str) else classes
    full = load_labelled(data_root, dataset=dataset, classes=class_list, split="train")
    part = subsample_classes(full, subsample)
    data = few_shot(part, shots, seed)
    root = resolve_cache_root(cache_dir)
    if descriptions is None and not spec.needs_descriptions:
        # descriptions are for scoring later; without a cache the model trains all the same
        has_cache = dataset is not None and descriptions_path(dataset, root).exists()
        descriptions = None if has_cache else 0
    labels = resolve_label_set(dataset, list(data.classes), template, descriptions, root)

    method_config, train_config = apply_options(
        spec,
        spec.default_config(shots, dataset),
        dataclasses.replace(spec.train_defaults(shots, dataset), seed=seed),
        options,
    )
    shorthands = {"epochs": epochs, "lr": lr, "batch_size": batch_size}
    train_config = dataclasses.replace(
        train_config,
        **{k: v for k, v in shorthands.items() if v is not None},
        precision=precision or train_config.precision,
    )
    model_name = model or (DEFAULT_MODEL if backbone is None else backbone.identity)
    if pretrained == DEFAULT_PRETRAINED and model_name.startswith(("local-dir:", "hf-hub:")):
        pretrained = None  # those ids carry their own weights (also when a backbone is given)
    if backbone is None:
        from awt_engine.backbone import load_backbone

        backbone = load_backbone(model_name, pretrained, device=device, precision=precision)
    net = spec.build(backbone, method_config)
    net.use_cache_root(root)
    net.prepare(labels, seed)
    data = net.training_data(data)
    data_fp = fingerprint(data)
    run_key = sha256_hex(
        spec.name,
        repr(method_config),
        repr(train_config),
        data_fp,
        backbone.fingerprint,
        labels.key(),
        str(shots),
        subsample,
    )
    result = fit(
        net,
        data,
        train_config,
        state_file=state_path(output),
        resume=resume,
        run_key=run_key,
        progress=progress,
        workers=workers,
    )
    val = _val_accuracy(net, full, subsample, shots, seed, dataset, data_root, class_list, labels)
    header = {
        "method": spec.name,
        "method_config": net.header(),
        "train_config": dataclasses.asdict(train_config),
        "backbone": {
            "model": model_name,
            "pretrained": pretrained,
            "identity": backbone.identity,
            "fingerprint": backbone.fingerprint,
            "weights": getattr(backbone, "weights", None),
        },
        "frozen": net.frozen_parts(),
        "labels": labels_record(labels),
        "shots": shots,
        "seed": seed,
        "subsample": subsample,
        "data": {
            "fingerprint": data_fp,
            "images": len(data.items),
            "root": str(data_root),
            "name": data.name,
            "source": data.source,
        },
        "losses": result.losses,
        "val_accuracy": val,
        "created": utc_now(),
    }
    path = save_checkpoint(output, net.learned_state(), header)
    state_path(output).unlink(missing_ok=True)
    return Trained(path, result, header, val)


def _val_accuracy(net, full, subsample, shots, seed, dataset, data_root, classes, labels):
    """Top-1 (clip scorer, one view) on min(shots, 4) val images per class, when the data
    has a val split (CoOp keeps these few-shot val sets for its reports)."""
    import torch

    from awt_engine.classifier import Classifier
    from awt_engine.evaluate import evaluate
    from awt_engine.labelled import DatasetLayoutError, load_labelled

    try:
        val_full = load_labelled(data_root, dataset=dataset, classes=classes, split="val")
    except (DatasetLayoutError, ValueError):
        return None
    if val_full.source == full.source or not val_full.items:
        return None  # no separate val split: the loader fell back to the same images
    val = few_shot(subsample_classes(val_full, subsample), min(shots, 4), seed)
    clf = Classifier(net, labels, scorer="clip")
    with torch.inference_mode():
        res = evaluate(clf, val, ["clip"], cache_root=None)
    return res.metrics["clip"].acc1


def load_trained(
    path: str | Path,
    *,
    model: str | None = None,
    pretrained: str | None = None,
    llm: str | None = None,
    device: str = "auto",
    precision: str | None = None,
    backbone=None,
):
    """The model a checkpoint describes, ready to score (eval mode, learned tensors in).

    The backbone (and a method's LLM) are loaded as the checkpoint names them, or from
    ``model``/``pretrained`` and ``llm`` (the same weights stored elsewhere); weights other
    than the ones trained on are a :class:`CheckpointError` naming both.
    """
    from awt_engine.methods import get_method

    header, tensors = read_checkpoint(path)
    spec = get_method(header["method"])
    bb = header["backbone"]
    if backbone is None:
        from awt_engine.backbone import load_backbone

        name = model or bb["model"]
        weights = pretrained if model else bb.get("pretrained")
        backbone = load_backbone(name, weights, device=device, precision=precision)
    if backbone.fingerprint != bb["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on backbone {bb['fingerprint']} "
            f"({bb['model']}); the backbone given is {backbone.fingerprint}"
        )
    fields = {f.name for f in dataclasses.fields(spec.config)}
    values = {k: _tuple(v) for k, v in header["method_config"].items() if k in fields}
    if llm is not None:
        if "llm" not in fields:
            raise CheckpointError(f"{spec.name} has no LLM; --llm does not apply to {path}")
        values["llm"] = llm
    net = spec.build(backbone, spec.config(**values))
    recorded = header.get("frozen", {})
    if net.frozen_parts() != recorded:
        raise CheckpointError(
            f"checkpoint {path} was trained with {recorded}; the models given are "
            f"{net.frozen_parts()}"
        )
    net.prepare(labels_from_record(header["labels"]), int(header.get("seed", 0)))
    net.load_learned(tensors)
    net.eval()
    net.checkpoint_header = header
    return net


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


__all__ = ["CheckpointError", "TrainConfig", "Trained", "load_trained", "train"]
