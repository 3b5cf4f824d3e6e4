"""The evaluation protocols as Python calls: base-to-new with its harmonic mean, a
checkpoint's own labels, local vs Ray dispatch (Ray itself: test_distributed.py)."""

from pathlib import Path

import pytest

import awt_engine
from awt_engine.dispatch import ModelSource, RayOptions, evaluate_with
from awt_engine.labelled import LabelledData, LabelledItem
from awt_engine.models.base import TrainedInfo
from awt_engine.protocols import (
    BaseToNewResult,
    evaluate_base_to_new,
    evaluate_split,
    label_options,
    model_name,
    uses_own_labels,
)
from tests.fixtures_embedders import ColourEmbedder, solid

# label order: the first half (rounded up) are CoOp's base classes, the rest new
CLASSES = ("blue", "cyan", "green", "magenta", "red", "yellow")
# (folder = label, colour drawn): each misfiled image is of another class of its own half,
# so it is scored as that class and counts wrong: base 6 of 7 right, new 6 of 8
IMAGES = [(c, c) for c in CLASSES for _ in range(2)] + [
    ("blue", "green"),
    ("yellow", "red"),
    ("yellow", "magenta"),
]


@pytest.fixture
def six_colours(tmp_path) -> LabelledData:
    items = []
    for i, (folder, colour) in enumerate(IMAGES):
        path = tmp_path / "data" / folder / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        solid(colour, (16 + i, 12)).save(path)
        items.append(LabelledItem(path, CLASSES.index(folder)))
    return LabelledData("six", CLASSES, tuple(items), "test")


def test_base_to_new_harmonic_mean_from_the_per_split_metrics(six_colours, tmp_path):
    seen = []
    both = awt_engine.evaluate_base_to_new(
        ColourEmbedder(),
        six_colours,
        ["awt", "clip"],
        options={"views": 3},
        cache_root=tmp_path / "cache",
        before=lambda part, data: seen.append((part, data.classes)),
    )
    assert isinstance(both, BaseToNewResult) and awt_engine.BaseToNewResult is BaseToNewResult
    assert awt_engine.evaluate_base_to_new is evaluate_base_to_new  # a public name
    assert seen == [("base", CLASSES[:3]), ("new", CLASSES[3:])]
    assert both.base.data.classes == CLASSES[:3] and both.new.data.classes == CLASSES[3:]
    assert both.base.classifier.classes == CLASSES[:3]  # each half is its own label set
    for scorer in ("awt", "clip"):
        b = both.base.result.metrics[scorer].acc1
        n = both.new.result.metrics[scorer].acc1
        assert (b, n) == (pytest.approx(6 / 7), pytest.approx(6 / 8))
        h = both.harmonic[scorer]
        assert (h.base, h.new) == (b, n)
        assert h.harmonic_mean == pytest.approx(2 * b * n / (b + n), rel=1e-12)
        assert h.harmonic_mean == pytest.approx(2 * (6 / 7) * (3 / 4) / (6 / 7 + 3 / 4))


def test_one_split_is_the_plain_evaluation_of_that_subset(six_colours, tmp_path):
    run = evaluate_split(ColourEmbedder(), six_colours, ["awt"], options={"views": 3})
    assert run.part == "all" and run.classifier.classes == CLASSES
    assert run.result.metrics["awt"].acc1 == pytest.approx(12 / 15)
    local = evaluate_with(run.classifier, six_colours, ["awt"], cache_root=None)
    assert local.metrics["awt"].acc1 == run.result.metrics["awt"].acc1


class _Trained(ColourEmbedder):
    checkpoint = TrainedInfo(
        Path("trained.safetensors"),
        {"labels": {"classes": ["blue", "cyan", "green"]}, "backbone": {"model": "ViT-T-1"}},
    )


def test_a_checkpoint_keeps_its_own_labels_only_for_its_own_classes(six_colours):
    from awt_engine.training.data import subsample_classes

    base, new = subsample_classes(six_colours, "base"), subsample_classes(six_colours, "new")
    net = _Trained()
    assert uses_own_labels(net, base.classes) and not uses_own_labels(net, new.classes)
    assert label_options(net, base, "dtd") == {"dataset": None, "classes": None}
    assert label_options(net, new, "dtd") == {"dataset": "dtd", "classes": list(CLASSES[3:])}
    assert not uses_own_labels(ColourEmbedder(), base.classes)  # zero-shot: no own labels
    assert model_name(net) == "ViT-T-1" and model_name(net, "RN50") == "RN50"
    assert model_name(ColourEmbedder()) == "ViT-B-16-quickgelu"


def test_a_ray_evaluation_needs_what_its_actors_load(six_colours):
    clf = awt_engine.create_classifier(classes=list(CLASSES), embedder=ColourEmbedder(), views=3)
    with pytest.raises(ValueError, match="model's source"):
        evaluate_with(clf, six_colours, ["awt"], ray=RayOptions())
    source = ModelSource("RN50", "openai", device="cpu")
    assert source.kwargs() == {
        "model": "RN50",
        "pretrained": "openai",
        "checkpoint": None,
        "llm": None,
        "device": "cpu",
        "precision": None,
    }
