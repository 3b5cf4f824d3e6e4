"""`awt-engine describe`: LLM descriptions for every class, into the descriptions cache."""

from __future__ import annotations

import enum
import math
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from awt_engine.cli._app import app
from awt_engine.cli._common import EXIT_PARTIAL, Progress, fail

# CLIP's generic prompt, for a custom class list given without --template.
DEFAULT_TEMPLATE = "a photo of a {}"


EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # 128 + the signal's number, as shells report it


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same saving runs."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def sigterm_as_interrupt() -> Callable[[], None]:
    """From now on SIGTERM raises :class:`Terminated` (so finished classes are saved); returns
    the function that puts the previous handler back."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except (ValueError, OSError, AttributeError):  # not the main thread, or no SIGTERM
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


def finite(value: float | None) -> float | None:
    """Typer callback: refuse inf and nan (the ranges are checked by min/max)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


class BackendName(enum.StrEnum):
    vllm = "vllm"
    transformers = "transformers"
    openai = "openai"


def resolve_task(
    dataset: str | None,
    classes: str | None,
    name: str | None,
    dataset_description: str | None,
    template: str | None,
):
    """The DescribeTask from the registry and/or the explicit options (options win)."""
    from awt_engine.describe import DescribeTask

    if dataset is None and classes is None:
        raise ValueError(
            "give --dataset NAME (a registered data set) or --classes FILE_OR_LIST with --name "
            "and --dataset-description"
        )
    from awt_engine import registry

    info = registry.get_dataset(dataset) if dataset is not None else None
    if classes is not None:
        class_list = list(registry.read_class_list(classes))
    elif info is not None and info.classes:
        class_list = list(info.classes)
    else:
        raise ValueError(
            f"data set {dataset!r} has no built-in class list; give --classes FILE "
            "(one class name per line) or a comma-separated list"
        )
    cache_name = name or (info.name if info is not None else None)
    if not cache_name:
        raise ValueError("--classes without --dataset needs --name (the cache's name)")
    description = dataset_description or (info.description if info is not None else None)
    if template is None:
        template = info.template if info is not None else DEFAULT_TEMPLATE
    return DescribeTask(cache_name, tuple(class_list), description, template)


def interrupted_message(path: str, per_class: int, force: bool) -> str:
    """What an interrupted run saved (read back from the file) and how to go on."""
    from awt_engine.describe.storage import saved_state

    state, resumable = saved_state(path, per_class)
    if not resumable:
        return f"{state}; run the same command again to start"
    return f"{state}; run the same command again{' without --force' if force else ''} to resume"


@app.command("describe")
def describe(
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset", "-d", help="Registered data set: gives classes, template, description."
        ),
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(help="Class list: a file with one name per line, or 'a,b,c'."),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Cache name (default: the --dataset name).")
    ] = None,
    dataset_description: Annotated[
        str | None,
        typer.Option(help="One line saying what the images are (the questions are made for it)."),
    ] = None,
    template: Annotated[
        str | None, typer.Option(help="CLIP prompt template with one '{}' for the class.")
    ] = None,
    backend: Annotated[
        BackendName | None,
        typer.Option(
            help="LLM backend [default: vllm with a GPU and vllm installed, else transformers]."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Model: hub id or folder (vllm, transformers), served name (openai)."),
    ] = None,
    base_url: Annotated[
        str | None, typer.Option(help="openai: endpoint base URL, e.g. http://localhost:8000/v1.")
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help="openai: environment variable holding the API key [default: OPENAI_API_KEY if set]."
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="openai: parallel requests.")] = 16,
    timeout: Annotated[
        float,
        typer.Option(
            min=0.1, callback=finite, help="openai: seconds per request, whole answer included."
        ),
    ] = 120.0,
    max_retries: Annotated[int, typer.Option(min=0, help="openai: retries per request.")] = 5,
    max_answer_mib: Annotated[
        float,
        typer.Option(
            min=0.001,
            callback=finite,
            help="openai: largest answer accepted, in MiB (a larger one is retried, then that "
            "request is given up).",
        ),
    ] = 4.0,
    device: Annotated[
        str | None,
        typer.Option(
            help="transformers: torch device [default: cuda if present]; vllm: cuda or cuda:N."
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="vllm/transformers: weight dtype.")] = "auto",
    batch_size: Annotated[
        int, typer.Option(min=1, help="transformers: conversations per batch.")
    ] = 16,
    tensor_parallel_size: Annotated[int, typer.Option(min=1, help="vllm: GPUs.")] = 1,
    max_model_len: Annotated[int, typer.Option(min=256, help="vllm: context length.")] = 4096,
    gpu_memory_utilization: Annotated[
        float,
        typer.Option(
            min=0.01,
            max=1.0,
            callback=finite,
            help="vllm: share of the GPU's memory it may take; lower it to share the GPU "
            "(e.g. 0.75 beside CLIP).",
        ),
    ] = 0.9,
    per_class: Annotated[int, typer.Option(min=1, help="Descriptions per class.")] = 50,
    questions: Annotated[int, typer.Option(min=1, help="Questions to ask for.")] = 10,
    max_rounds: Annotated[int, typer.Option(min=1, help="Description rounds at most.")] = 4,
    max_tokens: Annotated[int, typer.Option(min=16, help="Tokens per answer at most.")] = 512,
    temperature: Annotated[
        float, typer.Option(min=0.0, callback=finite, help="Sampling temperature.")
    ] = 0.8,
    top_p: Annotated[
        float, typer.Option(min=0.01, max=1.0, callback=finite, help="Nucleus sampling mass.")
    ] = 0.95,
    seed: Annotated[int, typer.Option(help="Base seed; each request derives its own.")] = 0,
    samples: Annotated[int, typer.Option(min=1, help="Samples per request (n).")] = 1,
    instructions_dir: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            file_okay=False,
            help="Read the LLM instruction texts from this folder (edited copies).",
        ),
    ] = None,
    save_every: Annotated[
        float,
        typer.Option(
            min=0.01,
            callback=finite,
            help="Seconds within which a finished class is written to the cache.",
        ),
    ] = 2.0,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Regenerate everything (old file kept as NAME.json.<UTC time>.bak)."
        ),
    ] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(file_okay=False, help="Cache root [default: $AWT_ENGINE_CACHE or ./cache]."),
    ] = None,
    progress: Progress = True,
) -> None:
    """Ask an LLM for dataset-aware descriptions of every class and cache them.

    Resumable: run the same command again after an interruption and only what is missing is
    requested; runs in parallel on one cache share it (each skips what the other saved).
    Exit 0: every class has --per-class descriptions; 1: some are short (named in the
    summary; running again tops them up); 2: bad input or the LLM failed; 130: Ctrl-C;
    143: SIGTERM (finished classes are saved in both cases, and the message says how many).
    """
    from awt_engine.describe import DescribeError, InstructionSet, describe_classes, make_backend
    from awt_engine.descriptions import CacheLockTimeout

    llm = None
    path_hint = ""
    restore_sigterm = sigterm_as_interrupt()
    try:
        task = resolve_task(dataset, classes, name, dataset_description, template)
        config = _describe_config(
            per_class,
            questions,
            max_rounds,
            save_every,
            max_tokens,
            temperature,
            top_p,
            seed,
            samples,
        )
        spec = _backend_spec(
            backend=backend,
            model=model,
            base_url=base_url,
            api_key_env=api_key_env,
            concurrency=concurrency,
            timeout=timeout,
            max_retries=max_retries,
            max_answer_mib=max_answer_mib,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            progress=progress,
        )
        prompts = InstructionSet.load(instructions_dir)
        llm = make_backend(spec, seed=seed)
        path_hint = _cache_file(task, cache_dir)
        result = describe_classes(
            task,
            llm,
            config,
            cache_root=cache_dir,
            force=force,
            progress=progress,
            prompts=prompts,
        )
    except KeyboardInterrupt as e:
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        typer.echo(f"{what}: {interrupted_message(path_hint, per_class, force)}", err=True)
        raise typer.Exit(EXIT_SIGTERM if isinstance(e, Terminated) else EXIT_SIGINT) from None
    except (ValueError, DescribeError, FileNotFoundError, CacheLockTimeout) as e:
        raise fail(str(e)) from None
    finally:
        restore_sigterm()
        if llm is not None:
            llm.close()
    _report(result, task.dataset, per_class)


def _describe_config(
    per_class, questions, max_rounds, save_every, max_tokens, temperature, top_p, seed, samples
):
    """The DescribeConfig of the options (ValueError naming a bad one)."""
    from awt_engine.describe import DescribeConfig, SamplingConfig

    sampling = SamplingConfig(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, n=samples
    )
    return DescribeConfig(
        per_class=per_class,
        num_questions=questions,
        max_rounds=max_rounds,
        sampling=sampling,
        save_every_s=save_every,
    )


def _backend_spec(*, backend, timeout, max_answer_mib, **options):
    """The BackendSpec of the LLM options (the CLI's names, mapped to the spec's)."""
    from awt_engine.describe import BackendSpec

    return BackendSpec(
        name=backend.value if backend is not None else None,
        timeout_s=timeout,
        max_answer_bytes=max(1024, round(max_answer_mib * 2**20)),
        **options,
    )


def _cache_file(task, cache_dir) -> str:
    """The description file the run writes (named when it is interrupted)."""
    from awt_engine._io import resolve_cache_root
    from awt_engine.descriptions import descriptions_path

    return str(descriptions_path(task.dataset, resolve_cache_root(cache_dir)))


def _report(result, dataset: str, per_class: int) -> None:
    """Notes on stderr, the summary on stdout; exit 1 when some classes are short."""
    for note in result.notes:
        typer.echo(f"note: {note}", err=True)
    if not result.generated and not result.questions_generated:
        typer.echo(f"{dataset}: nothing to do, every class has >= {per_class} descriptions")
    typer.echo(result.summary())
    sys.stdout.flush()
    if result.short:  # like classify: finished, but not everything asked for (exit 1)
        raise typer.Exit(EXIT_PARTIAL)
