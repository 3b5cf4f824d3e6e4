"""The trainable methods, one module each, behind one registry.

``list_methods()`` names them; ``get_method(name)`` imports that method's module and
returns its :class:`~awt_engine.methods.base.MethodSpec`. A new method is one file here
that defines a ``METHOD`` spec, plus its name in :data:`METHODS` (docs/design.md,
section 6).
"""

from __future__ import annotations

from importlib import import_module

# name -> (module, one-line summary); the summary is here so listing imports nothing heavy
METHODS: dict[str, tuple[str, str]] = {
    "awt-adapter": (
        "awt_engine.methods.awt_adapter",
        "AWT's multimodal adapter: bottleneck adapters in both CLIP towers, trained through AWT",
    ),
    "clamp": (
        "awt_engine.methods.clamp",
        "CLAMP: a causal LLM as CLIP's text tower (LoRA, read-only prompts, pooler)",
    ),
    "clip-lora": (
        "awt_engine.methods.clip_lora",
        "CLIP-LoRA: rank-2 LoRA on q, k, v of every layer of both CLIP towers",
    ),
    "coop": ("awt_engine.methods.coop", "CoOp: learned context vectors before the class name"),
    "epalm": (
        "awt_engine.methods.epalm",
        "eP-ALM: a frozen causal LM reading CLIP's [CLS] tokens; generative scores",
    ),
    "lamm": ("awt_engine.methods.lamm", "LAMM: learned label tokens with a hierarchical loss"),
    "llamp": (
        "awt_engine.methods.llamp",
        "LLaMP: an LLM's last layer over cached class prefixes prompts both CLIP towers",
    ),
}


def list_methods() -> list[str]:
    """The names of the trainable methods, sorted."""
    return sorted(METHODS)


def method_summaries() -> dict[str, str]:
    return {name: METHODS[name][1] for name in list_methods()}


def get_method(name: str):
    """The :class:`~awt_engine.methods.base.MethodSpec` of ``name``; ValueError listing
    the methods otherwise."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(list_methods())}")
    return import_module(METHODS[name][0]).METHOD


__all__ = ["METHODS", "get_method", "list_methods", "method_summaries"]
