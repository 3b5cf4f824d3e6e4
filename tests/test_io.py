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


def test_files_follow_the_umask_not_0600(tmp_path):
    import os

    old = os.umask(0o002)  # a group-shared cache
    try:
        atomic_write_json(tmp_path / "shared.json", {"v": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o664


def test_temp_files_of_killed_writers_are_cleaned_at_the_next_write(tmp_path):
    import os
    import subprocess
    import sys
    import time

    from awt_engine import _io

    target = tmp_path / "cache.json"
    # A writer killed between mkstemp and rename: its process is gone, its temp file stays.
    code = (
        "import os, sys, tempfile; from awt_engine import _io; "
        "fd, p = tempfile.mkstemp(prefix=f'.cache.json.{_io._HOST}-{os.getpid()}.', "
        "suffix='.tmp', dir=sys.argv[1]); os.write(fd, b'half'); os._exit(9)"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=False)
    (dead,) = tmp_path.glob(".cache.json.*.tmp")
    # One from a live writer (this process) and one very old from another host.
    live = tmp_path / f".cache.json.{_io._HOST}-{os.getpid()}.abc.tmp"
    live.write_bytes(b"in progress")
    other_new = tmp_path / ".cache.json.otherhost-1.def.tmp"
    other_old = tmp_path / ".cache.json.otherhost-2.ghi.tmp"
    other_new.write_bytes(b"x")
    other_old.write_bytes(b"x")
    day_old = time.time() - 2 * 24 * 3600
    os.utime(other_old, (day_old, day_old))
    unrelated = tmp_path / ".other.json.host-1.x.tmp"
    unrelated.write_bytes(b"x")

    atomic_write_json(target, {"v": 1})
    left = {p.name for p in tmp_path.iterdir()}
    assert dead.name not in left and other_old.name not in left
    assert {live.name, other_new.name, unrelated.name, "cache.json"} <= left
