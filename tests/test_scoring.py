"""The AWT scorer against an independent float64 implementation, POT, and itself batched."""

import numpy as np
import ot
import pytest
import torch

from awt_engine import scoring
from awt_engine.scorers import AWTConfig
from awt_engine.scoring import awt_scores, awt_scores_from_logits, awt_solve
from awt_engine.transport import sinkhorn
from tests.awt_reference import (
    random_embeds,
    ref_awt_scores,
    ref_prompt_weights,
    ref_sinkhorn,
    ref_view_weights,
)

SIZES = [  # (B, V, C, P, D, peaked): unequal so a transposed axis fails
    (3, 7, 17, 29, 16, 0.0),
    (2, 7, 17, 29, 16, 4.0),  # confident inputs
    (2, 5, 3, 11, 8, 0.0),
    (1, 1, 2, 1, 4, 0.0),  # one view, one prompt
]


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


@pytest.mark.parametrize("B,V,C,P,D,peaked", SIZES)
def test_float64_matches_reference(B, V, C, P, D, peaked):
    img, txt = random_embeds(B, V, C, P, D, seed=B + C, peaked=peaked)
    ref = ref_awt_scores(img, txt)
    got = awt_scores(_t(img), _t(txt))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=0)
    assert (got.argmax(1).numpy() == ref.argmax(1)).all()


@pytest.mark.parametrize("B,V,C,P,D,peaked", SIZES)
def test_float32_matches_reference(B, V, C, P, D, peaked):
    img, txt = random_embeds(B, V, C, P, D, seed=7 + C, peaked=peaked, dtype=np.float32)
    ref = ref_awt_scores(img, txt)  # float64 computation on the same float32 inputs
    got = awt_scores(_t(img), _t(txt))
    assert got.dtype == torch.float32
    # relative to each image's score magnitude (a score near 0 has no relative digits)
    err = np.abs(got.double().numpy() - ref).max(1) / np.abs(ref).max(1)
    assert err.max() < 1e-5, err
    assert (got.argmax(1).numpy() == ref.argmax(1)).all()


def test_scale_is_respected():
    img, txt = random_embeds(2, 5, 7, 6, 8, seed=3)
    ref = ref_awt_scores(img, txt, scale=37.5)
    np.testing.assert_allclose(awt_scores(_t(img), _t(txt), 37.5).numpy(), ref, rtol=1e-9)


def test_batched_equals_loop_of_single_images():
    img, txt = random_embeds(6, 7, 17, 29, 16, seed=11, peaked=1.5)
    full = awt_solve(_t(img), _t(txt))
    for b in range(6):
        one = awt_solve(_t(img[b : b + 1]), _t(txt))
        np.testing.assert_allclose(one.scores.numpy(), full.scores[b : b + 1].numpy(), rtol=1e-12)
        assert one.iterations.item() == full.iterations[b].item()
    # iteration counts differ across images: the stop really is per image
    assert len(set(full.iterations.tolist())) > 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_equals_unchunked(dtype):
    img, txt = random_embeds(5, 7, 17, 29, 16, seed=12, peaked=1.0)
    img, txt = _t(img).to(dtype), _t(txt).to(dtype)
    full = awt_solve(img, txt, memory_budget=1 << 30)
    per_image = 17 * 7 * 29 * torch.finfo(dtype).bits // 8 * 3
    for budget in (2 * per_image, per_image - 1, per_image // 5, 1):
        # two images at a time; then one image's classes in chunks of 4, ~3, 1
        part = awt_solve(img, txt, memory_budget=budget)
        # float64: to rounding; float32: to a few ulps of the score scale (BLAS blocks differ)
        scale = full.scores.abs().max().item()
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        torch.testing.assert_close(part.scores, full.scores, rtol=0, atol=tol * scale)
        assert part.iterations.tolist() == full.iterations.tolist()
        assert part.converged.tolist() == full.converged.tolist()


def test_class_chunked_with_many_rounds_matches_reference():
    """Slow convergence (tight tol) runs the chunked path through several rounds."""
    img, txt = random_embeds(2, 6, 9, 5, 8, seed=13)
    ref = ref_awt_scores(img, txt, tol=1e-9, max_iter=60)
    out = awt_solve(_t(img), _t(txt), config=AWTConfig(tol=1e-9, max_iter=60), memory_budget=1)
    np.testing.assert_allclose(out.scores.numpy(), ref, rtol=1e-9)
    assert (out.iterations > 8).all()  # past the first round


def test_sync_every_does_not_change_results():
    """The GPU path reads the stop flags every 10 iterations; masks keep results exact."""
    img, txt = random_embeds(4, 7, 17, 29, 16, seed=14, peaked=1.0)
    a = awt_solve(_t(img), _t(txt), sync_every=1)
    b = awt_solve(_t(img), _t(txt), sync_every=10)
    np.testing.assert_allclose(a.scores.numpy(), b.scores.numpy(), rtol=1e-12)
    assert a.iterations.tolist() == b.iterations.tolist()


@pytest.mark.parametrize("eps", [1e-2, 1e-3])
def test_small_eps_is_finite_and_agrees_across_dtypes(eps):
    img, txt = random_embeds(3, 7, 17, 29, 16, seed=21, peaked=1.0)
    s64 = awt_scores(_t(img), _t(txt), eps=eps)
    s32 = awt_scores(_t(img).float(), _t(txt).float(), eps=eps)
    assert torch.isfinite(s64).all() and torch.isfinite(s32).all()
    err = (s32.double() - s64).abs().max(1).values / s64.abs().max(1).values
    assert err.max() < 1e-3
    assert (s32.argmax(1) == s64.argmax(1)).all()
    # the plan at small eps is near the unregularised one: POT's exact EMD agrees in value
    sim = np.einsum("vd,cpd->cvp", img[0], txt)
    u = scoring.view_weights(_t(img[:1]), _t(txt))[0].numpy()
    w = scoring.prompt_weights(_t(img[:1]), _t(txt))[0].numpy()
    res = sinkhorn(_t(1 - sim)[None], _t(u)[None], _t(w)[None], eps=eps, tol=1e-12, max_iter=3000)
    assert res.log_domain == (eps < 0.005)  # float64's kernel form holds down to eps ~ 0.008
    assert torch.isfinite(res.plan).all()
    for c in range(3):
        emd = ot.emd2(u, w[c], 1 - sim[c])
        ours = float((res.plan[0, c].numpy() * (1 - sim[c])).sum())
        assert abs(ours - emd) < 20 * eps  # entropic bias shrinks with eps


def test_log_domain_small_eps_matches_reference_when_kernel_is_representable():
    """eps = 0.02 in float64: the reference's kernel form still works; log domain must agree."""
    img, txt = random_embeds(2, 5, 7, 6, 8, seed=22)
    ref = ref_awt_scores(img, txt, eps=0.005)
    got = awt_scores(_t(img), _t(txt), eps=0.005)  # float64 log domain below eps ~ 0.008
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9)


def test_dtype_and_device_preserved():
    img, txt = random_embeds(2, 3, 4, 5, 8, seed=3)
    assert awt_scores(_t(img), _t(txt)).dtype == torch.float64
    half = awt_scores(_t(img).half(), _t(txt).half())
    assert half.dtype == torch.float16 and half.shape == (2, 4)
    ref = ref_awt_scores(_t(img).half().double().numpy(), _t(txt).half().double().numpy())
    np.testing.assert_allclose(half.double().numpy(), ref, rtol=2e-3)


def test_gradients_flow_through_logits_with_plan_fixed():
    img, txt = random_embeds(2, 4, 5, 3, 8, seed=4)
    img_t = _t(img).requires_grad_(True)
    txt_t = _t(txt).requires_grad_(True)
    scores = awt_scores(img_t, txt_t)
    np.testing.assert_allclose(scores.detach().numpy(), ref_awt_scores(img, txt), rtol=1e-9)
    scores[:, 2].sum().backward()
    # analytic: d score[b,c] / d img[b,v] = s * sum_p T[c,v,p] txt[c,p]
    for b in range(2):
        logits = 100 * np.einsum("vd,cpd->vcp", img[b], txt)
        u, w = ref_view_weights(logits), ref_prompt_weights(logits)
        K = np.exp(-(1 - logits.transpose(1, 0, 2) / 100) / 0.1)
        T, _ = ref_sinkhorn(K, u, w)
        expect = 100 * np.einsum("vp,pd->vd", T[2], txt[2])
        np.testing.assert_allclose(img_t.grad[b].numpy(), expect, rtol=1e-8)
    assert txt_t.grad is not None and torch.isfinite(txt_t.grad).all()


@pytest.mark.parametrize("grad", [False, True])
def test_autocast_does_not_reach_the_scorer(grad):
    """A training loop's autocast (bf16 on CPU here, fp16 on CUDA) must not run the
    similarity products in half precision nor mix dtypes inside the Sinkhorn updates."""
    img, txt = random_embeds(3, 7, 17, 29, 16, seed=11, dtype=np.float32)
    img_t, txt_t = _t(img).requires_grad_(grad), _t(txt).requires_grad_(grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = awt_solve(img_t, txt_t)
    assert out.scores.dtype == torch.float32
    ref = ref_awt_scores(img, txt)
    err = np.abs(out.scores.detach().double().numpy() - ref).max(1) / np.abs(ref).max(1)
    assert err.max() < 1e-5, err  # float32 accuracy, not bfloat16's 1e-2
    if grad:
        out.scores.sum().backward()
        assert torch.isfinite(img_t.grad).all() and torch.isfinite(txt_t.grad).all()


def test_logits_entry_point_equals_embeddings():
    img, txt = random_embeds(2, 5, 6, 4, 8, seed=8)
    logits = 100.0 * np.einsum("bvd,cpd->bvcp", img, txt)
    out = awt_scores_from_logits(_t(logits), 100.0)
    np.testing.assert_allclose(out.scores.numpy(), ref_awt_scores(img, txt), rtol=1e-9)
    # the caller's tensor is not modified by the in-place kernels
    np.testing.assert_array_equal(_t(logits).numpy(), logits)


def test_bad_input_errors_name_the_problem():
    img, txt = torch.randn(2, 3, 8), torch.randn(4, 5, 8)
    with pytest.raises(ValueError, match=r"image_embeds must be \[B, V, D\]"):
        awt_scores(torch.randn(3, 8), txt)
    with pytest.raises(ValueError, match="embedding widths differ"):
        awt_scores(img, torch.randn(4, 5, 9))
    with pytest.raises(ValueError, match="eps must be"):
        awt_scores(img, txt, eps=0)
    with pytest.raises(ValueError, match="max_iter"):
        awt_scores(img, txt, max_iter=0)
    with pytest.raises(ValueError, match="scale"):
        awt_scores(img, txt, scale=float("nan"))
    with pytest.raises(ValueError, match="memory_budget"):
        awt_scores(img, txt, memory_budget=0)
