"""awt-engine: training-free zero-shot image classification with vision-language models.

import awt_engine
clf = awt_engine.create_classifier(model="ViT-B-16-quickgelu", pretrained="openai", dataset="dtd")
clf.predict(["a.jpg"], top_k=5)
"""

__version__ = "0.1.0"

from awt_engine.classifier import Classifier, create_classifier
from awt_engine.datasets import get_dataset, list_datasets
from awt_engine.scoring import awt_scores, list_methods

__all__ = [
    "Classifier",
    "__version__",
    "awt_scores",
    "create_classifier",
    "get_dataset",
    "list_datasets",
    "list_methods",
]
