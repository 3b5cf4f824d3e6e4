"""Issue 21 item 3, training you can watch: the line per epoch on stderr (not a terminal),
the JSONL log beside the checkpoint (resume gives the uninterrupted run's log, nothing
non-finite reaches it), the training plot (`--plot`, `plot-training`), and TensorBoard
behind an option (a clear error without the package)."""

import json
import math
import re
import sys
import types

import pytest
from PIL import Image
from typer.testing import CliRunner

from awt_engine.cli import app
from awt_engine.training import train
from awt_engine.training import watch as log_module
from awt_engine.training.plot import plot_training
from awt_engine.training.watch import TrainLog, finite, log_path, read_log

runner = CliRunner()
# CoOp, 2 shots of 5 classes = 10 images, batch 4: 2 steps per epoch (Dassl drops the rest)
RUN = dict(shots=2, seed=1, device="cpu", batch_size=4, lr=0.05, options={"n_ctx": "4"})
STEPS = 2
TIMING = ("images_per_s", "elapsed_s", "eta_s")


def _lr_reference(epoch: int, epochs: int, lr=0.05, warmup_lr=1e-5) -> float:
    """CoOp's Dassl schedule (one constant warm-up epoch at 1e-5, then cosine annealing
    over ``epochs`` counted after the warm-up), written out from Dassl's lr_scheduler.py."""
    if epoch == 0:
        return warmup_lr
    return 0.5 * lr * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def _strict(line: str):
    """json.loads that refuses NaN and Infinity (Python's json writes and reads them)."""

    def refuse(name):
        raise AssertionError(f"non-finite {name} in the log: {line!r}")

    return json.loads(line, parse_constant=refuse)


def _records(path):
    return [_strict(ln) for ln in path.read_text(encoding="utf-8").splitlines()]


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


LINE = re.compile(
    r"^epoch \[(\d+)/(\d+)\] step (\d+)/(\d+) loss (\S+) \(ce (\S+)\) lr (\S+) (\S+) img/s "
    r"elapsed (\d+:\d\d:\d\d) eta (\d+:\d\d:\d\d)$"
)


def test_a_line_per_epoch_on_stderr_that_is_not_a_terminal(
    toy_task, train_clip_dir, tmp_path, capfd
):
    out = tmp_path / "coop.safetensors"
    done = train(
        "coop", data_root=toy_task.root, output=out, model=train_clip_dir, epochs=3, log=True,
        **RUN,
    )  # fmt: skip
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("epoch [")]
    assert len(lines) == 3, err
    for k, (line, mean) in enumerate(zip(lines, done.result.losses, strict=True)):
        m = LINE.match(line)
        assert m, line
        assert (int(m[1]), int(m[2])) == (k + 1, 3)
        assert (int(m[3]), int(m[4])) == ((k + 1) * STEPS, 3 * STEPS)
        assert float(m[5]) == pytest.approx(mean["total"], abs=5e-5)  # printed to 4 places
        assert float(m[6]) == pytest.approx(mean["ce"], abs=5e-5)
        assert float(m[7]) == pytest.approx(_lr_reference(k, 3), rel=1e-3)
        assert float(m[8]) > 0
    assert lines[-1].endswith("eta 0:00:00")
    # the API's default follows `progress` (off here): no lines
    train("coop", data_root=toy_task.root, output=out, model=train_clip_dir, epochs=1, **RUN)
    assert "epoch [" not in capfd.readouterr().err


def test_the_cli_prints_the_epoch_lines_without_progress_bars(toy_task, train_clip_dir, tmp_path):
    out = tmp_path / "coop.safetensors"
    args = ["train", "--method", "coop", "--data-root", str(toy_task.root), "--model"]
    args += [train_clip_dir, "-o", str(out), "--shots", "2", "--epochs", "2", "--batch-size"]
    args += ["4", "--set", "n_ctx=4", "--no-progress", "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("epoch [")]
    assert [ln.split()[1] for ln in lines] == ["[1/2]", "[2/2]"]
    assert f"log {tmp_path / 'coop.log.jsonl'}" in res.stdout


def test_the_jsonl_log_holds_the_steps_and_the_epochs(toy_task, train_clip_dir, tmp_path):
    out = tmp_path / "coop.safetensors"
    done = train(
        "coop", data_root=toy_task.root, output=out, model=train_clip_dir, epochs=3,
        log_every=1, **RUN,
    )  # fmt: skip
    assert done.log == tmp_path / "coop.log.jsonl" == log_path(out)
    recs = _records(done.log)
    assert recs[0] == {
        "event": "run", "epochs": 3, "steps_per_epoch": STEPS, "method": "coop",
        "images": 10, "batch_size": 4,
    }  # fmt: skip
    steps = [r for r in recs if r["event"] == "step"]
    epochs = [r for r in recs if r["event"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, 3 * STEPS + 1))
    assert [r["epoch"] for r in steps] == [1, 1, 2, 2, 3, 3]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    assert [r["step"] for r in epochs] == [2, 4, 6]
    # the epoch records are TrainResult's means, exactly; and each is the mean of its steps
    assert [r["loss"] for r in epochs] == done.result.losses
    for r in epochs:
        mine = [s["loss"]["total"] for s in steps if s["epoch"] == r["epoch"]]
        assert r["loss"]["total"] == pytest.approx(sum(mine) / len(mine), rel=1e-12)
    for r in steps + epochs:
        assert r["lr"] == pytest.approx(_lr_reference(r["epoch"] - 1, 3), rel=1e-12)
        assert r["images_per_s"] > 0 and r["elapsed_s"] > 0
    assert [r["elapsed_s"] for r in epochs] == sorted(r["elapsed_s"] for r in epochs)
    assert epochs[-1]["eta_s"] == 0.0 and "val_accuracy" not in epochs[-1]  # no val split
    # every 5 steps, as CoOp's configs print; an epoch of fewer steps logs each one
    train("coop", data_root=toy_task.root, output=out, model=train_clip_dir, epochs=1, **RUN)
    assert [r["step"] for r in _records(done.log) if r["event"] == "step"] == [1, 2]  # afresh


def test_a_resumed_run_writes_the_uninterrupted_runs_log(
    toy_task, train_clip_dir, tmp_path, monkeypatch
):
    whole = train(
        "coop", data_root=toy_task.root, output=tmp_path / "a.safetensors",
        model=train_clip_dir, epochs=3, log_every=1, **RUN,
    )  # fmt: skip
    out = tmp_path / "b.safetensors"
    original = TrainLog.after_step

    def interrupted(self, epoch, step, *a):
        original(self, epoch, step, *a)
        if (epoch, step) == (1, 0):  # mid-epoch 2: its first step is already in the log
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainLog, "after_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train("coop", data_root=toy_task.root, output=out, model=train_clip_dir, epochs=3,
              log_every=1, **RUN)  # fmt: skip
    cut = _records(log_path(out))
    assert [(r["event"], r["epoch"]) for r in cut[-2:]] == [("epoch", 1), ("step", 2)]
    monkeypatch.setattr(TrainLog, "after_step", original)
    resumed = train(
        "coop", data_root=toy_task.root, output=out, model=train_clip_dir, epochs=3,
        log_every=1, resume=True, **RUN,
    )  # fmt: skip
    assert resumed.result.resumed_from == 1
    assert _untimed(_records(resumed.log)) == _untimed(_records(whole.log))


def test_nothing_non_finite_reaches_the_log(tmp_path):
    assert finite({"a": float("nan"), "b": [1.0, float("inf")], "c": 2}) == {
        "a": None, "b": [1.0, None], "c": 2,
    }  # fmt: skip
    path = tmp_path / "x.log.jsonl"
    log = TrainLog(path, epochs=2, steps_per_epoch=1, log_every=1, lines=False)
    log.after_step(0, 0, {"total": 1.5, "aux": float("nan")}, 1e-3, 4)
    log.epoch(0, {"total": 1.5, "aux": float("-inf")}, val_accuracy=float("nan"))
    recs = _records(path)  # strict: a NaN or Infinity token fails here
    assert recs[1]["loss"] == {"total": 1.5, "aux": None}
    assert recs[2]["loss"] == {"total": 1.5, "aux": None} and recs[2]["val_accuracy"] is None


def test_a_diverging_run_leaves_a_finite_log(toy_task, train_clip_dir, tmp_path):
    """One step per epoch (batch 16 > 10 images): epoch 2's update at lr 1e38 makes the
    context infinite; the run stops (the loop's check) and the log keeps epoch 1."""
    out = tmp_path / "coop.safetensors"
    run = {**RUN, "batch_size": 16, "lr": 1e38}
    with pytest.raises(FloatingPointError, match="lower --lr"):
        train("coop", data_root=toy_task.root, output=out, model=train_clip_dir, epochs=3, **run)
    recs = _records(log_path(out))
    got = [(r["event"], r.get("epoch")) for r in recs]
    assert got == [("run", None), ("step", 1), ("epoch", 1), ("step", 2)]


# --------------------------------------------------------------------------- plot


def _check_png(path, min_w=500, min_h=350):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        assert w >= min_w and h >= min_h
        assert (
            sum(1 for c in im.convert("L").histogram() if c) > 10
        )  # something drawn, not a blank page


def test_plot_writes_a_png_beside_the_checkpoint(toy_task, train_clip_dir, tmp_path):
    out = tmp_path / "coop.safetensors"
    done = train(
        "coop", data_root=toy_task.root, output=out, model=train_clip_dir, epochs=2, plot=True,
        **RUN,
    )  # fmt: skip
    assert done.plot == tmp_path / "coop.png"
    _check_png(done.plot)


def test_plot_training_draws_short_logs(tmp_path):
    one_epoch = [
        {"event": "run", "epochs": 1, "steps_per_epoch": 1, "method": "coop"},
        {"event": "epoch", "epoch": 1, "step": 1, "loss": {"total": 2.0}, "lr": 1e-5},
    ]
    _check_png(plot_training(one_epoch, tmp_path / "one.png"))
    no_run_record = [  # no val, no run record, a null loss (a non-finite one written as null)
        {"event": "step", "epoch": 1, "step": 3, "loss": {"total": 2.0, "ce": 1.5}, "lr": 0.1},
        {"event": "step", "epoch": 2, "step": 6, "loss": {"total": None, "ce": 1.2}, "lr": 0.05},
        {"event": "epoch", "epoch": 2, "step": 6, "loss": {"total": 1.9, "ce": 1.3}, "lr": 0.05},
    ]
    _check_png(plot_training(no_run_record, tmp_path / "two.png"))
    with pytest.raises(ValueError, match="no step or epoch record"):
        plot_training([{"event": "run"}], tmp_path / "none.png")


def test_the_plot_training_command(tmp_path):
    log = tmp_path / "coop.log.jsonl"
    recs = [
        {"event": "run", "epochs": 2, "steps_per_epoch": 2, "method": "coop"},
        {"event": "epoch", "epoch": 1, "step": 2, "loss": {"total": 2.0}, "lr": 1e-5},
        {"event": "epoch", "epoch": 2, "step": 4, "loss": {"total": 1.5}, "lr": 0.002,
         "val_accuracy": 0.5},
    ]  # fmt: skip
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"event": "ep')  # cut short
    res = runner.invoke(app, ["plot-training", str(log)])
    assert res.exit_code == 0, res.output
    assert f"wrote {tmp_path / 'coop.png'}" in res.stdout
    _check_png(tmp_path / "coop.png")
    res = runner.invoke(app, ["plot-training", str(log), "-o", str(tmp_path / "p" / "c.png")])
    assert res.exit_code == 0 and (tmp_path / "p" / "c.png").exists()
    assert len(read_log(log)) == 3  # the cut line is skipped
    empty = tmp_path / "empty.log.jsonl"
    empty.write_text('{"event": "run"}\n')
    res = runner.invoke(app, ["plot-training", str(empty)])
    assert res.exit_code == 2 and "no step or epoch record" in res.output
    res = runner.invoke(app, ["plot-training", str(log), "-o", str(tmp_path / "c.jpg")])
    assert res.exit_code == 2 and ".png" in res.output


# --------------------------------------------------------------------------- tensorboard


def test_tensorboard_without_the_package_is_a_clear_error_before_loading(
    toy_task, train_clip_dir, tmp_path, monkeypatch
):
    import awt_engine.backbone

    def refuse(*a, **k):
        raise AssertionError("a backbone loaded before the error")

    monkeypatch.setattr(awt_engine.backbone, "load_backbone", refuse)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` fails
    out = tmp_path / "coop.safetensors"
    with pytest.raises(ImportError, match=r"pip install 'awt-engine\[tensorboard\]'"):
        train("coop", data_root=toy_task.root, output=out, model=train_clip_dir, epochs=1,
              tensorboard=tmp_path / "tb", **RUN)  # fmt: skip
    args = ["train", "--method", "coop", "--data-root", str(toy_task.root), "--model"]
    args += [train_clip_dir, "-o", str(out), "--tensorboard", str(tmp_path / "tb")]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "awt-engine[tensorboard]" in res.output
    assert "Traceback" not in res.output
    with pytest.raises(ImportError, match="tensorboard"):
        log_module.tensorboard_writer(tmp_path / "tb")


def test_tensorboard_gets_the_logged_scalars(toy_task, train_clip_dir, tmp_path, monkeypatch):
    """The writer's calls, with a stand-in for the package (the test environment lacks it)."""
    calls = []

    class Writer:
        def __init__(self, folder):
            calls.append(("open", str(folder)))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setattr(log_module, "tensorboard_writer", Writer)
    out = tmp_path / "coop.safetensors"
    done = train(
        "coop", data_root=toy_task.root, output=out, model=train_clip_dir, epochs=2,
        tensorboard=tmp_path / "tb", log_every=1, **RUN,
    )  # fmt: skip
    assert calls[0] == ("open", str(tmp_path / "tb")) and calls[-1] == ("close",)
    steps = [r for r in _records(done.log) if r["event"] == "step"]
    assert [(t, v, s) for t, v, s in (c for c in calls if c[0] == "loss/total")] == [
        ("loss/total", r["loss"]["total"], r["step"]) for r in steps
    ]
    assert [c[1] for c in calls if c[0] == "lr"] == [r["lr"] for r in steps]
