"""`awt-engine train`, `methods`, and checkpoints through `eval` and `classify`."""

import json

from typer.testing import CliRunner

from awt_engine.cli import app

runner = CliRunner()


def _train(toy_task, model, out, *extra):
    args = ["train", "--method", "coop", "--data-root", str(toy_task.root), "--model", model]
    args += ["--output", str(out), "--shots", "2", "--epochs", "2", "--batch-size", "4"]
    args += ["--set", "n_ctx=4", "--lr", "0.05", "--no-progress", "--device", "cpu", *extra]
    return runner.invoke(app, args)


def test_methods_lists_one_line_each():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    names = ["awt-adapter", "clamp", "clip-lora", "coop", "epalm", "lamm", "llamp"]
    assert [ln.split()[0] for ln in lines] == names
    res = runner.invoke(app, ["methods", "--verbose"])
    assert "--set n_ctx=16" in res.stdout and "sgd lr 0.002" in res.stdout


def test_train_then_eval_and_classify_with_the_checkpoint(toy_task, train_clip_dir, tmp_path):
    out = tmp_path / "coop.safetensors"
    res = _train(toy_task, train_clip_dir, out, "--csc")
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.stdout and "loss" in res.stdout
    ev = runner.invoke(
        app,
        [
            "eval",
            "--data-root",
            str(toy_task.root),
            "--checkpoint",
            str(out),
            "--scorer",
            "awt",
            "--scorer",
            "clip",
            "--views",
            "3",
            "--no-progress",
            "-o",
            str(tmp_path / "res"),
        ],
    )
    assert ev.exit_code == 0, ev.output
    assert [ln.split()[0] for ln in ev.stdout.splitlines()[1:3]] == ["awt", "clip"]
    rec = json.loads(next((tmp_path / "res").glob("*__awt__*.json")).read_text())
    assert rec["method"] == "coop" and rec["checkpoint"] == str(out)
    assert rec["model"] == train_clip_dir and rec["n_images"] == 30
    cl = runner.invoke(
        app, ["classify", str(toy_task.root / "test"), "--checkpoint", str(out), "--views", "3"]
    )
    assert cl.exit_code == 0, cl.output
    assert len(cl.stdout.splitlines()) == 30
    assert {ln.split("\t")[1] for ln in cl.stdout.splitlines()} <= set(toy_task.classes)


def test_base_to_new_with_a_generic_context(toy_task, train_clip_dir, tmp_path):
    out = tmp_path / "base.safetensors"
    assert _train(toy_task, train_clip_dir, out, "--subsample", "base").exit_code == 0
    ev = runner.invoke(
        app,
        [
            "eval",
            "--data-root",
            str(toy_task.root),
            "--checkpoint",
            str(out),
            "--scorer",
            "clip",
            "--subsample",
            "base-new",
            "--no-progress",
        ],
    )
    assert ev.exit_code == 0, ev.output
    assert "base classes:" in ev.stdout and "new classes:" in ev.stdout
    assert "clip: base" in ev.stdout and "harmonic mean" in ev.stdout


def test_class_specific_checkpoint_on_other_classes_is_refused(toy_task, train_clip_dir, tmp_path):
    out = tmp_path / "csc.safetensors"
    assert _train(toy_task, train_clip_dir, out, "--csc", "--subsample", "base").exit_code == 0
    res = runner.invoke(
        app,
        ["classify", str(toy_task.root / "test"), "--checkpoint", str(out), "--classes", "fox,owl"],
    )
    assert res.exit_code == 2 and "class-specific contexts" in res.output and "fox" in res.output


def test_train_usage_errors(toy_task, train_clip_dir, tmp_path):
    res = _train(toy_task, train_clip_dir, tmp_path / "x.pt")
    assert res.exit_code == 2 and ".safetensors" in res.output
    res = _train(toy_task, train_clip_dir, tmp_path / "x.safetensors", "--set", "n_ctxx=3")
    assert res.exit_code == 2 and "unknown option 'n_ctxx'" in res.output
    res = _train(toy_task, train_clip_dir, tmp_path / "x.safetensors", "--set", "n_ctx=zero")
    assert res.exit_code == 2 and "n_ctx" in res.output
    res = runner.invoke(
        app,
        [
            "train",
            "--method",
            "nope",
            "--data-root",
            str(toy_task.root),
            "-o",
            str(tmp_path / "y.safetensors"),
        ],
    )
    assert res.exit_code == 2 and "unknown method 'nope'" in res.output
