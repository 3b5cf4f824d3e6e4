"""Ray Data: classify throughput with 1 and 2 CPU actors, per-actor start-up, a sizing plan.

One synthetic folder of 500x375 JPEGs, a random-weight open_clip model saved once as a
``local-dir:`` folder (so every actor loads the same weights), ``--views`` views per image,
``--classes`` bare prompts. Rows:

* ``local``: ``Classifier.classify`` in this process (torch's own thread count);
* ``ray, N actors``: the ``map_batches`` pipeline of
  :func:`awt_engine.distributed.classify_dataset` (its actor, resources and threads) on a
  local Ray instance (``ray.init(num_cpus=<cores>)``), the actor subclassed to stamp each
  batch with its start and end; wall time from submitting the job to the last row, and the
  steady rate: images / (last batch end - first batch start), start-up excluded.

Per-actor start-up is measured in a fresh Ray worker: importing the engine and torch,
building the classifier (model load, text embeddings are shared and not included).
The sizing plan turns the measured per-image times into the cost of 100M images.

    uv run python benchmarks/bench_ray.py [--model ViT-B-32] [--images 24] [--views 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware, print_table, today

# ViT-B/16 at 224: 17.6 G multiply-adds per view (timm's / open_clip's "GFLOPs"), so
# 35.2 GFLOP; used only for the GPU estimate of the sizing plan, which says so.
VIT_B16_GFLOP_PER_VIEW = 2 * 17.6


def _images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        p = folder / f"img{i:03d}.jpg"
        Image.fromarray(small).resize((500, 375), Image.BICUBIC).save(p, quality=90)
        out.append(str(p))
    return out


def _random_model_dir(folder: Path, model: str) -> str:
    """``model`` with seeded random weights as a local-dir: folder (the same for every actor)."""
    import open_clip
    from safetensors.torch import save_file

    cfg = open_clip.get_model_config(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = open_clip.CLIP(**cfg)
    folder.mkdir(parents=True, exist_ok=True)
    size = cfg["vision_cfg"]["image_size"]
    pre = {
        "size": size,
        "mean": list(open_clip.OPENAI_DATASET_MEAN),
        "std": list(open_clip.OPENAI_DATASET_STD),
    }
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": pre})
    )
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder}"


def _startup(kwargs: dict) -> dict:
    """In a fresh Ray worker: seconds to import the engine, and to build the classifier."""
    t0 = time.perf_counter()
    import awt_engine.classifier as c

    t1 = time.perf_counter()
    c.create_classifier(**kwargs)
    t2 = time.perf_counter()
    return {"import": t1 - t0, "build": t2 - t1}


def _timed_class():
    from awt_engine.distributed import _Classify

    class Timed(_Classify):
        """The engine's actor, each batch stamped with when it ran (benchmark only)."""

        def __call__(self, batch):
            t_start = time.time()
            out = super().__call__(batch)
            n = len(out["path"])
            return {**out, "t_start": [t_start] * n, "t_end": [time.time()] * n}

    return Timed


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)

    import ray

    from awt_engine import distributed
    from awt_engine.classifier import create_classifier

    timed = _timed_class()
    cores = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    paths = _images(tmp / "imgs", args.images)
    model = _random_model_dir(tmp / "model", args.model)
    kw = dict(
        model=model,
        classes=[f"class {i}" for i in range(args.classes)],
        views=args.views,
        device="cpu",
        cache_dir=tmp / "cache",
    )
    rows = []

    clf = create_classifier(**kw)
    list(clf.classify(paths[:2]))  # warm: text embeddings, allocator
    t0 = time.perf_counter()
    local = list(clf.classify(paths))
    t_local = time.perf_counter() - t0
    per_image = t_local / len(paths)
    rows.append(
        [
            "local",
            torch.get_num_threads(),
            f"{t_local:.1f}",
            "-",
            f"{len(paths) / t_local:.2f}",
            f"{1000 * per_image:.0f}",
        ]
    )
    want = {p.path: p for p in local}

    t0 = time.perf_counter()
    distributed.init(num_cpus=cores)
    t_init = time.perf_counter() - t0
    start = ray.get(ray.remote(_startup).remote(kw))
    embeds = ray.put(clf.class_embeddings().cpu())  # as classify_dataset's task does
    steady = {}
    for n in args.actors:
        gpus, cpus = distributed.resources("cpu", None, None, n)
        threads = distributed._threads(gpus, cpus)
        t0 = time.time()
        ds = ray.data.from_items([{"path": p} for p in paths]).map_batches(
            timed,
            fn_constructor_kwargs={
                "spec": distributed.ClassifierSpec(kw),
                "class_embeds": embeds,
                "top_k": 5,
                "threads": threads,
            },
            batch_size=4,
            compute=ray.data.ActorPoolStrategy(size=n),
            num_cpus=cpus,
        )
        got = ds.take_all()
        t = time.time() - t0
        first = min(r["t_start"] for r in got)
        busy = max(r["t_end"] for r in got) - first
        steady[n] = len(got) / busy
        same = all(
            list(r["labels"]) == [x["label"] for x in want[r["path"]].predictions] for r in got
        )
        rows.append(
            [
                f"ray, {n} actor{'s' if n > 1 else ''}",
                f"{n} x {threads}",
                f"{t:.1f}",
                f"{first - t0:.1f}",
                f"{steady[n]:.2f}",
                f"{1000 / steady[n]:.0f}" + ("" if same else " (labels differ!)"),
            ]
        )
    ray.shutdown()

    notes = [
        f"{hardware()}; {today()}",
        f"{args.model}, random weights (local-dir), {args.images} JPEGs 500x375, "
        f"{args.views} views, {args.classes} classes x 1 prompt, rows_per_batch 4",
        f"ray.init: {t_init:.1f} s; per-actor start-up in a fresh worker: import "
        f"{start['import']:.1f} s + build classifier {start['build']:.1f} s",
        "first batch s: job submitted to the first batch starting (actor start-up); "
        "steady: images / (last batch end - first batch start), start-up excluded",
    ]
    text = print_table(
        "Ray Data: 1 vs 2 CPU actors",
        ["run", "threads", "wall s", "first batch s", "img/s steady", "ms/img steady"],
        rows,
        notes,
    )

    # Sizing plan from the figures above.
    n_img = 100_000_000
    best = max(steady.values())
    cpu_h = n_img / best / 3600
    plan = [
        [
            f"this VM ({cores} cores), {args.model} x {args.views} views, measured",
            f"{best:.2f}",
            f"{cpu_h:,.0f} h",
            f"{cpu_h * cores:,.0f}",
        ],
    ]
    gflop = VIT_B16_GFLOP_PER_VIEW * 51  # ViT-B/16 at AWT's 51 views, one image
    for gpu, tflops in (("A100 (312 TF fp16 peak, 40% used)", 312), ("H100 (989 TF, 40%)", 989)):
        ips = 0.4 * tflops * 1000 / gflop
        plan.append(
            [
                f"{gpu}, ViT-B/16 x 51 views, ESTIMATE",
                f"{ips:.0f}",
                f"{n_img / ips / 3600:,.0f} GPU-h",
                "-",
            ]
        )
    text += print_table(
        "Sizing 100M images",
        ["setting", "img/s per worker", "100M images", "core-h"],
        plan,
        [
            "hours for one worker; N workers divide it (Ray Data streams, so the actor "
            "pool scales until reading or the object store bounds it), plus one start-up "
            "per actor (above) and the class-embedding task once",
            "the GPU rows are FLOP estimates, not measurements (no GPU this session): "
            "replace them with `bench_e2e.py --device cuda` images/s",
            "ImageNet-21k-sized label sets: the class embeddings (21k x 51 prompts x 512 "
            "fp32 = 2.2 GB) are computed once, go to the object store, and each actor "
            "holds one copy (size the actors' memory for it)",
        ],
    )
    return text


if __name__ == "__main__":
    main()
