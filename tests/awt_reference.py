"""A straightforward float64 implementation of docs/design.md section 2, for tests only.

Deliberately naive and independent of awt_engine: one image at a time, the prompt
weights through the direct definition (a [P, C, C] tensor per class), the full
similarity tensor, numpy instead of torch.
"""

import numpy as np


def _softmax(x, axis=-1):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def _entropy_of_softmax(x, axis=-1):
    p = _softmax(x, axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p), 0.0)
    return -t.sum(axis=axis)


def ref_view_weights(logits, temperature=0.5):
    """logits [V, C, P] of one image -> u [V]."""
    q_logits = logits.mean(axis=2)  # [V, C]
    H = _entropy_of_softmax(q_logits, axis=1)
    return _softmax(-H / temperature)


def ref_prompt_weights(logits, temperature=0.5):
    """logits [V, C, P] of one image -> w [C, P], by the direct definition."""
    _, C, P = logits.shape
    a = logits[0].mean(axis=1)  # [C]
    w = np.empty((C, P))
    for c in range(C):
        z = np.tile(a, (P, 1))  # [P, C]
        z[:, c] = logits[0, c, :]
        H = _entropy_of_softmax(z, axis=1)  # [P]
        w[c] = _softmax(-H / temperature)
    return w


def ref_sinkhorn(K, u, w, tol=1e-2, max_iter=100):
    """K [C, V, P], u [V], w [C, P] -> (plan [C, V, P], iterations)."""
    C, V, P = K.shape
    r = np.ones((C, V))
    g = np.ones((C, P))
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        r_prev = r
        r = u[None, :] / np.einsum("cvp,cp->cv", K, g)
        g = w / np.einsum("cvp,cv->cp", K, r)
        if np.abs(r - r_prev).mean() < tol:
            break
    return r[:, :, None] * K * g[:, None, :], iterations


def ref_awt_scores(
    img,
    txt,
    scale=100.0,
    eps=0.1,
    tv=0.5,
    tp=0.5,
    tol=1e-2,
    max_iter=100,
    uniform=False,
    transport=True,
):
    """img [B, V, D], txt [C, P, D] (numpy, any float) -> scores [B, C] float64."""
    img = np.asarray(img, dtype=np.float64)
    txt = np.asarray(txt, dtype=np.float64)
    out = []
    for b in range(img.shape[0]):
        sim = np.einsum("vd,cpd->vcp", img[b], txt)  # [V, C, P]
        logits = scale * sim
        V, C, P = sim.shape
        if uniform:
            u, w = np.full(V, 1.0 / V), np.full((C, P), 1.0 / P)
        else:
            u, w = ref_view_weights(logits, tv), ref_prompt_weights(logits, tp)
        if not transport:
            out.append(np.einsum("v,cp,vcp->c", u, w, logits))
            continue
        K = np.exp(-(1.0 - sim.transpose(1, 0, 2)) / eps)  # [C, V, P]
        T, _ = ref_sinkhorn(K, u, w, tol, max_iter)
        out.append((T * logits.transpose(1, 0, 2)).sum(axis=(1, 2)))
    return np.stack(out)


def random_embeds(B, V, C, P, D, seed=0, peaked=0.0, dtype=np.float64):
    """Normalised random embeddings; ``peaked`` > 0 pulls views toward one class's prompts.

    Crops are modelled as perturbations of the image, and descriptions as
    perturbations of the class's bare prompt, as in real CLIP embeddings.
    """
    rng = np.random.default_rng(seed)
    txt_base = rng.normal(size=(C, 1, D))
    txt = txt_base + 0.6 * rng.normal(size=(C, P, D))
    img_base = rng.normal(size=(B, 1, D))
    if peaked:
        labels = rng.integers(0, C, size=B)
        img_base = img_base + peaked * txt_base[labels]
    img = img_base + 0.7 * rng.normal(size=(B, V, D))
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
    return img.astype(dtype), txt.astype(dtype)
