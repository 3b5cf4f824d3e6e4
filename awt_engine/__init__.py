"""awt-engine: zero-shot and few-shot image classification with vision-language models.

    import awt_engine
    clf = awt_engine.create_classifier(model="ViT-B-16-quickgelu", pretrained="openai", dataset="dtd")
    clf.predict(["a.jpg"], top_k=5)

The public names are imported on first use, so ``import awt_engine.registry`` (or the
description stage) does not pay for torch and open_clip.
"""

from importlib import import_module

__version__ = "0.2.0"

_EXPORTS = {
    "Classifier": "awt_engine.classifier",
    "create_classifier": "awt_engine.classifier",
    "load_model": "awt_engine.models.factory",
    "LabelSet": "awt_engine.labels",
    "resolve_label_set": "awt_engine.labels",
    "get_dataset": "awt_engine.registry",
    "list_datasets": "awt_engine.registry",
    "register_dataset": "awt_engine.registry",
    "AWTConfig": "awt_engine.scorers",
    "list_scorers": "awt_engine.scorers",
    "ViewConfig": "awt_engine.inputs",
    "awt_scores": "awt_engine.scoring",
    "evaluate_base_to_new": "awt_engine.protocols",
    "BaseToNewResult": "awt_engine.protocols",
    "ModelSource": "awt_engine.dispatch",
    "RayOptions": "awt_engine.dispatch",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'awt_engine' has no attribute {name!r}")


def __dir__():
    return sorted([*_EXPORTS, "__version__"])


__all__ = ["__version__", *_EXPORTS]
