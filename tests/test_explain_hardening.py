"""explain, hardened (issue 17): plain-text class names, every asked class in the picture,
outlines that show on any image, true counts and units, the README's folder example, help
text, CPU-side float64, and the eval record of a trained method."""

import io
import json
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from awt_engine import backbone as backbone_mod
from awt_engine.classifier import Classifier
from awt_engine.cli import app
from awt_engine.evaluate import EvalResult, Metrics, result_records
from awt_engine.inputs.views import ViewConfig
from awt_engine.labels import LabelSet
from awt_engine.models.base import TrainedInfo
from tests.fixtures_embedders import ColourBackbone, ColourEmbedder, ColourLogitModel, solid

runner = CliRunner()
LABELS = LabelSet(
    ("red", "green", "blue"),
    "a photo of a {}",
    (("a red thing.", "warm."), ("green grass.", "a hill."), ("blue sky.", "the sea.")),
)


def busy(size=(160, 120), seed=0) -> Image.Image:
    """A synthetic busy photo: a colour gradient under random blocks of every colour."""
    rng = np.random.default_rng(seed)
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    pix = np.stack([x, y, 1 - x * y], -1) * 255
    for _ in range(40):
        x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
        pix[y0 : y0 + rng.integers(4, 40), x0 : x0 + rng.integers(4, 40)] = rng.integers(0, 256, 3)
    return Image.fromarray(pix.astype(np.uint8))


# -- item 10: class names and descriptions are plain text ------------------------------


def _math_texts(fig) -> list[str]:
    """The texts matplotlib would draw as mathtext (its own test of a string)."""
    from matplotlib.text import Text

    return [t.get_text() for t in fig.findobj(Text) if t._preprocess_math(t.get_text())[1]]


def test_dollar_signs_in_class_names_and_descriptions_are_plain_text():
    import matplotlib.pyplot as plt

    labels = LabelSet(
        (r"$\frac{$ red", "green $x^2$", r"blue \$ 5"),
        "a photo of a {}",
        ((r"a $\frac{$ red part.",), ("green $$ grass.",), ("blue $sky$.",)),
    )
    clf = Classifier(ColourEmbedder(), labels, view_config=ViewConfig(6))
    exp = clf.explain(solid("red", (40, 30)), top_k=2)
    fig = exp.figure()
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=20)  # aborted in mathtext before
        assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
        assert _math_texts(fig) == []  # tick labels included, as drawn
        texts = " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
        assert r"$\frac{$ red" in texts.replace(r"\$", "$")
        assert "a $\\frac{$ red part." in texts.replace(r"\$", "$")
    finally:
        plt.close(fig)


# -- item 14: the picture, the page ------------------------------------------------------


def test_the_picture_shows_every_class_asked_for():
    import matplotlib.pyplot as plt

    clf = Classifier(ColourEmbedder(), LABELS, view_config=ViewConfig(6))
    for k in (3, 1):
        exp = clf.explain(busy(), top_k=k)
        fig = exp.figure()
        titles = [ax.get_title() for ax in fig.axes]
        plt.close(fig)
        plans = [t for t in titles if "plan: views x prompts" in t]
        assert len(plans) == k == len(exp.classes)
        assert [t.split(":")[1].split("\n")[0].strip() for t in plans] == [
            c.name for c in exp.classes
        ]


@pytest.mark.parametrize("colour", ["red", "white", "black"])
def test_crop_outlines_show_on_any_image(colour):
    """A white line inside a black border: both show whatever the image's colour."""
    im = Image.new(
        "RGB", (150, 120), {"red": (255, 0, 0), "white": (255,) * 3, "black": (0,) * 3}[colour]
    )
    clf = Classifier(ColourEmbedder(), LABELS, view_config=ViewConfig(8))
    exp = clf.explain(im)
    pix = np.asarray(exp.outlined(8), dtype=np.int16)
    base = np.asarray(im, dtype=np.int16)
    changed = np.abs(pix - base).sum(-1) > 150  # strongly unlike the image
    assert changed.sum() > 200
    light = (pix.min(-1) > 150) & changed
    dark = (pix.max(-1) < 105) & changed
    # the dark border shows on white, the light line on black, both on red
    assert dark.any() == (colour != "black") and light.any() == (colour != "white")
    if colour == "red":  # on red both the line and its border stand out
        assert light.sum() > 50 and dark.sum() > 50


def test_counts_and_units_are_the_real_ones():
    import matplotlib.pyplot as plt

    clf = Classifier(ColourEmbedder(), LABELS, view_config=ViewConfig(8))
    exp = clf.explain(busy(), top_k=3)
    page = exp.to_html()
    assert "12 heaviest" not in page and "All 8 crops outlined" in page
    assert page.count("score (logit)") >= 4 and "probability %" in page
    # the all-classes table: probabilities are the softmax of the scores, in percent
    rows = re.findall(r"<tr><td>([a-z]+)</td><td>(-?[0-9.]+)</td><td>([0-9.]+)</td></tr>", page)
    assert sorted(r[0] for r in rows) == sorted(LABELS.classes)
    scores = torch.tensor([exp.all_scores[r[0]] for r in rows], dtype=torch.float64)
    want = (100 * torch.softmax(scores, -1)).tolist()
    assert [float(r[2]) for r in rows] == pytest.approx(want, abs=0.006)
    fig = exp.figure()
    titles = [ax.get_title() for ax in fig.axes]
    plt.close(fig)
    assert any("all 8 crops outlined" in t for t in titles)
    assert sum("score (logit)" in t and "probability" in t for t in titles) == 3
    many = Classifier(ColourEmbedder(), LABELS, view_config=ViewConfig(51)).explain(busy())
    assert "The 12 heaviest of 51 crops outlined" in many.to_html()


@pytest.mark.slow
def test_look_at_the_pictures(tmp_path):
    """Renders the red and the busy image's PNGs (kept under tmp_path to look at)."""
    clf = Classifier(ColourEmbedder(), LABELS, view_config=ViewConfig(12))
    for name, im in (("red", solid("red", (160, 120))), ("busy", busy())):
        exp = clf.explain(im, top_k=3)
        png = exp.save(tmp_path / f"{name}.png")
        pic = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
        assert pic.shape[0] > 4 * 300 and pic.std() > 20  # four rows: header and 3 classes


# -- item 13: the README's example -------------------------------------------------------


@pytest.fixture
def colour_backbone(monkeypatch):
    made = []

    def load(*a, **k):
        made.append(ColourBackbone())
        return made[-1]

    monkeypatch.setattr(backbone_mod, "load_backbone", load)
    return made


@pytest.mark.parametrize("top, out", [("--top", "explain/"), ("--top-k", "explain")])
def test_readme_example_writes_all_three_from_one_run(
    tmp_path, colour_backbone, out, top, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    solid("blue", (48, 40)).save(tmp_path / "photo.jpg")
    args = ["explain", "photo.jpg", "--classes", "red,green,blue", "--views", "5"]
    res = runner.invoke(app, [*args, top, "3", "-o", out])
    assert res.exit_code == 0, res.output
    assert res.stdout.split("\t")[:2] == ["photo.jpg", "blue"]
    folder = tmp_path / "explain"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["photo.explain.html", "photo.explain.json", "photo.explain.png"]
    (bb,) = colour_backbone
    assert len(bb.image_batches) == 1  # one model run for the three files
    data = json.loads((folder / "photo.explain.json").read_text())
    assert [c["name"] for c in data["classes"]][:1] == ["blue"] and len(data["classes"]) == 3
    assert Image.open(folder / "photo.explain.png").format == "PNG"
    assert "photo.jpg" in (folder / "photo.explain.html").read_text()
    for name in names:
        assert f"wrote {folder / name}".replace(str(tmp_path) + "/", "") in res.stderr


def test_explain_output_errors_before_any_model_loads(tmp_path, colour_backbone):
    image = tmp_path / "photo.png"
    solid("red").save(image)
    (tmp_path / "notes").write_text("a file without a suffix")
    base = ["explain", str(image), "--classes", "red,green"]
    for out, needle in (
        ("x.gif", "or name a folder (ending in /)"),
        (str(image), "that is the image to explain"),
        (str(tmp_path / "notes"), "or name a folder"),
    ):
        res = runner.invoke(app, [*base, "-o", out])
        assert res.exit_code == 2, res.output
        assert needle in res.stderr and res.stderr.startswith("error: ")
    assert colour_backbone == []  # refused before loading anything
    assert image.read_bytes()[:4] == b"\x89PNG"  # the input is untouched


# -- item 19: help text, the eval record of a trained method ------------------------------


def test_explain_help_names_only_its_own_options():
    cmd = typer.main.get_command(app).commands["explain"]
    own = {o for p in cmd.params for o in getattr(p, "opts", []) + getattr(p, "secondary_opts", [])}
    helps = " ".join(p.help or "" for p in cmd.params) + " " + (cmd.help or "")
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", helps))
    assert mentioned <= own, mentioned - own
    res = runner.invoke(app, ["explain", "--help"], terminal_width=200)
    assert res.exit_code == 0 and "--limit" not in res.output and "--top" in res.output


class _Trained(ColourEmbedder):
    method = "coop"
    checkpoint: ClassVar[TrainedInfo] = TrainedInfo(Path("coop.safetensors"), {"shots": 4})


@pytest.mark.parametrize("model, task", [(ColourEmbedder(), "zeroshot"), (_Trained(), "fewshot")])
def test_eval_record_says_fewshot_for_a_trained_method(model, task):
    clf = Classifier(model, LABELS, view_config=ViewConfig(3))
    m = Metrics(1.0, None, 1.0, 3, 0, {0: 1.0, 1: 1.0, 2: 1.0})
    result = EvalResult("colours", {"awt": m}, [], LABELS.classes)
    (rec,) = result_records(
        result, clf, model="m", data_root="d", split="test", limit=None
    ).values()
    assert rec["task"] == f"{task}_classification"
    trained = task == "fewshot"
    assert rec["method"] == ("coop" if trained else None)
    assert rec["shots"] == (4 if trained else None)


# -- item 23: float64 happens on the CPU ----------------------------------------------


class OnDevice(torch.Tensor):
    """A tensor on an accelerator without float64 (as MPS): any op that makes a float64
    tensor from it raises; ``.cpu()`` gives a plain CPU tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {})).as_subclass(torch.Tensor)
        out = super().__torch_function__(func, types, args, kwargs)
        results = out if isinstance(out, tuple | list) else (out,)
        if any(isinstance(r, torch.Tensor) and r.dtype == torch.float64 for r in results):
            raise TypeError(f"{getattr(func, '__name__', func)}: float64 on a device without it")
        return out


class DeviceEmbedder(ColourEmbedder):
    def embed_views(self, views):
        return super().embed_views(views).as_subclass(OnDevice)

    def class_embeddings(self, labels):
        return super().class_embeddings(labels).as_subclass(OnDevice)


class DeviceLogits(ColourLogitModel):
    def logits(self, views, labels):
        return super().logits(views, labels).as_subclass(OnDevice)


def test_the_stand_in_refuses_float64_on_the_device():
    with pytest.raises(TypeError, match="float64"):
        torch.ones(2).as_subclass(OnDevice).double()
    assert torch.ones(2).as_subclass(OnDevice).cpu().double().dtype == torch.float64


@pytest.mark.parametrize("model", [DeviceEmbedder(), DeviceLogits()], ids=["embedder", "logits"])
def test_explain_widens_to_float64_on_the_cpu_only(model):
    clf = Classifier(model, LABELS, view_config=ViewConfig(5))
    exp = clf.explain(solid("green", (40, 30)), top_k=2)
    assert exp.prediction.name == "green"
    plain = Classifier(ColourEmbedder(), LABELS, view_config=ViewConfig(5))
    want = plain.explain(solid("green", (40, 30)), top_k=2)
    for a, b in zip(exp.classes, want.classes, strict=True):
        torch.testing.assert_close(a.contributions, b.contributions)


@pytest.mark.parametrize("command", ["classify", "eval", "explain", "describe", "train"])
def test_every_command_with_long_work_takes_no_progress(command):
    """The README: --no-progress turns bars off on every command that draws one."""
    res = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert res.exit_code == 0 and "--no-progress" in res.output, res.output
