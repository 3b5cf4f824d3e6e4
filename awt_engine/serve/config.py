"""The server's settings: where it listens, how it batches, and its limits.

Every field is declared with :func:`awt_engine.options.option` (help text and bounds), as
method and adaptation configs are; :class:`ServeConfig` checks itself when built, each
error naming the field and the value. Imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from awt_engine.options import check_config, option

MIB = 2**20


@dataclass(frozen=True)
class ServeConfig:
    """Listening address, dynamic batching and per-request limits of ``awt-engine serve``."""

    # loopback by default: exposing the server is an explicit choice (the security rule)
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = option(8000, "TCP port (0: any free port)", bounds=(0, 65535))
    # 32 images of V views: enough to fill a GPU at V = 1, and a few model calls at V = 51
    max_batch: int = option(32, "images per model call, across requests", bounds=(1, 4096))
    # 10 ms: small against one model call (tens of ms), so a lone request barely waits
    max_wait_ms: float = option(
        10.0, "how long the first image of a batch waits for company (ms)", bounds=(0.0, 60_000.0)
    )
    # 32 MiB: a few full-resolution photos per request
    max_body: int = option(32 * MIB, "bytes per request body (more: 413)", bounds=(1, 2**40))
    timeout: float = option(60.0, "seconds per request, then 504", bounds=(1e-3, 86_400.0))
    max_images: int = option(64, "images per request (more: 413)", bounds=(1, 100_000))
    # 2,000: ImageNet-21k-sized label sets are a separate deployment; 1,000 fits
    max_labels: int = option(
        2000, "candidate labels (or texts to embed) per request (more: 422)", bounds=(1, 10**6)
    )
    max_queue: int = option(
        1024, "images waiting for the model; more: 503 with Retry-After", bounds=(1, 10**7)
    )
    label_cache: int = option(
        32, "label sets kept embedded in memory (least recently used dropped)", bounds=(1, 10**5)
    )
    api_key_env: str | None = option(
        None, "environment variable holding the bearer token (None: no auth)"
    )
    cors_origins: tuple[str, ...] = option((), "origins allowed by CORS (empty: CORS off)")
    max_views: int | None = option(
        None,
        "the most views a request may ask for (None: the server's --views)",
        bounds=(1, 10_000),
    )
    # 1 GiB of decoded pixels held at once (decoding and queued): two 24-Mpx photos decode
    # in ~0.2 GiB; one image over it is that image's error row, a full budget a 503
    pixel_budget: int = option(
        2**30, "bytes of decoded pixels held at once across requests", bounds=(MIB, 2**40)
    )
    # 2 decode threads: decoding overlaps the model (RunConfig.workers' reason)
    decode_workers: int = option(2, "threads decoding request images", bounds=(1, 256))

    def __post_init__(self) -> None:
        check_config(self)
        if not self.host.strip():
            raise ValueError(f"host must name an address, got {self.host!r}")
        if self.api_key_env is not None and not self.api_key_env.strip():
            raise ValueError(
                f"api_key_env must name a variable or be None, got {self.api_key_env!r}"
            )
        origins = self.cors_origins
        if isinstance(origins, str) or not all(isinstance(o, str) and o for o in origins):
            raise ValueError(f"cors_origins must be a tuple of origins, got {origins!r}")
        object.__setattr__(self, "cors_origins", tuple(origins))
        object.__setattr__(self, "max_wait_ms", float(self.max_wait_ms))
        object.__setattr__(self, "timeout", float(self.timeout))

    @property
    def max_wait(self) -> float:
        """``max_wait_ms`` in seconds."""
        return self.max_wait_ms / 1000.0


__all__ = ["ServeConfig"]
