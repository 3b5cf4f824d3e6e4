"""Serving: a loaded classifier answering requests, images of concurrent requests batched
together (docs/design.md section 1: the server is one more caller of the run loop).

============  ================================================================
module        job
============  ================================================================
``config``    :class:`ServeConfig`: limits and batching settings (no torch)
``errors``    request-level errors with their HTTP status (no torch)
``batcher``   the dynamic batcher: one worker thread, bounded queue (no torch)
``labelsets`` the bounded LRU of embedded label sets, hits and misses (no torch)
``service``   :class:`ClassifyService`: decode, queue, score each image against
              its own request's labels and scorer, asyncio-awaitable
============  ================================================================

Importing this package is cheap: public names load lazily (``__getattr__``), so neither
torch nor a web framework is imported until a name that needs it is used.
"""

import importlib

_EXPORTS = {
    "BadRequest": "awt_engine.serve.errors",
    "Batcher": "awt_engine.serve.batcher",
    "ClassifyService": "awt_engine.serve.service",
    "LabelSetCache": "awt_engine.serve.labelsets",
    "QueueFull": "awt_engine.serve.errors",
    "ServeConfig": "awt_engine.serve.config",
    "ServeError": "awt_engine.serve.errors",
    "Timeout": "awt_engine.serve.errors",
    "TooLarge": "awt_engine.serve.errors",
    "Unprocessable": "awt_engine.serve.errors",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'awt_engine.serve' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(_EXPORTS)


__all__ = sorted(_EXPORTS)
