"""The memory plan: how many images (or classes) one block of AWT work may hold.

The similarity tensor ``[B, V, C, P]`` is never built whole. Work is cut into blocks of
images (and, when one image's classes exceed the budget, of classes) that fit
``memory_budget`` bytes; the cut never changes a result, because every quantity is per
image and the Sinkhorn stopping rule, which couples all classes of an image, is evaluated
over all of its classes even when they are solved in chunks. The budget bounds these
transient blocks; the outputs (scores [B, C] and prompt weights [B, C, P]) and the
allocator's slack come on top.

Axes: B images, V views, C classes, P prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from awt_engine.transport import kernel_form_is_safe

# Cost is 1 - cosine, so it spans at most 2: the bound that picks the transport domain.
COSINE_COST_RANGE = 2.0

_DEFAULT_CPU_BUDGET = 1 << 30  # 1 GiB: leaves room for the model and decoded images
# 2 GiB on CUDA, fixed: the budget decides the block sizes and whether the entropy weights
# come from the blocks, so a budget read from free memory (which moves with PyTorch's
# cache and other processes) could change rounding, and an iteration count near the
# tolerance, between identical runs. 2 GiB holds the blocks of hundreds of images even at
# ImageNet's 1000 classes x 50 prompts x 9 views (~5 MB each), more than a forward pass
# gives, and leaves the rest of an 8 GB card to the model. A card smaller than 8 GiB gets
# a quarter of its total memory (a property of the card, the same on every run).
_DEFAULT_CUDA_BUDGET = 2 << 30


def default_memory_budget(device: torch.device) -> int:
    """Bytes the transport blocks may use: 1 GiB on CPU (and MPS), 2 GiB on CUDA (a
    quarter of the card's total memory when that is less); never read from free memory,
    so identical runs cut identical blocks."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return min(_DEFAULT_CUDA_BUDGET, max(total // 4, 64 << 20))
    return _DEFAULT_CPU_BUDGET


def _tensors_per_element(log_domain: bool) -> int:
    # kernel form: sim, K and sim*K (sim is freed once sim*K exists);
    # log domain: logsumexp materialises two more temporaries of the block's size.
    return 5 if log_domain else 3


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision embeddings (GPU backbones) are scored in float32; float64 stays."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_budget(memory_budget: int | None, device: torch.device) -> int:
    """``memory_budget`` in bytes, or the device's default; ValueError unless positive."""
    budget = default_memory_budget(device) if memory_budget is None else int(memory_budget)
    if budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
    return budget


@dataclass(frozen=True)
class MemoryPlan:
    """The block sizes of one AWT solve (V views, C classes, P prompts per image)."""

    budget: int  # bytes the transient blocks may use
    log_domain: bool  # Sinkhorn in the log domain (the kernel form would underflow)
    images_per_block: int  # images whose whole [C, P, V] block fits; 0: chunk classes
    images_per_weight_block: int  # images per block of the entropy weights (>= 1)
    classes_per_chunk: int  # classes per chunk of one image when images_per_block is 0


def memory_plan(V: int, C: int, P: int, eps: float, dtype: torch.dtype, budget: int) -> MemoryPlan:
    """The plan for images of V views against C classes of P prompts in ``dtype``."""
    itemsize = torch.finfo(dtype).bits // 8
    log_domain = not kernel_form_is_safe(COSINE_COST_RANGE, eps, dtype)
    per_element = _tensors_per_element(log_domain)
    per_image = C * V * P * itemsize * per_element
    # Weights need O(V*C + C*P) per image: ~3 live [V, C] and ~10 live [C, P] temporaries.
    # They get a quarter of the budget: their allocations are small enough for the C heap
    # to keep resident afterwards, under the transport blocks that follow.
    per_image_w = (3 * V * C + 10 * C * P) * itemsize
    return MemoryPlan(
        budget=budget,
        log_domain=log_domain,
        images_per_block=budget // per_image,
        images_per_weight_block=max(1, budget // (4 * per_image_w)),
        classes_per_chunk=max(1, budget // (V * P * itemsize * per_element)),
    )


def grad_images_per_block(
    V: int, C: int, P: int, eps: float, dtype: torch.dtype, budget: int
) -> tuple[int, bool]:
    """(images per block, log domain) for transport with gradients: a block also holds
    its plan and the graph; ValueError when one image does not fit."""
    log_domain = not kernel_form_is_safe(COSINE_COST_RANGE, eps, dtype)
    itemsize = torch.finfo(dtype).bits // 8
    per_image = C * V * P * itemsize * (_tensors_per_element(log_domain) + 2)  # + plan, graph
    if per_image > budget:
        raise ValueError(
            f"gradients through awt_scores need one image's {C} classes x {V} views x "
            f"{P} prompts ({per_image / 2**20:.0f} MiB) within memory_budget "
            f"({budget / 2**20:.0f} MiB); raise memory_budget"
        )
    return budget // per_image, log_domain
