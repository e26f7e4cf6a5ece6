"""``neg_cache``: negatives drawn from a stale embedding cache (Lindgren et al., NeurIPS 2021,
"Efficient training of retrieval models using negative cache"; the EMC² paper's "embedding
cache" baseline).

The cache holds a stale embedding ẽ_r per row r. ``cache=item`` (Lindgren's setting): one row
per item (the embedding of one of its views). ``cache=view``: one row per (item, view) of a
finite-view task, so a drawn row is a definite view and the cache softmax matches p_a exactly
whenever the cache is fresh. ``cache=auto`` (default) takes ``view`` on finite-view tasks and
``item`` with random augmentations (a view has no stable identity there), as ``emc2``'s
``chain=auto`` does.

Target: for anchor a of item i, the softmax over the rows of the other items,

    p̃_a(r) = exp(β <e_a, ẽ_r>) / Σ_{r' of items j' ≠ i} exp(β <e_a, ẽ_r'>),

a stand-in for the exact p_a. Per step each anchor draws K rows (``k``, default 1) exactly
from p̃_a by the Gumbel-max trick, r = argmax_r (β <e_a, ẽ_r> + G_r) with G_r i.i.d. Gumbel,
K independent times (with replacement; its own item is never drawn). The runner re-encodes
each drawn row fresh, with gradients (its view; with ``cache=item`` a view left to the task,
view -1), as an extra owned by that anchor, and

    W_ac = 1/K_a   on each of the K_a valid extras owned by anchor a,   0 elsewhere

(K_a = K in training; only a probe measurement can invalidate a draw). The draws are exact
i.i.d. samples of p̃_a, so W_a is an unbiased estimate of p̃_a, placed on fresh embeddings.
Draws are with replacement on purpose: Gumbel-top-K without replacement gives K distinct
rows whose inclusion probabilities are flatter than K·p̃_a, and W = 1/K on them would be
biased for K > 1 (for K = 1 the two coincide).

Bias: p̃_a ≠ p_a because ẽ is stale — row r was computed with the parameters of the step
that wrote it, up to ~1/ρ steps earlier, so negatives that moved are missed or over-sampled.
With ``cache=item`` also because one view stands for all of an item's views (the draw is
over items, then a random view, while p_a weighs each view by its own similarity). Neither
is corrected. At frozen parameters with ``cache=view`` there is no bias.

Cache maintenance: the batch's anchors overwrite their rows with their fresh (detached)
embeddings in :meth:`weigh` (``cache=item``: the item's first anchor); :meth:`refresh`
re-encodes, without gradients and with the parameters after the optimiser step, the
⌈ρ·R⌉ stalest of the R rows (ρ = ``refresh_frac``), by per-row age. The cache is filled by
one full no-grad pass over all R rows at the first :meth:`refresh`; before it (the first
step) every row is 0, so the first draws are uniform over the other items' rows.

Per-item state: per row, d float32 plus the int32 step at which it was written — (4·d + 4)
bytes per item, times m with ``cache=view``. Extra encoder passes per step: A·K (with
gradients) + ⌈ρ·R⌉ (no grad), plus R once. Diagnostic ``cache_age``: mean number of steps
since the drawn rows were written.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from negbench import Batch, EncodeFn, Extras, Metric, Param, register_sampler, Sampler


#: entries of one chunk of the anchors × cache-rows score matrix (64 MiB in float32)
MAX_SCORES = 2**24


@register_sampler("neg_cache")
class NegativeCacheSampler(Sampler):
    description = "K negatives per anchor drawn from a softmax over a stale embedding cache (Lindgren et al. 2021)."
    params = {
        "k": Param(1, "K: negatives drawn per anchor from the cache softmax (re-encoded with gradients)", low=1),
        "refresh_frac": Param(0.01, "ρ: fraction of the stalest cache rows re-encoded (no grad) each step", low=0.0, high=1.0),
        "cache": Param("auto", "one cache row per view (finite views) or per item", choices=("auto", "view", "item")),
    }
    test_params = {"k": 2, "refresh_frac": 0.1}
    state_attributes = ("cache_emb", "cache_step")
    diagnostic_attributes = ("_counters",)
    diagnostic_metrics = (Metric("cache_age", "mean number of steps since the drawn cache rows were written"),)

    def check_task(self, num_items: int, num_views: int | None) -> None:
        super().check_task(num_items, num_views)
        self.check_view_mode("cache", num_views)

    def reset_state(self) -> None:
        ctx = self.context
        assert ctx is not None
        self.mode, self.views_per_item = self.resolve_view_mode("cache")
        rows = ctx.num_items * self.views_per_item
        self.cache_emb = torch.zeros(rows, ctx.dim, dtype=torch.float32, device=ctx.device)
        self.cache_step = torch.full((rows,), -1, dtype=torch.int32, device=ctx.device)
        self.row_item = torch.arange(rows, device=ctx.device) // self.views_per_item
        self.steps_done = 0
        self.filled = False
        self._counters = torch.zeros(2, dtype=torch.float64, device=ctx.device)

    def rows_to_views(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(items, views) of cache rows; view -1 (the task chooses) with ``cache=item``."""
        if self.mode == "view":
            return rows // self.views_per_item, rows % self.views_per_item
        return rows, torch.full_like(rows, -1)

    def draw(self, anchor_emb: Tensor, anchor_items: Tensor, k: int) -> Tensor:
        """``k`` i.i.d. draws per anchor from the cache softmax over the other items' rows:
        cache row ids, shape (A, k). Anchors are taken in chunks so that the scores and the
        Gumbel noise never exceed :data:`MAX_SCORES` entries (A × rows is 8 GB at A = 2,048,
        N = 10⁶); when all anchors fit in one chunk the random stream is the unchunked one."""
        per_chunk = max(1, MAX_SCORES // max(1, self.cache_emb.shape[0]))
        return torch.cat([
            self._draw_chunk(anchor_emb[s : s + per_chunk], anchor_items[s : s + per_chunk], k)
            for s in range(0, anchor_emb.shape[0], per_chunk)
        ])

    def _draw_chunk(self, anchor_emb: Tensor, anchor_items: Tensor, k: int) -> Tensor:
        logits = self.beta * anchor_emb.float() @ self.cache_emb.T
        logits = logits.masked_fill(anchor_items[:, None] == self.row_item[None, :], float("-inf"))
        draws = []
        for _ in range(k):
            u = torch.rand(logits.shape, generator=self.generator, device=logits.device)
            gumbel = -torch.log(-torch.log(u))  # u = 0 gives -inf: never drawn
            draws.append((logits + gumbel).argmax(dim=1))
        return torch.stack(draws, dim=1)

    def propose(self, batch: Batch) -> Extras:
        drawn = self.draw(batch.anchor_emb, batch.anchor_items, self.k)
        written = self.cache_step[drawn]
        filled = written >= 0
        self._counters[0] += ((self.steps_done - written) * filled).sum()
        self._counters[1] += filled.sum()
        items, views = self.rows_to_views(drawn.reshape(-1))
        owner = torch.arange(batch.num_anchors, device=items.device).repeat_interleave(self.k)
        return Extras(items, views, owner=owner)

    def negatives_per_anchor(self, batch_size: int) -> int | None:
        """K negatives per anchor per step (not the 2B in-batch candidates)."""
        return self.k

    def weigh(self, sims: Tensor, batch: Batch) -> Tensor:
        a = batch.num_anchors
        weights = sims.new_zeros(sims.shape)
        valid = batch.valid[:, a:].to(sims.dtype)
        weights[:, a:] = valid / valid.sum(dim=1, keepdim=True).clamp_min(1.0)
        if self.mode == "view":
            rows, emb = batch.anchor_items * self.views_per_item + batch.anchor_views, batch.anchor_emb
        else:
            rows, emb = batch.anchor_items[0::2], batch.anchor_emb[0::2]
        self.cache_emb[rows] = emb.float()
        self.cache_step[rows] = self.steps_done
        self.steps_done += 1
        return weights

    def refresh(self, encode: EncodeFn) -> None:
        num_rows = self.cache_step.numel()
        device = self.cache_step.device
        if not self.filled:
            rows = torch.arange(num_rows, device=device)
            self.filled = True
        else:
            count = min(num_rows, math.ceil(round(self.refresh_frac * num_rows, 9)))
            if count == 0:
                return
            rows = torch.argsort(self.cache_step, stable=True)[:count]
        self.cache_emb[rows] = encode(*self.rows_to_views(rows)).float().to(device)
        self.cache_step[rows] = self.steps_done

    def diagnostics(self) -> dict[str, float]:
        total, count = self._counters.tolist()
        self._counters.zero_()
        return {"cache_age": total / count if count else None}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps_done": self.steps_done, "filled": self.filled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps_done = int(state["steps_done"])
        self.filled = bool(state["filled"])
