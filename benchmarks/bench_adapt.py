"""Test-time adaptation: cost per image of each adaptation beside its base scorer.

Synthetic CLIP-like embeddings (V views, P prompts, D = 512); the encoder is not run
(its cost per image is in the end-to-end table). "base" is the scorer alone on the
batch (awt over all views and prompts, clip over view 0 and prompt 0); each adaptation's
column is its own extra cost per image on top of that base, run as eval runs it: base
scores and features once, then an online adaptation stepped image by image over the
stream (tda, dota), or the transductive solve over all images (transclip), divided by
the number of images.

    uv run python benchmarks/bench_adapt.py [--images 64] [--classes 47 1000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--classes", type=int, nargs="+", default=[47, 1000])
    args = ap.parse_args(argv)
    V, P, D, B = 51, 51, 512, args.images
    rows = []
    names = list_adaptations()
    for C in args.classes:
        img, txt = clip_like_embeds(B, V, C, P, D, seed=C)
        for base in ("clip", "awt"):
            s = get_scorer(base)
            inputs = ScoreInput(100.0, img if s.uses_views else img[:, :1], txt, indices=None)
            if not s.uses_descriptions:
                inputs = ScoreInput(100.0, inputs.image_embeds, txt[:, :1])
            t_base = timeit(lambda s=s, i=inputs: s(i, config=AWTConfig()), repeat=2)
            part = adapted_scorer(base, names[0]).part(inputs, AWTConfig())
            row = [C, base, f"{1000 * t_base / B:.2f}"]
            for name in names:
                t = _adapt_seconds(name, part)
                row.append(f"{1000 * t / B:.2f} (+{100 * t / t_base:.0f}%)")
            rows.append(row)
    return print_table(
        "Adaptations: ms per image on top of the base scorer (encoder excluded)",
        ["classes C", "base", "base ms", *[f"+{n} ms" for n in names]],
        rows,
        notes=[
            f"hardware: {hardware()}",
            f"sizes: {B} images, V={V} views (awt; clip: 1), P={P} prompts (awt; clip: 1), "
            f"D={D}, float32; default options of each adaptation",
            "percentages: the adaptation's cost over the base scorer's own (not over the "
            "encoder, which dominates a real run: see the end-to-end table)",
            f"date: {today()}",
        ],
    )


if __name__ == "__main__":
    main()
