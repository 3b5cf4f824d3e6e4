"""Sinkhorn against POT and a reference loop: plans, marginals, the stop rule, domains."""

import numpy as np
import ot
import pytest
import torch

from awt_engine.transport import sinkhorn
from tests.awt_reference import ref_sinkhorn


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def test_transport_plan_matches_pot_at_convergence():
    rng = np.random.default_rng(0)
    V, P = 17, 29
    cost = 1 - rng.uniform(-0.2, 0.6, size=(3, 2, V, P))
    u = rng.dirichlet(np.ones(V), size=3)  # [B, V]
    w = rng.dirichlet(np.ones(P), size=(3, 2))  # [B, C, P]
    res = sinkhorn(_t(cost), _t(u), _t(w), eps=0.1, tol=1e-13, max_iter=5000)
    assert res.converged.all()
    plan = res.plan.numpy()
    for b in range(3):
        for c in range(2):
            ref = ot.bregman.sinkhorn_log(
                u[b], w[b, c], cost[b, c], reg=0.1, numItermax=20000, stopThr=1e-14
            )
            np.testing.assert_allclose(plan[b, c], ref, rtol=1e-7, atol=1e-12)
            np.testing.assert_allclose(plan[b, c].sum(1), u[b], rtol=1e-9)
            np.testing.assert_allclose(plan[b, c].sum(0), w[b, c], rtol=1e-9)


def test_sinkhorn_result_fields_and_stop_rule():
    rng = np.random.default_rng(1)
    cost = 1 - rng.uniform(-0.3, 0.5, size=(4, 3, 6, 5))
    u = np.full((4, 6), 1 / 6)
    w = rng.dirichlet(np.ones(5), size=(4, 3))
    res = sinkhorn(_t(cost), _t(u), _t(w), eps=0.1)
    for b in range(4):  # each element against the reference loop
        T, it = ref_sinkhorn(np.exp(-cost[b] / 0.1), u[b], w[b])
        np.testing.assert_allclose(res.plan[b].numpy(), T, rtol=1e-12)
        assert res.iterations[b].item() == it
    assert res.converged.all() and (res.error < 1e-2).all()
    capped = sinkhorn(_t(cost), _t(u), _t(w), eps=0.1, tol=1e-30, max_iter=3)
    assert capped.iterations.tolist() == [3] * 4 and not capped.converged.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_domain_matches_kernel_form(dtype):
    rng = np.random.default_rng(2)
    cost = _t(1 - rng.uniform(-0.3, 0.5, size=(2, 3, 7, 5))).to(dtype)
    u = _t(rng.dirichlet(np.ones(7), size=2)).to(dtype)
    w = _t(rng.dirichlet(np.ones(5), size=(2, 3))).to(dtype)
    k = sinkhorn(cost, u, w, eps=0.1, log_domain=False)
    lg = sinkhorn(cost, u, w, eps=0.1, log_domain=True)
    assert lg.log_domain and not k.log_domain
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    torch.testing.assert_close(lg.plan, k.plan, rtol=tol, atol=tol * 1e-3)
    assert lg.iterations.tolist() == k.iterations.tolist()
