"""Tiny registry data sets in CoOp's layout (split file + image folder), for the suite and
transfer tests: a few small images per class, all in the test (and train) split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from awt_engine.layouts.catalog import files_for
from awt_engine.registry import get_dataset


def coop_set(root: Path, name: str, *, per_class: int = 1, seed: int = 0) -> Path:
    """``root/<name's first catalog folder>/`` with its split file and images; returns it."""
    files = files_for(name)
    folder = root / files.folders[0]
    rng = np.random.default_rng(seed)
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for label, cls in enumerate(get_dataset(name).classes):
        for split in ("train", "test"):
            for i in range(per_class):
                rel = f"{cls.replace(' ', '_')}/{split}_{i}.png"
                path = folder / files.split_image_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)
                splits[split].append([rel, label, cls])
    (folder / files.split_file).write_text(json.dumps(splits), encoding="utf-8")
    return folder
