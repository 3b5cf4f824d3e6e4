"""TransCLIP's kNN affinity graph (:mod:`awt_engine.adapt.transclip`), order-free.

Each image's k nearest other images by inner product, found with faiss (an exact
``IndexFlatIP`` over the float32 features, searched in row blocks), weighted
``w_ij = max(0, f_i . f_j)``; kept as ``[N, K]`` indices and weights, never an N x N
matrix. The z-step needs ``(W + W^T) z``, so :func:`symmetric_affinity` stores the sum
``W + W^T`` once as a CSR matrix (at most ``2 N K`` entries) whose row blocks
:func:`affinity_rows` hands out.

The graph depends on the images, not on their order or on the block size:

* faiss ranks in float32 with BLAS blocking that depends on the block; so it is asked for
  ``k + 1 + _MARGIN`` candidates, whose similarities are recomputed here in float64 as
  ``sum_d f_id f_jd`` (elementwise, the same reduction for every pair: ``s_ij == s_ji``
  bit for bit, whatever the block), and re-ranked.
* the image itself is excluded by index (the official code drops the top hit, which may
  be a duplicate rather than the image itself);
* ties at the k-th similarity (duplicate images): every tied candidate is kept and they
  share the remaining slots equally, ``w_ij * (k - n_above) / n_tied``, so no tie is
  broken by position. When the tie may run past the candidates fetched, the block is
  searched again with twice as many.

Axes::

    N images   D embedding width   K neighbours kept per image (k, more where tied)
    M candidates asked of faiss     E stored entries of W + W^T (at most 2 N K)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import Tensor

# Extra faiss candidates re-ranked in float64: float32 ranking errors (~1e-7 on unit
# vectors) can only swap candidates that close to the k-th similarity.
_MARGIN = 8


@dataclass(frozen=True)
class KnnGraph:
    """The directed kNN graph: row i lists image i's neighbours."""

    neighbours: Tensor  # [N, K] int64 image indices (padding: i itself with weight 0)
    weights: Tensor  # [N, K] float64 w_ij = max(0, f_i . f_j) times its tie share

    @property
    def n_images(self) -> int:
        return self.neighbours.shape[0]


def _as_numpy32(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def _exact_similarities(features: Tensor, start: int, candidates: Tensor) -> Tensor:
    """float64 ``f_i . f_j`` for rows ``start:start+b`` and their candidates: [b, M].
    Missing candidates (faiss's -1) and the image itself get -inf."""
    b = candidates.shape[0]
    rows = torch.arange(start, start + b, device=candidates.device).unsqueeze(1)  # [b, 1]
    f_rows = features[start : start + b].to(torch.float64)  # [b, D]
    f_cand = features[candidates.clamp(min=0)].to(torch.float64)  # [b, M, D]
    sims = (f_cand * f_rows.unsqueeze(1)).sum(dim=-1)  # [b, M]
    return sims.masked_fill((candidates < 0) | (candidates == rows), -torch.inf)


def _select(sims: Tensor, candidates: Tensor, k: int, complete: bool):
    """The k best candidates with tie sharing: (indices [b, K_b], weights [b, K_b], ok)
    where ``ok`` says no row's tie at the k-th value may continue past the candidates."""
    values, order = sims.sort(dim=1, descending=True)  # [b, M]
    kth = values[:, k - 1 : k]  # [b, 1]
    above = (values > kth).to(torch.float64)
    tied = (values == kth).to(torch.float64)
    share = (k - above.sum(1, keepdim=True)) / tied.sum(1, keepdim=True)  # [b, 1]
    kept = above + tied * share  # [b, M] slot weight in [0, 1]
    n_kept = int((kept > 0).sum(1).max())
    weights = (values.clamp(min=0) * kept)[:, :n_kept]
    weights = torch.nan_to_num(weights, nan=0.0, neginf=0.0)  # -inf (missing) -> 0
    indices = candidates.gather(1, order)[:, :n_kept]
    ok = complete or bool((values[:, -1] < kth[:, 0]).all())
    return indices, weights, ok


def knn_graph(features: Tensor, k: int, rows_per_block: int) -> KnnGraph:
    """The kNN graph of ``features`` [N, D] (L2-normalised): ``min(k, N - 1)`` neighbours
    per image (more where tied), searched ``rows_per_block`` rows at a time."""
    N, D = features.shape
    k = min(k, N - 1)
    device = features.device
    if k <= 0:
        empty = torch.zeros(N, 0, dtype=torch.int64, device=device)
        return KnnGraph(empty, torch.zeros(N, 0, dtype=torch.float64, device=device))
    index = faiss.IndexFlatIP(D)
    for start in range(0, N, rows_per_block):
        index.add(_as_numpy32(features[start : start + rows_per_block]))
    indices, weights = [], []
    for start in range(0, N, rows_per_block):
        queries = _as_numpy32(features[start : start + rows_per_block])
        M = min(N, k + 1 + _MARGIN)
        while True:
            _, found = index.search(queries, M)  # [b, M]
            candidates = torch.from_numpy(found).to(device)
            sims = _exact_similarities(features, start, candidates)
            idx, w, ok = _select(sims, candidates, k, complete=M >= N)
            if ok:
                break
            M = min(N, 2 * M)  # a tie at the k-th similarity may go on: look further
        indices.append(idx)
        weights.append(w)
    del index
    K = max(i.shape[1] for i in indices)
    rows = torch.arange(N, device=device).unsqueeze(1)
    neighbours = rows.expand(N, K).clone()  # padding: the image itself, weight 0
    out_w = torch.zeros(N, K, dtype=torch.float64, device=device)
    start = 0
    for idx, w in zip(indices, weights, strict=True):
        b, kb = idx.shape
        neighbours[start : start + b, :kb] = idx
        out_w[start : start + b, :kb] = w
        start += b
    return KnnGraph(neighbours, out_w)


def symmetric_affinity(graph: KnnGraph, dtype: torch.dtype) -> Tensor:
    """``W + W^T`` as a sparse CSR [N, N] (entries summed in float64, then cast)."""
    N, K = graph.neighbours.shape
    device = graph.neighbours.device
    src = torch.arange(N, device=device).repeat_interleave(K)  # [N K]
    dst = graph.neighbours.reshape(-1)
    w = graph.weights.reshape(-1)
    keep = w > 0
    src, dst, w = src[keep], dst[keep], w[keep]
    ij = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])  # [2, E]
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        coo = torch.sparse_coo_tensor(ij, torch.cat([w, w]), (N, N)).coalesce()
        csr = coo.to_sparse_csr()
        return torch.sparse_csr_tensor(
            csr.crow_indices(), csr.col_indices(), csr.values().to(dtype), size=(N, N)
        )


def affinity_rows(S: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of the CSR ``S`` as a CSR [stop - start, N] (views, no copy)."""
    crow = S.crow_indices()
    a, b = int(crow[start]), int(crow[stop])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow[start : stop + 1] - a,
            S.col_indices()[a:b],
            S.values()[a:b],
            size=(stop - start, S.shape[1]),
        )
