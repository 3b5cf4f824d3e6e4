"""classify and eval on a Ray cluster: Ray Data's actor pool over the same Python API.

The canonical Ray Data pattern, with nothing of the engine written again:

* the driver resolves the label set and computes the class embeddings ONCE (one Ray task,
  so a GPU node can do it) and puts them in the object store;
* ``map_batches`` runs a pool of actors (``concurrency``, ``num_gpus`` each); every actor
  builds the :class:`~awt_engine.classifier.Classifier` once (model, checkpoint, label
  set, the shared class embeddings) and scores the batches it gets with
  :meth:`~awt_engine.classifier.Classifier.classify` (classify) or
  :func:`~awt_engine.evaluate.evaluate` (eval), exactly as a local run does;
* views are seeded per image, so every row equals the local run's row.

Ray is an optional extra (``uv sync --extra ray`` / ``pip install 'awt-engine[ray]'``),
imported only here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from awt_engine.ray_inputs import batch_inputs, input_dataset

INSTALL_HINT = "Ray is an optional extra: uv sync --extra ray (or pip install 'awt-engine[ray]')"


def import_ray():
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise ImportError(f"--ray needs Ray ({exc}). {INSTALL_HINT}") from None
    return ray


# Ray's notices that are not the user's business, kept to errors:
_QUIET = (
    # "token authentication is enabled for this Ray cluster": Ray's own default for a
    # local instance (kept: the token guards it), nothing for the user to do
    "ray._private.authentication.authentication_token_setup",
    # "progress bars disabled": the engine draws its own
    "ray.data._internal.progress",
)
# and on a local instance only: "cluster resources are not enough ... may hang forever
# unless the cluster scales up" comes from actors slow to start (importing torch, loading
# the model) on a busy machine; a local instance never scales, and the pool is checked
# to fit it (_check_fits)
_QUIET_LOCAL = ("ray.data._internal.execution.resource_manager",)
_local_instance = False  # init started Ray here (not a cluster, not the caller's instance)


def init(address: str | None = None, **kwargs) -> None:
    """Connect to ``address`` (``auto``: the running cluster) or start a local instance."""
    import logging

    global _local_instance
    ray = import_ray()
    if not ray.is_initialized():
        kwargs.setdefault("logging_level", logging.WARNING)
        for name in _QUIET + (_QUIET_LOCAL if address is None else ()):
            logging.getLogger(name).setLevel(logging.ERROR)
        if address is None:
            # A local instance's workers run this interpreter already: Ray's `uv run`
            # hook (which packages the working directory for every worker) only slows
            # each actor's start (~10 s here). A cluster keeps Ray's default.
            from ray._private import ray_constants

            ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **kwargs)
        _local_instance = address is None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the engine draws its own; logs stay readable
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _map_actors(ds, cls, kwargs: dict, concurrency: int, num_gpus: float, num_cpus: float, rows):
    """``ds.map_batches`` over a pool of ``concurrency`` actors of ``cls(**kwargs)``.

    On a local instance actors are not restarted (``max_restarts=0``): a restart would
    only repeat what killed the actor, and Ray Data's actors take their arguments from the
    object store, for which Ray's core worker prints an error line per actor that may
    restart (ray-project/ray#53727, #57733). A cluster keeps Ray Data's fault tolerance
    (a lost node's actors start again elsewhere). Ray has only the deprecated catch-all
    keywords for ``max_restarts``: used while they exist, their notice silenced.
    """
    import inspect
    import warnings

    import ray

    extra = {}
    takes_any = any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        for p in inspect.signature(ds.map_batches).parameters.values()
    )
    if _local_instance and takes_any:
        extra["max_restarts"] = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*ray_remote_args.* is deprecated")
        return ds.map_batches(
            cls,
            fn_constructor_kwargs=kwargs,
            batch_size=rows or (64 if num_gpus else 16),
            compute=ray.data.ActorPoolStrategy(size=concurrency),
            num_gpus=num_gpus or None,
            num_cpus=num_cpus,
            **extra,
        )


@dataclass(frozen=True)
class ClassifierSpec:
    """How every actor builds its classifier (``create_classifier``'s keywords)."""

    kwargs: dict[str, Any]

    def build(self, class_embeds=None, scorers=None, threads: int | None = None):
        """The classifier, in a Ray actor or task (on the device Ray gave it)."""
        import ray
        import torch

        from awt_engine.classifier import create_classifier

        if threads:  # CPU results round like a local run with the same thread count
            torch.set_num_threads(threads)
        device = actor_device(self.kwargs.get("device", "auto"), ray.get_gpu_ids())
        clf = create_classifier(**{**self.kwargs, "device": device})
        if class_embeds is not None:  # shared by the driver: never recomputed per actor
            clf.set_class_embeddings(class_embeds, clf.labels_for(scorers or [clf.scorer]))
        return clf


def refuse_split(scorers) -> None:
    """ValueError for a scorer whose images cannot be split across actors: one that keeps
    state across images, depends on their order, or needs the whole set."""
    from awt_engine.scorers import get_scorer

    for s in map(get_scorer, scorers):
        if s.stateful or s.order_dependent or s.needs_whole_set:
            raise ValueError(
                f"scorer {s.name!r} keeps state across images or depends on their order; "
                "Ray splits the images across actors, so run it locally (without --ray)"
            )


def actor_device(device, gpu_ids) -> str:
    """The device an actor (or task) computes on, from the request and the GPUs Ray gave
    it (``ray.get_gpu_ids()`` there).

    Ray makes an actor's GPUs the only ones it sees, the first being ``cuda:0``: a CUDA
    request (``cuda``, ``cuda:N``, ``auto``) means that GPU, whatever N was on the driver.
    An actor given no GPU computes on the CPU (MPS where there is one) even on a machine
    with CUDA devices: Ray would not count its use of them. Other requests are kept.
    """
    spec = str(device).strip().lower()
    if not (spec == "auto" or spec == "cuda" or spec.startswith("cuda:")):
        return str(device)
    if gpu_ids:
        import os

        if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):  # all GPUs seen
            return f"cuda:{gpu_ids[0]}"
        return "cuda:0"
    if spec != "auto":  # refused on the driver (resources): here only if Ray gave none
        return str(device)
    from awt_engine.backbone.devices import _mps_available

    return "mps" if _mps_available() else "cpu"


def _class_embeddings(spec: ClassifierSpec, scorers: list[str]):
    clf = spec.build()
    return clf.class_embeddings(clf.labels_for(scorers)).cpu()


def _embed_task(ray, num_gpus: float):
    """The one task that computes the class embeddings (on a GPU when actors have one)."""
    return (
        ray.remote(num_gpus=num_gpus)(_class_embeddings)
        if num_gpus
        else ray.remote(_class_embeddings)
    )


class _Classify:
    """The actor of :func:`classify_dataset`: one classifier, many batches."""

    def __init__(self, spec: ClassifierSpec, class_embeds, top_k: int, threads: int):
        import ray

        if isinstance(class_embeds, ray.ObjectRef):
            class_embeds = ray.get(class_embeds)
        self.clf = spec.build(class_embeds, threads=threads)
        self.top_k = top_k

    def __call__(self, batch: dict) -> dict:
        from awt_engine.inputs import input_label

        inputs = batch_inputs(batch)
        # classify streams a failure at once and the rest per forward pass: rows are put
        # back in batch order by the label each input is reported under
        rows_of: dict[str, list[int]] = {}
        for i, x in enumerate(inputs):  # a name may repeat: its rows are filled in order
            rows_of.setdefault(input_label(i, x), []).append(i)
        for rows in rows_of.values():
            rows.reverse()
        preds = [None] * len(inputs)
        for pred in self.clf.classify(inputs, top_k=self.top_k):
            preds[rows_of[pred.path].pop()] = pred
        names = [str(n) for n in batch["path"]] if "path" in batch else None
        return {
            "path": names or [p.path for p in preds],  # arrays too are named by their path
            "labels": [[x["label"] for x in p.predictions] if p.ok else [] for p in preds],
            "scores": [[x["score"] for x in p.predictions] if p.ok else [] for p in preds],
            "error": [p.error for p in preds],
        }


# Default CPU actors at most: each holds its own copy of the model (and of the class
# embeddings); past 8, the share of CPUs each gets is worth more than another copy.
_MAX_DEFAULT_CPU_ACTORS = 8


def resources(device: str, num_gpus: float | None, num_cpus: float | None, concurrency: int | None):
    """(GPUs, CPUs) per actor. ``num_gpus`` None: one GPU each when the device asks for
    CUDA, or when it is ``auto`` and the cluster has GPUs. ``num_cpus`` None: a GPU actor
    takes 1; CPU actors share the cluster's CPUs but one, left to Ray Data's read tasks
    (actors holding every CPU would starve the reads feeding them), at least a quarter
    each. A CPU actor computes with ``ceil(num_cpus)`` threads. ``concurrency`` None:
    :func:`default_concurrency`."""
    return pool(device, num_gpus, num_cpus, concurrency)[1:]


def pool(
    device: str, num_gpus: float | None, num_cpus: float | None, concurrency: int | None
) -> tuple[int, float, float]:
    """(actors, GPUs and CPUs per actor) of the pool, from the request and the cluster."""
    import ray

    total = ray.cluster_resources()
    spec = str(device).strip().lower()
    cuda = spec == "cuda" or spec.startswith("cuda:")
    if num_gpus is None:
        num_gpus = 1.0 if cuda or (spec == "auto" and total.get("GPU", 0) > 0) else 0.0
    elif cuda and not num_gpus:
        raise ValueError(
            f"--device {device} with --num-gpus 0: Ray gives the actors no GPU "
            "(give them one with --num-gpus, or use --device cpu)"
        )
    if concurrency is None:
        concurrency = default_concurrency(num_gpus, total)
    if num_cpus is None:
        cpus = total.get("CPU", 1)
        num_cpus = 1 if num_gpus else max(0.25, (cpus - 1) / concurrency)
        if num_cpus >= 1:
            num_cpus = float(int(num_cpus))
    _check_fits(num_gpus, num_cpus, total)
    return concurrency, num_gpus, num_cpus


def default_concurrency(num_gpus: float, total: dict) -> int:
    """Actors when none are asked for, from the cluster's resources (``total``:
    ``ray.cluster_resources()``): one per GPU for GPU actors, each with a CPU; for CPU
    actors, one per CPU but the one left to Ray Data's readers, at most
    ``_MAX_DEFAULT_CPU_ACTORS``; at least 1. (An autoscaling cluster is sized as it is
    now: give ``--concurrency`` for the size it will reach.)"""
    spare_cpus = max(1, int(total.get("CPU", 1)) - 1)
    if num_gpus:
        return max(1, min(int(total.get("GPU", 0) // num_gpus), spare_cpus))
    return min(spare_cpus, _MAX_DEFAULT_CPU_ACTORS)


def _check_fits(num_gpus: float, num_cpus: float, total: dict) -> None:
    """On a local instance (which never scales up), an actor that cannot fit would wait
    forever: refuse it, naming what is missing."""
    if not _local_instance:
        return
    fixes = {"GPU": "use --device cpu, or lower --num-gpus", "CPU": "lower num_cpus"}
    for what, need in (("GPU", num_gpus), ("CPU", num_cpus)):
        have = total.get(what, 0)
        if need > have:
            raise ValueError(
                f"each Ray actor asks for {need:g} {what}(s) and this machine's Ray "
                f"instance has {have:g}: {fixes[what]}"
            )


def _threads(num_gpus: float, num_cpus: float) -> int | None:
    return None if num_gpus else max(1, math.ceil(num_cpus))


def iter_predictions(rows) -> Iterator:
    """:class:`~awt_engine.classifier.Prediction` objects from classify_dataset's rows
    (an iterable of dicts, e.g. ``Dataset.iter_rows()``), as the local run yields them."""
    from awt_engine.classifier import Prediction

    for r in rows:
        if r["error"] is not None:
            yield Prediction(str(r["path"]), None, str(r["error"]))
        else:
            preds = [
                {"label": str(a), "score": float(b)}
                for a, b in zip(r["labels"], r["scores"], strict=True)
            ]
            yield Prediction(str(r["path"]), preds, None)


def classify_dataset(
    inputs,
    *,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    num_cpus: float | None = None,
    rows_per_batch: int | None = None,
    top_k: int = 5,
    scorer: str = "awt",
    preserve_order: bool = False,
    **classifier_kwargs,
):
    """Classify a Ray Dataset (a ``path`` column, ``read_images``' ``image`` column or
    ``read_binary_files``' ``bytes`` and ``path``) or local paths/folders/globs and
    remote prefixes (``s3://...``); returns a Dataset of rows ``path, labels, scores,
    error`` (the local JSONL rows, flat). ``preserve_order``: rows in input order.

    ``classifier_kwargs`` are :func:`~awt_engine.classifier.create_classifier`'s (model,
    pretrained, checkpoint, dataset, classes, views, batch_size (images per forward pass,
    as locally), ...). ``rows_per_batch`` (the images an actor gets per call) defaults to
    64 on GPU actors and 16 on CPU ones; a CPU actor computes with ``num_cpus`` threads.
    ``concurrency`` (actors) defaults to the cluster's size (:func:`default_concurrency`).
    An actor's GPU is ``cuda:0`` inside it (:func:`actor_device`): ``device="cuda:1"``
    asks for a GPU, Ray picks which.

    Every row carries the local run's labels, in the same order, and its scores up to
    float32 rounding (~1e-7 relative): BLAS rounds a matrix product over 4 images unlike
    one over 2, and its thread count changes the summation order, so a row is equal bit
    for bit when both runs encode one image per forward pass (``batch_size=1``) with the
    same thread count, and equal to rounding otherwise, the same noise as changing
    ``--batch-size`` locally.
    """
    refuse_split([scorer])
    ray = import_ray()
    init(classifier_kwargs.pop("address", None))
    ds, unreadable = input_dataset(ray, inputs)
    if preserve_order:  # rows in input order (the CLI's lines), at some cost in throughput
        # this pipeline's context (a dataset keeps a copy of the global one), not the process's
        ds.context.execution_options.preserve_order = True
    device = classifier_kwargs.get("device", "auto")
    concurrency, num_gpus, num_cpus = pool(device, num_gpus, num_cpus, concurrency)
    spec = ClassifierSpec({**classifier_kwargs, "scorer": scorer})
    embeds = _embed_task(ray, num_gpus).remote(spec, [scorer])  # one task, in the object store
    kwargs = {
        "spec": spec,
        "class_embeds": embeds,
        "top_k": top_k,
        "threads": _threads(num_gpus, num_cpus),
    }
    out = _map_actors(ds, _Classify, kwargs, concurrency, num_gpus, num_cpus, rows_per_batch)
    if unreadable:  # folders that could not be listed are error rows too, as locally
        rows = [{"path": u.path, "labels": [], "scores": [], "error": u.reason} for u in unreadable]
        out = out.union(ray.data.from_items(rows))
    return out


__all__ = ["ClassifierSpec", "classify_dataset", "import_ray", "init"]
