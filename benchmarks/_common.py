"""Shared bits of the benchmark scripts: hardware line, timing, synthetic embeddings."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import time

import torch


def hardware(device: torch.device | str = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


def today() -> str:
    return _dt.date.today().isoformat()


def timeit(fn, *, repeat: int = 3, warmup: int = 1, device: torch.device | str = "cpu") -> float:
    """Best-of-``repeat`` wall time of ``fn()`` in seconds."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def clip_like_embeds(B, V, C, P, D, *, seed=0, device="cpu", dtype=torch.float32):
    """Normalised embeddings with CLIP-like structure: crops perturb the image,
    descriptions perturb the class's bare prompt, each image leans toward one class."""
    g = torch.Generator().manual_seed(seed)
    txt_base = torch.randn(C, 1, D, generator=g)
    txt = txt_base + 0.6 * torch.randn(C, P, D, generator=g)
    labels = torch.randint(0, C, (B,), generator=g)
    img = (
        torch.randn(B, 1, D, generator=g)
        + 1.0 * txt_base[labels]
        + 0.7 * torch.randn(B, V, D, generator=g)
    )
    img = torch.nn.functional.normalize(img, dim=-1)
    txt = torch.nn.functional.normalize(txt, dim=-1)
    return img.to(device, dtype), txt.to(device, dtype)


def print_table(title: str, header: list[str], rows: list[list], notes: list[str] = ()) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(r):
        return "| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)) + " |"

    out = [f"### {title}", ""] + [f"- {n}" for n in notes] + [""] if notes else [f"### {title}", ""]
    out += [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    text = "\n".join(out) + "\n"
    print(text)
    return text
