"""A checkpoint's header is checked against a schema with bounds before anything loads.

Each crafted checkpoint below keeps valid tensors and checksums (``save_tensors`` writes
them) and changes only the JSON header: the wrong shape of JSON, fields missing or of the
wrong type, nesting deep enough to exhaust the recursion limit, NaN, and method settings
far outside any sane size (``n_ctx`` of 10^12 would allocate terabytes). Every one is a
CheckpointError naming the file and the field, raised before a backbone is loaded. The
same bounds answer ``--set`` before anything is loaded. Loading refuses learned tensors
that are not finite (in the file, or once cast to the model's dtype).
"""

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

import awt_engine.backbone
from awt_engine._tensorfile import read_header, save_tensors
from awt_engine.checkpoints import HEADER_KEY, read_checkpoint
from awt_engine.cli import app
from awt_engine.methods import get_method, list_methods
from awt_engine.methods.base import TrainableBase, check_config, check_values
from awt_engine.training import CheckpointError, apply_options, load_trained

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(coop_checkpoint):
    return coop_checkpoint


@pytest.fixture
def no_backbone(monkeypatch):
    """Loading a backbone fails the test: the header must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a backbone was loaded before the header was checked")

    monkeypatch.setattr(awt_engine.backbone, "load_backbone", refuse)


def _header(path) -> dict:
    return json.loads(read_header(path)[1][HEADER_KEY])


def _craft(src, dst, header=None, *, text=None, tensors=None):
    """``src`` with another header (or raw header ``text``) and/or tensors, checksums valid."""
    meta = {HEADER_KEY: text if text is not None else json.dumps(header)}
    save_tensors(dst, tensors if tensors is not None else load_file(src), meta)
    return dst


def _drop(h, *keys):
    h = json.loads(json.dumps(h))
    *parents, last = keys
    node = h
    for k in parents:
        node = node[k]
    del node[last]
    return h


def _set(h, value, *keys):
    h = json.loads(json.dumps(h))
    *parents, last = keys
    node = h
    for k in parents:
        node = node[k]
    node[last] = value
    return h


SCHEMA = {
    "a list": (lambda h: [h], "not an object"),
    "a string": (lambda h: "coop", "not an object"),
    "no format": (lambda h: _drop(h, "format"), "unknown checkpoint format"),
    "no method": (lambda h: _drop(h, "method"), "method must be a string, is missing"),
    "method a number": (lambda h: _set(h, 3, "method"), "method must be a string"),
    "backbone a list": (lambda h: _set(h, ["x"], "backbone"), "backbone must be a JSON object"),
    "no fingerprint": (lambda h: _drop(h, "backbone", "fingerprint"), "backbone.fingerprint"),
    "pretrained a number": (lambda h: _set(h, 1, "backbone", "pretrained"), "pretrained"),
    "config a string": (lambda h: _set(h, "n_ctx=4", "method_config"), "method_config"),
    "no labels": (lambda h: _drop(h, "labels"), "labels must be"),
    "classes a string": (lambda h: _set(h, "amber", "labels", "classes"), "labels.classes"),
    "classes numbers": (lambda h: _set(h, [1, 2], "labels", "classes"), "labels.classes"),
    "no classes": (lambda h: _set(h, [], "labels", "classes"), "labels.classes"),
    "no template": (lambda h: _drop(h, "labels", "template"), "labels.template"),
    "bad template": (lambda h: _set(h, "no slot", "labels", "template"), "labels"),
    "descriptions": (lambda h: _set(h, [[1]], "labels", "descriptions"), "descriptions"),
    "seed a text": (lambda h: _set(h, "one", "seed"), "seed must be a whole number"),
    "frozen a list": (lambda h: _set(h, [], "frozen"), "frozen"),
}


@pytest.mark.parametrize("kind", list(SCHEMA))
def test_a_malformed_header_is_refused_naming_the_field(trained, tmp_path, kind, no_backbone):
    mutate, why = SCHEMA[kind]
    bad = _craft(trained, tmp_path / "bad.safetensors", mutate(_header(trained)))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(bad)
    assert str(bad) in str(info.value) and why in str(info.value)
    with pytest.raises(CheckpointError):
        load_trained(bad, device="cpu")


def test_deep_nesting_and_nan_in_a_header_are_refused(trained, tmp_path):
    h = _header(trained)
    deep = json.dumps(h)[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    nested = json.dumps({**h, "x": json.loads("[" * 20 + "]" * 20)})
    nan = json.dumps(h)[:-1] + ', "val_accuracy": NaN}'
    for name, text, why in [
        ("deep", deep, "nested more than 16 deep"),
        ("nested", nested, "nested more than 16 deep"),
        ("nan", nan, "NaN"),
    ]:
        bad = _craft(trained, tmp_path / f"{name}.safetensors", text=text)
        with pytest.raises(CheckpointError, match=why) as info:
            read_checkpoint(bad)
        assert str(bad) in str(info.value)


CONFIG = {
    "unknown method": (lambda h: _set(h, "coco", "method"), "unknown method 'coco'"),
    "n_ctx 10^12": (lambda h: _set(h, 10**12, "method_config", "n_ctx"), "between 1 and 256"),
    "n_ctx 1e12": (lambda h: _set(h, 1e12, "method_config", "n_ctx"), "whole number"),
    "csc a text": (lambda h: _set(h, "yes", "method_config", "csc"), "true or false"),
    "position a list": (lambda h: _set(h, [1], "method_config", "class_position"), "a text"),
    "position unknown": (lambda h: _set(h, "top", "method_config", "class_position"), "end"),
}


@pytest.mark.parametrize("kind", list(CONFIG))
def test_method_settings_are_checked_before_any_weights_load(trained, tmp_path, kind, no_backbone):
    mutate, why = CONFIG[kind]
    bad = _craft(trained, tmp_path / "bad.safetensors", mutate(_header(trained)))
    with pytest.raises(CheckpointError, match=why) as info:
        load_trained(bad, device="cpu")
    assert str(bad) in str(info.value)


def test_classify_with_a_malformed_header_exits_2(trained, toy_task, tmp_path, no_backbone):
    image = next((toy_task.root / "test").rglob("*.png"))
    h = _header(trained)
    for name, header, why in [
        ("list", [h], "not an object"),
        ("huge", _set(h, 10**12, "method_config", "n_ctx"), "n_ctx must be between 1 and 256"),
    ]:
        bad = _craft(trained, tmp_path / f"{name}.safetensors", header)
        res = runner.invoke(app, ["classify", str(image), "--checkpoint", str(bad)])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        (line,) = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert str(bad) in line and why in line


# -- bounds on method settings (--set and every build) ------------------------------------


def test_every_methods_defaults_are_within_bounds():
    for name in list_methods():
        spec = get_method(name)
        for shots in (1, 2, 4, 8, 16):
            check_config(spec.default_config(shots))
            check_config(spec.train_defaults(shots, None))
    bounded = [f for f in dataclasses.fields(get_method("coop").config) if "bounds" in f.metadata]
    assert [f.name for f in bounded] == ["n_ctx"]


def test_check_values_types_finiteness_and_bounds():
    cfg = get_method("coop").config
    check_values(cfg, {"n_ctx": 256, "csc": True, "ctx_init": "a photo of a"})
    for values, why in [
        ({"n_ctx": 257}, "n_ctx must be between 1 and 256, got 257"),
        ({"n_ctx": 0}, "between 1 and 256"),
        ({"n_ctx": "4"}, "n_ctx must be a whole number"),
        ({"n_ctx": True}, "whole number"),
        ({"n_ctx": 4.0}, "whole number"),
        ({"csc": 1}, "csc must be true or false"),
        ({"ctx_init": None}, "ctx_init must be a text"),
    ]:
        with pytest.raises(ValueError, match=why):
            check_values(cfg, values)
    lamm = get_method("lamm").config
    check_values(lamm, {"temperature": 2})  # a whole number is a number
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        check_values(lamm, {"temperature": math.nan})
    clamp = get_method("clamp").config
    check_values(clamp, {"init_logit_scale": None, "captions": None})
    with pytest.raises(ValueError, match="init_logit_scale must be a number or none"):
        check_values(clamp, {"init_logit_scale": "big"})


def test_set_beyond_bounds_is_refused_before_anything_loads(toy_task, tmp_path, no_backbone):
    out = tmp_path / "x.safetensors"
    args = ["train", "-m", "coop", "--data-root", str(toy_task.root), "-o", str(out)]
    res = runner.invoke(app, [*args, "--set", "n_ctx=100000000", "--no-progress"])
    assert res.exit_code == 2, res.output
    assert "coop: n_ctx must be between 1 and 256, got 100000000" in res.output
    spec = get_method("lamm")
    cfgs = (spec.default_config(1), spec.train_defaults(1, None))
    with pytest.raises(ValueError, match="lamm: temperature must be a finite number"):
        apply_options(spec, *cfgs, {"temperature": "nan"})
    with pytest.raises(ValueError, match="lamm: lr must be a finite number"):
        apply_options(spec, *cfgs, {"lr": "inf"})


def test_build_checks_bounds_before_the_model_is_made():
    spec = get_method("coop")
    huge = dataclasses.replace(spec.config(), n_ctx=10**8)
    with pytest.raises(ValueError, match="n_ctx must be between 1 and 256"):
        spec.build(object(), huge)  # no backbone touched: refused before the model


# -- loading refuses learned tensors that are not finite ---------------------------------


def test_non_finite_tensors_in_a_checkpoint_are_refused(trained, tmp_path):
    ctx = load_file(trained)["ctx"]
    for name, value in [("nan", math.nan), ("inf", -math.inf)]:
        bad_ctx = ctx.clone()
        bad_ctx[1, 3] = value
        bad = _craft(trained, tmp_path / f"{name}.safetensors", _header(trained),
                     tensors={"ctx": bad_ctx})  # fmt: skip
        with pytest.raises(CheckpointError) as info:
            load_trained(bad, device="cpu")
        msg = str(info.value)
        assert str(bad) in msg and "'ctx'" in msg and "NaN or infinite" in msg


class _HalfModel(TrainableBase):
    """A method whose learned tensors live in float16 (an LLM's dtype)."""

    method = "half"

    def __init__(self):
        cpu = torch.device("cpu")
        bb = SimpleNamespace(logit_scale=1.0, preprocess=None, device=cpu, dtype=torch.float16)
        super().__init__(bb, None)
        self.a = nn.Parameter(torch.zeros(2, dtype=torch.float16))
        self.b = nn.Parameter(torch.zeros(3, dtype=torch.float16))


def test_values_beyond_the_models_dtype_are_refused_and_nothing_is_loaded():
    net = _HalfModel()
    good = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([1.0, 65504.0, -3.0])}
    net.load_learned(good)
    assert net.b.tolist() == [1.0, 65504.0, -3.0]
    absurd = {"a": torch.tensor([5.0, 6.0]), "b": torch.tensor([1.0, 1e30, 2.0])}  # finite in fp32
    with pytest.raises(ValueError, match=r"'b' holds values that are not finite in float16"):
        net.load_learned(absurd)
    assert net.a.tolist() == [1.0, 2.0]  # nothing of the refused state was copied
