"""The layers contract: awt_engine's import graph has no cycles and never imports upwards.

The graph is read from the source with ``ast``: every ``import`` and ``from ... import``,
at module level and inside functions (and under ``if TYPE_CHECKING``), relative imports
resolved. An import of ``a.b.c`` also runs the packages ``a.b`` above it, so those count
as imports too, except the importer's own parent packages (a submodule never imports
its package in any sense that could loop: Python has it initialised first).

:data:`LAYERS` lists the layers from the lowest to the highest. A module may import
modules of its own layer or of lower ones; an import of a higher layer's module is a
violation, and so is any cycle (counted per import, within a layer). Every module of the
package must belong to a layer: a new module is placed here when it is written.

Why this order (docs/design.md, section 1):

* foundation: file and progress helpers, the checksummed tensor file; the package root
  (its public names load lazily, through ``importlib``);
* names: the data set registry (its class names are data it ships, ImageNet's included),
  label sets and description caches, the checkpoint file format;
* interface: the model interface (``Embedder``, ``LogitModel``, ``PreprocessConfig``),
  which the backbone, the inputs and every model use;
* backbone: the only user of open_clip (``PreprocessConfig`` is the interface's);
* inputs: finding, decoding, videos, views, batches, labelled data sets and their layouts;
* scoring: the AWT computation and the scorers (torch only; no model);
* models: zero-shot CLIP, its text tower and layers, the LLMs, the trainable methods
  (their training settings in ``methods/train_config.py``: a method never imports
  training; the AWT adapter uses the AWT scorer);
* factory: ``models/factory.py``, which builds every model from a name or a checkpoint;
* caches: text and image embedding caches the run loop uses;
* api: the classifier, evaluation and explain (the run loop that serves them);
* training: it builds models through the factory and evaluates with the api;
* distributed: Ray over the api;
* describe: description generation (LLM backends);
* cli: the typer shell over everything.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

import awt_engine

PACKAGE = Path(awt_engine.__file__).resolve().parent
ROOT = "awt_engine"

# Lowest first. A pattern names a module, or with ".*" every module below a package.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        (
            "awt_engine",
            "awt_engine._io",
            "awt_engine._plotting",
            "awt_engine._progress",
            "awt_engine._tensorfile",
            "awt_engine.options",
        ),
    ),
    (
        "names",
        (
            "awt_engine.registry",
            "awt_engine.descriptions",
            "awt_engine.labels",
            "awt_engine.checkpoints",
        ),
    ),
    ("interface", ("awt_engine.models", "awt_engine.models.base")),
    ("backbone", ("awt_engine.backbone", "awt_engine.backbone.*")),
    (
        "inputs",
        (
            "awt_engine.inputs",
            "awt_engine.inputs.*",
            "awt_engine.labelled",
            "awt_engine.layouts",
            "awt_engine.layouts.*",
        ),
    ),
    (
        "scoring",
        (
            "awt_engine.transport",
            "awt_engine.weights",
            "awt_engine.scoring",
            "awt_engine.scoring.*",
            "awt_engine.scorers",
            "awt_engine.scorers.*",
            "awt_engine.shortlist",
            "awt_engine.calibration",
            "awt_engine.metrics",
            "awt_engine.adapt",
            "awt_engine.adapt.*",
        ),
    ),
    ("models", ("awt_engine.models.*", "awt_engine.methods", "awt_engine.methods.*")),
    ("factory", ("awt_engine.models.factory",)),
    ("caches", ("awt_engine.text_cache", "awt_engine.image_cache")),
    ("run", ("awt_engine.runner",)),
    (
        "api",
        (
            "awt_engine.classifier",
            "awt_engine.evaluate",
            "awt_engine.evaluate_adapted",
            "awt_engine.evaluate_ood",
            "awt_engine.explain",
            "awt_engine.reliability",
        ),
    ),
    ("training", ("awt_engine.training", "awt_engine.training.*")),
    ("distributed", ("awt_engine.ray_inputs", "awt_engine.distributed", "awt_engine.ray_eval")),
    (
        "protocols",
        (
            "awt_engine.dispatch",
            "awt_engine.protocols",
            "awt_engine.results_table",
            "awt_engine.eval_runs",
            "awt_engine.experiments",
        ),
    ),
    (
        "serve",
        (
            "awt_engine.serve",
            "awt_engine.serve.config",
            "awt_engine.serve.errors",
            "awt_engine.serve.batcher",
            "awt_engine.serve.labelsets",
            "awt_engine.serve.images",
            "awt_engine.serve.worker",
            "awt_engine.serve.service",
            "awt_engine.serve.http_io",
            "awt_engine.serve.metrics",
            "awt_engine.serve.app",
        ),
    ),
    ("describe", ("awt_engine.describe", "awt_engine.describe.*")),
    ("cli", ("awt_engine.cli", "awt_engine.cli.*")),
]

# Known violations that the other branches of issue 18 are removing (images <-> video,
# _layouts <-> labelled, scorers <-> scoring; classifier <-> explain). The lead empties
# this after the merge. Each entry must still occur: one that no longer does fails the
# test, so the list cannot go stale.
PENDING: set[str] = set()

MAX_LINES = 500
# Modules over MAX_LINES being split by the other branches of issue 18, with their
# present length as a ceiling: a listed module may only shrink, and one that fits fails
# the test until it is taken off the list. The lead empties this after the merge.
LONG_PENDING: dict[str, int] = {}


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package by its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _owner(name: str, known: dict[str, Path]) -> str | None:
    """The package module a dotted name lives in (``a.b.func`` -> ``a.b``)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """awt_engine modules ``name`` imports (explicitly, or as a package above one it
    imports), each with the line of its first import."""
    package = name if _is_package(path) else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append(sub if sub in known else base)
        for target in targets:
            if target.split(".")[0] != ROOT:
                continue
            owner = _owner(target, known)
            if owner is None:
                continue
            for hit in {owner} | (_ancestors(owner) - _ancestors(name)):
                if hit != name:
                    found[hit] = min(found.get(hit, node.lineno), node.lineno)
    return found


def layer_of(name: str) -> int | None:
    """Index in LAYERS of the most specific pattern naming ``name``."""
    best, best_len = None, -1
    for i, (_, patterns) in enumerate(LAYERS):
        for p in patterns:
            if fnmatchcase(name, p) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {n: imports_of(n, p, known) for n, p in known.items()}


def _cycle_edges(g: dict[str, dict[str, int]]) -> set[tuple[str, str]]:
    """Edges inside a strongly connected component (Tarjan): those on some cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comp: dict[str, int] = {}

    def visit(v: str) -> None:  # recursion is fine: the package has < 200 modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            while True:
                w = stack.pop()
                on.discard(w)
                comp[w] = index[v]
                if w == v:
                    break

    for v in g:
        if v not in index:
            visit(v)
    return {(a, b) for a in g for b in g[a] if comp[a] == comp[b]}


def violations(g: dict[str, dict[str, int]]) -> dict[str, str]:
    """``"a -> b"`` -> why, for every upward import and every import on a cycle."""
    out = {}
    for a, targets in g.items():
        for b, line in targets.items():
            la, lb = layer_of(a), layer_of(b)
            if la is not None and lb is not None and lb > la:
                out[f"{a} -> {b}"] = (
                    f"{a} (layer {LAYERS[la][0]}) imports {b} (layer {LAYERS[lb][0]}) "
                    f"at line {line}: a lower layer imports a higher one"
                )
    for a, b in _cycle_edges(g):
        out.setdefault(f"{a} -> {b}", f"{a} imports {b} at line {g[a][b]}, on an import cycle")
    return out


def test_every_module_has_a_layer():
    missing = sorted(n for n in modules() if layer_of(n) is None)
    assert not missing, f"place these modules in LAYERS (tests/test_layers.py): {missing}"


def test_no_cycles_and_no_upward_imports():
    found = violations(graph())
    new = {k: v for k, v in sorted(found.items()) if k not in PENDING}
    assert not new, "import violations:\n" + "\n".join(new.values())


def test_pending_violations_still_occur():
    gone = sorted(PENDING - set(violations(graph())))
    assert not gone, f"no longer violations: take them off PENDING in tests/test_layers.py: {gone}"


def test_the_graph_reader_sees_imports_inside_functions_and_relative_ones(tmp_path):
    known = {"awt_engine.x": tmp_path, "awt_engine.y": tmp_path, "awt_engine.p": tmp_path}
    known["awt_engine.p.q"] = tmp_path
    src = tmp_path / "x.py"
    src.write_text(
        "def f():\n    from . import y\n\ndef g():\n    import awt_engine.p.q as q\n",
        encoding="utf-8",
    )
    assert imports_of("awt_engine.x", src, known) == {
        "awt_engine.y": 2,
        "awt_engine.p.q": 5,
        "awt_engine.p": 5,
    }
    assert _cycle_edges({"a": {"b": 1}, "b": {"a": 1}, "c": {"a": 1}}) == {("a", "b"), ("b", "a")}


def test_no_module_is_too_long():
    lengths = {n: len(p.read_text(encoding="utf-8").splitlines()) for n, p in modules().items()}
    too_long = {n: k for n, k in lengths.items() if k > MAX_LINES}
    new = {n: k for n, k in too_long.items() if n not in LONG_PENDING}
    assert not new, f"modules over {MAX_LINES} lines: split them along their jobs: {new}"
    grew = {n: (k, LONG_PENDING[n]) for n, k in too_long.items() if k > LONG_PENDING.get(n, k)}
    assert not grew, f"listed long modules may only shrink (now, ceiling): {grew}"
    gone = sorted(n for n in LONG_PENDING if lengths.get(n, 0) <= MAX_LINES)
    assert not gone, f"these fit in {MAX_LINES} lines now: take them off LONG_PENDING: {gone}"
