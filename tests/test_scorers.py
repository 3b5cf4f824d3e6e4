"""The scorer registry: each scorer against the reference, from embeddings and logits."""

import numpy as np
import pytest
import torch

from awt_engine.scorers import AWTConfig, check_logits, get_scorer, list_scorers, score
from tests.awt_reference import random_embeds, ref_awt_scores


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def test_baselines_and_ablations_match_reference():
    img, txt = random_embeds(3, 6, 7, 5, 8, seed=9)
    it, tt = _t(img), _t(txt)
    clip = 100 * img[:, 0] @ txt[:, 0].T
    proto = txt.mean(1)
    proto /= np.linalg.norm(proto, axis=1, keepdims=True)
    np.testing.assert_allclose(
        score("clip", scale=100.0, image_embeds=it, class_embeds=tt).numpy(), clip, rtol=1e-12
    )
    np.testing.assert_allclose(
        score("clip-descriptions", scale=100.0, image_embeds=it, class_embeds=tt).numpy(),
        100 * img[:, 0] @ proto.T,
        rtol=1e-12,
    )
    np.testing.assert_allclose(
        score("awt-uniform", scale=100.0, image_embeds=it, class_embeds=tt).numpy(),
        ref_awt_scores(img, txt, uniform=True),
        rtol=1e-9,
    )
    np.testing.assert_allclose(
        score("awt-no-transport", scale=100.0, image_embeds=it, class_embeds=tt).numpy(),
        ref_awt_scores(img, txt, transport=False),
        rtol=1e-9,
    )
    np.testing.assert_allclose(
        score(
            "awt", scale=100.0, image_embeds=it, class_embeds=tt, config=AWTConfig(eps=0.2)
        ).numpy(),
        ref_awt_scores(img, txt, eps=0.2),
        rtol=1e-9,
    )


def test_logits_give_the_same_scores_as_embeddings_for_every_logit_scorer():
    img, txt = random_embeds(2, 5, 7, 4, 8, seed=21)
    logits = _t(100.0 * np.einsum("bvd,cpd->bvcp", img, txt))  # [B, V, C, P]
    for name in list_scorers():
        s = get_scorer(name)
        from_embeds = score(s, scale=100.0, image_embeds=_t(img), class_embeds=_t(txt))
        if s.needs_embeddings:
            with pytest.raises(ValueError, match="needs class embeddings"):
                score(s, scale=100.0, logits=logits)
            continue
        np.testing.assert_allclose(
            score(s, scale=100.0, logits=logits).numpy(), from_embeds.numpy(), rtol=1e-9
        )


def test_scorers_declare_what_they_need():
    assert not get_scorer("clip").uses_views and not get_scorer("clip").uses_descriptions
    assert get_scorer("clip-descriptions").uses_descriptions
    assert not get_scorer("clip-descriptions").uses_views
    assert get_scorer("clip-descriptions").needs_embeddings
    for name in ("awt", "awt-uniform", "awt-no-transport"):
        assert get_scorer(name).uses_views and get_scorer(name).uses_descriptions
    assert get_scorer("clip").views_needed(51) == 1 and get_scorer("awt").views_needed(51) == 51


def test_unknown_scorer_and_swapped_logit_axes_are_named():
    with pytest.raises(ValueError, match=r"unknown scorer 'sinkhorn'.*awt, clip"):
        get_scorer("sinkhorn")
    logits = torch.zeros(2, 3, 5, 7)  # [B, V, C=5, P=7]
    check_logits(logits, 5, 7)
    with pytest.raises(ValueError, match=r"\[B, V, C, P\].*swapped"):
        check_logits(logits.transpose(2, 3), 5, 7)  # [B, V, P, C] by mistake
    with pytest.raises(ValueError, match=r"\[B, V, C, P\]"):
        check_logits(torch.zeros(2, 5, 7), 5, 7)
