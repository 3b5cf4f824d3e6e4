"""Evaluation: metrics with known answers, one embedding pass for all scorers, resume."""

import json

import pytest
import torch
from typer.testing import CliRunner

import awt_engine
from awt_engine import backbone as backbone_mod
from awt_engine.cli import app
from awt_engine.evaluate import compute_metrics, evaluate
from awt_engine.labelled import LabelledData, LabelledItem
from tests.fixtures_embedders import ColourBackbone, ColourEmbedder, solid

runner = CliRunner()
CLASSES = ("red", "green", "blue")
COUNTS = {"red": 3, "green": 2, "blue": 1}


@pytest.fixture
def colour_set(tmp_path):
    """An ImageFolder of solid colours: 3 red, 2 green, 1 blue (each image distinct)."""
    root = tmp_path / "colours"
    items = []
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(COUNTS[name]):
            path = root / name / f"{name}_{i}.png"
            solid(name, (16 + i, 12 + label)).save(path)
            items.append(LabelledItem(path, label))
    return root, LabelledData("colours", CLASSES, tuple(items), "test")


class SwappedEmbedder(ColourEmbedder):
    """Deliberately wrong: red text looks green and green text looks red."""

    identity = "test-swapped|v1"

    def _text(self, text):
        swap = {"red": "green", "green": "red"}
        for k, v in swap.items():
            if k in text:
                return super()._text(text.replace(k, v))
        return super()._text(text)


class CountingEmbedder(ColourEmbedder):
    def __init__(self, fail_after=None):
        super().__init__()
        self.images = 0
        self.fail_after = fail_after

    def embed_views(self, views):
        if self.fail_after is not None and self.images + views.shape[0] > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.images += views.shape[0]
        return super().embed_views(views)


def test_compute_metrics_known_answer():
    # 4 images, 3 classes; labels 0,0,1,2
    scores = torch.tensor([[3.0, 2, 1], [1, 3, 2], [1, 3, 2], [3, 2, 1]])
    m = compute_metrics(scores, torch.tensor([0, 0, 1, 2]))
    assert m.acc1 == 2 / 4  # images 0 and 2
    assert m.acc5 is None  # C = 3 < 5: top-5 is not defined (CLIP_benchmark: NaN)
    assert m.mean_per_class_recall == (1 / 2 + 1 + 0) / 3
    assert m.per_class_recall == {0: 1 / 2, 1: 1.0, 2: 0.0}


def test_metrics_are_exact_fractions_and_top5_counts_ranks():
    # 3 images, 6 classes: image 0 right at rank 1, image 1 at rank 5, image 2 at rank 6
    scores = torch.tensor(
        [[6.0, 5, 4, 3, 2, 1], [5.0, 6, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1]]
    )  # labels: 0 (rank 1), 5 (rank 6), 4 (rank 5)
    m = compute_metrics(scores, torch.tensor([0, 5, 4]))
    assert m.acc1 == 1 / 3  # exactly Python's 1/3, not a float32 mean
    assert m.acc5 == 2 / 3
    assert m.mean_per_class_recall == 1 / 3


def test_evaluate_right_and_wrong_embedders(colour_set, tmp_path):
    _, data = colour_set
    good = awt_engine.create_classifier(classes=list(CLASSES), embedder=ColourEmbedder(), views=3)
    res = evaluate(good, data, ["awt", "clip"], cache_root=tmp_path / "c1")
    for m in res.metrics.values():
        assert (m.acc1, m.mean_per_class_recall, m.n_images) == (1.0, 1.0, 6)
    bad = awt_engine.create_classifier(classes=list(CLASSES), embedder=SwappedEmbedder(), views=3)
    res = evaluate(bad, data, ["awt", "clip-descriptions"], cache_root=tmp_path / "c2")
    for m in res.metrics.values():
        assert m.acc1 == pytest.approx(1 / 6)  # only the blue image is right
        assert m.mean_per_class_recall == pytest.approx(1 / 3)  # recalls 0, 0, 1
        assert m.acc5 is None  # three classes: top-5 is not defined


def test_all_scorers_share_one_embedding_pass(colour_set, tmp_path):
    _, data = colour_set
    emb = CountingEmbedder()
    clf = awt_engine.create_classifier(classes=list(CLASSES), embedder=emb, views=3)
    evaluate(clf, data, ["awt", "clip", "clip-descriptions", "awt-uniform"], cache_root=None)
    assert emb.images == 6  # each image embedded once for four scorers
    assert emb.text_calls == 1


def test_resume_after_interruption_embeds_only_the_rest(colour_set, tmp_path):
    _, data = colour_set
    cache = tmp_path / "cache"
    first = CountingEmbedder(fail_after=4)
    clf = awt_engine.create_classifier(classes=list(CLASSES), embedder=first, views=3, batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        evaluate(clf, data, ["awt"], cache_root=cache)
    assert first.images == 4
    second = CountingEmbedder()
    clf2 = awt_engine.create_classifier(
        classes=list(CLASSES), embedder=second, views=3, batch_size=2
    )
    res = evaluate(clf2, data, ["awt"], cache_root=cache)
    assert second.images == 2  # the four finished images came from the cache
    assert res.metrics["awt"].acc1 == 1.0 and res.metrics["awt"].n_images == 6
    third = CountingEmbedder()
    clf3 = awt_engine.create_classifier(classes=list(CLASSES), embedder=third, views=3)
    evaluate(clf3, data, ["awt"], cache_root=cache)
    assert third.images == 0
    # a different view count is a different cache entry
    fourth = CountingEmbedder()
    clf4 = awt_engine.create_classifier(classes=list(CLASSES), embedder=fourth, views=4)
    evaluate(clf4, data, ["awt"], cache_root=cache)
    assert fourth.images == 6


def _eval_args(root, tmp_path, *extra):
    return [
        "eval",
        "--data-root",
        str(root),
        "--template",
        "a photo of a {}",
        "--views",
        "3",
        "--cache-dir",
        str(tmp_path / "cache"),
        *extra,
    ]


def test_cli_eval_writes_clip_benchmark_json(colour_set, tmp_path, monkeypatch):
    root, _ = colour_set
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: ColourBackbone())
    out = tmp_path / "results"
    args = _eval_args(root, tmp_path, "--scorer", "awt", "--scorer", "clip", "-o", str(out))
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2
    assert files[0].startswith("colours__ViT-B-16-quickgelu__openai__awt__")
    assert files[1].startswith("colours__ViT-B-16-quickgelu__openai__clip__")
    rec = json.loads((out / files[0]).read_text())
    # CLIP_benchmark's fields
    assert rec["task"] == "zeroshot_classification" and rec["dataset"] == "colours"
    assert rec["model"] == "ViT-B-16-quickgelu" and rec["pretrained"] == "openai"
    accuracy = {k: rec["metrics"][k] for k in ("acc1", "acc5", "mean_per_class_recall")}
    assert accuracy == {"acc1": 1.0, "acc5": None, "mean_per_class_recall": 1.0}
    # calibration (tests/test_calibration.py checks the values)
    assert set(rec["metrics"]) - set(accuracy) == {
        "ece",
        "ece_adaptive",
        "nll",
        "brier",
        "aurc",
        "ood_auroc",
        "ood_fpr95",
    }
    assert rec["metrics"]["ood_auroc"] is None and rec["adapt"] is None  # no --ood-root, --adapt
    # and everything that defines the run
    assert rec["scorer"] == "awt" and rec["views"] == 3 and rec["seed"] == 0
    assert rec["descriptions"] == 0 and "engine_version" in rec
    assert rec["template"] == "a photo of a {}" and rec["classes"] == sorted(CLASSES)
    assert rec["per_class_recall"] == {"red": 1.0, "green": 1.0, "blue": 1.0}
    assert rec["precision"] == "float32" and rec["device"] == "cpu"
    assert rec["awt_config"]["eps"] == 0.1 and rec["data_root"] == str(root)
    clip = json.loads((out / files[1]).read_text())
    assert clip["views"] == 1 and clip["scorer"] == "clip"
    assert "awt" in res.stdout and "100.00%" in res.stdout


def test_runs_that_differ_in_a_setting_never_overwrite_each_other(
    colour_set, tmp_path, monkeypatch
):
    root, _ = colour_set
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: ColourBackbone())
    out = tmp_path / "results"
    runner.invoke(app, _eval_args(root, tmp_path, "-o", str(out)))
    res = runner.invoke(app, _eval_args(root, tmp_path, "-o", str(out), "--eps", "0.2"))
    assert res.exit_code == 0, res.output
    recs = [json.loads(p.read_text()) for p in out.iterdir()]
    assert sorted(r["awt_config"]["eps"] for r in recs) == [0.1, 0.2]
    res = runner.invoke(app, _eval_args(root, tmp_path, "-o", str(out), "--eps", "0.2"))
    assert len(list(out.iterdir())) == 2  # the same run again replaces its own file
    runner.invoke(app, [*_eval_args(root, tmp_path, "-o", str(out)), "--views", "2"])
    assert len(list(out.iterdir())) == 3  # another view count: another file


def test_old_method_option_still_works_and_warns(colour_set, tmp_path, monkeypatch):
    root, _ = colour_set
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: ColourBackbone())
    res = runner.invoke(app, _eval_args(root, tmp_path, "--method", "clip"))
    assert res.exit_code == 0, res.output
    assert "--method is now --scorer" in res.stderr
    assert res.stdout.splitlines()[1].split()[0] == "clip"


def test_cli_eval_limit_and_bad_scorer(colour_set, tmp_path, monkeypatch):
    root, _ = colour_set
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: ColourBackbone())
    res = runner.invoke(app, ["eval", "--data-root", str(root), "--views", "2", "--limit", "4"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[1].split()[-1] == "4"
    res = runner.invoke(app, ["eval", "--data-root", str(root), "--scorer", "best"])
    assert (
        res.exit_code == 2 and "unknown scorer 'best'" in res.output and "awt, clip" in res.output
    )


def test_eval_with_no_readable_image_writes_null_and_exits_1(tmp_path, monkeypatch):
    root = tmp_path / "broken"
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        (root / name / "x.png").write_bytes(b"not a png")
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: ColourBackbone())
    out = tmp_path / "results"
    res = runner.invoke(
        app, ["eval", "--data-root", str(root), "--views", "2", "--output", str(out)]
    )
    assert res.exit_code == 1, res.output
    (path,) = out.iterdir()
    rec = json.loads(path.read_text())  # strict JSON: a bare NaN would not parse back as null
    names = ("acc1", "acc5", "mean_per_class_recall", "ece", "ece_adaptive", "nll", "brier")
    assert rec["metrics"] == dict.fromkeys((*names, "aurc", "ood_auroc", "ood_fpr95"))  # all null
    assert "NaN" not in path.read_text()
    assert rec["n_images"] == 0 and rec["n_failed"] == 3


def test_eval_records_local_dir_weights_not_the_default_tag(tmp_path, tiny_clip_dir):
    root = tmp_path / "colours"
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        solid(name, (16, 12 + label)).save(root / name / "a.png")
    out = tmp_path / "results"
    args = ["eval", "--data-root", str(root), "--model", tiny_clip_dir, "--views", "2"]
    res = runner.invoke(app, [*args, "--output", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    (path,) = out.iterdir()
    rec = json.loads(path.read_text())
    assert rec["pretrained"] == tiny_clip_dir  # the folder that was loaded, not "openai"
    assert "openai" not in path.name
    assert rec["precision"] == "float32" and rec["model_identity"].startswith(tiny_clip_dir)


def test_results_that_cannot_be_written_are_a_clear_error(colour_set, tmp_path, monkeypatch):
    root, _ = colour_set
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: ColourBackbone())
    out = tmp_path / "results"
    args = ["eval", "--data-root", str(root), "--views", "2", "-o", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    (blocked,) = out.iterdir()
    blocked.unlink()
    blocked.mkdir()  # a folder where the results file must go
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert f"cannot write results file {blocked}" in res.output
    assert "Traceback" not in res.output


SIX = ("red", "green", "blue", "yellow", "cyan", "magenta")


@pytest.fixture
def six_colours(tmp_path):
    """Mixed colours (so scores are not one-hot): each image a blend, labelled by its base."""
    from PIL import Image

    items = []
    rng = __import__("random").Random(0)
    for label, name in enumerate(SIX):
        for i in range(2):
            base = solid(name, (14 + i, 11 + label))
            noise = Image.new("RGB", base.size, tuple(rng.randrange(256) for _ in range(3)))
            path = tmp_path / "six" / f"{name}{i}.png"
            path.parent.mkdir(exist_ok=True)
            Image.blend(base, noise, 0.35).save(path)
            items.append(LabelledItem(path, label))
    return LabelledData("six", SIX, tuple(items), "test")


@pytest.mark.parametrize("kind", ["embedder", "logit-model"])
def test_classify_and_eval_give_the_same_rankings_for_both_model_kinds(six_colours, kind):
    from tests.fixtures_embedders import ColourLogitModel

    model = ColourEmbedder() if kind == "embedder" else ColourLogitModel()
    scorers = ["awt", "clip"]
    clf = awt_engine.create_classifier(classes=list(SIX), embedder=model, views=5, batch_size=3)
    res = evaluate(clf, six_colours, scorers, cache_root=None)
    paths = [str(it.path) for it in six_colours.items]
    assert res.scored.tolist() == list(range(len(paths)))
    for name in scorers:
        one = awt_engine.create_classifier(
            classes=list(SIX), embedder=model, views=5, batch_size=1, scorer=name
        )
        direct = one.scores(paths)  # the classify path, one image per batch
        assert torch.equal(direct.topk(5, dim=-1).indices, res.top5[name]), name
        assert res.metrics[name].n_images == len(paths)
    if kind == "logit-model":
        with pytest.raises(ValueError, match="needs class embeddings"):
            evaluate(clf, six_colours, ["clip-descriptions"], cache_root=None)
