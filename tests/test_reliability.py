"""Reliability bins and diagrams (awt_engine.reliability) against a plain-loop reference,
the drawn figure's bars against the bins, and the PNG file (atomic, empty set, one bin,
matplotlib missing)."""

import ast
import builtins
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from awt_engine import _plotting
from awt_engine.calibration import ece, ece_adaptive
from awt_engine.reliability import (
    reliability_bins,
    reliability_figure,
    save_reliability_diagram,
)

# -- reference: a plain loop over images and bins -----------------------------------------


def ref_bins(conf, correct, n_bins):
    """[(count, mean conf, accuracy)] per bin; bin b holds b/n < conf <= (b+1)/n, and bin
    0 also conf <= 0 (calibration.ece's bins); an empty bin (0, None, None)."""
    members = [[] for _ in range(n_bins)]
    for c, ok in zip(conf, correct, strict=True):
        for b in range(n_bins):
            inside = b < c * n_bins <= b + 1
            if inside or (b == 0 and c * n_bins <= 0) or (b == n_bins - 1 and c * n_bins > n_bins):
                members[b].append((c, ok))
                break
    out = []
    for m in members:
        if not m:
            out.append((0, None, None))
        else:
            out.append((len(m), sum(c for c, _ in m) / len(m), sum(o for _, o in m) / len(m)))
    return out


def check_bins(conf, correct, n_bins):
    conf, correct = torch.as_tensor(conf), torch.as_tensor(correct)
    got = reliability_bins(conf, correct, n_bins)
    want = ref_bins(conf.double().tolist(), correct.double().tolist(), n_bins)
    assert got.edges.tolist() == pytest.approx([b / n_bins for b in range(n_bins + 1)])
    for b, (count, mean_conf, acc) in enumerate(want):
        assert int(got.counts[b]) == count, b
        if count == 0:
            assert math.isnan(got.conf[b]) and math.isnan(got.accuracy[b])
        else:
            assert float(got.conf[b]) == pytest.approx(mean_conf, rel=1e-12)
            assert float(got.accuracy[b]) == pytest.approx(acc, rel=1e-12)
    if len(conf):
        assert got.ece() == pytest.approx(ece(conf, correct, n_bins), rel=1e-9, abs=1e-15)
    return got


def test_bins_match_the_loop_and_their_ece_is_calibration_ece():
    gen = torch.Generator().manual_seed(0)
    for n, n_bins in [(1, 15), (14, 15), (200, 15), (97, 10), (50, 1), (33, 4)]:
        conf = torch.rand(n, generator=gen, dtype=torch.float64)
        correct = (torch.rand(n, generator=gen, dtype=torch.float64) < conf).double()
        check_bins(conf, correct, n_bins)
    # float32 confidences as image_terms gives them
    check_bins(torch.rand(80, generator=gen), torch.randint(0, 2, (80,), generator=gen), 15)


def test_bin_edges_belong_to_the_lower_bin():
    n = 15
    # 0 in bin 0, b/n (b >= 1) in bin b - 1 (in float64, (b / 15) * 15 == b for these)
    edges = torch.arange(n + 1, dtype=torch.float64) / n
    got = check_bins(edges, torch.ones(n + 1), n)
    assert got.counts.tolist() == [2] + [1] * (n - 1)
    check_bins([0.0, 0.0, 1.0, 1.0, 0.5], [0, 1, 1, 1, 0], n)


def test_empty_set_has_no_ece():
    got = check_bins(torch.empty(0), torch.empty(0), 15)
    assert got.n == 0 and got.ece() is None
    with pytest.raises(ValueError, match="n_bins"):
        reliability_bins(torch.rand(3), torch.ones(3), 0)


# -- the figure: what is drawn is the bins ------------------------------------------------


def bars(ax, label):
    found = [c for c in ax.containers if c.get_label() == label]
    return found[0].patches if found else []


def test_figure_draws_the_bins_and_the_metrics():
    plt = pytest.importorskip("matplotlib.pyplot")
    conf = torch.tensor([0.95, 0.92, 0.91, 0.55, 0.52, 0.3, 0.05])
    correct = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    fig = reliability_figure(conf, correct, title="t $x$", n_bins=10)
    try:
        top, bottom = fig.axes
        want = ref_bins(conf.double().tolist(), correct.tolist(), 10)
        full = [(b, w) for b, w in enumerate(want) if w[0]]
        acc_bars = bars(top, "accuracy of the bin")
        assert [round(p.get_x() * 10) for p in acc_bars] == [b for b, _ in full]
        assert [p.get_height() for p in acc_bars] == pytest.approx([w[2] for _, w in full])
        # the gap spans accuracy .. mean confidence, red when below, amber when above
        over = bars(top, "over-confident: accuracy below confidence")
        under = bars(top, "under-confident: accuracy above confidence")
        spans = sorted(
            (round(p.get_x() * 10), p.get_y(), p.get_y() + p.get_height()) for p in over + under
        )
        assert [s[0] for s in spans] == [b for b, _ in full]
        for (_, lo, hi), (_, w) in zip(spans, full, strict=True):
            assert (lo, hi) == pytest.approx((w[2], w[1]))
        assert len(over) == sum(1 for _, w in full if w[2] < w[1])
        counts = [p.get_height() for p in bottom.containers[0].patches]
        assert counts == [w[0] for w in want]
        text = fig._suptitle.get_text()
        assert "t \\$x\\$" in text and "N = 7" in text  # the title drawn as plain text
        assert f"{100 * ece(conf, correct, 10):.2f}%" in text
        assert f"{100 * ece_adaptive(conf, correct, 10):.2f}%" in text
        assert top.get_xlim() == (0, 1) and "0..1" in top.get_ylabel()
        assert "confidence" in bottom.get_xlabel() and "images" in bottom.get_ylabel()
    finally:
        plt.close(fig)


def explain_picture_args():
    """The value of ``_PICTURE`` in awt_engine/explain.py (what it passes to pyplot)."""
    source = Path(_plotting.__file__).with_name("explain.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "_PICTURE":
            return ast.literal_eval(node.value)
    raise AssertionError("explain.py has no _PICTURE")


# -- the PNG file -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["random", "empty", "one-bin-all-right", "all-wrong", "one-image"],
)
def test_png_is_written_atomically(tmp_path, case):
    pytest.importorskip("matplotlib")
    gen = torch.Generator().manual_seed(1)
    conf, correct = {
        "random": (torch.rand(300, generator=gen), torch.randint(0, 2, (300,), generator=gen)),
        "empty": (torch.empty(0), torch.empty(0)),
        "one-bin-all-right": (torch.full((7,), 0.8), torch.ones(7)),
        "all-wrong": (torch.rand(40, generator=gen), torch.zeros(40)),
        "one-image": (torch.tensor([1.0]), torch.tensor([0.0])),
    }[case]
    path = tmp_path / "out" / "reliability.png"
    path.parent.mkdir()
    path.write_bytes(b"an older diagram")  # replaced whole
    assert save_reliability_diagram(path, conf, correct, title=case, n_bins=15) == path
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temp file
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
    assert 400 <= w <= 2000 and 400 <= h <= 2000 and h > w


def test_missing_matplotlib_says_what_to_install(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    path = tmp_path / "r.png"
    with pytest.raises(ImportError, match=r"needs matplotlib: uv sync --extra explain") as err:
        save_reliability_diagram(path, torch.rand(5), torch.ones(5), title="x")
    assert "the reliability diagram" in str(err.value)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    # explain's message is the one it always gave (its arguments read from its source:
    # importing explain takes seconds, torchvision included)
    with pytest.raises(ImportError) as err:
        _plotting.pyplot(*explain_picture_args())
    assert str(err.value) == (
        "the explanation picture needs matplotlib: uv sync --extra explain "
        "(or pip install 'awt-engine[explain]'); .html and .json need nothing more"
    )
