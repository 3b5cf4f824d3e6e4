"""The class shortlist: exact search, and K = C reproduces the full computation."""

import numpy as np
import pytest
import torch

import awt_engine
from awt_engine.scoring import awt_scores
from awt_engine.shortlist import class_prototypes, shortlist, shortlisted_scores
from tests.awt_reference import random_embeds
from tests.fixtures_embedders import ColourEmbedder, solid


def _embeds(B=3, V=5, C=23, P=4, D=16, seed=0):
    img, txt = random_embeds(B, V, C, P, D, seed=seed, peaked=1.0, dtype=np.float32)
    return torch.from_numpy(img), torch.from_numpy(txt)


def test_shortlist_is_the_exact_top_k_sorted_by_index():
    img, txt = _embeds()
    protos = class_prototypes(txt)
    idx = shortlist(img[:, 0], protos, 6)
    sims = (img[:, 0].double() @ protos.double().T).numpy()
    for b in range(3):
        expect = np.sort(np.argsort(-sims[b])[:6])
        np.testing.assert_array_equal(idx[b].numpy(), expect)


def test_faiss_and_torch_searches_agree():
    """The GPU path (matmul + top-k) and faiss's exact index pick the same classes."""
    img, txt = _embeds(B=6, C=300, seed=3)
    protos = class_prototypes(txt)
    a = shortlist(img[:, 0], protos, 17, search="faiss")
    b = shortlist(img[:, 0], protos, 17, search="torch")
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="search must be"):
        shortlist(img[:, 0], protos, 17, search="annoy")


def test_shortlist_of_all_classes_equals_full_computation_exactly():
    img, txt = _embeds()
    per_image = torch.cat([awt_scores(img[b : b + 1], txt) for b in range(3)])
    for k in (23, 500):  # K = C, and K > C (clamped)
        short = shortlisted_scores(lambda i, t: awt_scores(i, t), img, txt, k=k)
        assert torch.equal(short, per_image)  # bit for bit: same classes, same order
    # and the batched full run agrees to float32 rounding (its GEMM is blocked differently)
    full = awt_scores(img, txt)
    torch.testing.assert_close(short, full, rtol=0, atol=1e-6 * full.abs().max().item())


def test_shortlist_scores_only_the_shortlisted_classes():
    img, txt = _embeds()
    k = 5
    out = shortlisted_scores(lambda i, t: awt_scores(i, t), img, txt, k=k)
    idx = shortlist(img[:, 0], class_prototypes(txt), k)
    for b in range(3):
        finite = torch.isfinite(out[b]).nonzero().squeeze(1)
        assert torch.equal(finite, idx[b])
        # each shortlisted score is AWT over that image's K classes alone
        torch.testing.assert_close(out[b, idx[b]], awt_scores(img[b : b + 1], txt[idx[b]])[0])


def test_classifier_with_shortlist_still_finds_the_colour():
    clf = awt_engine.create_classifier(
        classes=["red", "green", "blue", "yellow", "cyan"],
        embedder=ColourEmbedder(),
        views=3,
        shortlist=2,
    )
    preds = clf.predict([solid("cyan"), solid("red")], top_k=5)
    assert [p[0]["label"] for p in preds] == ["cyan", "red"]
    assert all(sum(x["score"] > 0 for x in p) <= 2 for p in preds)  # 3 classes out of the race


def test_bad_shortlist_size():
    img, txt = _embeds()
    with pytest.raises(ValueError, match="shortlist size"):
        shortlist(img[:, 0], class_prototypes(txt), 0)
