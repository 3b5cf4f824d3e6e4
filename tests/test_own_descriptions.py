"""Own images plus own descriptions (issue 17, item 11): a description cache's name given
as --dataset, with a folder of class folders, in `eval` and `train` (the same
:func:`awt_engine.labelled.load_labelled` behind both).

The class names below contain no colour word, so the colour embedder scores every bare
prompt alike (chance); only the cached descriptions, which name the colours, can make
the predictions right. 100% accuracy therefore shows that each folder got its own
class's descriptions.
"""

import hashlib
import json

import pytest
from typer.testing import CliRunner

from awt_engine import backbone as backbone_mod
from awt_engine.checkpoints import read_checkpoint
from awt_engine.cli import app
from awt_engine.labelled import DatasetLayoutError, load_labelled
from tests.fixtures_embedders import ColourBackbone, solid
from tests.fixtures_training import TOY_CLASSES

runner = CliRunner()

# folder name -> (colour of its images, the cache's spelling of the class)
FOLDERS = {
    "Ruby_Thing": ("red", "ruby thing"),
    "LEAFY": ("green", "Leafy"),
    "ocean-deep": ("blue", "Ocean Deep"),
}
TEMPLATE = "a picture of a {}"
DESCRIBED = {
    "ruby thing": ["it is red all over", "a red surface"],
    "Leafy": ["it is green all over", "a green surface"],
    "Sunny": ["it is yellow all over", "a yellow surface"],  # no folder: warned of
    "Ocean Deep": ["it is blue all over", "a blue surface"],
}


@pytest.fixture
def own(tmp_path):
    """An ImageFolder of solid colours and a description file imported as 'toycol'."""
    root = tmp_path / "toy"
    for i, (folder, (colour, _)) in enumerate(FOLDERS.items()):
        (root / folder).mkdir(parents=True)
        for j in range(2):
            solid(colour, (16 + j, 12 + i)).save(root / folder / f"{j}.png")
    desc = tmp_path / "mydesc.json"
    desc.write_text(json.dumps(DESCRIBED))
    cache = tmp_path / "cache"
    args = ["cache", "import", str(desc), "--dataset", "toycol", "--cache-dir", str(cache)]
    res = runner.invoke(app, [*args, "--template", TEMPLATE])
    assert res.exit_code == 0, res.output
    return root, cache


def _eval(root, cache, out, *extra):
    args = ["eval", "--data-root", str(root), "--dataset", "toycol", "--cache-dir", str(cache)]
    args += ["--views", "2", "--descriptions", "2", "--no-progress", "--output", str(out), *extra]
    return runner.invoke(app, args)


def test_load_labelled_matches_folders_to_the_cache_by_folded_name(own):
    root, cache = own
    with pytest.warns(UserWarning, match=r"1 of the 4 classes of description cache .*'Sunny'"):
        data = load_labelled(root, dataset="toycol", cache_dir=cache)
    # the cache's spelling and label order, only the classes that have folders
    assert data.classes == ("ruby thing", "Leafy", "Ocean Deep")
    assert data.name == "toycol" and len(data.items) == 6
    by_folder = {folder: spelled for folder, (_, spelled) in FOLDERS.items()}
    for item in data.items:
        assert data.classes[item.label] == by_folder[item.path.parent.name]


def test_eval_uses_the_folders_classes_and_the_caches_template_and_descriptions(
    own, tmp_path, monkeypatch
):
    root, cache = own
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: ColourBackbone())
    with pytest.warns(UserWarning, match="'Sunny'"):
        res = _eval(root, cache, tmp_path / "res", "--scorer", "awt", "--scorer", "clip")
    assert res.exit_code == 0, res.output
    assert "'Sunny'" in res.stderr  # described but without a folder: named, not used
    cache_file = cache / "descriptions" / "toycol.json"
    awt = json.loads(next((tmp_path / "res").glob("toycol__*__awt__*.json")).read_text())
    assert awt["classes"] == ["ruby thing", "Leafy", "Ocean Deep"]
    assert awt["template"] == TEMPLATE and awt["descriptions_per_class"] == 2
    assert awt["descriptions_sha256"] == hashlib.sha256(cache_file.read_bytes()).hexdigest()
    assert awt["metrics"]["acc1"] == 1.0  # only the descriptions name the colours
    clip = json.loads(next((tmp_path / "res").glob("toycol__*__clip__*.json")).read_text())
    assert clip["metrics"]["acc1"] < 1.0  # the bare prompts alone cannot tell the classes


def test_a_folder_the_cache_does_not_describe_is_an_error_naming_it(own, tmp_path, monkeypatch):
    root, cache = own
    (root / "mystery").mkdir()
    solid("cyan").save(root / "mystery" / "0.png")
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: ColourBackbone())
    res = _eval(root, cache, tmp_path / "res")
    assert res.exit_code == 2, res.output
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert "'mystery'" in line and "toycol.json" in line and "Traceback" not in res.output
    with pytest.raises(DatasetLayoutError, match="'mystery'"):
        load_labelled(root, dataset="toycol", cache_dir=cache)


def test_a_name_that_is_neither_registered_nor_cached_says_both(own, tmp_path):
    root, cache = own
    res = _eval(root, cache, tmp_path / "res", "--dataset", "toycoll")
    assert res.exit_code == 2, res.output
    assert "unknown data set 'toycoll'" in res.stderr
    assert "No description cache" in res.stderr and "toycoll.json" in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1


def test_train_awt_adapter_on_own_folders_and_an_imported_cache(toy_task, train_clip_dir, tmp_path):
    cache = tmp_path / "cache"
    # the cache spells the classes its own way (case, spaces): matched by folded name
    described = {c.upper(): [f"which is {c} in colour", f"a {c} texture"] for c in TOY_CLASSES}
    desc = tmp_path / "mydesc.json"
    desc.write_text(json.dumps(described))
    imp = ["cache", "import", str(desc), "--dataset", "toycol", "--cache-dir", str(cache)]
    assert runner.invoke(app, imp).exit_code == 0
    out = tmp_path / "adapter.safetensors"
    args = ["train", "-m", "awt-adapter", "--data-root", str(toy_task.root)]
    args += ["--dataset", "toycol", "--cache-dir", str(cache), "--model", train_clip_dir]
    args += ["--shots", "1", "--epochs", "1", "--batch-size", "5", "--descriptions", "2"]
    args += ["--device", "cpu"]
    args += ["--set", "train_views=2", "--set", "prompts_per_step=2", "--no-progress"]
    args += ["--output", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    header, _ = read_checkpoint(out)
    labels = header["labels"]
    assert labels["classes"] == [c.upper() for c in TOY_CLASSES]
    assert labels["descriptions"] == [described[c.upper()] for c in TOY_CLASSES]
    assert labels["template"] == "a photo of a {}"  # the default: the import named none
    assert labels["name"] == "toycol"
