"""CLIP's text tower fed with learned token embeddings (prompt slots).

Prompt-learning methods (CoOp, LAMM, LLaMP's first layer) replace some token
embeddings of a prompt with learned vectors and run the frozen text transformer
unchanged. Here that is done the least fragile way: token ids are built with an
ordinary placeholder token at every learned position (so open_clip's pooling still
finds the end-of-text token), and a forward hook on the tower's token embedding table
replaces those rows with the learned values for one call. The model's own
``encode_text`` then runs as it is, whatever its mask, pooling or projection.

Axes: N prompts, L context length, W text width, D embedding width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PLACEHOLDER = "x"  # one BPE token ("x</w>") in CLIP's vocabulary


@dataclass(frozen=True)
class Slot:
    """Where learned rows go in a batch of token ids: ``ids[rows, cols] <- values``."""

    rows: Tensor  # [K] int64
    cols: Tensor  # [K] int64


@dataclass(frozen=True)
class PromptBatch:
    """Token ids of N prompts and the positions of their named slots."""

    ids: Tensor  # [N, L]
    slots: dict[str, Slot]
    truncated: int  # prompts cut at the context length (their end-of-text kept)


class ClipTextTower:
    """The backbone's text tower, with token ids built piece by piece."""

    def __init__(self, backbone):
        self.backbone = backbone
        emb = backbone.text_token_embedding
        tok = backbone._tokenizer
        if emb is None or not hasattr(tok, "encode"):
            raise ValueError(
                f"{backbone.identity}: prompt learning needs open_clip's own text transformer "
                "(a token embedding table) and CLIP's BPE tokenizer; this model has "
                f"{type(backbone.text_tower).__name__} with {type(tok).__name__}"
            )
        self.embedding = emb
        self.tokenizer = tok
        self.width = emb.embedding_dim  # W
        self.context_length = int(tok.context_length)  # L
        self.sot, self.eot = tok.sot_token_id, tok.eot_token_id
        self.placeholder = self.encode_words(PLACEHOLDER)
        assert len(self.placeholder) == 1, self.placeholder

    def encode_words(self, text: str) -> list[int]:
        """BPE ids of ``text`` (no start or end token), cleaned as the tokenizer does."""
        return list(self.tokenizer.encode(text))

    def word_embeddings(self, ids: Sequence[int]) -> Tensor:
        """The frozen token embeddings of ``ids``: [len(ids), W]."""
        with torch.no_grad():
            idx = torch.tensor(list(ids), dtype=torch.long, device=self.embedding.weight.device)
            return self.embedding(idx).float().clone()

    def batch(self, prompts: Sequence[Sequence[str | tuple[str, int] | list[int]]]) -> PromptBatch:
        """Token ids for prompts given as pieces: a string is text, ``(name, n)`` is n slot
        positions called ``name``, a list is token ids as they are. Each prompt is [SOT] +
        pieces + [EOT], cut to the context length with EOT kept last (as open_clip's
        tokenizer cuts)."""
        L = self.context_length
        ids = torch.zeros(len(prompts), L, dtype=torch.long)
        where: dict[str, tuple[list[int], list[int]]] = {}
        truncated = 0
        for i, pieces in enumerate(prompts):
            row, marks = [self.sot], []
            for piece in pieces:
                if isinstance(piece, tuple):
                    name, n = piece
                    marks += [(name, len(row) + k) for k in range(n)]
                    row += self.placeholder * n
                elif isinstance(piece, list):
                    row += piece
                else:
                    row += self.encode_words(piece)
            row.append(self.eot)
            if len(row) > L:
                truncated += 1
                row = row[:L]
                row[-1] = self.eot
                if any(pos >= L - 1 for _, pos in marks):
                    raise ValueError(
                        f"prompt {i} is too long for the context length {L}: its learned "
                        "tokens would be cut off"
                    )
            ids[i, : len(row)] = torch.tensor(row)
            for name, pos in marks:
                rows, cols = where.setdefault(name, ([], []))
                rows.append(i)
                cols.append(pos)
        slots = {n: Slot(torch.tensor(r), torch.tensor(c)) for n, (r, c) in where.items()}
        return PromptBatch(ids, slots, truncated)

    def encode(
        self, batch: PromptBatch, fills: dict[str, Tensor] | None = None, *, grad: bool = True
    ) -> Tensor:
        """[N, D] L2-normalised text features; ``fills[name]`` ([K, W], in the slot's
        order) replaces that slot's token embeddings. Gradients reach the fills."""
        fills = fills or {}
        unknown = set(fills) - set(batch.slots)
        if unknown:
            raise KeyError(f"no slot named {', '.join(sorted(unknown))} in this prompt batch")
        device = self.backbone.device

        def splice(module, inputs, output):  # [N, L, W] -> the same with learned rows
            out = output.clone()
            for name, values in fills.items():
                slot = batch.slots[name]
                out[slot.rows.to(device), slot.cols.to(device)] = values.to(out.dtype)
            return out

        handle = self.embedding.register_forward_hook(splice)
        try:
            ctx = torch.enable_grad() if grad and torch.is_grad_enabled() else torch.no_grad()
            with ctx:
                feats = self.backbone.text_forward(batch.ids.to(device))  # [N, D]
        finally:
            handle.remove()
        return F.normalize(feats.float(), dim=-1)
