"""Explanations: the scorer's own plan, its marginals, contributions, a known answer, outputs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import awt_engine
from awt_engine.classifier import Classifier
from awt_engine.cli import app
from awt_engine.inputs.views import ViewConfig
from awt_engine.labels import LabelSet
from awt_engine.scorers import AWTConfig
from tests.fixtures_embedders import ColourEmbedder, ColourLogitModel, solid

W, H = 96, 64
LABELS = LabelSet(
    ("flag", "meadow"),
    "a photo of a {}",
    (("a red part.", "a blue part."), ("green grass.", "a green hill.")),
)


def half_and_half():
    im = solid("red", (W, H))  # left half red, right half blue
    im.paste(solid("blue", (W // 2, H)), (W // 2, 0))
    return im


def test_crops_in_the_red_half_carry_their_mass_to_the_red_description():
    clf = Classifier(ColourEmbedder(), LABELS, scorer="awt")
    exp = clf.explain(half_and_half())
    flag = exp.prediction
    assert flag.name == "flag"
    boxes = exp.boxes.tolist()
    left = [v for v, (_, x, _, w, _) in enumerate(boxes) if x + w <= W // 2]
    right = [v for v, (_, x, _, _, _) in enumerate(boxes) if x >= W // 2]
    assert left and right  # 51 views: some crops lie inside each half
    red, blue = 1, 2  # prompt 0 is the bare template
    assert flag.plan[left].argmax(1).tolist() == [red] * len(left)
    assert flag.plan[right].argmax(1).tolist() == [blue] * len(right)
    share = flag.plan[left, red] / flag.plan[left].sum(1)
    assert (share > 0.8).all()


@pytest.mark.parametrize(
    "model", [ColourEmbedder(), ColourLogitModel()], ids=["embedder", "logits"]
)
def test_it_is_the_scorers_own_computation(model):
    """The same scores as classify, plans whose marginals are the weights, and
    contributions that add up to each score."""
    cfg = AWTConfig(tol=1e-9, max_iter=2000)  # converged: the row marginals are exact too
    clf = Classifier(model, LABELS, scorer="awt", awt_config=cfg, view_config=ViewConfig(17))
    im = half_and_half()
    exp = clf.explain(im, top_k=2)
    assert torch.equal(
        torch.tensor([exp.all_scores[c] for c in LABELS.classes]), clf.scores([im])[0]
    )
    for c in exp.classes:
        torch.testing.assert_close(c.plan.sum(1), exp.view_weights, atol=1e-6, rtol=0)
        torch.testing.assert_close(c.plan.sum(0), c.prompt_weights, atol=1e-6, rtol=0)
        assert float(c.contributions.sum()) == pytest.approx(c.score, rel=1e-5)
        assert sum(s for _, _, s in c.top_pairs(10**6)) == pytest.approx(1.0, rel=1e-5)
    default = Classifier(model, LABELS, scorer="awt", view_config=ViewConfig(17)).explain(im)
    torch.testing.assert_close(default.prediction.plan.sum(0), default.prediction.prompt_weights)


def test_the_picture_the_page_and_the_numbers(tmp_path):
    clf = Classifier(ColourEmbedder(), LABELS, scorer="awt")
    path = tmp_path / "flag.png"
    half_and_half().save(path)
    exp = clf.explain(str(path))
    png = exp.save(tmp_path / "why.png")
    pic = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert pic.shape[0] > 600 and pic.shape[1] > 900 and pic.std() > 20  # a real figure
    page = exp.save(tmp_path / "why.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 7  # the image and crop thumbnails inline
    assert "a photo of a flag. a red part." in page and "meadow" in page and "<img" in page
    data = json.loads(exp.save(tmp_path / "why.json").read_text())
    assert [c["name"] for c in data["classes"]] == ["flag", "meadow"]
    assert np.array(data["classes"][0]["plan"]).shape == (51, 3)
    assert len(data["views"]) == 51 and set(data["scores"]) == {"flag", "meadow"}
    with pytest.raises(ValueError, match=r"png, \.html or \.json"):
        exp.save(tmp_path / "why.gif")


def test_scorers_without_a_plan_are_refused():
    clf = Classifier(ColourEmbedder(), LABELS, scorer="clip")
    with pytest.raises(ValueError, match=r"'clip' scorer has none"):
        clf.explain(half_and_half())
    for name in ("awt-uniform", "awt-no-transport"):  # the ablations have plans too
        exp = Classifier(ColourEmbedder(), LABELS, scorer=name).explain(half_and_half())
        assert exp.prediction.plan.shape == (51, 3)


def test_cli_explain_and_a_trained_checkpoint(tmp_path, toy_task, coop_checkpoint):
    out = coop_checkpoint
    image = next((toy_task.root / "test").rglob("*.png"))
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "explain",
            str(image),
            "--checkpoint",
            str(out),
            "--views",
            "5",
            "-o",
            str(tmp_path / "why.json"),
            "--device",
            "cpu",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "why.json").read_text())
    clf = awt_engine.create_classifier(checkpoint=out, device="cpu", views=5)
    scores = clf.scores([str(image)])[0]
    assert [data["scores"][c] for c in clf.classes] == pytest.approx(scores.tolist(), rel=1e-6)
    res = runner.invoke(app, ["explain", str(image), "--checkpoint", str(out), "-o", "x.gif"])
    assert res.exit_code == 2 and ".png, .html or .json" in res.output
