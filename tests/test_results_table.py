"""Results in one table (`awt-engine results`), the suite run (`eval --suite`) and eval's
records after the move of its orchestration into :mod:`awt_engine.eval_runs`.

The expected figures are computed here from the records with plain arithmetic (means,
population standard deviations), never read back from the table code."""

import csv
import io
import json
import math
import shutil

import pytest
from typer.testing import CliRunner

from awt_engine import backbone as backbone_mod
from awt_engine.cli import app
from awt_engine.eval_runs import COOP11, SUITES, find_suite
from awt_engine.results_table import notes, results_table
from tests.fixtures_embedders import ColourBackbone, solid
from tests.suite_data import coop_set

runner = CliRunner()
ZS_AWT, ZS_CLIP, COOP = "ViT-B-16 / awt", "ViT-B-16 / clip", "coop 4-shot ViT-B-16 / clip"


def _record(dataset, scorer, acc1, run_id, **extra):
    return {
        "dataset": dataset,
        "model": "ViT-B-16",
        "pretrained": "openai",
        "metrics": {"acc1": acc1, "acc5": None},
        "scorer": scorer,
        "run_id": run_id,
        "subsample": "all",
        "adapt": None,
        **extra,
    }


# zero-shot: dtd, eurosat and oxford_pets with awt; dtd and eurosat with clip (pets missing)
ZERO_SHOT = {("dtd", "awt"): 0.50, ("dtd", "clip"): 0.40, ("eurosat", "awt"): 0.60}
ZERO_SHOT |= {("eurosat", "clip"): 0.55, ("oxford_pets", "awt"): 0.90}
# CoOp 4 shots, clip: three seeds on dtd, two on eurosat, none on pets
SEEDS = {"dtd": [0.60, 0.62, 0.67], "eurosat": [0.70, 0.80]}


def _write(folder, name, rec):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(rec), encoding="utf-8")


@pytest.fixture
def two_folders(tmp_path):
    a, b = tmp_path / "zero-shot", tmp_path / "coop"
    for (ds, sc), acc in ZERO_SHOT.items():
        _write(a, f"{ds}__{sc}.json", _record(ds, sc, acc, f"zs-{ds}"))
    for ds, values in SEEDS.items():
        for seed, acc in enumerate(values, start=1):
            rec = _record(ds, "clip", acc, f"coop-{ds}-{seed}", method="coop", shots=4)
            _write(b / f"seed{seed}", f"{ds}.json", rec)
    # the same run read twice counts once; a summary is passed over
    shutil.copy(a / "dtd__awt.json", b / "copy-of-dtd-awt.json")
    _write(b, "summary.json", {"format": "awt-engine-summary", "rows": []})
    return a, b


def _mean(xs):
    return sum(xs) / len(xs)


def _pstd(xs):
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def test_results_merges_folders_into_one_table_with_averages(two_folders, tmp_path):
    md, csv_path = tmp_path / "table.md", tmp_path / "table.csv"
    res = runner.invoke(
        app, ["results", *map(str, two_folders), "-o", str(md), "--csv", str(csv_path)]
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    by = {r["dataset"]: r for r in rows}
    assert list(by) == ["oxford_pets", "dtd", "eurosat", "average"]  # the papers' order
    # zero-shot cells: one run each, as recorded (in %)
    for (ds, sc), acc in ZERO_SHOT.items():
        col = ZS_AWT if sc == "awt" else ZS_CLIP
        assert float(by[ds][col]) == pytest.approx(100 * acc, abs=1e-4)
        assert by[ds][f"{col} n"] == "1"  # the copied dtd/awt file did not make it two
    assert by["oxford_pets"][ZS_CLIP] == "" and by["oxford_pets"][COOP] == ""
    # CoOp cells: the mean and population std over the seeds
    for ds, values in SEEDS.items():
        assert float(by[ds][COOP]) == pytest.approx(100 * _mean(values), abs=1e-4)
        assert float(by[ds][f"{COOP} std"]) == pytest.approx(100 * _pstd(values), abs=1e-4)
        assert by[ds][f"{COOP} n"] == str(len(values))
    # averages over the data sets present in each column
    awt = [ZERO_SHOT[(d, "awt")] for d in ("dtd", "eurosat", "oxford_pets")]
    clip = [ZERO_SHOT[(d, "clip")] for d in ("dtd", "eurosat")]
    coop = [_mean(SEEDS["dtd"]), _mean(SEEDS["eurosat"])]
    for col, values in ((ZS_AWT, awt), (ZS_CLIP, clip), (COOP, coop)):
        assert float(by["average"][col]) == pytest.approx(100 * _mean(values), abs=1e-4)
    text = md.read_text()
    assert text == res.stdout
    assert "| oxford_pets | 90.00 | - | - |" in text
    assert (
        f"| dtd | 50.00 | 40.00 | {100 * _mean(SEEDS['dtd']):.2f} ± {100 * _pstd(SEEDS['dtd']):.2f} |"
        in text
    )
    assert f"*{ZS_CLIP}: average over 2 of 3 data sets (missing: oxford_pets)" in text
    assert f"| average | {100 * _mean(awt):.2f} | {100 * _mean(clip):.2f}* |" in text
    assert "1 summary files passed over" in res.stderr


def test_a_file_that_is_not_an_eval_result_is_named(two_folders, tmp_path):
    bad = two_folders[1] / "seed1" / "notes.json"
    bad.write_text(json.dumps({"dataset": "dtd", "accuracy": 0.5}))
    res = runner.invoke(app, ["results", *map(str, two_folders)])
    assert res.exit_code == 2
    assert str(bad) in res.stderr and "not an eval result" in res.stderr
    assert "metrics" in res.stderr  # says what it lacks
    bad.write_text("{not json")
    res = runner.invoke(app, ["results", str(bad)])
    assert res.exit_code == 2 and str(bad) in res.stderr and "JSON" in res.stderr
    res = runner.invoke(app, ["results", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "no such file or folder" in res.stderr


def test_other_metrics_and_a_metric_that_is_null():
    recs = [_record("dtd", "awt", 0.5, "r1"), _record("eurosat", "awt", 0.7, "r2")]
    recs[0]["metrics"]["nll"], recs[1]["metrics"]["nll"] = 1.25, 0.75
    nll = results_table(recs, "nll")
    assert nll.cells[("dtd", ZS_AWT)].mean == 1.25
    assert nll.average(ZS_AWT).value == pytest.approx(1.0)
    top5 = results_table(recs, "acc5")  # null (fewer than 5 classes): no cell, no average
    assert not top5.cells and top5.average(ZS_AWT).value is None
    assert top5.average(ZS_AWT).missing == ("dtd", "eurosat")
    with pytest.raises(ValueError, match="unknown metric"):
        results_table(recs, "accuracy")


def test_base_to_new_gets_a_harmonic_mean_column(tmp_path):
    """CoCoOp's H: per data set 2BN / (B + N) of the seed means; the average row the H of
    the base and new averages (over the sets with both), not the mean of the per-set H."""
    cocoop = "cocoop 16-shot ViT-B-16 / clip"
    base = {"dtd": [0.80, 0.70], "eurosat": [0.90], "oxford_pets": [0.95]}
    new = {"dtd": [0.60], "eurosat": [0.50, 0.40]}  # pets: no new result
    recs = []
    for part, table in (("base", base), ("new", new)):
        for ds, values in table.items():
            for seed, acc in enumerate(values):
                rec = _record(ds, "clip", acc, f"{ds}-{part}-{seed}", subsample=part)
                recs.append(rec | {"method": "cocoop", "shots": 16})
    hm = f"{cocoop} [HM]"
    t = results_table(recs)
    assert t.columns == (f"{cocoop} [base]", f"{cocoop} [new]", hm)
    b, n = {d: _mean(v) for d, v in base.items()}, {d: _mean(v) for d, v in new.items()}
    for ds in ("dtd", "eurosat"):
        assert t.cells[(ds, hm)].mean == pytest.approx(2 * b[ds] * n[ds] / (b[ds] + n[ds]))
    assert ("oxford_pets", hm) not in t.cells
    avg_b, avg_n = (b["dtd"] + b["eurosat"]) / 2, (n["dtd"] + n["eurosat"]) / 2
    assert t.average(hm).value == pytest.approx(2 * avg_b * avg_n / (avg_b + avg_n))
    assert t.average(hm).missing == ("oxford_pets",)
    per_set = [t.cells[(d, hm)].mean for d in ("dtd", "eurosat")]
    assert abs(t.average(hm).value - _mean(per_set)) > 1e-3  # the two rules differ here
    assert "harmonic mean" in "\n".join(notes(t))
    assert not results_table(recs, "nll").harmonic  # only for accuracies
    for ds, part in (("x", "base"), ("x", "all")):  # a base column alone: no HM column
        lone = results_table([_record(ds, "clip", 0.5, "r", subsample=part)])
        assert not lone.harmonic and all("[HM]" not in c for c in lone.columns)
    folder = tmp_path / "runs"
    for i, rec in enumerate(recs):
        _write(folder, f"r{i}.json", rec)
    res = runner.invoke(app, ["results", str(folder)])
    assert res.exit_code == 0, res.output
    want = 100 * 2 * b["dtd"] * n["dtd"] / (b["dtd"] + n["dtd"])
    assert (
        f"| dtd | {100 * b['dtd']:.2f} ± 5.00 | {100 * n['dtd']:.2f} | {want:.2f} |" in res.stdout
    )


# --------------------------------------------------------------------------- suites


def test_suites_are_the_papers_data_sets(tmp_path):
    assert len(COOP11) == 11 and SUITES["coop10"] == COOP11[1:] and COOP11[0] == "imagenet"
    coop_set(tmp_path, "eurosat")
    (tmp_path / "oxford_pets").mkdir()
    found = find_suite(tmp_path, SUITES["coop10"])
    assert found.present == {
        "oxford_pets": tmp_path / "oxford_pets",
        "eurosat": tmp_path / "eurosat",
    }
    assert set(found.absent) == set(SUITES["coop10"]) - {"oxford_pets", "eurosat"}


@pytest.fixture
def colour_backbone(monkeypatch):
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: ColourBackbone())


def test_eval_suite_runs_the_present_sets_and_names_the_absent(tmp_path, colour_backbone):
    root = tmp_path / "data"
    coop_set(root, "eurosat")
    coop_set(root, "oxford_pets", seed=1)
    out = tmp_path / "results"
    args = ["eval", "--suite", "coop10", "--data-root", str(root), "--views", "1"]
    args += ["--scorer", "clip", "--scorer", "awt", "--descriptions", "0"]
    res = runner.invoke(app, [*args, "-o", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    absent = set(SUITES["coop10"]) - {"eurosat", "oxford_pets"}
    warning = next(line for line in res.stderr.splitlines() if "not under" in line)
    assert "8 of 10" in warning and all(name in warning for name in absent)
    assert "caltech101 (caltech-101/ or caltech101/)" in warning  # the folders it looked for
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*__*.json"))]
    assert sorted((r["dataset"], r["scorer"]) for r in records) == [
        ("eurosat", "awt"),
        ("eurosat", "clip"),
        ("oxford_pets", "awt"),
        ("oxford_pets", "clip"),
    ]
    for r in records:  # each set with its own classes and template, from its own folder
        assert r["data_root"] == str(root / r["dataset"])
        assert r["n_images"] == {"eurosat": 10, "oxford_pets": 37}[r["dataset"]]
    table = {r["dataset"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    for scorer in ("awt", "clip"):
        col = f"ViT-B-16-quickgelu / {scorer}"
        accs = {r["dataset"]: r["metrics"]["acc1"] for r in records if r["scorer"] == scorer}
        for ds, acc in accs.items():
            assert float(table[ds][col]) == pytest.approx(100 * acc, abs=1e-4)
        assert float(table["average"][col]) == pytest.approx(50 * sum(accs.values()), abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["suite"] == "coop10" and set(summary["absent"]) == absent
    assert "coop10 summary:" in res.stdout and (out / "summary.md").read_text() in res.stdout
    # the results command reads the same folder back into the same table
    again = runner.invoke(app, ["results", str(out), "--csv", str(tmp_path / "t.csv")])
    assert again.exit_code == 0
    assert (tmp_path / "t.csv").read_text() == (out / "summary.csv").read_text()


def test_eval_suite_usage_errors(tmp_path, colour_backbone):
    empty = tmp_path / "empty"
    empty.mkdir()
    res = runner.invoke(app, ["eval", "--suite", "coop11", "--data-root", str(empty)])
    assert res.exit_code == 2 and "none of its data sets" in res.stderr
    res = runner.invoke(app, ["eval", "--suite", "coop12", "--data-root", str(empty)])
    assert res.exit_code == 2 and "unknown suite" in res.stderr and "coop10" in res.stderr
    args = ["eval", "--suite", "coop11", "--data-root", str(empty), "--dataset", "dtd"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "drop --dataset" in res.stderr


def test_a_present_set_that_cannot_be_read_is_named_and_the_rest_run(tmp_path, colour_backbone):
    root = tmp_path / "data"
    coop_set(root, "eurosat")
    (root / "dtd").mkdir(parents=True)  # there, but no split file nor class folders
    args = ["eval", "--suite", "coop10", "--data-root", str(root), "--views", "1"]
    res = runner.invoke(app, [*args, "--scorer", "clip", "--descriptions", "0", "--no-progress"])
    assert res.exit_code == 1
    assert any(line.startswith("error: dtd: ") for line in res.stderr.splitlines())
    assert "| eurosat |" in res.stdout


# --------------------------------------------------------------------------- eval unchanged


@pytest.fixture
def colours(tmp_path):
    root = tmp_path / "colours"
    for label, name in enumerate(["red", "green", "blue", "yellow"]):
        (root / name).mkdir(parents=True)
        for i in range(2):
            solid(name if i == 0 else "red", (16 + i, 12 + label)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("subsample", ["all", "base-new"])
def test_eval_writes_the_records_of_the_lower_level_calls(
    colours, tmp_path, colour_backbone, subsample
):
    """The CLI's JSONs are result_records of protocols.evaluate_subsamples, as the CLI
    composed them before eval_runs existed (every field but the time of writing)."""
    from awt_engine import protocols
    from awt_engine.dispatch import ModelSource
    from awt_engine.evaluate import result_records
    from awt_engine.labelled import load_labelled

    out = tmp_path / "out"
    args = ["eval", "--data-root", str(colours), "--views", "3", "--template", "a photo of a {}"]
    args += ["--scorer", "awt", "--scorer", "clip", "--subsample", subsample, "-o", str(out)]
    res = runner.invoke(app, [*args, "--no-image-cache", "--no-progress"])
    assert res.exit_code == 0, res.output
    got = {}
    for p in out.glob("*.json"):
        rec = json.loads(p.read_text())
        rec.pop("created")
        got[(rec["subsample"], rec["scorer"])] = rec

    net = ModelSource(device="auto").load()
    data = load_labelled(colours)
    parts = ["base", "new"] if subsample == "base-new" else ["all"]
    options = dict(template="a photo of a {}", views=3, seed=0, batch_size=4, workers=2)
    runs = protocols.evaluate_subsamples(net, data, parts, ["awt", "clip"], options=options)
    want = {}
    for part, run in runs.items():
        recs = result_records(
            run.result,
            run.classifier,
            model="ViT-B-16-quickgelu",
            data_root=colours,
            split="test",
            limit=None,
            subsample=part,
        )
        for name, rec in recs.items():
            rec.pop("created")
            want[(part, name)] = json.loads(json.dumps(rec))
    assert got == want
    if subsample == "base-new":
        for name in ("awt", "clip"):
            b, n = want[("base", name)]["metrics"]["acc1"], want[("new", name)]["metrics"]["acc1"]
            assert (
                f"{name}: base {100 * b:.2f}%, new {100 * n:.2f}%, harmonic mean {200 * b * n / (b + n):.2f}%"
                in res.stdout
            )


def test_a_suite_checks_every_label_set_before_the_model_loads(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(backbone_mod, "load_backbone", no_model)
    root = tmp_path / "data"
    coop_set(root, "eurosat")
    coop_set(root, "oxford_pets")
    res = runner.invoke(app, ["eval", "--suite", "coop11", "--data-root", str(root)])
    assert res.exit_code == 2, res.output
    assert "2 data sets cannot be labelled" in res.stderr
    for name in ("eurosat", "oxford_pets"):  # each named, with describe's hint
        assert f"{name}: no class descriptions for data set '{name}'" in res.stderr


def test_metric_names_are_the_eval_records():
    """results_table keeps its own copy of the metric names (it loads no torch): the same
    names, in the same order, as the eval records' (metrics.NUMBERS)."""
    from awt_engine import metrics, results_table

    assert results_table.METRICS == metrics.NUMBERS
