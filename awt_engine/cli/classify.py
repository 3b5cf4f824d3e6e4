"""`awt-engine classify`: images in, one line per image out (and an optional file)."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from awt_engine.cli._app import app
from awt_engine.cli._common import (
    EXIT_OK,
    EXIT_PARTIAL,
    Adapt,
    AdaptSet,
    BatchSize,
    CacheDir,
    Checkpoint,
    Classes,
    Concurrency,
    Dataset,
    Descriptions,
    Device,
    Eps,
    Frames,
    Llm,
    MemoryBudget,
    MethodAlias,
    Model,
    NumGpus,
    Precision,
    Pretrained,
    Progress,
    PromptTemperature,
    RayAddress,
    Seed,
    Shortlist,
    SinkhornIters,
    SinkhornTol,
    Template,
    Threads,
    UseRay,
    Views,
    ViewTemperature,
    Workers,
    adapt_settings,
    awt_config,
    fail,
    parse_size,
    scorer_help,
    scorer_names,
    usage_errors,
    use_threads,
    weights_arg,
)

OUTPUT_FORMATS = (".jsonl", ".csv", ".parquet")


@app.command()
@usage_errors
def classify(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Image or video files, folders (searched recursively) or globs.",
            show_default=False,
        ),
    ],
    dataset: Dataset = None,
    classes: Classes = None,
    template: Template = None,
    model: Model = None,
    checkpoint: Checkpoint = None,
    llm: Llm = None,
    pretrained: Pretrained = None,
    descriptions: Descriptions = None,
    views: Views = 51,
    frames: Frames = 8,
    seed: Seed = 0,
    scorer: Annotated[
        str | None,
        typer.Option(
            "--scorer",
            "-s",
            help=scorer_help(),
        ),
    ] = None,
    method: MethodAlias = None,
    adapt: Adapt = None,
    set_: AdaptSet = None,
    device: Device = "auto",
    cache_dir: CacheDir = None,
    batch_size: BatchSize = 4,
    workers: Workers = 2,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Write the top-k predictions to a .jsonl, .csv or .parquet file ('-': JSONL "
            "on stdout).",
            dir_okay=False,
        ),
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="Predictions kept per image in --output.")] = 5,
    shortlist: Shortlist = None,
    memory_budget: MemoryBudget = None,
    precision: Precision = None,
    threads: Threads = None,
    eps: Eps = None,
    view_temperature: ViewTemperature = None,
    prompt_temperature: PromptTemperature = None,
    sinkhorn_tol: SinkhornTol = None,
    sinkhorn_iters: SinkhornIters = None,
    progress: Progress = True,
    ray: UseRay = False,
    ray_address: RayAddress = None,
    concurrency: Concurrency = None,
    num_gpus: NumGpus = None,
) -> None:
    """Classify images (and videos); one line per input on stdout: path, label, probability.

    With --ray the images are classified by a pool of Ray Data actors (inputs may then
    also be s3:// or gs:// prefixes); the lines and rows are the local run's.

    With --adapt tda or dota the inputs are processed in the order given (folders sorted,
    then the rest as listed), each image updating the state the next one is scored
    with: the same images in another order give other scores. With --adapt transclip
    nothing is written until every input has been read, then all rows at once.

    Exit 0: every input was classified; 1: some could not be read, or gave scores that
    are not finite numbers (each named on stderr and as an error row); 2: a usage error or
    an output that cannot be written.
    """
    from awt_engine.inputs.files import find_images

    # Everything that needs no model is checked first: a typo is answered at once.
    (scorer_name,) = _one_scorer(scorer, method)
    adapting = adapt_settings(adapt, set_)
    config = awt_config(eps, view_temperature, prompt_temperature, sinkhorn_tol, sinkhorn_iters)
    to_stdout = _check_output(output)
    if classes is None and dataset is None and checkpoint is None:
        raise fail("say what the classes are: --dataset NAME, --classes LIST or --checkpoint")
    budget = parse_size(memory_budget) if memory_budget else None
    use_ray = ray or ray_address is not None
    if use_ray and adapting:
        raise fail(
            "--adapt with --ray: classify streams rows from many actors, and an adaptation "
            "needs one ordered stream (tda, dota) or every image before any row (transclip); "
            "run it without --ray (eval --ray gathers the images and adapts once)"
        )
    remote = [i for i in inputs if use_ray and _is_uri(i)]
    found = (
        find_images([i for i in inputs if i not in remote]) if len(remote) < len(inputs) else None
    )
    paths = found.images if found else []
    unreadable = found.unreadable if found else []

    from awt_engine.dispatch import ModelSource, RayOptions, classify_stream

    use_threads(threads)

    source = ModelSource(
        model, weights_arg(pretrained, checkpoint), checkpoint, llm, device, precision
    )
    options = dict(
        dataset=dataset,
        classes=classes,
        template=template,
        descriptions=descriptions,
        views=views,
        frames=frames,
        seed=seed,
        scorer=scorer_name,
        cache_dir=cache_dir,
        batch_size=batch_size,
        workers=workers,
        shortlist=shortlist,
        memory_budget=budget,
        awt_config=config,
        **adapting,
    )
    predictions = classify_stream(
        [*map(str, paths), *remote] if use_ray else paths,
        source,
        options,
        top_k=top_k,
        ray=RayOptions(ray_address, concurrency, num_gpus, threads) if use_ray else None,
        progress=progress,
        total=None if remote else len(paths),
    )
    _write_predictions(predictions, unreadable, output, to_stdout)


def _check_output(output: Path | None) -> bool:
    """Whether --output is '-' (JSONL on stdout); a usage error for a format it cannot write."""
    to_stdout = output is not None and str(output) == "-"
    if output is not None and not to_stdout and output.suffix.lower() not in OUTPUT_FORMATS:
        raise fail(
            f"--output {output}: unknown format {output.suffix or '(none)'!r}; use a "
            f"file ending in {' or '.join(OUTPUT_FORMATS)}, or - for JSONL on stdout"
        )
    if output is not None and output.suffix.lower() == ".parquet":
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            raise fail(
                f"--output {output}: Parquet output needs pyarrow: uv sync --extra ray (or "
                "pip install pyarrow)"
            )
    return to_stdout


def _write_predictions(predictions, unreadable, output, to_stdout) -> None:
    """Each row to --output (and its line to stdout or stderr), then the exit code."""
    from awt_engine.classifier import Prediction

    n_failed = n_inputs = 0
    with _Writer(output) as writer:
        for folder in unreadable:  # an error row each, as for an unreadable file
            pred = Prediction(folder.path, None, folder.reason)
            writer.write(pred)
            typer.echo(f"error: {escape_field(pred.path)}: {escape_field(pred.error)}", err=True)
        for pred in predictions:
            n_inputs += 1
            pred = _finite_or_error(pred)
            writer.write(pred)
            if pred.ok:
                if not to_stdout:
                    best = pred.predictions[0]
                    fields = (escape_field(pred.path), escape_field(best["label"]))
                    typer.echo(f"{fields[0]}\t{fields[1]}\t{best['score']:.4f}")
            else:
                n_failed += 1
                typer.echo(
                    f"error: {escape_field(pred.path)}: {escape_field(pred.error)}", err=True
                )
    if n_failed:
        # inputs, not images: a video is one input (one row), whatever its frames
        typer.echo(f"{n_failed} of {n_inputs} input(s) could not be classified", err=True)
    if unreadable:
        typer.echo(f"{len(unreadable)} folder(s) could not be read", err=True)
    if n_failed or unreadable:
        raise typer.Exit(EXIT_PARTIAL)
    raise typer.Exit(EXIT_OK)


_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def _finite_or_error(pred):
    """``pred``, or its error row when a score is not a finite number: whatever made the
    predictions (a local run, a Ray pool), no output file holds a NaN."""
    import math

    from awt_engine.classifier import NONFINITE_REASON, Prediction

    if pred.ok and not all(math.isfinite(p["score"]) for p in pred.predictions):
        return Prediction(pred.path, None, NONFINITE_REASON)
    return pred


def _is_uri(text: str) -> bool:
    return bool(_URI.match(text))


def _one_scorer(scorer: str | None, method: list[str] | None) -> list[str]:
    names = scorer_names([scorer] if scorer else None, method)
    if len(names) != 1:
        raise ValueError(f"classify takes one scorer, got {', '.join(names)} (eval takes many)")
    return names


# stdout/stderr: one image per line, tab-separated, whatever its name holds (README
# "Output"). \xXX always stands for the byte XX of the name, so the escaped text maps back
# to the exact bytes: undecodable bytes arrive from os.fsdecode as U+DC80..U+DCFF.
_ESCAPE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHORT_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape_char(match: re.Match) -> str:
    char = match.group()
    code = ord(char)
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if code < 0x80:  # other control characters: their byte
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte of the name: that byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"  # C1 controls, line/paragraph separators, other lone surrogates


def escape_field(text: str) -> str:
    """``text`` as one printable, tab-free line (README "Output" gives the rules)."""
    return _ESCAPE.sub(_escape_char, text)


# Lone surrogates other than surrogateescape's (not from os.fsdecode on POSIX; possible in
# Windows names): no byte to write them as, so a \uXXXX escape in the CSV.
_OTHER_SURROGATES = re.compile("[\ud800-\udc7f\udd00-\udfff]")
_SURROGATES = re.compile("[\ud800-\udfff]")


def _json_line(row: dict) -> str:
    """One JSON object, UTF-8 text, with lone surrogates as JSON \\uXXXX escapes (lossless:
    json.loads gives the same str back, os.fsencode the file name's bytes)."""
    text = json.dumps(row, ensure_ascii=False, allow_nan=False)  # NaN is not JSON
    return _SURROGATES.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _csv_text(text: str) -> str:
    return _OTHER_SURROGATES.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


class _Writer:
    """Streams rows to the output file as they come, so an interrupted run keeps them."""

    def __init__(self, path: Path | None):
        self.path = path
        self.f = None

    def __enter__(self):
        if self.path is not None and str(self.path) == "-":  # JSONL rows on stdout
            self.path, self.f, self._close = Path("<stdout>.jsonl"), sys.stdout, False
        elif self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._close = True
            suffix = self.path.suffix.lower()
            if suffix == ".parquet":
                self.f = _ParquetRows(self.path)
                return self
            # Undecodable bytes of a file name are written as those bytes (CSV; see README)
            self.f = open(self.path, "w", encoding="utf-8", errors="surrogateescape", newline="")
            if suffix == ".csv":
                self.csv = csv.writer(self.f)
                self.csv.writerow(["path", "rank", "label", "score", "error"])
        return self

    def write(self, pred) -> None:
        if self.f is None:
            return
        try:
            self._write(pred)
            self.f.flush()
        except OSError as exc:  # a full disk, a vanished mount: stop, naming the file
            raise OSError(
                exc.errno, f"cannot write predictions to {self.path}: {exc.strerror or exc}"
            ) from None

    def _write(self, pred) -> None:
        if isinstance(self.f, _ParquetRows):
            self.f.add(pred)
        elif self.path.suffix.lower() == ".jsonl":
            row = (
                {"path": pred.path, "predictions": pred.predictions}
                if pred.ok
                else {"path": pred.path, "error": pred.error}
            )
            self.f.write(_json_line(row) + "\n")
        elif pred.ok:
            path = _csv_text(pred.path)
            for rank, p in enumerate(pred.predictions, start=1):
                self.csv.writerow([path, rank, _csv_text(p["label"]), f"{p['score']:.6g}", ""])
        else:
            self.csv.writerow([_csv_text(pred.path), "", "", "", _csv_text(pred.error)])

    def __exit__(self, *exc):
        if self.f is not None and self._close:
            try:
                self.f.close()
            except OSError:
                if exc[0] is None:  # the error of an earlier write is the one to report
                    raise


class _ParquetRows:
    """Predictions as a Parquet file: one row per image, ``path, labels, scores, error``
    (classify_dataset's rows), written in row groups as they come; closed (a valid file
    with every row so far) also when the run stops early. Needs pyarrow (in the ray
    extra)."""

    GROUP = 4096  # rows per row group

    def __init__(self, path: Path):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                f"--output {path}: Parquet output needs pyarrow: uv sync --extra ray (or "
                "pip install pyarrow)"
            ) from None
        self.pa = pa
        self.schema = pa.schema(
            [
                ("path", pa.string()),
                ("labels", pa.list_(pa.string())),
                ("scores", pa.list_(pa.float64())),
                ("error", pa.string()),
            ]
        )
        self.writer = pq.ParquetWriter(str(path), self.schema)
        self.rows: list[dict] = []

    def add(self, pred) -> None:
        ok = pred.ok
        self.rows.append(
            {
                # undecodable bytes of a name as \xXX (Parquet strings are UTF-8)
                "path": _utf8(pred.path),
                "labels": [_utf8(p["label"]) for p in pred.predictions] if ok else [],
                "scores": [float(p["score"]) for p in pred.predictions] if ok else [],
                "error": None if ok else _utf8(pred.error),
            }
        )
        if len(self.rows) >= self.GROUP:
            self._write_group()

    def flush(self) -> None:
        """Rows are written a row group at a time (one per row would bloat the file)."""

    def _write_group(self) -> None:
        if self.rows:
            self.writer.write_table(self.pa.Table.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self._write_group()
        self.writer.close()


def _utf8(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


__all__ = ["classify"]
