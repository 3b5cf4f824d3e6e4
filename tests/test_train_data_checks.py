"""Issue 21 item 3: the training data is checked before any model loads, and each
message names the classes and their image counts: a class without training images and
a single class are errors; more --shots than a class has is a warning, and training goes
on with what there is (Dassl's few-shot draw without repeats, which CoOp trains with)."""

import warnings

import pytest
from typer.testing import CliRunner

from awt_engine.cli import app
from awt_engine.training import train
from tests.fixtures_training import make_toy_task

runner = CliRunner()
RUN = dict(seed=1, device="cpu", epochs=1, batch_size=4, lr=0.05, options={"n_ctx": "4"})


def _task(tmp_path, classes=("amber", "cobalt", "olive"), per_class=3, keep=None):
    """A toy ImageFolder; ``keep`` {class: n} leaves a class n training images."""
    root = make_toy_task(tmp_path / "data", classes=classes, train_per_class=per_class,
                         test_per_class=1, size=24).root  # fmt: skip
    for name, n in (keep or {}).items():
        for p in sorted((root / "train" / name).iterdir())[n:]:
            p.unlink()
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Loading a backbone fails the test: the data error must come first."""
    import awt_engine.backbone

    def refuse(*a, **k):
        raise AssertionError("a backbone loaded before the data was checked")

    monkeypatch.setattr(awt_engine.backbone, "load_backbone", refuse)


def _cli(root, model, out, *extra):
    args = ["train", "--method", "coop", "--data-root", str(root), "--model", model]
    args += ["-o", str(out), "--shots", "2", "--epochs", "1", "--batch-size", "4"]
    args += ["--set", "n_ctx=4", "--no-progress", "--device", "cpu", *extra]
    return runner.invoke(app, args)


def _error_line(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    return next(ln for ln in res.output.splitlines() if ln.startswith("error: "))


def test_a_class_without_training_images_is_an_error_naming_the_counts(
    train_clip_dir, tmp_path, no_model
):
    root = _task(tmp_path, keep={"olive": 0})  # an empty class folder
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError) as info:
        train("coop", data_root=root, output=out, model=train_clip_dir, shots=2, **RUN)
    msg = str(info.value)
    assert "without images: olive" in msg
    assert "images per class: amber (3), cobalt (3)" in msg
    line = _error_line(_cli(root, train_clip_dir, out))
    assert "olive" in line and "amber (3), cobalt (3)" in line
    # a class of the --classes list with no folder at all
    root2 = _task(tmp_path / "b", keep={"cobalt": 1})
    line = _error_line(_cli(root2, train_clip_dir, out, "--classes", "amber,cobalt,olive,fox"))
    assert "--classes without training images: fox" in line
    assert "amber (3), cobalt (1), olive (3)" in line
    assert not out.exists()


def test_one_class_is_an_error_naming_it_and_its_count(train_clip_dir, tmp_path, no_model):
    root = _task(tmp_path, classes=("amber",), per_class=3)
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match=r"two classes or more, the data has 1: amber with 3"):
        train("coop", data_root=root, output=out, model=train_clip_dir, shots=2, **RUN)
    # base-to-new on three classes leaves one new class (CoOp's split: ceil(3/2) base)
    root3 = _task(tmp_path / "b", keep={"olive": 2})
    line = _error_line(_cli(root3, train_clip_dir, out, "--subsample", "new"))
    assert "two classes or more, the data has 1: olive with 2 images" in line
    assert not out.exists()


def test_more_shots_than_a_class_has_warns_with_the_counts_then_trains(
    train_clip_dir, tmp_path, monkeypatch
):
    root = _task(tmp_path, keep={"cobalt": 1, "olive": 2})
    import awt_engine.backbone

    loaded, real = [], awt_engine.backbone.load_backbone

    def load(*a, **k):  # the warning must be out before any weights load
        loaded.append([str(w.message) for w in seen])
        return real(*a, **k)

    monkeypatch.setattr(awt_engine.backbone, "load_backbone", load)
    out = tmp_path / "x.safetensors"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        done = train("coop", data_root=root, output=out, model=train_clip_dir, shots=3, **RUN)
    text = [str(w.message) for w in seen if "--shots" in str(w.message)]
    assert text == [
        "--shots 3: 2 of 3 classes have fewer training images and train on all they have: "
        "cobalt (1), olive (2)"
    ]
    assert any(text[0] in m for m in loaded[0])
    # trained on what there is: 3 + 1 + 2 images, Dassl's draw without repeats
    assert done.header["data"]["images"] == 6 and out.exists()
