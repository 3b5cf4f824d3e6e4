"""Entropy weights against the definition (a float64 reference), including huge C."""

import numpy as np
import pytest
import torch

from awt_engine import scoring
from awt_engine.weights import prompt_weights_from_logits, view_weights_from_logits
from tests.awt_reference import random_embeds, ref_prompt_weights, ref_view_weights


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def test_weights_match_reference():
    img, txt = random_embeds(3, 6, 13, 9, 8, seed=5, peaked=2.0)
    sim = np.einsum("bvd,cpd->bvcp", img, txt)
    logits = 100.0 * sim
    u = view_weights_from_logits(_t(logits.mean(3)))
    w = prompt_weights_from_logits(_t(logits[:, 0]))
    for b in range(3):
        np.testing.assert_allclose(u[b].numpy(), ref_view_weights(logits[b]), rtol=1e-10)
        np.testing.assert_allclose(w[b].numpy(), ref_prompt_weights(logits[b]), rtol=1e-10)
    np.testing.assert_allclose(
        scoring.view_weights(_t(img), _t(txt)).numpy(), u.numpy(), rtol=1e-12
    )
    np.testing.assert_allclose(
        scoring.prompt_weights(_t(img), _t(txt)).numpy(), w.numpy(), rtol=1e-12
    )


@pytest.mark.parametrize("spread", [0.1, 5.0, 60.0])
def test_prompt_weights_linear_form_equals_direct_definition(spread):
    """Including peaked logits (the argmax class dominates) and exact ties."""
    rng = np.random.default_rng(int(spread))
    raw = spread * rng.normal(size=(2, 11, 7))  # [B, C, P]
    raw[1, 3] = raw[1, 4]  # two classes tie for every prompt
    for dtype, tol in [(np.float64, 1e-9), (np.float32, 2e-5)]:
        got = prompt_weights_from_logits(_t(raw.astype(dtype)))
        for b in range(2):
            # the reference's logits[0] is the raw view: pass [1, C, P]
            ref = ref_prompt_weights(raw[b][None].astype(dtype).astype(np.float64))
            np.testing.assert_allclose(got[b].double().numpy(), ref, rtol=tol, atol=1e-7)


def test_prompt_weights_never_build_c_by_c():
    """C = 20000: a [P, C, C] tensor would need ~80 GB; the linear form needs MBs."""
    raw = torch.randn(1, 20000, 51) * 3
    w = prompt_weights_from_logits(raw)
    assert w.shape == (1, 20000, 51)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 20000))
    # spot-check two classes against the direct definition
    rawd = raw.double().numpy()
    a = rawd[0].mean(1)
    for c in (0, 12345):
        z = np.tile(a, (51, 1))
        z[:, c] = rawd[0, c]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        H = -(p * np.log(p)).sum(1)
        ref = np.exp(-H / 0.5 - (-H / 0.5).max())
        ref /= ref.sum()
        np.testing.assert_allclose(w[0, c].double().numpy(), ref, rtol=2e-4)
