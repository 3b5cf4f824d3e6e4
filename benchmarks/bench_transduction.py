"""TransCLIP's cost over a whole test set: seconds and peak memory as N grows.

Synthetic CLIP-like embeddings (no model): C class means at random on the unit sphere
in D dimensions, each image its class mean plus Gaussian noise, normalised; base scores
``100 * cosine`` to text embeddings that are the class means plus noise (CLIP's logit
scale). Each N runs in its own process: the peak is that process's ``ru_maxrss`` minus
its resident size just before the solve (inputs made block by block, so making them
leaves no higher peak behind). "graph" is the time to the first ``observe`` call (kNN
graph, z and mean initialisation), "iterations" the rest.

    uv run python benchmarks/bench_transduction.py [--sizes 2000,5000,10000,20000,50000]
        [--classes 1000] [--dim 512]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware, print_table, today


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic(N: int, C: int, D: int, seed: int = 0, rows: int = 4096):
    """(scores [N, C], features [N, D], class features [C, D], labels [N]), by blocks."""
    g = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(C, D, generator=g), dim=1)
    text = torch.nn.functional.normalize(
        means + 4.0 / D**0.5 * torch.randn(C, D, generator=g), dim=1
    )
    labels = torch.randint(0, C, (N,), generator=g)
    features = torch.empty(N, D)
    scores = torch.empty(N, C)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        noise = 1.2 / D**0.5 * torch.randn(e - s, D, generator=g)
        features[s:e] = torch.nn.functional.normalize(means[labels[s:e]] + noise, dim=1)
        scores[s:e] = 100.0 * features[s:e] @ text.T
    return scores, features, text, labels


def worker(N: int, C: int, D: int) -> dict:
    from awt_engine.adapt import AdaptBatch
    from awt_engine.adapt.transclip import transclip

    base_rss = _rss_mib()
    scores, features, text, labels = synthetic(N, C, D)
    before = _rss_mib()
    marks = []
    t0 = time.perf_counter()
    result = transclip(
        AdaptBatch(scores, features, text),
        observe=lambda step, *_: marks.append(time.perf_counter()) if step == "init" else None,
    )
    total = time.perf_counter() - t0
    return {
        "N": N,
        "inputs_mib": before - base_rss,
        "peak_mib": _peak_mib() - before,
        "graph_s": marks[0] - t0,
        "iter_s": total - (marks[0] - t0),
        "total_s": total,
        "neighbours": result.graph.neighbours.shape[1],
        "base_acc": float((scores.argmax(1) == labels).float().mean()),
        "acc": float((result.z.argmax(1) == labels).float().mean()),
    }


def _growth(raw: list[dict]) -> list[str]:
    """Log-log slopes between the two largest sizes: time ~ N^slope."""
    if len(raw) < 2:
        return []
    a, b = raw[-2], raw[-1]
    ratio = math.log(b["N"] / a["N"])
    slope = {k: math.log(b[k] / a[k]) / ratio for k in ("graph_s", "iter_s", "peak_mib")}
    return [
        f"growth from N = {a['N']:,} to {b['N']:,}: graph ~ N^{slope['graph_s']:.2f}, "
        f"iterations ~ N^{slope['iter_s']:.2f}, peak ~ N^{slope['peak_mib']:.2f}"
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="2000,5000,10000,20000,50000")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    C, D = args.classes, args.dim
    if args.worker is not None:
        print(json.dumps(worker(args.worker, C, D)))
        return
    rows, raw = [], []
    for N in (int(x) for x in args.sizes.split(",")):
        cmd = [sys.executable, __file__, "--worker", str(N), "--classes", str(C), "--dim", str(D)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        raw.append(r)
        own = 3 * N * C * 4 / 2**20
        rows.append([
            f"{N:,}", f"{r['graph_s']:.1f}", f"{r['iter_s']:.1f}", f"{r['total_s']:.1f}",
            f"{r['inputs_mib']:.0f}", f"{r['peak_mib']:.0f}", f"{own:.0f}",
            f"{100 * r['base_acc']:.1f} -> {100 * r['acc']:.1f}",
        ])  # fmt: skip
        print(f"N={N}: {r}", file=sys.stderr, flush=True)
    print_table(
        f"TransCLIP, synthetic embeddings, C = {C:,}, D = {D} ({today()})",
        ["N", "graph s", "iterations s", "total s", "inputs MiB", "solver peak MiB",
         "3 N C float32 MiB", "top-1 base -> TransCLIP %"],
        rows,
        notes=[
            f"hardware: {hardware()}",
            "model: none (synthetic CLIP-like features, 100 x cosine base scores)",
            "defaults: k = 3, 10 iterations x 5 z-steps, float32, memory_budget 64 MiB",
            "solver peak: ru_maxrss minus the resident size just before the solve",
            *_growth(raw),
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
