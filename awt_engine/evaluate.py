"""Evaluation on labelled data: top-1, top-5 and mean per-class recall per method.

Every image's views are embedded once and every requested method is scored from the
same embeddings. Image embeddings are cached per (model, weights, views, seed, image
content), so an interrupted evaluation resumes where it stopped. Results are written
one JSON per (data set, model, weights, method) in CLIP_benchmark's shape plus the
engine's own fields.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from awt_engine import __version__
from awt_engine._io import atomic_write_json
from awt_engine.classifier import Classifier, progress_bar
from awt_engine.image_cache import ImageEmbeddingCache
from awt_engine.images import decode_images
from awt_engine.labelled import LabelledData


@dataclass(frozen=True)
class Metrics:
    """Accuracies as exact fractions of counts; None where a metric is not defined."""

    acc1: float | None  # None when no image was scored
    acc5: float | None  # None also when there are fewer than 5 classes (as CLIP_benchmark)
    mean_per_class_recall: float | None
    n_images: int  # images scored
    n_failed: int  # images that could not be read (not in the metrics)
    per_class_recall: dict[int, float] = field(default_factory=dict)  # label -> top-1 recall

    def as_dict(self) -> dict[str, float | None]:
        return {
            "acc1": self.acc1,
            "acc5": self.acc5,
            "mean_per_class_recall": self.mean_per_class_recall,
        }


def compute_metrics(scores: Tensor, labels: Tensor, n_failed: int = 0) -> Metrics:
    """scores [N, C], labels [N] -> top-1, top-5, mean per-class recall.

    Mean per-class recall averages the top-1 recall of the classes that have images.
    """
    return metrics_from_topk(top_classes(scores), labels, n_failed)


def top_classes(scores: Tensor, k: int = 5) -> Tensor:
    """Indices [N, min(k, C)] of the best classes, best first: all the metrics need."""
    return scores.topk(min(k, scores.shape[-1]), dim=-1).indices


def metrics_from_topk(top: Tensor, labels: Tensor, n_failed: int = 0, k: int = 5) -> Metrics:
    """Metrics from :func:`top_classes` output [N, min(k, C)] and labels [N].

    Fractions are computed from integer counts (1 of 3 is 1/3, not a float32 mean).
    Top-k needs at least k classes: with fewer it is None, as CLIP_benchmark leaves it
    undefined rather than reporting a trivial 1.0.
    """
    N = top.shape[0]
    if N == 0:
        return Metrics(None, None, None, 0, n_failed)
    hit1 = top[:, 0] == labels
    n1 = int(hit1.sum())
    acc5 = int((top == labels[:, None]).any(dim=-1).sum()) / N if top.shape[1] >= k else None
    per_class = {}
    for c in labels.unique().tolist():
        mask = labels == c
        per_class[c] = int(hit1[mask].sum()) / int(mask.sum())
    mean_recall = sum(per_class.values()) / len(per_class)
    return Metrics(n1 / N, acc5, mean_recall, N, n_failed, per_class)


class ResultsWriteError(OSError):
    """A results file could not be written (the message names it)."""


@dataclass
class EvalResult:
    dataset: str
    metrics: dict[str, Metrics]  # method -> metrics
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def evaluate(
    clf: Classifier,
    data: LabelledData,
    methods: Sequence[str],
    *,
    cache_root: Path | None,
    progress: bool = False,
) -> EvalResult:
    """Embed every image once (cached), score each method from the same embeddings."""
    items = list(data.items)
    labels_all = torch.tensor([it.label for it in items], dtype=torch.long)
    cache = None
    if cache_root is not None:
        cache = ImageEmbeddingCache(
            cache_root,
            clf.model.identity,
            clf.view_config.n_views,
            clf.view_config.seed,
            dim=clf.class_embeds.shape[-1],
        )
    bar = progress_bar(len(items), progress)
    keys: list[str | None] = [None] * len(items)
    failed: dict[int, str] = {}
    hits, misses = [], []
    for i, it in enumerate(items):
        if cache is None:
            misses.append(i)
            continue
        try:
            keys[i] = cache.content_key(it.path)
        except OSError as exc:
            failed[i] = f"cannot read file: {exc.strerror or exc}"
            bar.update(1)
            continue
        (hits if cache.shard_of(keys[i]) is not None else misses).append(i)

    tops: dict[str, list[Tensor]] = {m: [] for m in methods}  # top-5 indices, not [N, C]
    scored_idx: list[int] = []

    def score_batch(idx: list[int], img: Tensor):
        img = img.to(clf.model.device)  # [b,V,D]
        for m in methods:
            tops[m].append(top_classes(clf.scores_from_embeddings(img, method=m)).cpu())
        scored_idx.extend(idx)
        bar.update(len(idx))

    try:
        # cached images first (no encoding), shard by shard, then the misses as embedded
        hits.sort(key=lambda i: str(cache.shard_of(keys[i])))
        for s in range(0, len(hits), 64):
            idx, rows = [], []
            for i in hits[s : s + 64]:
                row = cache.get(keys[i])
                if row is None:  # its shard turned out damaged: recompute
                    misses.append(i)
                else:
                    idx.append(i)
                    rows.append(row)
            if idx:
                score_batch(idx, torch.stack(rows))
        misses.sort()

        batch: list[int] = []
        views: list[Tensor] = []

        def flush():
            if not batch:
                return
            out = clf.embed_views(torch.stack(views)).float().cpu()  # [b,V,D]
            if cache is not None:
                out = cache.stored(out)  # score what a resumed run will read back
                for j, i in enumerate(batch):
                    if keys[i] is not None:
                        cache.put(keys[i], out[j])
            score_batch(list(batch), out)
            batch.clear()
            views.clear()

        decoded = decode_images(
            (items[i].path for i in misses),
            workers=clf.workers,
            target_size=clf.model.preprocess.size,
        )
        for i, dec in zip(misses, decoded, strict=True):
            if not dec.ok:
                failed[i] = dec.error
                bar.update(1)
                continue
            batch.append(i)
            views.append(clf.make_views(dec.image))
            if len(batch) == clf.batch_size:
                flush()
        flush()
    finally:
        if cache is not None:
            cache.close()
        bar.close()

    order = torch.tensor(scored_idx, dtype=torch.long)
    labels = labels_all[order]
    metrics = {}
    for m in methods:
        top = torch.cat(tops[m]) if tops[m] else torch.empty(0, 5, dtype=torch.long)
        metrics[m] = metrics_from_topk(top, labels, n_failed=len(failed))
    return EvalResult(
        data.name, metrics, [(str(items[i].path), r) for i, r in sorted(failed.items())]
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "none"


def result_records(
    result: EvalResult,
    *,
    model: str,
    pretrained: str | None,
    views: int,
    descriptions: int,
    seed: int,
    limit: int | None,
    shortlist: int | None,
    split: str,
) -> dict[str, dict]:
    """One CLIP_benchmark-shaped record per method, keyed by method."""
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = {}
    for method, m in result.metrics.items():
        out[method] = {
            "dataset": result.dataset,
            "model": model,
            "pretrained": pretrained,
            "task": "zeroshot_classification",
            "metrics": m.as_dict(),
            "language": "en",
            # awt-engine's own fields
            "method": method,
            "views": views if method not in ("clip", "clip-descriptions") else 1,
            "descriptions": descriptions,
            "seed": seed,
            "split": split,
            "limit": limit,
            "shortlist": shortlist,
            "n_images": m.n_images,
            "n_failed": m.n_failed,
            "engine_version": __version__,
            "created": now,
        }
    return out


def write_results(records: dict[str, dict], output: Path) -> list[Path]:
    paths = []
    for method, rec in records.items():
        name = (
            "__".join(
                _slug(x) for x in (rec["dataset"], rec["model"], str(rec["pretrained"]), method)
            )
            + ".json"
        )
        path = Path(output) / name
        try:
            atomic_write_json(path, rec)
        except OSError as exc:  # a full disk, a read-only folder: say which file
            raise ResultsWriteError(
                f"cannot write results file {path}: {exc.strerror or exc}"
            ) from None
        paths.append(path)
    return paths


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_table(result: EvalResult) -> str:
    rows = [("method", "top-1", "top-5", "mean recall", "images")]
    for method, m in result.metrics.items():
        rows.append(
            (
                method,
                _percent(m.acc1),
                _percent(m.acc5),
                _percent(m.mean_per_class_recall),
                str(m.n_images),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in rows)
