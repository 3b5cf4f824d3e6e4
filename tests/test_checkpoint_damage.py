"""Damaged checkpoints and training states: a clear error naming the file, never a traceback.

A real tiny checkpoint is trained once (CoOp on the toy task); each test damages a copy of
it the ways a disk, a download or a hand can: cut short, emptied, only its header left, a
pickle under its name, sizes of 2^62 declared in its header. Library calls raise
CheckpointError naming the file; ``classify``, ``eval``, ``explain`` and ``train --resume``
exit 2 with one ``error:`` line.
"""

import json
import pickle
import struct

import pytest
import torch
from typer.testing import CliRunner

from awt_engine._tensorfile import DamagedEntry, load_tensors, read_header, save_tensors
from awt_engine.checkpoints import load_state, read_checkpoint, save_state
from awt_engine.cli import app
from awt_engine.training import CheckpointError, load_trained

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(coop_checkpoint):
    return coop_checkpoint


def _layout(data: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8 : 8 + n])


def _with_entries(data: bytes, entries: dict) -> bytes:
    """The file with its safetensors header replaced by ``entries`` (data kept)."""
    n, _ = _layout(data)
    blob = json.dumps(entries).encode()
    return struct.pack("<Q", len(blob)) + blob + data[8 + n :]


def _huge_declared(data: bytes) -> bytes:
    _n, head = _layout(data)
    head["ctx"].update(shape=[1 << 60], data_offsets=[0, 1 << 62])  # 2^62 bytes, consistent
    return _with_entries(data, head)


def _huge_shape(data: bytes) -> bytes:
    _n, head = _layout(data)
    head["ctx"]["shape"] = [1 << 31, 1 << 31]  # offsets kept: the sizes disagree
    return _with_entries(data, head)


DAMAGE = {
    "empty": (lambda d: b"", "empty"),
    "truncated": (lambda d: d[: len(d) // 2], "truncated"),
    "data cut short": (lambda d: d[:-7], "truncated"),
    "header only": (lambda d: d[: 8 + _layout(d)[0]], "truncated"),
    "a pickle": (lambda d: pickle.dumps({"ctx": [0.0] * 64}), "pickle"),
    "torch.save zip": (lambda d: b"PK\x03\x04" + bytes(200), "zip"),
    "2^62 header length": (lambda d: struct.pack("<Q", 1 << 62) + d[8:], "not a safetensors"),
    "2^62 bytes declared": (_huge_declared, "needs bytes up to 4611686018427387904"),
    "2^62 elements declared": (_huge_shape, "declares shape"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_naming_the_file(trained, tmp_path, kind):
    damage, why = DAMAGE[kind]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(trained.read_bytes()))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(bad)
    assert str(bad) in str(info.value) and why in str(info.value)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_trained(bad, device="cpu")


def test_sizes_are_checked_against_the_file_before_anything_is_read(tmp_path):
    good = tmp_path / "t.safetensors"
    save_tensors(good, {"a": torch.ones(3, 4), "b": torch.zeros(5)}, {"k": "v"})
    entries, meta = read_header(good)
    assert entries["a"] == {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]}
    assert entries["b"]["data_offsets"] == [48, 68] and meta["k"] == "v"
    data = good.read_bytes()
    _n, head = _layout(data)
    cases = {
        "overlap": {**head, "b": {**head["b"], "data_offsets": [40, 60]}},
        "gap": {**head, "a": {**head["a"], "shape": [2, 4], "data_offsets": [0, 32]}},
        "negative": {**head, "b": {**head["b"], "shape": [-5]}},
        "not a list": {**head, "b": {**head["b"], "shape": "5"}},
        "dtype": {**head, "b": {**head["b"], "dtype": "F33"}},
        "metadata": {**head, "__metadata__": {"k": 1}},
    }
    for name, entries in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(_with_entries(data, entries))
        with pytest.raises(DamagedEntry):
            read_header(bad)
        with pytest.raises(DamagedEntry):  # the caches' load path checks the layout too
            load_tensors(bad, {"a": (torch.float32, (3, 4))})
    (tmp_path / "extra.safetensors").write_bytes(data + b"\0" * 8)
    with pytest.raises(DamagedEntry, match="belong to none"):
        read_header(tmp_path / "extra.safetensors")
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "missing.safetensors")


def _one_error_line(res, path) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit | None)
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and str(path) in lines[0], res.output
    return lines[0]


@pytest.mark.parametrize("kind", ["truncated", "a pickle", "2^62 bytes declared"])
def test_commands_exit_2_on_a_damaged_checkpoint(trained, toy_task, tmp_path, kind):
    damage, why = DAMAGE[kind]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(trained.read_bytes()))
    image = next((toy_task.root / "test").rglob("*.png"))
    calls = {
        "classify": ["classify", str(image), "--checkpoint", str(bad), "--device", "cpu"],
        "eval": ["eval", "--data-root", str(toy_task.root), "--checkpoint", str(bad)],
        "explain": ["explain", str(image), "--checkpoint", str(bad), "-o", str(tmp_path / "x")],
    }
    for args in calls.values():
        line = _one_error_line(runner.invoke(app, args), bad)
        assert why in line


def _state_file(tmp_path):
    """A real training state (learned tensor, SGD momentum, meta) as the fit loop saves it."""
    p = torch.nn.Parameter(torch.randn(4, 8))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.sum().backward()
    opt.step()
    meta = {"run_key": "k", "epochs_done": 1, "losses": [{"total": 1.0}], "scaler": {}}
    path = tmp_path / "x.safetensors.state"
    save_state(path, {"ctx": p}, opt.state_dict(), meta)
    return path


def test_a_damaged_training_state_is_refused_naming_the_file(tmp_path):
    path = _state_file(tmp_path)
    meta, learned, opt = load_state(path)  # the intact one loads
    assert meta["epochs_done"] == 1 and set(learned) == {"ctx"} and 0 in opt["state"]
    data = path.read_bytes()
    n, head = _layout(data)
    body = json.loads(head["__metadata__"]["awt_engine"])
    wrong = {**head, "__metadata__": {**head["__metadata__"], "awt_engine": json.dumps([body])}}
    for name, damaged in {
        "empty": b"",
        "truncated": data[:-3],
        "header only": data[: 8 + n],
        "pickle": pickle.dumps(body),
        "body a list": _with_entries(data, wrong),
    }.items():
        bad = tmp_path / f"{name}.state"
        bad.write_bytes(damaged)
        with pytest.raises(CheckpointError, match="delete it to start the run afresh") as info:
            load_state(bad)
        assert str(bad) in str(info.value), name


def test_train_resume_from_a_truncated_state_exits_2(toy_task, train_clip_dir, tmp_path):
    out = tmp_path / "x.safetensors"
    state = _state_file(tmp_path)
    state.write_bytes(state.read_bytes()[:-5])
    assert state == out.with_name(out.name + ".state")
    args = ["train", "-m", "coop", "--data-root", str(toy_task.root), "--model", train_clip_dir]
    args += ["-o", str(out), "--shots", "1", "--epochs", "1", "--set", "n_ctx=4"]
    line = _one_error_line(runner.invoke(app, [*args, "--resume", "--no-progress"]), state)
    assert "training state" in line and "truncated" in line
    assert not out.exists()
