"""Hugging Face transformers: batched ``generate`` with left padding, anywhere (CPU included).

The model is a local folder or a hub id (the hub is only reached if the files are not cached).
Prompts are built with the model's own chat template; requests are sorted by length before
batching so little compute goes to padding, and answers are returned in request order.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from awt_engine._progress import library_bars, stderr_is_terminal
from awt_engine.describe.backends.base import (
    ChatBackend,
    ChatRequest,
    Completion,
    Conversation,
    OnResult,
    SamplingConfig,
)
from awt_engine.describe.errors import BackendError


@dataclass(frozen=True)
class TransformersConfig:
    model: str  # local folder or hub id
    device: str | None = None  # None: "cuda" when available, else "cpu"
    # "auto": the checkpoint's dtype on a GPU; float32 on CPU, where bf16 matmuls are slow.
    dtype: str = "auto"
    # Conversations per generate() call: enough to keep a GPU busy with a 7B model on
    # ~1.5k-token prompts without running out of memory; on CPU it bounds peak memory.
    batch_size: int = 16
    trust_remote_code: bool = False  # never run code from a model repo unless asked
    # transformers' own bars ("Loading weights"): drawn only when True and stderr is a
    # terminal, so logs and pipes never fill with them (--no-progress turns them off).
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _merge_system(messages: Conversation) -> Conversation:
    """For chat templates without a system role: prepend the system text to the first user turn."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system and rest and rest[0]["role"] == "user":
        rest[0]["content"] = system + "\n\n" + rest[0]["content"]
    return rest


def _stderr_is_terminal() -> bool:
    return stderr_is_terminal()


class TransformersBackend(ChatBackend):
    name = "transformers"

    def __init__(self, config: TransformersConfig) -> None:
        super().__init__(config.model)
        self.config = config
        self._model = None
        self._tokenizer = None
        self._device = None
        self._eos_ids: set[int] = set()

    def settings(self) -> dict:
        return {
            "device": self._device or self.config.device,
            "dtype": self.config.dtype,
            "batch_size": self.config.batch_size,
        }

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch

        from awt_engine.models.llm import LLMLoadError, load_causal_lm

        c = self.config
        device = c.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            with library_bars(c.progress and _stderr_is_terminal()):
                loaded = load_causal_lm(
                    c.model, device=device, dtype=c.dtype, trust_remote_code=c.trust_remote_code
                )
        except LLMLoadError as e:
            raise BackendError(str(e)) from None
        model, tokenizer = loaded.model, loaded.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise BackendError(
                f"model {c.model!r} has no chat template; the describe stage needs an "
                "instruction-tuned chat model"
            )
        tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer.eos_token_id is not None:
            eos.append(tokenizer.eos_token_id)
        self._eos_ids = set(eos)
        self._model, self._tokenizer, self._device = model, tokenizer, device

    def render(self, messages: Conversation) -> str:
        """The prompt text for one conversation (chat template, generation prompt added)."""
        self._load()
        tok = self._tokenizer
        try:
            # tokenize=False returns the text (transformers 5 returns a dict when tokenizing).
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as first:  # jinja raises for e.g. "system role not supported"
            try:
                return tok.apply_chat_template(
                    _merge_system(messages), tokenize=False, add_generation_prompt=True
                )
            except Exception:
                raise BackendError(
                    f"the chat template of {self.config.model!r} failed: {first}"
                ) from None

    def chat(
        self,
        requests: Sequence[ChatRequest],
        sampling: SamplingConfig,
        on_result: OnResult | None = None,
    ) -> list[list[Completion]]:
        import torch

        self._load()
        start = time.perf_counter()
        tok, model = self._tokenizer, self._model
        texts = [self.render(r.messages) for r in requests]
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(requests)), key=lambda i: -lengths[i])
        results: list[list[Completion]] = [[] for _ in requests]
        bs = self.config.batch_size
        sample = sampling.temperature > 0
        gen_kwargs = {
            "max_new_tokens": sampling.max_tokens,
            "do_sample": sample,
            "num_return_sequences": sampling.n,
            "pad_token_id": tok.pad_token_id,
        }
        if sample:
            gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        elif sampling.n > 1:
            raise ValueError("n > 1 needs temperature > 0 (greedy decoding repeats itself)")
        try:
            for b in range(0, len(order), bs):
                idx = order[b : b + bs]
                # One seed per batch (generate() has no per-row generator): the batch's first
                # request seed, so a rerun of the same step reproduces it.
                torch.manual_seed(requests[idx[0]].seed)
                enc = tok(
                    [texts[i] for i in idx],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,  # the chat template already placed them
                ).to(self._device)
                try:
                    with torch.inference_mode():
                        out = model.generate(**enc, **gen_kwargs)
                except torch.OutOfMemoryError:
                    raise BackendError(
                        f"out of memory generating {len(idx)} answers at once with "
                        f"{self.config.model!r}; lower --batch-size (now {bs}) or --max-tokens"
                    ) from None
                new = out[:, enc["input_ids"].shape[1] :].tolist()
                generated = 0
                for row, i in enumerate(idx):
                    comps = []
                    for j in range(sampling.n):
                        ids = new[row * sampling.n + j]
                        end = next((k for k, t in enumerate(ids) if t in self._eos_ids), None)
                        kept = ids if end is None else ids[:end]
                        generated += len(kept) + (0 if end is None else 1)
                        text = tok.decode(kept, skip_special_tokens=True)
                        comps.append(Completion(text, truncated=end is None))
                    results[i] = comps
                self.stats.add(requests=len(idx), generated_tokens=generated)
                if on_result is not None:
                    for i in idx:
                        on_result(i, results[i])
        finally:
            self.stats.add(seconds=time.perf_counter() - start)
        return results

    def close(self) -> None:
        self._model = None
        self._tokenizer = None
