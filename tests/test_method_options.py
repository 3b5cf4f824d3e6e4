"""Every method option is written once, on its Config field: its help text (and bounds)
live in the field's metadata, and `awt-engine methods --verbose` prints them from there."""

from __future__ import annotations

import dataclasses

import pytest
from typer.testing import CliRunner

from awt_engine.cli import app
from awt_engine.methods import get_method, list_methods
from awt_engine.methods.base import check_values, option


@pytest.mark.parametrize("name", list_methods())
def test_every_option_has_its_help_on_its_field(name):
    spec = get_method(name)
    fields = dataclasses.fields(spec.config)
    helps = {f.name: f.metadata.get("help", "") for f in fields}
    assert all(helps.values()), [n for n, h in helps.items() if not h]
    assert spec.options == helps  # the spec reads them from the fields, nothing else


def test_option_carries_help_and_bounds():
    @dataclasses.dataclass(frozen=True)
    class Toy:
        n: int = option(4, "how many", bounds=(1, 8))
        s: str = option("x", "a text")

    f = {x.name: x for x in dataclasses.fields(Toy)}
    assert f["n"].metadata["help"] == "how many" and f["n"].metadata["bounds"] == (1, 8)
    assert "bounds" not in f["s"].metadata and Toy().n == 4
    with pytest.raises(ValueError, match="n must be between 1 and 8, got 9"):
        check_values(Toy, {"n": 9})


def test_methods_verbose_prints_the_fields_help():
    out = CliRunner().invoke(app, ["methods", "--verbose"])
    assert out.exit_code == 0, out.output
    lines, names = out.output.splitlines(), list_methods()
    starts = [next(i for i, ln in enumerate(lines) if ln.startswith(n + " ")) for n in names]
    for name, a, b in zip(names, starts, [*starts[1:], len(lines)], strict=True):
        block = lines[a:b]
        for f in dataclasses.fields(get_method(name).config):
            line = next(ln for ln in block if f"--set {f.name}=" in ln)
            assert line.rstrip().endswith(f.metadata["help"]), line
