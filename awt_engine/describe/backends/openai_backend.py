"""Any OpenAI-compatible chat-completions endpoint (vLLM serve, TGI, llama.cpp, OpenAI, ...).

Stdlib only: ``urllib`` for HTTP and a bounded set of daemon worker threads for concurrency
(an interrupted run returns at once instead of waiting for requests in flight). Requests that
fail with 429, 5xx, a timeout or a dropped connection are retried with exponential backoff; a
``Retry-After`` header is honoured and pauses every worker, not only the one that got it.
The API key is read from an environment variable, is only ever sent to the origin of
``base_url`` (a redirect elsewhere is refused) and never appears in an error message.

Every request has a total deadline (``timeout_s``: connecting, waiting and reading the whole
answer; a watchdog shuts its socket when the time is up, since a socket timeout alone bounds
each read, not a server trickling a byte per read) and the answer a size cap
(``max_answer_bytes``). An answer too slow or too large is retried like a timeout; if it stays
so, that request is given up (no completions: its class may end short) and the run goes on.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import os
import queue
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from awt_engine.describe.backends._http import (
    ERROR_BODY_BYTES,
    Deadline,
    HTTPHandler,
    HTTPSHandler,
    Rejected,
    Retryable,
    parse_retry_after,
    read_capped,
)
from awt_engine.describe.backends.base import (
    ChatBackend,
    ChatRequest,
    Completion,
    OnResult,
    SamplingConfig,
)
from awt_engine.describe.errors import BackendError

log = logging.getLogger("awt_engine.describe")

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))

# userinfo ("user:secret@") of a URL, with or without its scheme
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)?[^/?#]*@")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` part replaced by ``***@``."""
    return _USERINFO.sub(lambda m: (m.group(1) or "") + "***@", url, count=1)


def _looks_like_key(value: str) -> bool:
    """True for a value of --api-key-env that is a key rather than a variable's name."""
    if not _ENV_NAME.fullmatch(value):
        return True
    return (
        len(value) >= 20 and any(ch.islower() for ch in value) and any(ch.isdigit() for ch in value)
    )


def _origin(url: str) -> tuple[str, str, int | None]:
    """scheme, host, port (the default one filled in): where a request really goes."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


def _origin_text(origin: tuple[str, str, int | None]) -> str:
    scheme, host, port = origin
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


@dataclass(frozen=True)
class OpenAIConfig:
    base_url: str  # e.g. http://localhost:8000/v1 ; "/chat/completions" is appended
    model: str
    # Name of the environment variable holding the API key; None: use OPENAI_API_KEY if set,
    # else send no key (local servers). The key itself is never stored.
    api_key_env: str | None = None
    # Parallel requests: keeps one vLLM/TGI server's batch full without tripping the
    # per-key rate limits of hosted APIs.
    concurrency: int = 16
    # One long answer from a busy server takes tens of seconds; a request not complete within
    # this many seconds (connecting, waiting and reading the whole answer) is retried.
    timeout_s: float = 120.0
    # Largest answer accepted, in bytes. An answer of 512 tokens is a few KiB of JSON; 4 MiB
    # leaves room for many samples (n) and verbose servers, while a runaway or hostile server
    # cannot fill memory. A larger answer is retried like a timeout, then given up.
    max_answer_bytes: int = 4 * 2**20
    # 1+2+4+8+16 s of backoff rides out a server restart or a rate-limit window.
    max_retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0  # also caps a server's Retry-After

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"--base-url must start with http:// or https://, got {redact_url(self.base_url)!r}"
            )
        parts = urllib.parse.urlsplit(self.base_url)
        if "@" in parts.netloc:
            raise ValueError(
                f"--base-url must not hold credentials ({redact_url(self.base_url)}): put the API "
                "key in an environment variable and name it with --api-key-env"
            )
        try:
            _ = parts.port  # raises on a port that is not a number in range
        except ValueError:
            raise ValueError(f"--base-url {self.base_url!r} has an invalid port") from None
        if not parts.hostname:
            raise ValueError(f"--base-url {self.base_url!r} has no host")
        if not self.model:
            raise ValueError("the openai backend needs --model (the name the server serves)")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if isinstance(self.max_answer_bytes, bool) or not isinstance(self.max_answer_bytes, int):
            raise ValueError(f"max_answer_bytes must be an integer, got {self.max_answer_bytes!r}")
        if self.max_answer_bytes < 1024:
            raise ValueError(f"max_answer_bytes must be >= 1024, got {self.max_answer_bytes}")
        if not math.isfinite(self.timeout_s) or self.timeout_s <= 0:
            raise ValueError(
                f"--timeout must be a finite number of seconds > 0, got {self.timeout_s}"
            )
        for name in ("backoff_s", "max_backoff_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only within the configured origin: the Authorization header (the API
    key) must never reach another host."""

    def __init__(self, origin: tuple[str, str, int | None]) -> None:
        super().__init__()
        self.origin = origin

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        target = _origin(urllib.parse.urljoin(req.full_url, newurl))
        if target != self.origin:
            fp.close()
            here, there = _origin_text(self.origin), _origin_text(target)
            raise BackendError(
                f"{here} redirected the request (HTTP {code}) to another host, {there}; not "
                f"followed, so the API key is only ever sent to {here}. If {there} is the "
                "server to use, give it as --base-url"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_SKIPPED = object()  # a request whose answer was no longer wanted
_GAVE_UP = object()  # a request whose answer stayed too large or too slow (it gets none)


class OpenAIBackend(ChatBackend):
    name = "openai"

    def __init__(
        self,
        config: OpenAIConfig,
        *,
        sleep: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        jitter: bool = True,
    ) -> None:
        super().__init__(config.model)
        self.config = config
        # sleep and clock are injectable so tests run without waiting; jitter=False makes
        # the backoff delays exact.
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        self._pause_lock = threading.Lock()
        self._pause_until = 0.0
        self._api_key = self._read_key()
        self._opener = urllib.request.build_opener(
            _SameOriginRedirects(_origin(config.url)), HTTPHandler(), HTTPSHandler()
        )

    def _read_key(self) -> str | None:
        env = self.config.api_key_env
        if env is None:
            return os.environ.get("OPENAI_API_KEY") or None
        key = os.environ.get(env) if _ENV_NAME.fullmatch(env) else None
        if key:
            return key
        if _looks_like_key(env):  # never echo it: it may be the key itself
            raise ValueError(
                "--api-key-env takes the NAME of an environment variable holding the API key, "
                "but no variable of the name given is set and the value given looks like a "
                "key rather than a name (not shown); put the key in a variable, e.g. "
                "`export LLM_KEY=...`, and pass --api-key-env LLM_KEY"
            )
        raise ValueError(f"--api-key-env {env}: the environment variable {env} is not set")

    def _redact(self, text: str) -> str:
        """``text`` without the API key (servers sometimes echo it back in errors)."""
        return text.replace(self._api_key, "***") if self._api_key else text

    def _snippet(self, payload: bytes, limit: int = 200) -> str:
        return _snippet(self._redact(payload.decode("utf-8", "replace")).encode(), limit)

    def settings(self) -> dict:
        c = self.config
        return {
            "base_url": c.base_url,
            "concurrency": c.concurrency,
            "timeout_s": c.timeout_s,
            "max_answer_bytes": c.max_answer_bytes,
            "max_retries": c.max_retries,
        }

    # -- one request ---------------------------------------------------------------------------
    def _body(self, req: ChatRequest, sampling: SamplingConfig) -> dict:
        body = {
            "model": self.config.model,
            "messages": req.messages,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": req.seed,
        }
        if sampling.n > 1:  # some servers reject "n" altogether; send it only when needed
            body["n"] = sampling.n
        return body

    def _wait(self, seconds: float, abort: threading.Event) -> None:
        if seconds <= 0:
            return
        if self._sleep is not None:
            self._sleep(seconds)
        else:
            abort.wait(seconds)  # wakes early when the run is being stopped

    def _post(self, data: bytes) -> dict:
        try:
            return self._post_raw(data)
        except (Retryable, BackendError) as e:  # no message may carry the key
            e.args = (self._redact(str(e)),)
            raise

    def _post_raw(self, data: bytes) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self.config.url, data=data, headers=headers, method="POST")
        payload = self._exchange(request)
        try:
            obj = json.loads(payload.decode("utf-8"))
        except ValueError:  # not UTF-8, not JSON, an integer of 5000 digits, ...
            raise Retryable(f"answer is not JSON: {self._snippet(payload)}") from None
        except RecursionError:  # nested deeper than the parser's stack
            raise Retryable(
                f"answer is not usable JSON (nested too deeply): {self._snippet(payload)}"
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
            raise Retryable(f"answer has no 'choices': {self._snippet(payload)}")
        return obj

    def _exchange(self, request: urllib.request.Request) -> bytes:
        """The answer's body, all of it within the deadline and the size cap."""
        c = self.config
        deadline = Deadline(c.timeout_s)
        answered = False  # the status line and headers arrived: the answer itself is slow
        resp = None
        try:
            with deadline:
                try:
                    resp = self._opener.open(request, timeout=c.timeout_s)
                    answered = True
                    payload = read_capped(resp, c.max_answer_bytes)
                    if deadline.expired:  # shut mid-answer: what was read may be cut short
                        raise self._late(answered)
                    return payload
                except urllib.error.HTTPError as e:
                    answered = True
                    body = e.read(ERROR_BODY_BYTES) if e.fp is not None else b""
                    raise self._refused(e, body) from None
                except (OSError, http.client.HTTPException, ValueError) as e:
                    # Once the headers are in, a read that times out is the answer being slow,
                    # whichever of the socket timeout and the deadline fired first.
                    if deadline.expired or (answered and isinstance(e, TimeoutError)):
                        raise self._late(answered) from None
                    raise _broken(e, c.timeout_s) from None
        finally:
            if resp is not None:
                resp.close()

    def _late(self, answered: bool) -> Retryable:
        t = self.config.timeout_s
        if answered:
            return Rejected(f"answer not complete within {t:g} s (it arrived too slowly)")
        return Retryable(f"no answer within {t:g} s")

    def _refused(self, e: urllib.error.HTTPError, body: bytes) -> Exception:
        detail = self._snippet(body)
        if e.code in RETRY_STATUS:
            return Retryable(
                f"HTTP {e.code} {detail}", parse_retry_after(e.headers.get("Retry-After"))
            )
        hint = {
            401: "; check the API key (--api-key-env)",
            403: "; check the API key (--api-key-env)",
            404: "; check --base-url (it usually ends in /v1) and --model",
        }.get(e.code, "")
        return BackendError(f"{self.config.url} refused the request: HTTP {e.code} {detail}{hint}")

    def _one(self, req: ChatRequest, sampling: SamplingConfig, abort: threading.Event):
        """The request's completions; _SKIPPED when ``req.wanted()`` turned False, _GAVE_UP
        when its answer stayed too large or too slow through every retry."""
        data = json.dumps(self._body(req, sampling)).encode("utf-8")
        c = self.config
        last: Retryable | None = None
        for attempt in range(c.max_retries + 1):
            with self._pause_lock:
                pause = self._pause_until - self._clock()
            self._wait(pause, abort)  # another worker was told to back off: everyone waits
            if abort.is_set():
                raise BackendError("stopped: another request failed")
            if req.wanted is not None and not req.wanted():
                return _SKIPPED
            try:
                obj = self._post(data)
            except Retryable as e:
                last = e
                if attempt == c.max_retries or abort.is_set():
                    break
                delay = min(c.max_backoff_s, c.backoff_s * 2**attempt)
                if self._jitter:
                    delay *= 0.5 + random.random()  # spread retries of parallel workers
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, c.max_backoff_s))
                    with self._pause_lock:  # the server asked everyone to slow down
                        self._pause_until = max(self._pause_until, self._clock() + delay)
                self.stats.add(retries=1)
                self._wait(delay, abort)
                continue
            return _completions(obj, sampling.n)
        if isinstance(last, Rejected) and not abort.is_set():
            reason = f"{c.max_retries + 1} attempt(s), the last: {last}"
            if self.stats.reject(reason):
                log.warning(
                    "a request to %s was given up after %s; its class gets no sentences from "
                    "it (the run goes on; a rerun tops short classes up)",
                    c.url,
                    reason,
                )
            return _GAVE_UP
        raise BackendError(
            f"{c.url} failed after {c.max_retries + 1} attempt(s): {last}. Is the server running "
            "and --base-url right? Finished classes are kept; run the same command to resume."
        )

    # -- all requests of a step ----------------------------------------------------------------
    def chat(
        self,
        requests: Sequence[ChatRequest],
        sampling: SamplingConfig,
        on_result: OnResult | None = None,
    ) -> list[list[Completion]]:
        start = time.perf_counter()
        results: list[list[Completion] | None] = [None] * len(requests)
        abort = threading.Event()  # this call's: a straggler of an earlier call cannot clear it
        todo: queue.SimpleQueue = queue.SimpleQueue()
        for i in range(len(requests)):
            todo.put(i)
        # Each request reports exactly once through this queue: O(1) per answer however many
        # are queued (waiting on the whole set each time would be quadratic for 10k requests).
        finished: queue.SimpleQueue = queue.SimpleQueue()

        def work() -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                if abort.is_set():
                    finished.put((i, None, None))  # not started: cancelled
                    continue
                try:
                    finished.put((i, self._one(requests[i], sampling, abort), None))
                except BaseException as e:  # handed to the caller's thread
                    abort.set()  # at once, so no worker starts another request
                    finished.put((i, None, e))

        # Daemon threads: on Ctrl-C / SIGTERM the caller returns at once and the process can
        # exit; a request still in flight is abandoned instead of waited for (up to timeout_s).
        for _ in range(min(self.config.concurrency, len(requests))):
            threading.Thread(target=work, name="awt-openai", daemon=True).start()
        first_error: BaseException | None = None
        try:
            for _ in range(len(requests)):
                while True:
                    try:
                        i, completions, err = finished.get(timeout=0.5)  # Ctrl-C stays prompt
                        break
                    except queue.Empty:
                        continue
                if err is not None:
                    if first_error is None:
                        # Stop: requests not started are cancelled, running ones finish
                        # (without retrying) so their answers are still delivered.
                        first_error = err
                        abort.set()
                    continue
                if completions is None:
                    continue
                if completions is _SKIPPED or completions is _GAVE_UP:
                    completions = []
                else:
                    self.stats.add(requests=1)
                results[i] = completions
                if on_result is not None:
                    on_result(i, completions)
        except BaseException:
            abort.set()
            raise
        finally:
            self.stats.add(seconds=time.perf_counter() - start)
        if first_error is not None:
            raise first_error
        return [r if r is not None else [] for r in results]


def _broken(e: BaseException, timeout_s: float) -> Retryable:
    """A failure of the connection (not of the deadline) as a retryable error."""
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return Retryable(f"no answer within {timeout_s:g} s")
    if isinstance(e, urllib.error.URLError):
        return Retryable(f"cannot connect ({reason})")
    return Retryable(f"connection broken ({type(e).__name__}: {e})")


def _snippet(payload: bytes, limit: int = 200) -> str:
    text = payload.decode("utf-8", "replace").strip().replace("\n", " ")
    return text[:limit] + ("..." if len(text) > limit else "")


def _completions(obj: dict, n: int) -> list[Completion]:
    """The choices of a chat-completions answer, in index order. A choice without text
    counts as an empty answer (the parser then finds nothing in it)."""
    choices = sorted(
        (c for c in obj["choices"] if isinstance(c, dict)),
        key=lambda c: c.get("index", 0) if isinstance(c.get("index", 0), int) else 0,
    )
    out = []
    for c in choices[: max(n, 1)]:
        message = c.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str):
            content = c.get("text") if isinstance(c.get("text"), str) else ""
        out.append(Completion(content, truncated=c.get("finish_reason") == "length"))
    return out
