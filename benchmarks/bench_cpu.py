"""CPU image-tower throughput: fp32 eager against each int8 candidate, and ONNX Runtime.

Paths, all in one run on the same pixels: fp32 eager (the engine's default), bf16 autocast
(for reference: not an engine precision on the CPU; it rides on AMX where a CPU has it), torchao int8
(every block matmul a Linear, int8 weights and activations: ``_torchao_int8.py``), ONNX
Runtime fp32, ONNX Runtime's dynamic int8 quantisation with its defaults (every op it
knows, one scale per weight tensor), the engine's int8 (``load_backbone(precision="int8")``:
the same quantiser on the block MatMuls only, one scale per output channel, the projection
left float32: ``quantise_onnx``), and OpenVINO fp32 (its f32 hint) and on the same int8
graph when the ``openvino`` package is importable (report.py layers it on with
``uv run --with openvino``). Images/s with 1 view (a batch of images) and with V
views (one image's V views in one batch); the achieved GFLOP/s beside the machine's fp32
peak; agreement with fp32 on the 1-view set: top-1 over the label set (class embeddings
from the same precision's text tower for torch and the int8 paths, from the fp32 text
tower for the other ONNX rows) and the largest change of a class probability (softmax at the model's
logit scale). Random weights (no downloads).

A second table measures agreement on two larger sets, for the int8 paths against fp32 eager,
each arm computing every embedding it scores with its own towers:

- zero-shot: the 1-view set extended to ``--agree-images`` smooth random images against the
  ``--classes`` prompts' text embeddings. With random weights every image sits near the same
  point and the class probabilities are near uniform, so top-1 there often decides ties.
- prototype: ``--anchors`` distinct synthetic images (a noise texture of its own scale with
  discs and boxes in their own colours), each the one prototype of its class (a nearest-
  prototype, few-shot cache classifier: the class embedding is the image embedding of the
  anchor), and ``--queries`` seeded random crops and flips of the anchors scored by
  100 x cosine through a softmax; a query is close to its own anchor, so the margins are
  decided like a trained model's rather than tied.

    uv run python benchmarks/bench_cpu.py [--models ViT-B-32,ViT-B-16] [--images 48]
        [--views 51] [--classes 100] [--threads N] [--repeat 2] [--agree-images 256]
        [--anchors 32] [--queries 256]
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


def fma_width() -> tuple[int, str]:
    """(fp32 FLOPs per cycle per core, why) from /proc/cpuinfo's vendor, family and flags:
    2 FMA pipes x lanes x 2 FLOPs. Intel with AVX-512: two 512-bit FMA units (16 lanes:
    64; the server parts, as here); AMD Zen 4 (family 25) runs AVX-512 on 256-bit pipes
    (8 lanes: 32), Zen 5 (family 26) on 512-bit ones (64); AVX2 with FMA: 32; else 16."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    vendor, family = info.get("vendor_id", ""), info.get("cpu family", "")
    flags = set(info.get("flags", "").split())
    zen4 = vendor == "AuthenticAMD" and family == "25"
    if "avx512f" in flags and zen4:
        return 32, "AMD Zen 4: AVX-512 on 256-bit pipes, 2 FMA pipes x 8 fp32 lanes x 2"
    if "avx512f" in flags:
        return 64, f"{vendor} AVX-512: 2 FMA units x 16 fp32 lanes x 2"
    if "fma" in flags:
        return 32, "AVX2: 2 FMA pipes x 8 fp32 lanes x 2"
    return 16, "no FMA flags read: an SSE-class guess"


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


def probs(emb, cls, scale) -> torch.Tensor:
    """[N, D] x [C, D] -> [N, C] class probabilities (softmax of scale x cosine), float64."""
    return torch.softmax(scale * emb.double() @ cls.double().T, -1)


def agreement(emb, ref_emb, cls, ref_cls, scale) -> tuple[float, float]:
    """(top-1 agreement %, largest |p - p_fp32|) over the set, at the logit scale."""
    p, q = probs(emb, cls, scale), probs(ref_emb, ref_cls, scale)  # [N, C]
    agree = (p.argmax(-1) == q.argmax(-1)).double().mean().item() * 100
    return agree, (p - q).abs().max().item()


def median_gap(emb, cls, scale) -> float:
    """The median over the set of p_top1 - p_top2 (how far from a tie each decision is)."""
    top = probs(emb, cls, scale).topk(2, -1).values  # [N, 2]
    return (top[:, 0] - top[:, 1]).median().item()


def pixels(n: int, R: int, seed: int) -> torch.Tensor:
    """Smooth random images (a blurred noise field), normalised like CLIP's inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, R // 8, R // 8, generator=g)
    return F.interpolate(x, size=(R, R), mode="bicubic", align_corners=False)


def anchor_images(C: int, R: int, seed: int) -> torch.Tensor:
    """[C, 3, R, R] distinct synthetic images: each a noise field blurred at its own scale
    (a 2..16 grid upsampled) with two discs and a box painted over it in their own colours."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(R), torch.arange(R), indexing="ij")  # [R, R]
    out = []
    for _ in range(C):
        s = int(torch.randint(2, 17, (1,), generator=g))
        img = F.interpolate(torch.randn(1, 3, s, s, generator=g), size=(R, R), mode="bicubic")
        for k in range(3):
            cy, cx = (torch.rand(2, generator=g) * R).tolist()
            r = R / 10 + torch.rand(1, generator=g).item() * R / 5
            if k < 2:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
            else:
                mask = ((yy - cy).abs() < r) & ((xx - cx).abs() < 0.6 * r)
            img[0][:, mask] = 1.5 * torch.randn(3, 1, generator=g)
        out.append(img)
    return torch.cat(out)


def crops(anchors: torch.Tensor, N: int, seed: int) -> torch.Tensor:
    """[C, 3, R, R] -> [N, 3, R, R] queries: query n is a random crop of anchor n mod C
    (35-100% of its area, aspect 3:4 to 4:3) resized back to R, flipped left-right with
    probability 1/2."""
    C, _, R, _ = anchors.shape
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in range(N):
        area, logr, fy, fx, flip = torch.rand(5, generator=g).tolist()
        area = R * R * (0.35 + 0.65 * area)
        aspect = (4 / 3) ** (2 * logr - 1)
        h = min(R, round((area / aspect) ** 0.5))
        w = min(R, round((area * aspect) ** 0.5))
        y, x = int(fy * (R - h)), int(fx * (R - w))
        q = anchors[n % C : n % C + 1, :, y : y + h, x : x + w]
        q = F.interpolate(q, size=(R, R), mode="bilinear", align_corners=False)
        out.append(q.flip(-1) if flip < 0.5 else q)
    return torch.cat(out)


def encode_chunks(fn, x: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """fn over [N, 3, R, R] in chunks of ``chunk`` rows -> [N, D]."""
    return torch.cat([fn(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def candidates(model: str, folder: Path, threads: int):
    """(fp32 backbone, [(name, make)]): ``make()`` -> (encode pixels -> [N, D], text backbone
    or None). Each runtime is made just before it is timed and dropped after, so no idle
    thread pool of another runtime competes for the cores."""
    fp32 = load_backbone(model, None, device="cpu", precision="fp32")
    export_onnx(fp32, folder / "fp32", model_name=model, int8=True)
    out = [
        ("fp32 eager (torch)", lambda: (fp32.encode_images, fp32)),
        ("bf16 autocast (torch)", lambda: (_bf16(fp32), None)),
        ("int8 torchao", lambda: _torchao(model)),
        (
            "fp32 ONNX Runtime",
            lambda: (_ort(ort_session(folder / "fp32" / "image.onnx", threads)), None),
        ),
        ("int8 ONNX Runtime (ORT defaults)", lambda: _ort_defaults(fp32, folder, threads)),
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


def _bf16(bb):
    """The fp32 model under CPU autocast to bfloat16 (matmuls in bf16: oneDNN's AMX or
    AVX512_BF16 kernels where the CPU has them), embeddings back in float32."""

    def encode(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return bb.encode_images(x).float()

    return encode


class _TextGraph:
    """encode_text over an ONNX text graph (token ids from the backbone's tokenizer)."""

    def __init__(self, bb, sess):
        self.bb, self.sess = bb, sess

    def encode_text(self, prompts):
        ids = self.bb.tokenize(prompts).numpy()
        return torch.from_numpy(self.sess.run(None, {"ids": ids})[0])


def _ort_defaults(fp32, folder: Path, threads: int):
    """ONNX Runtime's dynamic quantisation with its defaults (every op it knows, the patch
    embedding's Conv and the token Gather included; one scale per weight tensor): the
    candidate the engine's choice (quantise_onnx) is measured against."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = {}
    for name in ("image", "text"):
        dst = folder / f"{name}.ort-defaults.onnx"
        if not dst.exists():
            quantize_dynamic(
                str(folder / "fp32" / f"{name}.onnx"), str(dst), weight_type=QuantType.QInt8
            )
        out[name] = ort_session(dst, threads)
    return _ort(out["image"]), _TextGraph(fp32, out["text"])


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


# Paths measured on the larger agreement sets (each against fp32 eager, the first).
AGREE_PATHS = (
    "fp32 eager (torch)",
    "int8 torchao",
    "int8 ONNX Runtime (ORT defaults)",
    "int8 ONNX Runtime (engine)",
)
# The prototype set's logit scale: CLIP's trained one (exp of the 4.6052 clamp), as a
# few-shot cache classifier (Tip-Adapter's) scores cosines to its stored image embeddings.
PROTO_SCALE = 100.0


def bench_model(model, args, rows, agree_rows, threads, peak):
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AWT_ENGINE_CACHE"] = tmp  # the engine's int8 graphs: not in ./cache
        fp32, paths = candidates(model, Path(tmp), threads)
        R, flops = fp32.preprocess.size, vit_flops(fp32)
        zero_shot = pixels(max(args.agree_images, args.images), R, 0)  # [Z, 3, R, R]
        one, many = zero_shot[: args.images], pixels(args.views, R, 1)
        anchors = anchor_images(args.anchors, R, 2)  # [A, 3, R, R]
        queries = crops(anchors, args.queries, 3)  # [Q, 3, R, R]
        names = [f"class {i}" for i in range(args.classes)]
        names = [f"a photo of a {n}, number {i}." for i, n in enumerate(names)]
        ref_cls = fp32.encode_text(names)
        results, sets = {}, {}
        for name, make in paths:
            try:
                fn, text_bb = make()
            except Exception as exc:  # a graph a runtime cannot read: said on stderr
                print(f"{name}: {exc}", file=sys.stderr)
                continue
            t1, emb = best_time(fn, one, args.repeat)
            tv, _ = best_time(fn, many, args.repeat)
            cls = text_bb.encode_text(names) if text_bb else ref_cls
            results[name] = (t1, tv, emb, cls)
            if name in AGREE_PATHS:  # every embedding through this path's own towers
                rest = encode_chunks(fn, zero_shot[args.images :])
                sets[name] = {
                    "zero-shot": (torch.cat([emb, rest]), cls, fp32.logit_scale),
                    "prototype": (encode_chunks(fn, queries), encode_chunks(fn, anchors)),
                }
            del fn, text_bb
        speed_rows(model, args, results, rows, flops, peak, fp32.logit_scale, ref_cls)
        agreement_rows(model, sets, agree_rows)
        return flops


def speed_rows(model, args, results, rows, flops, peak, scale, ref_cls):
    base_t1, _, ref_emb, _ = results["fp32 eager (torch)"]
    for name, (t1, tv, emb, cls) in results.items():
        agree, dp = agreement(emb, ref_emb, cls, ref_cls, scale)
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


def agreement_rows(model, sets, rows):
    """Per set and int8 path: top-1 agreement and the largest probability change against
    fp32 eager, beside fp32's median top-1 - top-2 gap (and, for the prototype set, how
    often fp32's top-1 is the query's own anchor)."""
    ref = sets["fp32 eager (torch)"]
    zs_emb, zs_cls, zs_scale = ref["zero-shot"]
    q_emb, a_emb = ref["prototype"]
    A = len(a_emb)
    own = (probs(q_emb, a_emb, PROTO_SCALE).argmax(-1) == torch.arange(len(q_emb)) % A).double()
    fp32 = {
        "zero-shot": (zs_emb, zs_cls, zs_scale, "-"),
        "prototype": (q_emb, a_emb, PROTO_SCALE, f"{100 * own.mean().item():.1f}%"),
    }
    for set_name, (ref_emb, ref_cls, scale, own_pct) in fp32.items():
        gap = median_gap(ref_emb, ref_cls, scale)
        for name, got in sets.items():
            if name == "fp32 eager (torch)":
                continue
            emb, cls = got[set_name][:2]
            agree, dp = agreement(emb, ref_emb, cls, ref_cls, scale)
            size = f"{len(ref_emb)} x {len(ref_cls)}"
            err = (1 - F.cosine_similarity(emb.double(), ref_emb.double())).mean().item()
            stats = [f"{scale:.1f}", f"{gap:.4f}", own_pct, name, f"{agree:.1f}%", f"{dp:.4f}"]
            stats.append(f"{err:.2e}")
            rows.append([model, set_name, size, *stats])


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
        default=None,
        help="fp32 FLOPs per cycle per core [default: from /proc/cpuinfo, fma_width()]",
    )
    ap.add_argument(
        "--agree-images", type=int, default=256, help="images of the zero-shot agreement set"
    )
    ap.add_argument("--anchors", type=int, default=32, help="classes of the prototype set")
    ap.add_argument("--queries", type=int, default=256, help="queries of the prototype set")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # random-weights warnings: deliberate here
    load0 = os.getloadavg()[0]
    threads = set_threads(args.threads)
    fpc, why = fma_width()
    if args.flops_per_cycle is not None:
        fpc, why = args.flops_per_cycle, "given by --flops-per-cycle"
    args.flops_per_cycle, args.fpc_why = fpc, why
    ghz, peak = peak_gflops(threads, fpc)
    rows, agree_rows, flops = [], [], {}
    for model in args.models.split(","):
        flops[model] = bench_model(model, args, rows, agree_rows, threads, peak)
    load = (load0, os.getloadavg()[0])
    header = ["model", "path", "images/s (1 view)", f"images/s ({args.views} views)"]
    header += ["GFLOP/s (% of peak)", "vs fp32 eager", "top-1 agree", "max dp", "min cos"]
    notes = speed_notes(args, threads, ghz, peak, flops, load)
    print_table("CPU throughput: fp32 eager, int8 candidates, ONNX Runtime", header, rows, notes)
    header = ["model", "set", "N x classes", "logit scale", "fp32 median gap"]
    header += ["fp32 top-1 = own anchor", "path", "top-1 agree", "max dp", "mean 1 - cos"]
    title = "int8 agreement with fp32 eager: tied (zero-shot) and decided (prototype) margins"
    print_table(title, header, agree_rows, agree_notes(args))
    print(json.dumps({"rows": rows, "agreement": agree_rows}), file=sys.stderr)


def speed_notes(args, threads, ghz, peak, flops, load) -> list[str]:
    try:
        import openvino

        ov = f"OpenVINO {openvino.__version__}"
    except ImportError:
        ov = "OpenVINO not installed (report.py runs this with `uv run --with openvino`)"
    import onnxruntime
    import torchao

    notes = [
        f"{hardware()}; {threads} threads for every runtime (default: the cores this process "
        f"may use, {default_threads()}); {today()}; 1-minute load average {load[0]:.2f} at the "
        f"start, {load[1]:.2f} at the end",
        f"torchao {torchao.__version__}, ONNX Runtime {onnxruntime.__version__}, {ov}",
        f"random weights; 1 view: {args.images} images in one batch; {args.views} views: one "
        f"image's {args.views} views in one batch; best of {args.repeat} after a warm-up",
        "GFLOP/s: "
        + ", ".join(f"{m} {f / 1e9:.2f} GFLOP per image" for m, f in flops.items())
        + " (2 FLOPs per multiply-add; matmuls, attention, patch embedding), on the 1-view "
        f"set; % of the fp32 peak {peak:.0f} GFLOP/s = {threads} cores x {ghz:.2f} GHz x "
        f"{args.flops_per_cycle} FLOPs/cycle ({args.fpc_why}); the clock is /proc/cpuinfo's (in a VM the nominal one: boost clocks put fp32 "
        "above 100%, and int8 counts its multiply-adds as fp32 FLOPs would)",
        f"agreement on the 1-view set with {args.classes} classes: top-1 with fp32 eager, the "
        "largest change of a class probability, the smallest cosine of an image embedding; "
        "the fp32 ONNX Runtime and OpenVINO rows use the fp32 text tower's class embeddings, the "
        "others their own text tower's (the ONNX Runtime int8 rows: their int8 text graph); with random "
        "weights these margins are ties: see the next table",
        "goal: int8 >= 1.7x fp32 eager with >= 99% top-1 agreement",
    ]
    if threads < default_threads():
        notes.append(
            f"{threads} thread(s) of {default_threads()} on purpose: on a shared VM under "
            "load, oversubscribed thread pools slow the runtimes unequally (torch's OpenMP "
            "barriers most), so fewer threads compare the kernels themselves"
        )
    return notes


def agree_notes(args) -> list[str]:
    return [
        "each arm computes every embedding it scores with its own towers, as a user's run "
        "at that precision would: fp32 eager both sides, torchao int8 both sides, the "
        "ONNX Runtime int8 rows both sides (their image and text graphs); top-1 agree and "
        "max dp (the largest change of a class probability) are against fp32 eager; fp32 "
        "median gap: the median over the set of fp32's p_top1 - p_top2; mean 1 - cos: over "
        "the set's query (image) embeddings, against fp32 eager's",
        f"zero-shot: {args.agree_images} smooth random images (a seeded 1/8-resolution noise "
        f"field, bicubic upsampled; the first {args.images} are the 1-view set above) against "
        f"the text embeddings of {args.classes} prompts, at the model's logit scale (random "
        "init: 1/0.07). With random weights all images embed near one point and the class "
        "probabilities are near uniform, so this set's top-1 mostly decides ties: it "
        "measures how often int8 breaks a tie the other way, not int8's error",
        f"prototype: {args.anchors} anchor images, each a class (a seeded noise texture "
        "blurred at its own scale, 2x2 to 16x16 upsampled, with two discs and a box in their "
        "own colours), and the class embedding the anchor's image embedding (a nearest-"
        "prototype, few-shot cache classifier as Tip-Adapter's cache); "
        f"{args.queries} queries, query n a seeded random crop of anchor n mod "
        f"{args.anchors} (35-100% of its area, aspect 3:4 to 4:3, resized back) flipped "
        f"left-right with probability 1/2; scored by {PROTO_SCALE:.0f} x cosine (CLIP's "
        "trained logit scale) through a softmax. A query sits closer to its own anchor than "
        "to the others, so its decisions have margins like a trained model's, not ties; "
        "fp32 top-1 = own anchor says how often fp32 picks the anchor the query was cut from",
        "goal: >= 99% top-1 agreement",
    ]


if __name__ == "__main__":
    main()
