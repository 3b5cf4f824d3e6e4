"""Watching a training run: a line per epoch on stderr, a JSONL log, TensorBoard events.

:class:`RunWatch` holds a run's :class:`TrainLog` and its held-out accuracy
(:mod:`~awt_engine.training.held_out`, scored every N epochs); :func:`check_watching`
checks the options before anything loads. :class:`TrainLog` is fed by the fit loop's
callbacks (``after_step(epoch, step, terms, lr, images)`` after every optimisation step,
then :meth:`TrainLog.epoch` once the epoch is saved and, when due, validated) and writes:

* a line per epoch on stderr, terminal or not, as Dassl's trainers print
  (``epoch [3/50] step 48/800 loss 1.2345 (ce 1.1, ...) lr 2.00e-03 36.5 img/s
  elapsed 0:01:23 eta 0:10:00 val 81.25%``); on a terminal it goes above the progress bar;
* the JSONL log beside the checkpoint (:func:`log_path`: ``<output stem>.log.jsonl``): a
  ``run`` record, a ``step`` record every ``log_every`` steps (every step when an epoch has
  fewer, as Dassl's ``print_freq``) and an ``epoch`` record per epoch (mean loss terms,
  lr, images/s, elapsed, ETA and ``val_accuracy`` when computed). Each record is one
  flushed line; a number that is not finite is written as ``null``. A resumed run keeps
  the records of the epochs its state had finished and drops the rest (written again as
  the run goes on), so its log is the uninterrupted run's;
* optionally TensorBoard scalars (``loss/<term>``, ``lr``, ``images_per_s``,
  ``val/accuracy``), by global step (:func:`tensorboard_writer`).

Epochs and steps are counted from 1 in everything written; ``step`` is the global step.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

TB_HINT = "pip install 'awt-engine[tensorboard]' (or uv sync --extra tensorboard)"
# CoOp's Dassl configs print every 5 batches (TRAIN.PRINT_FREQ: 5)
LOG_EVERY = 5


def log_path(output: str | os.PathLike) -> Path:
    """The JSONL log of the run writing checkpoint ``output``: ``coop.safetensors`` ->
    ``coop.log.jsonl``."""
    return Path(output).with_suffix(".log.jsonl")


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL log, in order; a line that is not a JSON object (a write cut
    short) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def finite(x: Any) -> Any:
    """``x`` with every non-finite float (NaN, inf) replaced by None, through dicts and lists."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    s = round(max(seconds, 0.0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def tensorboard_writer(folder: str | os.PathLike):
    """torch's ``SummaryWriter`` on ``folder``; ImportError with the install hint when the
    ``tensorboard`` package is missing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(f"--tensorboard needs the tensorboard package: {TB_HINT}") from exc
    return SummaryWriter(log_dir=str(folder))


class TrainLog:
    """The run's log: stderr lines (``lines``), the JSONL file (``path``, None: none) and a
    TensorBoard writer (``tensorboard``, None: none).

    ``epochs``: the run's K; ``steps_per_epoch``: the fit loop's; ``resume``: keep the
    records of the epochs a resumed state finished (known at the first step: epochs
    before it are done), else start the file afresh. ``run`` goes into the ``run`` record.
    """

    def __init__(
        self,
        path: str | os.PathLike | None,
        *,
        epochs: int,
        steps_per_epoch: int,
        log_every: int = LOG_EVERY,
        lines: bool = True,
        resume: bool = False,
        tensorboard=None,
        run: dict[str, Any] | None = None,
    ):
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be a whole number >= 1, got {log_every!r}")
        self.path = Path(path) if path is not None else None
        self.epochs, self.steps_per_epoch, self.log_every = epochs, steps_per_epoch, log_every
        self.lines, self.resume, self.tb = lines, resume, tensorboard
        self.run = {"epochs": epochs, "steps_per_epoch": steps_per_epoch, **(run or {})}
        self.kept: list[dict[str, Any]] = []  # records of epochs done before a resume
        self._t0 = time.perf_counter()
        self._epoch_t0 = self._t0
        self._first_epoch: int | None = None  # 0-based, the first this process trains
        self._images = 0  # images this epoch
        self._lr = float("nan")
        self._step = 0  # global steps done (1-based count)
        self._step_t = self._t0  # when the last step ended
        self._records_since_start: list[dict[str, Any]] = []

    # -- the fit loop's callbacks ---------------------------------------------------------

    def after_step(self, epoch: int, step: int, terms: dict[str, float], lr: float, images: int):
        """After step ``step`` (0-based, within 0-based ``epoch``) of ``images`` images."""
        if self._first_epoch is None:
            self._start(epoch)
        self._images += images
        self._lr = lr
        self._step_t = time.perf_counter()
        self._step = epoch * self.steps_per_epoch + step + 1
        S, N = self.steps_per_epoch, self.log_every
        if (step + 1) % N == 0 or S < N:
            rec = {"event": "step", "epoch": epoch + 1, "step": self._step, "loss": terms}
            rec.update(lr=lr, images_per_s=self._rate(), elapsed_s=self._elapsed())
            self._write(rec)
        if self.tb is not None:
            for k, x in terms.items():
                self.tb.add_scalar(f"loss/{k}", x, self._step)
            self.tb.add_scalar("lr", lr, self._step)

    def epoch(self, epoch: int, mean: dict[str, float], val_accuracy: float | None = None):
        """After 0-based ``epoch`` (its mean loss terms; its held-out top-1 when computed):
        the stderr line and the ``epoch`` record."""
        if self._first_epoch is None:
            self._start(epoch)
        elapsed = self._elapsed()
        done_here = epoch + 1 - self._first_epoch
        eta = elapsed / done_here * (self.epochs - epoch - 1)
        rec = {"event": "epoch", "epoch": epoch + 1, "step": self._step, "loss": mean}
        rec.update(lr=self._lr, images_per_s=self._rate(), elapsed_s=elapsed, eta_s=eta)
        if val_accuracy is not None:
            rec["val_accuracy"] = val_accuracy
        self._write(rec)
        if self.tb is not None:
            self.tb.add_scalar("images_per_s", self._rate(), self._step)
            if val_accuracy is not None:
                self.tb.add_scalar("val/accuracy", val_accuracy, self._step)
            self.tb.flush()
        if self.lines:
            self._say(epoch_line(rec, self.epochs, self.steps_per_epoch))
        self._images, self._epoch_t0 = 0, time.perf_counter()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()

    def val_history(self) -> list[dict[str, Any]]:
        """[{epoch, accuracy}] of the kept and written epoch records that carry one."""
        recs = self.kept + self._records_since_start
        return [
            {"epoch": r["epoch"], "accuracy": r["val_accuracy"]}
            for r in recs
            if r.get("event") == "epoch" and r.get("val_accuracy") is not None
        ]

    # -- internals ------------------------------------------------------------------------

    def _start(self, epoch: int) -> None:
        """Open the file at the first callback: keep the records of the ``epoch`` epochs done
        (resume) or none, rewritten atomically, then append."""
        self._first_epoch = epoch  # the epoch's clock runs from the log's making (fit's start)
        if self.path is None:
            return
        old = read_log(self.path) if self.resume and self.path.exists() else []
        done = [r for r in old if r.get("event") != "run" and _epoch_of(r) <= epoch]
        self.kept = [{"event": "run", **self.run}, *done]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(_line(r) for r in self.kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def _write(self, rec: dict[str, Any]) -> None:
        rec = finite(rec)
        self._records_since_start.append(rec)
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_line(rec))
            f.flush()

    def _elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def _rate(self) -> float:
        """Images per second of this epoch's steps so far (its validation not counted)."""
        dt = self._step_t - self._epoch_t0
        return self._images / dt if dt > 0 else float("nan")

    @staticmethod
    def _say(line: str) -> None:
        """One line on stderr (above a progress bar, when one is drawn)."""
        from tqdm.auto import tqdm

        tqdm.write(line, file=sys.stderr)


def epoch_line(rec: dict[str, Any], epochs: int, steps_per_epoch: int) -> str:
    """The stderr line of an ``epoch`` record."""
    loss = dict(rec["loss"])
    total = loss.pop("total", None)
    parts = [f"epoch [{rec['epoch']}/{epochs}]", f"step {rec['step']}/{epochs * steps_per_epoch}"]
    parts.append(f"loss {_num(total, '.4f')}")
    if loss:
        parts.append("(" + ", ".join(f"{k} {_num(x, '.4f')}" for k, x in loss.items()) + ")")
    parts.append(f"lr {_num(rec.get('lr'), '.3e')}")
    parts.append(f"{_num(rec.get('images_per_s'), '.1f')} img/s")
    parts.append(f"elapsed {clock(rec['elapsed_s'])} eta {clock(rec['eta_s'])}")
    if rec.get("val_accuracy") is not None:
        parts.append(f"val {100 * rec['val_accuracy']:.2f}%")
    return " ".join(parts)


def _num(x: Any, fmt: str) -> str:
    return "nan" if x is None else format(x, fmt)


def _epoch_of(rec: dict[str, Any]) -> int:
    e = rec.get("epoch")
    return e if isinstance(e, int) else 1 << 30  # unreadable: dropped on resume


def _line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, allow_nan=False, separators=(",", ":")) + "\n"


def check_watching(log_every, val_every, plot: bool, tensorboard) -> None:
    """The watching options checked, and the packages they need found, before anything
    loads (ValueError, ImportError with the install hint)."""
    for name, v, lo in (("log_every", log_every, 1), ("val_every", val_every, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be a whole number >= {lo}, got {v!r}")
    if plot:
        from awt_engine._plotting import pyplot

        pyplot("--plot", "train without --plot; `awt-engine plot-training` draws the log later")
    if tensorboard is not None:
        try:
            import tensorboard as _tb  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError as exc:
            raise ImportError(f"--tensorboard needs the tensorboard package: {TB_HINT}") from exc


class RunWatch:
    """A training run's :class:`TrainLog` and its held-out accuracy. With a ``held_out``
    set (None: no validation), ``after_epoch`` (the fit loop's) calls ``validate()`` when
    due (every ``val_every`` epochs, 0: never, and after the last), then logs the epoch;
    ``after_step`` is the log's. ``config``: the run's TrainConfig."""

    def __init__(self, path, config, n_images: int, method: str, *, held_out=None,
                 validate=None, val_every: int = 0, lines=True, log_every=LOG_EVERY,
                 resume=False, tensorboard=None):  # fmt: skip
        from awt_engine.training.loop import epoch_steps

        self.validate = validate if held_out is not None else None
        self.held_out, self.every, self.epochs = held_out, val_every, config.epochs
        run = {"method": method, "images": n_images, "batch_size": config.batch_size}
        if held_out is not None:
            run["val_images"] = len(held_out.items)
        S = epoch_steps(n_images, config.batch_size)
        tb = tensorboard_writer(tensorboard) if tensorboard is not None else None
        self.log = TrainLog(
            path, epochs=config.epochs, steps_per_epoch=S, log_every=log_every, lines=lines,
            resume=resume, tensorboard=tb, run=run,
        )  # fmt: skip
        self.after_step = self.log.after_step
        self.last: tuple[int, float] | None = None  # (1-based epoch, top-1)

    def __enter__(self) -> RunWatch:
        return self

    def __exit__(self, *exc) -> None:
        self.log.close()

    def after_epoch(self, epoch: int, mean: dict[str, float]) -> None:
        acc = None
        due = self.every and (epoch + 1) % self.every == 0
        if self.validate is not None and (due or epoch + 1 == self.epochs):
            acc = self.validate()
            self.last = (epoch + 1, acc)
        self.log.epoch(epoch, mean, acc)

    def final_val(self) -> float | None:
        """Top-1 after the last epoch (computed now when no epoch ran here: a resumed run
        whose state had finished them all)."""
        if self.validate is None:
            return None
        if self.last is None or self.last[0] != self.epochs:
            self.last = (self.epochs, self.validate())
        return self.last[1]

    def record(self) -> dict[str, Any] | None:
        """The checkpoint header's ``val``: the images, their source, the cadence and
        top-1 by epoch (a resumed run's earlier ones from the kept log)."""
        if self.validate is None or self.last is None:
            return None
        history = [h for h in self.log.val_history() if h["epoch"] != self.last[0]]
        history.append({"epoch": self.last[0], "accuracy": self.last[1]})
        return {"source": self.held_out.source, "images": len(self.held_out.items),
                "every": self.every, "history": history}  # fmt: skip
