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
