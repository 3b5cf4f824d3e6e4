"""Atomic writes: a failure mid-write leaves the old file whole and no temp file behind."""

import pytest

from awt_engine._io import atomic_write, atomic_write_json, resolve_cache_root, sha256_hex


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "cache.json"
    atomic_write_json(path, {"v": 1})
    before = path.read_bytes()

    def half_then_fail(f):
        f.write(b'{"v": 2, "trunc')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["cache.json"]


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("AWT_ENGINE_CACHE", str(tmp_path / "env"))
    assert resolve_cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_root() == tmp_path / "env"
    monkeypatch.delenv("AWT_ENGINE_CACHE")
    assert str(resolve_cache_root()) == "cache"


def test_hash_parts_are_delimited():
    assert sha256_hex("ab", "c") != sha256_hex("a", "bc")
