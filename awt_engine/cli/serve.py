"""`awt-engine serve`: the classifier kept loaded behind an HTTP API (awt_engine/serve/app.py).

Order of the start-up, so that each mistake is answered before the slow part: options
and limits (ServeConfig) are checked, the serve extra is looked for, the key's variable
read, and the address bound (a port in use is exit 2 at once); only then is the model
loaded and the default label set embedded. uvicorn serves the bound socket; SIGTERM (or
Ctrl-C) stops accepting, lets the requests in flight finish, drains the service and
exits 0. Access logs: one JSON line per request on stderr.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from awt_engine.cli._app import app
from awt_engine.cli._common import (
    EXIT_OK,
    CacheDir,
    Checkpoint,
    Classes,
    Dataset,
    Descriptions,
    Device,
    Model,
    Precision,
    Pretrained,
    Seed,
    Template,
    Threads,
    Views,
    fail,
    parse_size,
    scorer_help,
    scorer_names,
    usage_errors,
    use_threads,
    weights_arg,
)
from awt_engine.options import option_help
from awt_engine.serve.config import ServeConfig  # torch-free: the help of each limit

_HELP = option_help(ServeConfig)
_DEFAULT = {f.name: f.default for f in dataclasses.fields(ServeConfig)}
_EXTRA_HINT = (
    "the server needs the serve extra: uv sync --extra serve (or pip install 'awt-engine[serve]')"
)


def _opt(name: str, **kw):
    """A typer option whose help is the ServeConfig field's (said once, on the field)."""
    return typer.Option(
        f"--{name.replace('_', '-')}", help=_HELP[name][:1].upper() + _HELP[name][1:] + ".", **kw
    )


@app.command()
@usage_errors
def serve(
    dataset: Dataset = None,
    classes: Classes = None,
    template: Template = None,
    model: Model = None,
    checkpoint: Checkpoint = None,
    pretrained: Pretrained = None,
    descriptions: Descriptions = None,
    views: Views = 51,
    seed: Seed = 0,
    scorer: Annotated[str | None, typer.Option("--scorer", "-s", help=scorer_help())] = None,
    device: Device = "auto",
    precision: Precision = None,
    threads: Threads = None,
    cache_dir: CacheDir = None,
    host: Annotated[str, _opt("host")] = _DEFAULT["host"],
    port: Annotated[int, _opt("port")] = _DEFAULT["port"],
    max_batch: Annotated[int, _opt("max_batch")] = _DEFAULT["max_batch"],
    max_wait_ms: Annotated[float, _opt("max_wait_ms")] = _DEFAULT["max_wait_ms"],
    max_body: Annotated[str, _opt("max_body", metavar="SIZE")] = f"{_DEFAULT['max_body'] >> 20}M",
    timeout: Annotated[float, _opt("timeout")] = _DEFAULT["timeout"],
    max_images: Annotated[int, _opt("max_images")] = _DEFAULT["max_images"],
    max_labels: Annotated[int, _opt("max_labels")] = _DEFAULT["max_labels"],
    max_queue: Annotated[int, _opt("max_queue")] = _DEFAULT["max_queue"],
    max_views: Annotated[int | None, _opt("max_views")] = None,
    label_cache: Annotated[int, _opt("label_cache")] = _DEFAULT["label_cache"],
    api_key_env: Annotated[str | None, _opt("api_key_env", metavar="NAME")] = None,
    cors_origin: Annotated[list[str] | None, _opt("cors_origins", metavar="ORIGIN")] = None,
) -> None:
    """Serve the classifier over HTTP: POST /v1/classify, /v1/embeddings; GET /v1/models,
    /health, /ready, /metrics (and the OpenAPI page at /docs).

    Binds 127.0.0.1 unless --host says otherwise. Images of concurrent requests are
    batched together (--max-batch, --max-wait-ms); answers never depend on the batch.

    Exit 0: stopped by SIGTERM or Ctrl-C after the requests in flight; 2: a usage or
    start-up error (bad option, missing serve extra, port in use, no such model).
    """
    (scorer_name,) = scorer_names([scorer] if scorer else None, None)
    config = ServeConfig(
        host=host,
        port=port,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_body=parse_size(max_body),
        timeout=timeout,
        max_images=max_images,
        max_labels=max_labels,
        max_queue=max_queue,
        label_cache=label_cache,
        api_key_env=api_key_env,
        cors_origins=tuple(cors_origin or ()),
        max_views=max_views,
    )
    if classes is None and dataset is None and checkpoint is None:
        raise fail(
            "say what the default classes are: --dataset NAME, --classes LIST or --checkpoint"
        )
    _check_extra()
    _check_key(api_key_env)
    sock = bind(config.host, config.port)  # before the model: a port in use fails at once
    use_threads(threads)
    try:
        server = _build(sock, config, locals())
        _run(server, sock)
    finally:
        sock.close()
    raise typer.Exit(EXIT_OK)


def _check_extra() -> None:
    import importlib.util

    missing = [
        m for m in ("fastapi", "uvicorn", "multipart") if importlib.util.find_spec(m) is None
    ]
    if missing:
        raise fail(f"{_EXTRA_HINT} (missing: {', '.join(missing)})")


def _check_key(name: str | None) -> None:
    import os

    if name is not None and not os.environ.get(name):
        raise fail(f"--api-key-env {name}: the environment variable {name} is not set or empty")


def bind(host: str, port: int):
    """A listening TCP socket on (host, port); exit 2 with the reason when it cannot be."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only
        # Accepted connections inherit TCP_NODELAY from the listening socket. uvicorn sets
        # it on sockets it binds itself, not on one it is given: without it a response's
        # headers and body wait on the client's delayed ACK, 40 ms a keep-alive request.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _build(sock, config: ServeConfig, given: dict):
    """The uvicorn server over the loaded classifier's service (the slow part)."""
    import logging
    import sys

    import uvicorn

    from awt_engine.classifier import create_classifier
    from awt_engine.serve.app import ACCESS_LOG, create_app
    from awt_engine.serve.service import ClassifyService

    clf = create_classifier(
        given["model"],
        weights_arg(given["pretrained"], given["checkpoint"]),
        checkpoint=given["checkpoint"],
        dataset=given["dataset"],
        classes=given["classes"],
        template=given["template"],
        descriptions=given["descriptions"],
        views=given["views"],
        seed=given["seed"],
        scorer=given["scorer_name"],
        device=given["device"],
        precision=given["precision"],
        cache_dir=given["cache_dir"],
        progress=False,
    )
    service = ClassifyService(clf, config)
    if not ACCESS_LOG.handlers:  # one JSON line per request on stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        ACCESS_LOG.addHandler(handler)
    ACCESS_LOG.setLevel(logging.INFO)
    ACCESS_LOG.propagate = False
    host, port = sock.getsockname()[:2]
    typer.echo(f"serving {service.model_name} on http://{_url_host(host)}:{port}", err=True)
    settings = uvicorn.Config(
        create_app(service, config),
        access_log=False,  # ours: one JSON line per request
        log_level="info",
        timeout_graceful_shutdown=int(config.timeout) + 1,
    )
    return uvicorn.Server(settings)


def _run(server, sock) -> None:
    """Serve until SIGTERM / SIGINT; uvicorn re-raises the signal it caught once it has
    drained, so both are answered with a handler that lets the exit be 0."""
    import signal

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not server.started:
        raise fail("the server did not start (the reason is above)")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


__all__ = ["bind", "serve"]
