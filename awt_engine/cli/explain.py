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
    PromptTemperature,
    Seed,
    SinkhornIters,
    SinkhornTol,
    Template,
    Views,
    ViewTemperature,
    awt_config,
    fail,
    scorer_names,
    usage_errors,
    weights_arg,
)

FORMATS = (".png", ".html", ".htm", ".json")


@app.command()
@usage_errors
def explain(
    image: Annotated[
        Path, typer.Argument(help="The image to explain.", exists=True, dir_okay=False)
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="why.png (a picture), why.html or why.json.")
    ],
    dataset: Dataset = None,
    classes: Classes = None,
    template: Template = None,
    model: Model = None,
    pretrained: Pretrained = "openai",
    checkpoint: Checkpoint = None,
    llm: Llm = None,
    descriptions: Descriptions = None,
    views: Views = 51,
    seed: Seed = 0,
    scorer: Annotated[
        str, typer.Option("--scorer", "-s", help="awt, awt-uniform or awt-no-transport.")
    ] = "awt",
    top_k: Annotated[int, typer.Option(min=1, help="Classes explained (the best first).")] = 2,
    device: Device = "auto",
    precision: Precision = None,
    cache_dir: CacheDir = None,
    eps: Eps = None,
    view_temperature: ViewTemperature = None,
    prompt_temperature: PromptTemperature = None,
    sinkhorn_tol: SinkhornTol = None,
    sinkhorn_iters: SinkhornIters = None,
) -> None:
    """Explain a prediction: which crops were matched to which descriptions, and how much
    each pair added to the score (AWT's transport plan)."""
    (name,) = scorer_names([scorer], None)
    config = awt_config(eps, view_temperature, prompt_temperature, sinkhorn_tol, sinkhorn_iters)
    if output.suffix.lower() not in FORMATS:
        raise fail(f"--output {output}: write an explanation as .png, .html or .json")
    if classes is None and dataset is None and checkpoint is None:
        raise fail("say what the classes are: --dataset NAME, --classes LIST or --checkpoint")

    from awt_engine.classifier import create_classifier

    clf = create_classifier(
        model,
        weights_arg(pretrained),
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
    )
    exp = clf.explain(str(image), top_k=top_k)
    exp.save(output)
    best = exp.prediction
    typer.echo(f"{image}\t{best.name}\t{best.probability:.4f}")
    typer.echo(f"wrote {output}", err=True)


__all__ = ["explain"]
