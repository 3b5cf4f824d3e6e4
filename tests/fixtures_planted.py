"""A planted-feature stream behind the real Embedder interface: image embeddings that
cluster by class, a zero-shot scorer that is weak.

Each image is a solid colour that encodes (class c, sample k): red ``40 + 40 c``, green
``5 + 4 k``. It embeds as ``normalize([cluster | response])``:

* ``cluster`` [E]: the class's centre plus a little noise (images of a class sit close);
* ``response`` [C]: a small bump on the true class plus per-image noise of the same size.

Every prompt of class c embeds as the unit vector of response coordinate c, so the
zero-shot logits (``100 * cosine``) are the response alone: the true class leads a
little, and the noise flips about half the images. An adaptation that learns from the
embeddings themselves (their clusters) can do much better than the base scorer; one that
cannot, cannot. All draws are seeded by the embedder's seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from awt_engine.labelled import LabelledData, LabelledItem
from awt_engine.models.base import PreprocessConfig


class PlantedEmbedder:
    logit_scale = 100.0
    preprocess = PreprocessConfig(
        size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bicubic"
    )
    device = torch.device("cpu")

    def __init__(self, n_classes=4, per_class=50, E=8, bump=0.015, noise=0.015, seed=0):
        C, K = n_classes, per_class
        g = torch.Generator().manual_seed(seed)
        centres = F.normalize(torch.randn(C, E, generator=g), dim=-1)  # [C, E]
        cluster = F.normalize(centres[:, None] + 0.1 * torch.randn(C, K, E, generator=g), dim=-1)
        response = bump * torch.eye(C)[:, None] + noise * torch.randn(C, K, C, generator=g)
        self.table = F.normalize(torch.cat([cluster, response], dim=-1), dim=-1)  # [C, K, E+C]
        self.n_classes, self.E = C, E
        self.identity = f"test-planted|C{C}|K{K}|E{E}|{bump}|{noise}|{seed}"

    def embed_views(self, views):  # [B, V, 3, R, R] in [0, 1] -> [B, V, E + C]
        rgb = views.float().mean(dim=(-1, -2)) * 255  # [B, V, 3]
        c = ((rgb[..., 0] - 40) / 40).round().long()
        k = ((rgb[..., 1] - 5) / 4).round().long()
        return self.table[c, k]

    def class_embeddings(self, labels):  # "c3" -> response coordinate 3, every prompt
        C, P = labels.n_classes, labels.n_prompts
        out = torch.zeros(C, P, self.E + self.n_classes)
        for j, name in enumerate(labels.classes):
            out[j, :, self.E + int(name.lstrip("c"))] = 1.0
        return out


def planted_images(root: Path, n_classes=4, per_class=50) -> LabelledData:
    """One folder per class (``c0``, ``c1``, ...) of solid 12x10 images, the labelled set."""
    items = []
    classes = tuple(f"c{c}" for c in range(n_classes))
    for c in range(n_classes):
        (Path(root) / classes[c]).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            path = Path(root) / classes[c] / f"{k:03d}.png"
            Image.new("RGB", (12, 10), (40 + 40 * c, 5 + 4 * k, 128)).save(path)
            items.append(LabelledItem(path, c))
    return LabelledData("planted", classes, tuple(items), "planted")
