"""The HTTP layer: :func:`create_app` makes the FastAPI app over a ClassifyService.

Routes (the OpenAPI description is the framework's, at ``/openapi.json`` and ``/docs``):

``POST /v1/classify``
    Multipart: one ``image`` file field per image (repeated), and optional form fields
    ``candidate_labels`` (a comma list; the field may repeat), ``top_k``, ``template``,
    ``scorer`` and ``views``. Or JSON: ``{"images": [base64 or data URL, ...],
    "candidate_labels": [...] or "a,b", "top_k": 5, "template": "a photo of a {}",
    "scorer": "awt", "views": 21}``. Without ``candidate_labels`` the server's own label
    set is used. The answer (200), one row per image in the order sent::

        {"model": "ViT-B-16-quickgelu/openai",
         "results": [
           {"index": 0, "path": "cat.jpg",
            "labels": ["cat", "dog"], "scores": [0.93, 0.07],
            "predictions": [{"label": "cat", "score": 0.93}, {"label": "dog", "score": 0.07}]},
           {"index": 1, "path": "broken.png", "error": "cannot identify image file"}]}

    ``labels`` / ``scores`` are the top ``top_k`` best first, as the Parquet rows of
    ``awt-engine classify`` hold them; ``predictions`` is the same as ``[{label, score}]``,
    what the CLI's JSONL rows and the Hugging Face zero-shot pipeline give; ``score`` is
    the softmax over the label set (a probability). ``path`` is the uploaded file's name
    (null for JSON images). An image that cannot be read is an error row, the request
    still 200; every other problem fails the whole request (below).

``POST /v1/embeddings``
    OpenAI's embeddings API: ``{"input": "text" or ["text", ...], "model": ...,
    "encoding_format": "float" | "base64"}`` -> ``{"object": "list", "data": [{"object":
    "embedding", "index": i, "embedding": [...]}], "model": ..., "usage": {...}}``;
    ``base64`` is the little-endian float32 bytes of each vector, base64-encoded, as
    OpenAI defines it. Extension: an input string that is a data URL
    (``data:image/png;base64,...``) is an image, embedded by the image tower (view 0);
    texts and images mix freely, each vector in the joint space, L2-normalised. Token
    arrays are refused (422); ``usage`` counts no tokens (0). ``model`` may be omitted;
    another model's name is a 404.

``GET /v1/models`` (the one model, OpenAI's list shape), ``GET /health`` (200 while the
process runs; never needs a key), ``GET /ready`` (200 once the model and the default label
set are loaded, else 503), ``GET /metrics`` (Prometheus text, :mod:`.metrics`).

Errors are ``{"error": {"message": ..., "type": ..., "status": N}}``: 400 malformed
multipart or JSON, 401 no or wrong key (with ``--api-key-env``), 404, 413 body over
``max_body`` (the Content-Length, and the bytes counted while reading) or more images
than ``max_images``, 422 bad values (too many labels, unknown scorer, a URL given as an
image: images are never fetched), 503 queue full (with ``Retry-After``), 504 over
``timeout``. A client that disconnects has its work cancelled (status 499 in the log).

Each request is one JSON line on the ``awt_engine.serve.access`` logger (method, route,
status, ms, images); the key is never logged or echoed.
"""

import asyncio
import hmac
import inspect
import json
import logging
import os
import time
from contextlib import asynccontextmanager

from awt_engine.serve.errors import ServeError
from awt_engine.serve.http_io import (
    OPENAPI_CLASSIFY,
    OPENAPI_EMBEDDINGS,
    HTTPProblem,
    classify_request,
    embedding_request,
    encode_vector,
    error_body,
    json_body,
    result_row,
)
from awt_engine.serve.metrics import CONTENT_TYPE, Metrics, render

ACCESS_LOG = logging.getLogger("awt_engine.serve.access")
OPEN_PATHS = frozenset({"/health"})  # answered without a key


def create_app(service, config):
    """The FastAPI app serving ``service`` (a ClassifyService) under ``config`` (a
    ServeConfig): routes, limits, key checks, CORS, metrics and access logs. Its lifespan
    starts the service and, at shutdown, stops it after the queued work is done."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_app):
        # start() loads the default label set: off the event loop; a failure stops uvicorn
        # before it serves (the command's exit 2)
        await _off_loop(service.start)
        try:
            yield
        finally:  # uvicorn has let the requests in flight finish; the queue drains
            await _off_loop(service.stop, drain=True)

    app = FastAPI(
        title="awt-engine",
        summary="Zero-shot image classification (AWT) and CLIP embeddings over HTTP.",
        lifespan=lifespan,
    )

    problem = _problem_maker(JSONResponse)
    _error_handlers(app, problem)
    _info_routes(app, service, config, metrics, problem)
    _work_routes(app, service, config)
    _middleware(app, config, metrics)
    return app


def _problem_maker(JSONResponse):
    def problem(status: int, message: str, headers=None):
        return JSONResponse(error_body(status, message), status_code=status, headers=headers)

    return problem


def _error_handlers(app, problem) -> None:
    """Every failure as ``{"error": {...}}`` with its status (never a traceback)."""
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPProblem)
    async def _own(_request, exc: HTTPProblem):
        return problem(exc.status, exc.message, exc.headers)

    @app.exception_handler(ServeError)
    async def _service(_request, exc: ServeError):
        retry = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(max(1, round(retry)))} if retry is not None else None
        return problem(exc.status, exc.message, headers)

    @app.exception_handler(HTTPException)
    async def _framework(_request, exc: HTTPException):
        return problem(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(ClientGone)
    async def _gone(_request, _exc):  # nobody reads it: for the log and the metrics
        return problem(499, "the client closed the connection; its work was dropped")

    @app.exception_handler(Exception)
    async def _bug(_request, exc: Exception):  # logged by uvicorn; no internals echoed
        return problem(500, "internal server error")

    @app.exception_handler(ValueError)
    async def _value(_request, exc: ValueError):  # bad labels, template, ...: the user's
        return problem(422, str(exc))


def _info_routes(app, service, config, metrics, problem) -> None:
    """/health, /ready, /v1/models, /metrics."""
    from fastapi.responses import Response

    @app.get("/health", summary="Alive: 200 while the process runs.")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="200 once the model and the default label set are loaded.")
    async def ready():
        if not service.ready:
            return problem(503, "loading: the model or the default label set is not ready")
        return {"status": "ready", "model": service.model_name}

    @app.get("/v1/models", summary="The model served (OpenAI's list shape).")
    async def models():
        return {"object": "list", "data": [_model_card(service.model_name)]}

    @app.get("/metrics", summary="Prometheus text exposition.")
    async def metrics_page():
        text = render(metrics, service.stats(), service.ready, config.max_batch)
        return Response(text, media_type=CONTENT_TYPE)


def _work_routes(app, service, config) -> None:
    """/v1/classify and /v1/embeddings."""
    from fastapi import Request

    @app.post(
        "/v1/classify",
        summary="Classify images (multipart uploads or JSON base64).",
        openapi_extra=OPENAPI_CLASSIFY,
    )
    async def classify(request: Request):
        images, names, settings = await classify_request(request, config)
        request.state.images = len(images)
        good = [i for i, b in enumerate(images) if isinstance(b, bytes)]
        work = service.classify([images[i] for i in good], **settings) if good else _none()
        rows = await _cancellable(request, work, config.timeout)
        by_index = dict(zip(good, rows, strict=True))
        results = [
            result_row(i, names[i], by_index.get(i, {"error": images[i]}))
            for i in range(len(images))
        ]
        return {"model": service.model_name, "results": results}

    @app.post(
        "/v1/embeddings",
        summary="OpenAI-compatible embeddings of texts and images.",
        openapi_extra=OPENAPI_EMBEDDINGS,
    )
    async def embeddings(request: Request):
        body = await json_body(request)
        texts, pictures, fmt = embedding_request(body, service.model_name, config)
        request.state.images = len(pictures)
        vectors = await _cancellable(
            request, _embed(service, texts, pictures), config.timeout
        )  # {index: [D] floats}
        data = [
            {"object": "embedding", "index": i, "embedding": encode_vector(vectors[i], fmt)}
            for i in range(len(vectors))
        ]
        usage = {"prompt_tokens": 0, "total_tokens": 0}
        return {"object": "list", "data": data, "model": service.model_name, "usage": usage}


def _middleware(app, config, metrics) -> None:
    """The guard (key, body limit, metrics, access log) and, when configured, CORS."""
    key = os.environ.get(config.api_key_env, "") if config.api_key_env else None
    if config.api_key_env and not key:
        raise ValueError(f"--api-key-env {config.api_key_env}: that variable is not set")
    routes = [r.path for r in app.routes]
    app.add_middleware(Guard, max_body=config.max_body, key=key, metrics=metrics, routes=routes)
    if config.cors_origins:  # outside the guard: preflights carry no key, errors get CORS
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )


async def _embed(service, texts: dict, pictures: dict) -> list[list[float]]:
    """The vectors of texts and images, in input order: [N][D] floats."""
    out: dict[int, list[float]] = {}
    if texts:
        vectors = await service.embed_texts(list(texts.values()))  # [n, D]
        out.update(zip(texts, vectors.float().tolist(), strict=True))
    if pictures:
        vectors = await service.embed_images(list(pictures.values()))  # [m, D]
        out.update(zip(pictures, vectors.float().tolist(), strict=True))
    return [out[i] for i in range(len(out))]


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": _STARTED, "owned_by": "awt-engine"}


_STARTED = int(time.time())


async def _none() -> list:
    return []


async def _off_loop(fn, *args, **kwargs) -> None:
    """``fn`` on a thread (awaited if it is a coroutine function: a service may be either)."""
    if inspect.iscoroutinefunction(fn):
        await fn(*args, **kwargs)
    else:
        await asyncio.to_thread(fn, *args, **kwargs)


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


async def _cancellable(request, work, timeout: float):
    """``work``'s result; cancelled (and the service's queue freed) when the client
    disconnects (:class:`ClientGone`) or, a backstop to the service's own timeout, half a
    second after ``timeout`` seconds (504)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {task, watch}, timeout=timeout + 0.5, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for t in (task, watch):
            t.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)
    if task in done and not task.cancelled():
        return task.result()  # a ServeError of the service is raised here
    if watch in done:
        raise ClientGone()
    raise HTTPProblem(504, f"no answer within the server's timeout ({timeout:g} s)")


async def _disconnected(request) -> None:
    """Returns once the client has gone (the body is read, so the next message is
    ``http.disconnect``)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the guard: key, body limit, metrics, access log -------------------------------------


class Guard:
    """Pure ASGI middleware around the app: the bearer key (constant-time), the body
    limit (Content-Length, then bytes counted as they arrive), then one metrics record and
    one access-log line per request."""

    def __init__(self, app, *, max_body: int, key: str | None, metrics: Metrics, routes=()):
        self.app, self.max_body, self.metrics = app, max_body, metrics
        self.routes = frozenset(routes)  # paths of the routes (none has a parameter)
        self.key = key.encode() if key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]
        scope.setdefault("state", {})

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            early = self._refuse(scope)
            if early is not None:
                await _send_json(send_status, *early)
            else:
                await self.app(scope, self._counting(receive), send_status)
        finally:
            self._record(scope, status[0] or 500, time.perf_counter() - start)

    def _refuse(self, scope) -> tuple | None:
        """(status, message, headers) answered without running the app, or None."""
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        if self.key is not None and scope.get("path") not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                return (
                    401,
                    "missing or wrong API key (Authorization: Bearer KEY)",
                    {"WWW-Authenticate": "Bearer"},
                )
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return 400, "Content-Length is not a number", {}
            if too_big:
                return 413, f"body over the server's limit of {self.max_body} bytes", {}
        return None

    def _counting(self, receive):
        seen = [0]

        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.max_body:
                    raise HTTPProblem(413, f"body over the server's limit of {self.max_body} bytes")
            return message

        return counted

    def _record(self, scope, status: int, seconds: float) -> None:
        path = scope.get("path", "")
        route = getattr(scope.get("route"), "path", None)
        route = route or (path if path in self.routes else "other")
        images = int(scope["state"].get("images", 0) or 0)
        method = scope.get("method", "")
        self.metrics.record(route, method, status, seconds, images)
        line = {
            "method": method,
            "route": route,
            "path": path[:200],
            "status": status,
            "ms": round(seconds * 1000, 2),
            "images": images,
        }
        ACCESS_LOG.info(json.dumps(line, ensure_ascii=True))


async def _send_json(send, status: int, message: str, headers: dict) -> None:
    body = json.dumps(error_body(status, message)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


__all__ = ["ACCESS_LOG", "Guard", "HTTPProblem", "create_app", "error_body"]
