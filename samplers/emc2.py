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
across chains. ``fused`` runs the whole step's sweep as one kernel (:mod:`negbench.kernels.emc2`:
a small C library on the CPU, Triton on CUDA) that also generates its random numbers —
Philox-4x32-10 keyed by the sampler's 64-bit ``philox_key`` (one draw from the run's sampler
generator, checkpointed) with the counter (proposal pair, row, step, 0) — and writes the
normalised W. :func:`reference_sweep` is the same function in tensor code, no compiled kernel
(PyTorch; on the CPU NumPy's ufuncs on the tensors' memory, where they are cheaper per call: the
random numbers materialised, then :func:`mh_sweep`: a Python loop over the proposals,
vectorised over chains), bit for bit. ``auto`` uses ``fused`` when it is available and otherwise falls back to the
reference with a one-time warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
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


class _Walked(NamedTuple):
    """What :func:`_walk` returns (per chain row, per step t)."""

    accept: Tensor  # (chains, steps) bool: step t accepted
    column: Tensor  # (chains, steps) int64: the column after step t (new: the caller may overwrite it)
    at: Tensor  # (chains, steps) int64: the last accepted step ≤ t (any step when none)
    moved: Tensor  # (chains, steps) bool: some step ≤ t was accepted
    final_score: Tensor  # (chains,) ℓ after the last step


def _walk(scores: Tensor, columns: Tensor, log_u: Tensor, active: Tensor, score: Tensor,
          fallback: Tensor) -> _Walked:
    """Chains (rows) through their proposals (columns t): accept t when active and
    ``log_u[:, t] < scores[:, t] - ℓ``. Only the recursion of ℓ runs in a Python loop (three
    operations per proposal, vectorised over chains); the states follow afterwards: after step
    t a chain is on the column of its last accepted proposal, else on its fallback: the steps
    fall in equal groups (one per column of ``fallback``, (chains, groups)), and group g's
    fallback is ``fallback[:, g]``.

    ℓ after step t is ``scores[:, at]`` where moved, else ``score`` (:func:`_score_after`); after
    the last step it is the loop's own ℓ."""
    num_chains, num_steps = scores.shape
    if num_steps == 0:
        none = torch.zeros(num_chains, 0, dtype=torch.long, device=scores.device)
        return _Walked(active.clone(), none, none.clone(), active.clone(), score.clone())
    # inactive steps get -inf: never accepted (-inf - ℓ is -inf or NaN, and log u < NaN is False)
    steps = scores.T.clone(memory_format=torch.contiguous_format).masked_fill_(~active.T, float("-inf"))  # a copy: always
    u = log_u.T.contiguous()
    accept = torch.empty(num_steps, num_chains, dtype=torch.bool, device=scores.device)
    current, gap = score.clone(), torch.empty_like(score)
    if scores.device.type == "cpu":
        _recurse_numpy(steps.numpy(), u.numpy(), current.numpy(), gap.numpy(), accept.numpy())
    else:
        _recurse_torch(steps, u, current, gap, accept)
    del steps, u
    accept = accept.T
    # the running max of the accepted steps' ids; where there is one, its position (cummax's
    # int64 indices) is the step itself, so ``at`` needs no conversion. int32 ids: every
    # full-size temporary is a fresh allocation whose pages fault in, much of this time on the CPU
    step_ids = torch.arange(num_steps, dtype=torch.int32, device=scores.device)
    last, at = torch.where(accept, step_ids, -1).cummax(dim=1)
    moved = last >= 0
    del last
    column = columns.gather(1, at)
    grouped = column.view(num_chains, fallback.shape[1], -1)
    torch.where(moved.view(grouped.shape), grouped, fallback[:, :, None], out=grouped)
    return _Walked(accept, column, at, moved, current)


def _score_after(scores: Tensor, at: Tensor, moved: Tensor, start: Tensor, step: int) -> Tensor:
    """ℓ of each chain after ``step`` of a :func:`_walk` that started from ``start``."""
    if step < 0:
        return start.clone()
    return torch.where(moved[:, step], scores.gather(1, at[:, step : step + 1])[:, 0], start)


def _recurse_torch(steps: Tensor, log_u: Tensor, current: Tensor, gap: Tensor, accept: Tensor) -> None:
    """The loop of :func:`_walk`, in place, over (steps, chains) tensors: for each step t,
    ``accept[t] = log_u[t] < steps[t] - current``, then ``current = steps[t]`` where accepted."""
    # unbind: the rows as views in one call (indexing them in the loop costs as much as the step)
    for step, u_t, accept_t in zip(steps.unbind(0), log_u.unbind(0), accept.unbind(0)):
        torch.sub(step, current, out=gap)
        torch.lt(u_t, gap, out=accept_t)
        torch.where(accept_t, step, current, out=current)


def _recurse_numpy(steps: np.ndarray, log_u: np.ndarray, current: np.ndarray, gap: np.ndarray,
                   accept: np.ndarray) -> None:
    """:func:`_recurse_torch` on the CPU, in place, with NumPy's ufuncs on the tensors' own
    memory: the same IEEE float32 subtraction and comparison, so the same bits, at about a
    third of torch's per-call cost on rows of a few hundred chains (8.4 against 2.4 ms for
    1,024 steps of 256 chains, one thread). -inf - -inf is NaN by design (never accepted)."""
    with np.errstate(invalid="ignore"):
        for step, u_t, accept_t in zip(steps, log_u, accept):
            np.subtract(step, current, out=gap)
            np.less(u_t, gap, out=accept_t)
            np.copyto(current, step, where=accept_t)


def _result(accept: Tensor, column: Tensor, final_score: Tensor, start_column: Tensor, num_proposals: Tensor,
            burn_in: Tensor) -> SweepResult:
    """The :class:`SweepResult` of rows walked to ``column`` (overwritten: it becomes the records)."""
    steps = torch.arange(accept.shape[1], device=accept.device)
    late = (steps >= burn_in[:, None]) & (steps < num_proposals[:, None])
    final_column = column[:, -1].clone() if accept.shape[1] else start_column.clone()
    records = column.masked_fill_(~late, NOT_RECORDED)
    return SweepResult(final_column, final_score, accept.any(dim=1), records, (accept & late).sum(dim=1),
                       (num_proposals - burn_in).clamp_min(0))


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
    num_steps = proposal_scores.shape[1]
    column, num_proposals, burn_in = column.long(), num_proposals.long(), burn_in.long()
    active = torch.arange(num_steps, device=column.device) < num_proposals[:, None]
    walked = _walk(proposal_scores, proposal_columns, log_u, active, score, column[:, None])
    return _result(walked.accept, walked.column, walked.final_score, column, num_proposals, burn_in)


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
    are in the input order; row 2k+1's ``column`` and ``score`` are the chain's final ones.
    One walk of 2K steps per chain: row 2k's proposals, then row 2k+1's."""
    k = proposal_scores.shape[1]
    column, num_proposals, burn_in = column.long(), num_proposals.long(), burn_in.long()
    chains = column.shape[0] // 2
    joined = [t.reshape(chains, 2 * k) for t in (proposal_scores, proposal_columns, log_u)]
    active = (torch.arange(k, device=column.device) < num_proposals[:, None]).reshape(chains, 2 * k)
    fallback = column.reshape(chains, 2)  # each view's steps fall back on its own column
    walked = _walk(*joined, active, score[0::2], fallback)
    first_view = _score_after(joined[0], walked.at, walked.moved, score[0::2], k - 1)
    final_score = torch.stack([first_view, walked.final_score], dim=1)
    rows = [t.reshape(2 * chains, k) for t in (walked.accept, walked.column)]
    return _result(*rows, final_score.reshape(-1), column, num_proposals, burn_in)


def proposal_order(keys: Tensor) -> Tensor:
    """``keys.argsort(dim=1, stable=True)`` for (R, K) int64 keys in [0, 2^33): a plain sort of
    the unique values key · 2^b + column (b bits hold a column), whose low bits are the order,
    ties broken by column as a stable sort does. On the CPU NumPy's sort, ≈ 10× faster than
    torch's there (0.96 against 10.3 ms unstable, 29.5 ms stable, at 512 × 512, one thread)."""
    num_columns = keys.shape[1]
    bits = max(num_columns - 1, 1).bit_length()
    packed = (keys << bits).bitwise_or_(torch.arange(num_columns, device=keys.device))
    if packed.device.type == "cpu":
        packed.numpy().sort(axis=1)  # in place
    else:
        packed = packed.sort(dim=1).values
    return packed.bitwise_and_((1 << bits) - 1)


def reference_sweep(inputs: kernels.SweepInputs, *, records: bool = False) -> kernels.Sweep:
    """:func:`negbench.kernels.emc2.fused_sweep` in tensor code: the random numbers of
    :func:`~negbench.kernels.emc2.random_streams`, the proposals in stable ascending order of
    their keys (invalid columns last), then :func:`mh_sweep` (or :func:`mh_sweep_pairs`) and
    the histogram of the records, W = counts / used."""
    kernels.check_inputs(inputs)
    k = inputs.num_proposal_columns
    keys, log_u = kernels.random_streams(inputs)
    proposable = inputs.valid[:, :k]
    order = proposal_order(keys.masked_fill_(~proposable, 2**32))
    del keys  # the peak of live temporaries is what faults in (page by page) each step
    num_proposals = proposable.sum(dim=1)
    burn = torch.floor(inputs.burn_in * num_proposals.double()).long()
    sweep = mh_sweep_pairs if inputs.pairs else mh_sweep
    result = sweep(kernels.logits_of(inputs).gather(1, order), order, num_proposals, burn,
                   inputs.column, inputs.score, log_u)
    return tally(result, inputs.sims, k, records)


def tally(result: SweepResult, sims: Tensor, num_proposal_columns: int, records: bool = False) -> kernels.Sweep:
    """A sweep's records as :class:`~negbench.kernels.emc2.Sweep`: tallies and W = the
    histogram of the records on columns ≥ 0 over their number (the reference of the kernels').
    One histogram of every record (integer counts, exact) gives all of them."""
    rec = result.records
    num_columns, dtype = sims.shape[1], sims.dtype
    shift = -NOT_RECORDED  # bins: NOT_RECORDED, OUT_OF_BATCH, then column c at c + shift
    counts = torch.zeros(rec.shape[0], num_columns + shift, dtype=torch.long, device=rec.device)
    counts.scatter_add_(1, rec + shift, torch.ones((), dtype=torch.long, device=rec.device).expand(rec.shape))
    on_columns = counts[:, shift:]
    num_used = on_columns.sum(dim=1)
    weights = on_columns.to(dtype).div_(num_used.clamp_min(1).to(dtype)[:, None])
    return kernels.Sweep(
        result.column, result.score, result.accepted, result.accepted_after_burn_in, result.proposals_after_burn_in,
        num_used, counts[:, OUT_OF_BATCH + shift].clone(), on_columns[:, num_proposal_columns:].sum(dim=1),
        weights, rec if records else None,
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
        "kernel": Param("auto", "MH sweep: fused (one compiled kernel per step), reference (tensor code, no compiled kernel), or auto (fused when available)", choices=("auto", "fused", "reference")),
    }
    test_params = {"burn_in": 0.5}
    #: ``negbench compare --samplers all`` also runs the other stale treatment (§2.1)
    compare_variants = ("stale=refresh",)
    state_attributes = ("chain_state", "chain_score", "chain_step")
    diagnostic_attributes = ("_counters", "_anchors_seen")
    diagnostic_metrics = (
        Metric("accept_rate", "fraction of the Metropolis–Hastings proposals accepted after burn-in",
               better="higher", summary=True, low=0.0, high=1.0),
        Metric("stale_frac", "fraction of the recorded chain states that fall outside the batch (stale)",
               headline=True, low=0.0, high=1.0),
        Metric("empty_frac", "fraction of anchors left without a negative (stale=drop)", headline=True, low=0.0,
               high=1.0),
        Metric("chain_age", "mean steps since the stored scores of this step's chains were computed"),
    )
    #: an anchor whose chain records only out-of-batch states gets no negative (stale=drop)
    empty_rows = True
    min_batch_size = 2  # proposals are the in-batch candidates

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
        # the Philox key of the sweeps: one draw from the run's sampler generator (checkpointed)
        self.philox_key = int(torch.randint(0, 2**63 - 1, (), generator=self.generator, device=self.generator.device))
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
        num_anchors = sims.shape[0]
        chains = self._chain_ids(batch)
        cand_ids = self._candidate_ids(batch.candidate_items, batch.candidate_views)
        valid = batch.valid

        # Where does each chain's current state sit among this step's candidates?
        state = self.chain_state[chains].long()
        match = (state[:, None] == cand_ids[None, :]).logical_and_(valid)
        first = match.view(torch.uint8).argmax(dim=1)  # the first matching column, or 0 if none
        has_column = match.gather(1, first[:, None]).squeeze(1)
        start_column = torch.where(has_column, first, torch.full_like(state, OUT_OF_BATCH))
        start_score = self.chain_score[chains]
        ages = (self.steps_done - self.chain_step[chains]).double()
        started = state >= 0

        # The sweep: proposals, random numbers (Philox, counter = this step) and W in one kernel.
        sweep = self._sweep(kernels.SweepInputs(
            sims, valid, start_column, start_score, self.beta, self.burn_in, self.philox_key, self.steps_done,
            num_anchors, pairs=self.mode == "item"))

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

        # Accumulated on the device: no host synchronisation in a step. A record on an
        # out-of-batch state is either dropped (OUT_OF_BATCH) or, with stale=refresh, falls on
        # the refreshed extra column (beyond the A in-batch ones): stale_frac counts both.
        self._counters += torch.stack([
            sweep.accepted_after_burn_in.sum(),
            sweep.recorded.sum(),
            sweep.out_of_batch.sum() + sweep.extra.sum(),
            sweep.recorded.sum(),
            (sweep.used == 0).sum(),
            (ages * started).sum(),
            started.sum(),
        ]).double()
        self._anchors_seen += num_anchors
        self.steps_done += 1
        return sweep.weights

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
            "slower tensor-code reference sweep (same results)"
        )

    @property
    def sweep_backend(self) -> str:
        """The sweep in use: ``c`` or ``triton`` (fused), or ``reference``."""
        if not self._fused:
            return "reference"
        return "triton" if self.chain_state.device.type == "cuda" else "c"

    def _sweep(self, inputs: kernels.SweepInputs) -> kernels.Sweep:
        if self._fused and inputs.sims.dtype in (torch.float32, torch.float64):
            try:
                return kernels.fused_sweep(inputs)
            except kernels.KernelUnavailable as exc:  # e.g. the Triton JIT failed at first launch
                self._kernel_unavailable(inputs.sims.device, str(exc))
                self._fused = False
        return reference_sweep(inputs)

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
        return {**super().state_dict(), "steps_done": self.steps_done, "philox_key": self.philox_key}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.steps_done = int(state["steps_done"])
        self.philox_key = int(state.get("philox_key", self.philox_key))
