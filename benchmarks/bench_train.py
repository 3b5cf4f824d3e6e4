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

A before/after table (issue 21, item 5) times LAMM, CLAMP and CoOp with the caches that
removed their repeated per-step work and with that work restored from here (the library
unchanged), interleaved in one process; a last table fingerprints a written LM folder
cold (no cache) and warm (in memory, and on disk in a new process).

    uv run python benchmarks/bench_train.py [--model ViT-B-32] [--device cpu] [--steps 3]
    uv run python benchmarks/bench_train.py --only-before-after   # the last two tables
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import hardware, print_table, today

SCORING_VIEWS = 4  # eP-ALM's scoring table: one image, 4 views, DTD's 47 bare class names
SHORT_TEMPLATE = "a photo of a {}."  # CLIP's ImageNet-style template, beside DTD's long one

REPO = Path(__file__).resolve().parents[1]

# row -> (method, batch size or None for the method's default, what runs per step)
METHODS = {
    "coop": ("coop", 32, "C prompts (ctx + name), one forward + backward"),
    "lamm": ("lamm", 32, "C prompts (learned labels); original labels' once per label set"),
    "awt-adapter": ("awt-adapter", 16, "C x 8 prompts with adapters + the same without"),
    "llamp": ("llamp", None, "C prompts: LLM's last layer over cached K/V + CLIP text"),
    "llamp-deep": ("llamp", None, "the same, LLM 3x as deep"),
    "clamp": ("clamp", None, "B captions through the LM (LoRA); teacher: cached caption pool"),
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


def _setup(row: str, model: str, device: str, lm: str | None, lm_layers: int) -> SimpleNamespace:
    """One method prepared on DTD's labels, its optimizer, a synthetic batch and the fit
    loop's autocast: what both tables time."""
    from awt_engine.backbone import load_backbone
    from awt_engine.inputs.views import ViewConfig
    from awt_engine.labels import LabelSet
    from awt_engine.methods import get_method
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
    g = torch.Generator().manual_seed(0)
    return SimpleNamespace(
        method=method,
        spec=spec,
        bb=bb,
        net=net,
        labels=labels,
        cache=cache,
        prepare_s=prepare_s,
        defaults=defaults,
        B=B,
        views=views,
        opt=make_optimizer(net, defaults),
        x=torch.randn(B, views.n_views, 3, R, R, generator=g).to(bb.device),  # [B, V, 3, R, R]
        y=torch.randint(0, len(classes), (B,), generator=g).to(bb.device),  # [B]
        sync=torch.cuda.synchronize if bb.device.type == "cuda" else (lambda: None),
        amp=_autocast(None, bb.device),  # the fit loop's: fp16 autocast on CUDA, none on CPU
        scaler=torch.amp.GradScaler("cuda", enabled=bb.device.type == "cuda"),
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
    from awt_engine.labels import LabelSet
    from awt_engine.methods.base import TrainBatch

    s = _setup(row, model, device, lm, lm_layers)
    method, spec, bb, net, labels, opt = s.method, s.spec, s.bb, s.net, s.labels, s.opt
    x, y, B, views, defaults = s.x, s.y, s.B, s.views, s.defaults
    sync, amp, scaler = s.sync, s.amp, s.scaler

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
    # LAMM: the learned labels' pass only; its frozen original-label prompts are encoded
    # once per label set (not a per-step cost since efde731)
    # the training model's figures, before eP-ALM's scoring LM is loaded below
    learned = sum(t.numel() for t in net.learned_state().values())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    if bb.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    scoring = None
    if method == "epalm":
        from awt_engine.methods.epalm import scoring_cost

        del net, opt, s.net, s.opt  # the scoring LM is wider: scoring is where its size shows
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
    shutil.rmtree(s.cache, ignore_errors=True)
    return {
        "method": method,
        "batch": f"{B} x {views.n_views} views",
        "ms_step": 1000 * per_step,
        "prepare_s": s.prepare_s,
        "text_share": None if text != text else min(1.0, text / per_step),
        "scoring": scoring,
        "peak_mib": peak,
        "learned": learned,
        "epochs16": defaults.epochs,
        "lr": defaults.lr,
    }


# row of the before/after table -> how its "before" arm restores the per-step work
BEFORE = {
    "coop": "train_bare and label_key shadowed on the instance: train_labels.bare() and "
    "labels.key() at every call, as before a73f84e",
    "lamm": "the same, and original_embeddings = encode_original: the frozen original-label "
    "prompts encoded every step, as before efde731",
    "clamp": "teacher_text = backbone.encode_text(captions, grad=False): the step's B "
    "captions encoded by the teacher every step, as before 2e87da8",
}


def _arm(net, method: str, before: bool) -> None:
    """Set the arm: "before" shadows each caching method on the instance with the code it
    replaced (the library unchanged); "after" removes the shadows."""
    for name in ("train_bare", "label_key", "original_embeddings", "teacher_text"):
        net.__dict__.pop(name, None)
    if not before:
        return
    if method in ("coop", "lamm"):
        net.__dict__["train_bare"] = lambda: net.train_labels.bare()
        net.__dict__["label_key"] = lambda labels: labels.key()
    if method == "lamm":
        net.__dict__["original_embeddings"] = net.encode_original
    if method == "clamp":
        net.__dict__["teacher_text"] = lambda c: net.backbone.encode_text(c, grad=False)


def run_pair(row: str, model: str, device: str, steps: int, lm=None, lm_layers=0) -> dict:
    """Both arms in one process on one batch, interleaved step by step from the same state
    (parameters, optimizer, scaler restored before each arm): ms per step, the first
    "after" step (it fills the caches) and the largest loss and gradient differences."""
    from awt_engine.methods.base import TrainBatch

    s = _setup(row, model, device, lm, lm_layers)
    net, opt, scaler = s.net, s.opt, s.scaler
    learned = [p for p in net.parameters() if p.requires_grad]

    def step(i: int, before: bool) -> tuple[float, float, list]:
        _arm(net, s.method, before)
        torch.manual_seed(i)
        t0 = time.perf_counter()
        with s.amp:
            out = net.training_loss(TrainBatch(s.x, s.y, 0, i, torch.Generator().manual_seed(i)))
        opt.zero_grad(set_to_none=True)
        scaler.scale(out.total).backward()
        scaler.step(opt)
        scaler.update()
        s.sync()
        dt = time.perf_counter() - t0
        return dt, float(out.total), [p.grad.detach().clone() for p in learned]

    net.train()
    step(0, True)  # warm-up (the caches stay empty: the "before" arm never fills them)
    times = {True: [], False: []}
    loss_diff = grad_diff = 0.0
    for i in range(1, steps + 2):  # step 1: the "after" arm fills its caches
        saved = [p.detach().clone() for p in learned]
        state = copy.deepcopy((opt.state_dict(), scaler.state_dict()))
        res = {}
        for before in (False, True) if i % 2 else (True, False):
            with torch.no_grad():
                for p, v in zip(learned, saved, strict=True):
                    p.copy_(v)
            opt.load_state_dict(copy.deepcopy(state[0]))
            scaler.load_state_dict(state[1])
            res[before] = step(i, before)
            times[before].append(res[before][0])
        loss_diff = max(loss_diff, abs(res[True][1] - res[False][1]))
        for a, b in zip(res[True][2], res[False][2], strict=True):
            grad_diff = max(grad_diff, float((a.float() - b.float()).abs().max()))
    shutil.rmtree(s.cache, ignore_errors=True)
    return {
        "batch": f"{s.B} x {s.views.n_views} views",
        "after_ms": 1000 * statistics.median(times[False][1:]),
        "before_ms": 1000 * statistics.median(times[True][1:]),
        "fill_ms": 1000 * times[False][0],
        "loss_diff": loss_diff,
        "grad_diff": grad_diff,
    }


def write_weights(folder: Path, mb: int, shards: int = 3) -> int:
    """A random LM's folder: config.json and ``shards`` safetensors files of random fp16
    weights, ``mb`` MB in all; returns its size in bytes."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "bench": mb}))
    g = torch.Generator().manual_seed(0)
    per = mb * 10**6 // shards // 2 // 4096  # rows of 4096 fp16 per shard
    for k in range(shards):
        layers = {
            f"model.layers.{k}.w{j}": torch.randn(per // 4, 4096, generator=g) for j in range(4)
        }
        save_file(
            {n: t.half() for n, t in layers.items()},
            folder / f"model-{k + 1:05d}-of-{shards:05d}.safetensors",
        )
    return sum(f.stat().st_size for f in folder.iterdir())


def run_fingerprint(folder: str) -> dict:
    """Child process: llm_fingerprint of ``folder`` twice (cache root: $AWT_ENGINE_CACHE),
    seconds and MB read by the hashing each time."""
    from awt_engine.models import llm

    read = [0]
    hash_file = llm.file_sha256

    def counted(path):
        read[0] += Path(path).stat().st_size
        return hash_file(path)

    llm.file_sha256 = counted  # counts the bytes hashed; the library's code unchanged
    out = {}
    for call in ("first", "second"):
        read[0] = 0
        t0 = time.perf_counter()
        out[f"{call}_fp"] = llm.llm_fingerprint(folder, None)
        out[f"{call}_s"] = time.perf_counter() - t0
        out[f"{call}_mb"] = read[0] / 1e6
    return out


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
    ap.add_argument(
        "--before-after", default=",".join(BEFORE), help="rows of the before/after table ('': none)"
    )
    ap.add_argument("--only-before-after", action="store_true", help="skip the per-method tables")
    ap.add_argument("--pair-steps", type=int, default=3, help="before/after: timed steps per arm")
    ap.add_argument("--fingerprint-mb", type=int, default=300, help="the fingerprinted folder")
    for hidden in ("--one", "--pair", "--fingerprint", "--scoring-lm", "--lm"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one or args.pair or args.fingerprint:  # child process: JSON on stdout
        if args.fingerprint:
            r = run_fingerprint(args.fingerprint)
        elif args.pair:
            r = run_pair(args.pair, args.model, args.device, args.steps, args.lm, args.lm_layers)
        else:
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
    chosen = [] if args.only_before_after else args.methods.split(",")
    pairs = [r for r in args.before_after.split(",") if r]
    unknown = [m for m in chosen if m not in METHODS] + [m for m in pairs if m not in BEFORE]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {sorted(METHODS)} ({sorted(BEFORE)})")
    load = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-lm-"))
    lms = {}
    for row in chosen + pairs:  # each LM depth the chosen rows use, built once
        if METHODS[row][0] in LLM_METHODS:
            depth = _lm_depth(row, args.lm_layers)
            if depth not in lms:
                lms[depth] = build_lm(tmp / f"lm{depth}", args.lm_hidden, depth)
    text = ""
    if chosen:
        scoring_lm = None
        if "epalm" in chosen:
            scoring_lm = build_lm(tmp / "scoring", args.scoring_lm_hidden, args.scoring_lm_layers)
        text += _method_tables(args, chosen, lms, scoring_lm, load)
    if pairs:
        text += "\n" * bool(text) + _before_after(args, pairs, lms, tmp, load)
    shutil.rmtree(tmp, ignore_errors=True)
    return text


def _child(args, flag: str, row: str, lms: dict) -> tuple[dict | None, str]:
    """Run one row in its own process: (its JSON, "") or (None, why it failed)."""
    cmd = [sys.executable, __file__, flag, row, "--model", args.model]
    steps = args.pair_steps if flag == "--pair" else args.steps
    cmd += ["--device", args.device, "--steps", str(steps)]
    if METHODS[row][0] in LLM_METHODS:
        depth = _lm_depth(row, args.lm_layers)
        cmd += ["--lm", lms[depth], "--lm-layers", str(depth)]
    if flag == "--one" and row == "epalm":
        cmd += ["--scoring-lm", args.scoring_lm]
        cmd += ["--scoring-lm-layers", str(args.scoring_lm_layers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None, (proc.stderr.strip().splitlines() or ["?"])[-1][:60]
    return json.loads(proc.stdout.strip().splitlines()[-1]), ""


def _load_note(start: float) -> str:
    """The load before this run began (others' work; the end figure includes this run's)."""
    now, cores = os.getloadavg()[0], os.cpu_count()
    shared = "; other jobs shared the machine: figures noisy" if start > cores / 2 else ""
    return f"load average (1 min) at start / end: {start:.1f} / {now:.1f} on {cores} cores{shared}"


def _method_tables(args, chosen: list[str], lms: dict, scoring_lm, load: float) -> str:
    args.scoring_lm = scoring_lm
    rows, scoring = [], None
    for row in chosen:
        r, why = _child(args, "--one", row, lms)
        if r is None:
            rows.append([row, "-", "failed", why, "-", "-", "-", "-"])
            continue
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
            "eP-ALM: not separable (its text side is the LM pass conditioned on the image); "
            "LAMM: its learned labels' pass (the frozen original-label prompts are encoded "
            "once per label set, in the first step)",
            "prepare s: once per label set before training (LLaMP: self-descriptions and the "
            "LLM's K/V cache, which grows with depth; the step does not)",
            _load_note(load),
            f"date: {today()}",
        ],
    )
    if scoring:
        text += "\n" + _scoring_table(args, scoring)
    return text


def _scoring_table(args, scoring: dict) -> str:
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
    return print_table(
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


def _before_after(args, pairs: list[str], lms: dict, tmp: Path, load: float) -> str:
    rows = []
    for row in pairs:
        r, why = _child(args, "--pair", row, lms)
        if r is None:
            rows.append([row, "-", "failed", why, "-", "-", "-", "-"])
            continue
        rows.append(
            [
                row,
                r["batch"],
                f"{r['before_ms']:.0f}",
                f"{r['after_ms']:.0f}",
                f"{r['before_ms'] / r['after_ms']:.2f}x",
                f"{r['fill_ms']:.0f}",
                f"{r['loss_diff']:.1e}",
                f"{r['grad_diff']:.1e}",
            ]
        )
    arms = [f"{row}: {BEFORE[row]}" for row in pairs]
    text = print_table(
        "Training step before / after removing the repeated work (issue 21, item 5)",
        [
            "method",
            "batch",
            "before ms",
            "after ms",
            "speed-up",
            "1st after ms",
            "loss diff",
            "grad diff",
        ],
        rows,
        notes=[
            f"hardware: {hardware(torch.device(args.device))}; model: {args.model} (random "
            f"weights), the per-method table's batches, labels and LM (hidden {args.lm_hidden}, "
            f"{args.lm_layers} layers)",
            "after: the library as it is (the caches on); before: the per-step work restored "
            "from this script, the library unchanged. " + "; ".join(arms),
            f"both arms in one process on one batch, interleaved step by step (order alternating) "
            f"from the same state (parameters, optimizer and scaler restored before each arm): "
            f"one warm-up step, then {args.pair_steps + 1} steps per arm; ms: median of the "
            f"last {args.pair_steps}",
            "1st after ms: the first step with the caches on (it fills them: LAMM encodes the "
            "original-label prompts, CLAMP its teacher's whole caption pool, C x P texts)",
            "loss diff, grad diff: largest absolute difference between the arms over all steps "
            "(total loss; every learned parameter's gradient)",
            _load_note(load),
            f"date: {today()}",
        ]
        + [
            "--only-before-after: the per-method tables were not rerun (a report that keeps an "
            "earlier run's may show figures from before these changes)"
        ]
        * args.only_before_after,
    )
    return text + "\n" + _fingerprint_table(args, tmp, load)


def _fingerprint_table(args, tmp: Path, load: float) -> str:
    """The LLM fingerprint of a written folder: cold, again in-process, in a new process."""
    from awt_engine._io import file_sha256

    folder = tmp / "fingerprinted-lm"
    size = write_weights(folder, args.fingerprint_mb)
    env = {**os.environ, "AWT_ENGINE_CACHE": str(tmp / "fresh-cache")}
    runs = []
    for _ in range(2):  # process 1: an empty cache folder; process 2: the record it wrote
        cmd = [sys.executable, __file__, "--fingerprint", str(folder)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            sys.exit(f"fingerprint child failed: {proc.stderr[-2000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    h = hashlib.sha256()  # the value as the code before 4e4fb95 computed it: every file hashed
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f"{f.name}\0{file_sha256(f)}\0".encode())
    old = f"llm|sha256:{h.hexdigest()}"
    arms = [
        ("cold: new process, empty cache folder (before 4e4fb95: every call)", runs[0], "first"),
        ("warm: the same process, second call (memory)", runs[0], "second"),
        ("warm: a new process, the cache folder's record (disk)", runs[1], "first"),
    ]
    rows = [
        [name, f"{r[k + '_mb']:.0f}", f"{r[k + '_s']:.3f}", "yes" if r[k + "_fp"] == old else "NO"]
        for name, r, k in arms
    ]
    return print_table(
        "LLM fingerprint of a model folder: cold vs warm",
        ["arm", "MB hashed", "s", "= hashing every file"],
        rows,
        notes=[
            f"folder: config.json and 3 safetensors shards of random fp16 weights, "
            f"{size / 1e6:.0f} MB (--fingerprint-mb), written just before: the cold arm reads "
            "them from the OS page cache, so its seconds are SHA-256's rate, a lower bound for "
            "weights read from disk",
            "each arm: llm_fingerprint(folder) in a child process with $AWT_ENGINE_CACHE set "
            "to a fresh folder; MB hashed counted by wrapping llm.file_sha256 in the child",
            "= hashing every file: the value equals the one computed here the way the code "
            "before 4e4fb95 did (every file hashed)",
            _load_note(load),
        ],
    )


if __name__ == "__main__":
    main()
