"""Training step cost per method: ms per step, peak memory, the text encoder's share.

Each method trains on DTD's 47 classes at its paper's batch size on ViT-B-32 with random
weights (the cost does not depend on the weights). Inputs are synthetic views (decoding
is not part of a step's cost here). Each method runs in its own process so its peak
resident memory is its own.

    uv run python benchmarks/bench_train.py [--model ViT-B-32] [--device cpu] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware, print_table, today

# method -> (batch size, options, what the text encoder runs per step)
METHODS = {
    "coop": (32, {}, "C prompts (ctx + name), one forward + backward"),
    "lamm": (32, {}, "2 C prompts (learned labels; original labels for the loss)"),
    "awt-adapter": (16, {}, "C x 8 prompts with adapters + the same without (no grad)"),
}


def run_one(method: str, model: str, device: str, steps: int) -> dict:
    from awt_engine.backbone import load_backbone
    from awt_engine.labels import LabelSet
    from awt_engine.methods import get_method
    from awt_engine.methods.base import TrainBatch
    from awt_engine.registry import get_dataset
    from awt_engine.training.loop import make_optimizer

    warnings.simplefilter("ignore")
    spec = get_method(method)
    bb = load_backbone(model, None, device=device)
    classes = get_dataset("dtd").classes
    descriptions = tuple(tuple(f"{c} detail {j}." for j in range(50)) for c in classes)
    labels = LabelSet(classes, get_dataset("dtd").template, descriptions)
    net = spec.build(bb)
    net.prepare(labels, seed=1)
    defaults = spec.train_defaults(16, "dtd")
    B = METHODS[method][0]
    views = net.training_view_config(
        __import__("awt_engine.views", fromlist=["ViewConfig"]).ViewConfig()
    )
    R = bb.preprocess.size
    opt = make_optimizer(net, defaults)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, views.n_views, 3, R, R, generator=g).to(bb.device)
    y = torch.randint(0, len(classes), (B,), generator=g).to(bb.device)
    sync = torch.cuda.synchronize if bb.device.type == "cuda" else (lambda: None)

    def step(i):
        batch = TrainBatch(x, y, 0, i, torch.Generator().manual_seed(i))
        out = net.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        opt.step()
        sync()

    net.train()
    step(0)  # warm-up
    t0 = time.perf_counter()
    for i in range(steps):
        step(i + 1)
    per_step = (time.perf_counter() - t0) / steps

    def text_only():
        emb = net.class_embeddings(labels.bare() if method != "awt-adapter" else _subset(labels))
        emb.float().sum().backward()
        sync()

    text_only()
    t0 = time.perf_counter()
    for _ in range(steps):
        text_only()
    text = (time.perf_counter() - t0) / steps
    if method == "lamm":
        text *= 2  # learned and original labels: two text passes per step
    learned = sum(t.numel() for t in net.learned_state().values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    if bb.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {
        "method": method,
        "batch": f"{B} x {views.n_views} views",
        "ms_step": 1000 * per_step,
        "text_share": min(1.0, text / per_step),
        "peak_mib": peak,
        "learned": learned,
        "epochs16": defaults.epochs,
        "lr": defaults.lr,
    }


def _subset(labels):
    from awt_engine.labels import LabelSet

    return LabelSet(labels.classes, labels.template, tuple(d[:7] for d in labels.descriptions))


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # child process: one method, JSON on stdout
        print(json.dumps(run_one(args.one, args.model, args.device, args.steps)))
        return ""
    rows = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", method, "--model", args.model]
        cmd += ["--device", args.device, "--steps", str(args.steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            rows.append(
                [method, "-", "failed", proc.stderr.strip().splitlines()[-1][:60], "-", "-", "-"]
            )
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(
            [
                method,
                r["batch"],
                f"{r['ms_step']:.0f}",
                f"{100 * r['text_share']:.0f}%",
                f"{r['peak_mib']:.0f}",
                f"{r['learned']:,}",
                METHODS[method][2],
            ]
        )
    dev = torch.device(args.device)
    return print_table(
        "Training step per method (DTD's 47 classes, the papers' batch sizes)",
        [
            "method",
            "batch",
            "ms / step",
            "text encoder",
            "peak MiB",
            "learned params",
            "text rows per step",
        ],
        rows,
        notes=[
            f"hardware: {hardware(dev)}",
            f"model: {args.model} (random weights), fp32 on CPU / autocast on GPU, synthetic "
            f"views, {args.steps} timed steps after one warm-up",
            "text encoder: its forward + backward share of a step (the frozen image features "
            "are computed without a graph; prompt token ids are built once per label set)",
            f"date: {today()}",
        ],
    )


if __name__ == "__main__":
    main()
