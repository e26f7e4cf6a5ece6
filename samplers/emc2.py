"""``emc2``: adaptive Metropolis–Hastings negatives (Yau et al., ICML 2024), DESIGN §2.1.

Target: for anchor a, the exact softmax over the negatives, p_a(c) ∝ exp(β s_ac).

State: one Markov chain per (item, view) on finite-view tasks (``chain=view``: each chain has
one fixed target, an exact MH chain) or per item with random augmentations (``chain=item``,
the second view's sweep continuing where the first view's ended). A chain stores its state x
(a view id ``item·m + view``, or an item id; -1 = not started), the log score ℓ = β s_ax
recorded when x was accepted (start -inf, so the first proposal is always accepted), and
the step of that acceptance: int32 + float32 + int32 = **12 bytes per chain**.

Per step, anchor a visits its K_a valid in-batch candidates in a random order (the batch is
a uniform draw, so the proposal is independent of the state and uniform, and p_a is the
stationary distribution). Proposal c is accepted when

    log U < β s_ac − ℓ,     U ~ Uniform(0, 1),

and then x ← c, ℓ ← β s_ac (log space throughout: β = 100 works). ℓ is *stale*: computed with
the parameters of the step that accepted it — that is the algorithm. The first
P = ⌊burn_in·K_a⌋ proposals are burn-in; the state after each later one is recorded, and

    W_ac = (#records on c) / (#used records).

A record can fall on an out-of-batch state (the chain rejected every proposal so far):
``stale=drop`` leaves it out, ``stale=refresh`` asks for that view as an extra candidate
(up to A extra encoder passes) so its fresh embedding is used. No extra passes by default.
Diagnostics: ``accept_rate`` (accepted / proposals after burn-in), ``stale_frac`` (records on
out-of-batch states, dropped or refreshed), ``empty_frac`` (anchors left with no negative), ``chain_age`` (mean
steps since the stored scores of this step's chains were computed).

Kernels (``kernel=auto|fused|reference``): the sweep is sequential per chain and independent
across chains. :func:`mh_sweep` is the pure-PyTorch reference (a Python loop over the K
proposals, vectorised over chains); ``fused`` runs the whole step's sweep as one kernel
(:mod:`negbench.kernels.emc2`: a small C library on the CPU, Triton on CUDA) with identical
results for identical random numbers — the proposal keys and log U are drawn here with
torch's generator for both paths. ``auto`` uses ``fused`` when it is available and otherwise
falls back to the reference with a one-time warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from negbench.errors import UserError
from negbench.kernels import emc2 as kernels
from negbench.metric_registry import Metric
from negbench.params import Param
from negbench.registry import register_sampler
from negbench.sampler import Batch, Extras, Sampler

NOT_RECORDED = kernels.NOT_RECORDED  # -2
OUT_OF_BATCH = -1


@dataclass
class SweepResult:
    column: Tensor  # (A,) final state's candidate column, -1 when out of batch
    score: Tensor  # (A,) final stored log score
    accepted: Tensor  # (A,) bool: some proposal was accepted
    records: Tensor  # (A, K) recorded column, OUT_OF_BATCH, or NOT_RECORDED
    accepted_after_burn_in: Tensor  # (A,) number of accepted proposals after burn-in
    proposals_after_burn_in: Tensor  # (A,)


def mh_sweep(
    proposal_scores: Tensor,
    proposal_columns: Tensor,
    num_proposals: Tensor,
    burn_in: Tensor,
    column: Tensor,
    score: Tensor,
    log_u: Tensor,
) -> SweepResult:
    """The reference MH sweep, vectorised over chains (rows), sequential over proposals.

    Row a visits proposals t < ``num_proposals[a]`` with log score ``proposal_scores[a, t]``
    and candidate column ``proposal_columns[a, t]``; it accepts when
    ``log_u[a, t] < proposal_scores[a, t] - score[a]``. Steps t ≥ ``burn_in[a]`` are recorded.
    No host synchronisation.
    """
    num_chains, num_steps = proposal_scores.shape
    column = column.clone()
    score = score.clone()
    accepted_any = torch.zeros(num_chains, dtype=torch.bool, device=score.device)
    records = torch.full((num_chains, num_steps), NOT_RECORDED, dtype=torch.long, device=score.device)
    accepted_late = torch.zeros(num_chains, dtype=torch.long, device=score.device)
    for t in range(num_steps):
        active = num_proposals > t
        accept = active & (log_u[:, t] < proposal_scores[:, t] - score)
        column = torch.where(accept, proposal_columns[:, t], column)
        score = torch.where(accept, proposal_scores[:, t], score)
        accepted_any |= accept
        late = active & (burn_in <= t)
        accepted_late += (accept & late).long()
        records[:, t] = torch.where(late, column, torch.full_like(column, NOT_RECORDED))
    late_count = (num_proposals - burn_in).clamp_min(0)
    return SweepResult(column, score, accepted_any, records, accepted_late, late_count)


def mh_sweep_pairs(
    proposal_scores: Tensor,
    proposal_columns: Tensor,
    num_proposals: Tensor,
    burn_in: Tensor,
    column: Tensor,
    score: Tensor,
    log_u: Tensor,
) -> SweepResult:
    """``chain=item``: rows 2k and 2k+1 (the two views of item k) share one chain. Row 2k is
    swept from the stored state; row 2k+1 continues from the score and state row 2k ended on
    (from its own ``column[2k+1]`` if row 2k accepted nothing: the stored state may sit in a
    different column for the other view, e.g. its own refreshed extra). Rows of the result
    are in the input order; row 2k+1's ``column`` and ``score`` are the chain's final ones."""
    first, second = slice(0, None, 2), slice(1, None, 2)
    r1 = mh_sweep(proposal_scores[first], proposal_columns[first], num_proposals[first], burn_in[first],
                  column[first], score[first], log_u[first])
    second_start = torch.where(r1.accepted, r1.column, column[second])
    r2 = mh_sweep(proposal_scores[second], proposal_columns[second], num_proposals[second], burn_in[second],
                  second_start, r1.score, log_u[second])
    return SweepResult(*[torch.stack([a, b], dim=1).flatten(0, 1) for a, b in zip(
        (r1.column, r1.score, r1.accepted, r1.records, r1.accepted_after_burn_in, r1.proposals_after_burn_in),
        (r2.column, r2.score, r2.accepted, r2.records, r2.accepted_after_burn_in, r2.proposals_after_burn_in),
    )])


def reference_sweep(
    logits: Tensor,
    keys: Tensor,
    log_u: Tensor,
    num_proposals: Tensor,
    burn_in: Tensor,
    column: Tensor,
    score: Tensor,
    *,
    pairs: bool = False,
) -> SweepResult:
    """One step's sweep from its random numbers, in pure PyTorch: row r's proposals are the
    columns of ``keys[r]`` in stable ascending order of the keys (invalid columns carry a key
    above every valid one), with log scores ``logits[r, c]``; then :func:`mh_sweep` (or
    :func:`mh_sweep_pairs` with ``pairs``). :func:`negbench.kernels.emc2.fused_sweep` is the
    same function as one kernel."""
    order = keys.argsort(dim=1, stable=True)
    sweep = mh_sweep_pairs if pairs else mh_sweep
    return sweep(logits.gather(1, order), order, num_proposals, burn_in, column, score, log_u)


def fused_sweep(
    logits: Tensor,
    keys: Tensor,
    log_u: Tensor,
    num_proposals: Tensor,
    burn_in: Tensor,
    column: Tensor,
    score: Tensor,
    *,
    pairs: bool = False,
) -> SweepResult:
    """:func:`reference_sweep` as one compiled kernel, identical results (raises
    :class:`negbench.kernels.emc2.KernelUnavailable` where it cannot run)."""
    out = kernels.fused_sweep(logits, keys, log_u, num_proposals, burn_in, column, score, pairs=pairs)
    late_count = (num_proposals - burn_in).clamp_min(0)
    return SweepResult(out.column, out.score, out.accepted, out.records, out.accepted_after_burn_in, late_count)


@dataclass
class StepSweep:
    """What a step needs from its sweep: the rows' final chain states and the histogram of the
    used records (``counts[a, c]`` = records of anchor a on column c), with per-row tallies."""

    column: Tensor
    score: Tensor
    accepted: Tensor
    accepted_after_burn_in: Tensor
    proposals_after_burn_in: Tensor
    counts: Tensor  # (A, C)
    used: Tensor  # (A,) records on an in-batch column
    out_of_batch: Tensor  # (A,) records on OUT_OF_BATCH
    recorded: Tensor  # (A,) all records


def tally(result: SweepResult, num_columns: int, dtype: torch.dtype) -> StepSweep:
    """The histogram and tallies of a sweep's records (the reference of the fused kernel's)."""
    records = result.records
    used = records >= 0
    counts = torch.zeros(records.shape[0], num_columns + 1, dtype=dtype, device=records.device)
    counts.scatter_add_(1, torch.where(used, records, num_columns), used.to(dtype))
    return StepSweep(
        result.column, result.score, result.accepted, result.accepted_after_burn_in, result.proposals_after_burn_in,
        counts[:, :num_columns], used.sum(dim=1), (records == OUT_OF_BATCH).sum(dim=1),
        (records != NOT_RECORDED).sum(dim=1),
    )


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@register_sampler("emc2")
class EMC2Sampler(Sampler):
    description = "Adaptive Metropolis-Hastings chains per item/view with stale scores (EMC², ICML 2024)."
    params = {
        "burn_in": Param(0.5, "fraction of each sweep's proposals not recorded", low=0.0, high=0.99),
        "chain": Param("auto", "one chain per view (finite views) or per item", choices=("auto", "view", "item")),
        "stale": Param("drop", "records on out-of-batch states: drop, or refresh (extra passes)", choices=("drop", "refresh")),
        "kernel": Param("auto", "MH sweep: fused (one compiled kernel per step), reference (pure PyTorch), or auto (fused when available)", choices=("auto", "fused", "reference")),
    }
    test_params = {"burn_in": 0.5}
    #: ``negbench compare --samplers all`` also runs the other stale treatment (§2.1)
    compare_variants = ("stale=refresh",)
    state_attributes = ("chain_state", "chain_score", "chain_step")
    diagnostic_attributes = ("_counters", "_anchors_seen")
    diagnostic_metrics = (
        Metric("accept_rate", "fraction of the Metropolis–Hastings proposals accepted after burn-in",
               better="higher", summary=True),
        Metric("stale_frac", "fraction of the recorded chain states that fall outside the batch (stale)",
               headline=True),
        Metric("empty_frac", "fraction of anchors left without a negative (stale=drop)", headline=True),
        Metric("chain_age", "mean steps since the stored scores of this step's chains were computed"),
    )

    def check_task(self, num_items: int, num_views: int | None) -> None:
        super().check_task(num_items, num_views)
        self.check_view_mode("chain", num_views)

    def reset_state(self) -> None:
        ctx = self.context
        assert ctx is not None
        self.mode, self.views_per_chain = self.resolve_view_mode("chain")
        num_chains = ctx.num_items * self.views_per_chain
        self.chain_state = torch.full((num_chains,), -1, dtype=torch.int32, device=ctx.device)
        self.chain_score = torch.full((num_chains,), float("-inf"), dtype=torch.float32, device=ctx.device)
        self.chain_step = torch.zeros(num_chains, dtype=torch.int32, device=ctx.device)
        self.steps_done = 0
        self._fused = self._resolve_kernel(ctx.device)
        self._reset_counters()

    def _reset_counters(self) -> None:
        device = self.chain_state.device
        self._counters = torch.zeros(7, dtype=torch.float64, device=device)
        self._anchors_seen = 0

    # ---- ids ---------------------------------------------------------------------------
    def _chain_ids(self, batch: Batch) -> Tensor:
        if self.mode == "view":
            return batch.anchor_items * self.views_per_chain + batch.anchor_views
        return batch.anchor_items

    def _candidate_ids(self, items: Tensor, views: Tensor) -> Tensor:
        if self.mode == "view":
            return items * self.views_per_chain + views
        return items

    # ---- protocol ------------------------------------------------------------------------
    def needs_encoder(self) -> bool:
        return self.stale == "refresh"  # stale=drop never asks for extras

    def propose(self, batch: Batch) -> Extras | None:
        if self.stale != "refresh":
            return None
        state = self.chain_state[self._chain_ids(batch)].long()
        in_batch = (state[:, None] == self._candidate_ids(batch.candidate_items, batch.candidate_views)[None, :]).any(1)
        # Host sync here is fine: stale=refresh changes the number of encoder passes anyway.
        need = torch.nonzero((state >= 0) & ~in_batch).squeeze(1)
        if need.numel() == 0:
            return None
        picked = state[need]
        if self.mode == "view":
            items, views = picked // self.views_per_chain, picked % self.views_per_chain
        else:
            items, views = picked, torch.full_like(picked, -1)
        return Extras(items, views, owner=need)

    def weigh(self, sims: Tensor, batch: Batch) -> Tensor:
        num_anchors, num_candidates = sims.shape
        device = sims.device
        chains = self._chain_ids(batch)
        cand_ids = self._candidate_ids(batch.candidate_items, batch.candidate_views)
        valid = batch.valid

        # Where does each chain's current state sit among this step's candidates?
        state = self.chain_state[chains].long()
        match = (state[:, None] == cand_ids[None, :]) & valid
        has_column = match.any(dim=1)
        start_column = torch.where(has_column, match.to(torch.uint8).argmax(dim=1), torch.full_like(state, OUT_OF_BATCH))
        start_score = self.chain_score[chains]
        ages = (self.steps_done - self.chain_step[chains]).double()
        started = state >= 0

        # Proposals: the valid in-batch candidates in a uniformly random order per anchor (the
        # stable argsort of uniform keys, invalid columns last). Both kernels consume exactly
        # these random numbers.
        in_batch_valid = batch.in_batch_valid
        keys = torch.rand(num_anchors, num_anchors, generator=self.generator, device=device, dtype=torch.float32)
        keys.masked_fill_(~in_batch_valid, 2.0)
        num_proposals = in_batch_valid.sum(dim=1)
        burn = torch.floor(self.burn_in * num_proposals.double()).long()
        logits = (self.beta * sims[:, :num_anchors]).float()
        log_u = torch.rand(num_anchors, num_anchors, generator=self.generator, device=device, dtype=torch.float32).log_()
        sweep = self._sweep(logits, keys, log_u, num_proposals, burn, start_column, start_score,
                            num_candidates, sims.dtype)

        if self.mode == "item":  # rows 2k, 2k+1 swept item k's chain in turn
            final_column, final_score = sweep.column[1::2], sweep.score[1::2]
            accepted = sweep.accepted[0::2] | sweep.accepted[1::2]
            chains_written, old_state = chains[0::2], state[0::2]
        else:
            final_column, final_score, accepted = sweep.column, sweep.score, sweep.accepted
            chains_written, old_state = chains, state
        final_state = torch.where(final_column >= 0, cand_ids[final_column.clamp_min(0)], old_state)
        self.chain_state[chains_written] = final_state.to(torch.int32)
        self.chain_score[chains_written] = final_score
        step = self.chain_step[chains_written]
        self.chain_step[chains_written] = torch.where(accepted, torch.full_like(step, self.steps_done), step)

        # W_ac = (#records on c) / (#used records)
        weights = sweep.counts / sweep.used.clamp_min(1).to(sims.dtype)[:, None]

        # Accumulated on the device: no host synchronisation in a step. A record on an
        # out-of-batch state is either dropped (OUT_OF_BATCH) or, with stale=refresh, falls on
        # the refreshed extra column (beyond the A in-batch ones): stale_frac counts both.
        refreshed = sweep.counts[:, num_anchors:].sum()
        self._counters += torch.stack([
            sweep.accepted_after_burn_in.sum(),
            sweep.proposals_after_burn_in.sum(),
            sweep.out_of_batch.sum() + refreshed.to(sweep.out_of_batch.dtype),
            sweep.recorded.sum(),
            (sweep.used == 0).sum(),
            (ages * started).sum(),
            started.sum(),
        ]).double()
        self._anchors_seen += num_anchors
        self.steps_done += 1
        return weights

    # ---- the sweep kernel -------------------------------------------------------------------
    def _resolve_kernel(self, device: torch.device) -> bool:
        """Whether to use the fused sweep on ``device`` (see the ``kernel`` parameter)."""
        if self.kernel == "reference":
            return False
        reason = kernels.unavailable_reason(device)
        if reason is None:
            return True
        self._kernel_unavailable(device, reason)
        return False

    def _kernel_unavailable(self, device: torch.device, reason: str) -> None:
        if self.kernel == "fused":
            raise UserError(
                f"emc2 kernel=fused cannot run on {device.type}: {reason}; use --set kernel=auto or kernel=reference"
            )
        _warn_once(
            f"emc2: the fused sweep cannot run on {device.type} ({reason}); falling back to the "
            "slower pure-PyTorch reference sweep (same results)"
        )

    @property
    def sweep_backend(self) -> str:
        """The sweep in use: ``c`` or ``triton`` (fused), or ``reference``."""
        if not self._fused:
            return "reference"
        return "triton" if self.chain_state.device.type == "cuda" else "c"

    def _sweep(self, logits: Tensor, keys: Tensor, log_u: Tensor, num_proposals: Tensor, burn: Tensor,
               start_column: Tensor, start_score: Tensor, num_columns: int, dtype: torch.dtype) -> StepSweep:
        args = (logits, keys, log_u, num_proposals, burn, start_column, start_score)
        pairs = self.mode == "item"
        if self._fused and dtype in (torch.float32, torch.float64):
            try:
                out = kernels.fused_sweep(*args, pairs=pairs, records=False, count_columns=num_columns, count_dtype=dtype)
            except kernels.KernelUnavailable as exc:  # e.g. the Triton JIT failed at first launch
                self._kernel_unavailable(logits.device, str(exc))
                self._fused = False
            else:
                assert out.counts is not None
                return StepSweep(
                    out.column, out.score, out.accepted, out.accepted_after_burn_in,
                    (num_proposals - burn).clamp_min(0), out.counts, out.used, out.out_of_batch, out.recorded,
                )
        return tally(reference_sweep(*args, pairs=pairs), num_columns, dtype)

    def diagnostics(self) -> dict[str, float]:
        accepted, proposals, stale, records, empty, age_sum, age_count = self._counters.tolist()
        anchors = self._anchors_seen
        self._reset_counters()
        ratio = lambda num, den: num / den if den else None  # noqa: E731
        return {
            "accept_rate": ratio(accepted, proposals),
            "stale_frac": ratio(stale, records),
            "empty_frac": ratio(empty, anchors),
            "chain_age": ratio(age_sum, age_count),
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps_done": self.steps_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps_done = int(state["steps_done"])
