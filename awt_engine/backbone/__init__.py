"""The CLIP backbone: where its weights come from, where it runs, and the model wrapper.

* :mod:`~awt_engine.backbone.sources`: weight-source resolution (model names, tags,
  checkpoint files, config files, ``local-dir:``, ``hf-hub:``); the engine's only
  importer of ``open_clip``;
* :mod:`~awt_engine.backbone.devices`: device and precision requests;
* :mod:`~awt_engine.backbone.model`: :func:`load_backbone` and :class:`ClipBackbone`;
* :mod:`~awt_engine.backbone.int8`: ``precision="int8"`` on the CPU (torchao, lazily);
* :mod:`~awt_engine.backbone.onnx_export`: the towers as ONNX files (``awt-engine export``).

Where the weights come from (``load_backbone(model, pretrained)``):

=================================  ===============================  ==========================
``model``                          ``pretrained``                   weights
=================================  ===============================  ==========================
built-in name (``ViT-B-16``)       tag (``openai``, ``laion2b_…``)  downloaded by open_clip
built-in name                      path to a checkpoint file        that file
path to a model config ``.json``   path to a checkpoint file        that file
``local-dir:/path/to/folder``      ``None``                         the folder's weights file
``hf-hub:org/repo``                ``None``                         downloaded from the Hub
built-in name or config ``.json``  ``None``                         RANDOM (loud warning)
=================================  ===============================  ==========================
"""

from awt_engine.backbone.devices import resolve_device, resolve_precision
from awt_engine.backbone.model import ClipBackbone, load_backbone
from awt_engine.backbone.sources import BackboneLoadError
from awt_engine.models.base import PreprocessConfig

__all__ = [
    "BackboneLoadError",
    "ClipBackbone",
    "PreprocessConfig",
    "load_backbone",
    "resolve_device",
    "resolve_precision",
]
