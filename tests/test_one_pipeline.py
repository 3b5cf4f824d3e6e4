"""One input pipeline: every caller that needs views of images takes them from
``awt_engine.inputs.view_batches``, and the views are made there and nowhere else.

A spy replaces the one batch function wherever a module holds it, and the view makers
(``make_views``, ``make_video_views``) and the decoder (``decode_images``) everywhere but
inside the batch module: a caller that decoded or made views by hand would show up as a
"stray" call. Each workflow (classify, scores, eval, explain, training, the Ray actors)
must call ``view_batches`` and make all its views through it.
"""

from __future__ import annotations

import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import awt_engine
import awt_engine.classifier
import awt_engine.distributed
import awt_engine.evaluate
import awt_engine.explain
import awt_engine.ray_eval
import awt_engine.training.loop
from awt_engine.inputs import batches as batches_mod
from awt_engine.inputs import decode as decode_mod
from awt_engine.inputs import views as views_mod
from awt_engine.labelled import load_labelled


class Spy:
    """Who called ``view_batches``, and where views and decodes were made."""

    def __init__(self):
        self.callers: Counter[str] = Counter()  # module name of each view_batches caller
        self.in_pipeline: Counter[str] = Counter()  # view makers / decodes inside it
        self.stray: list[str] = []  # ... anywhere else

    def reset(self) -> None:
        self.callers.clear()
        self.in_pipeline.clear()
        self.stray.clear()


def _replace_everywhere(monkeypatch, real, make_wrapper, skip=()) -> None:
    """Patch every loaded module attribute that is ``real`` (modules in ``skip`` get
    none), so bound names from ``from x import real`` are caught too."""
    for name, module in list(sys.modules.items()):
        if module is None or name in skip or not name.startswith(("awt_engine", "tests")):
            continue
        for attr, value in list(vars(module).items()):
            if value is real:
                monkeypatch.setattr(module, attr, make_wrapper(name))


@pytest.fixture
def spy(monkeypatch):
    s = Spy()
    real_batches = batches_mod.view_batches

    def batches_wrapper(_home):
        def view_batches(*args, **kwargs):
            s.callers[sys._getframe(1).f_globals.get("__name__", "?")] += 1
            return real_batches(*args, **kwargs)

        return view_batches

    _replace_everywhere(monkeypatch, real_batches, batches_wrapper)
    for real in (views_mod.make_views, views_mod.make_video_views, decode_mod.decode_images):

        def inside(_home, real=real):
            def made(*args, **kwargs):
                s.in_pipeline[real.__name__] += 1
                return real(*args, **kwargs)

            return made

        def outside(home, real=real):
            def made(*args, **kwargs):
                s.stray.append(f"{real.__name__} via {home}")
                return real(*args, **kwargs)

            return made

        monkeypatch.setattr(batches_mod, real.__name__, inside("awt_engine.inputs.batches"))
        _replace_everywhere(monkeypatch, real, outside, skip={"awt_engine.inputs.batches"})
    return s


def _only_pipeline(s: Spy, caller: str, views_made: int) -> None:
    assert s.callers[caller] >= 1, (caller, dict(s.callers))
    assert s.stray == [], s.stray
    assert s.in_pipeline["make_views"] == views_made, dict(s.in_pipeline)


@pytest.fixture
def clf(tiny_clip_dir, toy_task):
    return awt_engine.create_classifier(
        tiny_clip_dir, None, classes=list(toy_task.classes), device="cpu", views=3
    )


@pytest.fixture
def test_paths(toy_task):
    return [it.path for it in load_labelled(toy_task.root, split="test").items][:4]


def test_classify_scores_and_predict_take_their_views_from_the_pipeline(spy, clf, test_paths):
    rows = list(clf.classify(test_paths))
    assert [r.path for r in rows] == [str(p) for p in test_paths]
    _only_pipeline(spy, "awt_engine.classifier", len(test_paths))
    spy.reset()
    clf.scores(test_paths[:2])
    clf.predict([np.zeros((8, 8, 3), np.uint8)])
    _only_pipeline(spy, "awt_engine.classifier", 3)


def test_eval_takes_its_views_from_the_pipeline(spy, clf, toy_task):
    data = load_labelled(toy_task.root, split="test")
    awt_engine.evaluate.evaluate(clf, data, ["awt", "clip"], cache_root=None)
    _only_pipeline(spy, "awt_engine.evaluate", len(data.items))


def test_explain_takes_its_views_from_the_pipeline(spy, clf, test_paths):
    e = awt_engine.explain.explain(clf, test_paths[0])
    assert e.boxes.shape[0] == clf.view_config.n_views
    _only_pipeline(spy, "awt_engine.explain", 1)


def test_training_takes_its_views_from_the_pipeline(spy, toy_task, train_clip_dir):
    from awt_engine.backbone import load_backbone
    from awt_engine.labels import LabelSet
    from awt_engine.methods import get_method
    from awt_engine.training.data import few_shot
    from awt_engine.training.loop import TrainConfig, fit

    data = few_shot(load_labelled(toy_task.root, split="train"), 1, seed=1)  # 5 images
    spec = get_method("coop")
    net = spec.build(load_backbone(train_clip_dir, device="cpu"), spec.config(n_ctx=2))
    net.prepare(LabelSet(data.classes), seed=1)
    fit(net, data, TrainConfig(epochs=2, lr=0.01, batch_size=2, seed=1))
    # 2 steps of 2 images per epoch (Dassl drops the last incomplete batch), 2 epochs
    _only_pipeline(spy, "awt_engine.training.loop", 2 * 2 * 2)
    assert spy.callers["awt_engine.training.loop"] == 4  # one call per step
    # decoded once, kept across epochs: the second epoch decodes nothing
    assert spy.in_pipeline["decode_images"] <= 4


def test_ray_actors_take_their_views_from_the_pipeline(
    spy, monkeypatch, tiny_clip_dir, toy_task, test_paths
):
    ray = pytest.importorskip("ray")  # the actors run in-process here: no cluster needed
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    dist = awt_engine.distributed
    spec = dist.ClassifierSpec(
        dict(model=tiny_clip_dir, pretrained=None, classes=list(toy_task.classes), device="cpu")
        | dict(views=3)
    )
    out = dist._Classify(spec, None, top_k=2, threads=None)({"path": np.array(test_paths)})
    assert out["error"] == [None] * len(test_paths)
    _only_pipeline(spy, "awt_engine.classifier", len(test_paths))
    spy.reset()
    batch = {"path": np.array(test_paths), "label": np.arange(4) % 2, "index": np.arange(4)}
    awt_engine.ray_eval._Evaluate(spec, None, ["awt"], toy_task.classes, threads=None)(batch)
    _only_pipeline(spy, "awt_engine.evaluate", len(test_paths))


def test_every_item_carries_its_input_index(tmp_path, clf):
    good = tmp_path / "a.png"
    Image.new("RGB", (20, 16), (9, 90, 200)).save(good)
    bad = tmp_path / "b.png"
    bad.write_bytes(b"not a png")
    inputs = [good, bad, np.zeros((8, 8, 3), np.uint8), tmp_path / "missing.png", good]
    seen: dict[int, str] = {}
    for item in batches_mod.view_batches(
        inputs, clf.model.preprocess, clf.view_config, batch_size=2, workers=2
    ):
        if isinstance(item, batches_mod.Failure):
            seen[item.index] = item.source
        else:
            assert item.views.shape[0] == len(item.indices) == len(item.sources)
            seen.update(zip(item.indices, item.sources, strict=True))
    assert seen == {
        0: str(good),
        1: str(bad),
        2: "<input 2>",
        3: str(tmp_path / "missing.png"),
        4: str(good),
    }
