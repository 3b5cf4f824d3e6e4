"""LLaMP's prefixes: the chat-formatted request and the LLM's own one-sentence
self-description of each class (greedy, cached on disk as JSON).

Every (class, prompt) has an LLM *prefix*: the chat-format request ``request`` (default
"In one sentence, describe the distinctive appearance of a {c}.") with the model's own
chat template, followed by the start of the answer. Prompt 0 continues ``answer_start``
("The {c} appears as") with the self-description generated here; prompts p >= 1 take
description p of the label set as the answer.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from awt_engine._io import atomic_write_json, warn_unwritable
from awt_engine.methods._llamp_kv import LLM_BATCH, autocast_off, pad_left, tokenize

DESCRIBE_FORMAT = 1


def chat_head(tokenizer, config, name: str) -> str:
    """The chat-formatted request of ``config`` for class ``name``, up to the assistant's
    answer (plain text and a newline for a base LM without a chat template)."""
    cfg, tok = config, tokenizer
    request = cfg.request.format(name)
    if getattr(tok, "chat_template", None) is None:
        return request + "\n"  # a base LM without a chat template: plain text
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    try:
        return tok.apply_chat_template(
            [*system, {"role": "user", "content": request}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # a template without a system role (Gemma): fold it into the request
        if not system:
            raise
        return tok.apply_chat_template(
            [{"role": "user", "content": f"{cfg.system_prompt}\n\n{request}"}],
            tokenize=False,
            add_generation_prompt=True,
        )


def first_sentence(text: str) -> str:
    """The first line's first sentence of a generated answer, stripped."""
    line = text.strip().split("\n", 1)[0].strip()
    m = re.match(r"(.+?[.!?])(\s|$)", line)
    return (m.group(1) if m else line).strip()


def generate(llm, prompts: Sequence[str], max_new_tokens: int) -> tuple[str, ...]:
    """Greedy continuations of ``prompts``, ``max_new_tokens`` at most, first sentence kept."""
    model, tok = llm.model, llm.tokenizer
    ids = tokenize(tok, prompts)
    out: list[str] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    for s in range(0, len(ids), LLM_BATCH):
        rows = ids[s : s + LLM_BATCH]
        T = max(map(len, rows))
        inp, mask = pad_left(tok, rows, T)
        with torch.inference_mode(), autocast_off(model.device):
            gen = model.generate(
                input_ids=inp.to(model.device),
                attention_mask=mask.to(model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=pad,
            )
        texts = tok.batch_decode(gen[:, T:], skip_special_tokens=True)
        out += [first_sentence(t) for t in texts]
    return tuple(out)


def read_descriptions(path: Path, key: str, n: int) -> tuple[str, ...] | None:
    """The ``n`` cached self-descriptions of entry ``key`` at ``path`` (None: absent; a
    damaged or foreign record warns, naming it, and gives None)."""
    if not path.exists():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        texts = rec.get("descriptions") if isinstance(rec, dict) else None
        ok = (
            rec.get("format") == DESCRIBE_FORMAT
            and rec.get("key") == key
            and isinstance(texts, list)
            and len(texts) == n
            and all(isinstance(t, str) for t in texts)
        )
        if not ok:
            raise ValueError("not this cache's record (format, key or count)")
    except (OSError, ValueError, AttributeError) as exc:
        warnings.warn(
            f"LLaMP self-description cache {path} is damaged ({exc}); generating again",
            stacklevel=3,
        )
        return None
    return tuple(texts)


def write_descriptions(path: Path, key: str, llm, names, texts) -> None:
    """Record the self-descriptions ``texts`` of classes ``names`` (warns when unwritable)."""
    record = {
        "format": DESCRIBE_FORMAT,
        "key": key,
        "llm": llm.fingerprint,
        "classes": list(names),
        "descriptions": list(texts),
    }
    try:
        atomic_write_json(path, record)
    except OSError as exc:
        warn_unwritable(path.parent, exc, "LLaMP self-description")
