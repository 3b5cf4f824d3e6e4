"""Training curves from a JSONL training log (:mod:`awt_engine.training.watch`) as a PNG.

Up to three panels sharing the x axis (epochs, fractional for step records): the loss
terms (each step record a faint line, each epoch's mean a line with markers), the
learning rate, and held-out top-1 when the log has any. matplotlib on the Agg backend
(:func:`awt_engine._plotting.pyplot`), loaded only here.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from awt_engine._plotting import plain, pyplot

_WHAT = "the training plot"


def plot_training(
    records: list[dict[str, Any]], path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Draw ``records`` (a log's, :func:`~awt_engine.training.watch.read_log`) into the PNG
    ``path``; ValueError when they hold no step or epoch record."""
    plt = pyplot(_WHAT)
    fig = training_figure(records, title=title)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


def plot_log(log: str | os.PathLike, path: str | os.PathLike) -> Path:
    """:func:`plot_training` of the JSONL log file ``log``."""
    from awt_engine.training.watch import read_log

    return plot_training(read_log(log), path)


def training_figure(records: list[dict[str, Any]], *, title: str | None = None):
    """The matplotlib figure; the caller closes it."""
    steps = [r for r in records if r.get("event") == "step"]
    epochs = [r for r in records if r.get("event") == "epoch"]
    if not steps and not epochs:
        raise ValueError("the training log holds no step or epoch record to draw")
    run = next((r for r in records if r.get("event") == "run"), {})
    S = _steps_per_epoch(run, epochs)
    vals = [(r["epoch"], r["val_accuracy"]) for r in epochs if r.get("val_accuracy") is not None]
    plt = pyplot(_WHAT)
    n = 3 if vals else 2
    fig, axes = plt.subplots(
        n, 1, figsize=(7.0, 2.4 * n + 0.6), sharex=True, constrained_layout=True
    )
    try:
        _losses(axes[0], steps, epochs, S)
        _lr(axes[1], steps, epochs, S)
        if vals:
            _val(axes[2], vals)
        axes[-1].set_xlabel("epoch")
        fig.suptitle(plain(title or _title(run, epochs)), fontsize=10)
    except Exception:
        plt.close(fig)
        raise
    return fig


def _steps_per_epoch(run: dict[str, Any], epochs: list[dict[str, Any]]) -> float:
    S = run.get("steps_per_epoch")
    if isinstance(S, int) and S > 0:
        return float(S)
    for r in epochs:  # no run record: from an epoch's global step
        if isinstance(r.get("step"), int) and r["step"] > 0:
            return r["step"] / r["epoch"]
    return 1.0


def _losses(ax, steps, epochs, S: float) -> None:
    terms: list[str] = []
    for r in steps + epochs:
        terms += [k for k in r.get("loss", {}) if k not in terms]
    same = [t for t in terms if t != "total" and _equal(steps + epochs, t, "total")]
    terms = [t for t in terms if t not in same]  # a lone term is the total: drawn once
    for i, term in enumerate(terms):
        colour = f"C{i}"
        label = f"{term} (= {', '.join(same)})" if term == "total" and same else term
        xs, ys = _series(steps, term, lambda r: r["step"] / S)
        if xs:
            ax.plot(xs, ys, color=colour, alpha=0.35, linewidth=0.9)
        xs, ys = _series(epochs, term, lambda r: float(r["epoch"]))
        if xs:
            ax.plot(xs, ys, color=colour, marker="o", markersize=3.5, linewidth=1.6)
        ax.plot([], [], color=colour, label=plain(label))  # one legend entry per term
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if terms:
        ax.legend(fontsize=8, loc="upper right", title="faint: steps, dots: epoch means",
                  title_fontsize=7)  # fmt: skip


def _equal(records, a: str, b: str) -> bool:
    return all(r.get("loss", {}).get(a) == r.get("loss", {}).get(b) for r in records)


def _series(records, term: str, x_of) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        y = r.get("loss", {}).get(term)
        if isinstance(y, (int, float)):  # null (not finite) is left out
            xs.append(x_of(r))
            ys.append(float(y))
    return xs, ys


def _lr(ax, steps, epochs, S: float) -> None:
    # each value holds over the steps up to its x (a record is written after its step)
    pts = sorted(
        [(r["step"] / S, r["lr"]) for r in steps if isinstance(r.get("lr"), (int, float))]
        + [(float(r["epoch"]), r["lr"]) for r in epochs if isinstance(r.get("lr"), (int, float))]
    )
    if pts:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, color="C7", marker=".", linewidth=1.2, drawstyle="steps-pre")
        lo, hi = min(p[1] for p in pts), max(p[1] for p in pts)
        if lo > 0 and hi / lo > 20:
            ax.set_yscale("log")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)


def _val(ax, vals: list[tuple[int, float]]) -> None:
    xs = [float(e) for e, _ in vals]
    ys = [100 * a for _, a in vals]
    ax.plot(xs, ys, color="C2", marker="s", markersize=4, linewidth=1.4)
    ax.annotate(
        f"{ys[-1]:.1f}%", (xs[-1], ys[-1]), textcoords="offset points", xytext=(-4, 6),
        ha="right", fontsize=8,
    )  # fmt: skip
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_ylim(max(0.0, min(ys) - 10), min(100.0, max(ys) + 10) + 1)
    ax.grid(alpha=0.3)


def _title(run: dict[str, Any], epochs: list[dict[str, Any]]) -> str:
    what = run.get("method", "training")
    done = max((r["epoch"] for r in epochs), default=0)
    parts = [f"{what}: {done}/{run.get('epochs', done)} epochs"]
    if run.get("images"):
        parts.append(f"{run['images']} images, batch {run.get('batch_size', '?')}")
    if epochs and isinstance(epochs[-1].get("loss", {}).get("total"), (int, float)):
        parts.append(f"last loss {epochs[-1]['loss']['total']:.4f}")
    return "; ".join(parts)
