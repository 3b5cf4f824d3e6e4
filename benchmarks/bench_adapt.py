"""Test-time adaptation: cost per image of each adaptation beside its base scorer.

Synthetic CLIP-like embeddings (V views, P prompts, D = 512). "base" is the scorer alone
on the batch (awt over all views and prompts, clip over view 0 and prompt 0); each
adaptation's column is its own extra cost per image on top of that base, run as eval
runs it: base scores and features once, then an online adaptation stepped image by
image over the stream (tda, dota), or the transductive solve over all images
(transclip), divided by the number of images. The percentage is over a whole run of the
base: the image encoder (ViT-B-32 with random weights, measured here per view, times
the views the scorer encodes) plus the base scorer, which is what TDA's "+20% over
CLIP" and DOTA's comparisons count.

    uv run python benchmarks/bench_adapt.py [--images 64] [--classes 47 1000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import clip_like_embeds, hardware, print_table, timeit, today

from awt_engine.adapt import adapt_config, get_adaptation, list_adaptations
from awt_engine.adapt.scorer import adapted_scorer
from awt_engine.scorers import AWTConfig, ScoreInput, get_scorer


def _adapt_seconds(name: str, part) -> float:
    a, cfg = get_adaptation(name), adapt_config(name)
    if a.online:
        return timeit(lambda: a.step(part, a.new_state(cfg), cfg), repeat=2)
    return timeit(lambda: a.solve(part, cfg), repeat=2)


def encoder_ms_per_view(model: str = "ViT-B-32", views: int = 8) -> float:
    """Milliseconds per view of ``model``'s image tower (random weights, float32, CPU)."""
    from awt_engine.backbone import load_backbone

    bb = load_backbone(model, None, device="cpu")
    x = torch.randn(views, 3, bb.preprocess.size, bb.preprocess.size)
    with torch.inference_mode():
        t = timeit(lambda: bb.encode_images(x), repeat=2)
    return 1000 * t / views


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--classes", type=int, nargs="+", default=[47, 1000])
    args = ap.parse_args(argv)
    V, P, D, B = 51, 51, 512, args.images
    rows = []
    names = list_adaptations()
    enc = encoder_ms_per_view()
    for C in args.classes:
        img, txt = clip_like_embeds(B, V, C, P, D, seed=C)
        for base in ("clip", "awt"):
            s = get_scorer(base)
            inputs = ScoreInput(100.0, img if s.uses_views else img[:, :1], txt, indices=None)
            if not s.uses_descriptions:
                inputs = ScoreInput(100.0, inputs.image_embeds, txt[:, :1])
            t_base = timeit(lambda s=s, i=inputs: s(i, config=AWTConfig()), repeat=2)
            part = adapted_scorer(base, names[0]).part(inputs, AWTConfig())
            run_ms = enc * s.views_needed(V) + 1000 * t_base / B  # encoder + scorer, per image
            row = [C, base, f"{1000 * t_base / B:.2f}", f"{run_ms:.0f}"]
            for name in names:
                ms = 1000 * _adapt_seconds(name, part) / B
                row.append(f"{ms:.2f} (+{100 * ms / run_ms:.1f}%)")
            rows.append(row)
    return print_table(
        "Adaptations: ms per image over the base scorer, and over a whole run",
        ["classes C", "base", "scorer ms", "run ms", *[f"+{n} ms" for n in names]],
        rows,
        notes=[
            f"hardware: {hardware()}",
            f"sizes: {B} images, V={V} views (awt; clip: 1), P={P} prompts (awt; clip: 1), "
            f"D={D}, float32; default options of each adaptation",
            f"run ms: the encoder (ViT-B-32, random weights, {enc:.1f} ms per view here) times "
            "the views the base encodes (clip 1, awt 51), plus the scorer; percentages: the "
            "adaptation's cost over that run",
            f"date: {today()}",
        ],
    )


if __name__ == "__main__":
    main()
