"""Label-set scaling: AWT over 47, 1,000 and 21,843 classes, full vs shortlist.

Reports ms per image, the peak memory the scoring added (resident-set high-water
mark, Linux), the size of the naive full tensors it avoids, and how often the
shortlist changes the top-1 class against the full computation.

    uv run python benchmarks/bench_labels.py [--images 8] [--classes 47 1000 21843]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import clip_like_embeds, hardware, print_table, today

from awt_engine.scoring import awt_scores
from awt_engine.shortlist import shortlisted_scores


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def measure(fn):
    """(seconds, peak resident memory added in MiB) of ``fn()``."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the high-water mark (Linux >= 4.0)
    except OSError:
        pass
    base = _rss_kib("VmRSS:")
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    peak = max(_rss_kib("VmHWM:") - base, 0) / 1024
    return out, dt, peak


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--classes", type=int, nargs="+", default=[47, 1000, 21843])
    ap.add_argument(
        "--budget-mib",
        type=int,
        default=256,
        help="extra row with this scorer memory budget at the largest size",
    )
    args = ap.parse_args(argv)
    V, P, D, B = 51, 51, 512, args.images
    import faiss  # noqa: F401  (imported before timing: its first import takes seconds)

    rows = []
    for C in args.classes:
        img, txt = clip_like_embeds(B, V, C, P, D, seed=C)
        naive = B * V * C * P * 4 * 3 / 2**20  # sim, kernel and plan as full float32 tensors
        full, t_full, m_full = measure(lambda img=img, txt=txt: awt_scores(img, txt))
        rows.append([C, "full", f"{1000 * t_full / B:.1f}", f"{m_full:.0f}", f"{naive:.0f}", "-"])
        if C == max(args.classes) and args.budget_mib:
            budget = args.budget_mib << 20
            lim, t, m = measure(
                lambda img=img, txt=txt, budget=budget: awt_scores(img, txt, memory_budget=budget)
            )
            assert torch.allclose(lim, full, rtol=0, atol=1e-5 * full.abs().max())
            rows.append(
                [
                    C,
                    f"full, budget {args.budget_mib} MiB",
                    f"{1000 * t / B:.1f}",
                    f"{m:.0f}",
                    f"{naive:.0f}",
                    "-",
                ]
            )
        k = 20 if C <= 100 else 100
        short, t_s, m_s = measure(
            lambda img=img, txt=txt, k=k: shortlisted_scores(awt_scores, img, txt, k)
        )
        changed = (short.argmax(1) != full.argmax(1)).float().mean().item()
        rows.append(
            [
                C,
                f"shortlist K={k}",
                f"{1000 * t_s / B:.1f}",
                f"{m_s:.0f}",
                f"{naive:.0f}",
                f"{100 * changed:.0f}% of {B}",
            ]
        )
    return print_table(
        "Label-set scaling: AWT scorer, full vs shortlist",
        ["classes C", "mode", "ms / image", "peak MiB added", "naive tensors MiB", "top-1 changed"],
        rows,
        notes=[
            f"hardware: {hardware()}",
            f"sizes: B={B} images, V={V}, P={P}, D={D}, float32; "
            "synthetic CLIP-like embeddings (no model)",
            "default memory budget 1 GiB",
            f"date: {today()}",
        ],
    )


if __name__ == "__main__":
    main()
