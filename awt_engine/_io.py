"""Small file helpers shared by every cache: atomic writes, hashing, the cache root.

Atomic writes go through a temp file in the target's folder, named
``.<name>.<host>-<pid>.<random>.tmp``, then fsync and rename. A writer killed between
the two leaves its temp file behind; the next write to the same target removes such
leftovers when their process is gone (same host) or when they are a day old (any host),
so a shared cache folder does not fill up with them. Files are created with the
process's umask (``0666 & ~umask``), as ``open()`` would, so a cache shared through a
group-writable folder stays usable by the group.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

CACHE_ENV = "AWT_ENGINE_CACHE"

# A temp file older than this is a leftover whatever wrote it (a run on another host of
# a shared file system, say): no write takes a day.
_STALE_TMP_S = 24 * 3600
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"
_UMASK_LOCK = threading.Lock()
_UNWRITABLE: set[str] = set()  # cache folders already reported as unwritable


def resolve_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir`` if given, else ``$AWT_ENGINE_CACHE``, else ``./cache``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path("cache")


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # elsewhere: set and restore at once (the only portable way)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else (or cannot tell: keep the file)
    return True


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Delete temp files that killed writers of ``path`` left behind; returns them."""
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        m = re.fullmatch(r"(.+)-(\d+)\.[^.]*\.tmp", name[len(prefix) :])
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        same_host_dead = m is not None and m.group(1) == _HOST and not _pid_alive(int(m.group(2)))
        if same_host_dead or age > _STALE_TMP_S:
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def warn_unwritable(folder: Path, exc: OSError, what: str) -> None:
    """Warn, once per folder and process, that a cache cannot be written."""
    name = str(folder)
    if name in _UNWRITABLE:
        return
    _UNWRITABLE.add(name)
    reason = exc.strerror or str(exc)
    warnings.warn(
        f"cannot write the {what} cache in {folder} ({reason}); carrying on without caching",
        stacklevel=3,
    )


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that readers see the old file or the new one, never half.

    ``write`` streams into a temp file in the same folder; then fsync and rename
    (``os.replace`` is atomic on POSIX and Windows within one file system). Streaming
    keeps a large payload (a [C, P, D] embedding tensor) out of memory twice. Raises
    OSError (no space, read-only folder, ...) with nothing left behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent
    )
    try:
        if hasattr(os, "fchmod"):  # mkstemp makes 0600; a cache file follows the umask
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON, strictly: NaN or infinity is a ValueError (they are not JSON; write None)."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, allow_nan=False) + "\n")


def utc_now(*, compact: bool = False) -> str:
    """The time in UTC for records: ``2026-12-01T20:00:00Z``; ``compact`` for file names,
    with microseconds (``20261201T200000.123456Z``)."""
    now = _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y%m%dT%H%M%S.%fZ" if compact else "%Y-%m-%dT%H:%M:%SZ")


def sha256_hex(*parts: str | bytes) -> str:
    """SHA-256 over the parts, each length-prefixed so ("ab", "c") != ("a", "bc")."""
    h = hashlib.sha256()
    for part in parts:
        b = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
