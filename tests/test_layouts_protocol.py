"""The layout protocol: a layout registered by decorator is asked by ``load_labelled`` with
no other change, in list order (the first that detects a request reads it), ahead of the
class-folder fallback; and labelled.py names no data set."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import awt_engine.labelled as labelled
from awt_engine.labelled import LabelledData, LabelledItem, load_labelled
from awt_engine.layouts import base
from awt_engine.layouts.catalog import DATASET_FILES


@pytest.fixture
def layouts(monkeypatch):
    """A private copy of the list, so the test's registrations leave no trace."""
    fresh = list(base.LAYOUTS)
    monkeypatch.setattr(base, "LAYOUTS", fresh)
    return fresh


def _csv_root(tmp_path: Path) -> Path:
    """A root the built-in layouts would read as class folders (cat/, dog/), plus a
    labels.csv that only the test's layouts understand."""
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "a.png").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("x.png,dog\ny.png,cat\nz.png,dog\n")
    return tmp_path


def _read_csv(request: base.LayoutRequest, tag: str) -> LabelledData:
    rows = [line.split(",") for line in (request.root / "labels.csv").read_text().splitlines()]
    classes = tuple(sorted({c for _, c in rows}))
    items = tuple(LabelledItem(request.root / p, classes.index(c)) for p, c in rows)
    return LabelledData(name=request.name, classes=classes, items=items, source=tag)


def test_a_registered_layout_is_picked_up_by_load_labelled(layouts, tmp_path):
    root = _csv_root(tmp_path)
    assert load_labelled(root).source.startswith("ImageFolder")  # before: class folders

    @base.register_layout
    class CsvLabels(base.Layout):
        name = "test-csv"
        description = "labels.csv: '<image>,<class>' per line"

        def detect(self, request):
            return (request.root / "labels.csv").is_file()

        def load(self, request):
            return _read_csv(request, "csv")

    assert [lay.name for lay in layouts][-2:] == ["test-csv", "class-folders"]
    data = load_labelled(root)
    assert data.source == "csv"
    assert data.classes == ("cat", "dog")
    assert [(i.path.name, i.label) for i in data.items] == [
        ("x.png", 1),
        ("y.png", 0),
        ("z.png", 1),
    ]
    assert data.name == tmp_path.name
    # a root without labels.csv still goes to the fallback
    (root / "labels.csv").unlink()
    assert load_labelled(root).source.startswith("ImageFolder")


def test_list_order_decides_ties(layouts, tmp_path):
    root = _csv_root(tmp_path)

    def csv_layout(layout_name: str) -> type[base.Layout]:
        class Csv(base.Layout):
            name = layout_name
            description = "labels.csv"

            def detect(self, request):
                return (request.root / "labels.csv").is_file()

            def load(self, request):
                return _read_csv(request, layout_name)

        return Csv

    base.register_layout(csv_layout("first"))
    base.register_layout(csv_layout("second"))
    assert load_labelled(root).source == "first"
    # the list decides: put the second ahead and it wins
    layouts.insert(0, layouts.pop([lay.name for lay in layouts].index("second")))
    assert load_labelled(root).source == "second"
    # registering a name again replaces it in its place
    base.register_layout(csv_layout("first"))
    assert [lay.name for lay in layouts].index("second") == 0


def test_a_registered_layout_ahead_of_the_fallback_even_when_registered_after(layouts):
    class Late(base.Layout):
        name = "late"

        def detect(self, request):
            return False

    base.register_layout(Late)
    names = [lay.name for lay in layouts]
    assert names[-1] == "class-folders"
    assert names.index("late") == len(names) - 2
    with pytest.raises(ValueError, match="needs a name"):
        base.register_layout(type("Nameless", (base.Layout,), {}))


def test_labelled_py_names_no_data_set():
    """Dispatch is over the list: no registry data set name appears in labelled.py."""
    tree = ast.parse(Path(labelled.__file__).read_text())
    strings = {
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }
    assert not strings & set(DATASET_FILES), strings & set(DATASET_FILES)
