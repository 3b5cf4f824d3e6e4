"""The data set registry: templates, aliases, class lists, class-list files, templates."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import sys
from pathlib import Path

import pytest

from awt_engine import registry as ds
from awt_engine.registry import (
    DatasetInfo,
    display_name,
    fill_template,
    get_dataset,
    list_datasets,
    read_class_list,
    validate_template,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# docs/design.md section 4, verbatim.
EXPECTED_TEMPLATES = {
    "imagenet": "a photo of a {}",
    "imagenetv2": "a photo of a {}",
    "imagenet_a": "a photo of a {}",
    "imagenet_sketch": "a sketch photo of a {}",
    "imagenet_r": "a rendition photo of a {}",
    "dtd": "a photo of a {}, which is a type of texture, or a type of pattern",
    "eurosat": "satellite photo of the {}",
    "oxford_pets": "a photo of a {} from OxfordPets",
    "oxford_flowers": "a photo of a {}, a type of flower",
    "fgvc_aircraft": "a photo of a {} from Fine-Grained Visual Classification of Aircraft",
    "stanford_cars": "a photo of a {}",
    "sun397": "a photo of a {}",
    "caltech101": "a photo of a {}",
    "food101": "a photo of a {} from Food101",
    "ucf101": "a photo of a person doing {}",
    "cub": "a photo of the {}",
    "caltech256": "a photo of the {}",
    "birdsnap": "a photo of the {}",
    "cifar10": "a photo of the {}",
    "cifar100": "a photo of the {}",
}

EXPECTED_COUNTS = {
    "imagenet": 1000,
    "imagenetv2": 1000,
    "imagenet_sketch": 1000,
    "imagenet_a": 200,
    "imagenet_r": 200,
    "dtd": 47,
    "eurosat": 10,
    "oxford_pets": 37,
    "oxford_flowers": 102,
    "fgvc_aircraft": 100,
    "stanford_cars": 196,
    "sun397": 397,
    "caltech101": 100,
    "food101": 101,
    "ucf101": 101,
    "cub": 200,
    "caltech256": 257,
    "birdsnap": 500,
    "cifar10": 10,
    "cifar100": 100,
}


# description sets in the published AWT form, written for the tests (their README)
DESCRIPTION_SAMPLES = Path(__file__).resolve().parent / "data" / "awt-descriptions"


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_design_data_set():
    assert sorted(EXPECTED_TEMPLATES) == list_datasets()


@pytest.mark.parametrize("name", sorted(EXPECTED_TEMPLATES))
def test_templates_verbatim(name):
    info = get_dataset(name)
    assert info.name == name
    assert info.template == EXPECTED_TEMPLATES[name]
    assert info.description and "\n" not in info.description


@pytest.mark.parametrize("name, count", sorted(EXPECTED_COUNTS.items()))
def test_class_counts(name, count):
    classes = get_dataset(name).classes
    assert classes is not None and len(classes) == count
    assert get_dataset(name).num_classes == count
    assert all(isinstance(c, str) and c == c.strip() and c for c in classes)


@pytest.mark.parametrize(
    "alias, name",
    [
        ("pets", "oxford_pets"),
        ("flowers102", "oxford_flowers"),
        ("aircraft", "fgvc_aircraft"),
        ("cars", "stanford_cars"),
        ("food-101", "food101"),
        ("DTD", "dtd"),
        ("  Oxford_Pets ", "oxford_pets"),
        ("ImageNet-A", "imagenet_a"),
        ("imagenet-sketch", "imagenet_sketch"),
        ("ImageNet_V2", "imagenetv2"),
        ("CIFAR-100", "cifar100"),
    ],
)
def test_aliases_and_case(alias, name):
    assert get_dataset(alias).name == name
    assert get_dataset(alias) is get_dataset(name)


def test_unknown_name_lists_choices_and_close_match():
    with pytest.raises(ValueError) as exc:
        get_dataset("oxford_flower")
    msg = str(exc.value)
    assert "'oxford_flower'" in msg
    assert "Did you mean 'oxford_flowers'" in msg
    for name in list_datasets():
        assert name in msg
    with pytest.raises(ValueError, match="unknown data set 'mnist'") as exc:
        get_dataset("mnist")
    assert "Did you mean" not in str(exc.value)


def test_non_string_name_is_type_error():
    with pytest.raises(TypeError, match="int"):
        get_dataset(3)  # type: ignore[arg-type]


def test_dataset_info_is_frozen_and_validates():
    info = get_dataset("dtd")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "x"  # type: ignore[misc]
    custom = DatasetInfo("mine", "a photo of a {}", "my photos", ["a", "b"])
    assert custom.classes == ("a", "b") and custom.aliases == ()
    with pytest.raises(ValueError, match="exactly one"):
        DatasetInfo("bad", "a photo of a", "x", None)


def test_known_facts_in_label_order():
    assert get_dataset("dtd").classes[:3] == ("banded", "blotchy", "braided")
    assert get_dataset("dtd").classes[-1] == "zigzagged"
    assert get_dataset("eurosat").classes == (
        "annual crop land",
        "forest",
        "brushland or shrubland",
        "highway or road",
        "industrial buildings or commercial buildings",
        "pasture land",
        "permanent crop land",
        "residential buildings or homes or apartments",
        "river",
        "lake or sea",
    )
    pets = get_dataset("oxford_pets").classes
    assert pets[0] == "abyssinian" and pets[-1] == "yorkshire_terrier" and "sphynx" in pets
    flowers = get_dataset("oxford_flowers").classes
    assert (flowers[0], flowers[1], flowers[-1]) == (
        "pink primrose",
        "hard-leaved pocket orchid",
        "blackberry lily",
    )
    food = get_dataset("food101").classes
    assert food[16:18] == ("cheesecake", "cheese_plate") and food[-1] == "waffles"
    caltech = get_dataset("caltech101").classes
    assert caltech[:5] == ("face", "leopard", "motorbike", "accordion", "airplane")
    assert not any("background" in c.lower() or "faces_easy" in c.lower() for c in caltech)
    aircraft = get_dataset("fgvc_aircraft").classes
    assert aircraft[0] == "707-320" and "F/A-18" in aircraft and aircraft[-1] == "Yak-42"
    assert get_dataset("ucf101").classes[0] == "Apply_Eye_Makeup"
    assert get_dataset("sun397").classes[8] == "outdoor apartment_building"
    assert get_dataset("stanford_cars").classes[0] == "2000 AM General Hummer SUV"
    assert get_dataset("caltech256").classes[-1] == "clutter"
    assert get_dataset("cifar10").classes == (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    )
    cifar100 = get_dataset("cifar100").classes
    assert cifar100[:3] == ("apple", "aquarium_fish", "baby") and cifar100[-1] == "worm"


def test_imagenet_family():
    imagenet = get_dataset("imagenet").classes
    assert imagenet[:3] == ("tench", "goldfish", "great white shark")
    assert imagenet[-1] == "toilet paper"
    assert get_dataset("imagenetv2").classes == imagenet
    assert get_dataset("imagenet_sketch").classes == imagenet
    assert get_dataset("imagenet_a").classes[:5] == (
        "stingray",
        "goldfinch",
        "junco",
        "American robin",
        "jay",
    )
    assert get_dataset("imagenet_r").classes[:5] == (
        "goldfish",
        "great white shark",
        "hammerhead shark",
        "stingray",
        "hen",
    )
    for sub in ("imagenet_a", "imagenet_r"):
        classes = get_dataset(sub).classes
        positions = [imagenet.index(c) for c in classes]
        assert positions == sorted(positions), f"{sub} is not in ImageNet label order"


def test_imagenet_names_are_registry_data():
    """ImageNet's names are data the registry ships (no open_clip, no backbone import),
    identical to open_clip's IMAGENET_CLASSNAMES, bit for bit and in label order."""
    import subprocess

    code = (
        "import sys; from awt_engine import registry as r; names = r.imagenet_classnames(); "
        "assert len(names) == 1000; "
        "bad = [m for m in sys.modules if m.startswith(('open_clip', 'torch', "
        "'awt_engine.backbone'))]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    import open_clip.zero_shot_metadata as metadata

    shipped = ds.imagenet_classnames()
    assert shipped == tuple(metadata.IMAGENET_CLASSNAMES)
    assert [n.encode() for n in shipped] == [n.encode() for n in metadata.IMAGENET_CLASSNAMES]


def test_only_known_duplicate_names():
    """No shipped list repeats a name (as a prompt reads it), except CLIP's ImageNet names."""
    for name in list_datasets():
        classes = get_dataset(name).classes
        keys = [display_name(c).casefold() for c in classes]
        dups = sorted({k for k in keys if keys.count(k) > 1})
        if name in ("imagenet", "imagenetv2", "imagenet_sketch"):
            assert dups == ["missile", "sunglasses"], name
        else:
            assert dups == [], f"{name}: {dups}"


def test_class_file_is_package_data():
    resource = importlib.resources.files("awt_engine") / "data" / "classnames.json"
    assert resource.is_file()
    data = json.loads(resource.read_text(encoding="utf-8"))
    assert data["format"] == 1
    assert Path(str(resource)).resolve().is_relative_to(Path(ds.__file__).resolve().parent)


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def test_registry_matches_published_description_sets():
    """The published AWT description sets are keyed by class name in label order.

    The sets checked are the samples under tests/data/awt-descriptions, whose class
    names were written from each data set's own class list (DTD's 47), not from the
    registry. No data set differs intentionally: every list matches its file exactly, including
    EuroSAT, whose names are CLIP's (as the AWT paper uses), not CoOp's
    ("Herbaceous Vegetation Land", "Industrial Buildings", ...). The comparison is after
    normalising case, underscores and spaces, so spelling conventions do not fail it.
    """
    folder = DESCRIPTION_SAMPLES
    files = sorted(folder.glob("*.json"))
    assert files, f"no description sets in {folder}"
    problems = []
    for path in files:
        name = path.stem
        keys = list(json.loads(path.read_text(encoding="utf-8")))
        classes = get_dataset(name).classes
        if classes is None:
            problems.append(f"{name}: registry has no class list ({len(keys)} in file)")
            continue
        if len(classes) != len(keys):
            problems.append(f"{name}: {len(classes)} classes, file has {len(keys)}")
        wrong = [
            f"#{i}: {a!r} vs file {b!r}"
            for i, (a, b) in enumerate(zip(classes, keys, strict=False))
            if _norm(a) != _norm(b)
        ]
        if wrong:
            problems.append(f"{name}: {len(wrong)} mismatches, first: {'; '.join(wrong[:5])}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- class lists


def test_read_class_list_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_bytes(
        "\ufeff# my classes\n  cat \n\n dog\n# bird\nbanded_gecko\ncrème brûlée\r\n".encode()
    )
    assert read_class_list(path) == ["cat", "dog", "banded_gecko", "crème brûlée"]
    assert read_class_list(str(path)) == ["cat", "dog", "banded_gecko", "crème brûlée"]


def test_read_class_list_comma_separated():
    assert read_class_list(" cat, dog ,bird") == ["cat", "dog", "bird"]
    assert read_class_list("F/A-18,") == ["F/A-18"]
    assert read_class_list("tabby") == ["tabby"]


def test_read_class_list_duplicates_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"duplicate class names: 'cat' \(items 1, 3\)"):
        read_class_list("cat, dog, cat")
    path = tmp_path / "c.txt"
    path.write_text("apple_pie\ncat\nApple pie\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"'apple_pie' = 'Apple pie' \(lines 1, 3\)"):
        read_class_list(path)


@pytest.mark.parametrize("content", ["", "\n\n", "# only a comment\n   \n"])
def test_read_class_list_empty_file(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match="no class names"):
        read_class_list(path)


@pytest.mark.parametrize("spec", ["", "   ", ",", " , ,"])
def test_read_class_list_empty_string(spec):
    with pytest.raises(ValueError, match="class"):
        read_class_list(spec)


def test_read_class_list_missing_path(tmp_path):
    for spec in (str(tmp_path / "nope.txt"), "nope.txt", "lists/classes", "~/nope"):
        with pytest.raises(ValueError, match="does not exist") as exc:
            read_class_list(spec)
        assert repr(spec) in str(exc.value)
    with pytest.raises(ValueError, match="does not exist"):
        read_class_list(tmp_path / "nope")
    with pytest.raises(ValueError, match="folder"):
        read_class_list(str(tmp_path))


def test_read_class_list_not_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        read_class_list(path)


def test_validate_class_names():
    assert ds.validate_class_names([" a", "b "]) == ["a", "b"]
    with pytest.raises(ValueError, match="no class names"):
        ds.validate_class_names([])
    with pytest.raises(ValueError, match="blank"):
        ds.validate_class_names(["a", "__"])
    with pytest.raises(ValueError, match="duplicate"):
        ds.validate_class_names(["Cat", "cat"])


# --------------------------------------------------------------------------- templates


def test_display_name():
    assert display_name("apple_pie") == "apple pie"
    assert display_name("outdoor  apartment_building ") == "outdoor apartment building"
    assert display_name("F/A-18") == "F/A-18"


def test_fill_template():
    assert fill_template("a photo of a {}.", "apple_pie") == "a photo of a apple pie."
    assert (
        fill_template(EXPECTED_TEMPLATES["ucf101"], "Apply_Eye_Makeup")
        == "a photo of a person doing Apply Eye Makeup"
    )
    # A class name with braces is inserted literally.
    assert fill_template("x {} y", "a{}b") == "x a{}b y"


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("a photo of a dog", "found 0"),
        ("a {} and a {}", "found 2"),
        ("a photo of a {c}.", "{c}"),
        ("a photo of a {0}", "{0}"),
    ],
)
def test_template_errors_name_the_template(template, fragment):
    for call in (lambda: validate_template(template), lambda: fill_template(template, "cat")):
        with pytest.raises(ValueError) as exc:
            call()
        assert repr(template) in str(exc.value) and fragment in str(exc.value)


def test_validate_template_returns_it():
    assert validate_template("a photo of a {}") == "a photo of a {}"
