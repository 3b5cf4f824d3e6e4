"""Adaptations through the run loop, the classifier, eval and the CLI, with two
adaptations registered here whose answers are known:

* ``test-position`` (online): image k of the stream (k = images seen before it) gets its
  base scores plus k on class 0, so its output proves the order it was stepped in;
* ``test-set-mean`` (transductive): every image gets its base scores plus the mean of the
  whole set's base scores, so its output proves it saw every image.

The real adaptations' numerics are tested in tests/test_adapt_*.py.
"""

import json
from dataclasses import dataclass, field

import pytest
import torch
from typer.testing import CliRunner

import awt_engine
from awt_engine.adapt import (
    ADAPTATIONS,
    OnlineAdaptation,
    TransductiveAdaptation,
    register_adaptation,
)
from awt_engine.adapt.scorer import adapted_scorer
from awt_engine.evaluate import evaluate, result_records
from awt_engine.evaluate_adapted import order_of
from awt_engine.labelled import LabelledData, LabelledItem
from awt_engine.options import option
from tests.fixtures_embedders import COLOURS, ColourEmbedder, ColourLogitModel, solid

CLASSES = list(COLOURS)  # 6


@dataclass(frozen=True)
class PositionConfig:
    step: float = option(1.0, "added per image seen before", bounds=(0.0, 100.0))


@dataclass
class Seen:
    n: int = 0
    rows: list = field(default_factory=list)


@dataclass(frozen=True)
class NoConfig:
    pass


@pytest.fixture
def adaptations():
    @register_adaptation
    class Position(OnlineAdaptation):
        name, summary, paper = "test-position", "image k gets +k on class 0", "-"
        Config = PositionConfig

        def new_state(self, config):
            return Seen()

        def step(self, batch, state, config):
            out = batch.scores.clone()
            for b in range(batch.n_images):
                out[b, 0] += config.step * state.n
                state.n += 1
                state.rows.append(batch.scores[b].clone())
            return out

    @register_adaptation
    class SetMean(TransductiveAdaptation):
        name, summary, paper = "test-set-mean", "base + the set's mean", "-"
        Config = NoConfig

        def solve(self, batch, config, memory_budget=None):
            return batch.scores + batch.scores.mean(dim=0, keepdim=True)

    yield
    ADAPTATIONS.pop("test-position")
    ADAPTATIONS.pop("test-set-mean")


def _images(tmp_path, n=7, bad_at=None):
    paths = []
    for i in range(n):
        p = tmp_path / f"{i:02d}.png"
        if i == bad_at:
            p.write_bytes(b"not an image")
        else:
            solid(CLASSES[(3 * i) % 6]).save(p)
        paths.append(p)
    return paths


def _clf(**kw):
    return awt_engine.create_classifier(classes=CLASSES, embedder=ColourEmbedder(), **kw)


@pytest.mark.parametrize("scorer", ["awt", "clip"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_online_adaptation_steps_in_input_order(adaptations, tmp_path, scorer, batch_size):
    paths = _images(tmp_path)
    base = _clf(scorer=scorer, views=3).scores(paths)  # [N, C], no adaptation
    clf = _clf(scorer=scorer, views=3, adapt="test-position", batch_size=batch_size)
    assert clf.scorer.name == f"{scorer}+test-position"
    got = clf.scores(paths)
    want = base.clone()
    want[:, 0] += torch.arange(len(paths), dtype=want.dtype)  # image k: +k on class 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_the_callers_state_carries_across_calls(adaptations, tmp_path):
    paths = _images(tmp_path, n=4)
    clf = _clf(scorer="clip", adapt="test-position", adapt_options={"step": "2"})
    state = clf.scorer.new_state()
    first = clf.scores(paths[:2], state=state)
    second = clf.scores(paths[2:], state=state)
    base = _clf(scorer="clip").scores(paths)
    assert state.n == 4  # the very object passed in
    torch.testing.assert_close(first[:, 0] - base[:2, 0], torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(second[:, 0] - base[2:, 0], torch.tensor([4.0, 6.0]))


def test_unreadable_images_are_error_rows_and_skip_the_stream(adaptations, tmp_path):
    paths = _images(tmp_path, n=5, bad_at=2)
    clf = _clf(scorer="clip", adapt="test-position")
    state = clf.scorer.new_state()
    preds = {p.path: p for p in clf.classify(paths, top_k=6, state=state)}
    assert [preds[str(p)].ok for p in paths] == [True, True, False, True, True]
    assert state.n == 4  # the unreadable image never entered the stream


@pytest.mark.parametrize("batch_size", [1, 4])
def test_transductive_scores_come_once_every_image_is_in(adaptations, tmp_path, batch_size):
    paths = _images(tmp_path, n=6, bad_at=4)
    ok = [p for i, p in enumerate(paths) if i != 4]
    base = _clf(scorer="awt", views=3).scores(ok)
    clf = _clf(scorer="awt", views=3, adapt="test-set-mean", batch_size=batch_size)
    preds = {p.path: p for p in clf.classify(paths, top_k=6)}
    assert [preds[str(p)].ok for p in paths] == [i != 4 for i in range(6)]
    want = base + base.mean(dim=0, keepdim=True)
    got = clf.scores(ok)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    # shuffled inputs: each image gets the same scores (order-free)
    perm = [3, 0, 4, 2, 1]
    again = clf.scores([ok[i] for i in perm])
    torch.testing.assert_close(again, got[perm], rtol=1e-5, atol=1e-4)


def _labelled(tmp_path, n=9):
    paths = _images(tmp_path, n=n)
    items = tuple(LabelledItem(p, (3 * i) % 6) for i, p in enumerate(paths))
    return LabelledData("toy", tuple(CLASSES), items, "test")


@pytest.mark.parametrize("image_cache", [True, False])
def test_eval_replays_an_online_adaptation_over_seeded_orders(adaptations, tmp_path, image_cache):
    data = _labelled(tmp_path)
    clf = _clf(scorer="clip")
    adapted = adapted_scorer("clip", "test-position", {"step": 5.0})
    res = evaluate(
        clf,
        data,
        ["clip", adapted],
        cache_root=tmp_path / "cache",
        image_cache=image_cache,
        orders=3,
        order_seed=7,
    )
    runs = res.runs["clip+test-position"]
    assert [r.seed for r in runs] == [7, 8, 9]
    base = _clf(scorer="clip").scores([it.path for it in data.items])
    labels = torch.tensor([it.label for it in data.items])
    accs = []
    for r in runs:  # each run: the stream in order_of(N, seed), image at position k +5k
        pos = torch.empty(len(labels))
        pos[order_of(len(labels), r.seed)] = torch.arange(len(labels), dtype=torch.float)
        want = base.clone()
        want[:, 0] += 5.0 * pos
        acc = (want.argmax(dim=1) == labels).double().mean().item()
        assert r.metrics.acc1 == pytest.approx(acc)
        accs.append(acc)
    assert res.metrics["clip+test-position"].acc1 == pytest.approx(sum(accs) / 3)
    assert res.metrics["clip"].acc1 == 1.0  # the base scorer is reported beside it
    rec = result_records(res, clf, model="m", data_root=tmp_path, split="test", limit=None)
    r = rec["clip+test-position"]
    assert (r["scorer"], r["adapt"], r["adapt_kind"]) == ("clip", "test-position", "online")
    assert r["adapt_config"] == {"step": 5.0}
    assert [o["seed"] for o in r["orders"]] == [7, 8, 9]
    mean = sum(accs) / 3
    std = (sum((a - mean) ** 2 for a in accs) / 3) ** 0.5
    assert r["metrics_std"]["acc1"] == pytest.approx(std)
    assert rec["clip"]["adapt"] is None
    json.dumps(rec, allow_nan=False)


def test_eval_of_a_transductive_adaptation_is_one_order_free_run(adaptations, tmp_path):
    data = _labelled(tmp_path)
    shuffled = LabelledData("toy", data.classes, data.items[::-1], "test")
    clf = _clf(scorer="awt", views=3)
    a = adapted_scorer("awt", "test-set-mean")
    one = evaluate(clf, data, [a], cache_root=None, orders=4)
    two = evaluate(clf, shuffled, [a], cache_root=None)
    assert [r.seed for r in one.runs[a.name]] == [None]
    assert one.metrics[a.name] == two.metrics[a.name]


def test_a_logit_model_cannot_be_adapted(adaptations):
    with pytest.raises(ValueError, match="adaptation reads image embeddings"):
        awt_engine.create_classifier(
            classes=CLASSES, embedder=ColourLogitModel(), adapt="test-position"
        )


def test_bad_adaptation_settings_are_refused_before_loading(adaptations):
    with pytest.raises(ValueError, match="unknown adaptation 'nope'"):
        awt_engine.create_classifier(classes=CLASSES, adapt="nope")
    with pytest.raises(ValueError, match="unknown option 'stp'"):
        awt_engine.create_classifier(
            classes=CLASSES, adapt="test-position", adapt_options={"stp": 1}
        )
    with pytest.raises(ValueError, match=r"between 0\.0 and 100\.0"):
        awt_engine.create_classifier(
            classes=CLASSES, adapt="test-position", adapt_options={"step": "1e9"}
        )
    with pytest.raises(ValueError, match="shortlist"):
        _clf(adapt="test-position", shortlist=2)


def test_cli_refusals_are_usage_errors(adaptations, tmp_path):
    from awt_engine.cli import app

    runner = CliRunner()
    img = _images(tmp_path, n=1)[0]
    cases = [
        (
            ["classify", str(img), "--classes", "red,blue", "--adapt", "test-position", "--ray"],
            "--ray",
        ),
        (["classify", str(img), "--classes", "red,blue", "--set", "step=1"], "give --adapt"),
        (
            [
                "classify",
                str(img),
                "--classes",
                "red,blue",
                "--adapt",
                "test-position",
                "--set",
                "x",
            ],
            "NAME=VALUE",
        ),
        (["eval", "--data-root", str(tmp_path), "--orders", "2"], "give --adapt"),
    ]
    for args, message in cases:
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        assert message in res.output, (args, res.output)


def _pairwise_auroc(id_conf, ood_conf):
    wins = 0.0
    for a in id_conf.tolist():
        for b in ood_conf.tolist():
            wins += 1.0 if a > b else 0.5 if a == b else 0.0
    return wins / (len(id_conf) * len(ood_conf))


def _ood_images(tmp_path, n=4):
    folder = tmp_path / "ood"
    folder.mkdir()
    from PIL import Image

    paths = []
    for i in range(n):  # greys: no colour class fits them
        p = folder / f"g{i}.png"
        Image.new("RGB", (24, 18), (90 + 20 * i,) * 3).save(p)
        paths.append(p)
    return paths


def test_eval_reports_ood_detection_for_plain_and_adapted_scorers(adaptations, tmp_path):
    data = _labelled(tmp_path)
    ood = _ood_images(tmp_path)
    clf = _clf(scorer="clip")
    a = adapted_scorer("clip", "test-position", {"step": 0.5})
    res = evaluate(clf, data, ["clip", a], cache_root=None, ood=ood, orders=2)
    base_id = _clf(scorer="clip").scores([it.path for it in data.items])
    base_ood = _clf(scorer="clip").scores(ood)
    conf = lambda s: torch.softmax(s.float(), dim=-1).max(dim=-1).values  # noqa: E731
    m = res.metrics["clip"]
    assert m.ood_auroc == pytest.approx(_pairwise_auroc(conf(base_id), conf(base_ood)))
    assert m.ood_auroc > 0.9  # greys are less certain than pure colours
    # adapted: each run replays ID + OOD images together in the run's seeded order
    N, M = len(data.items), len(ood)
    aurocs = []
    for seed in (0, 1):
        both = torch.cat([base_id, base_ood])
        pos = torch.empty(N + M)
        pos[order_of(N + M, seed)] = torch.arange(N + M, dtype=torch.float)
        both[:, 0] += 0.5 * pos
        aurocs.append(_pairwise_auroc(conf(both[:N]), conf(both[N:])))
    got = res.metrics[a.name].ood_auroc
    assert got == pytest.approx(sum(aurocs) / 2)
    assert [r.metrics.ood_auroc for r in res.runs[a.name]] == pytest.approx(aurocs)


def test_cli_eval_writes_reliability_plots_and_ood_metrics(adaptations, tmp_path, monkeypatch):
    from PIL import Image

    from awt_engine import backbone as backbone_mod
    from awt_engine.cli import app
    from tests.fixtures_embedders import ColourBackbone

    root = tmp_path / "data"
    for c in CLASSES[:3]:
        (root / c).mkdir(parents=True)
        for k in range(2):
            solid(c).save(root / c / f"{k}.png")
    _ood_images(tmp_path)
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: ColourBackbone())
    args = ["eval", "--data-root", str(root), "--views", "2", "-s", "clip"]
    args += ["--adapt", "test-position", "--set", "step=0.5", "--orders", "2"]
    args += ["--ood-root", str(tmp_path / "ood"), "--plots", str(tmp_path / "plots")]
    args += ["-o", str(tmp_path / "out"), "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "OOD AUROC" in res.output and "clip+test-position" in res.output
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == [
        "reliability__data__clip__all.png",
        "reliability__data__clip_test-position__all.png",
    ]
    with Image.open(tmp_path / "plots" / pngs[0]) as im:
        assert im.format == "PNG" and im.size[0] > 300
    recs = {
        json.loads(p.read_text())["adapt"]: json.loads(p.read_text())
        for p in (tmp_path / "out").iterdir()
    }
    assert set(recs) == {None, "test-position"}
    assert recs["test-position"]["ood_root"] == str(tmp_path / "ood")
    assert recs["test-position"]["metrics"]["ood_auroc"] is not None
    assert len(recs["test-position"]["orders"]) == 2


def test_scorers_verbose_lists_every_adaptation_with_its_options():
    import dataclasses

    from awt_engine.adapt import ADAPTATIONS
    from awt_engine.cli import app
    from awt_engine.cli._common import ADAPT_NAMES

    assert set(ADAPT_NAMES) == set(ADAPTATIONS)  # the --adapt help names them all
    res = CliRunner().invoke(app, ["scorers", "--verbose"])
    assert res.exit_code == 0, res.output
    for name, a in ADAPTATIONS.items():
        assert f"\n{name}" in res.output
        for f in dataclasses.fields(a.Config):
            default = getattr(a.default_config(), f.name)
            assert f"--set {f.name}={default!r}" in res.output, (name, f.name)
    short = CliRunner().invoke(app, ["scorers"]).output
    assert "tda" in short and "    --set" not in short


def test_calibration_notes_name_an_adaptation_that_worsens_ece():
    from awt_engine.evaluate_adapted import calibration_notes
    from awt_engine.metrics import Metrics

    a = adapted_scorer("clip", "tda")
    m = {
        "clip": Metrics(0.5, None, 0.5, 10, 0, ece=0.05),
        a.name: Metrics(0.6, None, 0.6, 10, 0, ece=0.2),
    }
    (note,) = calibration_notes(m, {"clip": a.base, a.name: a})
    assert "clip+tda: ECE 20.00% against 5.00% for clip" in note
    m[a.name] = Metrics(0.6, None, 0.6, 10, 0, ece=0.055)
    assert calibration_notes(m, {"clip": a.base, a.name: a}) == []


def test_every_adaptation_on_a_trained_checkpoint(coop_checkpoint, toy_task):
    """The three adaptations on top of a CoOp checkpoint's scores and embeddings."""
    from awt_engine.adapt import list_adaptations
    from awt_engine.labelled import load_labelled

    data = load_labelled(toy_task.root, split="test")
    clf = awt_engine.create_classifier(checkpoint=coop_checkpoint, views=2, device="cpu")
    adapted = [adapted_scorer("awt", n) for n in list_adaptations()]
    res = evaluate(clf, data, ["awt", *adapted], cache_root=None, orders=2)
    recs = result_records(res, clf, model="m", data_root="x", split="test", limit=None)
    for a in adapted:
        m = res.metrics[a.name]
        assert m.n_images == len(data.items) and 0.0 <= m.acc1 <= 1.0
        assert recs[a.name]["method"] == "coop" and recs[a.name]["adapt"] == a.adaptation.name
        json.dumps(recs[a.name], allow_nan=False)
