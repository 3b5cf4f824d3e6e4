"""Presets (``--preset``): named option sets applied as ``--set`` would be, before the
user's own; the default preset is the defaults; the checkpoint records the preset; the
small-LM recipes fit their LLMs, and settings that do not fit an LLM are refused from its
config.json before any weights load, naming the ``--set`` that fits."""

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from awt_engine.cli import app
from awt_engine.methods import get_method, list_methods
from awt_engine.training import apply_options, train
from awt_engine.training.llm_checks import check_llm_depth

# where paper and released code disagree, and the small-LM recipes (sources in the modules)
EXPECTED = {
    "lamm": {
        "released": {"logit_loss": "ce", "param_weight": 1.0},
        "released-base2new": {"logit_loss": "ce", "param_weight": 1 / 16},
        "paper": {"logit_loss": "kl", "param_weight": 1.0},
    },
    "epalm": {"released", "config", "small"},
    "clamp": {"released", "small"},
    "llamp": {"released", "small"},
}


def test_presets_are_where_paper_and_code_disagree_and_for_small_lms():
    for name in list_methods():
        spec = get_method(name)
        want = EXPECTED.get(name)
        if want is None:
            assert spec.presets == {} and spec.default_preset is None, name
            assert spec.preset_options() == {}
            continue
        assert set(spec.presets) == set(want), name
        assert spec.default_preset == "released"
    assert get_method("lamm").presets == EXPECTED["lamm"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_default_preset_is_the_defaults_and_every_preset_is_valid(name):
    spec = get_method(name)
    for shots in (1, 16):
        base = (spec.default_config(shots), spec.train_defaults(shots, None))
        assert apply_options(spec, *base, spec.preset_options()) == base  # nothing changes
        for preset in spec.presets:  # every name and value passes the options' checks
            apply_options(spec, *base, spec.preset_options(preset))


def test_an_unknown_preset_names_the_methods_presets():
    with pytest.raises(ValueError, match=r"unknown preset 'papr' for lamm; its presets: "
                       r"released, released-base2new, paper"):  # fmt: skip
        get_method("lamm").preset_options("papr")
    with pytest.raises(ValueError, match=r"unknown preset 'paper' for coop; its presets: none"):
        get_method("coop").preset_options("paper")


def test_cli_refuses_an_unknown_preset_as_a_usage_error(toy_task, tmp_path):
    res = CliRunner().invoke(
        app,
        ["train", "-m", "lamm", "--data-root", str(toy_task.root), "-o",
         str(tmp_path / "x.safetensors"), "--preset", "nope"],
    )  # fmt: skip
    assert res.exit_code == 2
    assert "unknown preset 'nope' for lamm; its presets: released" in res.output
    assert not (tmp_path / "x.safetensors").exists()


def test_methods_verbose_lists_each_preset_with_its_values():
    out = CliRunner().invoke(app, ["methods", "--verbose"]).output
    assert "--preset released (default): logit_loss='ce' param_weight=1.0" in out
    assert "--preset paper: logit_loss='kl' param_weight=1.0" in out
    assert "--preset small: llm='facebook/opt-125m' start_layer=6 end_layer=12 n_levels=6" in out
    assert "--preset small: llm='Qwen/Qwen2.5-0.5B-Instruct'" in out


def test_train_applies_the_preset_under_the_users_options_and_records_it(
    toy_task, train_clip_dir, tmp_path
):
    common = dict(data_root=toy_task.root, shots=1, model=train_clip_dir, device="cpu",
                  epochs=1, batch_size=4)  # fmt: skip
    paper = train("lamm", output=tmp_path / "p.safetensors", preset="paper", **common)
    assert paper.header["preset"] == "paper"
    assert paper.header["method_config"]["logit_loss"] == "kl"
    mixed = train(
        "lamm", output=tmp_path / "m.safetensors", preset="released-base2new",
        options={"param-weight": "0.5"}, **common,
    )  # fmt: skip
    assert mixed.header["preset"] == "released-base2new"
    assert mixed.header["method_config"]["param_weight"] == 0.5  # the user's --set wins
    assert mixed.header["method_config"]["logit_loss"] == "ce"  # the rest is the preset's
    plain = train("coop", output=tmp_path / "c.safetensors", **common)
    assert plain.header["preset"] is None  # CoOp has none


# ------------------------------------------------------------------------------------------
# LLM settings checked from config.json alone (folders with no weights: a load would fail)
# ------------------------------------------------------------------------------------------


def _lm_config(folder, **fields):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(fields), encoding="utf-8")
    return str(folder)


def test_epalm_layers_that_do_not_fit_are_refused_with_the_set_that_fits(tmp_path):
    spec = get_method("epalm")
    opt125 = _lm_config(tmp_path / "opt", num_hidden_layers=12, hidden_size=768)  # OPT-125m's
    with pytest.raises(ValueError, match=r"\[19, 31\) do not fit .*'s 12 layers .*"
                       r"--set start_layer=7 --set end_layer=12"):  # fmt: skip
        check_llm_depth(spec.config(llm=opt125))
    small = {**spec.preset_options("small"), "llm": opt125}
    check_llm_depth(apply_options(spec, spec.config(), spec.train_defaults(16, None), small)[0])
    qwen = _lm_config(tmp_path / "qwen", num_hidden_layers=24, hidden_size=896)
    with pytest.raises(ValueError, match=r"--set start_layer=14 --set end_layer=23"):
        check_llm_depth(spec.config(llm=qwen))
    check_llm_depth(spec.config(llm=qwen, start_layer=14, end_layer=23))


def test_clamp_pool_heads_must_divide_the_lms_width(tmp_path):
    spec = get_method("clamp")
    odd = _lm_config(tmp_path / "odd", num_hidden_layers=2, hidden_size=900)
    with pytest.raises(
        ValueError, match=r"pool_heads 8 does not divide .*900 \(--set pool_heads=6\)"
    ):
        check_llm_depth(spec.config(llm=odd))
    qwen = _lm_config(tmp_path / "qwen", num_hidden_layers=24, hidden_size=896)
    small = {**spec.preset_options("small"), "llm": qwen}
    check_llm_depth(apply_options(spec, spec.config(), spec.train_defaults(16, None), small)[0])


def test_train_refuses_before_loading_any_weights(toy_task, train_clip_dir, tmp_path):
    lm = _lm_config(tmp_path / "lm", num_hidden_layers=12, hidden_size=768)  # no weights
    with pytest.raises(ValueError, match="--set start_layer=7 --set end_layer=12"):
        train("epalm", data_root=toy_task.root, output=tmp_path / "e.safetensors", shots=1,
              model=train_clip_dir, device="cpu", options={"llm": lm})  # fmt: skip
    # the small preset fits this depth: what stops it now is the missing weights (the load)
    with pytest.raises(Exception) as info:
        train("epalm", data_root=toy_task.root, output=tmp_path / "e.safetensors", shots=1,
              model=train_clip_dir, device="cpu", preset="small", options={"llm": lm})  # fmt: skip
    assert "do not fit" not in str(info.value)


def test_presets_are_plain_option_names():
    for name in EXPECTED:
        spec = get_method(name)
        fields = {f.name for f in dataclasses.fields(spec.config)} | {
            f.name for f in dataclasses.fields(spec.train_defaults(16, None))
        }
        for preset, values in spec.presets.items():
            assert set(values) <= fields, (name, preset)


def test_llamp_checks_its_clip_layers_before_the_llm_loads(train_clip_dir, tmp_path):
    """LLaMP's layer settings are CLIP's (it runs only a copy of the LLM's last layer):
    prompt_depth 9 on a 2-text-layer CLIP is refused before the (weightless) LLM loads."""
    from awt_engine.backbone import load_backbone

    spec = get_method("llamp")
    lm = _lm_config(tmp_path / "lm", num_hidden_layers=24, hidden_size=896)  # no weights
    bb = load_backbone(train_clip_dir, device="cpu")
    n = len(bb.text_blocks.blocks)
    with pytest.raises(ValueError, match=rf"prompt_depth 9 exceeds .* \(--set prompt_depth={n}\)"):
        spec.build(bb, spec.config(llm=lm))
