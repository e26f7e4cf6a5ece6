"""The global contrastive loss (DESIGN §1) and the surrogate loss every sampler trains with.

Notation: a finite view set holds N items with m views each; ``views[i, a]`` is the
L2-normalised embedding ``e_ia``; ``M = N·m``; ``β`` is the inverse temperature.

    F = 1/M Σ_{i,a} [ -β/(m-1) Σ_{b≠a} <e_ia, e_ib>  +  log Σ_{j≠i, c} exp(β <e_ia, e_jc>) ]

The negative set of anchor (i, a) is every view of every *other* item; the positive is not in
the denominator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "gcl_loss",
    "gcl_value_and_embedding_grad",
    "exact_gradient",
    "surrogate_loss",
]


def _check_views(views: Tensor) -> tuple[int, int, int]:
    if views.dim() != 3:
        raise ValueError(f"views must have shape (N, m, d), got {tuple(views.shape)}")
    n, m, d = views.shape
    if n < 2 or m < 2:
        raise ValueError(f"need at least 2 items and 2 views per item, got N={n}, m={m}")
    return n, m, d


def gcl_loss(views: Tensor, beta: float) -> Tensor:
    """The exact global contrastive loss F of DESIGN §1.1, differentiable:

        F = 1/(N·m) Σ_{i,a} [ -β/(m-1) Σ_{b≠a} <e_ia, e_ib>  +  log Σ_{j≠i, c} exp(β <e_ia, e_jc>) ]

    This direct form holds the (N·m)² similarity matrix; for large N use
    :func:`gcl_value_and_embedding_grad`.

    Args:
        views: (N, m, d) L2-normalised embeddings, m ≥ 2 views of each of N ≥ 2 items.
        beta: the inverse temperature β = 1/τ.

    Returns:
        The scalar F (a 0-d tensor, differentiable with respect to ``views``).

    Example:
        >>> views = torch.nn.functional.normalize(torch.randn(10, 2, 4), dim=2)
        >>> float(gcl_loss(views, beta=5.0)) > 0
        True
    """
    n, m, d = _check_views(views)
    flat = views.reshape(n * m, d)
    scores = beta * (flat @ flat.T)
    item = torch.arange(n, device=views.device).repeat_interleave(m)
    same_item = item[:, None] == item[None, :]
    log_partition = scores.masked_fill(same_item, float("-inf")).logsumexp(dim=1)
    own = torch.eye(n * m, dtype=torch.bool, device=views.device)
    positive = scores.masked_fill(~same_item | own, 0.0).sum(dim=1) / (m - 1)
    return (log_partition - positive).mean()


@torch.no_grad()
def gcl_value_and_embedding_grad(
    views: Tensor, beta: float, chunk_size: int = 1024
) -> tuple[float, Tensor]:
    """F and ∂F/∂e for every view, in anchor chunks (memory O(chunk·N·m), no autograd graph).

    With P the softmax over the negatives of anchor r = (i, a) and M = N·m:

        ∂F/∂e_x = 1/M [ -2β/(m-1) Σ_{b≠x, same item} e_b
                        + β Σ_c P_xc e_c  +  β Σ_r P_rx e_r ]

    (the positive term is symmetric, hence the factor 2; the last sum is the gradient
    reaching e_x as a negative of other anchors). Returns ``(F, grad)`` with ``grad`` shaped
    like ``views``.
    """
    n, m, d = _check_views(views)
    total = n * m
    flat = views.reshape(total, d)
    item = torch.arange(n, device=views.device).repeat_interleave(m)
    item_sum = views.sum(dim=1)  # (N, d)
    others_same_item = item_sum[item] - flat  # Σ_{b≠x} e_b for every view x
    positive_value = (flat * others_same_item).sum()

    grad = -2.0 * beta / (m - 1) * others_same_item
    log_partition_sum = torch.zeros((), dtype=flat.dtype, device=flat.device)
    for start in range(0, total, chunk_size):
        stop = min(start + chunk_size, total)
        scores = beta * (flat[start:stop] @ flat.T)
        scores.masked_fill_(item[start:stop, None] == item[None, :], float("-inf"))
        log_partition = scores.logsumexp(dim=1, keepdim=True)
        log_partition_sum += log_partition.sum()
        probs = (scores - log_partition).exp_()
        grad[start:stop] += beta * (probs @ flat)
        grad += beta * (probs.T @ flat[start:stop])
    value = (log_partition_sum - beta / (m - 1) * positive_value) / total
    return float(value), (grad / total).reshape(n, m, d)


def exact_gradient(
    encode: Callable[[Tensor], Tensor],
    parameters: Sequence[nn.Parameter],
    inputs: Tensor,
    beta: float,
    chunk_size: int = 1024,
) -> tuple[float, list[Tensor]]:
    """Exact F(θ) and ∇F(θ) for an encoder over a finite view set.

    ``inputs`` has shape (N, m, ...): every view of every item. ``encode`` maps a batch of
    inputs to L2-normalised embeddings. Memory is bounded by ``chunk_size``: embeddings are
    computed without a graph, ∂F/∂e analytically, then pulled back through the encoder one
    chunk at a time (vector-Jacobian products summed over chunks).
    """
    n, m = inputs.shape[:2]
    flat_inputs = inputs.reshape(n * m, *inputs.shape[2:])
    with torch.no_grad():
        embeddings = torch.cat(
            [encode(flat_inputs[s : s + chunk_size]) for s in range(0, n * m, chunk_size)]
        )
    value, embedding_grad = gcl_value_and_embedding_grad(
        embeddings.reshape(n, m, -1), beta, chunk_size
    )
    embedding_grad = embedding_grad.reshape(n * m, -1)
    grads = [torch.zeros_like(p) for p in parameters]
    for s in range(0, n * m, chunk_size):
        with torch.enable_grad():
            chunk_emb = encode(flat_inputs[s : s + chunk_size])
            chunk_grads = torch.autograd.grad(
                chunk_emb,
                list(parameters),
                grad_outputs=embedding_grad[s : s + chunk_size],
                allow_unused=True,
            )
        for acc, g in zip(grads, chunk_grads):
            if g is not None:
                acc += g
    return value, grads


def surrogate_loss(
    anchor_emb: Tensor,
    candidate_emb: Tensor,
    weights: Tensor,
    positive_index: Tensor,
    beta: float,
) -> Tensor:
    """The training loss of DESIGN §1.3, whose gradient is the sampler's estimate of ∇F:

        ℓ = β/A · Σ_a [ Σ_c W_ac <e_a, e_c>  -  <e_a, e_a⁺> ]

    ``weights`` (A × C) must be detached; gradients flow through both the anchor and the
    candidate of every similarity. ``positive_index[a]`` is the candidate column of a⁺.
    """
    num_anchors = anchor_emb.shape[0]
    sims = anchor_emb @ candidate_emb.T
    positive = sims.gather(1, positive_index[:, None]).sum()
    return beta / num_anchors * ((weights.detach() * sims).sum() - positive)
