"""Reliability diagrams: how often the top-1 class is right at each confidence.

:func:`reliability_bins` splits images into the equal-width bins of
:func:`awt_engine.calibration.ece` (bin b holds b/n < conf <= (b+1)/n, conf = 0 in bin 0)
and gives each bin's count, mean confidence and accuracy, so that
``sum_b count_b / N * |accuracy_b - conf_b|`` is that ECE.
:func:`save_reliability_diagram` draws them (matplotlib, the ``explain`` extra): accuracy
bars against the diagonal with the gap to each bin's mean confidence shaded, the count
of images per bin below, and N, ECE and adaptive ECE in the title.

Inputs are the CONF and CORRECT columns of :func:`awt_engine.calibration.image_terms`.

Axes: N images, K bins.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from awt_engine._io import atomic_write_bytes
from awt_engine._plotting import plain, pyplot
from awt_engine.calibration import N_BINS, bin_index, ece, ece_adaptive


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width confidence bins; a bin with no image has NaN mean confidence and
    accuracy."""

    edges: Tensor  # [K + 1] float64, 0 .. 1
    counts: Tensor  # [K] int64 images per bin
    conf: Tensor  # [K] float64 mean top-1 probability of the bin's images
    accuracy: Tensor  # [K] float64 fraction of them whose top-1 class is right

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def ece(self) -> float | None:
        """sum_b count_b / N * |accuracy_b - conf_b|; None when there is no image."""
        if self.n == 0:
            return None
        full = self.counts > 0
        gap = (self.accuracy[full] - self.conf[full]).abs()
        return float((self.counts[full].double() * gap).sum() / self.n)


def reliability_bins(conf: Tensor, correct: Tensor, n_bins: int = N_BINS) -> ReliabilityBins:
    """conf [N], correct [N] (1.0 right, 0.0 wrong) -> the ``n_bins`` equal-width bins."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, not {n_bins}")
    conf, correct = conf.double().flatten().cpu(), correct.double().flatten().cpu()
    K = n_bins
    b = bin_index(conf, K)  # [N]
    counts = torch.zeros(K, dtype=torch.int64).index_add_(0, b, torch.ones_like(b))
    conf_sum = torch.zeros(K, dtype=torch.float64).index_add_(0, b, conf)
    right = torch.zeros(K, dtype=torch.float64).index_add_(0, b, correct)
    denom = counts.double()  # an empty bin gives 0 / 0 = NaN
    return ReliabilityBins(
        edges=torch.linspace(0.0, 1.0, K + 1, dtype=torch.float64),
        counts=counts,
        conf=conf_sum / denom,
        accuracy=right / denom,
    )


def save_reliability_diagram(
    path: str | Path,
    conf: Tensor,
    correct: Tensor,
    *,
    title: str,
    n_bins: int = N_BINS,
    dpi: int = 110,
) -> Path:
    """Draw the reliability diagram of conf [N], correct [N] into the PNG ``path``
    (written atomically). An empty set draws empty axes that say "no images"."""
    path = Path(path)
    atomic_write_bytes(path, reliability_png(conf, correct, title=title, n_bins=n_bins, dpi=dpi))
    return path


def reliability_png(
    conf: Tensor, correct: Tensor, *, title: str, n_bins: int = N_BINS, dpi: int = 110
) -> bytes:
    """The PNG bytes of :func:`save_reliability_diagram`'s picture."""
    plt = pyplot("the reliability diagram")
    fig = reliability_figure(conf, correct, title=title, n_bins=n_bins)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buf.getvalue()


def reliability_figure(conf: Tensor, correct: Tensor, *, title: str, n_bins: int = N_BINS):
    """The matplotlib figure (two axes: the diagram, then images per bin); the caller
    closes it (``pyplot.close(fig)``)."""
    plt = pyplot("the reliability diagram")
    bins = reliability_bins(conf, correct, n_bins)
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(6.4, 7.2), sharex=True, height_ratios=[3, 1], constrained_layout=True
    )
    try:
        _draw_bars(top, bins)
        _draw_counts(bottom, bins)
        fig.suptitle(_caption(title, conf, correct, bins), fontsize=10)
    except BaseException:
        plt.close(fig)
        raise
    return fig


def _caption(title: str, conf: Tensor, correct: Tensor, bins: ReliabilityBins) -> str:
    K, N = bins.counts.numel(), bins.n
    if N == 0:
        return f"{plain(title)}\nN = 0: no images"
    acc = float(correct.double().mean())
    mean_conf = float(conf.double().mean())
    return (
        f"{plain(title)}\nN = {N}, accuracy {100 * acc:.1f}%, mean confidence "
        f"{100 * mean_conf:.1f}%\nECE ({K} equal-width bins) {100 * ece(conf, correct, K):.2f}%"
        f", adaptive ECE ({min(K, N)} equal-mass bins) "
        f"{100 * ece_adaptive(conf, correct, K):.2f}%"
    )


def _draw_bars(ax, bins: ReliabilityBins) -> None:
    """Accuracy bars, the gap to each bin's mean confidence hatched, the diagonal."""
    from matplotlib import patheffects

    left = bins.edges[:-1].numpy()
    width = float(bins.edges[1] - bins.edges[0])
    full = (bins.counts > 0).numpy()
    acc = bins.accuracy.nan_to_num(0.0).numpy()
    conf = bins.conf.nan_to_num(0.0).numpy()
    ax.plot([0, 1], [0, 1], ls="--", color="0.35", lw=1, label="perfect calibration", zorder=3)
    if full.any():
        ax.bar(
            left[full],
            acc[full],
            width,
            align="edge",
            color="#3b75af",
            lw=0.8,
            edgecolor="#1d3f63",
            label="accuracy of the bin",
            zorder=2,
        )
    _draw_gaps(ax, left, width, full, acc, conf)
    if full.any():
        outline = [patheffects.withStroke(linewidth=3.5, foreground="white")]
        ax.scatter(
            left[full] + width / 2,
            conf[full],
            marker="_",
            s=160,
            color="black",
            lw=1.6,
            label="mean confidence of the bin",
            zorder=4,
            path_effects=outline,
        )
    else:
        ax.text(
            0.5,
            0.62,
            "no images",
            ha="center",
            va="center",
            fontsize=14,
            color="0.3",
            transform=ax.transAxes,
            bbox={"facecolor": "white", "edgecolor": "0.6"},
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.005)
    ax.set_ylabel("accuracy (fraction of top-1 right, 0..1)")
    ax.grid(alpha=0.25, zorder=0)
    ax.legend(loc="best", fontsize=7.5, framealpha=0.9)


def _draw_gaps(ax, left, width, full, acc, conf) -> None:
    """The gap between each bin's accuracy and its mean confidence, hatched."""
    # the gap: red above an over-confident bin's bar, opaque amber over the top of an
    # under-confident one (a see-through colour over the blue bar reads as grey)
    for mask, colour, alpha, label in (
        (full & (acc < conf), "#d62728", 0.35, "over-confident: accuracy below confidence"),
        (full & (acc > conf), "#f5a623", 0.9, "under-confident: accuracy above confidence"),
    ):
        if mask.any():
            ax.bar(
                left[mask],
                (conf - acc)[mask],
                width,
                bottom=acc[mask],
                align="edge",
                color=colour,
                alpha=alpha,
                edgecolor="#7a1414",
                hatch="//",
                lw=0.6,
                label=label,
                zorder=2.5,
            )


def _draw_counts(ax, bins: ReliabilityBins) -> None:
    """Images per bin (the confidence histogram)."""
    from matplotlib.ticker import MaxNLocator

    left = bins.edges[:-1].numpy()
    width = float(bins.edges[1] - bins.edges[0])
    counts = bins.counts.numpy()
    ax.bar(left, counts, width, align="edge", color="0.55", edgecolor="0.25", lw=0.6)
    top = int(counts.max()) if counts.size else 0
    ax.set_ylim(0, max(1, math.ceil(top * 1.15)))
    if bins.n == 0:
        ax.text(
            0.5, 0.5, "no images", ha="center", va="center", color="0.4", transform=ax.transAxes
        )
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.set_xlim(0, 1)
    ax.set_xlabel("confidence (top-1 softmax probability, 0..1)")
    ax.set_ylabel("images")
    ax.grid(alpha=0.25, axis="y", zorder=0)


def write_reliability_plots(result, folder: str | Path, *, part: str = "all") -> list[Path]:
    """One reliability diagram per scorer of an :class:`~awt_engine.evaluate.EvalResult`
    (an online adaptation's: its first order's run), as
    ``<folder>/reliability__<dataset>__<scorer>__<part>.png``; the paths written."""
    from awt_engine.calibration import CONF, CORRECT
    from awt_engine.evaluate import _slug

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(f"cannot create --plots folder {folder}: {exc.strerror or exc}") from None
    paths = []
    for name, terms in result.terms.items():
        path = folder / f"reliability__{_slug(result.dataset)}__{_slug(name)}__{part}.png"
        title = f"{result.dataset} ({part} classes): {name}"
        runs = getattr(result, "runs", {}).get(name)
        if runs and runs[0].seed is not None:  # an online adaptation: its first order
            title += f", order seed {runs[0].seed} of {len(runs)}"
        save_reliability_diagram(path, terms[:, CONF], terms[:, CORRECT], title=title)
        paths.append(path)
    return paths
