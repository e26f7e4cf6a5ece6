"""``queue``: a FIFO queue of the last Q anchor embeddings as extra, stale negatives (He et
al., "Momentum Contrast for Unsupervised Visual Representation Learning", CVPR 2020, without
the momentum encoder).

State: the embeddings of the last Q = ``size`` anchor views (both views of every batch item
are enqueued after each step's weights are computed, oldest overwritten first), with their
item and view ids. Per step the queued entries are offered to every anchor as extra
candidates **given as stale, gradient-free embeddings** (``Extras.embeddings``): they are not
re-encoded, and ∂ℓ/∂e reaches only the anchors through them, as MoCo's stop-gradient keys.
An entry of the anchor's own item (its other view, or itself, from an earlier step) is a
positive, not a negative: it is masked. With Q_a the valid queue entries of anchor a and V_a
its valid in-batch negatives, the weights are the softmax of MoCo's InfoNCE

    L_a = −log [ e^{β s_aa⁺} / (e^{β s_aa⁺} + Σ_{c ∈ N_a} e^{β s_ac}) ],
    W_ac = e^{β s_ac} / (e^{β s_aa⁺} + Σ_{c' ∈ N_a} e^{β s_ac'})    for c ∈ N_a ∪ {a⁺},

with N_a = Q_a (``in_batch=false``: MoCo's negatives, the queue only) or N_a = V_a ∪ Q_a
(``in_batch=true``, the default: SimCLR's batch plus the queue). Then the surrogate's gradient
is that of 1/A Σ_a L_a with the queue held constant. The positive is in the denominator, as
in MoCo (and NT-Xent); the first step, with an empty queue and ``in_batch=false``, has only
the positive and no gradient.

The queue is not per item: Q·(4·d + 8) + 8 bytes in all (float32 embeddings, int32 item and
view ids, an int64 count of enqueued anchors), saved in checkpoints and resumed
bit-identically. No extra encoder passes. A queue longer than 16 epochs of anchors
(Q > 16·2N: each step enqueues 2B views, an epoch 2N) is refused: its oldest entries would be
more than 16 epochs stale, every item held many times over at ages the encoder has long left.

A momentum encoder does not fit the sampler interface: it needs a second copy of the model,
updated from θ after every optimiser step, to encode the keys — a sampler sees embeddings and
a no-grad ``encode`` of the current θ only, never the model. It would belong in the runner.
"""

from __future__ import annotations

import torch
from torch import Tensor

from negbench import Batch, Extras, Param, register_sampler, Sampler, UserError

#: the longest queue accepted, in epochs of enqueued anchors (2N per epoch)
MAX_EPOCHS = 16


@register_sampler("queue")
class QueueSampler(Sampler):
    description = "A FIFO queue of the last Q anchor embeddings as stale negatives (MoCo, He et al., CVPR 2020; no momentum encoder)."
    params = {
        "size": Param(4096, "Q: queued anchor embeddings (stale, no gradient)", low=1),
        "in_batch": Param(True, "also use the in-batch negatives (false: the queue only, as MoCo)"),
    }
    test_params = {"size": 12, "in_batch": True}
    state_attributes = ("queue_emb", "queue_items", "queue_views", "count")

    def check_task(self, num_items: int, num_views: int | None) -> None:
        super().check_task(num_items, num_views)
        limit = MAX_EPOCHS * 2 * num_items
        if self.size > limit:
            raise UserError(
                f"queue size={self.size} is more than {MAX_EPOCHS} epochs of anchors on {num_items} items "
                f"({MAX_EPOCHS}·2·{num_items} = {limit}): its oldest entries would be that stale; use --set size={limit} or less"
            )

    def reset_state(self) -> None:
        ctx = self.context
        assert ctx is not None
        self.queue_emb = torch.zeros(self.size, ctx.dim, dtype=torch.float32, device=ctx.device)
        self.queue_items = torch.full((self.size,), -1, dtype=torch.int32, device=ctx.device)
        self.queue_views = torch.zeros(self.size, dtype=torch.int32, device=ctx.device)
        self.count = torch.zeros((), dtype=torch.int64, device=ctx.device)
        self._count = 0  # a host copy of ``count`` (no synchronisation per step)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._count = int(self.count)

    def needs_encoder(self) -> bool:
        """Never: the queued extras are stale embeddings, given, not encoded."""
        return False

    def propose(self, batch: Batch) -> Extras | None:
        filled = min(self._count, self.size)
        if filled == 0:
            return None
        return Extras(self.queue_items[:filled].long(), self.queue_views[:filled].long(),
                      embeddings=self.queue_emb[:filled])

    def weigh(self, sims: Tensor, batch: Batch) -> Tensor:
        a = batch.num_anchors
        support = batch.valid.clone()
        if not self.in_batch:
            support[:, :a] = False
        support[torch.arange(a, device=sims.device), batch.positive] = True
        weights = self.masked_softmax(sims, support)
        self._enqueue(batch)
        return weights

    def _enqueue(self, batch: Batch) -> None:
        """Write the batch's anchors over the oldest entries (the last Q of them if A > Q)."""
        a = batch.num_anchors
        keep = slice(max(0, a - self.size), a)
        slots = (self._count + max(0, a - self.size) + torch.arange(keep.stop - keep.start, device=self.queue_emb.device)) % self.size
        self.queue_emb[slots] = batch.anchor_emb[keep].float().to(self.queue_emb.device)
        self.queue_items[slots] = batch.anchor_items[keep].to(torch.int32).to(self.queue_items.device)
        self.queue_views[slots] = batch.anchor_views[keep].to(torch.int32).to(self.queue_views.device)
        self._count += a
        self.count.fill_(self._count)
