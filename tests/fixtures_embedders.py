"""A known-answer embedder behind the real Embedder interface.

Images embed as their mean colour; prompts embed as the colour their text names.
Solid-colour images therefore match their colour's class, so predictions are
checkably right without any trained model.
"""

import torch
import torch.nn.functional as F

from awt_engine.models.base import PreprocessConfig

COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
_BIAS = 0.15  # keeps every embedding off the axes so all cosines are finite and distinct


class ColourEmbedder:
    identity = "test-colour-embedder|v1"
    logit_scale = 100.0
    preprocess = PreprocessConfig(
        size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bicubic"
    )
    device = torch.device("cpu")

    def __init__(self):
        self.text_calls = 0
        self.texts_encoded = 0

    def embed_views(self, views):  # [B, V, 3, R, R] in [0, 1]
        rgb = views.float().mean(dim=(-1, -2))  # [B,V,3]
        return F.normalize(rgb + _BIAS, dim=-1)

    def _text(self, text):
        for name, rgb in COLOURS.items():
            if name in text.lower():
                return torch.tensor(rgb)
        return torch.full((3,), 0.5)

    def embed_texts(self, prompts):
        """[C][P] strings -> [C, P, 3]."""
        emb = torch.stack([torch.stack([self._text(t) for t in row]) for row in prompts])
        return F.normalize(emb + _BIAS, dim=-1)

    def class_embeddings(self, labels):
        prompts = labels.prompt_texts()
        self.text_calls += 1
        self.texts_encoded += sum(len(p) for p in prompts)
        return self.embed_texts(prompts)


class ColourLogitModel:
    """The same known answers behind the LogitModel interface: logits [B, V, C, P]."""

    identity = "test-colour-logits|v1"
    logit_scale = 100.0
    preprocess = ColourEmbedder.preprocess
    device = torch.device("cpu")

    def __init__(self):
        self._inner = ColourEmbedder()
        self.images = 0

    def logits(self, views, labels):
        self.images += views.shape[0]
        img = self._inner.embed_views(views)  # [B,V,3]
        txt = self._inner.embed_texts(labels.prompt_texts())  # [C,P,3]
        return self.logit_scale * torch.einsum("bvd,cpd->bvcp", img, txt)


class ColourBackbone:
    """The same known answers behind the ClipBackbone surface (for the CLI path)."""

    identity = "test-colour-backbone|v1"
    weights = "openai"  # stands in for load_backbone(..., "openai")
    logit_scale = 100.0
    preprocess = ColourEmbedder.preprocess
    device = torch.device("cpu")
    dtype = torch.float32
    embed_dim = 3

    def __init__(self):
        self._inner = ColourEmbedder()
        self.text_calls = 0
        self.image_batches = []

    def encode_images(self, pixels, *, batch_size=None, grad=False):  # [N, 3, R, R]
        self.image_batches.append(pixels.shape[0])
        return self._inner.embed_views(pixels[None])[0]

    def encode_text(self, texts, batch_size=256, *, progress=False, grad=False):
        self.text_calls += 1
        return self._inner.embed_texts([list(texts)])[0]


def solid(colour, size=(24, 18)):
    from PIL import Image

    rgb = tuple(int(255 * c) for c in COLOURS[colour])
    return Image.new("RGB", size, rgb)
