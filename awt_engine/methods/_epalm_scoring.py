"""eP-ALM's generative scoring engine: the log-probability of every class text given an
image's injected [CLS] tokens, for many images and texts at once.

The texts share a common prefix (the question, then the template's first words): it runs
once per image (``_prefill``, a ``DynamicCache`` per block of ``prefill_batch`` images);
each text then continues from a copy of its image's cache rows (``_continue``, ``score_batch``
sequences at a time). A shortlist of ``k`` classes ranks them by their first
distinguishing token and scores only their texts (the others get -inf). Without the
prefix cache every sequence runs whole (``_whole``); :func:`scoring_cost` times both.

:class:`GenerativeScoring` is mixed into :class:`~awt_engine.methods.epalm.EPALM`, whose
injection hooks, embeddings and positions it drives.

Axes: N image rows, T texts (class-major, P per class), C classes, L text length.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from awt_engine.labels import LabelSet


class GenerativeScoring:
    """Scoring of many texts per image through the model's LM (a mixin of EPALM)."""

    def score_texts(
        self,
        levels: Tensor,
        texts: list[list[int]],
        n_prompts: int = 1,
        prefix_cache: bool = True,
        k: int = 0,
    ) -> tuple[Tensor, Tensor]:
        """(summed log-probabilities [N, T], token counts [T]) of every text (class-major,
        ``n_prompts`` per class) given every row of ``levels``; the texts of classes left
        out by a shortlist of ``k`` classes get -inf."""
        N, T = levels.shape[0], len(texts)
        P, C = n_prompts, len(texts) // n_prompts
        lengths = torch.tensor([len(t) for t in texts], device=self.device, dtype=torch.float)
        total = torch.full((N, T), float("-inf"), device=self.device)
        if not prefix_cache and not 0 < k < C:
            self._whole(levels, texts, *_grid(N, T, self.device), total)
            return total, lengths
        common = _common_prefix(texts)
        rest = [t[common:] for t in texts]  # each >= 1 token
        prefix = self.question_ids + texts[0][:common]
        for a in range(0, N, self.prefill_batch):  # the cache of these rows' prefixes at once
            rows, block = levels[a : a + self.prefill_batch], total[a : a + self.prefill_batch]
            head, first, past = self._prefill(rows, prefix, common)
            first_lp = first[:, [t[0] for t in rest]]  # [n, T] first distinguishing token
            n = rows.shape[0]
            if 0 < k < C:  # k classes per view, by their best first token; all their prompts
                best = first_lp.view(n, C, P).amax(-1).topk(k, dim=1).indices  # [n, k]
                ti = (best.unsqueeze(-1) * P + torch.arange(P, device=self.device)).reshape(-1)
                vi = torch.arange(n, device=self.device).repeat_interleave(k * P)
            else:
                vi, ti = _grid(n, T, self.device)
            if not prefix_cache:  # the shortlist only; then whole sequences
                self._whole(rows, texts, vi, ti, block)
                continue
            start = len(prefix) + self.config.prompt_len
            tail = torch.zeros(vi.shape[0], device=self.device)
            for s in range(0, vi.shape[0], self.score_batch):
                v, t = vi[s : s + self.score_batch], ti[s : s + self.score_batch]
                seqs = [rest[j] for j in t.tolist()]
                if max(len(x) for x in seqs) > 1:
                    tail[s : s + v.shape[0]] = self._continue(rows, past, v, seqs, start)
            block[vi, ti] = head[vi] + first_lp[vi, ti] + tail
        return total, lengths

    def _whole(self, levels, texts, vi: Tensor, ti: Tensor, total: Tensor) -> None:
        for s in range(0, vi.shape[0], self.score_batch):
            v, t = vi[s : s + self.score_batch], ti[s : s + self.score_batch]
            logp, _ = self.text_logprobs(levels[v], [texts[j] for j in t.tolist()])
            total[v, t] = logp

    def _prefill(self, levels: Tensor, prefix: list[int], common: int):
        """One pass over ``[prompt] prefix`` per row: (log-prob of the ``common`` text
        tokens at the prefix's end [N], log-probs of the next token [N, vocab], cache)."""
        from transformers import DynamicCache

        N = levels.shape[0]
        ids = torch.tensor([prefix], dtype=torch.long, device=self.device).expand(N, -1)
        emb = self._embed(ids, prompt=True)
        past = DynamicCache()
        with self._injecting("full", levels):
            out = self.llm.model(
                inputs_embeds=emb,
                position_ids=self._positions(0, emb.shape[1], True),
                past_key_values=past,
                use_cache=True,
                logits_to_keep=common + 1,
            )
        logp = out.logits.float().log_softmax(-1)  # [N, common + 1, vocab]
        head = torch.zeros(N, device=self.device)
        if common:
            target = ids[:, len(prefix) - common :]
            head = logp[:, :-1].gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)
        return head, logp[:, -1], out.past_key_values

    def _continue(self, levels, past, rows: Tensor, seqs: list[list[int]], start: int) -> Tensor:
        """Summed log-probs of tokens 1.. of each of ``seqs``, continuing the cached
        prefix of view ``rows[i]`` (its K/V gathered per row; input rows from ``start``)."""
        from transformers import DynamicCache

        for layer in past.layers:
            if getattr(layer, "is_sliding", False):
                raise RuntimeError("sliding-window caches are not supported")
        cache = DynamicCache(
            ddp_cache_data=[(ly.keys[rows], ly.values[rows]) for ly in past.layers]
        )
        lengths = torch.tensor([len(x) for x in seqs], device=self.device)
        ids = self._pad(seqs)  # [n, L], right-padded (causal: pads never reach real tokens)
        inputs = ids[:, :-1]
        with self._injecting("continue", levels[rows]):
            out = self.llm.model(
                inputs_embeds=self._embed(inputs, prompt=False),
                position_ids=self._positions(start, inputs.shape[1], False),
                past_key_values=cache,
                use_cache=True,
            )
        logp = out.logits.float().log_softmax(-1)  # predicts tokens 1..L-1
        tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        keep = torch.arange(1, ids.shape[1], device=self.device)[None] < lengths[:, None]
        return (tok * keep).sum(-1)


def _common_prefix(texts: list[list[int]]) -> int:
    """Tokens every text starts with, leaving each at least one of its own."""
    n = min(len(t) for t in texts) - 1
    first = texts[0]
    for i in range(max(n, 0)):
        if any(t[i] != first[i] for t in texts):
            return i
    return max(n, 0)


def _grid(N: int, T: int, device) -> tuple[Tensor, Tensor]:
    return (
        torch.arange(N, device=device).repeat_interleave(T),
        torch.arange(T, device=device).repeat(N),
    )


def scoring_cost(model, views: Tensor, labels: LabelSet, repeats: int = 1) -> dict:
    """Seconds per :meth:`EPALM.logits` call with and without the shared-prefix cache
    (best of ``repeats``), and the largest difference of their logits."""
    out, secs = {}, {}
    with torch.inference_mode():
        for cached in (True, False):
            best = float("inf")
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                out[cached] = model.logits(views, labels, use_prefix_cache=cached)
                if out[cached].is_cuda:
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            secs[cached] = best
    return {
        "prefix_cache_s": secs[True],
        "whole_sequences_s": secs[False],
        "max_abs_diff": float((out[True] - out[False]).abs().max()),
    }
