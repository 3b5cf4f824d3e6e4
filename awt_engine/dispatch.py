"""Where a run happens: in this process, or on a pool of Ray Data actors.

Classify and eval give the same rows and metrics either way (DESIGN section 1); this
module is the one place that chooses between :mod:`awt_engine.classifier` /
:mod:`awt_engine.evaluate` and :mod:`awt_engine.distributed`, so the CLI (and any Python
caller) only says *whether* to use Ray. The Ray actors load the model themselves, so a
run names the model by a :class:`ModelSource` (what to load) rather than by the loaded
object.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from awt_engine.classifier import (
    DEFAULT_WEIGHTS,
    Classifier,
    Prediction,
    create_classifier,
    load_model,
)
from awt_engine.evaluate import EvalResult, evaluate
from awt_engine.labelled import LabelledData


@dataclass(frozen=True)
class ModelSource:
    """What :func:`~awt_engine.classifier.load_model` loads: each Ray actor loads the model
    from this as the calling process did (a loaded model does not travel)."""

    model: str | None = None  # open_clip name; None: the checkpoint's, else ViT-B-16-quickgelu
    pretrained: Any = (
        DEFAULT_WEIGHTS  # load_model's default: the checkpoint's weights, else OpenAI's
    )
    checkpoint: str | Path | None = None  # a trained method's checkpoint; None: zero-shot CLIP
    llm: str | None = None  # the method's LLM; None: the method's (or the checkpoint's) own
    device: str = "auto"  # "auto" picks CUDA, then MPS, then the CPU
    precision: str | None = None  # None: fp16 on GPU, fp32 on CPU

    def kwargs(self) -> dict[str, Any]:
        """The keywords of load_model (and of create_classifier's loading part)."""
        return {
            "model": self.model,
            "pretrained": self.pretrained,
            "checkpoint": self.checkpoint,
            "llm": self.llm,
            "device": self.device,
            "precision": self.precision,
        }

    def load(self):
        """The Embedder or LogitModel this source names."""
        return load_model(**self.kwargs())


@dataclass(frozen=True)
class RayOptions:
    """A run on Ray Data actors; every field None takes distributed.pool's defaults."""

    address: str | None = None  # None: a local Ray instance; "auto": the cluster running here
    concurrency: int | None = None  # actors; None: one per GPU (GPU actors), else per CPU budget
    num_gpus: float | None = None  # GPUs per actor; None: 1 when the device asks for CUDA
    # CPUs per actor, and a CPU actor's threads (the CLI's --threads); None: pool's share
    num_cpus: float | None = None


def classify_stream(
    inputs: Sequence[Any],
    source: ModelSource,
    options: Mapping[str, Any],
    *,
    top_k: int = 5,
    ray: RayOptions | None = None,
    progress: bool = False,
    total: int | None = None,
) -> Iterator[Prediction]:
    """:class:`Prediction` rows for ``inputs``, in input order, made here or (``ray``) by an
    actor pool. ``options`` are create_classifier's keywords other than the model's
    loading (labels, views, scorer, batches, budgets); ``total`` sizes the progress bar
    (None: unknown, as for s3:// prefixes)."""
    if ray is not None:
        return _ray_predictions(inputs, source, options, top_k, ray, progress, total)
    clf = create_classifier(**source.kwargs(), **options, progress=progress)
    return clf.classify(inputs, top_k=top_k, progress=progress, total=total)


def _ray_predictions(inputs, source, options, top_k, ray, progress, total):
    """The predictions of a Ray Data actor pool, in input order, as a local run yields them."""
    from awt_engine import distributed
    from awt_engine._progress import progress_bar

    distributed.init(ray.address)
    ds = distributed.classify_dataset(
        inputs,
        **source.kwargs(),
        **options,
        top_k=top_k,
        concurrency=ray.concurrency,
        num_gpus=ray.num_gpus,
        num_cpus=ray.num_cpus,
        preserve_order=True,
    )
    with progress_bar(total, progress, desc="classify (ray)") as bar:
        for pred in distributed.iter_predictions(ds.iter_rows()):
            bar.update(1)
            yield pred


def evaluate_with(
    clf: Classifier,
    data: LabelledData,
    scorers: Sequence[str],
    *,
    source: ModelSource | None = None,
    options: Mapping[str, Any] | None = None,
    ray: RayOptions | None = None,
    cache_root: Path | None = None,
    image_cache: bool = True,
    progress: bool = False,
    eval_options: Mapping[str, Any] | None = None,
) -> EvalResult:
    """:func:`~awt_engine.evaluate.evaluate` of ``clf`` here, or (``ray``) on an actor
    pool whose actors build the classifier from ``source`` and ``options`` (the keywords
    ``clf`` was made with; the image cache is not used there). ``eval_options``:
    evaluate's ``orders``, ``order_seed`` and ``ood``."""
    eval_options = dict(eval_options or {})
    if ray is None:
        return evaluate(
            clf,
            data,
            scorers,
            cache_root=cache_root,
            image_cache=image_cache,
            progress=progress,
            **eval_options,
        )
    if source is None or options is None:
        raise ValueError("a Ray evaluation needs the model's source and the classifier options")
    from awt_engine import distributed, ray_eval

    distributed.init(ray.address)
    return ray_eval.evaluate_dataset(
        {**source.kwargs(), **options},
        data,
        scorers,
        concurrency=ray.concurrency,
        num_gpus=ray.num_gpus,
        num_cpus=ray.num_cpus,
        progress=progress,
        **eval_options,
    )


__all__ = ["ModelSource", "RayOptions", "classify_stream", "evaluate_with"]
