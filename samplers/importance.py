"""``importance``: self-normalised importance sampling over K extra items drawn from a proposal.

Target: for anchor a, the exact softmax over the negatives, p_a(c) ∝ exp(β s_ac).

Per step K items j_1 … j_K (K is a parameter, independent of the batch size) are drawn
i.i.d. from a proposal q over the N items, each with a view left to the task (view -1: a
uniformly random fixed view on finite-view tasks, a fresh augmentation otherwise), and the
runner encodes them with gradients. They are shared by every anchor. The weights are

    W_ac = [exp(β s_ac) / q(j_c)] / Σ_{c' ∈ V_a} [exp(β s_ac') / q(j_c')]    for c ∈ V_a,

where V_a is the set of extras valid for anchor a (those of another item), and 0 on every
in-batch column. A view is drawn with probability q(j)/m, and the constant 1/m cancels in the
normalisation, so W_a is the self-normalised importance-sampling estimate of p_a: consistent
for any q with full support, with a bias and variance of order 1/K. Computed as a masked
softmax of β s_ac − log q(j_c): never exponentiates β s (β = 100 works).

Proposals:

- ``proposal=uniform`` (default): q(j) = 1/N. No per-item state.
- ``proposal=cache``: a stale embedding ẽ_j per item (the embedding of one of its views the
  last time it was in a batch; rows start at 0, a neutral logit) and

      q(j) = (1 − ε) · 1/A Σ_a softmax_j(β <e_a, ẽ_j>)  +  ε / N,

  the mixture over the batch's A anchors of their cache softmaxes, mixed with ε of uniform so
  q has full support (ε = ``eps``). q is *shared* by the anchors, so the K draws serve every
  anchor and the cost stays K encoder passes (a per-anchor proposal would need extras owned
  by one anchor each: A·K passes). Computing q costs an A×N product with the cache on the
  sampler side. The cache is overwritten from the batch embeddings in :meth:`weigh`; there
  is no refresh pass. Memory: N×d float32 (4·d bytes per item).

Extra encoder passes per step: K. In-batch candidates get no weight.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from negbench import Batch, Extras, Param, register_sampler, Sampler


@register_sampler("importance")
class ImportanceSampler(Sampler):
    description = "Self-normalised importance sampling over K extra items from a uniform or cache proposal."
    params = {
        "k": Param(64, "K: extra items drawn i.i.d. from the proposal each step (shared by all anchors)", low=1),
        "proposal": Param("uniform", "proposal q: uniform over items, or a stale embedding cache", choices=("uniform", "cache")),
        "eps": Param(0.1, "ε: weight of the uniform component in the cache proposal", low=0.0, high=1.0, low_open=True),
    }
    test_params = {"k": 8, "proposal": "cache"}
    state_attributes = ("cache",)  # (N, d) with proposal=cache, empty (0, d) with uniform

    def reset_state(self) -> None:
        ctx = self.context
        assert ctx is not None
        rows = ctx.num_items if self.proposal == "cache" else 0
        self.cache = torch.zeros(rows, ctx.dim, dtype=torch.float32, device=ctx.device)
        self._log_q: Tensor | None = None

    def proposal_log_prob(self, anchor_emb: Tensor) -> Tensor:
        """log q(j) for every item j (shape (N,)), given this step's anchor embeddings."""
        ctx = self.context
        assert ctx is not None
        n = ctx.num_items
        if self.proposal == "uniform":
            return torch.full((n,), -math.log(n), device=anchor_emb.device)
        logits = self.beta * anchor_emb.float() @ self.cache.T
        log_mix = torch.logsumexp(torch.log_softmax(logits, dim=1), dim=0) - math.log(anchor_emb.shape[0])
        if self.eps >= 1.0:
            return torch.full_like(log_mix, -math.log(n))
        return torch.logaddexp(log_mix + math.log1p(-self.eps), torch.full_like(log_mix, math.log(self.eps / n)))

    def propose(self, batch: Batch) -> Extras:
        ctx = self.context
        assert ctx is not None
        device = batch.anchor_items.device
        self._log_q = self.proposal_log_prob(batch.anchor_emb)
        if self.proposal == "uniform":
            items = torch.randint(ctx.num_items, (self.k,), generator=self.generator, device=device)
        else:
            items = torch.multinomial(self._log_q.exp(), self.k, replacement=True, generator=self.generator)
        return Extras(items, torch.full_like(items, -1))

    def negatives_per_anchor(self, batch_size: int) -> int | None:
        """K negatives per anchor per step (not the 2B in-batch candidates)."""
        return self.k

    def weigh(self, sims: Tensor, batch: Batch) -> Tensor:
        a = batch.num_anchors
        weights = sims.new_zeros(sims.shape)
        extra_items = batch.candidate_items[a:]
        if extra_items.numel():
            assert self._log_q is not None, "propose() must run before weigh()"
            log_q = self._log_q.to(sims.device)[extra_items]
            logits = (self.beta * sims[:, a:]).float() - log_q[None, :]
            logits = logits.masked_fill(~batch.valid[:, a:], float("-inf"))
            weights[:, a:] = torch.nan_to_num(torch.softmax(logits, dim=1), nan=0.0).to(sims.dtype)
        if self.proposal == "cache":
            items = batch.anchor_items[0::2]
            self.cache[items] = batch.anchor_emb[0::2].float()
        self._log_q = None
        return weights
