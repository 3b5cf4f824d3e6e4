"""The server under load: `awt-engine serve`'s app on a loopback port, a thread pool of
httpx clients, beside offline `classify` on the same images, model and views.

Rows: images/s and p50/p95/p99 latency at concurrency 1, 8 and 32 for the `clip` scorer
(1 view) and `awt` (a few views), one image per request; the ratio of the server's
throughput at concurrency 32 to offline `Classifier.classify` in the same run (goal
>= 0.9); the first and the second request with 1,000 new labels (the second must not
encode them again); resident memory after 100 and after N requests.

The model is a small open_clip ViT with random weights (no download); --model names
another open_clip architecture (random weights too) for a heavier encoder.

    uv run --extra serve python benchmarks/bench_serve.py [--requests 10000]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware, print_table, today

SMALL = {  # a small ViT: the encoder is cheap, so the server's own overhead shows
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "head_width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CACHE = Path(tempfile.mkdtemp(prefix="bench-serve-cache-"))  # fresh: no label set cached yet
PREPROCESS = {"size": 64, "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}


def make_model(folder: Path) -> str:
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(**SMALL)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": SMALL, "preprocess_cfg": PREPROCESS})
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "m.safetensors")
    return f"local-dir:{folder}"


def images(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def rss_mib() -> float:
    """The process's resident memory now (Linux /proc), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Running:
    """The app served by uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        from awt_engine.cli.serve import bind

        self.sock = bind("127.0.0.1", 0)  # as `awt-engine serve` binds (TCP_NODELAY)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def load(url: str, imgs: list[bytes], concurrency: int, n: int, **form) -> tuple[float, list]:
    """``n`` single-image requests from ``concurrency`` client threads in another process
    (the clients' Python work must not share the server's interpreter lock):
    (seconds, latencies)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(_load, url, imgs, concurrency, n, form).result()


def _load(url: str, imgs: list[bytes], concurrency: int, n: int, form: dict):
    import httpx

    local = threading.local()

    def one(i: int) -> float:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
        files = {"image": (f"{i}.png", imgs[i % len(imgs)], "image/png")}
        t0 = time.perf_counter()
        r = local.client.post(f"{url}/v1/classify", files=files, data=form)
        r.raise_for_status()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(one, range(n)))
    return time.perf_counter() - t0, lat


def pct(values: list[float], q: float) -> str:
    return f"{1000 * float(np.percentile(values, q)):.0f}"


def scorer_rows(model: str, scorer: str, views: int, imgs: list[bytes], classes) -> list[list]:
    from awt_engine.classifier import create_classifier
    from awt_engine.serve.app import create_app
    from awt_engine.serve.config import ServeConfig
    from awt_engine.serve.service import ClassifyService

    clf = create_classifier(
        model, None, classes=classes, scorer=scorer, views=views, device="cpu", cache_dir=CACHE
    )
    clf.classify([io.BytesIO(b) for b in imgs[:8]])  # warm: text embeddings, threads
    paths = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, b in enumerate(imgs):
            p = Path(tmp) / f"{i}.png"
            p.write_bytes(b)
            paths.append(p)
        t0 = time.perf_counter()
        rows = list(clf.classify(paths, top_k=5))
        offline = len(rows) / (time.perf_counter() - t0)
    config = ServeConfig(max_batch=32, max_wait_ms=5.0)
    running = Running(create_app(ClassifyService(clf, config), config))
    out = []
    try:
        load(running.url, imgs, 4, 16)  # warm
        for conc in (1, 8, 32):
            n = max(64, 4 * conc) if conc > 1 else 48
            secs, lat = load(running.url, imgs, conc, n)
            rate = n / secs
            ratio = f"{rate / offline:.2f}" if conc == 32 else ""
            out.append(
                [
                    scorer,
                    views,
                    conc,
                    f"{rate:.0f}",
                    pct(lat, 50),
                    pct(lat, 95),
                    pct(lat, 99),
                    f"{offline:.0f}",
                    ratio,
                ]
            )
    finally:
        running.close()
    return out


def label_and_memory(model: str, imgs: list[bytes], requests: int) -> list[str]:
    import httpx

    from awt_engine.classifier import create_classifier
    from awt_engine.serve.app import create_app
    from awt_engine.serve.config import ServeConfig
    from awt_engine.serve.service import ClassifyService

    clf = create_classifier(
        model, None, classes=["cat", "dog"], scorer="clip", device="cpu", cache_dir=CACHE
    )
    config = ServeConfig(timeout=900.0)  # 1,000 labels through a real text tower on a CPU
    service = ClassifyService(clf, config)
    running = Running(create_app(service, config))
    notes = []
    try:
        labels = ",".join(f"thing number {i}" for i in range(1000))
        with httpx.Client(timeout=600) as client:
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                r = client.post(
                    f"{running.url}/v1/classify",
                    files={"image": ("a.png", imgs[0], "image/png")},
                    data={"candidate_labels": labels},
                )
                r.raise_for_status()
                times.append(time.perf_counter() - t0)
        s = service.stats()
        notes.append(
            f"1,000 new labels: first request {1000 * times[0]:.0f} ms, second {1000 * times[1]:.0f} ms "
            f"(label cache hits {s['label_cache_hits']}, misses {s['label_cache_misses']})"
        )
        load(running.url, imgs, 8, 100)
        after_100 = rss_mib()
        load(running.url, imgs, 8, requests)
        notes.append(
            f"resident memory after 100 requests {after_100:.0f} MiB, after {requests + 100:,} "
            f"{rss_mib():.0f} MiB (the server's process)"
        )
    finally:
        running.close()
    return notes


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="open_clip architecture (random weights)")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--awt-views", type=int, default=4)
    ap.add_argument("--requests", type=int, default=10_000)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(Path(tmp) / "small")
        imgs = images(args.images)
        classes = [f"class {i}" for i in range(47)]
        rows = scorer_rows(model, "clip", 1, imgs, classes)
        rows += scorer_rows(model, "awt", args.awt_views, imgs, classes)
        notes = label_and_memory(model, imgs, args.requests)
    return print_table(
        "Serving: one image per request, loopback",
        [
            "scorer",
            "views",
            "concurrency",
            "images/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "offline images/s",
            "served / offline",
        ],
        rows,
        notes=[
            f"hardware: {hardware()}; the clients run in another process on the same cores",
            f"model: {args.model or 'small open_clip ViT (64 px, width 128, 2 layers)'}, random "
            f"weights, float32; 47 classes; max_batch 32, max_wait_ms 5",
            *notes,
            f"date: {today()}",
        ],
    )


if __name__ == "__main__":
    main()
