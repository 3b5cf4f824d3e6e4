"""The one fit loop every method trains with: a config, the loop, a result.

Each epoch visits the training images in an order drawn from ``(seed, epoch)``; every
image's augmented views are seeded by ``(seed, epoch, index)`` and a method's own draws
(AWT's description subset, say) by ``(seed, epoch, step)``. Nothing reads the global RNG,
so a run is reproduced exactly by its seed, and ``--resume`` (the state saved atomically
after every epoch) ends with the same weights as an uninterrupted run. The learning rate
is a function of the epoch (:mod:`awt_engine.training.schedule`), set at its start.

Axes: B images per step, V views per image.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from awt_engine._io import sha256_hex
from awt_engine._progress import progress_bar
from awt_engine.labelled import LabelledData
from awt_engine.methods.base import TrainableModel, TrainBatch
from awt_engine.training.checkpoint import CheckpointError, load_state, save_state
from awt_engine.training.data import DecodedCache
from awt_engine.training.schedule import Schedule, lr_at
from awt_engine.views import ViewConfig, make_views

OPTIMIZERS = ("sgd", "adamw")
_MASK = (1 << 63) - 1


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; :class:`~awt_engine.methods.base.MethodSpec` gives each
    method's paper defaults (``train_defaults``), every field can be overridden."""

    epochs: int
    lr: float
    batch_size: int
    optimizer: str = "sgd"  # CoOp, LAMM, AWT: SGD (Dassl); LLaMP, CLAMP, eP-ALM: AdamW
    momentum: float = 0.9  # Dassl's SGD default
    weight_decay: float = 5e-4  # Dassl configs of CoOp, LAMM and AWT
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    warmup_epochs: int = 1  # CoOp/LAMM: 1 constant epoch; AWT: 5 linear
    warmup: str = "constant"
    warmup_lr: float = 1e-5  # Dassl WARMUP_CONS_LR / WARMUP_MIN_LR
    min_lr: float = 0.0
    grad_clip: float | None = None  # CLAMP clips at 1.0
    seed: int = 1  # CoOp's seeds are 1, 2, 3
    precision: str | None = None  # None: fp32 on CPU, autocast fp16 on CUDA (CoOp's fp16)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        for name in ("lr", "warmup_lr", "min_lr", "weight_decay", "momentum"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.grad_clip is not None and not (
            math.isfinite(self.grad_clip) and self.grad_clip > 0
        ):
            raise ValueError(f"grad_clip must be a finite number > 0 or None, got {self.grad_clip}")
        if self.precision not in (None, "fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16, got {self.precision!r}")
        Schedule(self.lr, self.epochs, self.warmup_epochs, self.warmup, self.warmup_lr)

    @property
    def schedule(self) -> Schedule:
        return Schedule(
            self.lr, self.epochs, self.warmup_epochs, self.warmup, self.warmup_lr, self.min_lr
        )


@dataclass
class TrainResult:
    epochs: int
    steps: int
    losses: list[dict[str, float]] = field(default_factory=list)  # per epoch: mean terms
    seconds: float = 0.0
    resumed_from: int | None = None  # epochs already done when resumed

    @property
    def first_loss(self) -> float:
        return self.losses[0]["total"]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]["total"]


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (seed, epoch, index, ...), the same on every machine."""
    return int(sha256_hex("awt-engine/train", *map(str, parts))[:16], 16) & _MASK


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
) -> TrainResult:
    """Train ``model`` (already :meth:`prepare` d for ``data.classes``) on ``data``.

    ``state_file`` gets the resumable state after every epoch; with ``resume`` a state
    there for the same ``run_key`` (method, settings, data, backbone) is continued.
    ``after_epoch(epoch, mean_terms)`` is called after each epoch has been saved.
    """
    t0 = time.perf_counter()
    items = list(data.items)
    N, B = len(items), config.batch_size
    if N == 0:
        raise ValueError(f"{data.name}: no training images")
    # Dassl drops the last incomplete batch when there is at least one full batch
    steps_per_epoch = N // B if N >= B else 1
    views = model.training_view_config(view_config)
    optimizer = make_optimizer(model, config)
    images = DecodedCache(model.preprocess.size)
    result = TrainResult(epochs=config.epochs, steps=0)
    start_epoch = 0
    state_file = Path(state_file) if state_file is not None else None
    scaler = _grad_scaler(config.precision, model.device)
    if resume and state_file is not None and state_file.exists():
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

    device = model.device
    amp = _autocast(config.precision, device)
    labels_all = torch.tensor([it.label for it in items], dtype=torch.long)
    bar = progress_bar(steps_per_epoch * (config.epochs - start_epoch), progress, unit="step")
    model.train()
    try:
        for epoch in range(start_epoch, config.epochs):
            lr = lr_at(config.schedule, epoch)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * lr / config.lr
            order = torch.randperm(
                N, generator=torch.Generator().manual_seed(derive_seed(config.seed, "order", epoch))
            )
            sums: dict[str, float] = {}
            for step in range(steps_per_epoch):
                idx = order[step * B : (step + 1) * B].tolist()
                pix = images.get_many([items[i].path for i in idx], workers=workers)
                bad = [
                    (items[i].path, p) for i, p in zip(idx, pix, strict=True) if isinstance(p, str)
                ]
                if bad:
                    raise ValueError(f"training image {bad[0][0]} cannot be read: {bad[0][1]}")
                v = torch.stack(
                    [
                        make_views(
                            im,
                            model.preprocess,
                            views,
                            device=device,
                            seed=derive_seed(config.seed, "views", epoch, i),
                        )
                        for im, i in zip(pix, idx, strict=True)
                    ]
                )  # [B, V, 3, R, R]
                batch = TrainBatch(
                    v,
                    labels_all[idx].to(device),
                    epoch,
                    step,
                    torch.Generator().manual_seed(derive_seed(config.seed, "step", epoch, step)),
                )
                with amp:
                    out = model.training_loss(batch)
                if not torch.isfinite(out.total):
                    raise FloatingPointError(
                        f"{model.method}: the loss became {out.total.item()} at epoch {epoch + 1}, "
                        f"step {step + 1} (lr {lr:g}); lower --lr"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(out.total).backward()
                if config.grad_clip is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in optimizer.param_groups for p in g["params"]], config.grad_clip
                    )
                scaler.step(optimizer)
                scaler.update()
                terms = {"total": out.total.item(), **{k: t.item() for k, t in out.terms.items()}}
                for k, x in terms.items():
                    sums[k] = sums.get(k, 0.0) + x
                result.steps += 1
                bar.set_postfix(epoch=epoch + 1, loss=f"{terms['total']:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
            mean = {k: x / steps_per_epoch for k, x in sums.items()}
            result.losses.append(mean)
            if state_file is not None:
                save_state(
                    state_file,
                    model.learned_state(),
                    optimizer.state_dict(),
                    {
                        "run_key": run_key,
                        "epochs_done": epoch + 1,
                        "losses": result.losses,
                        "scaler": scaler.state_dict(),  # {} when no loss scaling
                    },
                )
            if after_epoch is not None:
                after_epoch(epoch, mean)
    finally:
        bar.close()
        model.eval()
    result.seconds = time.perf_counter() - t0
    return result


def _grad_scaler(precision: str | None, device: torch.device) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling (bf16 and fp32 need none)."""
    enabled = device.type == "cuda" and precision in (None, "fp16")
    return torch.amp.GradScaler("cuda", enabled=enabled)


def _autocast(precision: str | None, device: torch.device):
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def config_record(config) -> dict:
    return dataclasses.asdict(config)
