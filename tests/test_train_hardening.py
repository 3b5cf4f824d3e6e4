"""Issue 17, training: divergence stops the run and keeps the last good state, the data
is checked (empty classes, one class, too few images for --shots), one run per output,
the API takes the CLI's spellings, usage errors come before any weights load, the
opt-in deterministic mode, and the autocast dtype over a bf16 LLM."""

import json
import types
import warnings

import pytest
import torch
from typer.testing import CliRunner

from awt_engine.checkpoints import load_state, read_checkpoint, state_path
from awt_engine.cli import app
from awt_engine.training import loop as loop_module
from awt_engine.training import output_lock, train
from awt_engine.training.loop import _autocast, _grad_scaler, autocast_precision
from tests.fixtures_training import make_toy_task

runner = CliRunner()
CUDA = torch.device("cuda")


def _train(root, model, out, *extra):
    args = ["train", "--method", "coop", "--data-root", str(root), "--model", model]
    args += ["--output", str(out), "--shots", "2", "--epochs", "2", "--batch-size", "4"]
    args += ["--set", "n_ctx=4", "--lr", "0.05", "--no-progress", "--device", "cpu", *extra]
    return runner.invoke(app, args)


def _one_error_line(res):
    """Exit 2 with an `error: ...` line and no traceback."""
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    return next(ln for ln in res.output.splitlines() if ln.startswith("error: "))


# --------------------------------------------------------------------- items 2 and 8


@pytest.mark.parametrize("lr", ["1e36", "1e38"])
def test_a_diverging_run_writes_no_checkpoint(toy_task, train_clip_dir, tmp_path, lr):
    """One step per epoch (batch 16 > 10 images): epoch 1 is the constant warm-up (lr
    1e-5), epoch 2's single update at ``lr`` leaves the context huge (1e36: ~6e36, whose
    loss is NaN) or infinite (1e38). The loss before that update was finite, so only a
    check after it catches the run."""
    out = tmp_path / "coop.safetensors"
    res = _train(toy_task.root, train_clip_dir, out, "--lr", lr, "--batch-size", "16")
    line = _one_error_line(res)
    assert "epoch 2" in line and "lower --lr" in line
    assert not out.exists()
    meta, learned, _ = load_state(state_path(out))  # the last good epoch, for --resume
    assert meta["epochs_done"] == 1
    assert all(bool(torch.isfinite(t).all()) for t in learned.values())
    assert str(state_path(out)) in line


def test_a_nan_loss_is_an_error_line_and_the_state_stays(toy_task, train_clip_dir, tmp_path):
    out = tmp_path / "coop.safetensors"
    res = _train(toy_task.root, train_clip_dir, out, "--lr", "1e30")
    line = _one_error_line(res)
    assert "the loss became nan at epoch 2" in line and "lower --lr" in line
    assert not out.exists()
    meta, learned, _ = load_state(state_path(out))
    assert meta["epochs_done"] == 1 and len(meta["losses"]) == 1
    assert all(bool(torch.isfinite(t).all()) for t in learned.values())


# --------------------------------------------------------------------- items 7 and 12


def _two_classes(tmp_path, per_class=2):
    return make_toy_task(
        tmp_path / "data", classes=("amber", "cobalt"), train_per_class=per_class, size=24
    ).root


def test_an_empty_class_folder_is_an_error_naming_it(train_clip_dir, tmp_path):
    root = _two_classes(tmp_path)
    (root / "train" / "olive").mkdir()
    out = tmp_path / "x.safetensors"
    line = _one_error_line(_train(root, train_clip_dir, out))
    assert "without images: olive" in line
    assert not out.exists()


def test_a_given_class_without_images_is_an_error_naming_it(train_clip_dir, tmp_path):
    root = _two_classes(tmp_path)
    out = tmp_path / "x.safetensors"
    res = _train(root, train_clip_dir, out, "--classes", "amber,cobalt,fox")
    line = _one_error_line(res)
    assert "--classes without training images: fox" in line
    assert not out.exists()


def test_one_class_cannot_be_trained(train_clip_dir, tmp_path):
    root = make_toy_task(tmp_path / "data", classes=("amber",), train_per_class=2, size=24).root
    out = tmp_path / "x.safetensors"
    line = _one_error_line(_train(root, train_clip_dir, out))
    assert "two classes or more" in line and "amber" in line
    assert not out.exists()
    (root / "train" / "cobalt").mkdir()  # one class plus an empty folder: both said
    line = _one_error_line(_train(root, train_clip_dir, out))
    assert "without images: cobalt" in line


def test_more_shots_than_images_warns_with_the_counts(train_clip_dir, tmp_path):
    root = make_toy_task(
        tmp_path / "data", classes=("amber", "cobalt", "olive"), train_per_class=3, size=24
    ).root
    for p in sorted((root / "train" / "cobalt").iterdir())[1:]:
        p.unlink()  # cobalt keeps 1 image
    out = tmp_path / "x.safetensors"
    with pytest.warns(UserWarning, match=r"--shots 2: 1 of 3 classes .*: cobalt \(1\)$"):
        res = _train(root, train_clip_dir, out)
    assert res.exit_code == 0, res.output
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res = _train(root, train_clip_dir, out, "--shots", "1")
    assert res.exit_code == 0 and not [w for w in seen if "--shots" in str(w.message)]


# --------------------------------------------------------------------- item 9


def test_a_second_run_to_the_same_output_is_refused_at_once(toy_task, train_clip_dir, tmp_path):
    out = tmp_path / "coop.safetensors"
    state = state_path(out)
    state.write_bytes(b"the first run's state")
    with output_lock(out):  # the first run, still training
        res = _train(toy_task.root, train_clip_dir, out, "--resume")
        line = _one_error_line(res)
        assert f"--output {out}: another training run is writing it" in line
        with pytest.raises(ValueError, match="another training run"):
            with output_lock(out):
                pass
    assert state.read_bytes() == b"the first run's state" and not out.exists()
    state.unlink()
    res = _train(toy_task.root, train_clip_dir, out)  # the first has finished: free again
    assert res.exit_code == 0, res.output
    assert out.exists() and not out.with_name(out.name + ".lock").exists()


def test_the_lock_is_taken_again_after_its_file_was_replaced(tmp_path):
    """A run that finishes removes the lock file while holding it; a run that opened the
    old file just before must not lock that unlinked file beside a newer run."""
    out = tmp_path / "m.safetensors"
    lock = tmp_path / "m.safetensors.lock"
    with output_lock(out):
        assert lock.exists()
    assert not lock.exists()
    with output_lock(out):
        inode = lock.stat().st_ino
        with pytest.raises(ValueError):
            with output_lock(out):
                pass
        assert lock.stat().st_ino == inode


# --------------------------------------------------------------------- item 15


def test_the_api_takes_the_cli_spelling_of_random_weights(toy_task, train_clip_dir, tmp_path):
    from awt_engine.backbone.sources import resolve_source
    from awt_engine.classifier import create_classifier

    for spelling in ("none", "None", " NONE "):
        assert resolve_source("ViT-B-16", spelling, None).random_init
    done = train(
        "coop",
        data_root=toy_task.root,
        output=tmp_path / "c.safetensors",
        model=train_clip_dir,
        pretrained="none",
        shots=1,
        epochs=1,
        device="cpu",
        options={"n_ctx": "2"},
    )
    assert done.header["backbone"]["pretrained"] is None
    clf = create_classifier(
        model=train_clip_dir, pretrained="none", classes=["fox", "owl"], device="cpu"
    )
    assert clf.labels.classes == ("fox", "owl")


# --------------------------------------------------------------------- item 16


@pytest.fixture
def no_loading(monkeypatch):
    """Loading data, a backbone or an LLM fails the test: the error must come first."""
    import awt_engine.backbone
    import awt_engine.labelled
    import awt_engine.models.llm

    def refuse(what):
        def f(*a, **k):
            raise AssertionError(f"{what} before the usage error")

        return f

    monkeypatch.setattr(awt_engine.backbone, "load_backbone", refuse("a backbone loaded"))
    monkeypatch.setattr(awt_engine.models.llm, "load_causal_lm", refuse("an LLM loaded"))
    return lambda: monkeypatch.setattr(
        awt_engine.labelled, "load_labelled", refuse("the data was read")
    )


def test_a_mistyped_option_is_answered_before_reading_anything(
    toy_task, train_clip_dir, tmp_path, no_loading
):
    no_loading()
    kw = {"data_root": toy_task.root, "output": tmp_path / "x.safetensors"}
    with pytest.raises(ValueError, match="unknown option 'n_ctxx' for coop"):
        train("coop", model=train_clip_dir, options={"n_ctxx": "4"}, **kw)
    with pytest.raises(ValueError, match="lr"):
        train("coop", model=train_clip_dir, lr=-1.0, **kw)


def _llm_folder(tmp_path, layers, key="num_hidden_layers", nested=False):
    folder = tmp_path / "llm"
    folder.mkdir(parents=True)
    cfg = {"model_type": "opt", key: layers}
    (folder / "config.json").write_text(json.dumps({"text_config": cfg} if nested else cfg))
    return str(folder)


def test_epalm_layers_are_checked_against_the_llm_config_before_loading(
    toy_task, tmp_path, no_loading
):
    llm = _llm_folder(tmp_path, 4)
    kw = {"data_root": toy_task.root, "output": tmp_path / "x.safetensors"}
    with pytest.raises(ValueError, match=r"\[19, 31\) do not fit .*'s 4 layers"):
        train("epalm", options={"llm": llm}, **kw)
    with pytest.raises(ValueError, match=r"\[1, 5\) do not fit"):
        train("epalm", options={"llm": llm, "start_layer": "1", "end_layer": "5"}, **kw)
    args = ["train", "-m", "epalm", "--data-root", str(toy_task.root), "-o", str(kw["output"])]
    res = runner.invoke(app, [*args, "--llm", llm, "--no-progress"])
    assert "do not fit" in _one_error_line(res)


def test_llm_depth_reads_config_json_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from awt_engine.training import llm_depth

    assert llm_depth(_llm_folder(tmp_path / "a", 7, key="n_layer")) == 7
    assert llm_depth(_llm_folder(tmp_path / "b", 9, nested=True)) == 9
    assert llm_depth(str(tmp_path / "missing")) is None
    assert llm_depth("org/not-downloaded") is None
    # a hub id in the local cache (the layout huggingface_hub writes)
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"num_hidden_layers": 12}))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert llm_depth("org/tiny") == 12


def test_the_adapter_without_descriptions_is_refused_before_loading(toy_task, tmp_path, no_loading):
    with pytest.raises(ValueError, match="trains on class descriptions"):
        train("awt-adapter", data_root=toy_task.root, output=tmp_path / "x.safetensors", shots=4)


# --------------------------------------------------------------------- item 27


def test_deterministic_reaches_torch_and_the_header(
    toy_task, train_clip_dir, tmp_path, monkeypatch
):
    calls = []
    real = torch.use_deterministic_algorithms

    def spy(mode, *, warn_only=False):
        calls.append(mode)
        real(mode, warn_only=warn_only)

    monkeypatch.setattr(torch, "use_deterministic_algorithms", spy)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # restored (unset) after the test
    out = tmp_path / "d.safetensors"
    res = _train(toy_task.root, train_clip_dir, out, "--deterministic", "--epochs", "1")
    assert res.exit_code == 0, res.output
    assert calls and calls[0] is True and calls[-1] is False  # on for the run, then restored
    assert not torch.are_deterministic_algorithms_enabled()
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    header, _ = read_checkpoint(out)
    assert header["train_config"]["deterministic"] is True

    calls.clear()
    res = _train(toy_task.root, train_clip_dir, out, "--epochs", "1")
    assert res.exit_code == 0 and calls == []
    header, _ = read_checkpoint(out)
    assert header["train_config"]["deterministic"] is False


# --------------------------------------------------------------------- item 28


class _LM(torch.nn.Module):
    """A stand-in causal LM: what the precision choice reads is its embeddings' dtype."""

    def __init__(self, dtype):
        super().__init__()
        self.embed = torch.nn.Embedding(4, 2).to(dtype)

    def get_input_embeddings(self):
        return self.embed


def _epalm_like(dtype):  # eP-ALM and LLaMP hold a loaded LLM (``.model``) as ``llm``
    return types.SimpleNamespace(method="epalm", llm=types.SimpleNamespace(model=_LM(dtype)))


def _clamp_like(dtype):  # CLAMP holds the LM itself as ``lm``
    return types.SimpleNamespace(method="clamp", lm=_LM(dtype))


def test_autocast_follows_a_bf16_llm():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    cpu = torch.device("cpu")
    coop = types.SimpleNamespace(method="coop")
    assert autocast_precision(None, cpu, _epalm_like(bf16)) == "fp32"
    assert autocast_precision(None, CUDA, coop) == "fp16"  # CoOp's fp16
    assert autocast_precision(None, CUDA, _epalm_like(bf16)) == "bf16"
    assert autocast_precision(None, CUDA, _clamp_like(bf16)) == "bf16"
    assert autocast_precision(None, CUDA, _epalm_like(fp16)) == "fp16"
    assert autocast_precision(None, CUDA, _clamp_like(fp32)) == "fp16"
    assert autocast_precision("fp32", CUDA, _clamp_like(bf16)) == "fp32"
    assert autocast_precision("bf16", CUDA, coop) == "bf16"
    with pytest.warns(UserWarning, match="bf16, which overflow under fp16"):
        assert autocast_precision("fp16", CUDA, _clamp_like(bf16)) == "bf16"


def test_bf16_autocast_has_no_loss_scaling(monkeypatch):
    made = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: made.append(enabled))
    _grad_scaler("bf16", CUDA)
    _grad_scaler("fp16", CUDA)
    _grad_scaler("fp16", torch.device("cpu"))
    assert made == [False, True, False]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch disables the context itself
        assert _autocast("bf16", CUDA).fast_dtype == torch.bfloat16
        assert _autocast("fp16", CUDA).fast_dtype == torch.float16


def test_fit_computes_in_the_chosen_precision(toy_task, train_clip_dir, tmp_path, monkeypatch):
    seen = {}
    real_scaler, real_autocast = loop_module._grad_scaler, loop_module._autocast

    def choose(precision, device, model):
        seen["model"] = model
        return "bf16"

    def scaler(precision, device):
        seen["scaler"] = precision
        return real_scaler(precision, device)

    def autocast(precision, device):
        seen["autocast"] = precision
        return real_autocast(precision, device)

    monkeypatch.setattr(loop_module, "autocast_precision", choose)
    monkeypatch.setattr(loop_module, "_grad_scaler", scaler)
    monkeypatch.setattr(loop_module, "_autocast", autocast)
    out = tmp_path / "p.safetensors"
    assert _train(toy_task.root, train_clip_dir, out, "--epochs", "1").exit_code == 0
    assert seen["scaler"] == seen["autocast"] == "bf16"
    assert getattr(seen["model"], "method", None) == "coop"
    header, _ = read_checkpoint(out)
    assert header["compute_precision"] == "bf16"
