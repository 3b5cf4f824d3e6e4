"""Similarity sources: where blocks of ``sim[b, v, c, p]`` come from.

Two sources answer the same four questions (a block, the prompt mean, view 0, a weighted
mean), so the solvers never ask which one they hold: :class:`EmbeddingSims` computes the
similarities block by block from L2-normalised embeddings, :class:`LogitSims` slices
them from a tensor given whole (a generative model's logits divided by the scale).

Axes::

    B images (G of them in a block)   V views   C classes (Cc in a chunk)
    P prompts   D embedding width
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)  # a child of awt_engine.scoring: block shapes at DEBUG


class EmbeddingSims:
    """Similarities from L2-normalised embeddings, computed block by block."""

    def __init__(self, image_embeds: Tensor, class_embeds: Tensor):
        self.img, self.txt = image_embeds, class_embeds  # [B,V,D], [C,P,D]
        self.B, self.V, _ = image_embeds.shape
        self.C, self.P, self.D = class_embeds.shape
        self._txt_mean = None

    def block(self, bs: slice, cs: slice) -> Tensor:
        """sim for images bs and classes cs: [G, Cc, P, V], a permuted view of one GEMM.

        Each block is logged at DEBUG level (``awt_engine.scoring``) with its shape, so
        the memory budget's effect can be checked from outside.

        One GEMM for the whole block (text rows x all views), which BLAS runs faster
        than one per image; the permutation is absorbed by the kernel's strided write.
        """
        txt = self.txt[cs]
        Cc = txt.shape[0]
        img = self.img[bs]  # [G,V,D]
        G = img.shape[0]
        flat = txt.reshape(Cc * self.P, self.D) @ img.reshape(G * self.V, self.D).T  # [Cc*P,G*V]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("similarity block %s", [G, Cc, self.P, self.V])
        return flat.view(Cc, self.P, G, self.V).permute(2, 0, 1, 3)  # [G,Cc,P,V] view

    def prompt_mean(self, bs: slice) -> Tensor:
        """mean_p sim: [G, V, C] (linear, so through the mean text embedding)."""
        if self._txt_mean is None:
            self._txt_mean = self.txt.mean(dim=1)  # [C,D]
        return torch.matmul(self.img[bs], self._txt_mean.T)

    def raw_view(self, bs: slice) -> Tensor:
        """sim of view 0: [G, C, P]."""
        img0 = self.img[bs, 0]  # [G,D]
        return torch.matmul(img0, self.txt.reshape(self.C * self.P, self.D).T).view(
            -1, self.C, self.P
        )

    def weighted_mean(self, bs: slice, u: Tensor, w: Tensor) -> Tensor:
        """sum_{v,p} u[v] w[c,p] sim[v,c,p] = <sum_v u img, sum_p w txt>: [G, C]."""
        img_bar = torch.einsum("gv,gvd->gd", u, self.img[bs])  # [G,D]
        txt_bar = torch.einsum("gcp,cpd->gcd", w, self.txt)  # [G,C,D]
        return torch.einsum("gd,gcd->gc", img_bar, txt_bar)


class LogitSims:
    """Similarities given whole (e.g. by a generative method), [B, V, C, P]."""

    def __init__(self, sims: Tensor):
        self.sims = sims
        self.B, self.V, self.C, self.P = sims.shape

    def block(self, bs: slice, cs: slice) -> Tensor:
        return self.sims[bs, :, cs, :].permute(0, 2, 3, 1)  # [G,Cc,P,V] view

    def prompt_mean(self, bs: slice) -> Tensor:
        return self.sims[bs].mean(dim=-1)  # [G,V,C]

    def raw_view(self, bs: slice) -> Tensor:
        return self.sims[bs, 0]  # [G,C,P]

    def weighted_mean(self, bs: slice, u: Tensor, w: Tensor) -> Tensor:
        return torch.einsum("gv,gcp,gvcp->gc", u, w, self.sims[bs])


def check_embeddings(image_embeds: Tensor, class_embeds: Tensor) -> None:
    if not isinstance(image_embeds, Tensor) or not isinstance(class_embeds, Tensor):
        raise TypeError("image_embeds and class_embeds must be torch.Tensors")
    if image_embeds.dim() != 3:
        raise ValueError(f"image_embeds must be [B, V, D], got shape {tuple(image_embeds.shape)}")
    if class_embeds.dim() != 3:
        raise ValueError(f"class_embeds must be [C, P, D], got shape {tuple(class_embeds.shape)}")
    if image_embeds.shape[-1] != class_embeds.shape[-1]:
        raise ValueError(
            f"embedding widths differ: image_embeds D={image_embeds.shape[-1]}, "
            f"class_embeds D={class_embeds.shape[-1]}"
        )
    if image_embeds.device != class_embeds.device:
        raise ValueError(
            f"image_embeds on {image_embeds.device} but class_embeds on {class_embeds.device}"
        )
    if min(image_embeds.shape[:2]) < 1 or min(class_embeds.shape[:2]) < 1:
        raise ValueError(
            f"empty input: image_embeds {tuple(image_embeds.shape)}, "
            f"class_embeds {tuple(class_embeds.shape)}"
        )
