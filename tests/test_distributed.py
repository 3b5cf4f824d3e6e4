"""Ray Data: the same rows and metrics as the local run, on a local Ray instance."""

import json

import pytest
import torch
from typer.testing import CliRunner

import awt_engine
from awt_engine.cli import app

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a Ray instance takes seconds to start on 2 cores


@pytest.fixture(scope="module")
def local_ray():
    from awt_engine import distributed

    distributed.init(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def folder(toy_task, tmp_path):
    """Some toy images, one broken file among them."""
    out = tmp_path / "imgs"
    out.mkdir()
    paths = sorted((toy_task.root / "test").rglob("*.png"))[::3]
    for p in paths:
        (out / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
    (out / "broken.png").write_bytes(b"not a png")
    return out


KW = dict(views=3, device="cpu")


def close(a, b):
    """Equal up to float32 rounding: a GEMM over 2 images rounds unlike one over 16 (the
    same ~1e-7 relative noise as changing --batch-size in a local run)."""
    return torch.allclose(torch.tensor(list(a)), torch.tensor(list(b)), rtol=1e-5, atol=1e-5)


@pytest.fixture
def one_thread():
    """A local run with the CPU actors' thread count (num_cpus=1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _local(files, **kw):
    clf = awt_engine.create_classifier(**kw)
    return {p.path: p for p in clf.classify(files)}


def test_rows_equal_the_local_run_bit_for_bit(
    local_ray, folder, tiny_clip_dir, toy_task, tmp_path, one_thread
):
    """Local files, and a file:// prefix read as bytes by Ray (as s3:// would be), one
    image per forward pass and one thread on both sides: nothing is left to round
    differently, so every score is the same float, whichever actor got the image."""
    from awt_engine.distributed import classify_dataset

    remote = tmp_path / "remote"
    remote.mkdir()
    for p in sorted(folder.iterdir())[:3]:
        (remote / p.name.replace(".png", "-r.png")).write_bytes(p.read_bytes())
    (remote / "broken-r.png").write_bytes(b"\x89PNG truncated")
    kw = dict(model=tiny_clip_dir, classes=list(toy_task.classes), batch_size=1, **KW)
    inputs = [str(folder), f"file://{remote}"]
    rows = classify_dataset(inputs, concurrency=2, rows_per_batch=3, **kw).take_all()
    files = sorted(str(x) for d in (folder, remote) for x in d.iterdir())
    want = _local(files, **kw)
    assert sorted(r["path"] for r in rows) == sorted(want)
    for r in rows:
        p = want[r["path"]]
        if p.ok:
            assert r["error"] is None and list(r["labels"]) == [x["label"] for x in p.predictions]
            assert list(r["scores"]) == [x["score"] for x in p.predictions]
        else:  # an unreadable file is an error row (the same reason); the job goes on
            assert r["error"] == p.error and "broken" in r["path"]
    assert sum(r["error"] is not None for r in rows) == 2


def test_cli_classify_ray_parquet_with_a_trained_checkpoint(
    local_ray, toy_task, coop_checkpoint, tmp_path, folder
):
    """A trained CoOp checkpoint on the actor pool, through the CLI, into Parquet: the
    rows in input order, the broken file an error row, exit 1 (as locally)."""
    import pyarrow.parquet as pq

    ckpt = coop_checkpoint
    out = tmp_path / "preds.parquet"
    res = CliRunner().invoke(
        app,
        [
            "classify",
            str(folder),
            "--checkpoint",
            str(ckpt),
            "--views",
            "3",
            "--device",
            "cpu",
            "--ray",
            "--concurrency",
            "1",
            "-o",
            str(out),
            "--no-progress",
        ],
    )
    assert res.exit_code == 1, res.output  # one unreadable file
    rows = pq.read_table(out).to_pylist()
    local = awt_engine.create_classifier(checkpoint=ckpt, **KW)
    inputs = sorted(str(x) for x in folder.iterdir())  # the order find_images gives
    assert [r["path"] for r in rows] == inputs  # rows in input order
    ray_data = pytest.importorskip("ray.data")
    # ordered by that pipeline's own context: the process's stays as it was
    assert not ray_data.DataContext.get_current().execution_options.preserve_order
    want = {p.path: p for p in local.classify(inputs)}
    for r in rows:
        p = want[r["path"]]
        if p.ok:
            assert r["error"] is None and r["labels"] == [x["label"] for x in p.predictions]
            assert close(r["scores"], [x["score"] for x in p.predictions])
        else:
            assert r["error"] == p.error and r["labels"] == []
    assert f"error: {folder / 'broken.png'}" in res.output


def test_cli_eval_ray_writes_the_same_json(local_ray, toy_task, tiny_clip_dir, tmp_path):
    runner = CliRunner()
    base = [
        "eval",
        "--data-root",
        str(toy_task.root),
        "--model",
        tiny_clip_dir,
        "--views",
        "3",
        "--device",
        "cpu",
        "--no-progress",
        "--no-image-cache",
    ]
    a = runner.invoke(app, [*base, "-o", str(tmp_path / "local")])
    b = runner.invoke(app, [*base, "-o", str(tmp_path / "ray"), "--ray", "--concurrency", "2"])
    assert a.exit_code == 0 and b.exit_code == 0, (a.output, b.output)
    (fa,), (fb,) = list((tmp_path / "local").iterdir()), list((tmp_path / "ray").iterdir())
    ra, rb = json.loads(fa.read_text()), json.loads(fb.read_text())
    calib = ("ece", "ece_adaptive", "nll", "brier", "aurc")
    exact = {k: v for k, v in ra["metrics"].items() if k not in calib}
    assert exact == {k: v for k, v in rb["metrics"].items() if k not in calib}
    assert ra["per_class_recall"] == rb["per_class_recall"]
    # calibration is a float function of the scores, which agree to rounding across
    # batch compositions (docs/design.md 1.2): equal to about float32 precision
    for k in calib:
        assert ra["metrics"][k] == pytest.approx(rb["metrics"][k], rel=1e-5, abs=1e-6), k
    assert fa.name == fb.name  # the same run: the same file name


def test_ray_flag_without_ray_says_how_to_install(monkeypatch, folder):
    import builtins

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    from awt_engine import distributed

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ImportError, match=r"uv sync --extra ray"):
        distributed.import_ray()


def test_eval_ray_gathers_and_adapts_once(local_ray, toy_task, tiny_clip_dir, tmp_path):
    """Adapted scorers on Ray: actors collect, the driver adapts (one ordered stream per
    seeded order for tda, the whole set for transclip): the local run's accuracies."""
    from awt_engine.adapt.scorer import adapted_scorer
    from awt_engine.dispatch import ModelSource, RayOptions, evaluate_with
    from awt_engine.evaluate import result_records
    from awt_engine.labelled import load_labelled

    data = load_labelled(toy_task.root, split="test")
    source = ModelSource(tiny_clip_dir, None, device="cpu")  # random weights, as the CLI test
    options = dict(classes=list(data.classes), views=3)
    clf = awt_engine.create_classifier(**source.kwargs(), **options)
    scorers = ["awt", adapted_scorer("awt", "tda"), adapted_scorer("awt", "transclip")]
    kw = dict(source=source, options=options, eval_options={"orders": 2})
    a = evaluate_with(clf, data, scorers, **kw)
    b = evaluate_with(clf, data, scorers, ray=RayOptions(concurrency=2), **kw)
    for name in ("awt", "awt+tda", "awt+transclip"):
        ma, mb = a.metrics[name], b.metrics[name]
        assert (ma.acc1, ma.per_class_recall) == (mb.acc1, mb.per_class_recall), name
        assert ma.nll == pytest.approx(mb.nll, rel=1e-4), name
    assert [r.seed for r in b.runs["awt+tda"]] == [0, 1]
    assert [r.seed for r in b.runs["awt+transclip"]] == [None]
    recs = result_records(b, clf, model="tiny", data_root=toy_task.root, split="test", limit=None)
    assert recs["awt+tda"]["adapt"] == "tda" and len(recs["awt+tda"]["orders"]) == 2
