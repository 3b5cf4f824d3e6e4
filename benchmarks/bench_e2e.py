"""End-to-end classify throughput, split into its stages.

Stages per image: decode + views (JPEG decode, 1 centre view + random crops), image
encoding (the backbone's forward pass over all views), weights + transport (the AWT
scorer). Text embeddings are computed once per label set and cached, so they are
reported separately. Random weights are fine for timing.

    uv run python benchmarks/bench_e2e.py [--model ViT-B-32] [--device cpu] [--images 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware, print_table, today

from awt_engine.backbone import load_backbone
from awt_engine.classifier import Classifier
from awt_engine.inputs import load_image
from awt_engine.inputs.views import ViewConfig, make_views
from awt_engine.labels import LabelSet
from awt_engine.models.clip import ClipEmbedder
from awt_engine.scoring import awt_scores


def _images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        # smooth random field, 500x375 like a typical benchmark photo
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
        p = folder / f"img{i}.jpg"
        im.save(p, quality=90)
        paths.append(p)
    return paths


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--views", type=int, default=51)
    ap.add_argument("--classes", type=int, default=47)  # DTD
    ap.add_argument("--prompts", type=int, default=51)
    ap.add_argument("--batch-size", type=int, default=2)
    args = ap.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = load_backbone(args.model, None, device=args.device)
    dev = bb.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    C, P, V, N = args.classes, args.prompts, args.views, args.images
    names = tuple(f"class {c}" for c in range(C))
    descriptions = tuple(tuple(f"variant {p}." for p in range(1, P)) for _ in range(C))
    labels = LabelSet(names, "a photo of {}", descriptions, name="bench")

    with tempfile.TemporaryDirectory() as tmp:
        paths = _images(Path(tmp), N)
        t0 = time.perf_counter()
        embedder = ClipEmbedder(bb)
        txt = embedder.class_embeddings(labels).to(dev)
        sync()
        t_text = time.perf_counter() - t0
        cfg = ViewConfig(n_views=V)

        # warm-up (first forward pass allocates and tunes kernels)
        R = bb.preprocess.size
        v = make_views(load_image(paths[0], target_size=R), bb.preprocess, cfg, device=dev)
        bb.encode_images(v)

        t_views = t_enc = t_score = 0.0
        for i in range(0, N, args.batch_size):
            batch = paths[i : i + args.batch_size]
            t0 = time.perf_counter()
            views = torch.stack(
                [
                    make_views(load_image(p, target_size=R), bb.preprocess, cfg, device=dev)
                    for p in batch
                ]
            )  # [b,V,3,R,R]
            sync()
            t1 = time.perf_counter()
            emb = bb.encode_images(views.flatten(0, 1)).view(len(batch), V, -1)
            sync()
            t2 = time.perf_counter()
            awt_scores(emb, txt, bb.logit_scale)
            sync()
            t3 = time.perf_counter()
            t_views, t_enc, t_score = t_views + t1 - t0, t_enc + t2 - t1, t_score + t3 - t2

        # the real pipeline (parallel decode, streaming), for the images/s line
        clf = Classifier(embedder, labels, view_config=cfg, batch_size=args.batch_size)
        clf.class_embeddings()  # computed before the clock starts (cached in a real run)
        t0 = time.perf_counter()
        n_ok = sum(p.ok for p in clf.classify(paths))
        sync()
        t_pipe = time.perf_counter() - t0
        assert n_ok == N

    total = t_views + t_enc + t_score
    ms = lambda t: f"{1000 * t / N:.1f}"  # noqa: E731
    pct = lambda t: f"{100 * t / total:.1f}%"  # noqa: E731
    rows = [
        ["decode + views", ms(t_views), pct(t_views)],
        ["image encoding (forward pass)", ms(t_enc), pct(t_enc)],
        ["weights + transport", ms(t_score), pct(t_score)],
        ["sum of stages", ms(total), "100%"],
        ["classify pipeline (measured)", ms(t_pipe), f"{N / t_pipe:.2f} images/s"],
        ["floor: encoder forward pass only", ms(t_enc), f"{N / t_enc:.2f} images/s"],
    ]
    return print_table(
        "End-to-end classify: ms per image by stage",
        ["stage", "ms / image", "share"],
        rows,
        notes=[
            f"hardware: {hardware(dev)}",
            f"model: {args.model} (random weights), {bb.dtype}, input {bb.preprocess.size}px, "
            f"D={txt.shape[-1]}",
            f"sizes: {N} JPEG images 500x375, V={V} views, C={C} classes x P={P} prompts (DTD "
            f"size), {args.batch_size} images per forward pass",
            f"everything but the forward pass: {100 * (t_views + t_score) / total:.1f}% of the "
            f"total (target <= 10%)",
            f"text embeddings (once per label set, then cached): {1000 * t_text:.0f} ms",
            f"date: {today()}",
        ],
    )


if __name__ == "__main__":
    main()
