"""Helpers shared by the command modules: error reporting, exit codes, shared options.

Validation that needs no model happens here, before the heavy imports (torch, open_clip),
so a mistyped option is answered at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE = 0, 1, 2


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``message`` to stderr and return the Exit to raise."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def usage_errors(fn: Callable) -> Callable:
    """Turn ValueError (bad user input: unknown data set, missing file, ...) into exit 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValueError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:  # cannot write an output (full disk, read-only folder, ...)
            text = exc.strerror or str(exc)
            if exc.filename and str(exc.filename) not in text:
                text += f": {exc.filename}"
            raise fail(text) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
    "T": 1 << 40,
    "TB": 1 << 40,
}


def parse_size(text: str) -> int:
    """'512M', '2G', '1.5GB', '1048576' -> bytes; ValueError naming the value otherwise."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(
            f"cannot read size {text!r}: expected a number with K, M or G, e.g. 512M or 2G"
        )
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return value


# --------------------------------------------------------------------------------------
# Options shared by `classify` and `eval`: one definition each, so both read the same.

Dataset = Annotated[
    str | None,
    typer.Option(
        "--dataset", "-d", help="Registry data set (see `awt-engine datasets`) or cache name."
    ),
]
Classes = Annotated[
    str | None, typer.Option(help="Class names: a file with one per line, or a comma list.")
]
Template = Annotated[
    str | None, typer.Option(help='Prompt template with one "{}", e.g. "a photo of a {}".')
]
Model = Annotated[
    str | None,
    typer.Option(
        help="open_clip model name, local-dir:PATH or hf-hub:ORG/REPO "
        "[default: ViT-B-16-quickgelu, or the checkpoint's]."
    ),
]
Llm = Annotated[
    str | None,
    typer.Option(
        "--llm",
        help="The language model of LLaMP, CLAMP or eP-ALM: a hub id or a local folder "
        "[default: the method's, or the checkpoint's].",
    ),
]
Checkpoint = Annotated[
    Path | None,
    typer.Option(
        help="A trained method's checkpoint (awt-engine train); its classes and prompts are "
        "used unless --dataset/--classes name others.",
        exists=True,
        dir_okay=False,
    ),
]
Pretrained = Annotated[
    str | None,
    typer.Option(
        help='Pretrained tag or weights file; "none" for random weights '
        "[default: openai, or the --checkpoint's].",
        show_default=False,
    ),
]
# Training options shared by `train` and `fewshot`.
TrainModel = Annotated[
    str | None,
    typer.Option(
        help="Backbone: open_clip name, local-dir:PATH or hf-hub:ORG/REPO "
        "[default: ViT-B-16-quickgelu]."
    ),
]
TrainPretrained = Annotated[
    str, typer.Option(help='Pretrained tag or checkpoint file; "none" for random weights.')
]
Epochs = Annotated[
    int | None, typer.Option(min=1, help="[default: the paper's for the shot count]")
]
Lr = Annotated[float | None, typer.Option(help="Learning rate [default: the paper's].")]
TrainBatchSize = Annotated[
    int | None, typer.Option(min=1, help="Training images per step [default: the paper's].")
]
SetOptions = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override any method or training option: NAME=VALUE (repeatable; see "
        "`awt-engine methods --verbose`).",
    ),
]
Descriptions = Annotated[
    int | None,
    typer.Option(min=0, help="Descriptions per class [default: 50 with --dataset, else 0]."),
]
Views = Annotated[int, typer.Option(min=1, help="The image plus VIEWS-1 random crops.")]
Frames = Annotated[
    int,
    typer.Option(
        min=1,
        help="Frames sampled uniformly over each video: the middle one, the others, then "
        "crops of random frames make its VIEWS views.",
    ),
]
Seed = Annotated[int, typer.Option(help="Seed of the random crops (and of --limit's subset).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")]
Precision = Annotated[
    str | None,
    typer.Option(
        help="fp32, fp16, bf16, or int8 (CPU: the towers quantised, in ONNX Runtime) "
        "[default: fp16 on GPU, fp32 on CPU]."
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="CPU threads for the towers (torch and ONNX Runtime); with --ray, each CPU "
        "actor's threads and CPUs [default: the cores this process may use; Ray: a share "
        "of the cluster's CPUs].",
    ),
]


def use_threads(threads: int | None) -> int:
    """Set the CPU threads the towers run with (None: the cores this process may use)."""
    from awt_engine.backbone.devices import set_threads

    return set_threads(threads)


CacheDir = Annotated[
    Path | None,
    typer.Option(help="Cache root [default: $AWT_ENGINE_CACHE or ./cache].", file_okay=False),
]
BatchSize = Annotated[
    int, typer.Option(min=1, help="Images per forward pass (each contributes VIEWS views).")
]
Workers = Annotated[int, typer.Option(min=1, help="Image decoding threads.")]
Shortlist = Annotated[
    int | None,
    typer.Option(min=1, help="Score only each image's K nearest classes (large label sets)."),
]
MemoryBudget = Annotated[
    str | None,
    typer.Option(help="Scorer memory budget, e.g. 512M or 2G [default: 1G on CPU]."),
]


def weights_arg(pretrained: str | None, checkpoint: Path | None = None) -> str | None:
    """The weights ``--pretrained`` names (the CLI spells random weights "none"); when it
    is not given, the ones the ``--checkpoint`` was trained on (so ``--model`` alone never
    sends a checkpoint to the hub for other weights), else OpenAI's."""
    if pretrained is None:
        if checkpoint is None:
            return "openai"
        from awt_engine.checkpoints import read_checkpoint_header

        return read_checkpoint_header(checkpoint)["backbone"].get("pretrained")
    return None if pretrained.lower() == "none" else pretrained


# --------------------------------------------------------------------------------------
# Scorers and their hyper-parameters (classify, eval, explain)


def scorer_help(prefix: str = "", default: str = "awt") -> str:
    """The --scorer help: the registry's scorer names (AWT first), then the default."""
    from awt_engine.scorers import list_scorers  # names only: imports no torch

    return f"{prefix}{', '.join(list_scorers())} [default: {default}]."


def transport_scorer_help() -> str:
    """The scorers with an AWT transport plan (explain's choices), from the registry."""
    from awt_engine.scorers import get_scorer, list_scorers

    names = [n for n in list_scorers() if get_scorer(n).explains]
    return f"{', '.join(names[:-1])} or {names[-1]}." if len(names) > 1 else f"{names[0]}."


Eps = Annotated[
    float | None,
    typer.Option(help="Sinkhorn entropic regularisation eps [default: 0.1, the AWT paper's]."),
]
ViewTemperature = Annotated[
    float | None,
    typer.Option(help="Softmax temperature of the view weights [default: 0.5, the paper's]."),
]
PromptTemperature = Annotated[
    float | None,
    typer.Option(help="Softmax temperature of the prompt weights [default: 0.5, the paper's]."),
]
SinkhornTol = Annotated[
    float | None,
    typer.Option(help="Sinkhorn stops once mean |r - r_prev| < TOL [default: 0.01]."),
]
SinkhornIters = Annotated[
    int | None, typer.Option(help="Sinkhorn iterations at most [default: 100].")
]
Progress = Annotated[
    bool,
    typer.Option("--progress/--no-progress", help="Progress bars on stderr (on a terminal only)."),
]
MethodAlias = Annotated[
    list[str] | None,
    typer.Option("--method", "-m", hidden=True, help="Old name of --scorer (deprecated)."),
]


# --------------------------------------------------------------------------------------
# Ray (classify, eval): the same run on a Ray cluster's actor pool

UseRay = Annotated[
    bool,
    typer.Option(
        "--ray", help="Run on Ray Data actors (a local Ray instance unless --ray-address)."
    ),
]
RayAddress = Annotated[
    str | None,
    typer.Option(help="Ray cluster to join ('auto': the one running here); implies --ray."),
]
Concurrency = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="With --ray: actors in the pool [default: one per GPU for GPU actors; for CPU "
        "actors one per CPU but one, at most 8; at least 1].",
    ),
]
NumGpus = Annotated[
    float | None,
    typer.Option(
        min=0,
        help="With --ray: GPUs per actor [default: 1 when --device asks for CUDA or the "
        "cluster has GPUs, else 0].",
    ),
]


def awt_config(
    eps: float | None = None,
    view_temperature: float | None = None,
    prompt_temperature: float | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
):
    """The AWTConfig of the command-line options (defaults where not given); ValueError
    naming the bad value otherwise."""
    from awt_engine.scorers import AWTConfig

    given = {
        "eps": eps,
        "view_temperature": view_temperature,
        "prompt_temperature": prompt_temperature,
        "tol": tol,
        "max_iter": max_iter,
    }
    names = {"tol": "--sinkhorn-tol", "max_iter": "--sinkhorn-iters"}
    try:
        return AWTConfig(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        bad = next((k for k in given if k in str(exc)), None)
        flag = names.get(bad, f"--{bad.replace('_', '-')}") if bad else "option"
        raise ValueError(f"{flag}: {exc}") from None


def scorer_names(scorers: list[str] | None, methods: list[str] | None, default: str = "awt"):
    """The scorers asked for, with the old ``--method`` spelling accepted (and warned of)."""
    from awt_engine.scorers import get_scorer

    if methods:
        typer.echo(
            "warning: --method is now --scorer ('method' names the trainable methods); "
            "--method will be removed in the next release",
            err=True,
        )
    names = list(dict.fromkeys([*(scorers or []), *(methods or [])] or [default]))
    for n in names:
        get_scorer(n)  # ValueError listing the choices
    return names


def set_options(pairs: list[str] | None) -> dict[str, str]:
    """``--set NAME=VALUE`` pairs -> {name: value} (strings; the config reads them)."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r}: expected NAME=VALUE, e.g. --set n_ctx=4")
        out[key.strip()] = value.strip()
    return out


# The adaptations' names are written here (the help must not import torch); a test checks
# that this line names every registered adaptation.
ADAPT_NAMES = ("tda", "dota", "transclip")

Adapt = Annotated[
    str | None,
    typer.Option(
        "--adapt",
        help="Test-time adaptation on top of the scorer, learned from the images themselves "
        "(no labels): tda or dota (online: images are taken in the order given, each one "
        "updating the state the next is scored with), or transclip (transductive: every "
        "image first, then all scores at once). Options: --set; `awt-engine scorers "
        "--verbose` lists them.",
    ),
]
AdaptSet = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="An adaptation option NAME=VALUE (repeatable), e.g. --set pos_alpha=2.0.",
    ),
]


def adapt_settings(adapt: str | None, pairs: list[str] | None) -> dict:
    """``adapt`` and ``adapt_options`` for create_classifier, checked now (before any model
    loads): an unknown adaptation or option is a usage error naming it."""
    options = set_options(pairs)
    if adapt is None:
        if options:
            raise ValueError("--set sets an adaptation's options: give --adapt too")
        return {}
    from awt_engine.adapt import adapt_config

    adapt_config(adapt, options)  # ValueError naming the bad name or value
    return {"adapt": adapt, "adapt_options": options}
