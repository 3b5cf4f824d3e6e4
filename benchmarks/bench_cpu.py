"""CPU image-tower throughput: fp32 eager against each int8 candidate, and ONNX Runtime.

Paths, all in one run on the same pixels: fp32 eager (the engine's default), torchao int8
(every block matmul a Linear, int8 weights and activations: ``_torchao_int8.py``), ONNX
Runtime fp32, the engine's int8 (``load_backbone(precision="int8")``: ONNX Runtime's dynamic
quantisation of the exported graphs), and OpenVINO fp32 (its f32 hint) and on the same int8
graph when the ``openvino`` package is importable (report.py layers it on with
``uv run --with openvino``). Images/s with 1 view (a batch of images) and with V
views (one image's V views in one batch); the achieved GFLOP/s beside the machine's fp32
peak; agreement with fp32 on the 1-view set: top-1 over the label set (class embeddings
from the same precision's text tower for torch, torchao and the engine's int8, from the
fp32 text tower for the other ONNX rows) and the largest change of a class probability (softmax at the model's
logit scale). Random weights (no downloads).

    uv run python benchmarks/bench_cpu.py [--models ViT-B-32,ViT-B-16] [--images 48]
        [--views 51] [--classes 100] [--threads N] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware, print_table, today
from _torchao_int8 import torchao_int8

from awt_engine.backbone import load_backbone
from awt_engine.backbone.devices import default_threads, set_threads
from awt_engine.backbone.onnx_export import export_onnx, ort_session


def vit_flops(bb) -> float:
    """Forward FLOPs of one image through the ViT (2 per multiply-add): patch embedding,
    per block q/k/v/out and MLP matmuls (12 W^2 per token) and attention (2 T^2 W), the
    projection. Norms, softmax and GELU are left out (under 1%)."""
    v = bb.vision_tower
    W = int(v.conv1.out_channels)
    p = int(v.conv1.kernel_size[0])
    R = bb.preprocess.size
    T = (R // p) ** 2 + 1
    layers = len(bb.vision_blocks.blocks)
    macs = (T - 1) * 3 * p * p * W + layers * (12 * T * W * W + 2 * T * T * W) + W * bb.embed_dim
    return 2.0 * macs


def peak_gflops(threads: int, flops_per_cycle: int) -> tuple[float, float]:
    """(GHz, threads x GHz x fp32 FLOPs per cycle per core) from /proc/cpuinfo's clock."""
    ghz = 0.0
    try:
        with open("/proc/cpuinfo") as f:
            ghz = next(float(x.split(":")[1]) for x in f if x.startswith("cpu MHz")) / 1000
    except (OSError, StopIteration):
        pass
    return ghz, threads * ghz * flops_per_cycle


def best_time(fn, x, repeat: int) -> tuple[float, torch.Tensor]:
    fn(x[:2])  # warm-up (kernels, allocations) on a small batch
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(x)
        best = min(best, time.perf_counter() - t0)
    return best, out


def agreement(emb, ref_emb, cls, ref_cls, scale) -> tuple[float, float]:
    """(top-1 agreement %, largest |p - p_fp32|) over the set, at the logit scale."""
    p = torch.softmax(scale * emb.double() @ cls.double().T, -1)  # [N, C]
    q = torch.softmax(scale * ref_emb.double() @ ref_cls.double().T, -1)
    agree = (p.argmax(-1) == q.argmax(-1)).double().mean().item() * 100
    return agree, (p - q).abs().max().item()


def pixels(n: int, R: int, seed: int) -> torch.Tensor:
    """Smooth random images (a blurred noise field), normalised like CLIP's inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, R // 8, R // 8, generator=g)
    return F.interpolate(x, size=(R, R), mode="bicubic", align_corners=False)


def candidates(model: str, folder: Path, threads: int):
    """(fp32 backbone, [(name, make)]): ``make()`` -> (encode pixels -> [N, D], text backbone
    or None). Each runtime is made just before it is timed and dropped after, so no idle
    thread pool of another runtime competes for the cores."""
    fp32 = load_backbone(model, None, device="cpu", precision="fp32")
    export_onnx(fp32, folder / "fp32", model_name=model, int8=True)
    out = [
        ("fp32 eager (torch)", lambda: (fp32.encode_images, fp32)),
        ("int8 torchao", lambda: _torchao(model)),
        (
            "fp32 ONNX Runtime",
            lambda: (_ort(ort_session(folder / "fp32" / "image.onnx", threads)), None),
        ),
        ("int8 ONNX Runtime (engine)", lambda: _engine_int8(model)),
    ]
    try:
        import openvino as ov
    except ImportError:
        return fp32, out
    version = ov.__version__.split("-")[0]
    for name, file in (("fp32", "image.onnx"), ("int8", "image.int8.onnx")):
        path = folder / "fp32" / file
        out.append((f"{name} OpenVINO {version}", lambda p=path: (_ov(ov, p, threads), None)))
    return fp32, out


def _engine_int8(model: str):
    """``--precision int8``: the engine's path (graphs written under $AWT_ENGINE_CACHE)."""
    int8 = load_backbone(model, None, device="cpu", precision="int8")
    return int8.encode_images, int8


def _torchao(model: str):
    int8 = load_backbone(model, None, device="cpu", precision="fp32")
    torchao_int8(int8.model)
    return int8.encode_images, int8


def _ort(sess):
    return lambda x: torch.from_numpy(sess.run(None, {"pixels": x.numpy()})[0])


def _ov(ov, path: Path, threads: int):
    core = ov.Core()
    # f32: on CPUs with AVX512_BF16 OpenVINO's default inference precision is bf16
    core.set_property("CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
    compiled = core.compile_model(str(path), "CPU")
    return lambda x: torch.from_numpy(compiled(x.numpy())[0].copy())


def bench_model(model, args, rows, threads, peak):
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AWT_ENGINE_CACHE"] = tmp  # the engine's int8 graphs: not in ./cache
        fp32, paths = candidates(model, Path(tmp), threads)
        R, flops = fp32.preprocess.size, vit_flops(fp32)
        one, many = pixels(args.images, R, 0), pixels(args.views, R, 1)
        names = [f"class {i}" for i in range(args.classes)]
        names = [f"a photo of a {n}, number {i}." for i, n in enumerate(names)]
        ref_cls = fp32.encode_text(names)
        results = {}
        for name, make in paths:
            try:
                fn, text_bb = make()
            except Exception as exc:  # a graph a runtime cannot read: said on stderr
                print(f"{name}: {exc}", file=sys.stderr)
                continue
            t1, emb = best_time(fn, one, args.repeat)
            tv, _ = best_time(fn, many, args.repeat)
            results[name] = (t1, tv, emb, text_bb.encode_text(names) if text_bb else ref_cls)
            del fn, text_bb
        base_t1, _, ref_emb, _ = results["fp32 eager (torch)"]
        for name, (t1, tv, emb, cls) in results.items():
            agree, dp = agreement(emb, ref_emb, cls, ref_cls, fp32.logit_scale)
            gf = flops * args.images / t1 / 1e9
            rows.append(
                [
                    model,
                    name,
                    f"{args.images / t1:.2f}",
                    f"{1 / tv:.3f}",
                    f"{gf:.0f} ({100 * gf / peak:.0f}%)",
                    f"{base_t1 / t1:.2f}x",
                    f"{agree:.1f}%",
                    f"{dp:.4f}",
                    f"{F.cosine_similarity(emb, ref_emb).min().item():.5f}",
                ]
            )
        return flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ViT-B-32,ViT-B-16")
    ap.add_argument("--images", type=int, default=48, help="images of the 1-view set")
    ap.add_argument("--views", type=int, default=51, help="V: views of the one V-view image")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="[default: the process's cores]")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--flops-per-cycle",
        type=int,
        default=32,
        help="fp32 FLOPs per cycle per core: 2 FMA pipes x 8 lanes x 2 (Zen 4's AVX-512 "
        "runs on 256-bit pipes; 64 on Zen 5 or Intel with two 512-bit FMA units)",
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # random-weights warnings: deliberate here
    threads = set_threads(args.threads)
    ghz, peak = peak_gflops(threads, args.flops_per_cycle)
    rows, flops = [], {}
    for model in args.models.split(","):
        flops[model] = bench_model(model, args, rows, threads, peak)
    try:
        import openvino

        ov = f"OpenVINO {openvino.__version__}"
    except ImportError:
        ov = "OpenVINO not installed (report.py runs this with `uv run --with openvino`)"
    import onnxruntime
    import torchao

    notes = [
        f"{hardware()}; {threads} threads for every runtime (default: the cores this process "
        f"may use, {default_threads()}); {today()}",
        f"torchao {torchao.__version__}, ONNX Runtime {onnxruntime.__version__}, {ov}",
        f"random weights; 1 view: {args.images} images in one batch; {args.views} views: one "
        f"image's {args.views} views in one batch; best of {args.repeat} after a warm-up",
        "GFLOP/s: "
        + ", ".join(f"{m} {f / 1e9:.2f} GFLOP per image" for m, f in flops.items())
        + " (2 FLOPs per multiply-add; matmuls, attention, patch embedding), on the 1-view "
        f"set; % of the fp32 peak {peak:.0f} GFLOP/s = {threads} cores x {ghz:.2f} GHz x "
        f"{args.flops_per_cycle} FLOPs/cycle (AVX-512 on Zen 4: 2 FMA pipes x 8 fp32 lanes "
        "x 2); the clock is /proc/cpuinfo's (in a VM the nominal one: boost clocks put fp32 "
        "above 100%, and int8 counts its multiply-adds as fp32 FLOPs would)",
        f"agreement on the 1-view set with {args.classes} classes: top-1 with fp32 eager, the "
        "largest change of a class probability, the smallest cosine of an image embedding; "
        "the fp32 ONNX Runtime and OpenVINO rows use the fp32 text tower's class embeddings, the "
        "others their own text tower's (the engine's int8: the int8 text graph)",
        "goal: int8 >= 1.7x fp32 eager with >= 99% top-1 agreement",
    ]
    if threads < default_threads():
        notes.append(
            f"{threads} thread(s) of {default_threads()} on purpose: on a shared VM under "
            "load, oversubscribed thread pools slow the runtimes unequally (torch's OpenMP "
            "barriers most), so fewer threads compare the kernels themselves"
        )
    header = ["model", "path", "images/s (1 view)", f"images/s ({args.views} views)"]
    header += ["GFLOP/s (% of peak)", "vs fp32 eager", "top-1 agree", "max dp", "min cos"]
    print_table("CPU throughput: fp32 eager, int8 candidates, ONNX Runtime", header, rows, notes)
    print(json.dumps({"rows": rows}), file=sys.stderr)


if __name__ == "__main__":
    main()
