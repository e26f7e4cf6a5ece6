"""The exact GCL, its gradient and the surrogate loss against independent references."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from negbench.objective import exact_gradient, gcl_loss, gcl_value_and_embedding_grad, surrogate_loss
from reference import gcl_grad_numpy, gcl_numpy


def random_views(n: int, m: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, m, d, generator=gen, dtype=torch.float64), dim=2)


@pytest.mark.parametrize("n,m,d,beta", [(5, 2, 3, 1.0), (6, 3, 4, 5.0), (4, 4, 2, 20.0), (7, 2, 8, 100.0)])
def test_gcl_loss_matches_numpy_reference(n, m, d, beta):
    views = random_views(n, m, d, seed=n * m)
    expected = gcl_numpy(views.numpy(), beta)
    assert float(gcl_loss(views, beta)) == pytest.approx(expected, rel=1e-10, abs=1e-10)
    value, _ = gcl_value_and_embedding_grad(views, beta, chunk_size=3)
    assert value == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("n,m,d,beta", [(5, 2, 3, 1.0), (6, 3, 4, 5.0), (4, 4, 2, 20.0)])
def test_embedding_gradient_matches_numpy_reference(n, m, d, beta):
    views = random_views(n, m, d, seed=1 + n)
    expected = gcl_grad_numpy(views.numpy(), beta)
    _, chunked = gcl_value_and_embedding_grad(views, beta, chunk_size=4)
    np.testing.assert_allclose(chunked.numpy(), expected, rtol=1e-9, atol=1e-12)
    leaf = views.clone().requires_grad_(True)
    gcl_loss(leaf, beta).backward()
    np.testing.assert_allclose(leaf.grad.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_gcl_positive_is_not_in_denominator():
    # two items, collapsed views: F = log(m·(N-1)) - β (positive term) exactly
    views = F.normalize(torch.ones(2, 3, 4, dtype=torch.float64), dim=2)
    assert float(gcl_loss(views, 2.0)) == pytest.approx(np.log(3) + 2.0 - 2.0)


def test_exact_parameter_gradient_matches_autograd_of_definition():
    torch.manual_seed(0)
    n, m, in_dim = 9, 3, 5
    model = torch.nn.Sequential(torch.nn.Linear(in_dim, 7), torch.nn.Tanh(), torch.nn.Linear(7, 4)).double()
    encode = lambda x: F.normalize(model(x), dim=1)  # noqa: E731
    inputs = torch.randn(n, m, in_dim, dtype=torch.float64)
    beta = 5.0
    value, grads = exact_gradient(encode, list(model.parameters()), inputs, beta, chunk_size=4)
    # independent: direct autograd of the numpy-style loop definition, in torch float64
    emb = encode(inputs.reshape(n * m, in_dim)).reshape(n, m, -1)
    total = 0.0
    for i in range(n):
        for a in range(m):
            pos = sum(emb[i, a] @ emb[i, b] for b in range(m) if b != a)
            negs = torch.stack([beta * emb[i, a] @ emb[j, c] for j in range(n) if j != i for c in range(m)])
            total = total - beta / (m - 1) * pos + torch.logsumexp(negs, 0)
    reference_value = total / (n * m)
    reference = torch.autograd.grad(reference_value, list(model.parameters()))
    assert value == pytest.approx(float(reference_value.detach()), rel=1e-10)
    for g, r in zip(grads, reference):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)
    norm_sq = sum(float(g.pow(2).sum()) for g in grads)
    assert norm_sq == pytest.approx(sum(float(r.pow(2).sum()) for r in reference), rel=1e-9)


def test_surrogate_loss_gradient_flows_through_anchor_and_candidate():
    torch.manual_seed(1)
    a = F.normalize(torch.randn(4, 3, dtype=torch.float64), dim=1).requires_grad_(True)
    weights = torch.rand(4, 4, dtype=torch.float64)
    positive = torch.tensor([1, 0, 3, 2])
    beta = 3.0
    surrogate_loss(a, a, weights, positive, beta).backward()
    # by hand: ∂/∂e_x of β/A Σ_a [Σ_c W_ac <e_a,e_c> - <e_a,e_a+>]
    e = a.detach()
    expected = beta / 4 * (weights @ e + weights.T @ e)
    for k in range(4):
        expected[k] -= beta / 4 * (e[positive[k]] + e[positive.tolist().index(k)])
    torch.testing.assert_close(a.grad, expected)


def test_chunked_gradient_of_20000_views_fits_in_2_gib():
    code = (
        "import resource, torch, torch.nn.functional as F\n"
        "from negbench.objective import gcl_value_and_embedding_grad\n"
        "torch.set_num_threads(2)\n"
        "v = F.normalize(torch.randn(10000, 2, 128), dim=2)\n"
        "value, grad = gcl_value_and_embedding_grad(v, 5.0, chunk_size=1024)\n"
        "assert torch.isfinite(grad).all() and grad.shape == v.shape\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    assert peak < 2 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB"
