"""Shared fixtures. Module-specific fixtures live in tests/fixtures_*.py and are imported here."""

import os

import pytest
import torch

# Keep the suite fast and deterministic on 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never let a test read or write the user's ./cache."""
    monkeypatch.setenv("AWT_ENGINE_CACHE", str(tmp_path / "awt-cache"))


# Session fixtures shared by several test modules: the tiny random open_clip model.
from tests.fixtures_clip import tiny_clip, tiny_clip_dir  # noqa: E402, F401
