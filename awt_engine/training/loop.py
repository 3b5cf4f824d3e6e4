"""The one fit loop every method trains with: a config, the loop, a result.

Each epoch visits the training images in an order drawn from ``(seed, epoch)``; every
image's augmented views are seeded by ``(seed, epoch, index)`` and a method's own draws
(AWT's description subset, say) by ``(seed, epoch, step)``. Nothing reads the global RNG,
so a run is reproduced by its seed, and ``--resume`` (the state saved atomically after
every epoch) ends with the same weights as an uninterrupted run: bit for bit on the CPU,
equal up to rounding on CUDA (its attention backward adds atomically, in any order)
unless ``deterministic`` is set (``torch.use_deterministic_algorithms`` and cuBLAS's
fixed workspace, :func:`deterministic_env`). The learning rate is a function of the epoch
and step (:mod:`awt_engine.methods.train_config`), set before every step.

A loss or a learned tensor that stops being finite ends the run with a
:class:`FloatingPointError` (checked at every step, and after each epoch's last update
before its state is saved), so the state kept beside the output is always the last good
one and no checkpoint ever holds a non-finite number.

Axes: B images per step, V views per image.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from awt_engine._io import sha256_hex
from awt_engine._progress import progress_bar
from awt_engine.checkpoints import CheckpointError, load_state, save_state
from awt_engine.inputs import DecodedCache, Failure, ViewConfig, view_batches
from awt_engine.labelled import LabelledData
from awt_engine.methods.base import TrainableModel, TrainBatch
from awt_engine.methods.train_config import TrainConfig, lr_at

_MASK = (1 << 63) - 1


@dataclass
class TrainResult:
    epochs: int
    steps: int
    losses: list[dict[str, float]] = field(default_factory=list)  # per epoch: mean terms
    seconds: float = 0.0
    resumed_from: int | None = None  # epochs already done when resumed
    precision: str = "fp32"  # what the steps computed in (autocast_precision)

    @property
    def first_loss(self) -> float:
        return self.losses[0]["total"]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]["total"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (seed, epoch, index, ...), the same on every machine."""
    return int(sha256_hex("awt-engine/train", *map(str, parts))[:16], 16) & _MASK


def epoch_steps(n_images: int, batch_size: int) -> int:
    """Steps per epoch: Dassl drops the last incomplete batch when there is a full one."""
    return n_images // batch_size if n_images >= batch_size else 1


def make_optimizer(model: TrainableModel, config: TrainConfig) -> torch.optim.Optimizer:
    groups = model.param_groups(config.lr)
    if not any(g["params"] for g in groups):
        raise ValueError(f"{model.method}: nothing to train (no parameter requires gradients)")
    for g in groups:  # each group's base lr; the schedule scales them per epoch
        g.setdefault("lr", config.lr)
        g["base_lr"] = g["lr"]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )


def fit(
    model: TrainableModel,
    data: LabelledData,
    config: TrainConfig,
    *,
    view_config: ViewConfig = ViewConfig(),
    state_file: str | Path | None = None,
    resume: bool = False,
    run_key: str = "",
    progress: bool = False,
    workers: int = 2,
    after_epoch: Callable[[int, dict[str, float]], None] | None = None,
    after_step: Callable[[int, int, dict[str, float], float, int], None] | None = None,
) -> TrainResult:
    """Train ``model`` (already :meth:`prepare` d for ``data.classes``) on ``data``.

    ``state_file`` gets the resumable state after every epoch; with ``resume`` a state
    there for the same ``run_key`` (method, settings, data, backbone) is continued.
    ``after_epoch(epoch, mean_terms)`` is called after each epoch has been saved, and
    ``after_step(epoch, step, terms, lr, images)`` after each step (0-based counts; the
    step's loss terms, learning rate and number of images): what
    :class:`~awt_engine.training.watch.TrainLog` watches the run with.
    FloatingPointError (saying "lower --lr") when the loss or a learned tensor stops
    being finite; the state of the last finished epoch stays in ``state_file``.
    """
    t0 = time.perf_counter()
    items = list(data.items)
    N, B = len(items), config.batch_size
    if N == 0:
        raise ValueError(f"{data.name}: no training images")
    steps_per_epoch = epoch_steps(N, B)
    views = model.training_view_config(view_config)
    optimizer = make_optimizer(model, config)
    images = DecodedCache(model.preprocess.size)
    device = model.device
    precision = autocast_precision(config.precision, device, model)
    result = TrainResult(epochs=config.epochs, steps=0, precision=precision)
    state_file = Path(state_file) if state_file is not None else None
    scaler = _grad_scaler(precision, device)
    start_epoch = 0
    if resume and state_file is not None and state_file.exists():
        start_epoch = _resume(state_file, run_key, model, optimizer, scaler, result)

    amp = _autocast(precision, device)
    labels_all = torch.tensor([it.label for it in items], dtype=torch.long)
    bar = progress_bar(steps_per_epoch * (config.epochs - start_epoch), progress, unit="step")
    diverged = _Divergence(model.method, state_file, result)
    make_batch = partial(
        _batch, model, items, images=images, labels_all=labels_all, views=views,
        seed=config.seed, workers=workers,
    )  # fmt: skip
    model.train()
    try:
        with deterministic_mode(config.deterministic):
            for epoch in range(start_epoch, config.epochs):
                seed = derive_seed(config.seed, "order", epoch)
                order = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
                sums: dict[str, float] = {}
                for step in range(steps_per_epoch):
                    lr = lr_at(config.schedule, epoch, step)
                    for g in optimizer.param_groups:
                        if g.get("scheduled", True):  # an unscheduled group keeps its rate
                            g["lr"] = g["base_lr"] * lr / config.lr
                    idx = order[step * B : (step + 1) * B].tolist()
                    batch = make_batch(idx=idx, epoch=epoch, step=step)
                    terms = _step(model, batch, amp, optimizer, scaler, config, diverged, lr)
                    for k, x in terms.items():
                        sums[k] = sums.get(k, 0.0) + x
                    result.steps += 1
                    bar.set_postfix(epoch=epoch + 1, loss=f"{terms['total']:.4f}", lr=f"{lr:.2e}")
                    bar.update(1)
                    if after_step is not None:
                        after_step(epoch, step, terms, lr, len(idx))
                problem = _after_update(model, batch, amp)
                if problem is not None:
                    raise diverged(problem, epoch, steps_per_epoch - 1, lr)
                mean = {k: x / steps_per_epoch for k, x in sums.items()}
                result.losses.append(mean)
                if state_file is not None:
                    meta = {"run_key": run_key, "epochs_done": epoch + 1, "losses": result.losses}
                    meta["scaler"] = scaler.state_dict()  # {} when no loss scaling
                    save_state(state_file, model.learned_state(), optimizer.state_dict(), meta)
                if after_epoch is not None:
                    after_epoch(epoch, mean)
    finally:
        bar.close()
        model.eval()
    result.seconds = time.perf_counter() - t0
    return result


def _step(model, batch, amp, optimizer, scaler, config, diverged, lr) -> dict[str, float]:
    """One optimisation step on ``batch``: its loss terms (``total`` first), checked finite
    before the update (else ``diverged``'s FloatingPointError)."""
    with amp:
        out = model.training_loss(batch)
    total = out.total.item()
    if not math.isfinite(total):
        raise diverged(f"the loss became {total}", batch.epoch, batch.step, lr)
    _update(out.total, optimizer, scaler, config.grad_clip)
    return {"total": total, **{k: t.item() for k, t in out.terms.items()}}


def _resume(state_file: Path, run_key: str, model, optimizer, scaler, result) -> int:
    """Load the saved run into ``model``, ``optimizer``, ``scaler`` and ``result``; the
    number of epochs it had finished."""
    meta, learned, opt_state = load_state(state_file)
    if meta.get("run_key") != run_key:
        raise CheckpointError(
            f"{state_file} belongs to another run (other method, settings, data or "
            "backbone); delete it, or run without --resume to start afresh"
        )
    model.load_learned(learned)
    optimizer.load_state_dict(opt_state)
    if meta.get("scaler"):  # the loss scale the run had reached (fp16 on CUDA)
        scaler.load_state_dict(meta["scaler"])
    start_epoch = int(meta["epochs_done"])
    result.losses = list(meta["losses"])
    result.resumed_from = start_epoch
    return start_epoch


def _batch(model, items, idx, images, labels_all, views, seed, epoch, step, workers) -> TrainBatch:
    """The step's views ([B, V, 3, R, R], each image's seeded by (seed, epoch, index)),
    from the one input pipeline (``view_batches`` over the decoded-image cache ``images``),
    labels and generator; ValueError naming an image that cannot be read."""
    device = model.device
    got = []
    for item in view_batches(
        [items[i].path for i in idx],
        model.preprocess,
        views,
        batch_size=len(idx),
        workers=workers,
        device=device,
        seed_for=lambda k: derive_seed(seed, "views", epoch, idx[k]),
        cache=images,
    ):
        if isinstance(item, Failure):
            raise ValueError(f"training image {item.source} cannot be read: {item.reason}")
        got.append(item)
    (batch,) = got  # one ViewBatch: the step's B images, in the step's order
    return TrainBatch(
        batch.views,
        labels_all[idx].to(device),
        epoch,
        step,
        torch.Generator().manual_seed(derive_seed(seed, "step", epoch, step)),
    )


def _update(loss: torch.Tensor, optimizer, scaler, grad_clip: float | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], grad_clip
        )
    scaler.step(optimizer)
    scaler.update()


def _after_update(model: TrainableModel, batch: TrainBatch, amp) -> str | None:
    """What is wrong after an epoch's last update, or None: a learned tensor that is not
    finite, or a loss that is not (the loss is otherwise checked only before updates).
    The loss is the last batch's again, in eval mode without gradients (no dropout, no
    RNG draw: the run goes on exactly as without the check)."""
    for name, t in model.learned_state().items():
        if not bool(torch.isfinite(t).all()):
            return f"the learned tensor {name!r} stopped being finite"
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), amp:
            total = model.training_loss(batch).total.item()
    finally:
        model.train()
    if not math.isfinite(total):
        return f"the loss after the epoch's updates is {total}"
    return None


class _Divergence:
    """Builds the FloatingPointError of a diverged run, naming where and the kept state."""

    def __init__(self, method: str, state_file: Path | None, result: TrainResult):
        self.method, self.state_file, self.result = method, state_file, result

    def __call__(self, what: str, epoch: int, step: int, lr: float) -> FloatingPointError:
        done = len(self.result.losses)
        kept = ""
        if self.state_file is not None and done and self.state_file.exists():
            kept = f" (the state after epoch {done} is kept in {self.state_file})"
        return FloatingPointError(
            f"{self.method}: {what} at epoch {epoch + 1}, step {step + 1} (lr {lr:g}); "
            f"lower --lr{kept}"
        )


# --------------------------------------------------------------------------- precision


def frozen_llm_dtype(model) -> torch.dtype | None:
    """The weight dtype of a method's frozen LLM (CLAMP's ``lm``; eP-ALM's and LLaMP's
    ``llm``, a loaded model with ``.model``), or None for a method without one."""
    for attr in ("lm", "llm"):
        lm = getattr(model, attr, None)
        if lm is not None and not isinstance(lm, torch.nn.Module):
            lm = getattr(lm, "model", None)
        if not isinstance(lm, torch.nn.Module):
            continue
        embed = getattr(lm, "get_input_embeddings", None)
        weight = getattr(embed(), "weight", None) if callable(embed) else None
        if isinstance(weight, torch.Tensor):
            return weight.dtype
        return next((p.dtype for p in lm.parameters() if p.is_floating_point()), None)
    return None


def autocast_precision(precision: str | None, device: torch.device, model=None) -> str:
    """What the training steps compute in: ``fp32``, ``fp16`` or ``bf16``.

    Off CUDA, fp32 (CPU and MPS autocast are slow or incomplete). On CUDA the configured
    precision, None meaning fp16 (CoOp's); but bf16 wherever ``model``'s frozen LLM has
    bf16 weights: such an LLM's activations exceed fp16's range (65504) and an fp16
    autocast over it ends in a NaN loss, while bf16 has float32's range.
    """
    if device.type != "cuda" or precision == "fp32":
        return "fp32"
    if precision == "bf16":
        return "bf16"
    if frozen_llm_dtype(model) == torch.bfloat16:
        if precision == "fp16":
            warnings.warn(
                f"{getattr(model, 'method', 'the method')}: the LLM's weights are bf16, which "
                "overflow under fp16; training autocasts to bf16 instead",
                stacklevel=2,
            )
        return "bf16"
    return "fp16"


def _grad_scaler(precision: str | None, device: torch.device) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling (bf16 and fp32 need none)."""
    enabled = device.type == "cuda" and precision in (None, "fp16")
    return torch.amp.GradScaler("cuda", enabled=enabled)


def _autocast(precision: str | None, device: torch.device):
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


# --------------------------------------------------------------------------- determinism

# cuBLAS's deterministic workspace setting (NVIDIA's cuBLAS docs, "Results reproducibility";
# ":16:8" also works, slower); read when cuBLAS starts, so it is set before CUDA is.
CUBLAS_WORKSPACE = ":4096:8"


def deterministic_env() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS (a value already set to a
    deterministic one is kept). Call it before anything starts CUDA: ``train`` does,
    before it loads a model."""
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") in (CUBLAS_WORKSPACE, ":16:8"):
        return
    if torch.cuda.is_initialized():
        warnings.warn(
            "--deterministic: CUDA had started before CUBLAS_WORKSPACE_CONFIG was set; "
            f"for a deterministic cuBLAS export CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} "
            "before starting Python",
            stacklevel=2,
        )
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE


@contextmanager
def deterministic_mode(on: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms(True)`` inside (when ``on``), the caller's
    setting restored after: an op without a deterministic kernel is then a RuntimeError."""
    if not on:
        yield
        return
    deterministic_env()
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def config_record(config) -> dict:
    return dataclasses.asdict(config)
