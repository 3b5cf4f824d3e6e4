"""An ImageNet-21k-sized label set (21,843 classes x 51 prompts) end to end through the CLI,
with every scorer block inside the memory budget."""

import json
import logging
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from awt_engine import backbone as backbone_mod
from awt_engine.cli import app
from awt_engine.descriptions import descriptions_path, from_plain, save_descriptions
from tests.fixtures_embedders import ColourBackbone, solid

N_CLASSES, N_DESC, D = 21_843, 50, 16
COLOURS = ("red", "green", "blue")


class BigBackbone(ColourBackbone):
    """Colour classes live in dims 0-2; the other 21,840 classes in dims 3-15."""

    identity = "test-big-backbone|v1"
    embed_dim = D

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(0)
        self.table = torch.from_numpy(rng.normal(size=(N_CLASSES, D - 3))).float()
        self.desc_noise = 0.3 * torch.from_numpy(rng.normal(size=(N_DESC + 1, D))).float()

    def encode_images(self, pixels, *, batch_size=None, grad=False):
        rgb = pixels.float().mean(dim=(-1, -2))  # [N,3]
        return F.normalize(torch.cat([rgb + 0.1, torch.zeros(len(rgb), D - 3)], 1), dim=-1)

    def encode_text(self, texts, batch_size=256, *, progress=False, grad=False):
        self.text_calls += 1
        cls = [re.search(r"class (\d+)", t) for t in texts]
        desc = [re.search(r" d(\d+)$", t) for t in texts]
        rows = torch.tensor([int(m.group(1)) if m else -1 for m in cls])
        out = torch.zeros(len(texts), D)
        named = rows >= 0
        out[named, 3:] = self.table[rows[named]]
        for i in (~named).nonzero().squeeze(1).tolist():  # the three colour classes
            out[i, next(k for k, c in enumerate(COLOURS) if c in texts[i])] = 1.0
        d = torch.tensor([int(m.group(1)) if m else 0 for m in desc])
        return F.normalize(out + 0.1 * self.desc_noise[d], dim=-1)


@pytest.mark.slow
def test_21843_classes_classify_through_cli_within_budget(tmp_path, monkeypatch, caplog):
    names = [f"class {i}" for i in range(N_CLASSES - 3)] + list(COLOURS)
    plain = {n: [f"{n} d{j}" for j in range(1, N_DESC + 1)] for n in names}
    save_descriptions(
        from_plain(plain, "big21k", template="a photo of a {}"),
        descriptions_path("big21k", tmp_path),
    )
    for c in ("blue", "red"):
        solid(c, (20, 16)).save(tmp_path / f"{c}.png")
    monkeypatch.setattr(backbone_mod, "load_backbone", lambda *a, **k: BigBackbone())

    budget = 64 << 20
    caplog.set_level(logging.DEBUG, logger="awt_engine.scoring")  # the scorer logs each block
    out = tmp_path / "preds.jsonl"
    res = CliRunner().invoke(
        app,
        [
            "classify",
            str(tmp_path / "blue.png"),
            str(tmp_path / "red.png"),
            "--dataset",
            "big21k",
            "--cache-dir",
            str(tmp_path),
            "--views",
            "51",
            "--memory-budget",
            "64M",
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["predictions"][0]["label"] for r in rows] == ["blue", "red"]
    blocks = [
        math.prod(json.loads(r.getMessage().removeprefix("similarity block ")))
        for r in caplog.records
        if r.getMessage().startswith("similarity block")
    ]
    full_image = N_CLASSES * 51 * 51
    assert blocks and max(blocks) * 4 * 3 <= budget  # sim, K and sim*K of one block fit
    assert max(blocks) < full_image / 10  # the classes really were cut into chunks
    assert sum(blocks) >= 2 * full_image  # every class of both images was scored
