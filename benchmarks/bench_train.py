"""Training step cost per method: ms per step, peak memory, the text encoder's share.

Each method trains on DTD's 47 classes at its paper's batch size on ViT-B-32 with random
weights (the cost does not depend on the weights). Inputs are synthetic views (decoding
is not part of a step's cost here). Each method runs in its own process so its peak
resident memory is its own.

The LLM methods (LLaMP, CLAMP, eP-ALM) use a random Qwen2 LM built from a config here
(``--lm-hidden`` wide, ``--lm-layers`` deep, the tests' 600-token BPE tokenizer); LLaMP
runs at two depths to show that its step does not grow with the LLM's depth (only the
last layer runs per step; the first layers' K/V are cached once, in "prepare"). A second
table gives eP-ALM's scoring cost per image with and without the shared-prefix cache.

    uv run python benchmarks/bench_train.py [--model ViT-B-32] [--device cpu] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware, print_table, today

SCORING_VIEWS = 4  # eP-ALM's scoring table: one image, 4 views, DTD's 47 bare class names
SHORT_TEMPLATE = "a photo of a {}."  # CLIP's ImageNet-style template, beside DTD's long one

REPO = Path(__file__).resolve().parents[1]

# row -> (method, batch size or None for the method's default, what runs per step)
METHODS = {
    "coop": ("coop", 32, "C prompts (ctx + name), one forward + backward"),
    "lamm": ("lamm", 32, "2 C prompts (learned labels; original labels for the loss)"),
    "awt-adapter": ("awt-adapter", 16, "C x 8 prompts with adapters + the same without"),
    "llamp": ("llamp", None, "C prompts: LLM's last layer over cached K/V + CLIP text"),
    "llamp-deep": ("llamp", None, "the same, LLM 3x as deep"),
    "clamp": ("clamp", None, "B captions through the LM (LoRA) + CLIP text (teacher)"),
    "epalm": ("epalm", None, "B captions through the LM, visual prefix injected"),
}
LLM_METHODS = ("llamp", "clamp", "epalm")


def _lm_depth(row: str, lm_layers: int) -> int:
    return 3 * lm_layers if row == "llamp-deep" else lm_layers


def _lm_options(method: str, lm: str, lm_layers: int) -> dict:
    if method == "epalm":  # eP-ALM's injected span, scaled from OPT-2.7B's 19..31 of 32
        return {"llm": lm, "start_layer": lm_layers * 19 // 32, "end_layer": lm_layers - 1}
    return {"llm": lm}


def build_lm(folder: Path, hidden: int, layers: int) -> str:
    """A random Qwen2 causal LM with a chat template (the tests' builder), saved once. Its
    BPE is trained on DTD's prompts too, so class names are one or two tokens, as in a real
    LM's vocabulary (a 600-token BPE spells them letter by letter: 3x longer texts)."""
    sys.path.insert(0, str(REPO))
    from awt_engine.registry import get_dataset
    from tests.fixtures_llm import build_tiny_chat_model

    dtd = get_dataset("dtd")
    templates = (dtd.template, SHORT_TEMPLATE)
    words = [t.format(c.replace("_", " ")) for c in dtd.classes for t in templates]
    words += [f"{c} detail {j}." for c in dtd.classes for j in range(3)]
    extra = tuple(words) * 10 + ("What is in the image?",) * 20
    return str(
        build_tiny_chat_model(
            folder, hidden=hidden, layers=layers, vocab_size=4000, extra_corpus=extra
        )
    )


def run_one(
    row: str,
    model: str,
    device: str,
    steps: int,
    lm: str | None = None,
    lm_layers: int = 0,
    scoring_lm: str | None = None,
    scoring_layers: int = 0,
) -> dict:
    from awt_engine.backbone import load_backbone
    from awt_engine.inputs.views import ViewConfig
    from awt_engine.labels import LabelSet
    from awt_engine.methods import get_method
    from awt_engine.methods.base import TrainBatch
    from awt_engine.registry import get_dataset
    from awt_engine.training.loop import _autocast, make_optimizer

    warnings.simplefilter("ignore")
    method, batch_size, _ = METHODS[row]
    spec = get_method(method)
    bb = load_backbone(model, None, device=device)
    classes = get_dataset("dtd").classes
    descriptions = tuple(tuple(f"{c} detail {j}." for j in range(50)) for c in classes)
    labels = LabelSet(classes, get_dataset("dtd").template, descriptions)
    cache = tempfile.mkdtemp(prefix="bench-train-cache-")
    if method in LLM_METHODS:
        net = spec.build(bb, spec.config(**_lm_options(method, lm, lm_layers)))
        net.use_cache_root(cache)
    else:
        net = spec.build(bb)
    t0 = time.perf_counter()
    net.prepare(labels, seed=1)
    if hasattr(net, "train_cache"):  # LLaMP builds its K/V at the first step: count it here
        net.train_cache()
    prepare_s = time.perf_counter() - t0
    defaults = spec.train_defaults(16, "dtd")
    B = batch_size or defaults.batch_size
    views = net.training_view_config(ViewConfig())
    R = bb.preprocess.size
    opt = make_optimizer(net, defaults)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, views.n_views, 3, R, R, generator=g).to(bb.device)
    y = torch.randint(0, len(classes), (B,), generator=g).to(bb.device)
    sync = torch.cuda.synchronize if bb.device.type == "cuda" else (lambda: None)

    amp = _autocast(None, bb.device)  # the fit loop's: fp16 autocast on CUDA, none on CPU
    scaler = torch.amp.GradScaler("cuda", enabled=bb.device.type == "cuda")

    def step(i):
        batch = TrainBatch(x, y, 0, i, torch.Generator().manual_seed(i))
        with amp:
            out = net.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        scaler.scale(out.total).backward()
        scaler.step(opt)
        scaler.update()
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

    text = float("nan")  # eP-ALM has no class embeddings: its text side is the step
    if method != "epalm":
        text_only()
        t0 = time.perf_counter()
        for _ in range(steps):
            text_only()
        text = (time.perf_counter() - t0) / steps
    if method == "lamm":
        text *= 2  # learned and original labels: two text passes per step
    # the training model's figures, before eP-ALM's scoring LM is loaded below
    learned = sum(t.numel() for t in net.learned_state().values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    if bb.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    scoring = None
    if method == "epalm":
        from awt_engine.methods.epalm import scoring_cost

        del net, opt  # the scoring table's LM is wider: scoring is where its size shows
        net = spec.build(bb, spec.config(**_lm_options(method, scoring_lm, scoring_layers)))
        net.prepare(labels.bare(), seed=1)
        net.eval()
        scoring = {}
        for name, template in (("DTD's", labels.template), ("short", SHORT_TEMPLATE)):
            bare = LabelSet(labels.classes, template, ((),) * len(labels.classes)).bare()
            with torch.no_grad():
                sc = scoring_cost(net, x[:1, :SCORING_VIEWS], bare, repeats=2)
                # the LM's part alone: a real eP-ALM LM (OPT-2.7B) dwarfs the vision tower
                levels = net.visual_levels(x[0, :SCORING_VIEWS])  # [V, n_levels, H]
                ids = net.text_ids(bare)
                mean_logp = {}
                for cached in (True, False):
                    best = float("inf")
                    for _ in range(2):
                        t0 = time.perf_counter()
                        total, count = net.score_texts(levels, ids, 1, cached)
                        sync()
                        best = min(best, time.perf_counter() - t0)
                    sc[f"lm_{'cached' if cached else 'whole'}_s"] = best
                    mean_logp[cached] = total / count  # [V, C]
                # a random LM's texts are improbable, so logits are ~0: compare log-probs
                sc["max_abs_diff"] = float((mean_logp[True] - mean_logp[False]).abs().max())
            sc["tokens"] = sorted(len(t) for t in ids)[len(ids) // 2]
            sc["template"] = template
            scoring[name] = sc
        scoring["prefix"] = len(net.question_ids) + net.config.prompt_len
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "method": method,
        "batch": f"{B} x {views.n_views} views",
        "ms_step": 1000 * per_step,
        "prepare_s": prepare_s,
        "text_share": None if text != text else min(1.0, text / per_step),
        "scoring": scoring,
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
    ap.add_argument("--lm-hidden", type=int, default=256, help="the random LM's width")
    ap.add_argument("--lm-layers", type=int, default=4, help="its depth (llamp-deep: 3x)")
    ap.add_argument("--scoring-lm-hidden", type=int, default=768, help="eP-ALM scoring's LM")
    ap.add_argument("--scoring-lm-layers", type=int, default=6)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--scoring-lm", help=argparse.SUPPRESS)
    ap.add_argument("--lm", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # child process: one method, JSON on stdout
        r = run_one(
            args.one,
            args.model,
            args.device,
            args.steps,
            args.lm,
            args.lm_layers,
            args.scoring_lm,
            args.scoring_lm_layers,
        )
        print(json.dumps(r))
        return ""
    chosen = args.methods.split(",")
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        sys.exit(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-lm-"))
    lms = {}
    for row in chosen:  # each LM depth the chosen rows use, built once
        if METHODS[row][0] in LLM_METHODS:
            depth = _lm_depth(row, args.lm_layers)
            if depth not in lms:
                lms[depth] = build_lm(tmp / f"lm{depth}", args.lm_hidden, depth)
    if "epalm" in chosen:
        scoring_lm = build_lm(tmp / "scoring", args.scoring_lm_hidden, args.scoring_lm_layers)
    rows, scoring = [], None
    for row in chosen:
        cmd = [sys.executable, __file__, "--one", row, "--model", args.model]
        cmd += ["--device", args.device, "--steps", str(args.steps)]
        if METHODS[row][0] in LLM_METHODS:
            depth = _lm_depth(row, args.lm_layers)
            cmd += ["--lm", lms[depth], "--lm-layers", str(depth)]
        if row == "epalm":
            cmd += ["--scoring-lm", scoring_lm]
            cmd += ["--scoring-lm-layers", str(args.scoring_lm_layers)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or ["?"])[-1][:60]
            rows.append([row, "-", "failed", why, "-", "-", "-", "-"])
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        share = r["text_share"]  # None: not separable (eP-ALM)
        rows.append(
            [
                row,
                r["batch"],
                f"{r['ms_step']:.0f}",
                "-" if share is None else f"{100 * share:.0f}%",
                f"{r['prepare_s']:.1f}",
                f"{r['peak_mib']:.0f}",
                f"{r['learned']:,}",
                METHODS[row][2],
            ]
        )
        scoring = r["scoring"] or scoring
    shutil.rmtree(tmp, ignore_errors=True)
    dev = torch.device(args.device)
    lm_note = (
        f"LLM methods: random Qwen2 LM, hidden {args.lm_hidden}, {args.lm_layers} layers "
        f"(llamp-deep: {3 * args.lm_layers}), 4 heads / 2 KV heads, a BPE of up to 4000 tokens trained on DTD's prompts, "
        "fp32; eP-ALM injects into layers "
        f"{args.lm_layers * 19 // 32}..{args.lm_layers - 2}"
    )
    text = print_table(
        "Training step per method (DTD's 47 classes, the papers' batch sizes)",
        [
            "method",
            "batch",
            "ms / step",
            "text encoder",
            "prepare s",
            "peak MiB",
            "learned params",
            "text side per step",
        ],
        rows,
        notes=[
            f"hardware: {hardware(dev)}",
            f"model: {args.model} (random weights), fp32 on CPU / fp16 autocast on CUDA, "
            f"synthetic views, {args.steps} timed steps after one warm-up",
            lm_note,
            "text encoder: its forward + backward share of a step (the frozen image features "
            "are computed without a graph; prompt token ids are built once per label set); "
            "eP-ALM: not separable (its text side is the LM pass conditioned on the image)",
            "prepare s: once per label set before training (LLaMP: self-descriptions and the "
            "LLM's K/V cache, which grows with depth; the step does not)",
            f"date: {today()}",
        ],
    )
    if scoring:
        prefix = scoring.pop("prefix")
        table = []
        for name, sc in scoring.items():
            table.append(
                [
                    f"{name} template, cached prefix",
                    sc["tokens"],
                    f"{sc['prefix_cache_s']:.3f}",
                    f"{sc['lm_cached_s']:.3f}",
                    "-",
                    "-",
                    f"{sc['max_abs_diff']:.0e}",
                ]
            )
            table.append(
                [
                    f"{name} template, every sequence whole",
                    sc["tokens"],
                    f"{sc['whole_sequences_s']:.3f}",
                    f"{sc['lm_whole_s']:.3f}",
                    f"{sc['whole_sequences_s'] / sc['prefix_cache_s']:.1f}x",
                    f"{sc['lm_whole_s'] / sc['lm_cached_s']:.1f}x",
                    "",
                ]
            )
        templates = "; ".join(f"{n}: '{sc['template']}'" for n, sc in scoring.items())
        text += "\n" + print_table(
            "eP-ALM scoring: one image, with and without the shared-prefix cache",
            ["arm", "text tokens", "s / image", "LM part s", "speed-up", "LM speed-up", "max diff"],
            table,
            notes=[
                f"{SCORING_VIEWS} views x 47 classes x 1 prompt, a random Qwen2 LM of hidden "
                f"{args.scoring_lm_hidden} and {args.scoring_lm_layers} layers (its BPE as "
                f"above), fp32, best of 2; every sequence: {prefix} tokens (question + soft prompt) and the "
                "visual slot, then the class text (median length given)",
                f"templates: {templates}",
                "s / image: the whole logits call, vision tower included (the same in both "
                "arms); LM part: the language model's scoring alone, which a real eP-ALM LM "
                "(OPT-2.7B: 32 layers, width 2560) makes nearly all of the cost",
                "the cache runs the shared part once per view; each class still runs its text "
                "from the first token that differs, so the saving is the shared part's share "
                "of a sequence: large for short templates, small for DTD's long one",
                "max diff: largest difference of a text's mean token log-probability between the "
                "two arms (a random LM's logits exp(mean log-prob) are all near 0)",
            ],
        )
    return text


if __name__ == "__main__":
    main()
