"""`awt-engine cache ...`: inspect, import and export the descriptions cache."""

from __future__ import annotations

import enum
import json
import statistics
import textwrap
from pathlib import Path
from typing import Annotated

import typer

from awt_engine._io import atomic_write_json, file_sha256, resolve_cache_root, utc_now
from awt_engine.cli._app import app
from awt_engine.cli._common import fail
from awt_engine.descriptions import (
    CacheLockTimeout,
    DescriptionSet,
    backup_descriptions,
    descriptions_path,
    export_cupl,
    from_plain,
    load_descriptions,
    locked,
    save_descriptions,
)
from awt_engine.registry import get_dataset

cache_app = typer.Typer(
    help="Inspect, import and export cached class descriptions.", no_args_is_help=True
)
app.add_typer(cache_app, name="cache")

CacheDir = Annotated[
    Path | None,
    typer.Option(file_okay=False, help="Cache root [default: $AWT_ENGINE_CACHE or ./cache]."),
]


class ExportFormat(enum.StrEnum):
    cupl = "cupl"  # {dataset: {class: [prompts]}}
    plain = "plain"  # {class: [descriptions]}
    awt = "awt"  # the cache's own format 1


def _locate(dataset: str, cache_dir: Path | None) -> Path:
    """A cached data set's file; a path to a .json file is taken as it is."""
    as_path = Path(dataset)
    if dataset.endswith(".json") and as_path.is_file():
        return as_path
    path = descriptions_path(dataset, resolve_cache_root(cache_dir))
    if not path.is_file():
        folder = path.parent
        have = sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
        raise FileNotFoundError(
            f"no descriptions cached for {dataset!r} ({path} does not exist); cached: "
            f"{', '.join(have) or 'none'}. Run `awt-engine describe` or `awt-engine cache import`."
        )
    return path


def _load(dataset: str, cache_dir: Path | None) -> tuple[Path, DescriptionSet]:
    path = _locate(dataset, cache_dir)
    return path, load_descriptions(path)


@cache_app.command("show")
def show(
    dataset: Annotated[str, typer.Argument(help="Cached data set name (or a .json file).")],
    samples: Annotated[int, typer.Option(min=0, help="Sample descriptions per class.")] = 1,
    cache_dir: CacheDir = None,
) -> None:
    """Classes, counts, provenance and a sample per class."""
    try:
        path, ds = _load(dataset, cache_dir)
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    counts = ds.counts()
    values = list(counts.values())
    missing = [c for c, n in counts.items() if n == 0]
    out = [
        f"dataset:      {ds.dataset}",
        f"file:         {path}",
        f"description:  {ds.dataset_description or '-'}",
        f"template:     {ds.template or '-'}",
        f"classes:      {len(ds.classes)} ({len(ds.classes) - len(missing)} described"
        + (
            f"; missing: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}"
            if missing
            else ""
        )
        + ")",
        f"descriptions: {sum(values)} in all; per class min {min(values)}, "
        f"median {statistics.median(values):g}, max {max(values)}",
        f"questions:    {len(ds.questions)}",
    ]
    out += [f"  {i}. {q}" for i, q in enumerate(ds.questions, 1)]
    prov = ds.provenance
    if prov:
        out.append("provenance:")
        for key in ("backend", "model", "source", "file", "created", "updated", "imported"):
            if key in prov:
                out.append(f"  {key}: {prov[key]}")
        if "sampling" in prov:
            out.append(f"  sampling: {json.dumps(prov['sampling'], sort_keys=True)}")
        for key in ("prompts_sha256", "sha256", "engine_version"):
            if key in prov:
                out.append(f"  {key}: {prov[key]}")
        if prov.get("history"):
            out.append(f"  history: {len(prov['history'])} earlier run(s)")
    else:
        out.append("provenance:   -")
    if samples:
        out.append(f"samples ({samples} per class):")
        for c in ds.classes:
            items = ds.descriptions.get(c, [])
            head = f"  {c} ({len(items)})"
            if not items:
                out.append(head + ": -")
                continue
            for j, d in enumerate(items[:samples]):
                lead = head + ": " if j == 0 else " " * (len(head) + 2)
                width = max(40, 160 - len(lead))
                out.append(lead + textwrap.shorten(d, width=width, placeholder=" ..."))
    typer.echo("\n".join(out))


@cache_app.command("list")
def list_cached(cache_dir: CacheDir = None) -> None:
    """Cached description sets with their class and description counts."""
    folder = resolve_cache_root(cache_dir) / "descriptions"
    files = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not files:
        typer.echo(f"no descriptions cached in {folder}")
        return
    for f in files:
        try:
            ds = load_descriptions(f)
        except ValueError as e:
            typer.echo(f"{f.stem}: DAMAGED ({e})")
            continue
        s = ds.count_summary()
        model = ds.provenance.get("model") or ds.provenance.get("source") or "-"
        typer.echo(
            f"{ds.dataset}: {len(ds.classes)} classes, {s['total']} descriptions "
            f"(min {s['min']}, median {s['median']:g}); {model}"
        )


@cache_app.command("export")
def export(
    dataset: Annotated[str, typer.Argument(help="Cached data set name (or a .json file).")],
    format: Annotated[
        ExportFormat,
        typer.Option(
            "--format", "-f", help="cupl: {dataset: {class: [prompts]}}; plain: {class: [...]}."
        ),
    ] = ExportFormat.cupl,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", dir_okay=False, help="Write here instead of stdout."),
    ] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Export a cached description set for other zero-shot tools."""
    try:
        _, ds = _load(dataset, cache_dir)
    except (ValueError, FileNotFoundError) as e:
        raise fail(str(e)) from None
    if format is ExportFormat.cupl:
        obj = export_cupl(ds)
    elif format is ExportFormat.plain:
        obj = export_cupl(ds)[ds.dataset]
    else:
        obj = ds.to_json()
    if output is None:
        typer.echo(json.dumps(obj, ensure_ascii=False, indent=2))
    else:
        atomic_write_json(output, obj)
        typer.echo(f"wrote {output}", err=True)


@cache_app.command("import")
def import_(
    file: Annotated[
        Path,
        typer.Argument(
            exists=True, dir_okay=False, readable=True, help="{class: [descriptions]} JSON file."
        ),
    ],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Cache name to import as.")],
    template: Annotated[
        str | None, typer.Option(help="CLIP template with one '{}' [default: registry's].")
    ] = None,
    dataset_description: Annotated[
        str | None, typer.Option(help="One line saying what the images are.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace an existing cache (old file kept as NAME.json.<UTC time>.bak)."
        ),
    ] = False,
    cache_dir: CacheDir = None,
) -> None:
    """Import a published description set (plain {class: [descriptions]} or format 1).

    For a registered data set the file's class names are matched to the registry's (case,
    '_' and '-' folded) and stored in label order; classes the file lacks can be filled later
    by `awt-engine describe`.
    """
    try:
        target = descriptions_path(dataset, resolve_cache_root(cache_dir))
        if target.exists() and not force:
            raise ValueError(
                f"{target} already exists; use --force to replace it (the old file is kept as "
                "a dated .bak beside it)"
            )
        ds, info = _imported_set(file, dataset, template, dataset_description)
        backup = None
        with locked(target):  # a describe run on this cache merges under the same lock
            if target.exists():
                if not force:  # created meanwhile by another process
                    raise ValueError(f"{target} already exists; use --force to replace it")
                backup = backup_descriptions(target)
            save_descriptions(ds, target)
    except (ValueError, FileNotFoundError, CacheLockTimeout) as e:
        raise fail(str(e)) from None
    _say_imported(file, dataset, ds, target, backup, registered=info is not None)


def _imported_set(file: Path, dataset: str, template, dataset_description):
    """The DescriptionSet a file imports as ``dataset`` (in the registry's label order for a
    registered data set), and the registry entry (None: not registered)."""
    source = load_descriptions(file)
    try:
        info = get_dataset(dataset)
    except (ValueError, ImportError, KeyError):
        info = None  # not a registered data set: the file's own class order is used
    classes = info.classes if info is not None and info.classes else None
    try:
        ds = from_plain(
            source.descriptions,
            dataset,
            template=template or source.template or (info.template if info else None),
            dataset_description=dataset_description
            or source.dataset_description
            or (info.description if info else None),
            classes=classes if classes is not None else source.classes,
        )
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    provenance = dict(source.provenance)
    provenance.update(
        {"source": "import", "file": str(file), "sha256": file_sha256(file), "imported": utc_now()}
    )
    imported = DescriptionSet(
        dataset=ds.dataset,
        classes=ds.classes,
        descriptions=ds.descriptions,
        template=ds.template,
        dataset_description=ds.dataset_description,
        questions=source.questions,
        provenance=provenance,
    )
    return imported, info


def _say_imported(file, dataset, ds, target, backup, *, registered: bool) -> None:
    """The import's summary on stdout, and notes on what it kept or lacks."""
    s = ds.count_summary()
    missing = [c for c, n in ds.counts().items() if n == 0]
    typer.echo(
        f"imported {file} as {dataset}: {len(ds.classes) - len(missing)}/{len(ds.classes)} "
        f"classes, {s['total']} descriptions (per class min {s['min']}, median {s['median']:g}) "
        f"-> {target}"
    )
    if backup is not None:
        typer.echo(f"note: the previous cache was kept as {backup}", err=True)
    if not registered:
        typer.echo(
            f"note: {dataset!r} is not a registered data set; label order is the file's", err=True
        )
    if missing:
        typer.echo(
            f"note: {len(missing)} class(es) have no descriptions ({', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''}); `awt-engine describe --dataset {dataset}` "
            "can fill them",
            err=True,
        )
