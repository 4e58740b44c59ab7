"""Batched IPOT against POT's exact solver and Sinkhorn."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from uniter.ot import cosine_cost, ipot, optimal_transport_distance


def _problem(seed, m, n, h=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, m, h, generator=g, dtype=torch.float64), torch.randn(
        1, n, h, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("m, n", [(5, 7), (12, 9), (20, 30)])
def test_ipot_matches_exact_ot(m, n):
    x, y = _problem(m * n, m, n)
    cost = cosine_cost(x, y)[0].numpy()
    a, b = np.full(m, 1 / m), np.full(n, 1 / n)
    exact = float(np.sum(ot.emd(a, b, cost) * cost))
    sinkhorn = float(np.sum(ot.sinkhorn(a, b, cost, reg=0.01) * cost))
    no_pad_x, no_pad_y = torch.zeros(1, m, dtype=torch.bool), torch.zeros(1, n, dtype=torch.bool)
    ours = float(optimal_transport_distance(x, y, no_pad_x, no_pad_y, iterations=200)[0])
    assert abs(ours - exact) < 1e-3 * max(1, exact)
    assert abs(ours - sinkhorn) < 1e-2
    plan = ipot(cosine_cost(x, y), no_pad_x, no_pad_y, iterations=200)[0]
    assert torch.allclose(plan.sum(1), torch.full((m,), 1 / m, dtype=plan.dtype), atol=1e-4)
    assert torch.allclose(plan.sum(0), torch.full((n,), 1 / n, dtype=plan.dtype), atol=1e-4)


def test_batched_with_padding_equals_one_by_one():
    """A padded batch gives each problem exactly its unpadded distance."""
    sizes = [(4, 6), (7, 3), (5, 5)]
    problems = [_problem(i, m, n) for i, (m, n) in enumerate(sizes)]
    M, N = max(m for m, _ in sizes), max(n for _, n in sizes)
    x = torch.zeros(3, M, 16, dtype=torch.float64)
    y = torch.zeros(3, N, 16, dtype=torch.float64)
    x_pad, y_pad = torch.ones(3, M, dtype=torch.bool), torch.ones(3, N, dtype=torch.bool)
    for i, ((m, n), (px, py)) in enumerate(zip(sizes, problems, strict=True)):
        x[i, :m], y[i, :n] = px[0], py[0]
        x_pad[i, :m], y_pad[i, :n] = False, False
    batched = optimal_transport_distance(x, y, x_pad, y_pad)
    for i, ((m, n), (px, py)) in enumerate(zip(sizes, problems, strict=True)):
        alone = optimal_transport_distance(
            px, py, torch.zeros(1, m, dtype=torch.bool), torch.zeros(1, n, dtype=torch.bool)
        )
        assert torch.allclose(batched[i], alone[0], atol=1e-6)


def test_gradient_flows_through_the_cost_only():
    x, y = _problem(0, 6, 8)
    x.requires_grad_(True)
    d = optimal_transport_distance(x, y, torch.zeros(1, 6, dtype=torch.bool), torch.zeros(1, 8, dtype=torch.bool))
    d.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_float32_at_uniter_sizes_stays_finite_and_converges():
    """60 words × 100 regions in fp32 (as in training), run far past the recipe's 50 iterations:
    the scalings must not drift into overflow, and the distance keeps approaching the exact one."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 60, 64, generator=g), torch.randn(4, 100, 64, generator=g)
    x_pad = torch.arange(60)[None] >= torch.tensor([60, 45, 30, 20])[:, None]
    y_pad = torch.arange(100)[None] >= torch.tensor([100, 80, 50, 10])[:, None]
    errors = []
    for iterations in (50, 400):
        ours = optimal_transport_distance(x, y, x_pad, y_pad, iterations=iterations)
        assert torch.isfinite(ours).all()
        exact = []
        for i in range(4):
            m, n = int((~x_pad[i]).sum()), int((~y_pad[i]).sum())
            cost = cosine_cost(x[i : i + 1, :m].double(), y[i : i + 1, :n].double())[0].numpy()
            exact.append(ot.emd2(np.full(m, 1 / m), np.full(n, 1 / n), cost))
        errors.append(float(np.abs(ours.double().numpy() - np.array(exact)).max()))
    assert errors[1] < errors[0] and errors[1] < 1e-3, errors
