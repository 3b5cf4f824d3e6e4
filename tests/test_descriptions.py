"""The descriptions cache format (awt_engine.descriptions)."""

import json
from pathlib import Path

import pytest

from awt_engine.descriptions import (
    FORMAT_VERSION,
    DescriptionSet,
    descriptions_path,
    export_cupl,
    from_plain,
    load_descriptions,
    save_descriptions,
)

# a sample in the published AWT sets' plain form, shipped with the tests
SAMPLE = Path(__file__).resolve().parent / "data" / "awt-descriptions"


def _set(**kw):
    base = dict(
        dataset="toy",
        classes=("b", "a"),
        descriptions={"a": ["A is red."], "b": ["B is blue.", "B is big."]},
        template="a photo of a {}",
        dataset_description="toy photos",
        questions=("What colour is {}?",),
        provenance={"backend": "openai", "model": "m"},
    )
    base.update(kw)
    return DescriptionSet(**base)


def test_round_trip_writes_format_1_in_label_order(tmp_path):
    ds = _set()
    path = descriptions_path("toy", tmp_path)
    assert path == tmp_path / "descriptions" / "toy.json"
    save_descriptions(ds, path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["format"] == FORMAT_VERSION == 1
    assert raw["classes"] == ["b", "a"]
    assert list(raw["descriptions"]) == ["b", "a"]  # label order, not insertion order
    assert raw["questions"] == ["What colour is {}?"]
    back = load_descriptions(path)
    assert back == ds
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temp file


def test_partial_set_reports_missing_classes():
    ds = _set(descriptions={"b": ["B is blue."]})
    assert ds.counts() == {"b": 1, "a": 0}
    assert ds.missing(1) == {"a": 0}
    assert ds.missing(2) == {"b": 1, "a": 0}
    assert not ds.is_complete()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"classes": ()}, "empty"),
        ({"classes": ("a", "a")}, "duplicate class names: 'a'"),
        ({"descriptions": {"zzz": ["x"]}}, "not in 'classes': 'zzz'"),
        ({"template": "a photo"}, "exactly one '{}'"),
        ({"descriptions": {"a": "not a list"}}, "must be a list"),
    ],
)
def test_invalid_sets_are_rejected_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _set(**kwargs)


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", ".hidden", "", "x" * 200, "sp ace"])
def test_dataset_names_that_are_not_file_names_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match="data set name"):
        descriptions_path(name, tmp_path)


def test_damaged_json_names_the_file(tmp_path):
    path = tmp_path / "dtd.json"
    path.write_text('{"format": 1, "dataset": "dtd", "classes": ["a"', encoding="utf-8")
    with pytest.raises(ValueError) as e:
        load_descriptions(path)
    assert str(path) in str(e.value)
    assert "not valid JSON" in str(e.value)


@pytest.mark.parametrize(
    "obj, message",
    [
        ([1, 2], "expected a JSON object"),
        ({"format": 99, "dataset": "d", "classes": ["a"], "descriptions": {}}, "format 99"),
        ({"format": 1, "dataset": "d", "descriptions": {}}, "missing key"),
        ({"format": 1, "dataset": "d", "classes": ["a"], "descriptions": {"a": [3]}}, "strings"),
        ({"a": "text instead of a list"}, "must be a list"),
    ],
)
def test_wrong_shapes_name_the_file_and_the_problem(tmp_path, obj, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(obj), encoding="utf-8")
    with pytest.raises(ValueError, match=message) as e:
        load_descriptions(path)
    assert str(path) in str(e.value)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        load_descriptions(tmp_path / "nope.json")


def test_plain_form_is_loaded_in_file_order(tmp_path):
    path = tmp_path / "pets.json"
    path.write_text(json.dumps({"Cat": [" A cat. ", ""], "Dog": ["A dog."]}), encoding="utf-8")
    ds = load_descriptions(path)
    assert ds.dataset == "pets"
    assert ds.classes == ("Cat", "Dog")
    assert ds.descriptions == {"Cat": ["A cat."], "Dog": ["A dog."]}  # stripped, empty dropped


def test_from_plain_matches_names_to_registry_classes_and_orders_them():
    mapping = {"Sea_Lion": ["s"], "banded": ["b"]}
    ds = from_plain(mapping, "x", classes=["banded", "sea lion", "zebra"], template="a {}")
    assert ds.classes == ("banded", "sea lion", "zebra")
    assert ds.descriptions == {"banded": ["b"], "sea lion": ["s"]}
    assert ds.missing() == {"zebra": 0}


def test_from_plain_refuses_names_that_match_no_class():
    with pytest.raises(ValueError, match="'unicorn'"):
        from_plain({"unicorn": ["u"]}, "x", classes=["horse"])


def test_export_cupl_is_dataset_then_class_lists():
    ds = _set(descriptions={"a": ["A is red."]})
    assert export_cupl(ds) == {"toy": {"a": ["A is red."]}}


def test_published_awt_set_loads_as_plain_form():
    raw = json.loads((SAMPLE / "dtd.json").read_text(encoding="utf-8"))
    ds = load_descriptions(SAMPLE / "dtd.json")
    assert ds.classes == tuple(raw)
    assert len(ds.classes) == 47
    assert all(len(ds.descriptions[c]) == len([d for d in raw[c] if d.strip()]) for c in raw)


@pytest.mark.parametrize(
    "text",
    [
        "[" * 200_000 + "]" * 200_000,
        '{"format": 1, "dataset": "deep", "classes": ' + "[" * 200_000 + "]" * 200_000 + "}",
        '{"a": ' + "[" * 200_000 + "]" * 200_000 + "}",  # plain form
    ],
)
def test_deeply_nested_file_is_a_clear_error_naming_it(tmp_path, text):
    path = tmp_path / "deep.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=r"deep\.json.*nested too deeply"):
        load_descriptions(path)


def test_dated_backups_never_overwrite_each_other_within_one_second(tmp_path, monkeypatch):
    import awt_engine.descriptions as mod

    # every backup in the same microsecond
    monkeypatch.setattr(mod, "utc_now", lambda compact=False: "20260102T030405.678901Z")
    path = tmp_path / "toy.json"
    made = []
    for i in range(3):
        path.write_text(f"version {i}", encoding="utf-8")
        made.append(mod.backup_descriptions(path))
    assert [p.name for p in made] == [
        "toy.json.20260102T030405.678901Z.bak",
        "toy.json.20260102T030405.678901Z-1.bak",
        "toy.json.20260102T030405.678901Z-2.bak",
    ]
    assert [p.read_text(encoding="utf-8") for p in made] == [f"version {i}" for i in range(3)]
