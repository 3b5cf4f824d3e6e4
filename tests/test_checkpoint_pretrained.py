"""With ``--checkpoint``, the backbone's weights are the checkpoint's unless given.

``--model`` alone used to reset ``--pretrained`` to ``openai``: a checkpoint trained on a
model config plus a weights file then went to the hub for OpenAI's weights (a minute of
retries offline) before refusing the mismatch. The checkpoint names its weights; they are
used unless ``--pretrained`` is given, and a ``--pretrained`` that is given is obeyed.
"""

import pytest
from typer.testing import CliRunner

import awt_engine.backbone
from awt_engine.cli import app
from awt_engine.cli._common import weights_arg
from awt_engine.training import train

runner = CliRunner()


@pytest.fixture(scope="module")
def on_a_weights_file(toy_task, tiny_clip, tmp_path_factory):
    """A checkpoint trained on a model config .json with its weights in a .pt file."""
    out = tmp_path_factory.mktemp("ckpt") / "coop.safetensors"
    train(
        "coop",
        data_root=toy_task.root,
        output=out,
        shots=1,
        model=str(tiny_clip.config_json),
        pretrained=str(tiny_clip.checkpoint),
        device="cpu",
        epochs=1,
        batch_size=4,
        options={"n_ctx": "2"},
    )
    return out


@pytest.fixture
def loads(monkeypatch):
    """Every backbone load as (model, pretrained); tagged weights fail at once (no hub)."""
    real, seen = awt_engine.backbone.load_backbone, []

    def spy(model, pretrained=None, **kwargs):
        seen.append((model, pretrained))
        if pretrained == "openai":
            raise awt_engine.backbone.BackboneLoadError("no hub in the tests (openai asked for)")
        return real(model, pretrained, **kwargs)

    monkeypatch.setattr(awt_engine.backbone, "load_backbone", spy)
    return seen


def test_model_alone_takes_the_checkpoints_weights(on_a_weights_file, tiny_clip, toy_task, loads):
    image = str(next((toy_task.root / "test").rglob("*.png")))
    model = str(tiny_clip.config_json)
    base = ["classify", image, "--checkpoint", str(on_a_weights_file), "--device", "cpu"]
    res = runner.invoke(app, [*base, "--model", model, "--views", "2"])
    assert res.exit_code == 0, res.output
    assert loads == [(model, str(tiny_clip.checkpoint))]
    # a --pretrained that is given is obeyed: random weights are not the trained-on ones
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        res = runner.invoke(app, [*base, "--model", model, "--pretrained", "none"])
    assert res.exit_code == 2 and "was trained on backbone" in res.output, res.output
    assert loads[-1] == (model, None)


def test_weights_arg_resolves_the_default(on_a_weights_file, tiny_clip):
    assert weights_arg(None) == "openai"  # no checkpoint: OpenAI's, as before
    assert weights_arg("None") is None and weights_arg("laion2b") == "laion2b"
    assert weights_arg(None, on_a_weights_file) == str(tiny_clip.checkpoint)
    assert weights_arg("openai", on_a_weights_file) == "openai"
    res = runner.invoke(app, ["classify", "--help"])
    assert "or the --checkpoint's" in " ".join(res.output.split())


def test_the_api_takes_the_checkpoints_weights_as_the_cli(on_a_weights_file, tiny_clip, loads):
    """``create_classifier(checkpoint=..., model=...)`` without ``pretrained``: the weights
    the checkpoint names (it used to ask for OpenAI's); a given ``pretrained`` is obeyed."""
    from awt_engine import create_classifier
    from awt_engine.checkpoints import CheckpointError

    model = str(tiny_clip.config_json)
    clf = create_classifier(model=model, checkpoint=on_a_weights_file, device="cpu", views=2)
    assert loads == [(model, str(tiny_clip.checkpoint))]
    assert clf.classes
    with pytest.warns(UserWarning, match="RANDOMLY INITIALISED"):
        with pytest.raises(CheckpointError, match="was trained on backbone"):
            create_classifier(model=model, pretrained="none", checkpoint=on_a_weights_file)
    assert loads[-1] == (model, "none")  # the backbone reads the CLI spelling too
