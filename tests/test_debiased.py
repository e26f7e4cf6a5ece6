"""``dcl`` and ``hcl`` against independent numpy implementations of the published losses.

The references are written from the papers' formulas — Chuang et al. (NeurIPS 2020), the
debiased N_g with its clamp at N·e^{−1/t}; Robinson et al. (ICLR 2021), negatives reweighted
by the importance weights exp(β_h·s/t) normalised over the negatives — with explicit loops and
no shared code with the samplers. Their gradient with respect to the embeddings is taken by
central finite differences in float64; the samplers' surrogate gradient (negbench's loss with
the sampler's W, by autograd) must equal it to 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from negbench.objective import surrogate_loss
from negbench.sampler import Batch
from samplerkit import bound_sampler
from reference import numerical_gradient


def paired_embeddings(seed: int, items: int, dim: int, noise: float | None) -> np.ndarray:
    """2·items unit vectors, rows 2k and 2k+1 the two views of item k: noisy copies of one
    point (``noise``), or independent random vectors (``noise=None``)."""
    rng = np.random.default_rng(seed)
    if noise is None:
        z = rng.normal(size=(2 * items, dim))
    else:
        z = np.repeat(rng.normal(size=(items, dim)), 2, axis=0) + noise * rng.normal(size=(2 * items, dim))
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def debiased_negative_term(z: np.ndarray, a: int, t: float, tau_plus: float, beta_hard: float | None) -> tuple[float, float, bool]:
    """(pos, N_g, clamped) of anchor a: pos = e^{f(x)ᵀf(x⁺)/t}; the negatives are every row of
    another item. Without ``beta_hard``, Chuang et al.'s eq.: N_g = max{(Σ_i e^{f(x)ᵀf(u_i)/t}
    − τ⁺ N pos) / (1 − τ⁺), N e^{−1/t}}. With it, Robinson et al.'s: the sum becomes
    N·E_q[e^{f(x)ᵀf(u)/t}] with importance weights imp_i = e^{β_h f(x)ᵀf(u_i)/t} / mean(imp)."""
    pos = np.exp(z[a] @ z[a ^ 1] / t)
    neg = np.array([np.exp(z[a] @ z[b] / t) for b in range(len(z)) if b // 2 != a // 2])
    n = len(neg)
    if beta_hard is None:
        total = neg.sum()
    else:
        imp = np.exp(beta_hard * np.log(neg))
        total = (imp * neg).sum() / imp.mean()
    ng = (-tau_plus * n * pos + total) / (1 - tau_plus)
    floor = n * np.e ** (-1 / t)
    return pos, max(ng, floor), ng < floor


def published_loss(z: np.ndarray, beta: float, tau_plus: float, beta_hard: float | None = None) -> float:
    """Mean over the 2B anchors of −log(pos / (pos + N_g)), t = 1/β."""
    total = 0.0
    for a in range(len(z)):
        pos, ng, _ = debiased_negative_term(z, a, 1 / beta, tau_plus, beta_hard)
        total += -np.log(pos / (pos + ng))
    return total / len(z)


def surrogate_gradient(name: str, z: np.ndarray, beta: float, **params) -> tuple[np.ndarray, torch.Tensor]:
    """∂ℓ/∂z of negbench's loss with the sampler's W, and W."""
    emb = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    items = torch.arange(len(z) // 2).repeat_interleave(2)
    views = torch.tensor([0, 1]).repeat(len(z) // 2)
    batch = Batch.from_anchors(items, views, emb.detach())
    sampler = bound_sampler(name, n=len(z) // 2, beta=beta, **params)
    weights = sampler.weigh(emb.detach() @ emb.detach().T, batch)
    loss = surrogate_loss(emb, emb, weights, batch.positive, beta)
    (grad,) = torch.autograd.grad(loss, emb)
    return grad.numpy(), weights


#: (seed, items, beta, tau_plus, noise): unclamped rows (independent views) and a mix of
#: clamped and unclamped rows (close views: the debiased estimate falls below its floor)
CASES = [(0, 4, 1.0, 0.1, None), (1, 5, 5.0, 0.1, 0.3), (2, 5, 5.0, 0.1, 0.3), (3, 3, 2.0, 0.5, None)]


def clamped_rows(z: np.ndarray, beta: float, tau_plus: float, beta_hard: float | None) -> int:
    return sum(debiased_negative_term(z, a, 1 / beta, tau_plus, beta_hard)[2] for a in range(len(z)))


def test_the_cases_cover_clamped_and_unclamped_rows():
    counts = [clamped_rows(paired_embeddings(s, b, 4, noise), beta, tau, None) for s, b, beta, tau, noise in CASES]
    rows = [2 * b for _, b, _, _, _ in CASES]
    assert any(c == 0 for c in counts) and any(0 < c < r for c, r in zip(counts, rows)), counts


@pytest.mark.parametrize(("seed", "items", "beta", "tau_plus", "noise"), CASES)
def test_dcl_gradient_is_the_published_losss(seed, items, beta, tau_plus, noise):
    z = paired_embeddings(seed, items, 4, noise)
    reference = numerical_gradient(lambda x: published_loss(x, beta, tau_plus), z)
    got, weights = surrogate_gradient("dcl", z, beta, tau_plus=tau_plus)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
    assert float(np.abs(reference).max()) > 1e-2, "a zero gradient would prove nothing"


@pytest.mark.parametrize("beta_hard", [0.5, 1.0, 3.0])
@pytest.mark.parametrize(("seed", "items", "beta", "tau_plus", "noise"), CASES)
def test_hcl_gradient_is_the_published_losss(seed, items, beta, tau_plus, noise, beta_hard):
    z = paired_embeddings(seed, items, 4, noise)
    reference = numerical_gradient(lambda x: published_loss(x, beta, tau_plus, beta_hard), z)
    got, _ = surrogate_gradient("hcl", z, beta, tau_plus=tau_plus, beta_hard=beta_hard)
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=0)
    assert float(np.abs(reference).max()) > 1e-2


def test_the_positive_column_is_negative_when_tau_plus_n_exceeds_one_minus_tau_plus():
    z = paired_embeddings(0, 8, 4, None)  # N = 14 negatives, τ⁺ = 0.1: 1.4 > 0.9
    _, weights = surrogate_gradient("dcl", z, 1.0, tau_plus=0.1)
    positive = weights[torch.arange(16), torch.arange(16) ^ 1]
    assert (positive < 0).all()
    _, nt_xent = surrogate_gradient("dcl", z, 1.0, tau_plus=0.0)  # τ⁺ = 0: the in-batch softmax
    _, in_batch = surrogate_gradient("in_batch", z, 1.0)
    torch.testing.assert_close(nt_xent, in_batch, rtol=1e-12, atol=1e-12)


def test_hcl_with_beta_hard_0_is_dcl():
    for seed, items, beta, tau_plus, noise in CASES:
        z = paired_embeddings(seed, items, 4, noise)
        _, hcl = surrogate_gradient("hcl", z, beta, tau_plus=tau_plus, beta_hard=0.0)
        _, dcl = surrogate_gradient("dcl", z, beta, tau_plus=tau_plus)
        torch.testing.assert_close(hcl, dcl, rtol=1e-12, atol=1e-12)


def test_hcl_gives_easy_negatives_a_negative_weight():
    z = paired_embeddings(0, 8, 4, None)
    _, weights = surrogate_gradient("hcl", z, 5.0, tau_plus=0.0, beta_hard=1.0)
    negatives = weights.masked_fill(torch.eye(16, dtype=torch.bool) | (torch.arange(16)[:, None] ^ 1 == torch.arange(16)), 0)
    assert (negatives < 0).any() and (negatives > 0).any()


@pytest.mark.parametrize("name", ["dcl", "hcl"])
def test_beta_100_is_finite_and_a_lone_item_gets_no_gradient(name):
    z = paired_embeddings(4, 6, 8, 0.2)
    _, weights = surrogate_gradient(name, z, 100.0, tau_plus=0.2)
    assert torch.isfinite(weights).all()
    grad, weights = surrogate_gradient(name, z[:2], 5.0)  # one item: no negatives, L = 0
    assert np.abs(grad).max() == 0.0 and weights[0, 1] == 1.0 and weights[1, 0] == 1.0
