"""Issue 21 item 3: held-out accuracy during training (`--val-split`, `--val-every`),
scored through the same run loop as eval, recorded in the JSONL log and the checkpoint
header (with the epoch the weights are after), and never changing the run itself."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import awt_engine
from awt_engine.cli import app
from awt_engine.labelled import load_labelled
from awt_engine.training import train
from awt_engine.training.data import few_shot
from awt_engine.training.watch import TrainLog, log_path
from tests.fixtures_training import make_toy_task

runner = CliRunner()
RUN = dict(shots=2, seed=1, device="cpu", batch_size=4, lr=0.05, options={"n_ctx": "4"})


@pytest.fixture(scope="module")
def with_val(tmp_path_factory):
    """The toy task with a ``val`` split (other images than ``train``'s)."""
    task = make_toy_task(tmp_path_factory.mktemp("toy-val"), size=24, seed=3)
    shutil.copytree(task.root / "test", task.root / "val")
    return task


@pytest.fixture
def no_backbone(monkeypatch):
    import awt_engine.backbone

    def refuse(*a, **k):
        raise AssertionError("a backbone loaded before the error")

    monkeypatch.setattr(awt_engine.backbone, "load_backbone", refuse)


def _records(out):
    return [json.loads(ln) for ln in log_path(out).read_text().splitlines()]


def _top1_reference(checkpoint, root, split="val", shots=2, seed=1) -> float:
    """Top-1 of the saved weights on the few-shot held-out draw (min(shots, 4) per class,
    CoOp's), from the classifier's scores (not eval's metrics), counted here."""
    held_out = few_shot(load_labelled(root, split=split), min(shots, 4), seed)
    clf = awt_engine.create_classifier(checkpoint=checkpoint, device="cpu", scorer="clip")
    assert clf.classes == held_out.classes
    scores = clf.scores([it.path for it in held_out.items])  # [N, C]
    best = scores.argmax(dim=1).tolist()
    right = sum(b == it.label for b, it in zip(best, held_out.items, strict=True))
    return right / len(held_out.items)


def test_val_every_scores_the_held_out_set_and_records_it(with_val, train_clip_dir, tmp_path):
    out = tmp_path / "coop.safetensors"
    done = train("coop", data_root=with_val.root, output=out, model=train_clip_dir, epochs=3,
                 val_every=2, **RUN)  # fmt: skip
    h = done.header
    assert h["epoch"] == 3
    assert h["val"]["images"] == 10 and h["val"]["every"] == 2  # 2 per class, 5 classes
    assert "/val" in h["val"]["source"]
    assert [e["epoch"] for e in h["val"]["history"]] == [2, 3]  # every 2nd, and the last
    assert h["val_accuracy"] == done.val_accuracy == h["val"]["history"][-1]["accuracy"]
    assert done.val_accuracy == pytest.approx(_top1_reference(out, with_val.root), abs=1e-12)
    epochs = [r for r in _records(out) if r["event"] == "epoch"]
    assert ["val_accuracy" in r for r in epochs] == [False, True, True]
    assert [r["val_accuracy"] for r in epochs[1:]] == [e["accuracy"] for e in h["val"]["history"]]
    assert _records(out)[0]["val_images"] == 10


@pytest.mark.slow
def test_validating_never_changes_the_run(with_val, train_clip_dir, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    plain = train("coop", data_root=with_val.root, output=a, model=train_clip_dir, epochs=3,
                  **RUN)  # fmt: skip
    every = train("coop", data_root=with_val.root, output=b, model=train_clip_dir, epochs=3,
                  val_every=1, **RUN)  # fmt: skip
    assert [e["epoch"] for e in every.header["val"]["history"]] == [1, 2, 3]
    assert [e["epoch"] for e in plain.header["val"]["history"]] == [3]  # the end only
    assert plain.result.losses == every.result.losses
    sa, sb = load_file(a), load_file(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # bit for bit
    assert plain.val_accuracy == every.val_accuracy


@pytest.mark.slow
def test_a_resumed_run_keeps_the_earlier_accuracies(
    with_val, train_clip_dir, tmp_path, monkeypatch
):
    whole = train("coop", data_root=with_val.root, output=tmp_path / "a.safetensors",
                  model=train_clip_dir, epochs=3, val_every=1, **RUN)  # fmt: skip
    out = tmp_path / "b.safetensors"
    original = TrainLog.epoch

    def stop_after_second(self, epoch, *a, **k):
        original(self, epoch, *a, **k)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainLog, "epoch", stop_after_second)
    with pytest.raises(KeyboardInterrupt):
        train("coop", data_root=with_val.root, output=out, model=train_clip_dir, epochs=3,
              val_every=1, **RUN)  # fmt: skip
    monkeypatch.setattr(TrainLog, "epoch", original)
    resumed = train("coop", data_root=with_val.root, output=out, model=train_clip_dir,
                    epochs=3, val_every=1, resume=True, **RUN)  # fmt: skip
    assert resumed.result.resumed_from == 2
    assert resumed.header["val"]["history"] == whole.header["val"]["history"]


def test_a_named_split_that_is_absent_is_an_error_before_loading(
    toy_task, train_clip_dir, tmp_path, no_backbone
):
    kw = dict(data_root=toy_task.root, output=tmp_path / "x.safetensors", model=train_clip_dir)
    with pytest.raises(ValueError, match=r"--val-split nope: .*split folders \(test, train\)"):
        train("coop", val_split="nope", epochs=1, **kw, **RUN)
    with pytest.raises(ValueError, match="--val-split train: no held-out images apart"):
        train("coop", val_split="train", epochs=1, **kw, **RUN)
    args = ["train", "--method", "coop", "--data-root", str(toy_task.root), "--model"]
    args += [train_clip_dir, "-o", str(tmp_path / "x.safetensors"), "--val-split", "nope"]
    args += ["--shots", "2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "error: --val-split nope" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_without_a_val_split_nothing_is_scored_unless_one_is_named(
    toy_task, train_clip_dir, tmp_path
):
    out = tmp_path / "coop.safetensors"
    done = train("coop", data_root=toy_task.root, output=out, model=train_clip_dir, epochs=2,
                 val_every=1, **RUN)  # fmt: skip
    assert done.val_accuracy is None and done.header["val"] is None
    assert done.header["epoch"] == 2
    assert not any("val_accuracy" in r for r in _records(out))
    done = train("coop", data_root=toy_task.root, output=out, model=train_clip_dir, epochs=1,
                 val_split="test", **RUN)  # fmt: skip
    assert "/test" in done.header["val"]["source"] and done.header["val"]["images"] == 10
    ref = _top1_reference(out, toy_task.root, split="test")
    assert done.val_accuracy == pytest.approx(ref, abs=1e-12)


def test_the_cli_prints_the_accuracy_on_the_epoch_lines(with_val, train_clip_dir, tmp_path):
    out = tmp_path / "coop.safetensors"
    args = ["train", "--method", "coop", "--data-root", str(with_val.root), "--model"]
    args += [train_clip_dir, "-o", str(out), "--shots", "2", "--epochs", "2", "--batch-size"]
    args += ["4", "--set", "n_ctx=4", "--no-progress", "--device", "cpu", "--val-every", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("epoch [")]
    history = [r for r in _records(out) if r["event"] == "epoch"]  # printed in %, 2 places
    assert [ln.rsplit(" val ", 1)[1] for ln in lines] == [
        f"{100 * r['val_accuracy']:.2f}%" for r in history
    ]
    assert "val top-1" in res.stdout
