"""Evaluation on labelled data: top-1, top-5 and mean per-class recall per method.

Every image's views are embedded once and every requested method is scored from the
same embeddings. Image embeddings are cached per (model, weights, views, seed, image
content), so an interrupted evaluation resumes where it stopped. Results are written
one JSON per (data set, model, weights, method) in CLIP_benchmark's shape plus the
engine's own fields.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from awt_engine import __version__
from awt_engine._io import atomic_write, atomic_write_json, sha256_hex
from awt_engine.classifier import Classifier, progress_bar
from awt_engine.images import decode_images
from awt_engine.labelled import LabelledData


@dataclass(frozen=True)
class Metrics:
    acc1: float
    acc5: float
    mean_per_class_recall: float
    n_images: int  # images scored
    n_failed: int  # images that could not be read (not in the metrics)

    def as_dict(self) -> dict[str, float]:
        return {
            "acc1": self.acc1,
            "acc5": self.acc5,
            "mean_per_class_recall": self.mean_per_class_recall,
        }


def compute_metrics(scores: Tensor, labels: Tensor, n_failed: int = 0) -> Metrics:
    """scores [N, C], labels [N] -> top-1, top-5 (top-C when C < 5), mean per-class recall.

    Mean per-class recall averages the top-1 recall of the classes that have images.
    """
    return metrics_from_topk(top_classes(scores), labels, n_failed)


def top_classes(scores: Tensor, k: int = 5) -> Tensor:
    """Indices [N, min(k, C)] of the best classes, best first: all the metrics need."""
    return scores.topk(min(k, scores.shape[-1]), dim=-1).indices


def metrics_from_topk(top: Tensor, labels: Tensor, n_failed: int = 0) -> Metrics:
    """Metrics from :func:`top_classes` output [N, k] and labels [N]."""
    N = top.shape[0]
    if N == 0:
        return Metrics(float("nan"), float("nan"), float("nan"), 0, n_failed)
    hit1 = top[:, 0] == labels
    hit5 = (top == labels[:, None]).any(dim=-1)
    recalls = torch.stack([hit1[labels == c].float().mean() for c in labels.unique()])
    return Metrics(
        hit1.float().mean().item(), hit5.float().mean().item(), recalls.mean().item(), N, n_failed
    )


class ImageEmbeddingCache:
    """One file per image: ``<root>/image_embeddings/<config key>/<content sha256>.pt``."""

    def __init__(self, root: Path, identity: str, n_views: int, seed: int):
        self.key = sha256_hex("awt-image-embeddings", "1", identity, str(n_views), str(seed))[:24]
        self.folder = Path(root) / "image_embeddings" / self.key
        self.n_views = n_views

    @staticmethod
    def content_key(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def _file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def get(self, key: str) -> Tensor | None:
        path = self._file(key)
        if not path.exists():
            return None
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(t, Tensor) and t.dim() == 2 and t.shape[0] == self.n_views:
                return t
        except Exception:
            pass
        warnings.warn(f"image-embedding cache file {path} is damaged; recomputing", stacklevel=2)
        return None

    def put(self, key: str, embeds: Tensor) -> None:
        tensor = embeds.detach().float().cpu().contiguous()
        atomic_write(self._file(key), lambda f: torch.save(tensor, f))


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
    cache = (
        ImageEmbeddingCache(
            cache_root, clf.model.identity, clf.view_config.n_views, clf.view_config.seed
        )
        if cache_root is not None
        else None
    )
    bar = progress_bar(len(items), progress)
    keys: list[str | None] = [None] * len(items)
    embeds: list[Tensor | None] = [None] * len(items)
    failed: dict[int, str] = {}
    misses = []
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
        hit = cache.get(keys[i])
        if hit is None:
            misses.append(i)
        else:
            embeds[i] = hit
            bar.update(1)

    tops: dict[str, list[Tensor]] = {m: [] for m in methods}  # top-5 indices, not [N, C]
    scored_idx: list[int] = []

    def score_batch(idx: list[int]):
        img = torch.stack([embeds[i] for i in idx]).to(clf.model.device)  # [b,V,D]
        for m in methods:
            tops[m].append(top_classes(clf.scores_from_embeddings(img, method=m)).cpu())
        scored_idx.extend(idx)
        for i in idx:
            embeds[i] = None  # keep memory flat: only scores stay

    # cached images first (no encoding), then the misses as they are embedded
    ready = [i for i in range(len(items)) if embeds[i] is not None]
    for s in range(0, len(ready), 64):
        score_batch(ready[s : s + 64])

    batch: list[int] = []
    views: list[Tensor] = []

    def flush():
        if not batch:
            return
        out = clf.embed_views(torch.stack(views)).float().cpu()  # [b,V,D]
        for j, i in enumerate(batch):
            embeds[i] = out[j].clone()
            if cache is not None and keys[i] is not None:
                cache.put(keys[i], embeds[i])
        score_batch(list(batch))
        bar.update(len(batch))
        batch.clear()
        views.clear()

    for i, dec in zip(
        misses,
        decode_images(
            (items[i].path for i in misses),
            workers=clf.workers,
            target_size=clf.model.preprocess.size,
        ),
        strict=True,
    ):
        if not dec.ok:
            failed[i] = dec.error
            bar.update(1)
            continue
        batch.append(i)
        views.append(clf.make_views(dec.image))
        if len(batch) == clf.batch_size:
            flush()
    flush()
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
        atomic_write_json(path, rec)
        paths.append(path)
    return paths


def format_table(result: EvalResult) -> str:
    rows = [("method", "top-1", "top-5", "mean recall", "images")]
    for method, m in result.metrics.items():
        rows.append(
            (
                method,
                f"{100 * m.acc1:.2f}",
                f"{100 * m.acc5:.2f}",
                f"{100 * m.mean_per_class_recall:.2f}",
                str(m.n_images),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in rows)
