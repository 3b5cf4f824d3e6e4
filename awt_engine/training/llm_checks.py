"""What a method's settings ask of its LLM, checked from the LLM's ``config.json`` alone,
before any weights load (:func:`awt_engine.training.train` calls :func:`check_llm_depth`
first): eP-ALM's injection layers within the LLM's depth, CLAMP's pooler heads dividing
its width. Each refusal names the ``--set`` that fits."""

from __future__ import annotations

import json
from pathlib import Path


def check_llm_depth(config) -> None:
    """What a method's layer and head settings ask of its LLM, from the LLM's
    ``config.json`` alone (a folder, or a hub id in the local cache), before any weights
    load: eP-ALM's injection layers ``[start_layer, end_layer)`` within its depth, CLAMP's
    ``pool_heads`` dividing its width; the message names the ``--set`` that fits. An LLM
    whose config cannot be read so is left to the load's checks."""
    llm = getattr(config, "llm", None)
    if not isinstance(llm, str):
        return
    end, heads = getattr(config, "end_layer", None), getattr(config, "pool_heads", None)
    depth = llm_depth(llm) if isinstance(end, int) else None
    if depth is not None and end > depth:
        # eP-ALM's [19, 31) of OPT-2.7B's 32 layers, scaled to this depth
        a, b = round(19 * depth / 32), min(depth, max(round(31 * depth / 32), 1))
        a = min(a, b - 1)
        raise ValueError(
            f"injection layers [{config.start_layer}, {end}) do not fit {llm}'s {depth} "
            f"layers (set start_layer / end_layer; eP-ALM's scaled to this depth: --set "
            f"start_layer={a} --set end_layer={b})"
        )
    width = _llm_width(llm) if isinstance(heads, int) and heads > 0 else None
    if width is not None and width % heads:
        fit = max(h for h in range(1, heads + 1) if width % h == 0)
        raise ValueError(
            f"pool_heads {heads} does not divide {llm}'s width {width} (--set pool_heads={fit})"
        )


def _llm_json(name: str) -> dict | None:
    """An LLM's ``config.json`` (a folder's, or a hub id's in the local cache), or None."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "config.json")
        except Exception:  # not a valid repo id, no hub library: the load will say
            return None
        if not isinstance(found, str):
            return None
        path = Path(found)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def _llm_field(name: str, keys: tuple[str, ...]) -> int | None:
    cfg = _llm_json(name)
    for scope in (cfg, cfg.get("text_config") if cfg else None):
        if not isinstance(scope, dict):
            continue
        for key in keys:
            v = scope.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def llm_depth(name: str) -> int | None:
    """The number of decoder layers in an LLM's ``config.json`` (``num_hidden_layers``,
    ``n_layer`` or ``num_layers``, at the top or in ``text_config``); None when there is
    no such file here (a hub id not yet downloaded) or it does not say."""
    return _llm_field(name, ("num_hidden_layers", "n_layer", "num_layers"))


def _llm_width(name: str) -> int | None:
    """The hidden width in an LLM's ``config.json`` (``hidden_size``, ``n_embd``, ``d_model``)."""
    return _llm_field(name, ("hidden_size", "n_embd", "d_model"))
