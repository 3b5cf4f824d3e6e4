"""Scores that are not finite (diverged or absurd weights) become that image's error, and
no output file ever holds a bare NaN (issue 17, item 2, the output side)."""

import csv
import json
import math

import pytest
import torch
from typer.testing import CliRunner

import awt_engine
from awt_engine import backbone as backbone_mod
from awt_engine.classifier import NONFINITE_REASON, Classifier, Prediction, nonfinite_rows
from awt_engine.cli import app
from awt_engine.evaluate import evaluate
from awt_engine.inputs.views import ViewConfig
from awt_engine.labelled import LabelledData, LabelledItem
from awt_engine.labels import LabelSet
from tests.fixtures_embedders import ColourBackbone, ColourEmbedder, solid

runner = CliRunner()
CLASSES = ("red", "green", "blue")
LABELS = LabelSet(CLASSES, "a photo of a {}", ())


def _is_blue(pixels: torch.Tensor) -> torch.Tensor:
    """[..., 3, R, R] pixels in [0, 1] (the stand-ins' preprocess) -> [...] bool."""
    rgb = pixels.float().mean(dim=(-1, -2))
    return (rgb[..., 2] > 0.5) & (rgb[..., 0] < 0.5)


class NaNForBlue(ColourEmbedder):
    """A diverged model, for blue images only: their view embeddings are NaN."""

    identity = "test-nan-for-blue|v1"

    def embed_views(self, views):
        out = super().embed_views(views)
        out[_is_blue(views).any(dim=1)] = float("nan")
        return out


class Absurd(ColourEmbedder):
    """Finite but absurd weights (x 1e30): AWT's scores overflow."""

    identity = "test-absurd|v1"

    def embed_views(self, views):
        return super().embed_views(views) * 1e30


class NaNForBlueBackbone(ColourBackbone):
    """The same diverged model behind the backbone surface, for the CLI."""

    identity = "test-nan-for-blue-backbone|v1"

    def encode_images(self, pixels, *, batch_size=None, grad=False):
        out = super().encode_images(pixels, batch_size=batch_size, grad=grad)
        out[_is_blue(pixels)] = float("nan")
        return out


def _strict(text: str):
    """json.loads that refuses NaN and the infinities (JSON has none)."""

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_nonfinite_rows_known_answers():
    inf, nan = float("inf"), float("nan")
    scores = torch.tensor(
        [
            [1.0, 2.0, 3.0],  # fine
            [1.0, nan, 3.0],  # NaN
            [1.0, inf, 3.0],  # +inf
            [1.0, -inf, 3.0],  # -inf without a shortlist: a class with no number
            [-inf, -inf, -inf],  # nothing finite
        ]
    )
    assert nonfinite_rows(scores).tolist() == [False, True, True, True, True]
    # with a shortlist of 2, -inf marks the classes left out: one is expected per row
    short = torch.tensor([[1.0, -inf, 3.0], [-inf, -inf, 3.0], [nan, -inf, 3.0]])
    assert nonfinite_rows(short, shortlist=2).tolist() == [False, True, True]
    assert nonfinite_rows(short[:1], shortlist=5).tolist() == [True]  # K >= C: all of them


@pytest.mark.parametrize("scorer", ["awt", "clip"])
def test_classify_gives_an_error_row_for_nan_scores(scorer):
    clf = Classifier(NaNForBlue(), LABELS, scorer=scorer, view_config=ViewConfig(4))
    preds = list(clf.classify([solid("red"), solid("blue"), solid("green")], top_k=2))
    assert [p.ok for p in preds] == [True, False, True]
    assert preds[1].error == NONFINITE_REASON and preds[1].predictions is None
    assert [p.predictions[0]["label"] for p in (preds[0], preds[2])] == ["red", "green"]
    with pytest.raises(ValueError, match="not finite"):
        clf.predict(solid("blue"))
    with pytest.raises(ValueError, match="not finite"):
        clf.scores([solid("red"), solid("blue")])
    assert clf.predict(solid("red"))[0]["label"] == "red"  # the others are unaffected


def test_finite_but_absurd_weights_are_errors_not_numbers():
    clf = Classifier(Absurd(), LABELS, view_config=ViewConfig(4))
    preds = list(clf.classify([solid("red"), solid("green")]))
    assert [p.error for p in preds] == [NONFINITE_REASON] * 2


def test_shortlisted_scores_are_still_predictions():
    """-inf outside an image's shortlist is by design, not a failure."""
    emb = ColourEmbedder()
    clf = Classifier(emb, LABELS, shortlist=2, view_config=ViewConfig(3))
    (pred,) = clf.classify([solid("blue")], top_k=3)
    assert pred.ok and pred.predictions[0]["label"] == "blue"
    assert math.isfinite(pred.predictions[-1]["score"])


@pytest.fixture
def colour_set(tmp_path):
    """3 red, 2 green, 1 blue, each image distinct."""
    root = tmp_path / "colours"
    items = []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range({"red": 3, "green": 2, "blue": 1}[name]):
            path = root / name / f"{name}_{i}.png"
            solid(name, (16 + i, 12 + label)).save(path)
            items.append(LabelledItem(path, label))
    return root, LabelledData("colours", CLASSES, tuple(items), "test")


@pytest.mark.filterwarnings("error")  # NaN embeddings never go into the image cache
@pytest.mark.parametrize("cached", [False, True], ids=["no-cache", "image-cache"])
def test_eval_counts_nan_images_as_failed_not_wrong(colour_set, tmp_path, cached):
    _, data = colour_set
    clf = awt_engine.create_classifier(classes=list(CLASSES), embedder=NaNForBlue(), views=3)
    for _ in range(2 if cached else 1):  # the second run reads the cache: no NaN kept there
        res = evaluate(
            clf, data, ["awt", "clip"], cache_root=tmp_path / "cache" if cached else None
        )
        blue = str(data.items[-1].path)
        assert res.failed == [(blue, NONFINITE_REASON)]
        for m in res.metrics.values():
            assert (m.n_images, m.n_failed, m.acc1) == (5, 1, 1.0)
            assert m.per_class_recall == {0: 1.0, 1: 1.0}  # blue is not a wrong prediction
        assert res.scored.tolist() == [0, 1, 2, 3, 4]


@pytest.fixture
def nan_backbone(monkeypatch):
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: NaNForBlueBackbone())


@pytest.fixture
def colour_files(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("red", "blue", "green"):
        solid(name).save(folder / f"{name}.png")
    return folder


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_cli_classify_nan_scores_are_error_rows(colour_files, tmp_path, nan_backbone, suffix):
    out = tmp_path / f"preds{suffix}"
    args = ["classify", str(colour_files), "--classes", ",".join(CLASSES), "--views", "3"]
    res = runner.invoke(app, [*args, "-o", str(out)])
    assert res.exit_code == 1, res.output  # as for an unreadable image
    blue = str(colour_files / "blue.png")
    assert f"error: {blue}: {NONFINITE_REASON}" in res.stderr
    assert "1 of 3 input(s) could not be classified" in res.stderr
    printed = [line.split("\t") for line in res.stdout.splitlines()]
    assert sorted(label for _, label, _ in printed) == ["green", "red"]
    assert all(math.isfinite(float(score)) for _, _, score in printed)
    text = out.read_text()
    cells = [c for row in csv.reader(text.splitlines()) for c in row] if suffix == ".csv" else []
    assert not {"nan", "inf", "-inf"} & {c.lower() for c in cells}
    if suffix == ".jsonl":
        rows = {r["path"]: r for r in map(_strict, text.splitlines())}
        assert rows[blue] == {"path": blue, "error": NONFINITE_REASON}
        assert rows[str(colour_files / "red.png")]["predictions"][0]["label"] == "red"
    else:
        rows = list(csv.DictReader(text.splitlines()))
        assert [r["error"] for r in rows if r["path"] == blue] == [NONFINITE_REASON]


def test_cli_writer_turns_a_nan_prediction_into_an_error_row(tmp_path, monkeypatch):
    """Predictions from elsewhere (a Ray pool) pass the same guard: no NaN is written."""
    bad = Prediction("x.png", [{"label": "red", "score": float("nan")}])
    good = Prediction("y.png", [{"label": "red", "score": 1.0}])
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: ColourBackbone())
    monkeypatch.setattr(Classifier, "classify", lambda self, paths, **kw: iter([bad, good]))
    (tmp_path / "a.png").write_bytes(b"")  # found as an input; classify is replaced
    out = tmp_path / "p.jsonl"
    res = runner.invoke(
        app, ["classify", str(tmp_path / "a.png"), "--classes", "red,blue", "-o", str(out)]
    )
    assert res.exit_code == 1, res.output
    rows = [_strict(x) for x in out.read_text().splitlines()]
    assert rows == [
        {"path": "x.png", "error": NONFINITE_REASON},
        {"path": "y.png", "predictions": [{"label": "red", "score": 1.0}]},
    ]


def test_cli_eval_json_is_strict_and_counts_the_failure(colour_set, tmp_path, nan_backbone):
    root, _ = colour_set
    out = tmp_path / "results"
    res = runner.invoke(
        app,
        ["eval", "--data-root", str(root), "--views", "3", "--no-image-cache", "-o", str(out)],
    )
    assert res.exit_code == 1, res.output
    assert f"{root / 'blue' / 'blue_0.png'}: {NONFINITE_REASON}" in res.stderr
    (path,) = out.iterdir()
    rec = _strict(path.read_text())
    assert (rec["n_images"], rec["n_failed"]) == (5, 1)
    assert rec["metrics"]["acc1"] == 1.0


def test_cli_explain_refuses_nan_scores(colour_files, tmp_path, nan_backbone):
    out = tmp_path / "why.json"
    blue = colour_files / "blue.png"
    res = runner.invoke(
        app,
        ["explain", str(blue), "--classes", ",".join(CLASSES), "--views", "3", "-o", str(out)],
    )
    assert res.exit_code == 2, res.output
    assert res.stderr.strip() == f"error: {blue}: {NONFINITE_REASON}; there is nothing to explain"
    assert not out.exists()
