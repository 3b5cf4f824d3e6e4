"""LLaMP's trainable LLM part: a copy of the frozen LLM's last decoder layer that runs
over K learned class tokens, each row attending to its cached prefix.

The copy is float32 (AdamW on half weights drifts); its q/o projections and both RMSNorms
learn, its k/v projections and MLP stay frozen (so the cached keys and values stay
valid); a float32 copy of the final norm learns too. The first LLM layers never run in
training: the prefix's last-layer keys and values come from the cache
(:mod:`awt_engine.methods._llamp_kv`).

Axes: n rows, K class tokens, T prefix length, H LLM width.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from awt_engine.methods._llamp_kv import PrefixCache


def last_layer_copy(llm, name: str) -> tuple[nn.Module, nn.Module, int]:
    """(decoder layer copy, final norm copy, H) of the loaded LLM ``llm`` (called
    ``name`` in errors): ValueError unless it is a decoder-only LM whose last layer has
    full attention."""
    base = getattr(llm.model, "model", None)
    layers = getattr(base, "layers", None)
    needed = ("embed_tokens", "norm", "rotary_emb")
    if layers is None or not all(hasattr(base, n) for n in needed):
        raise ValueError(
            f"LLaMP needs a decoder-only LM with model.layers, embed_tokens, norm and "
            f"rotary_emb (Llama, Qwen2, Mistral); {name} is "
            f"{type(llm.model).__name__}"
        )
    kinds = getattr(base.config, "layer_types", None)
    if kinds and kinds[-1] != "full_attention":
        raise ValueError(f"{name}: the last layer is {kinds[-1]}, LLaMP needs full")
    decoder = copy.deepcopy(layers[-1]).float()
    decoder.self_attn.layer_idx = 0  # it is layer 0 of its own one-layer cache
    decoder.self_attn.attention_dropout = 0.0  # no draws from the global RNG
    decoder.requires_grad_(False)
    for part in (
        decoder.self_attn.q_proj,
        decoder.self_attn.o_proj,
        decoder.input_layernorm,
        decoder.post_attention_layernorm,
    ):
        part.requires_grad_(True)
    final_norm = copy.deepcopy(base.norm).float().requires_grad_(True)
    return decoder, final_norm, int(base.config.hidden_size)


def run_last_layer(
    llm, decoder: nn.Module, tokens: Tensor, cache: PrefixCache, rows: Tensor
) -> Tensor:
    """``decoder`` over the class ``tokens`` [K, H] of each of ``rows``, attending to its
    cached prefix, at positions len .. len+K-1: [n, K, H] (before the final norm)."""
    from transformers import DynamicCache
    from transformers.masking_utils import create_causal_mask

    K = tokens.shape[0]
    rows = rows.to(cache.keys.device)
    n = rows.numel()
    x = tokens.unsqueeze(0).expand(n, -1, -1)  # [n, K, H]
    pos = cache.lengths[rows, None] + torch.arange(K, device=x.device)  # [n, K]
    cos, sin = llm.model.model.rotary_emb(x, pos)
    kv = DynamicCache()
    # the prefix (stored at the LLM's precision), then the K tokens
    kv.update(cache.keys[rows].to(x.dtype), cache.values[rows].to(x.dtype), 0)
    mask2d = torch.cat([cache.mask[rows], cache.mask.new_ones(n, K)], dim=1)
    mask = create_causal_mask(
        config=decoder.self_attn.config,
        inputs_embeds=x,
        attention_mask=mask2d,
        past_key_values=kv,
        position_ids=pos,
    )
    h = decoder(
        x,
        attention_mask=mask,
        position_ids=pos,
        past_key_values=kv,
        position_embeddings=(cos, sin),
    )
    return h[0] if isinstance(h, tuple) else h
