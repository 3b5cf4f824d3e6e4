"""Reading labelled data sets: CoOp split files, FGVC lists, ImageNet folders, ImageFolder."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from awt_engine.labelled import (
    DatasetLayoutError,
    LabelledData,
    LabelledItem,
    load_labelled,
    subset,
)
from awt_engine.registry import get_dataset
from tests.fixtures_images import chmod_000, deny_listing, run_with_permissions


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png_bytes()


def touch_image(path: Path) -> Path:
    """A real (tiny) image file; the extension only names it, the bytes are a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PNG)
    return path


def labels_by_name(data: LabelledData) -> dict[str, int]:
    return {item.path.name: item.label for item in data.items}


def write_split(path: Path, splits: dict[str, list[list]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(splits), encoding="utf-8")


# --------------------------------------------------------------------------- CoOp split files


@pytest.fixture
def dtd_parent(tmp_path: Path) -> Path:
    """<parent>/dtd/ as CoOp has it: images/<class>/ and split_zhou_DescribableTextures.json."""
    dtd = tmp_path / "data" / "dtd"
    test = [
        # Labels as a class-subsampled file would have them (0, 1, 2): they disagree with
        # the registry order, the names decide.
        ["banded/banded_0002.jpg", 0, "banded"],
        ["braided/braided_0001.jpg", 1, "braided"],
        ["bubbly/bubbly_0007.jpg", 2, "bubbly"],
        ["banded/banded_0001.jpg", 0, "banded"],
    ]
    val = [["braided/braided_0009.jpg", 1, "braided"]]
    for rel, _, _ in test + val:
        touch_image(dtd / "images" / rel)
    write_split(
        dtd / "split_zhou_DescribableTextures.json", {"train": [], "val": val, "test": test}
    )
    (dtd / "labels").mkdir()
    (dtd / "labels" / "test1.txt").write_text("banded/banded_0001.jpg\n")
    return tmp_path / "data"


def test_dtd_split_file_from_parent_and_from_folder(dtd_parent: Path):
    for root in (dtd_parent, dtd_parent / "dtd"):
        data = load_labelled(root, dataset="dtd")
        assert data.name == "dtd"
        assert data.classes == get_dataset("dtd").classes
        assert len(data.classes) == 47
        # File order is kept; banded = 0, braided = 2, bubbly = 3 in the registry.
        assert [(i.path.name, i.label) for i in data.items] == [
            ("banded_0002.jpg", 0),
            ("braided_0001.jpg", 2),
            ("bubbly_0007.jpg", 3),
            ("banded_0001.jpg", 0),
        ]
        assert all(i.path.is_file() for i in data.items)
        assert data.items[0].path == dtd_parent / "dtd" / "images" / "banded" / "banded_0002.jpg"
        assert "CoOp split file split_zhou_DescribableTextures.json (test)" in data.source
        assert "44 of 47 classes have no images" in data.source
        assert "labels follow the class names" in data.source


def test_dtd_split_file_val_split_and_unknown_split(dtd_parent: Path):
    data = load_labelled(dtd_parent, dataset="dtd", split="val")
    assert [(i.path.name, i.label) for i in data.items] == [("braided_0009.jpg", 2)]
    with pytest.raises(DatasetLayoutError, match=r"no split 'dev'.*'train', 'val', 'test'"):
        load_labelled(dtd_parent, dataset="dtd", split="dev")


def test_eurosat_split_file_with_coop_names(tmp_path: Path):
    eurosat = tmp_path / "eurosat"
    test = [
        ["AnnualCrop/AnnualCrop_1.jpg", 0, "Annual Crop Land"],
        ["HerbaceousVegetation/HerbaceousVegetation_1.jpg", 2, "Herbaceous Vegetation Land"],
        ["Industrial/Industrial_1.jpg", 4, "Industrial Buildings"],
        ["SeaLake/SeaLake_1.jpg", 9, "Sea or Lake"],
        ["Forest/Forest_3.jpg", 1, "Forest"],
    ]
    for rel, _, _ in test:
        touch_image(eurosat / "2750" / rel)
    write_split(eurosat / "split_zhou_EuroSAT.json", {"train": [], "val": [], "test": test})
    data = load_labelled(tmp_path, dataset="eurosat")
    assert data.classes[2] == "brushland or shrubland"
    assert labels_by_name(data) == {
        "AnnualCrop_1.jpg": 0,
        "HerbaceousVegetation_1.jpg": 2,
        "Industrial_1.jpg": 4,
        "SeaLake_1.jpg": 9,
        "Forest_3.jpg": 1,
    }
    assert "labels follow" not in data.source  # the file's labels agree here


def test_split_file_explicit_classes_override_registry(dtd_parent: Path):
    data = load_labelled(dtd_parent, dataset="dtd", classes=["Bubbly", "braided", "banded"])
    assert data.classes == ("Bubbly", "braided", "banded")
    assert [i.label for i in data.items] == [2, 1, 0, 2]


def test_split_file_missing_images_error(dtd_parent: Path):
    (dtd_parent / "dtd" / "images" / "bubbly" / "bubbly_0007.jpg").unlink()
    (dtd_parent / "dtd" / "images" / "banded" / "banded_0001.jpg").unlink()
    with pytest.raises(DatasetLayoutError) as info:
        load_labelled(dtd_parent, dataset="dtd")
    message = str(info.value)
    assert "2 of 4 images" in message
    assert "bubbly/bubbly_0007.jpg" in message and "banded/banded_0001.jpg" in message
    assert "split_zhou_DescribableTextures.json" in message


def test_split_file_images_found_in_another_folder(tmp_path: Path):
    # The split's paths are relative to an image folder with another name: found by search.
    pets = tmp_path / "oxford_pets"
    test = [["Abyssinian_1.jpg", 0, "abyssinian"], ["beagle_12.jpg", 4, "beagle"]]
    for rel, _, _ in test:
        touch_image(pets / "renamed_images" / rel)
    write_split(pets / "split_zhou_OxfordPets.json", {"test": test})
    data = load_labelled(pets, dataset="pets")
    assert labels_by_name(data) == {"Abyssinian_1.jpg": 0, "beagle_12.jpg": 4}
    assert data.items[0].path.parent.name == "renamed_images"


def test_split_file_unknown_class_name(tmp_path: Path):
    test = [["images/a.jpg", 0, "banded"], ["images/b.jpg", 1, "spotty"]]
    for rel, _, _ in test:
        touch_image(tmp_path / "dtd" / "images" / rel)
    write_split(tmp_path / "dtd" / "split_zhou_DescribableTextures.json", {"test": test})
    with pytest.raises(DatasetLayoutError, match=r"'spotty' \(closest: 'pitted', 'dotted'\)"):
        load_labelled(tmp_path, dataset="dtd")


# --------------------------------------------------------------------------- FGVC-Aircraft


def test_fgvc_aircraft_variant_lists(tmp_path: Path):
    fgvc = tmp_path / "fgvc_aircraft"
    rows = [("1514522", "707-320"), ("0034309", "A330-200"), ("0056978", "F/A-18")]
    for image_id, _ in rows:
        touch_image(fgvc / "images" / f"{image_id}.jpg")
    (fgvc / "images_variant_test.txt").write_text("".join(f"{i} {v}\n" for i, v in rows))
    (fgvc / "images_variant_val.txt").write_text("1514522 707-320\n")
    data = load_labelled(tmp_path, dataset="fgvc_aircraft")
    assert len(data.classes) == 100
    assert [(i.path.name, i.label) for i in data.items] == [
        ("1514522.jpg", 0),
        ("0034309.jpg", 27),
        ("0056978.jpg", 73),
    ]
    assert "images_variant_test.txt" in data.source
    assert [i.label for i in load_labelled(fgvc, dataset="aircraft", split="val").items] == [0]
    with pytest.raises(
        DatasetLayoutError, match=r"no images_variant_train.txt.*images_variant_test"
    ):
        load_labelled(fgvc, dataset="fgvc_aircraft", split="train")


# --------------------------------------------------------------------------- ImageFolder + registry


def test_image_folder_names_folded_onto_registry(tmp_path: Path):
    images = tmp_path / "food-101" / "images"
    touch_image(images / "Apple_Pie" / "1.jpg")
    touch_image(images / "Apple_Pie" / "sub" / "2.JPG")  # recursive, any case
    touch_image(images / "baby-back-ribs" / "3.png")
    touch_image(images / "BAKLAVA" / "4.jpeg")
    (images / "BAKLAVA" / "notes.txt").write_text("not an image")
    (images / "BAKLAVA" / ".hidden.jpg").write_bytes(PNG)
    data = load_labelled(tmp_path, dataset="food101")
    assert data.classes[:3] == ("apple_pie", "baby_back_ribs", "baklava")
    assert labels_by_name(data) == {"1.jpg": 0, "2.JPG": 0, "3.png": 1, "4.jpeg": 2}
    assert [i.path for i in data.items] == sorted((i.path for i in data.items), key=str)
    assert data.source.startswith(f"ImageFolder {images}")
    assert "98 of 101 classes have no images" in data.source


def test_image_folder_eurosat_and_caltech_renamings(tmp_path: Path):
    eurosat = tmp_path / "eurosat" / "2750"
    for folder in ("AnnualCrop", "SeaLake", "Residential"):
        touch_image(eurosat / folder / f"{folder}_1.jpg")
    data = load_labelled(tmp_path / "eurosat", dataset="eurosat")
    assert labels_by_name(data) == {
        "AnnualCrop_1.jpg": 0,
        "SeaLake_1.jpg": 9,
        "Residential_1.jpg": 7,
    }

    caltech = tmp_path / "caltech-101" / "101_ObjectCategories"
    for folder in ("Faces", "airplanes", "car_side", "BACKGROUND_Google", "Faces_easy"):
        touch_image(caltech / folder / f"{folder}_0001.jpg")
    data = load_labelled(tmp_path, dataset="caltech101")
    assert labels_by_name(data) == {
        "Faces_0001.jpg": 0,
        "airplanes_0001.jpg": 4,
        "car_side_0001.jpg": 18,
    }
    assert "BACKGROUND_Google" in data.source


def test_image_folder_numeric_prefix_and_punctuation(tmp_path: Path):
    cub = tmp_path / "CUB_200_2011" / "images"
    touch_image(cub / "001.Black_footed_Albatross" / "a.jpg")
    touch_image(cub / "002.Laysan_Albatross" / "b.jpg")
    data = load_labelled(tmp_path, dataset="cub")
    assert labels_by_name(data) == {"a.jpg": 0, "b.jpg": 1}
    # All punctuation ignored as a last resort ("F_A-18" ~ "F/A-18").
    aircraft = tmp_path / "planes"
    touch_image(aircraft / "F_A-18" / "x.jpg")
    touch_image(aircraft / "bae_146-200" / "y.jpg")
    data = load_labelled(aircraft, dataset="fgvc_aircraft")
    assert labels_by_name(data) == {"x.jpg": 73, "y.jpg": 37}


def test_image_folder_mismatch_lists_unmatched_names(tmp_path: Path):
    for folder in ("banded", "stripy", "zigzagz"):
        touch_image(tmp_path / "textures" / folder / "1.jpg")
    with pytest.raises(DatasetLayoutError) as info:
        load_labelled(tmp_path / "textures", dataset="dtd")
    message = str(info.value)
    assert "2 of 3 class folder names" in message
    assert "'stripy' (closest: 'striped'" in message
    assert "'zigzagz' (closest: 'zigzagged'" in message
    assert "'banded'" not in message
    assert "split_zhou_DescribableTextures.json" in message  # says what was expected


def test_image_folder_two_folders_same_class(tmp_path: Path):
    touch_image(tmp_path / "Apple_Pie" / "1.jpg")
    touch_image(tmp_path / "apple pie" / "2.jpg")
    with pytest.raises(DatasetLayoutError, match=r"'Apple_Pie' and 'apple pie' -> 'apple_pie'"):
        load_labelled(tmp_path, dataset="food101")


# --------------------------------------------------------------------------- no data set


def test_no_dataset_image_folder(tmp_path: Path):
    root = tmp_path / "my pets"
    touch_image(root / "tabby cat" / "t1.jpg")
    touch_image(root / "golden_retriever" / "g2.jpg")
    touch_image(root / "golden_retriever" / "g1.jpg")
    (root / "empty_folder").mkdir()
    touch_image(root / "loose.jpg")  # not in a class folder: not an item
    data = load_labelled(root)
    assert data.name == "my pets"
    assert data.classes == ("golden_retriever", "tabby cat")  # folder names kept as they are
    assert [(i.path.name, i.label) for i in data.items] == [
        ("g1.jpg", 0),
        ("g2.jpg", 0),
        ("t1.jpg", 1),
    ]
    assert data.source.startswith(f"ImageFolder {root}")
    assert "empty_folder" in data.source

    data = load_labelled(root, classes=["parrot", "Tabby Cat", "golden retriever"])
    assert data.classes == ("parrot", "Tabby Cat", "golden retriever")
    assert labels_by_name(data) == {"g1.jpg": 2, "g2.jpg": 2, "t1.jpg": 1}

    with pytest.raises(DatasetLayoutError, match=r"'golden_retriever'"):
        load_labelled(root, classes=["parrot", "tabby cat"])


def test_no_dataset_images_subfolder_split_folders_and_numeric_names(tmp_path: Path):
    root = tmp_path / "ds"
    for split in ("train", "test"):
        for cls in ("b", "a"):
            touch_image(root / "images" / split / cls / f"{split}_{cls}.jpg")
    data = load_labelled(root)
    assert [(i.path.name, i.label) for i in data.items] == [("test_a.jpg", 0), ("test_b.jpg", 1)]
    assert [i.path.name for i in load_labelled(root, split="train").items] == [
        "train_a.jpg",
        "train_b.jpg",
    ]
    with pytest.raises(DatasetLayoutError, match=r"none for split 'val'"):
        load_labelled(root, split="val")

    numbered = tmp_path / "numbered"
    for cls in ("10", "2", "1"):
        touch_image(numbered / cls / f"{cls}.jpg")
    assert load_labelled(numbered).classes == ("1", "2", "10")


# --------------------------------------------------------------------------- ImageNet family


def test_imagenetv2_numeric_folders(tmp_path: Path):
    v2 = tmp_path / "imagenetv2" / "imagenetv2-matched-frequency-format-val"
    for label in (0, 5, 999):
        touch_image(v2 / str(label) / f"img{label}.jpeg")
    data = load_labelled(tmp_path, dataset="imagenetv2")
    assert len(data.classes) == 1000
    assert labels_by_name(data) == {"img0.jpeg": 0, "img5.jpeg": 5, "img999.jpeg": 999}
    assert "numbered folders (0-based label)" in data.source


def test_numeric_folders_one_based(tmp_path: Path):
    for label in (1, 7, 102):
        touch_image(tmp_path / "flowers" / str(label) / f"{label}.jpg")
    data = load_labelled(tmp_path / "flowers", dataset="oxford_flowers")
    assert labels_by_name(data) == {"1.jpg": 0, "7.jpg": 6, "102.jpg": 101}


def _wnids(n: int) -> list[str]:
    return [f"n{i:08d}" for i in range(1, n + 1)]


def test_imagenet_wnid_folders_sorted_order(tmp_path: Path):
    wnids = _wnids(1000)
    shuffled = wnids[:]
    random.Random(1).shuffle(shuffled)
    val = tmp_path / "imagenet" / "images" / "val"
    for w in shuffled:
        touch_image(val / w / f"{w}_1.JPEG")
    touch_image(tmp_path / "imagenet" / "images" / "train" / wnids[0] / "train_only.JPEG")
    data = load_labelled(tmp_path, dataset="imagenet")
    assert len(data.items) == 1000
    got = labels_by_name(data)
    assert got["n00000001_1.JPEG"] == 0
    assert got["n00000500_1.JPEG"] == 499
    assert got["n00001000_1.JPEG"] == 999
    assert "split 'test' read from val/" in data.source
    assert "WordNet-id folders" in data.source


def test_imagenet_r_wnid_folders_and_partial_copy(tmp_path: Path):
    r = tmp_path / "imagenet-rendition" / "imagenet-r"
    wnids = _wnids(200)
    for w in wnids:
        touch_image(r / w / "art_0.jpg")
    (r / "README.txt").write_text("readme")
    data = load_labelled(tmp_path, dataset="imagenet_r")
    assert data.classes == get_dataset("imagenet_r").classes
    assert [i.label for i in data.items] == list(range(200))

    partial = tmp_path / "partial" / "imagenet-a"
    for w in wnids[:3]:
        touch_image(partial / w / "a.jpg")
    with pytest.raises(DatasetLayoutError, match=r"3 WordNet-id class folders.*200 classes"):
        load_labelled(tmp_path / "partial", dataset="imagenet_a")


def test_imagenet_partial_wnid_folders_with_classnames_txt(tmp_path: Path):
    wnids = _wnids(1000)
    root = tmp_path / "imagenet"
    (root / "classnames.txt").parent.mkdir(parents=True)
    (root / "classnames.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(wnids)))
    for w in (wnids[3], wnids[997]):
        touch_image(root / "images" / "val" / w / f"{w}.JPEG")
    data = load_labelled(tmp_path, dataset="imagenet")
    assert labels_by_name(data) == {f"{wnids[3]}.JPEG": 3, f"{wnids[997]}.JPEG": 997}


# --------------------------------------------------------------------------- errors


def test_empty_or_missing_root(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "sub").mkdir()
    (empty / "notes.txt").write_text("x")
    with pytest.raises(DatasetLayoutError, match=r"empty.*no images"):
        load_labelled(empty)
    with pytest.raises(DatasetLayoutError, match=r"empty.*for dtd, expected the CoOp split file"):
        load_labelled(empty, dataset="dtd")
    with pytest.raises(DatasetLayoutError, match=r"does not exist"):
        load_labelled(tmp_path / "nope")
    flat = tmp_path / "flat"
    touch_image(flat / "a.jpg")
    with pytest.raises(DatasetLayoutError, match=r"images directly in it but no class subfolders"):
        load_labelled(flat)
    assert issubclass(DatasetLayoutError, ValueError)


def _pets_with_locked_class(root: Path) -> tuple[Path, Path]:
    touch_image(root / "cat" / "c1.jpg")
    touch_image(root / "dog" / "d1.jpg")
    touch_image(root / "dog" / "more" / "d2.jpg")
    touch_image(root / "parrot" / "p1.jpg")
    return root / "parrot", root / "dog" / "more"


def test_unreadable_class_folder_is_an_error_naming_it(tmp_path: Path, monkeypatch):
    parrot, nested = _pets_with_locked_class(tmp_path / "pets")
    for locked in (parrot, nested):
        with monkeypatch.context() as m:
            deny_listing(m, locked)
            with pytest.raises(DatasetLayoutError, match=r"cannot read folder") as info:
                load_labelled(tmp_path / "pets")
        assert f"{str(locked)!r} (permission denied)" in str(info.value)
    assert len(load_labelled(tmp_path / "pets").items) == 4  # readable again: all of them


def test_unreadable_class_folder_with_real_permissions(tmp_path: Path):
    """chmod 000, checked where permissions apply (as root: capabilities dropped)."""
    parrot, _ = _pets_with_locked_class(tmp_path / "pets")
    code = (
        "import sys; from awt_engine.labelled import load_labelled, DatasetLayoutError\n"
        "try:\n    data = load_labelled(sys.argv[1])\n"
        "except DatasetLayoutError as exc:\n    print(exc)\nelse:\n"
        "    print('loaded', data.classes)"
    )
    with chmod_000(parrot):
        res = run_with_permissions(code, str(tmp_path / "pets"))
    assert res.returncode == 0, res.stderr
    assert f"cannot read folder {str(parrot)!r} (permission denied)" in res.stdout


def test_unknown_dataset_name_is_value_error(tmp_path: Path):
    touch_image(tmp_path / "a" / "1.jpg")
    with pytest.raises(ValueError, match=r"unknown data set 'dtdd'"):
        load_labelled(tmp_path, dataset="dtdd")


# --------------------------------------------------------------------------- subset


def _fake_data(n: int) -> LabelledData:
    items = tuple(LabelledItem(path=Path(f"/x/{i:03d}.jpg"), label=i % 3) for i in range(n))
    return LabelledData(name="fake", classes=("a", "b", "c"), items=items, source="test")


def test_subset_is_seeded_and_keeps_order():
    data = _fake_data(100)
    a = subset(data, 10)
    assert a == subset(data, 10, seed=0)
    assert len(a.items) == 10
    assert list(a.items) == sorted(a.items, key=lambda i: str(i.path))  # original order kept
    assert set(a.items) <= set(data.items)
    assert subset(data, 10, seed=1).items != a.items
    assert a.classes == data.classes and a.name == data.name
    assert "random subset of 10 of 100 images (seed 0)" in a.source
    assert subset(data, None) is data
    assert subset(data, 100) is data
    assert subset(data, 1000) is data
    for bad in (0, -3):
        with pytest.raises(ValueError, match="at least 1"):
            subset(data, bad)


def test_folders_that_name_the_same_class_are_refused(tmp_path):
    from PIL import Image

    for name in ("sea_lion", "Sea Lion", "otter"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / name / "a.png")
    with pytest.raises(ValueError, match="duplicate class names") as info:
        load_labelled(tmp_path)
    assert "'sea_lion'" in str(info.value) and "'Sea Lion'" in str(info.value)


def test_a_split_folder_as_data_root_is_named_after_its_data_set(tmp_path):
    from PIL import Image

    for split in ("val", "train"):
        for c in ("cat", "dog"):
            (tmp_path / "pets" / split / c).mkdir(parents=True)
            Image.new("RGB", (4, 4)).save(tmp_path / "pets" / split / c / "a.png")
    assert load_labelled(tmp_path / "pets").name == "pets"
    assert load_labelled(tmp_path / "pets" / "val").name == "pets"  # not "val"
