"""Models behind the embedding interface: what turns views and label sets into tensors.

:mod:`awt_engine.models.base` defines the interface (:class:`Embedder`,
:class:`LogitModel`); :mod:`awt_engine.models.clip` is zero-shot CLIP behind it.
Trainable methods (CoOp, LAMM, the AWT adapter, LLaMP, CLAMP, eP-ALM) live in
:mod:`awt_engine.methods` and implement the same interface.
"""
