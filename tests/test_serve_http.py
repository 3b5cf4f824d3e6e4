"""The HTTP layer of ``awt-engine serve`` (awt_engine/serve/app.py) on a real uvicorn
server bound to a free 127.0.0.1 port, in a thread; every client call has a timeout.

Two services stand behind it: :class:`FakeService` (scripted answers, gates and delays,
for the limits, errors, auth, disconnects and metrics of the HTTP layer alone), and the
real ClassifyService over the colour embedder (tests/fixtures_embedders.py), whose
answers are checked against offline :meth:`Classifier.classify` rows for the same
images, labels and settings. The ``serve`` command is run in-process (start-up errors)
and as a subprocess (answers /health, SIGTERM exits 0).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import socket
import struct
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from PIL import Image

from awt_engine.serve.app import create_app
from awt_engine.serve.config import ServeConfig
from awt_engine.serve.errors import QueueFull, Unprocessable

T = 10.0  # seconds: the bound of every client call


def png(rgb=(255, 0, 0), size=(24, 18)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(app, servers: list | None = None):
    """``app`` served by uvicorn on a free loopback port in a thread: yields the base URL
    (the uvicorn Server appended to ``servers``); a graceful shutdown on exit."""
    import uvicorn

    from awt_engine.cli.serve import bind

    sock = bind("127.0.0.1", 0)  # as the serve command binds
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    if servers is not None:
        servers.append(server)
    thread.start()
    deadline = time.monotonic() + T
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(T)
        sock.close()
        assert not thread.is_alive()


class FakeService:
    """The ClassifyService contract with scripted answers: labels sorted by name, scores
    1/n each; an image whose bytes are b"bad" is an error row; ``gate`` (an Event) holds
    classify until set; scorer "nope" is unknown; ``full`` makes it refuse (503)."""

    model_name = "fake-model"

    def __init__(self, ready=True):
        self._ready, self.started, self.stopped = ready, False, False
        self.gate: asyncio.Event | None = None
        self.full = False
        self.calls: list[dict] = []
        self.cancelled = 0
        self.delay = 0.0

    @property
    def ready(self):
        return self._ready and self.started

    def start(self):
        self.started = True

    def stop(self, drain=True):
        self.stopped = drain

    async def classify(
        self, images, *, labels=None, template=None, top_k=5, scorer=None, views=None
    ):
        if scorer == "nope":
            raise Unprocessable("unknown scorer 'nope'")
        if self.full:
            raise QueueFull("queue full", retry_after=2.0)
        self.calls.append(dict(n=len(images), labels=labels, top_k=top_k, views=views))
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        names = sorted(labels or ["a", "b", "c"])[:top_k]
        return [
            {"error": "cannot identify image file"}
            if b == b"bad"
            else {"labels": names, "scores": [1 / len(names)] * len(names)}
            for b in images
        ]

    async def embed_texts(self, texts):
        import torch

        return torch.tensor([[float(len(t)), 0.5, -1.25] for t in texts])

    async def embed_images(self, images):
        import torch

        return torch.tensor([[float(len(b)), 2.0, 0.0] for b in images])

    def stats(self):
        return {
            "queue_depth": 0,
            "batches": {1: 3, 4: 1},
            "label_cache_hits": 5,
            "label_cache_misses": 2,
            "images_dropped": 0,
        }


def fake_app(service=None, **config):
    service = service or FakeService()
    return service, create_app(service, ServeConfig(**config))


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["status"] == status and err["type"] and isinstance(err["message"], str)
    for w in words:
        assert w in err["message"], err["message"]
    return err


# -- routes and formats (fake service) -----------------------------------------------------


def test_classify_multipart_and_json_rows():
    service, app = fake_app()
    with running(app) as url, httpx.Client(base_url=url, timeout=T) as c:
        files = [("image", ("a.png", png(), "image/png")), ("image", ("b.png", b"bad", "x/y"))]
        r = c.post(
            "/v1/classify", files=files, data={"candidate_labels": "dog, cat,owl", "top_k": "2"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "fake-model"
        ok, bad = body["results"]
        assert ok == {
            "index": 0,
            "path": "a.png",
            "labels": ["cat", "dog"],
            "scores": [0.5, 0.5],
            "predictions": [{"label": "cat", "score": 0.5}, {"label": "dog", "score": 0.5}],
        }
        assert bad == {"index": 1, "path": "b.png", "error": "cannot identify image file"}
        assert service.calls[-1] == dict(n=2, labels=["dog", "cat", "owl"], top_k=2, views=None)

        b64 = base64.b64encode(png()).decode()
        r = c.post(
            "/v1/classify",
            json={
                "images": [b64, f"data:image/png;base64,{b64}", "%%%"],
                "candidate_labels": ["x", "y"],
                "views": 3,
            },
        )
        rows = r.json()["results"]
        assert [row["index"] for row in rows] == [0, 1, 2]
        assert rows[0]["labels"] == rows[1]["labels"] == ["x", "y"] and rows[0]["path"] is None
        assert "not valid base64" in rows[2]["error"]
        assert service.calls[-1] == dict(n=2, labels=["x", "y"], top_k=5, views=3)


def test_embeddings_openai_shape_and_base64_round_trip():
    _, app = fake_app()
    with running(app) as url, httpx.Client(base_url=url, timeout=T) as c:
        image = "data:image/png;base64," + base64.b64encode(png()).decode()
        r = c.post("/v1/embeddings", json={"input": ["hello", image, "ab"], "model": "fake-model"})
        body = r.json()
        assert r.status_code == 200 and body["object"] == "list" and body["model"] == "fake-model"
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        assert all(d["object"] == "embedding" for d in body["data"])
        assert body["data"][0]["embedding"] == [5.0, 0.5, -1.25]
        assert body["data"][1]["embedding"] == [float(len(png())), 2.0, 0.0]
        assert body["usage"] == {"prompt_tokens": 0, "total_tokens": 0}

        r = c.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"})
        raw = base64.b64decode(r.json()["data"][0]["embedding"])
        assert struct.unpack("<3f", raw) == (5.0, 0.5, -1.25)  # little-endian float32

        assert_error(c.post("/v1/embeddings", json={"input": "x", "model": "gpt-9"}), 404)
        assert_error(c.post("/v1/embeddings", json={"input": [[1, 2]]}), 422, "token arrays")
        assert_error(c.post("/v1/embeddings", json={"input": "x", "encoding_format": "int8"}), 422)
        assert_error(
            c.post("/v1/embeddings", json={"input": ["http://example.com/cat.jpg"]}),
            422,
            "never fetched",
        )


def test_models_health_ready_and_openapi():
    service = FakeService(ready=False)
    _, app = fake_app(service)
    with running(app) as url, httpx.Client(base_url=url, timeout=T) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert_error(c.get("/ready"), 503, "loading")
        service._ready = True
        assert c.get("/ready").status_code == 200
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and models["data"][0]["id"] == "fake-model"
        paths = c.get("/openapi.json").json()["paths"]
        body = paths["/v1/classify"]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(body)
        assert {
            "/v1/classify",
            "/v1/embeddings",
            "/v1/models",
            "/health",
            "/ready",
            "/metrics",
        } <= set(paths)
        assert_error(c.get("/nowhere"), 404)
    assert service.stopped  # the lifespan drained the service


# -- limits and bad input (fake service) ---------------------------------------------------


def test_every_limit_answers_its_status_and_a_json_error():
    service, app = fake_app(max_body=4096, max_images=2, max_labels=3, max_views=4)
    with running(app) as url, httpx.Client(base_url=url, timeout=T) as c:
        img = ("image", ("a.png", png(), "image/png"))
        big = ("image", ("big.bin", b"x" * 5000, "application/octet-stream"))
        assert_error(c.post("/v1/classify", files=[big]), 413, "4096")
        # no Content-Length (chunked): the bytes are counted as they arrive
        chunks = iter([b'{"images": ["' + b"A" * 3000, b"A" * 3000 + b'"]}'])
        r = c.post("/v1/classify", content=chunks, headers={"content-type": "application/json"})
        assert_error(r, 413, "4096")
        assert_error(c.post("/v1/classify", files=[img] * 3), 413, "3 images")
        assert_error(c.post("/v1/classify", json={"images": ["AAAA"] * 3}), 413)
        many = {"candidate_labels": "a,b,c,d"}
        assert_error(c.post("/v1/classify", files=[img], data=many), 422, "4 candidate labels")
        assert_error(c.post("/v1/classify", files=[img], data={"views": "9"}), 422, "views")
        assert_error(c.post("/v1/classify", files=[img], data={"top_k": "0"}), 422, "top_k")
        assert_error(c.post("/v1/classify", files=[img], data={"scorer": "nope"}), 422, "nope")
        assert_error(c.post("/v1/classify", json={"images": []}), 422, "no image")
        assert_error(
            c.post("/v1/classify", json={"images": ["https://example.com/a.jpg"]}),
            422,
            "never fetched",
        )
        url_field = {"image": "http://169.254.169.254/latest"}  # a text field, not a file
        assert_error(c.post("/v1/classify", files=[img], data=url_field), 422, "never fetched")
        bad_json = c.post(
            "/v1/classify", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert_error(bad_json, 400, "malformed JSON")
        broken = b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\nabc'
        r = c.post(
            "/v1/classify",
            content=broken,
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert r.status_code in (400, 422), r.text  # 422: parsed to no image file at all
        assert_error(
            c.post("/v1/classify", content=b"x", headers={"content-type": "text/plain"}), 400
        )
        service.full = True
        r = c.post("/v1/classify", files=[img])
        assert_error(r, 503)
        assert r.headers["retry-after"] == "2"


def test_timeout_504_and_the_work_is_cancelled():
    service, app = fake_app(timeout=0.3)
    service.gate = asyncio.Event()  # never set: classify waits forever
    with running(app) as url, httpx.Client(base_url=url, timeout=T) as c:
        r = c.post("/v1/classify", files=[("image", ("a.png", png(), "image/png"))])
        assert_error(r, 504, "timeout")
    assert service.cancelled == 1


def test_client_disconnect_drops_the_work():
    service, app = fake_app()
    service.gate = asyncio.Event()
    with running(app) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{url}/v1/classify", files=[("image", ("a.png", png(), "image/png"))], timeout=0.5
            )
        deadline = time.monotonic() + T
        while service.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert service.cancelled == 1
        metrics = httpx.get(f"{url}/metrics", timeout=T).text
        assert 'awt_http_requests_total{route="/v1/classify",method="POST",code="499"} 1' in metrics


def test_graceful_shutdown_finishes_the_request_in_flight_then_drains():
    """What SIGTERM does to uvicorn (should_exit): no new connections, the request in
    flight answered, then the lifespan's stop(drain=True)."""
    service, app = fake_app()
    service.delay = 0.8
    servers: list = []
    with running(app, servers) as url:
        answer: list = []
        img = [("image", ("a.png", png(), "image/png"))]
        worker = threading.Thread(
            target=lambda: answer.append(httpx.post(f"{url}/v1/classify", files=img, timeout=T))
        )
        worker.start()
        deadline = time.monotonic() + T
        while not service.calls and time.monotonic() < deadline:
            time.sleep(0.01)
        servers[0].should_exit = True  # uvicorn's SIGTERM handler does just this
        time.sleep(0.2)
        assert not service.stopped  # the request is still in flight
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", timeout=2)
        worker.join(T)
        assert answer[0].status_code == 200 and answer[0].json()["results"][0]["labels"]
    assert service.stopped


# -- security ------------------------------------------------------------------------------


def test_bearer_key_checked_and_never_logged(monkeypatch, caplog):
    key = "s3cret-key-value"
    monkeypatch.setenv("TEST_AWT_KEY", key)
    _, app = fake_app(api_key_env="TEST_AWT_KEY")
    caplog.set_level(logging.INFO, logger="awt_engine.serve.access")
    with running(app) as url, httpx.Client(base_url=url, timeout=T) as c:
        assert c.get("/health").status_code == 200  # open
        err = assert_error(c.get("/v1/models"), 401)
        assert key not in json.dumps(err)
        assert_error(c.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
        r = c.get("/v1/models", headers={"Authorization": f"Bearer {key}x"})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert key not in r.text
        ok = c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200 and key not in ok.text
        r = c.post(
            "/v1/classify",
            files=[("image", ("a.png", png(), "image/png"))],
            headers={"Authorization": f"Bearer {key}"},
        )
        assert r.status_code == 200
    lines = [
        json.loads(rec.getMessage())
        for rec in caplog.records
        if rec.name == "awt_engine.serve.access"
    ]
    assert key not in caplog.text
    assert {"method", "route", "status", "ms", "images"} <= set(lines[-1])
    assert [(x["route"], x["status"]) for x in lines[:3]] == [
        ("/health", 200),
        ("/v1/models", 401),
        ("/v1/models", 401),
    ]
    assert lines[-1]["images"] == 1 and lines[-1]["status"] == 200


def test_cors_off_unless_configured(monkeypatch):
    _, app = fake_app()
    origin = {"Origin": "https://app.example"}
    with running(app) as url:
        r = httpx.get(f"{url}/v1/models", headers=origin, timeout=T)
        assert "access-control-allow-origin" not in r.headers
    monkeypatch.setenv("TEST_AWT_KEY", "k")
    _, app = fake_app(cors_origins=("https://app.example",), api_key_env="TEST_AWT_KEY")
    with running(app) as url:
        auth = {**origin, "Authorization": "Bearer k"}
        r = httpx.get(f"{url}/v1/models", headers=auth, timeout=T)
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        preflight = {**origin, "Access-Control-Request-Method": "POST"}
        r = httpx.options(f"{url}/v1/classify", headers=preflight, timeout=T)  # no key sent
        assert r.status_code == 200 and r.headers["access-control-allow-origin"]
        r = httpx.get(f"{url}/v1/models", headers={"Origin": "https://evil.example"}, timeout=T)
        assert r.status_code == 401 and "access-control-allow-origin" not in r.headers


def test_metrics_count_what_was_sent():
    _, app = fake_app()
    with running(app) as url, httpx.Client(base_url=url, timeout=T) as c:
        img = ("image", ("a.png", png(), "image/png"))
        for _ in range(3):
            assert c.post("/v1/classify", files=[img, img]).status_code == 200
        assert c.post("/v1/classify", files=[img], data={"scorer": "nope"}).status_code == 422
        c.get("/health")
        text = c.get("/metrics").text
    assert 'awt_http_requests_total{route="/v1/classify",method="POST",code="200"} 3' in text
    assert 'awt_http_requests_total{route="/v1/classify",method="POST",code="422"} 1' in text
    assert 'awt_http_requests_total{route="/health",method="GET",code="200"} 1' in text
    assert 'awt_images_total{route="/v1/classify"} 7' in text
    assert 'awt_http_request_duration_seconds_count{route="/v1/classify"} 4' in text
    assert (
        'awt_batch_size_bucket{le="1.0"} 3' in text and 'awt_batch_size_bucket{le="4.0"} 4' in text
    )
    assert "awt_batch_size_count 4" in text and "awt_batch_size_sum 7.0" in text
    assert "awt_label_cache_hits_total 5" in text and "awt_label_cache_misses_total 2" in text
    assert "awt_queue_depth 0" in text and "awt_ready 1" in text


# -- the real service over the colour embedder: answers equal offline classify ------------

NAMES = ["red", "green", "blue", "yellow"]


def colour_png(colour: str, seed: int, size=(20, 16)) -> bytes:
    """A noisy image of ``colour`` (noise: its crops differ, so the views matter)."""
    import numpy as np

    from tests.fixtures_embedders import COLOURS

    rng = np.random.default_rng(seed)
    base = np.array(COLOURS[colour]) * 200 + 20
    pixels = np.clip(base + rng.normal(0, 40, (size[1], size[0], 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def colour_classifier(classes=NAMES, scorer="awt", views=4):
    from awt_engine.classifier import create_classifier
    from tests.fixtures_embedders import ColourEmbedder

    return create_classifier(
        embedder=ColourEmbedder(), classes=classes, views=views, seed=0, scorer=scorer, workers=1
    )


def offline_rows(images: list[bytes], top_k: int, **settings) -> list[dict]:
    """The rows offline ``Classifier.classify`` gives for these image bytes."""
    clf = colour_classifier(**settings)
    pictures = [Image.open(io.BytesIO(b)) for b in images]
    preds = list(clf.classify(pictures, top_k=top_k))
    return [{"predictions": p.predictions} if p.ok else {"error": p.error} for p in preds]


def same_predictions(got: list[dict], want: list[dict]) -> bool:
    return [p["label"] for p in got] == [p["label"] for p in want] and all(
        abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(got, want, strict=True)
    )


@contextmanager
def real_server(**config):
    from awt_engine.serve.service import ClassifyService

    config = ServeConfig(max_wait_ms=20.0, **config)
    service = ClassifyService(colour_classifier(), config)
    with running(create_app(service, config)) as url:
        yield url, service


def test_concurrent_mixed_requests_equal_offline_classify():
    """Eight clients at once, valid and invalid requests mixed; each valid answer equals
    offline classify of the same images (alone there, batched with others here)."""
    from concurrent.futures import ThreadPoolExecutor

    colours = ["red", "green", "blue", "yellow", "cyan", "magenta"]
    images = [colour_png(colours[i % 6], i) for i in range(12)]
    default = offline_rows(images, 3)
    candidates = ["magenta", "cyan", "red"]
    chosen = offline_rows(images, 2, classes=candidates)
    plain = offline_rows(images, 3, scorer="clip")

    def request(k: int, c: httpx.Client):
        picks = [(k + j) % 12 for j in range(1 + k % 3)]
        files = [("image", (f"{i}.png", images[i], "image/png")) for i in picks]
        kind = k % 6
        if kind == 0:
            return "default", picks, c.post("/v1/classify", files=files, data={"top_k": "3"})
        if kind == 1:
            data = {"candidate_labels": ",".join(candidates), "top_k": "2"}
            return "chosen", picks, c.post("/v1/classify", files=files, data=data)
        if kind == 2:
            body = {"images": [base64.b64encode(images[i]).decode() for i in picks], "top_k": 3}
            body["scorer"] = "clip"
            return "plain", picks, c.post("/v1/classify", json=body)
        if kind == 3:
            return 422, picks, c.post("/v1/classify", files=files, data={"scorer": "no-such"})
        if kind == 4:
            return (
                400,
                picks,
                c.post(
                    "/v1/classify", content=b"[1,", headers={"content-type": "application/json"}
                ),
            )
        files.append(("image", ("junk.png", b"not an image", "image/png")))
        return "junk", picks, c.post("/v1/classify", files=files, data={"top_k": "3"})

    with real_server(max_batch=8) as (url, service), httpx.Client(base_url=url, timeout=T) as c:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda k: request(k, c), range(36)))
        metrics = c.get("/metrics").text
        stats = service.stats()
    assert stats["queue_depth"] == 0 and stats["images_dropped"] == 0
    assert max(int(k) for k in stats["batches"]) > 1  # requests were batched together
    sent_images = 0
    for kind, picks, r in answers:
        if isinstance(kind, int):
            assert_error(r, kind)
            continue
        assert r.status_code == 200, r.text
        rows = r.json()["results"]
        want = {"default": default, "chosen": chosen, "plain": plain, "junk": default}[kind]
        for i, row in zip(picks, rows, strict=False):
            assert same_predictions(row["predictions"], want[i]["predictions"]), (kind, i, row)
            assert row["labels"] == [p["label"] for p in row["predictions"]]
        if kind == "junk":
            assert rows[-1]["path"] == "junk.png" and "error" in rows[-1]
        sent_images += len(picks)
    counts = {
        k: sum(1 for a in answers if a[0] == k)
        for k in ("default", "chosen", "plain", "junk", 422, 400)
    }
    ok = counts["default"] + counts["chosen"] + counts["plain"] + counts["junk"]
    assert (
        f'awt_http_requests_total{{route="/v1/classify",method="POST",code="200"}} {ok}' in metrics
    )
    assert (
        f'awt_http_requests_total{{route="/v1/classify",method="POST",code="422"}} {counts[422]}'
        in metrics
    )
    assert (
        f'awt_http_requests_total{{route="/v1/classify",method="POST",code="400"}} {counts[400]}'
        in metrics
    )
    assert f"awt_batch_size_sum {float(sent_images)}" in metrics  # every decodable image, once
    assert "awt_label_cache_hits_total" in metrics and "awt_ready 1" in metrics


def test_real_embeddings_and_ready():
    with real_server() as (url, service), httpx.Client(base_url=url, timeout=T) as c:
        assert c.get("/ready").status_code == 200
        image = "data:image/png;base64," + base64.b64encode(colour_png("red", 0)).decode()
        r = c.post(
            "/v1/embeddings", json={"input": ["a red thing", image], "encoding_format": "base64"}
        )
        assert r.status_code == 200, r.text
        vectors = [struct.unpack("<3f", base64.b64decode(d["embedding"])) for d in r.json()["data"]]
        floats = c.post("/v1/embeddings", json={"input": ["a red thing", image]}).json()["data"]
        for v, d in zip(vectors, floats, strict=True):  # base64 is the float32 of the floats
            assert v == struct.unpack("<3f", struct.pack("<3f", *d["embedding"]))
            assert abs(sum(x * x for x in v) - 1) < 1e-5
        assert vectors[0][0] > 0.8 and vectors[1][0] > 0.8  # red, as the colour embedder says
        assert c.get("/v1/models").json()["data"][0]["id"] == service.model_name
    assert not service.ready  # stopped by the lifespan


# -- the serve command ---------------------------------------------------------------------


def test_cli_startup_errors_exit_2_with_the_reason(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from awt_engine.cli import app

    runner = CliRunner()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        res = runner.invoke(app, ["serve", "--classes", "red,green", "--port", str(port)])
        assert res.exit_code == 2, res.output
        assert f"cannot listen on 127.0.0.1:{port}" in res.output and "in use" in res.output
    res = runner.invoke(app, ["serve", "--checkpoint", str(tmp_path / "none.safetensors")])
    assert res.exit_code == 2 and "does not exist" in res.output
    monkeypatch.delenv("NO_SUCH_AWT_KEY", raising=False)
    res = runner.invoke(app, ["serve", "--classes", "a,b", "--api-key-env", "NO_SUCH_AWT_KEY"])
    assert res.exit_code == 2 and "NO_SUCH_AWT_KEY" in res.output
    res = runner.invoke(app, ["serve", "--classes", "a,b", "--max-batch", "0"])
    assert res.exit_code == 2 and "max_batch" in res.output
    res = runner.invoke(app, ["serve", "--classes", "a,b", "--scorer", "nope"])
    assert res.exit_code == 2 and "nope" in res.output


@pytest.mark.slow
def test_cli_serves_then_sigterm_drains_and_exits_0(tiny_clip_dir, tmp_path):
    """A subprocess ``awt-engine serve`` with the tiny random CLIP (no download): /health,
    /ready and a classify answer, then SIGTERM: exit 0, access lines on stderr."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AWT_KEY_FOR_TEST": "k-123"}
    command = [sys.executable, "-c", "from awt_engine.cli import main; main()", "serve"]
    command += ["--model", tiny_clip_dir, "--classes", "red,green,blue", "--views", "2"]
    command += ["--device", "cpu", "--cache-dir", str(tmp_path / "c"), "--port", str(port)]
    command += ["--api-key-env", "AWT_KEY_FOR_TEST"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k-123"}
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not answer /health"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert httpx.get(f"{url}/ready", headers=auth, timeout=T).status_code == 200
        r = httpx.post(
            f"{url}/v1/classify",
            files=[("image", ("a.png", png(), "image/png"))],
            headers=auth,
            timeout=T,
        )
        assert r.status_code == 200 and len(r.json()["results"][0]["labels"]) == 3, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(T)
    err = proc.stderr.read()
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert [(x["route"], x["status"]) for x in lines][-2:] == [
        ("/ready", 200),
        ("/v1/classify", 200),
    ]
    assert "k-123" not in err


def test_real_service_limits():
    from tests.fixtures_images import BOMB_SIZE, bomb_png

    img = ("image", ("a.png", colour_png("red", 1), "image/png"))
    with (
        real_server(max_queue=1, max_labels=3) as (url, _),
        httpx.Client(base_url=url, timeout=T) as c,
    ):
        r = c.post("/v1/classify", files=[img, img])  # more than the queue holds: retry later
        assert_error(r, 503)
        assert int(r.headers["retry-after"]) >= 1
        bomb = ("image", ("bomb.png", bomb_png(*BOMB_SIZE), "image/png"))
        r = c.post("/v1/classify", files=[img, bomb])
        assert r.status_code == 200, r.text  # a decompression bomb: its error row, no OOM
        assert "labels" in r.json()["results"][0] and "too large" in r.json()["results"][1]["error"]
        assert_error(c.post("/v1/classify", files=[img], data={"scorer": "nope"}), 422, "nope")
        labels = {"candidate_labels": "a,b,c,d"}
        assert_error(c.post("/v1/classify", files=[img], data=labels), 422)
        assert c.post("/v1/classify", files=[img]).json()["results"][0]["labels"][0] == "red"


def test_the_listening_socket_sends_small_responses_at_once():
    """uvicorn sets TCP_NODELAY only on sockets it binds itself; serve binds its own (to
    fail fast on a busy port), so it must set it, or every keep-alive response waits
    for the client's delayed ACK (40 ms on Linux). Accepted sockets inherit it."""
    from awt_engine.cli.serve import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        client = socket.create_connection(sock.getsockname()[:2], timeout=T)
        conn, _ = sock.accept()
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        conn.close()
        client.close()
    finally:
        sock.close()
