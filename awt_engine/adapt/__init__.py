"""Test-time adaptation on top of any scorer: online (TDA, DOTA) and transductive
(TransCLIP). See :mod:`awt_engine.adapt.base` for the protocol."""

from awt_engine.adapt.base import (
    ADAPTATIONS,
    Adaptation,
    AdaptBatch,
    OnlineAdaptation,
    TransductiveAdaptation,
    adapt_config,
    get_adaptation,
    list_adaptations,
    register_adaptation,
)

__all__ = [
    "ADAPTATIONS",
    "AdaptBatch",
    "Adaptation",
    "OnlineAdaptation",
    "TransductiveAdaptation",
    "adapt_config",
    "get_adaptation",
    "list_adaptations",
    "register_adaptation",
]

# The built-in adaptations register themselves on import (listed in this order).
from awt_engine.adapt import dota as dota
from awt_engine.adapt import tda as tda
from awt_engine.adapt import transclip as transclip
