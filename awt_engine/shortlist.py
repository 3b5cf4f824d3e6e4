"""Optional class shortlist for large label sets.

For each image, the K classes whose mean prompt embedding is closest (inner product
of normalised vectors) to the raw view are kept, and the scorer runs on those K
only. Exact search: faiss ``IndexFlatIP`` on CPU, ``torch.topk`` on GPU. The shortlist
is opt-in; it changes results (AWT's weights look at the whole label set), which
``benchmarks/bench_labels.py`` measures.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from awt_engine.scorers import ScoreOutput


def class_prototypes(class_embeds: Tensor) -> Tensor:
    """Normalised mean prompt embedding of each class: [C, P, D] -> [C, D]."""
    return F.normalize(class_embeds.float().mean(dim=1), dim=-1)


def shortlist(queries: Tensor, prototypes: Tensor, k: int, *, search: str = "auto") -> Tensor:
    """Indices [B, k] of the k prototypes nearest each query, ascending by index.

    queries: [B, D] (the raw views), prototypes: [C, D]. Sorting by class index (not by
    similarity) keeps the class order of the full problem, so k = C reproduces it.
    search: "faiss" (exact inner-product index), "torch" (matmul + top-k) or "auto"
    (faiss on CPU, torch on GPU).
    """
    if search not in ("auto", "faiss", "torch"):
        raise ValueError(f"search must be 'auto', 'faiss' or 'torch', got {search!r}")
    B, D = queries.shape
    C = prototypes.shape[0]
    if not 1 <= k:
        raise ValueError(f"shortlist size must be >= 1, got {k}")
    k = min(k, C)
    if k == C:
        return torch.arange(C, device=queries.device).expand(B, C)
    if search == "faiss" or (search == "auto" and queries.device.type == "cpu"):
        import faiss

        index = faiss.IndexFlatIP(D)
        index.add(prototypes.float().cpu().contiguous().numpy())
        _, idx = index.search(queries.float().cpu().contiguous().numpy(), k)
        idx = torch.from_numpy(idx).long().to(queries.device)
    else:
        idx = (queries.float() @ prototypes.float().T).topk(k, dim=-1).indices
    return idx.sort(dim=-1).values


def shortlisted_scores(
    score_fn: Callable[[Tensor, Tensor], Tensor],
    image_embeds: Tensor,
    class_embeds: Tensor,
    k: int,
) -> Tensor:
    """Scores [B, C]: ``score_fn`` on each image's shortlist, ``-inf`` elsewhere.

    score_fn(image_embeds [1, V, D], class_embeds [K, P, D]) -> [1, K].
    """
    B, C = image_embeds.shape[0], class_embeds.shape[0]
    idx = shortlist(image_embeds[:, 0], class_prototypes(class_embeds).to(image_embeds.device), k)
    out = torch.full((B, C), float("-inf"), dtype=torch.float32, device=image_embeds.device)
    for b in range(B):
        sub = class_embeds[idx[b].to(class_embeds.device)]  # [K,P,D]
        out[b, idx[b]] = score_fn(image_embeds[b : b + 1], sub)[0].float()
    return out


def shortlisted_output(
    score_fn: Callable[[Tensor, Tensor], ScoreOutput],
    image_embeds: Tensor,
    class_embeds: Tensor,
    k: int,
    *,
    explain: bool = False,
) -> ScoreOutput:
    """A scorer's output on each image's shortlist, put back on the whole label set:
    scores [B, C] (``-inf`` outside the shortlist) and, with ``explain``, prompt weights
    [B, C, P] and plans [B, C, V, P] (zero outside it), view weights [B, V] as given.

    score_fn(image_embeds [1, V, D], class_embeds [K, P, D]) -> ScoreOutput with [1, K].
    """
    if not explain:
        scores = shortlisted_scores(
            lambda i, t: score_fn(i, t).scores, image_embeds, class_embeds, k
        )
        return ScoreOutput(scores)
    B, V = image_embeds.shape[:2]
    C, P = class_embeds.shape[:2]
    idx = shortlist(image_embeds[:, 0], class_prototypes(class_embeds).to(image_embeds.device), k)
    dev = image_embeds.device
    scores = torch.full((B, C), float("-inf"), dtype=torch.float32, device=dev)
    u, w, plans = None, torch.zeros(B, C, P, device=dev), torch.zeros(B, C, V, P, device=dev)
    for b in range(B):
        one = score_fn(image_embeds[b : b + 1], class_embeds[idx[b].to(class_embeds.device)])
        scores[b, idx[b]] = one.scores[0].float()
        if one.view_weights is not None:
            u = torch.zeros(B, V, device=dev) if u is None else u
            u[b] = one.view_weights[0].float()
        if one.prompt_weights is not None:
            w[b, idx[b]] = one.prompt_weights[0].float()
        if one.plans is not None:
            plans[b, idx[b]] = one.plans[0].float()
    return ScoreOutput(scores, u, w, plans)
