"""A toy few-shot task for the trainable methods, generated in the test.

``make_toy_task(root)`` writes an ImageFolder with ``train/`` and ``test/`` splits of small
images: each class has its own colour and stripe direction, plus per-image noise, so a
tiny random CLIP separates the classes only after training (zero-shot it is near chance:
its text tower has never seen the class names next to these images).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

TOY_CLASSES = ("amber", "cobalt", "olive", "violet", "teal")
_COLOURS = [(230, 150, 30), (30, 60, 200), (110, 130, 30), (140, 40, 190), (20, 150, 150)]


@dataclass(frozen=True)
class ToyTask:
    root: Path
    classes: tuple[str, ...]
    train_per_class: int
    test_per_class: int


def _image(c: int, rng: np.random.Generator, size: int) -> Image.Image:
    base = np.array(_COLOURS[c], dtype=np.float64)
    yy, xx = np.mgrid[0:size, 0:size]
    phase = [xx, yy, xx + yy, xx - yy, 2 * xx][c]  # a class-specific stripe direction
    stripes = (np.sin(phase * (0.6 + 0.1 * c)) > 0)[..., None] * 60.0
    noise = rng.normal(0, 25, size=(size, size, 3))
    arr = np.clip(base + stripes + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_toy_task(
    root: Path, *, classes=TOY_CLASSES, train_per_class=4, test_per_class=6, size=40, seed=0
) -> ToyTask:
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _image(c, rng, size).save(folder / f"{i:02d}.png")
    return ToyTask(root, tuple(classes), train_per_class, test_per_class)


@pytest.fixture(scope="session")
def toy_task(tmp_path_factory) -> ToyTask:
    return make_toy_task(tmp_path_factory.mktemp("toy-task"))


# The one trained checkpoint the tests share: CoOp, one shot, one epoch on the toy task.
COOP_SETTINGS = dict(shots=1, seed=1, device="cpu", epochs=1, batch_size=4, options={"n_ctx": "4"})


@pytest.fixture(scope="session")
def coop_checkpoint(toy_task, train_clip_dir, tmp_path_factory) -> Path:
    """A CoOp checkpoint trained once per session on :func:`toy_task` with
    ``train_clip_dir`` (:data:`COOP_SETTINGS`). Read-only: a test that damages or edits
    one works on a copy."""
    from awt_engine.training import train

    out = tmp_path_factory.mktemp("coop-checkpoint") / "coop.safetensors"
    train("coop", data_root=toy_task.root, output=out, model=train_clip_dir, **COOP_SETTINGS)
    out.chmod(0o444)
    return out
