"""Evaluation on labelled data: top-1, top-5, mean per-class recall and calibration
(:mod:`awt_engine.calibration`) per scorer.

Every image goes through the model once and every requested scorer is scored from the
same output (view embeddings, or logits for a generative model), through the same batch
path as ``classify`` (:mod:`awt_engine.inputs.batches`). View embeddings can be cached per
(model identity, views, seed, image content) (:mod:`awt_engine.image_cache`), so an
interrupted evaluation resumes where it stopped. Results are written one JSON per run and
scorer in CLIP_benchmark's shape, plus everything that defines the run.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from awt_engine import __version__
from awt_engine._io import atomic_write_json, sha256_hex, utc_now
from awt_engine._progress import progress_bar
from awt_engine.adapt.scorer import AdaptedScorer, Collected, resolve_scorer
from awt_engine.calibration import image_terms
from awt_engine.evaluate_adapted import AdaptedRun, adapted_runs, plain_ood
from awt_engine.evaluate_ood import score_ood
from awt_engine.image_cache import ImageEmbeddingCache
from awt_engine.inputs import Failure, ViewBatch, view_batches
from awt_engine.labelled import LabelledData
from awt_engine.metrics import (  # re-exported: evaluation's results are these
    Metrics as Metrics,
)
from awt_engine.metrics import compute_metrics as compute_metrics
from awt_engine.metrics import mean_metrics, metrics_std
from awt_engine.metrics import metrics_from_topk as metrics_from_topk
from awt_engine.metrics import top_classes as top_classes
from awt_engine.models.base import trained_info
from awt_engine.runner import NONFINITE_REASON, Runner, Scored, nonfinite_rows
from awt_engine.scorers import Scorer

if TYPE_CHECKING:  # the classifier is the layer above: evaluate takes one, never imports it
    from awt_engine.classifier import Classifier


class ResultsWriteError(OSError):
    """A results file could not be written (the message names it)."""


@dataclass
class EvalResult:
    dataset: str
    metrics: dict[str, Metrics]  # scorer -> metrics
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    classes: tuple[str, ...] = ()
    top5: dict[str, Tensor] = field(default_factory=dict)  # scorer -> [N, <=5] in item order
    scored: Tensor | None = None  # [N] item indices of the rows of top5
    # scorer -> [N, 4] calibration terms (awt_engine.calibration.image_terms), as top5
    terms: dict[str, Tensor] = field(default_factory=dict)
    # adapted scorer -> its runs (one per seeded order; one for a transductive one); its
    # metrics above are their mean, its top5 and terms the first run's
    runs: dict[str, list[AdaptedRun]] = field(default_factory=dict)
    scorers: dict[str, Scorer] = field(default_factory=dict)  # name -> the scorer
    ood_root: str | None = None  # where the OOD images came from (eval --ood-root)
    collected: dict[str, Collected] = field(default_factory=dict)  # evaluate(replay=False)

    def add_runs(self, name: str, runs: list[AdaptedRun]) -> None:
        self.runs[name] = runs
        self.metrics[name] = mean_metrics([r.metrics for r in runs])
        self.top5[name], self.terms[name] = runs[0].top5, runs[0].terms


class _Tally:
    """Top-5 class indices and calibration terms [4] per scorer and image (never [N, C]
    scores).

    An image whose scores are not finite under any scorer is a failed image (in
    ``failed``, with :data:`~awt_engine.classifier.NONFINITE_REASON`), not a prediction.
    """

    def __init__(self, clf: Classifier, scorers, bar, failed: dict[int, str], labels_all):
        self.clf, self.scorers, self.bar, self.failed = clf, scorers, bar, failed
        self.names = [s.name for s in scorers]
        self.tops: dict[str, list[Tensor]] = {s.name: [] for s in scorers}
        self.terms: dict[str, list[Tensor]] = {s.name: [] for s in scorers}
        self.labels = labels_all
        self.order: list[int] = []

    def add(self, idx: list[int], scores: dict[str, Tensor]) -> None:
        bad = torch.zeros(len(idx), dtype=torch.bool)
        for sc in scores.values():
            bad |= nonfinite_rows(sc, self.clf.shortlist).cpu()
        for i, b in zip(idx, bad.tolist(), strict=True):
            if b:
                self.failed[i] = NONFINITE_REASON
        keep = ~bad
        labels = self.labels[torch.tensor(idx, dtype=torch.long)[keep]]
        for name in self.names:
            sc = scores[name]
            kept = sc[keep.to(sc.device)]
            self.tops[name].append(top_classes(kept).cpu())
            self.terms[name].append(image_terms(kept, labels))
        self.order.extend(i for i, b in zip(idx, bad.tolist(), strict=True) if not b)
        self.bar.update(len(idx))

    def top5(self) -> tuple[dict[str, Tensor], Tensor]:
        """Per scorer the [N, <=5] top classes of the scored items, in item order."""
        order = torch.tensor(self.order, dtype=torch.long)
        sort = order.argsort()
        tops = {
            name: (torch.cat(t) if t else torch.empty(0, 5, dtype=torch.long))[sort]
            for name, t in self.tops.items()
        }
        return tops, order[sort]

    def image_terms(self) -> dict[str, Tensor]:
        """Per scorer the [N, 4] calibration terms of the scored items, in item order."""
        sort = torch.tensor(self.order, dtype=torch.long).argsort()
        return {
            name: (torch.cat(t) if t else torch.empty(0, 4, dtype=torch.float64))[sort]
            for name, t in self.terms.items()
        }

    def metrics(self, n_failed: int) -> dict[str, Metrics]:
        tops, order = self.top5()
        terms = self.image_terms()
        labels = self.labels[order]
        return {
            name: metrics_from_topk(top, labels, n_failed=n_failed, terms=terms[name])
            for name, top in tops.items()
        }


def evaluate(
    clf: Classifier,
    data: LabelledData,
    scorers: Sequence[str | Scorer],
    *,
    cache_root: Path | None,
    image_cache: bool = True,
    progress: bool = False,
    states: dict[str, Any] | None = None,
    orders: int = 1,
    order_seed: int = 0,
    ood: Sequence[str | Path] | None = None,
    ood_root: str | None = None,
    replay: bool = True,
) -> EvalResult:
    """Run the model once per image; score every scorer from the same output.

    ``image_cache`` (with a ``cache_root``, for embedding models) keeps view embeddings
    on disk so a rerun or a resumed run skips the encoder; cached images are scored first
    unless a scorer keeps state or depends on order (then every image goes in input
    order, through the model). ``states``: scorer name -> a stateful scorer's state.

    Adapted scorers (``awt+tda``, ...) collect during the pass and are replayed after it
    (:mod:`awt_engine.evaluate_adapted`): an online one over ``orders`` permutations of
    the images seeded ``order_seed``, ``order_seed + 1``, ...; ``ood``: images of none of
    the classes, for ``ood_auroc`` / ``ood_fpr95`` of every scorer (``ood_root``: where
    they came from, for the record). ``replay=False``: adapted scorers are only
    collected (``result.collected``), for a caller that gathers sets (Ray's driver).
    """
    if orders < 1:
        raise ValueError(f"orders must be >= 1, got {orders}")
    runner = clf.runner_for(scorers)  # refuses what the model cannot do with a scorer
    items = list(data.items)
    labels_all = torch.tensor([it.label for it in items], dtype=torch.long)
    adapted = [s for s in runner.scorers if isinstance(s, AdaptedScorer)]
    states = {**(states or {}), **{s.name: s.collector() for s in adapted}}
    failed: dict[int, str] = {}
    bar = progress_bar(len(items) + len(ood or ()), progress)
    plain = [s for s in runner.scorers if not isinstance(s, AdaptedScorer)]
    tally = _Tally(clf, plain, bar, failed, labels_all)
    try:
        _score_all(clf, runner, items, states, failed, bar, tally, cache_root, image_cache)
        ood_scores = score_ood(clf, runner, ood, bar) if ood is not None else None
    finally:
        bar.close()
    top5, scored = tally.top5()
    terms = tally.image_terms()
    metrics = tally.metrics(len(failed))
    fails = [(str(items[i].path), r) for i, r in sorted(failed.items())]
    if ood_scores is not None:
        fails += ood_scores.failed
        for s in plain:
            metrics[s.name] = replace(
                metrics[s.name], **plain_ood(terms[s.name], ood_scores.conf[s.name])
            )
    result = EvalResult(data.name, metrics, fails, data.classes, top5, scored, terms)
    result.scorers = {s.name: s for s in runner.scorers}
    result.ood_root = ood_root
    if not replay:
        result.collected = {s.name: states[s.name] for s in adapted}
        return result
    for s in adapted:
        runs = adapted_runs(
            s,
            states[s.name],
            labels_all,
            scored,
            len(failed),
            orders=orders,
            order_seed=order_seed,
            ood=ood_scores.collected[s.name] if ood_scores is not None else None,
            memory_budget=clf.memory_budget,
        )
        result.add_runs(s.name, runs)
    return result


def _score_all(clf, runner: Runner, items, states, failed, bar, tally, cache_root, image_cache):
    """The pass over the labelled images: through the image cache when every scorer is
    order-free during the pass (adapted ones only collect), else in input order."""
    view_config = clf.view_config_for(runner.scorers)
    in_order = any(
        (s.stateful or s.order_dependent) and not isinstance(s, AdaptedScorer)
        for s in runner.scorers
    )

    def batches(idx: list[int]):
        """View batches of items ``idx``, numbered by item; failures recorded."""
        stream = view_batches(
            (items[i].path for i in idx),
            clf.model.preprocess,
            view_config,
            batch_size=clf.batch_size,
            workers=clf.workers,
            device=clf.model.device,
        )
        for b in stream:
            if isinstance(b, Failure):
                failed[idx[b.index]] = b.reason
                bar.update(1)
            else:
                yield ViewBatch(tuple(idx[j] for j in b.indices), b.sources, b.views)

    cache = None
    if runner.embeds and image_cache and cache_root is not None and not in_order:
        txt = clf.class_embeddings(runner.labels)
        cache = ImageEmbeddingCache(cache_root, clf.model.identity, view_config, dim=txt.shape[-1])
    try:
        if cache is not None:
            _embed_and_score(items, cache, batches, failed, bar, tally, clf, runner, states)
        else:  # every image in input order, through the run loop
            everything = batches(list(range(len(items))))
            for out in runner.run(everything, runner.new_states(states), finish=False):
                assert isinstance(out, Scored)  # failures were taken out by batches()
                tally.add(list(out.indices), out.scores)
    finally:
        if cache is not None:
            cache.close()


def _embed_and_score(items, cache, batches, failed, bar, tally, clf, runner: Runner, states):
    """Cached images first (shard by shard, no encoding), then the rest as they embed
    (stateless, order-free scorers only: the order depends on what the cache holds)."""

    def score_embeds(idx: list[int], img: Tensor) -> None:
        out = runner.score(runner.embedded(img), idx, states)
        tally.add(idx, {name: o.scores for name, o in out.items()})

    keys: list[str | None] = [None] * len(items)
    hits, misses = [], []
    for i, it in enumerate(items):
        try:
            keys[i] = cache.content_key(it.path)
        except OSError as exc:
            failed[i] = f"cannot read file: {exc.strerror or exc}"
            bar.update(1)
            continue
        (hits if cache.shard_of(keys[i]) is not None else misses).append(i)

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
            score_embeds(idx, torch.stack(rows))
    misses.sort()

    for batch in batches(misses):
        idx = list(batch.indices)
        out = clf.embed_views(batch.views).float().cpu()  # [b,V,D]
        out = cache.stored(out)  # score what a resumed run will read back
        finite = torch.isfinite(out).flatten(1).all(dim=1).tolist()
        for j, i in enumerate(idx):
            if finite[j]:  # a NaN row is this run's failure, not worth keeping
                cache.put(keys[i], out[j])
        score_embeds(idx, out)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "none"


def result_records(
    result: EvalResult,
    clf: Classifier,
    *,
    model: str,
    data_root: str | Path,
    split: str,
    limit: int | None,
    subsample: str = "all",
    checkpoint: str | None = None,
) -> dict[str, dict]:
    """One CLIP_benchmark-shaped record per scorer (``dataset``, ``model``, ``pretrained``,
    ``task``, ``metrics``, ``language``), plus every setting that defines the run."""
    now = utc_now()
    labels, m0 = clf.labels, clf.model
    weights = getattr(m0, "weights", None)
    method = getattr(m0, "method", None)  # the trained method, None for zero-shot
    info = trained_info(m0)
    trained = info.header if info is not None else {}
    base = _run_fields(result, clf, data_root, split, limit, subsample, checkpoint)
    run_id = sha256_hex(json.dumps({**base, "model": model}, sort_keys=True, default=str))[:10]
    out = {}
    for name, m in result.metrics.items():
        s = result.scorers.get(name) or resolve_scorer(name)
        out[name] = {
            "dataset": result.dataset,
            "model": model,
            "pretrained": str(weights) if weights else "none",  # CLIP_benchmark needs a string
            # a trained method (CoOp, ...) learned from a few labelled images per class
            "task": "fewshot_classification" if method else "zeroshot_classification",
            "metrics": m.as_dict(),
            "language": "en",
            # awt-engine's own fields
            "scorer": s.base.name if isinstance(s, AdaptedScorer) else name,
            **_adapt_record(s, result.runs.get(name)),
            "views": clf.base_view_config.n_views if s.uses_views else 1,
            "descriptions": labels.n_descriptions if s.uses_descriptions else 0,
            "per_class_recall": {
                result.classes[c]: r for c, r in sorted(m.per_class_recall.items())
            },
            "n_images": m.n_images,
            "n_failed": m.n_failed,
            **base,
            "shots": trained.get("shots"),  # training images per class, None for zero-shot
            "run_id": run_id,
            "engine_version": __version__,
            "created": now,
        }
    return out


def _run_fields(result, clf, data_root, split, limit, subsample, checkpoint) -> dict:
    """Every setting that defines an eval run (what the run id hashes)."""
    labels, m0 = clf.labels, clf.model
    return {
        "model_identity": m0.identity,
        "precision": getattr(m0, "precision", None),
        "device": str(m0.device),
        "template": labels.template,
        "classes": list(result.classes),
        "descriptions_name": labels.name,
        "descriptions_sha256": labels.descriptions_sha256,
        "seed": clf.base_view_config.seed,
        "view_config": dataclasses.asdict(clf.base_view_config),
        "descriptions_per_class": labels.n_descriptions,
        "split": split,
        "limit": limit,
        "shortlist": clf.shortlist,
        "awt_config": dataclasses.asdict(clf.awt_config),
        "data_root": str(data_root),
        "subsample": subsample,
        "checkpoint": checkpoint,
        "method": getattr(m0, "method", None),
        "ood_root": result.ood_root,
        "adapt_configs": {
            n: dataclasses.asdict(x.config)
            for n, x in result.scorers.items()
            if isinstance(x, AdaptedScorer)
        },
        # the seeds of each online adaptation's orders (null: transductive, order-free)
        "adapt_order_seeds": {n: [r.seed for r in runs] for n, runs in result.runs.items()},
    }


def _adapt_record(s: Scorer, runs: list[AdaptedRun] | None) -> dict[str, Any]:
    """The adaptation fields of a record: which (None for a plain scorer), its options,
    and for an online one each seeded order's metrics with their standard deviation."""
    if not isinstance(s, AdaptedScorer):
        return {"adapt": None}
    rec: dict[str, Any] = {
        "adapt": s.adaptation.name,
        "adapt_kind": "online" if s.adaptation.online else "transductive",
        "adapt_config": dataclasses.asdict(s.config),
    }
    if s.adaptation.online and runs:
        rec["orders"] = [{"seed": r.seed, "metrics": r.metrics.as_dict()} for r in runs]
        rec["metrics_std"] = metrics_std([r.metrics for r in runs])
    return rec


def write_results(records: dict[str, dict], output: Path) -> list[Path]:
    """One JSON per scorer: ``<dataset>__<model>__<weights>__<scorer>__<run id>.json``
    (the run id hashes every setting, so runs that differ in any never overwrite)."""
    paths = []
    for scorer, rec in records.items():
        parts = (rec["dataset"], rec["model"], rec["pretrained"], scorer, rec["run_id"])
        path = Path(output) / ("__".join(_slug(x) for x in parts) + ".json")
        try:
            atomic_write_json(path, rec)
        except OSError as exc:  # a full disk, a read-only folder: say which file
            raise ResultsWriteError(
                f"cannot write results file {path}: {exc.strerror or exc}"
            ) from None
        paths.append(path)
    return paths


def harmonic_means(base: EvalResult, new: EvalResult) -> dict[str, tuple]:
    """Per scorer (base top-1, new top-1, their harmonic mean): CoOp's base-to-new report."""
    out = {}
    for name in base.metrics:
        b, n = base.metrics[name].acc1, new.metrics[name].acc1
        hm = None if b is None or n is None or b + n == 0 else 2 * b * n / (b + n)
        out[name] = (b or 0.0, n or 0.0, hm)
    return out


def _percent(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_table(result: EvalResult) -> str:
    """One row per scorer: accuracy, calibration (ECE, NLL) and, when measured, OOD
    detection; an online adaptation's numbers are the mean over its orders, with
    the standard deviation of top-1 beside it."""
    ood = any(m.ood_auroc is not None for m in result.metrics.values())
    head = ["scorer", "top-1", "top-5", "mean recall", "ECE", "NLL", "images"]
    rows = [head + (["OOD AUROC", "FPR95"] if ood else [])]
    for name, m in result.metrics.items():
        runs = result.runs.get(name, [])
        top1 = _percent(m.acc1)
        if len(runs) > 1:
            top1 += f" ± {100 * metrics_std([r.metrics for r in runs])['acc1']:.2f}"
        row = [name, top1, _percent(m.acc5), _percent(m.mean_per_class_recall)]
        row += [_percent(m.ece), "-" if m.nll is None else f"{m.nll:.3f}", str(m.n_images)]
        if ood:
            row += [_percent(m.ood_auroc), _percent(m.ood_fpr95)]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in rows)
