"""`awt-engine export`: the frozen towers as ONNX files, with their preprocessing beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from awt_engine.cli._app import app
from awt_engine.cli._common import (
    CacheDir,
    Classes,
    Dataset,
    Descriptions,
    Model,
    Pretrained,
    Template,
    fail,
    usage_errors,
    weights_arg,
)

FORMATS = ("onnx",)


@app.command()
@usage_errors
def export(
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Folder for the files (made if need be).", file_okay=False
        ),
    ],
    format_: Annotated[str, typer.Option("--format", help="onnx (the only format).")] = "onnx",
    model: Model = None,
    pretrained: Pretrained = None,
    dataset: Dataset = None,
    classes: Classes = None,
    template: Template = None,
    descriptions: Descriptions = None,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Also write image.int8.onnx and text.int8.onnx (ONNX Runtime's dynamic int8).",
        ),
    ] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Write image.onnx (pixels -> unit embeddings) and text.onnx (token ids -> unit
    embeddings) for ONNX Runtime, TensorRT or OpenVINO, and preprocess.json (resize, crop,
    mean, std, the tokenizer's context length, every file's inputs and outputs). With
    --dataset or --classes also classes.onnx: image embeddings -> the label set's zero-shot
    logits. Zero-shot CLIP only (a trained method's parts are not exported).

    Exit 0: written; 2: a usage error, or files that cannot be written.
    """
    if format_ not in FORMATS:
        raise fail(f"--format {format_!r}: only onnx is supported")
    from awt_engine.backbone.onnx_export import onnx_modules

    try:
        onnx_modules()
    except ImportError as exc:
        raise fail(str(exc)) from None
    import torch.nn.functional as F

    from awt_engine.backbone.onnx_export import export_onnx
    from awt_engine.models.factory import DEFAULT_MODEL, load_model

    name = model or DEFAULT_MODEL
    net = load_model(name, weights_arg(pretrained), device="cpu", precision="fp32")
    names = embeds = None
    if dataset is not None or classes is not None:
        from awt_engine.labels import resolve_label_set

        labels = resolve_label_set(dataset, classes, template, descriptions, cache_dir)
        names = labels.classes
        embeds = F.normalize(net.class_embeddings(labels).mean(1), dim=-1)  # [C, D]
    from awt_engine._progress import progress_bar

    graphs = 2 + (embeds is not None) + 2 * int8
    with progress_bar(graphs, desc="export", unit="graph") as bar:  # on a terminal only
        manifest = export_onnx(
            net.backbone,
            output,
            model_name=name,
            class_names=names,
            class_embeds=embeds,
            int8=int8,
            on_file=lambda _: bar.update(1),
        )
    for file in manifest["files"]:
        typer.echo(str(Path(output) / file))
    typer.echo(str(Path(output) / "preprocess.json"))
