"""A scorer that keeps state across images: one class and one registration, nothing in
the batch path. It counts the images it has seen and gives each image the class of its
count, so its output proves the order it saw them in."""

from dataclasses import dataclass, field

import pytest
import torch

import awt_engine
from awt_engine.distributed import refuse_split
from awt_engine.evaluate import evaluate
from awt_engine.labelled import LabelledData, LabelledItem
from awt_engine.scorers import ScoreOutput, Scorer, register_scorer, unregister_scorer
from tests.fixtures_embedders import COLOURS, ColourEmbedder, ColourLogitModel, solid

CLASSES = list(COLOURS)  # 6
NAME = "test-counting"


@dataclass
class Seen:
    """The caller's state object: input indices in the order the scorer saw them."""

    indices: list[int] = field(default_factory=list)


@pytest.fixture
def counting():
    @register_scorer
    class CountingScorer(Scorer):
        name = NAME
        summary = "counts the images it has seen; image n gets class n mod C"
        uses_views = False
        uses_descriptions = False
        stateful = True
        order_dependent = True

        def new_state(self) -> Seen:
            return Seen()

        def __call__(self, inputs, *, config, memory_budget=None, state=None, explain=False):
            if inputs.logits is not None:
                n_classes = inputs.logits.shape[2]
            else:
                n_classes = inputs.class_embeds.shape[0]
            scores = torch.zeros(inputs.n_images, n_classes)
            for b, index in enumerate(inputs.indices):
                scores[b, len(state.indices) % n_classes] = 10.0
                state.indices.append(index)
            return ScoreOutput(scores)

    yield CountingScorer
    unregister_scorer(NAME)


def _images(tmp_path, n=8, bad_at=3):
    paths = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        if i == bad_at:
            p.write_bytes(b"not an image")
        else:
            solid(CLASSES[i % 6]).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("model", [ColourEmbedder, ColourLogitModel])
def test_classify_feeds_the_callers_state_in_input_order(counting, tmp_path, model):
    paths = _images(tmp_path)
    clf = awt_engine.create_classifier(
        classes=CLASSES, embedder=model(), scorer=NAME, batch_size=3, workers=3
    )
    state = Seen()
    preds = list(clf.classify(paths, top_k=1, state=state))
    ok = [i for i in range(len(paths)) if i != 3]
    assert state.indices == ok  # the very object passed in, updated in input order
    assert [p.ok for p in preds] == [i != 3 for i in range(len(paths))]
    got = [p.predictions[0]["label"] for p in preds if p.ok]
    assert got == [CLASSES[n % 6] for n in range(len(ok))]  # image n got class n mod C


def test_predict_continues_the_same_state_across_calls(counting, tmp_path):
    paths = [p for p in _images(tmp_path, n=4, bad_at=-1)]
    clf = awt_engine.create_classifier(classes=CLASSES, embedder=ColourEmbedder(), scorer=NAME)
    state = Seen()
    first = clf.predict(paths, top_k=1, state=state)
    second = clf.predict(paths[:2], top_k=1, state=state)
    assert state.indices == [0, 1, 2, 3, 0, 1]  # indices within each call, in order
    assert [p[0]["label"] for p in first + second] == CLASSES[:6]
    fresh = clf.predict(paths[:1], top_k=1)  # no state given: a fresh one
    assert fresh[0][0]["label"] == CLASSES[0]


def test_eval_keeps_input_order_even_with_a_warm_cache(counting, tmp_path):
    paths = [p for p in _images(tmp_path, n=7, bad_at=-1)]
    items = tuple(LabelledItem(p, i % 6) for i, p in enumerate(paths))
    data = LabelledData("colours", tuple(CLASSES), items, "test")
    clf = awt_engine.create_classifier(classes=CLASSES, embedder=ColourEmbedder(), views=3)
    warm = LabelledData("colours", tuple(CLASSES), items[4:], "test")
    evaluate(clf, warm, ["awt"], cache_root=tmp_path / "cache")  # the last three cached
    state = Seen()
    res = evaluate(clf, data, ["awt", NAME], cache_root=tmp_path / "cache", states={NAME: state})
    assert state.indices == list(range(7))  # not the cached ones first
    assert res.top5[NAME][:, 0].tolist() == [n % 6 for n in range(7)]
    assert res.metrics["awt"].acc1 == 1.0  # the stateless scorer alongside, unchanged


def test_what_cannot_keep_the_order_is_refused(counting):
    with pytest.raises(ValueError, match="keeps state across images"):
        awt_engine.create_classifier(
            classes=CLASSES, embedder=ColourEmbedder(), scorer=NAME, shortlist=2
        )
    with pytest.raises(ValueError, match="run it locally"):
        refuse_split([NAME])
    refuse_split(["awt", "clip"])  # stateless scorers split freely
