"""The training protocols as calls: CoOp's few-shot protocol (K shots x seeds, each
checkpoint evaluated, mean and std per K), cross-data-set transfer, and `awt-engine
fewshot`. The summaries are checked against the per-run JSONs with plain arithmetic
written here (mean, population standard deviation as CoOp's parse_test_res.py)."""

import csv
import json
import math
import shutil

import pytest
from typer.testing import CliRunner

from awt_engine import experiments
from awt_engine.checkpoints import read_checkpoint_header
from awt_engine.cli import app
from awt_engine.eval_runs import EvalPlan
from tests.fixtures_training import make_toy_task
from tests.suite_data import coop_set

PLAN = EvalPlan(scorers=("clip",), options={"views": 1}, image_cache=False)


def _train_options(model):
    return dict(model=model, device="cpu", epochs=1, batch_size=4, options={"n_ctx": "4"})


def _records(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def _pstd(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


@pytest.mark.slow  # four trainings and four evaluations: about 10 s on 2 cores
def test_few_shot_trains_every_k_and_seed_and_summarises_over_seeds(
    toy_task, train_clip_dir, tmp_path
):
    out = tmp_path / "fewshot"
    kwargs = dict(data_root=toy_task.root, output=out, plan=PLAN)
    kwargs["train_options"] = _train_options(train_clip_dir)
    done = experiments.few_shot("coop", shots=(1, 2), seeds=(1, 2), **kwargs)
    assert [(r.shots, r.seed, r.reused) for r in done.runs] == [
        (1, 1, False),
        (1, 2, False),
        (2, 1, False),
        (2, 2, False),
    ]
    summary = {r["dataset"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    name = toy_task.root.name
    for k in (1, 2):
        accs = []
        for s in (1, 2):
            ckpt = out / "checkpoints" / f"coop-{k}shot-seed{s}.safetensors"
            header = read_checkpoint_header(ckpt)
            assert (header["shots"], header["seed"], header["method"]) == (k, s, "coop")
            (rec,) = _records(out / f"{k}shot" / f"seed{s}")  # one data set, one scorer
            assert (rec["shots"], rec["checkpoint"], rec["split"]) == (k, str(ckpt), "test")
            assert rec["dataset"] == name and rec["n_images"] == 5 * toy_task.test_per_class
            accs.append(rec["metrics"]["acc1"])
        col = f"coop {k}-shot {rec['model']} / clip"
        assert float(summary[name][col]) == pytest.approx(100 * sum(accs) / 2, abs=1e-4)
        assert float(summary[name][f"{col} std"]) == pytest.approx(100 * _pstd(accs), abs=1e-4)
        assert summary[name][f"{col} n"] == "2"
        cell = next(
            c for c in json.loads((out / "summary.json").read_text())["cells"] if c["column"] == col
        )
        assert cell["values"] == accs
    assert "mean ± standard deviation over runs" in (out / "summary.md").read_text()

    # a checkpoint of another run where this one would write is refused, named
    shutil.copy(
        out / "checkpoints" / "coop-1shot-seed1.safetensors",
        out / "checkpoints" / "coop-1shot-seed3.safetensors",
    )
    with pytest.raises(
        ValueError, match=r"coop-1shot-seed3\.safetensors exists but is another run's"
    ):
        experiments.few_shot("coop", shots=(1,), seeds=(3,), **kwargs)


def test_shots_and_seeds_are_checked_before_any_training(tmp_path):
    for shots, seeds in (((0,), (1,)), ((1, 1), (1,)), ((1,), ()), ((1.5,), (1,))):
        with pytest.raises(ValueError):
            experiments.few_shot(
                "coop", data_root=tmp_path, output=tmp_path, shots=shots, seeds=seeds
            )


def test_cross_dataset_evaluates_each_checkpoint_on_every_target(
    toy_task, train_clip_dir, tmp_path, monkeypatch
):
    other = make_toy_task(tmp_path / "three", classes=("amber", "cobalt", "olive"), seed=5)
    out = tmp_path / "xd"
    kwargs = dict(data_root=toy_task.root, targets={"toy3": other.root}, output=out, plan=PLAN)
    kwargs["train_options"] = _train_options(train_clip_dir)
    done = experiments.cross_dataset("coop", shots=(1,), seeds=(1,), **kwargs)
    (run,) = done.runs
    assert list(run.outcomes) == [toy_task.root.name, "toy3"]  # the training set first
    by_set = {r["dataset"]: r for r in _records(out / "1shot" / "seed1")}
    assert set(by_set) == {toy_task.root.name, "toy3"}
    target = by_set["toy3"]
    assert target["classes"] == ["amber", "cobalt", "olive"]  # the target's own classes
    assert target["n_images"] == 3 * other.test_per_class
    assert target["checkpoint"] == str(run.checkpoint)
    assert by_set[toy_task.root.name]["classes"] == sorted(toy_task.classes)  # its folders
    assert {r for r, _ in done.table.cells} == {toy_task.root.name, "toy3"}

    # run again: the checkpoint is there, so nothing trains and the table is the same
    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr("awt_engine.training.train", no_training)
    again = experiments.cross_dataset("coop", shots=(1,), seeds=(1,), **kwargs)
    assert again.runs[0].reused and again.table == done.table
    with pytest.raises(ValueError, match="at least one target"):
        experiments.cross_dataset("coop", data_root=toy_task.root, targets={}, output=out)


def test_cli_fewshot_with_transfer_to_the_suite_sets_under_a_folder(
    toy_task, train_clip_dir, tmp_path
):
    suite_root = tmp_path / "data"
    coop_set(suite_root, "eurosat")
    out = tmp_path / "out"
    args = ["fewshot", "-m", "coop", "--data-root", str(toy_task.root), "--shots", "1"]
    args += ["--seeds", "1", "--epochs", "1", "--batch-size", "4", "--set", "n_ctx=4"]
    args += ["--model", train_clip_dir, "--device", "cpu", "--views", "1", "--scorer", "clip"]
    args += ["--descriptions", "0", "--transfer", str(suite_root), "-o", str(out), "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "not transferred to: imagenet, caltech101" in res.stderr
    assert "1 shots, seed 1: training" in res.stderr
    recs = _records(out / "1shot" / "seed1")
    assert sorted(r["dataset"] for r in recs) == sorted([toy_task.root.name, "eurosat"])
    assert "coop few-shot summary:" in res.stdout and "| eurosat |" in res.stdout
    assert (out / "summary.md").read_text() in res.stdout
    bad = CliRunner().invoke(app, [*args[:-5], "--shots", "1,x", "-o", str(out)])
    assert bad.exit_code == 2 and "--shots '1,x'" in bad.stderr


def test_base_to_new_learns_the_base_half_and_reports_both_halves(
    toy_task, train_clip_dir, tmp_path
):
    """CoOp's base-to-new: the checkpoint trains on the base classes (the first half in
    label order, rounded up) and is evaluated on base and new, with their harmonic mean;
    a transfer target is evaluated on all its classes."""
    other = make_toy_task(tmp_path / "three", classes=("amber", "cobalt", "olive"), seed=5)
    plan = EvalPlan(
        scorers=("clip",), options={"views": 1}, image_cache=False, subsample="base-new"
    )
    done = experiments.few_shot(
        "coop",
        data_root=toy_task.root,
        output=tmp_path / "b2n",
        shots=(1,),
        seeds=(1,),
        plan=plan,
        train_options=_train_options(train_clip_dir),
        targets={"toy3": other.root},
    )
    (run,) = done.runs
    classes = sorted(toy_task.classes)
    assert read_checkpoint_header(run.checkpoint)["subsample"] == "base"
    own = run.outcomes[toy_task.root.name]
    assert own.runs["base"].data.classes == tuple(classes[:3])
    assert own.runs["new"].data.classes == tuple(classes[3:])
    b = own.runs["base"].result.metrics["clip"].acc1
    n = own.runs["new"].result.metrics["clip"].acc1
    hm = own.harmonic["clip"].harmonic_mean
    assert hm == (pytest.approx(2 * b * n / (b + n)) if b + n else None)
    assert list(run.outcomes["toy3"].runs) == ["all"]
    recs = _records(tmp_path / "b2n" / "1shot" / "seed1")
    assert sorted((r["dataset"], r["subsample"]) for r in recs) == [
        (toy_task.root.name, "base"),
        (toy_task.root.name, "new"),
        ("toy3", "all"),
    ]


def test_transfer_targets_are_checked_before_any_training(toy_task, tmp_path, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("trained")

    monkeypatch.setattr("awt_engine.training.train", no_training)
    folder = coop_set(tmp_path / "data", "eurosat")  # no description cache for eurosat
    with pytest.raises(ValueError, match="1 transfer targets cannot be labelled") as err:
        experiments.few_shot(
            "coop", data_root=toy_task.root, output=tmp_path / "o", targets={"eurosat": folder}
        )
    assert "no class descriptions for data set 'eurosat'" in str(err.value)
