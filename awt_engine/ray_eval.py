"""``eval --ray``: the labelled images scored by a Ray Data actor pool, the metrics and
records the local run's (:func:`awt_engine.evaluate.evaluate`).

Each actor evaluates a shard and returns, per image, its top-5 classes and calibration
terms for every plain scorer. An adapted scorer (``awt+tda``, ``awt+transclip``) cannot be
split across actors: each actor only collects what the adaptation reads (the base
scores ``[C]`` and the image feature ``[D]`` of each of its images), the driver gathers
them by input index, and the adaptation runs once there, on one ordered stream per
seeded order (online) or over the whole set (transductive), exactly as a local eval
replays it (:mod:`awt_engine.evaluate_adapted`).

Axes: N images, C classes, D embedding width.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from awt_engine.adapt.scorer import AdaptedScorer, Collected, resolve_scorer
from awt_engine.distributed import (
    ClassifierSpec,
    _embed_task,
    _map_actors,
    _threads,
    import_ray,
    init,
    pool,
    refuse_split,
)


class _Evaluate:
    """The actor of :func:`evaluate_dataset`: scores a shard of labelled items."""

    def __init__(self, spec: ClassifierSpec, class_embeds, scorers: list, classes, threads):
        import ray

        if isinstance(class_embeds, ray.ObjectRef):
            class_embeds = ray.get(class_embeds)
        self.clf = spec.build(class_embeds, scorers, threads=threads)
        self.scorers, self.classes = [resolve_scorer(s) for s in scorers], tuple(classes)

    def __call__(self, batch: dict) -> dict:
        from awt_engine.evaluate import evaluate
        from awt_engine.labelled import LabelledData, LabelledItem

        items = tuple(
            LabelledItem(Path(p), int(y))
            for p, y in zip(batch["path"], batch["label"], strict=True)
        )
        data = LabelledData("shard", self.classes, items, "ray shard")
        res = evaluate(self.clf, data, self.scorers, cache_root=None, replay=False)
        rows = {i: r for r, i in enumerate(res.scored.tolist())}
        failed = dict(res.failed)
        parts = {n: _parts(c) for n, c in res.collected.items()}  # shard index -> [C + D + 1]
        out: dict[str, list] = {"index": [], "error": []}
        for j, (path, index) in enumerate(zip(batch["path"], batch["index"], strict=True)):
            out["index"].append(int(index))
            out["error"].append(failed.get(str(path)))
            for s in self.scorers:
                if isinstance(s, AdaptedScorer):
                    out.setdefault(f"part/{s.name}", []).append(parts[s.name].get(j, []))
                    continue
                top = res.top5[s.name][rows[j]].tolist() if j in rows else []
                out.setdefault(f"top5/{s.name}", []).append(top)
                t = res.terms[s.name][rows[j]].tolist() if j in rows else []
                out.setdefault(f"calib/{s.name}", []).append(t)
        return out


def _parts(collected: Collected) -> dict[int, list[float]]:
    """Each collected image's base scores, feature and the scale, [C + D + 1], by its
    index in the shard (an image that was not scored has none)."""
    if not len(collected):
        return {}
    import torch

    table = torch.cat([torch.cat(collected.scores), torch.cat(collected.features)], dim=1)
    rows = [[*r, collected.scale] for r in table.tolist()]
    return dict(zip(collected.indices, rows, strict=True))


def evaluate_dataset(
    clf_kwargs: dict[str, Any],
    data,
    scorers: Iterable,
    *,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    rows_per_batch: int | None = None,
    address: str | None = None,
    progress: bool = False,
    orders: int = 1,
    order_seed: int = 0,
    ood=None,
    ood_root: str | None = None,
):
    """:func:`~awt_engine.evaluate.evaluate` on an actor pool: the same metrics and
    EvalResult as the local run (the image-embedding cache is not used)."""
    if ood is not None:
        raise ValueError("--ood-root is evaluated locally only: drop --ray to measure OOD")
    scorers = [resolve_scorer(s) for s in scorers]
    refuse_split([s for s in scorers if not isinstance(s, AdaptedScorer)])
    ray = import_ray()
    init(address)
    device = clf_kwargs.get("device", "auto")
    concurrency, num_gpus, num_cpus = pool(device, num_gpus, num_cpus, concurrency)
    spec = ClassifierSpec(dict(clf_kwargs))
    embeds = _embed_task(ray, num_gpus).remote(spec, scorers)
    items = list(data.items)
    rows = [{"index": i, "path": str(it.path), "label": it.label} for i, it in enumerate(items)]
    kwargs = {
        "spec": spec,
        "class_embeds": embeds,
        "scorers": scorers,
        "classes": data.classes,
        "threads": _threads(num_gpus, num_cpus),
    }
    ds = ray.data.from_items(rows)
    scored_rows = _map_actors(
        ds, _Evaluate, kwargs, concurrency, num_gpus, num_cpus, rows_per_batch
    )
    from awt_engine._progress import progress_bar

    out = []
    with progress_bar(len(rows), progress, desc=f"eval {data.name} (ray)") as bar:
        for r in scored_rows.iter_rows():
            out.append(r)
            bar.update(1)
    out.sort(key=lambda r: r["index"])
    result = _result(data, items, out, scorers)
    class_embeds = ray.get(embeds)
    for s in scorers:
        if isinstance(s, AdaptedScorer):
            _replay(result, s, out, items, class_embeds, orders, order_seed)
    return result


def _result(data, items, out: list[dict], scorers):
    """The EvalResult of the plain scorers from the actors' rows (sorted by index)."""
    import torch

    from awt_engine.evaluate import EvalResult, metrics_from_topk

    ok = [r for r in out if r["error"] is None]
    labels = torch.tensor([items[r["index"]].label for r in ok], dtype=torch.long)
    plain = [s.name for s in scorers if not isinstance(s, AdaptedScorer)]
    terms = {  # [N, 4] per scorer: the per-image calibration terms
        s: torch.tensor([list(r[f"calib/{s}"]) for r in ok], dtype=torch.float64).reshape(-1, 4)
        for s in plain
    }
    top5 = {
        s: torch.tensor([list(r[f"top5/{s}"]) for r in ok], dtype=torch.long).reshape(-1, 5)
        if ok
        else torch.empty(0, 5, dtype=torch.long)
        for s in plain
    }
    n_failed = len(out) - len(ok)
    metrics = {s: metrics_from_topk(top5[s], labels, n_failed, terms=terms[s]) for s in plain}
    failed = [(str(items[r["index"]].path), r["error"]) for r in out if r["error"] is not None]
    scored = torch.tensor([r["index"] for r in ok], dtype=torch.long)
    res = EvalResult(data.name, metrics, failed, data.classes, top5, scored, terms)
    res.scorers = {s.name: s for s in scorers}
    return res


def _replay(result, s: AdaptedScorer, out, items, class_embeds, orders, order_seed) -> None:
    """Gather ``s``'s collected parts by input index and run its adaptation here."""
    import torch

    from awt_engine.evaluate_adapted import adapted_runs
    from awt_engine.scorers import ScoreInput

    parts = [(r["index"], r[f"part/{s.name}"]) for r in out if r[f"part/{s.name}"]]
    C = len(result.classes)
    collected = Collected()
    if parts:
        table = torch.tensor([p for _, p in parts], dtype=torch.float32)  # [N, C + D + 1]
        collected.indices = [i for i, _ in parts]
        collected.scores, collected.features = [table[:, :C]], [table[:, C:-1]]
        collected.scale = float(table[0, -1])
        collected.class_features = s.base.class_features(
            ScoreInput(collected.scale, class_embeds=class_embeds.float().cpu())
        )
    labels_all = torch.tensor([it.label for it in items], dtype=torch.long)
    runs = adapted_runs(
        s,
        collected,
        labels_all,
        result.scored,
        len(result.failed),
        orders=orders,
        order_seed=order_seed,
    )
    result.add_runs(s.name, runs)


__all__ = ["evaluate_dataset"]
