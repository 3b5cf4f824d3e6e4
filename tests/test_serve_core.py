"""The server's framework-free core (awt_engine.serve): dynamic batching that never changes
an answer, the label-set LRU, limits and errors, cancellation, timeout and drain.

References are independent of the code under test: offline ``Classifier.classify`` /
``predict`` rows for the same bytes and settings (the run loop the server must agree
with), a float64 softmax written here for the ``clip`` scorer on known colours, and plain
lists for the LRU and the batcher's bounds. Models are the tiny fixtures (colour
embedder / logit model; the tiny open_clip model in one test).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import awt_engine
from awt_engine.inputs import EncodedImage, ViewConfig, make_views
from awt_engine.labels import LabelSet
from awt_engine.serve.batcher import Batcher
from awt_engine.serve.config import ServeConfig
from awt_engine.serve.labelsets import LabelSetCache
from awt_engine.serve.service import (
    BadRequest,
    ClassifyService,
    QueueFull,
    Timeout,
    TooLarge,
    Unprocessable,
)
from tests.fixtures_embedders import COLOURS, ColourEmbedder, ColourLogitModel, solid
from tests.fixtures_images import BOMB_SIZE, bomb_png

NAMES = list(COLOURS)  # six colour classes
TOL = 1e-5


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def noisy(seed: int, size=(40, 30)) -> bytes:
    """A PNG whose random crops differ (so views matter): a colour gradient plus noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 256, 3)
    ramp = np.linspace(0, 120, w)[None, :, None] * rng.uniform(-1, 1, 3)
    noise = rng.integers(-40, 40, (h, w, 3))
    arr = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
    return png(Image.fromarray(arr))


class SpyEmbedder(ColourEmbedder):
    """ColourEmbedder counting its image-tower calls, optionally held at a gate."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []  # b of each embed_views call
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def embed_views(self, views):
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        self.calls.append(views.shape[0])
        return super().embed_views(views)


@contextlib.contextmanager
def serving(clf, **config):
    svc = ClassifyService(clf, ServeConfig(**config))
    svc.start()
    try:
        yield svc
    finally:
        svc.stop(drain=False)


def classifier(model=None, **kw):
    kw.setdefault("views", 5)
    return awt_engine.create_classifier(classes=NAMES, embedder=model or SpyEmbedder(), **kw)


def offline(clf, images: list[bytes], top_k=5) -> list[dict]:
    """Offline classify rows, in the server's row shape."""
    rows = []
    encoded = [EncodedImage(f"{i}.png", b) for i, b in enumerate(images)]
    for p in clf.classify(encoded, top_k=top_k):
        if p.ok:
            rows.append(
                {
                    "labels": [d["label"] for d in p.predictions],
                    "scores": [d["score"] for d in p.predictions],
                }
            )
        else:
            rows.append({"error": p.error})
    return rows


def assert_rows_equal(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        if "error" in w:
            continue
        assert g["labels"] == w["labels"]
        assert np.allclose(g["scores"], w["scores"], atol=TOL, rtol=0)


# -- answers never depend on the batch --------------------------------------------------


@pytest.mark.parametrize("model_kind", ["embedder", "logits"])
def test_alone_and_among_others_equal_offline(model_kind):
    model = SpyEmbedder() if model_kind == "embedder" else ColourLogitModel()
    clf = classifier(model)
    images = [noisy(s) for s in range(8)]
    target = images[3]
    want = offline(clf, images)

    async def go(svc):
        alone = await svc.classify([target])
        together = await asyncio.gather(*(svc.classify([im]) for im in images))
        among = await svc.classify(images)
        return alone, together, among

    with serving(clf, max_batch=8, max_wait_ms=300) as svc:
        alone, together, among = asyncio.run(go(svc))
        batches = svc.stats()["batches"]
    assert max(batches) > 1  # images of several requests did share a model call
    assert_rows_equal(alone, [want[3]])
    assert_rows_equal([r[0] for r in together], want)
    assert_rows_equal(among, want)
    assert np.allclose(alone[0]["scores"], together[3][0]["scores"], atol=TOL, rtol=0)


def test_mixed_requests_in_one_batch_each_get_their_own_labels_and_scorer():
    model = SpyEmbedder()
    clf = classifier(model)
    clip = classifier(model, scorer="clip")
    images = [noisy(s) for s in range(4)]
    subset = ["blue", "red", "cyan"]
    enc = [EncodedImage(f"{i}.png", b) for i, b in enumerate(images)]
    want_subset = clf.predict(enc, top_k=3, candidate_labels=subset)
    want_clip = offline(clip, images, top_k=2)
    want_default = offline(clf, images)

    async def go(svc):
        return await asyncio.gather(
            svc.classify(images, labels=subset, top_k=3),
            svc.classify(images, scorer="clip", top_k=2),
            svc.classify(images),
        )

    with serving(clf, max_batch=12, max_wait_ms=1000) as svc:  # 12 images fill it at once
        got_subset, got_clip, got_default = asyncio.run(go(svc))
        assert max(svc.stats()["batches"]) > 4  # requests shared batches
    assert_rows_equal(
        got_subset,
        [
            {"labels": [d["label"] for d in p], "scores": [d["score"] for d in p]}
            for p in want_subset
        ],
    )
    assert_rows_equal(got_clip, want_clip)
    assert_rows_equal(got_default, want_default)


def test_clip_scores_match_a_float64_reference():
    """Solid colours under the clip scorer: softmax of 100 * cosine of (colour + 0.15).
    Mixed colours give probabilities well inside (0, 1)."""
    clf = classifier(scorer="clip")
    colours = [(255, 0, 0), (0, 255, 255), (230, 200, 40), (130, 118, 110)]

    def unit(v):
        v = [x + 0.15 for x in v]
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    with serving(clf) as svc:
        images = [png(Image.new("RGB", (24, 18), c)) for c in colours]
        rows = asyncio.run(svc.classify(images, top_k=6))
    for colour, row in zip(colours, rows, strict=True):
        img = unit([v / 255 for v in colour])
        logits = {
            c: 100.0 * sum(a * b for a, b in zip(img, unit(COLOURS[c]), strict=True)) for c in NAMES
        }
        top = max(logits.values())
        z = sum(math.exp(v - top) for v in logits.values())
        probs = {c: math.exp(v - top) / z for c, v in logits.items()}
        assert sorted(row["labels"]) == sorted(NAMES)  # ties (equidistant colours) in any order
        assert row["scores"] == sorted(row["scores"], reverse=True)
        got = dict(zip(row["labels"], row["scores"], strict=True))
        assert all(abs(got[c] - probs[c]) < TOL for c in NAMES)
    assert 0.01 < rows[3]["scores"][0] < 0.99  # a mixed colour: a real distribution


def test_tiny_open_clip_served_equals_offline_and_embeds_texts(tiny_clip_dir, tmp_path):
    clf = awt_engine.create_classifier(
        tiny_clip_dir, classes=NAMES, views=3, device="cpu", cache_dir=tmp_path / "c"
    )
    images = [noisy(s, size=(48, 40)) for s in range(3)]
    want = offline(clf, images)

    async def go(svc):
        rows = await asyncio.gather(*(svc.classify([im]) for im in images))
        texts = await svc.embed_texts(["a red thing", "a dog"])
        return rows, texts

    with serving(clf, max_wait_ms=200) as svc:
        rows, texts = asyncio.run(go(svc))
    assert_rows_equal([r[0] for r in rows], want)
    ref = clf.model.backbone.encode_text(["a red thing", "a dog"]).double()
    ref = ref / ref.norm(dim=-1, keepdim=True)
    assert texts.shape == ref.shape
    assert torch.allclose(texts.double(), ref, atol=1e-5)


# -- batching ---------------------------------------------------------------------------


def test_concurrent_requests_are_batched_never_beyond_max_batch():
    model = SpyEmbedder()
    clf = classifier(model)
    images = [noisy(s) for s in range(12)]

    async def go(svc):
        return await asyncio.gather(*(svc.classify([im]) for im in images))

    with serving(clf, max_batch=8, max_wait_ms=500) as svc:
        asyncio.run(go(svc))
        batches = svc.stats()["batches"]
    assert len(model.calls) < len(images)  # one model call served several requests
    assert max(model.calls) > 1 and max(model.calls) <= 8
    assert max(batches) <= 8 and sum(k * n for k, n in batches.items()) == len(images)


def test_batcher_bounds_and_discard():
    """A plain-list reference: every item runs once, in batches of at most max_batch."""
    seen: list[list[int]] = []
    gate = threading.Event()
    b = Batcher(
        lambda batch: (gate.wait(5), seen.append(list(batch))),
        max_batch=3,
        max_wait=0.05,
        max_queue=5,
    )
    b.start()
    b.submit([0])
    time.sleep(0.2)  # the worker holds [0] at the gate
    b.submit([1, 2, 3, 4, 5])
    with pytest.raises(QueueFull):
        b.submit([6])
    assert b.discard([2, 4, 99]) == 2
    gate.set()
    assert b.call(lambda: "ran").result(5) == "ran"
    b.stop(drain=True)
    assert [x for batch in seen for x in batch] == [0, 1, 3, 5]
    assert all(len(batch) <= 3 for batch in seen)
    with pytest.raises(QueueFull):
        b.submit([7])


# -- label sets -------------------------------------------------------------------------


def test_new_labels_are_embedded_once_and_the_lru_is_bounded(tmp_path):
    model = SpyEmbedder()
    clf = classifier(model, cache_dir=None)
    clf.cache_root = None  # no on-disk cache: every miss encodes text
    img = [png(solid("red"))]
    sets = [["red", "teal"], ["blue", "plum"], ["green", "navy"]]

    async def go(svc):
        first = model.text_calls
        a1 = await svc.classify(img, labels=sets[0])
        after_first = model.text_calls
        a2 = await svc.classify(img, labels=sets[0])
        assert model.text_calls == after_first == first + 1  # the second was a hit
        assert a1 == a2
        await svc.classify(img, labels=sets[1])
        await svc.classify(img, labels=sets[2])  # bound 2: sets[0] drops out
        before = model.text_calls
        await svc.classify(img, labels=sets[0])
        assert model.text_calls == before + 1  # recomputed after eviction
        # two concurrent first requests for a new set: one encoding
        before = model.text_calls
        await asyncio.gather(*(svc.classify(img, labels=["red", "sand"]) for _ in range(3)))
        assert model.text_calls == before + 1

    with serving(clf, label_cache=2) as svc:
        start_stats = svc.stats()
        asyncio.run(go(svc))
        stats = svc.stats()
    assert stats["label_cache_size"] <= 2
    assert stats["label_cache_misses"] - start_stats["label_cache_misses"] == 5
    assert stats["label_cache_hits"] >= 3


def test_label_set_cache_against_a_list_reference():
    computed: list[str] = []
    cache = LabelSetCache(3, lambda labels: computed.append(labels.classes[0]) or labels.classes[0])

    def now(fn):
        from concurrent.futures import Future

        f = Future()
        f.set_result(fn())
        return f

    order: list[str] = []  # reference LRU: most recent last
    hits = misses = 0
    for name in ["a", "b", "a", "c", "d", "b", "a", "e", "a"]:
        got = cache.future(LabelSet((name,)), now).result()
        assert got == name
        if name in order:
            hits += 1
            order.remove(name)
        else:
            misses += 1
        order.append(name)
        order = order[-3:]
        assert len(cache) == len(order)
    assert (cache.hits, cache.misses) == (hits, misses)
    assert computed == [n for n in computed]  # each miss computed once
    assert len(computed) == misses


# -- bad input and limits ---------------------------------------------------------------


def test_error_rows_for_unusable_images_amid_good_ones():
    clf = classifier()
    good = [noisy(1), noisy(2)]
    big = png(Image.new("RGB", (700, 700), (10, 20, 30)))  # > 1 MiB to decode
    sent = [good[0], b"not an image", bomb_png(*BOMB_SIZE), big, b"", good[1]]
    with serving(clf, pixel_budget=2**20) as svc:
        rows = asyncio.run(svc.classify(sent))
        assert svc.stats()["decoded_bytes"] == 0  # every hold released
    assert [("error" in r) for r in rows] == [False, True, True, True, True, False]
    assert "cannot identify" in rows[1]["error"]
    assert "exceeds limit" in rows[2]["error"]
    assert "pixel budget" in rows[3]["error"]
    assert_rows_equal([rows[0], rows[5]], offline(clf, good))


def test_request_level_errors_carry_their_status():
    clf = classifier()
    img = [png(solid("red"))]
    with serving(clf, max_images=2, max_labels=3, max_views=5) as svc:
        cases = [
            (dict(images=img * 3), TooLarge, 413),
            (dict(images=img, labels=["a", "b", "c", "d"]), Unprocessable, 422),
            (dict(images=img, scorer="no-such-scorer"), Unprocessable, 422),
            (dict(images=img, template="no placeholder"), Unprocessable, 422),
            (dict(images=img, labels=["red", "red"]), Unprocessable, 422),
            (dict(images=img, views=6), Unprocessable, 422),
            (dict(images=img, top_k=0), Unprocessable, 422),
            (dict(images=[]), BadRequest, 400),
        ]
        for kw, kind, status in cases:
            images = kw.pop("images")
            with pytest.raises(kind) as err:
                asyncio.run(svc.classify(images, **kw))
            assert err.value.status == status and err.value.message
        with pytest.raises(Unprocessable):
            asyncio.run(svc.embed_images([b"junk"]))


def test_queue_full_then_recovers():
    model = SpyEmbedder()
    model.gate = threading.Event()
    clf = classifier(model)
    imgs = [noisy(s) for s in range(4)]

    async def go(svc):
        first = asyncio.create_task(svc.classify(imgs[:1]))
        await asyncio.to_thread(model.entered.wait, 5)  # the worker holds image 0
        second = asyncio.create_task(svc.classify(imgs[1:3]))
        while svc.stats()["queue_depth"] < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as err:
            await svc.classify(imgs[3:])
        assert err.value.status == 503 and err.value.retry_after > 0
        model.gate.set()
        return await first, await second

    with serving(clf, max_queue=2, max_batch=2, max_wait_ms=1) as svc:
        first, second = asyncio.run(go(svc))
        assert svc.stats()["decoded_bytes"] == 0
    assert "labels" in first[0] and len(second) == 2


def test_timeout_drops_queued_images():
    model = SpyEmbedder()
    model.gate = threading.Event()
    clf = classifier(model)

    async def go(svc):
        held = asyncio.create_task(svc.classify([noisy(0)]))
        await asyncio.to_thread(model.entered.wait, 5)
        with pytest.raises(Timeout) as err:
            await svc.classify([noisy(1), noisy(2)])
        assert err.value.status == 504
        model.gate.set()
        with contextlib.suppress(Timeout):
            await held

    with serving(clf, timeout=0.5, max_batch=1) as svc:
        asyncio.run(go(svc))
        stats = svc.stats()
    assert stats["images_dropped"] == 2 and stats["queue_depth"] == 0
    assert stats["decoded_bytes"] == 0


def test_cancelled_request_drops_its_queued_images():
    model = SpyEmbedder()
    model.gate = threading.Event()
    clf = classifier(model)

    async def go(svc):
        held = asyncio.create_task(svc.classify([noisy(0)]))
        await asyncio.to_thread(model.entered.wait, 5)
        gone = asyncio.create_task(svc.classify([noisy(s) for s in range(1, 4)]))
        while svc.stats()["queue_depth"] < 3:
            await asyncio.sleep(0.01)
        gone.cancel()  # the client disconnected
        with pytest.raises(asyncio.CancelledError):
            await gone
        model.gate.set()
        return await held

    with serving(clf, max_batch=1) as svc:
        held = asyncio.run(go(svc))
        stats = svc.stats()
    assert "labels" in held[0]
    assert stats["images_dropped"] == 3 and stats["queue_depth"] == 0
    assert stats["decoded_bytes"] == 0
    assert sum(model.calls) == 1  # the cancelled images never reached the model


def test_stop_drains_in_flight_work_then_refuses():
    model = SpyEmbedder()
    model.gate = threading.Event()
    clf = classifier(model)
    svc = ClassifyService(clf, ServeConfig(max_batch=1))
    svc.start()
    assert svc.ready

    async def go():
        first = asyncio.create_task(svc.classify([noisy(0)]))
        await asyncio.to_thread(model.entered.wait, 5)
        second = asyncio.create_task(svc.classify([noisy(1)]))
        while svc.stats()["queue_depth"] < 1:
            await asyncio.sleep(0.01)
        stopper = threading.Thread(target=svc.stop, kwargs={"drain": True})
        stopper.start()
        await asyncio.sleep(0.1)
        assert not svc.ready
        with pytest.raises(QueueFull):
            await svc.classify([noisy(2)])
        model.gate.set()
        rows = await first, await second
        await asyncio.to_thread(stopper.join, 5)
        return rows

    first, second = asyncio.run(go())
    assert "labels" in first[0] and "labels" in second[0]
    assert svc.stats()["images_dropped"] == 0


# -- embeddings -------------------------------------------------------------------------


def test_embeddings_equal_the_models_own():
    model = SpyEmbedder()
    clf = classifier(model)
    images = [noisy(s) for s in range(3)]
    texts = ["a red apple", "blue sky", "something"]

    async def go(svc):
        return await svc.embed_images(images), await svc.embed_texts(texts)

    with serving(clf) as svc:
        img, txt = asyncio.run(go(svc))
        with pytest.raises(BadRequest):
            asyncio.run(svc.embed_texts("one string"))
    assert img.shape == (3, 3) and txt.shape == (3, 3)
    assert torch.allclose(img.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3), atol=1e-6)
    ref_txt = ColourEmbedder().embed_texts([[t] for t in texts])[:, 0]
    assert torch.allclose(txt, ref_txt, atol=1e-6)
    for b, data in enumerate(images):
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        views = make_views(pil, model.preprocess, ViewConfig(n_views=1))  # view 0
        ref = ColourEmbedder().embed_views(views[None])[0, 0]
        assert torch.allclose(img[b], ref, atol=1e-6)


def test_logit_model_refuses_embeddings_and_config_checks():
    clf = classifier(ColourLogitModel())
    with serving(clf) as svc:
        with pytest.raises(Unprocessable):
            asyncio.run(svc.embed_images([png(solid("red"))]))
        assert svc.model_name == ColourLogitModel.identity
    for bad, word in [
        ({"max_batch": 0}, "max_batch"),
        ({"port": -1}, "port"),
        ({"max_wait_ms": "x"}, "max_wait_ms"),
        ({"cors_origins": "*"}, "cors"),
    ]:
        with pytest.raises(ValueError, match=word):
            ServeConfig(**bad)
    with pytest.raises(ValueError, match="state"):
        ClassifyService(classifier(scorer="awt+tda"), ServeConfig())


def test_package_import_is_cheap():
    """Importing the package, its config, errors, batcher and label cache loads no torch."""
    code = (
        "import sys, awt_engine.serve, awt_engine.serve.config, awt_engine.serve.errors, "
        "awt_engine.serve.batcher, awt_engine.serve.labelsets\n"
        "assert 'torch' not in sys.modules and 'fastapi' not in sys.modules, 'heavy import'\n"
        "assert awt_engine.serve.ServeConfig().port == 8000"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
