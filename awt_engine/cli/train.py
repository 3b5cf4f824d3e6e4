"""`awt-engine train` (few-shot training into a checkpoint) and `awt-engine methods`."""

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
    Device,
    Epochs,
    Llm,
    Lr,
    Precision,
    Progress,
    SetOptions,
    Template,
    TrainBatchSize,
    TrainModel,
    TrainPretrained,
    Workers,
    fail,
    set_options,
    usage_errors,
    weights_arg,
)


@app.command()
@usage_errors
def train(
    method: Annotated[
        str, typer.Option("--method", "-m", help="What to train (`awt-engine methods`).")
    ],
    data_root: Annotated[
        Path,
        typer.Option(
            help="Labelled images (any layout eval reads); the train split is used.",
            exists=True,
            file_okay=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The checkpoint to write (.safetensors).", dir_okay=False
        ),
    ],
    dataset: Dataset = None,
    classes: Classes = None,
    template: Template = None,
    descriptions: Descriptions = None,
    shots: Annotated[
        int, typer.Option(min=1, help="Training images per class (CoOp's protocol).")
    ] = 16,
    seed: Annotated[
        int, typer.Option(help="Seed of the few-shot draw, init and augmentation.")
    ] = 1,
    subsample: Annotated[
        str, typer.Option(help="Classes: all, or base / new (CoOp's base-to-new split).")
    ] = "all",
    model: TrainModel = None,
    pretrained: TrainPretrained = "openai",
    epochs: Epochs = None,
    lr: Lr = None,
    batch_size: TrainBatchSize = None,
    set_: SetOptions = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Named settings applied before --set: released (the official code's), paper, small (a small LM) ... as the method offers (`awt-engine methods --verbose`) [default: the method's default preset].",
        ),
    ] = None,
    csc: Annotated[bool, typer.Option("--csc", help="CoOp: class-specific contexts.")] = False,
    llm: Llm = None,
    captions: Annotated[
        Path | None,
        typer.Option(
            help='CLAMP: train on image-caption pairs, one JSON line per image {"image": path, "caption": text} (paths relative to the file); --data-root still gives the classes.',
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    device: Device = "auto",
    precision: Precision = None,
    cache_dir: CacheDir = None,
    workers: Workers = 2,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted run from its last finished epoch."),
    ] = False,
    progress: Progress = True,
    deterministic: Annotated[
        bool,
        typer.Option(
            "--deterministic",
            help="Deterministic CUDA kernels (slower): a run repeats bit for bit; without it, equal up to rounding on CUDA.",
        ),
    ] = False,
    log_every: Annotated[
        int,
        typer.Option(
            min=1,
            help="A step record in the JSONL log (<output stem>.log.jsonl) every N steps; one per epoch always.",
        ),
    ] = 5,
    plot: Annotated[
        bool,
        typer.Option(
            "--plot",
            help="Draw the training curves into <output stem>.png at the end (matplotlib).",
        ),
    ] = False,
    tensorboard: Annotated[
        Path | None,
        typer.Option(
            help="Also write TensorBoard scalars (losses, lr, val top-1) into this folder.",
            file_okay=False,
        ),
    ] = None,
    val_split: Annotated[
        str | None,
        typer.Option(
            help="Held-out split scored during training (min(shots, 4) images per class) [default: val, when the data has one].",
        ),
    ] = None,
    val_every: Annotated[
        int,
        typer.Option(min=0, help="Held-out top-1 every N epochs (0: only after the last epoch)."),
    ] = 0,
) -> None:
    """Few-shot train a method on frozen CLIP; writes a checkpoint for eval and classify.

    A line per epoch goes to stderr (epoch [k/K], loss terms, lr, img/s, elapsed, eta,
    val top-1), and a JSONL log beside the checkpoint (<output stem>.log.jsonl; see
    `awt-engine plot-training`). A second run to the same --output is refused while the
    first runs (it holds <output>.lock)."""
    from awt_engine.methods import get_method

    get_method(method).preset_options(preset)  # unknown names answered before heavy imports
    options = _method_options(set_, csc, llm, captions)
    if output.suffix != ".safetensors":
        raise fail(f"--output {output}: a checkpoint is a .safetensors file")

    from awt_engine.training import train as run_training

    try:
        done = run_training(
            method,
            data_root=data_root,
            output=output,
            dataset=dataset,
            classes=classes,
            template=template,
            descriptions=descriptions,
            shots=shots,
            seed=seed,
            subsample=subsample,
            model=model,
            pretrained=weights_arg(pretrained),
            device=device,
            precision=precision,
            cache_dir=cache_dir,
            workers=workers,
            resume=resume,
            progress=progress,
            options=options,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            deterministic=deterministic,
            log=True,
            log_every=log_every,
            plot=plot,
            tensorboard=tensorboard,
            val_split=val_split,
            val_every=val_every,
            preset=preset,
        )
    except ImportError as exc:  # --plot without matplotlib, --tensorboard without tensorboard
        raise fail(str(exc)) from None
    except FloatingPointError as exc:  # diverged: the message says where and "lower --lr"
        raise fail(str(exc)) from None
    except RuntimeError as exc:
        if deterministic and "deterministic" in str(exc):
            raise fail(f"--deterministic: {exc}") from None
        raise
    except KeyboardInterrupt:
        typer.echo(
            f"interrupted: the last finished epoch is saved; run the same command with --resume "
            f"to continue ({output}.state)",
            err=True,
        )
        raise typer.Exit(130) from None
    _say_done(method, done)


def _method_options(set_, csc: bool, llm: str | None, captions: Path | None) -> dict[str, str]:
    """The --set NAME=VALUE options, with the shorthand flags added unless --set gave them."""
    options = set_options(set_)
    if csc:
        options.setdefault("csc", "true")
    if llm is not None:
        options.setdefault("llm", llm)
    if captions is not None:
        options.setdefault("captions", str(captions.resolve()))
    return options


def _say_done(method: str, done) -> None:
    """One line on the run (images, epochs, steps, time, loss, val top-1), then the file."""
    r = done.result
    val = f", val top-1 {100 * done.val_accuracy:.2f}%" if done.val_accuracy is not None else ""
    typer.echo(
        f"{method}: {done.header['data']['images']} images, {r.epochs} epochs, {r.steps} steps in "
        f"{r.seconds:.1f} s; loss {r.first_loss:.4f} -> {r.last_loss:.4f}{val}"
    )
    typer.echo(f"wrote {done.path}")
    typer.echo(f"log {done.log}" + (f", plot {done.plot}" if done.plot is not None else ""))


@app.command()
def methods(
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Also each method's options (their 16-shot values)."),
    ] = False,
) -> None:
    """List the trainable methods, one line each."""
    from awt_engine.methods import get_method, method_summaries

    summaries = method_summaries()
    width = max(map(len, summaries))
    for name, summary in summaries.items():
        typer.echo(f"{name.ljust(width)}  {summary}")
        if verbose:
            import dataclasses

            spec = get_method(name)
            cfg = spec.default_config(16)  # the values a 16-shot run uses, as the line below
            for f in dataclasses.fields(spec.config):
                help_ = spec.options.get(f.name, "")
                value = getattr(cfg, f.name)
                typer.echo(f"{'':{width}}    --set {f.name}={value!r}  {help_}".rstrip())
            t = spec.train_defaults(16, None)
            warm = f"{t.warmup_epochs} ({t.warmup})"
            if t.warmup_iters:
                warm = f"{t.warmup_iters} iterations in {t.warmup_epochs} steps ({t.warmup})"
            typer.echo(
                f"{'':{width}}    training (16 shots): {t.optimizer} lr {t.lr:g}, batch {t.batch_size}, "
                f"{t.epochs} epochs, warm-up {warm}; {spec.paper}"
            )
            _say_presets(spec, width)


def _say_presets(spec, width: int) -> None:
    """One line per preset: ``--preset NAME`` and the options it sets, the default marked."""
    for name, values in spec.presets.items():
        mark = " (default)" if name == spec.default_preset else ""
        sets = " ".join(f"{k}={v!r}" for k, v in values.items()) or "(the defaults above)"
        typer.echo(f"{'':{width}}    --preset {name}{mark}: {sets}")


__all__ = ["methods", "train"]
