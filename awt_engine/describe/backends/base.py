"""What every LLM backend offers: batched chat completions with per-request seeds."""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

Message = dict[str, str]
Conversation = list[Message]


@dataclass(frozen=True)
class SamplingConfig:
    """How answers are sampled; the same on every backend."""

    # Room for ~10 lines of 20-40 tokens plus slack; a line cut off by the limit is dropped.
    max_tokens: int = 512
    # Diverse enough that asking again yields new sentences, low enough to stay on topic.
    temperature: float = 0.8
    # Trims the unlikely tail that produces garbled words at this temperature.
    top_p: float = 0.95
    # Runs are reproducible where the backend honours seeds; every request gets its own seed
    # derived from this one, so identical prompts still give different answers.
    seed: int = 0
    # Samples per request. 1 keeps requests cheap; >1 adds diversity (vLLM shares the prompt).
    n: int = 1

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n < 1:
            raise ValueError(f"n (samples per request) must be >= 1, got {self.n}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ChatRequest:
    messages: Conversation
    seed: int
    # Asked just before the request is sent (and before each retry); False: the answer is no
    # longer needed (another run saved the class), the request is skipped and its on_result
    # gets no completions. Backends that send everything at once may ignore it.
    wanted: Callable[[], bool] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Completion:
    text: str
    truncated: bool = False  # stopped by max_tokens: the last line may be unfinished


@dataclass
class BackendStats:
    requests: int = 0  # conversations answered
    retries: int = 0  # HTTP attempts repeated after a failure (openai)
    generated_tokens: int = 0  # where the backend can count them
    seconds: float = 0.0  # time spent inside chat()
    # Requests given up after their retries because of the answer itself (too large, too
    # slow; openai): the request gets no completions and the run goes on.
    rejected: int = 0
    first_rejection: str | None = None  # why the first one was given up
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: float) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def reject(self, reason: str) -> bool:
        """Count a request given up; True for the first one (worth a warning)."""
        with self._lock:
            self.rejected += 1
            if self.first_rejection is None:
                self.first_rejection = reason
                return True
            return False

    def to_json(self) -> dict:
        return {
            "requests": self.requests,
            "retries": self.retries,
            "generated_tokens": self.generated_tokens,
            "rejected": self.rejected,
            "seconds": round(self.seconds, 3),
        }


OnResult = Callable[[int, list[Completion]], None]


class ChatBackend(ABC):
    """A chat LLM. ``chat`` takes every request of a step at once so the backend can batch
    (vLLM, transformers) or overlap (HTTP) them; ``on_result(i, completions)`` is called in
    the caller's thread as each request's answers arrive, so finished work can be saved."""

    name: str = "?"

    def __init__(self, model: str) -> None:
        self.model = model
        self.stats = BackendStats()

    @abstractmethod
    def chat(
        self,
        requests: Sequence[ChatRequest],
        sampling: SamplingConfig,
        on_result: OnResult | None = None,
    ) -> list[list[Completion]]:
        """``n`` completions per request, in request order."""

    def settings(self) -> dict:
        """Backend settings recorded in the cache's provenance (never secrets)."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model or connections."""
