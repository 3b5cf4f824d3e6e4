"""`awt-engine explain`: why an image got its label, as a picture, a page or numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from awt_engine.cli._app import app
from awt_engine.cli._common import (
    CacheDir,
    Checkpoint,
    Classes,
    Dataset,
    Descriptions,
    Device,
    Eps,
    Llm,
    Model,
    Precision,
    Pretrained,
    Progress,
    PromptTemperature,
    SinkhornIters,
    SinkhornTol,
    Template,
    Views,
    ViewTemperature,
    awt_config,
    fail,
    scorer_names,
    transport_scorer_help,
    usage_errors,
    weights_arg,
)

FORMATS = (".png", ".html", ".htm", ".json")
# explain has no --limit: the shared Seed option's help mentions one
ExplainSeed = Annotated[int, typer.Option(help="Seed of the random crops.")]


@app.command()
@usage_errors
def explain(
    image: Annotated[
        Path, typer.Argument(help="The image to explain.", exists=True, dir_okay=False)
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            help="A folder (made if need be; a name without a suffix, or ending in /) for "
            "all three: IMAGE.explain.png, .html and .json, from one model run. Or one file: "
            "why.png (a picture), why.html or why.json.",
        ),
    ],
    dataset: Dataset = None,
    classes: Classes = None,
    template: Template = None,
    model: Model = None,
    pretrained: Pretrained = None,
    checkpoint: Checkpoint = None,
    llm: Llm = None,
    descriptions: Descriptions = None,
    views: Views = 51,
    seed: ExplainSeed = 0,
    scorer: Annotated[str, typer.Option("--scorer", "-s", help=transport_scorer_help())] = "awt",
    top: Annotated[
        int,
        typer.Option("--top", "--top-k", min=1, help="Classes explained (the best first)."),
    ] = 2,
    device: Device = "auto",
    precision: Precision = None,
    cache_dir: CacheDir = None,
    eps: Eps = None,
    view_temperature: ViewTemperature = None,
    prompt_temperature: PromptTemperature = None,
    sinkhorn_tol: SinkhornTol = None,
    sinkhorn_iters: SinkhornIters = None,
    progress: Progress = True,
) -> None:
    """Explain a prediction: which crops were matched to which descriptions, and how much
    each pair added to the score (AWT's transport plan).

    Exit 0: written; 2: a usage error, an output that cannot be written, or an image
    with nothing to explain (unreadable, or scores that are not finite numbers).
    """
    (name,) = scorer_names([scorer], None)
    config = awt_config(eps, view_temperature, prompt_temperature, sinkhorn_tol, sinkhorn_iters)
    folder, target = _output_target(output, image)
    if classes is None and dataset is None and checkpoint is None:
        raise fail("say what the classes are: --dataset NAME, --classes LIST or --checkpoint")

    from awt_engine.classifier import create_classifier

    clf = create_classifier(
        model,
        weights_arg(pretrained, checkpoint),
        checkpoint=checkpoint,
        llm=llm,
        dataset=dataset,
        classes=classes,
        template=template,
        descriptions=descriptions,
        views=views,
        seed=seed,
        scorer=name,
        device=device,
        cache_dir=cache_dir,
        precision=precision,
        awt_config=config,
        progress=progress,
    )
    exp = clf.explain(str(image), top_k=top)  # one model run for every format
    written = exp.save_all(target) if folder else [exp.save(target)]
    best = exp.prediction
    typer.echo(f"{image}\t{best.name}\t{best.probability:.4f}")
    for path in written:
        typer.echo(f"wrote {path}", err=True)


def _output_target(output: str, image: Path) -> tuple[bool, Path]:
    """(is a folder, path) for --output, checked before any model loads: a folder when
    it is one, ends in a slash or has no suffix; else a .png, .html or .json file."""
    import importlib.util
    import os

    path = Path(output)
    seps = ("/", os.sep, os.altsep or "/")
    folder = output.endswith(seps) or path.is_dir() or (not path.suffix and not path.exists())
    if not folder and path.suffix.lower() not in FORMATS:
        raise fail(
            f"--output {output}: write an explanation as .png, .html or .json, or name a "
            "folder (ending in /) for all three"
        )
    if not folder and path.exists() and path.resolve() == image.resolve():
        raise fail(f"--output {output}: that is the image to explain; name another file")
    if (folder or path.suffix.lower() == ".png") and not importlib.util.find_spec("matplotlib"):
        raise fail(
            "the explanation picture needs matplotlib: uv sync --extra explain (or pip "
            "install 'awt-engine[explain]'); .html and .json need nothing more"
        )
    return folder, path


__all__ = ["explain"]
