"""AWT's entropy weights: how much each view and each prompt is trusted.

A view whose prediction over the classes is confident (low entropy) gets more weight; a
prompt that sharpens the raw view's prediction for its class gets more weight (docs/design.md
section 2, docs/design.md). Both are softmaxes over negative entropies with a
temperature (0.5 at test time in the AWT paper; its few-shot training uses 1.0).

Axes::

    B images   V views (view 0 = the un-augmented image)   C classes   P prompts
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def view_weights_from_logits(mean_logits: Tensor, temperature: float = 0.5) -> Tensor:
    """``u[b] = softmax_v(-H(softmax_c mean_logits[b, v]) / T)``.

    mean_logits: [B, V, C], the prompt-averaged logits of each view. Returns [B, V].
    """
    logq = torch.log_softmax(mean_logits, dim=-1)  # [B,V,C], max-shifted internally
    entropy = -(logq.exp() * logq).sum(dim=-1)  # [B,V]
    return torch.softmax(-entropy / temperature, dim=-1)


def prompt_weights_from_logits(raw_logits: Tensor, temperature: float = 0.5) -> Tensor:
    """Prompt weights from the raw view's logits, in O(C*P) per image.

    raw_logits: [B, C, P] = logits of view 0. With ``a = mean_p raw_logits`` ([B, C]),
    ``H'[b,c,p]`` is the entropy of softmax(a with entry c replaced by raw_logits[b,c,p])
    and ``w[b,c] = softmax_p(-H'[b,c] / T)``. Returns [B, C, P].

    The entropy of a vector whose entry c is replaced by x follows from the sums
    ``E_c = sum_{j!=c} exp(a_j - M_c)`` and ``F_c = sum_{j!=c} exp(a_j - M_c)(a_j - M_c)``
    (M_c = max_{j!=c} a_j) and x alone; E_c >= 1 by construction, so nothing cancels.
    """
    _, C, P = raw_logits.shape
    if C == 1:  # a one-class softmax has zero entropy for every prompt
        return torch.full_like(raw_logits, 1.0 / P)
    a = raw_logits.mean(dim=-1)  # [B,C]
    top = a.topk(2, dim=-1)
    m0, m1 = top.values[:, :1], top.values[:, 1:2]  # [B,1] best and runner-up
    is_top = F.one_hot(top.indices[:, 0], C).bool()  # [B,C]

    # Classes other than the argmax: the excluded sum keeps the max, shift by m0.
    e0 = torch.exp(a - m0)  # [B,C] in (0, 1]
    t0 = e0 * (a - m0)  # [B,C] <= 0
    E = e0.sum(-1, keepdim=True) - e0  # >= 1: still holds the argmax term
    Fs = t0.sum(-1, keepdim=True) - t0
    # The argmax class: sum the others directly, shifted by the runner-up.
    e1 = torch.exp(a - m1).masked_fill(is_top, 0.0)
    t1 = e1 * (a - m1).masked_fill(is_top, 0.0)
    E = torch.where(is_top, e1.sum(-1, keepdim=True), E)  # [B,C]
    Fs = torch.where(is_top, t1.sum(-1, keepdim=True), Fs)  # [B,C]
    M = torch.where(is_top, m1, m0)  # [B,C] max of the entries kept

    x = raw_logits  # [B,C,P], the replacing entry
    m = torch.maximum(M.unsqueeze(-1), x)  # [B,C,P] shift for the whole vector
    dM, dx = M.unsqueeze(-1) - m, x - m  # both <= 0
    eM, ex = dM.exp(), dx.exp()
    E3, F3 = E.unsqueeze(-1), Fs.unsqueeze(-1)
    Z = E3 * eM + ex  # [B,C,P] >= 1
    weighted = (F3 + E3 * dM) * eM + ex * dx  # sum_j exp(z_j - m)(z_j - m)
    entropy = Z.log() - weighted / Z  # [B,C,P]
    return torch.softmax(-entropy / temperature, dim=-1)
