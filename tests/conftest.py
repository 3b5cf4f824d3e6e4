"""Shared set-up. Fixtures live in tests/fixtures_*.py and reach every module as plugins."""

import os

import pytest
import torch

# Keep the suite fast and deterministic on 2 cores.
torch.set_num_threads(min(2, os.cpu_count() or 1))

pytest_plugins = [
    "tests.fixtures_clip",
    "tests.fixtures_embedders",
    "tests.fixtures_images",
    "tests.fixtures_llm",
    "tests.fixtures_training",
]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never let a test read or write the user's ./cache."""
    monkeypatch.setenv("AWT_ENGINE_CACHE", str(tmp_path / "awt-cache"))
