"""What negbench checks of the code it did not write (issue 17): the weight contract of every
sampler's ``weigh``, and the known range of every metric with one.

**The weight contract** (DESIGN §1.3). For A anchors and C candidates, ``weigh`` returns W with

1. shape (A, C);
2. every entry finite;
3. W ≥ 0, unless the sampler declares ``signed_weights`` (debiased estimators such as dcl/hcl
   put a negative weight on the positive);
4. W_ac = 0 where c is not a valid candidate of a, except the positive column a⁺ (NT-Xent
   puts the positive in the denominator);
5. every row sums to a positive value, s_a = Σ_c W_ac > 0 — or the row is all zero and is
   declared empty: the anchor has no valid candidate, or the sampler declares ``empty_rows``
   (emc2 with ``stale=drop`` leaves an anchor without negatives when its chain sits out of the
   batch). In the probe batches of ``sampling_tv`` every row may be empty: they invalidate
   the extras a sampler drew when those are probe items.

A violation is a :class:`WeightContractError` naming the sampler, the step and the rule; the
runner stops the run as ``failed``. :class:`WeightContract` checks each step's W: on the CPU at
once (no synchronisation to pay), on a GPU it keeps the per-step verdicts on the device and
reads them at the next :meth:`WeightContract.flush` (a metric row, a checkpoint, the end, or a
non-finite loss), so the check adds no host synchronisation to a step. It also counts the
anchors that got no negative (no weight on a valid candidate): a metric window in which no
anchor got one is flagged ``no_negatives`` in its row.

**Known ranges.** A metric of the metric registry declares the range its definition allows
(``Metric.low``/``high``: a total variation and an accuracy are in [0, 1], uniformity
log E exp(−2‖e − e'‖²) ≤ 0, alignment E‖e − e'‖² ∈ [0, 4] for unit vectors); :func:`check_range`,
called where a metric is computed and on every metric row, raises :class:`MetricRangeError`
for a value outside, so an impossible value never reaches a table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from negbench.metric_registry import get_metric
from negbench.sampler import Batch, Sampler

#: rounding allowance at the ends of a range (float32 embeddings, float64 sums)
RANGE_SLACK = 1e-6


class MetricRangeError(RuntimeError):
    """A metric outside the range its definition allows: a bug, never a result."""


class WeightContractError(RuntimeError):
    """A sampler's W broke the weight contract (the module docstring)."""


def check_range(name: str, value: Any) -> None:
    """Raise :class:`MetricRangeError` when ``value`` of metric ``name`` is outside its declared
    range (None, non-numbers and keys the registry does not declare pass)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return
    declared = get_metric(name)
    if declared is None:
        return
    low, high = declared.low, declared.high
    if not low - RANGE_SLACK <= value <= high + RANGE_SLACK:
        raise MetricRangeError(f"{name} = {value:.6g} is outside its range [{low:g}, {high:g}]: a bug in the "
                               "code that computed it (a sampler's weights, or negbench)")


def check_row(row: dict[str, Any]) -> None:
    """:func:`check_range` on every metric of a metric row."""
    for name, value in row.items():
        check_range(name, value)


# bits of a verdict, in the order they are reported (the first one set names the violation)
_NOT_FINITE, _NEGATIVE, _OFF_SUPPORT, _ROW_SUM = 1, 2, 4, 8


def _describe(bits: int, minimum: float) -> str:
    if bits & _NOT_FINITE:
        return "W has NaN or infinite entries"
    if bits & _NEGATIVE:
        return f"W has negative entries (min {minimum:.4g}) but the sampler does not declare signed_weights"
    if bits & _OFF_SUPPORT:
        return ("W puts weight on an invalid pair (the anchor itself, or a view of its own item other than "
                "its positive)")
    return ("a row of W sums to zero or less, although the anchor has candidates (a sampler that may leave an "
            "anchor without negatives declares empty_rows)")


def verdict(weights: Tensor, batch: Batch, sampler: Sampler, sims: Tensor | None = None,
            allow_empty: bool = False) -> Tensor:
    """The step's verdict on W, on W's device without synchronising: a float64 vector
    (violated-rule bits, anchors without a negative, min W). Rule 1 (the shape) and the type
    are checked on the host first and raise :class:`WeightContractError` (without the step;
    :class:`WeightContract` adds it). Rows whose similarities ``sims`` are not all finite
    are left out: garbage in is the encoder's divergence, which the runner reports as such.
    ``allow_empty`` lets any row be all zero (rule 5's second case for every sampler): the
    probe batches of ``sampling_tv`` invalidate extras of probe items after they were drawn."""
    if not isinstance(weights, Tensor) or not weights.is_floating_point():
        kind = type(weights).__name__ if not isinstance(weights, Tensor) else f"a {weights.dtype} tensor"
        raise WeightContractError(f"weigh returned {kind}, not a floating-point tensor")
    expected = (batch.num_anchors, int(batch.candidate_items.shape[0]))
    if tuple(weights.shape) != expected:
        raise WeightContractError(f"W has shape {tuple(weights.shape)}, expected {expected} (anchors x candidates)")
    w = weights.detach()
    valid = batch.valid.to(w.device)
    if sims is not None and sims.shape == w.shape:
        sane = torch.isfinite(sims).all(dim=1, keepdim=True)
        w, valid = w.masked_fill(~sane, 0.0), valid & sane
    rows = torch.arange(expected[0], device=w.device)
    support = valid.clone()
    support[rows, batch.positive.to(w.device)] = True
    nonzero = w != 0
    row_sum = w.sum(dim=1)
    if allow_empty or getattr(sampler, "empty_rows", False):
        may_be_empty = torch.ones_like(row_sum, dtype=torch.bool)
    else:
        may_be_empty = ~valid.any(dim=1)
    row_ok = (row_sum > 0) | (~nonzero.any(dim=1) & may_be_empty)
    bits = (~torch.isfinite(w).all()) * _NOT_FINITE + (~row_ok.all()) * _ROW_SUM + (nonzero & ~support).any() * _OFF_SUPPORT
    if not getattr(sampler, "signed_weights", False):
        bits = bits + (w < 0).any() * _NEGATIVE
    empty = (~(nonzero & valid).any(dim=1)).sum()
    return torch.stack([bits.double(), empty.double(), w.min().double() if w.numel() else w.new_zeros(()).double()])


def check_now(weights: Tensor, batch: Batch, sampler: Sampler, where: str, sims: Tensor | None = None,
              allow_empty: bool = False) -> int:
    """Check W at once (one host read); returns the number of anchors without a negative.
    ``where`` ("at step 3") goes into the error message."""
    try:
        stats = verdict(weights, batch, sampler, sims, allow_empty).tolist()
    except WeightContractError as exc:
        raise WeightContractError(f"sampler {sampler.name!r} broke the weight contract {where}: {exc}") from None
    if stats[0]:
        raise WeightContractError(f"sampler {sampler.name!r} broke the weight contract {where}: "
                                  f"{_describe(int(stats[0]), stats[2])}")
    return int(stats[1])


@dataclass
class WeightContract:
    """The weight contract of one run's sampler, step after step (module docstring).
    ``deferred`` (the default on CUDA) keeps the verdicts on the device until :meth:`flush`."""

    sampler: Sampler
    deferred: bool = False
    #: anchors, and anchors without a negative, since the last :meth:`window_empty` (saved in
    #: checkpoints: a resumed run flags the same rows)
    anchors: int = 0
    empty: int = 0
    _pending: list[tuple[int, Tensor]] = field(default_factory=list)

    def check(self, weights: Tensor, batch: Batch, step: int, sims: Tensor | None = None) -> None:
        """Check the W of training step ``step`` (raises at once unless ``deferred``)."""
        self.anchors += batch.num_anchors
        if not self.deferred:
            self.empty += check_now(weights, batch, self.sampler, f"at step {step}", sims)
            return
        try:
            self._pending.append((step, verdict(weights, batch, self.sampler, sims)))
        except WeightContractError as exc:
            self.flush()  # an earlier step's violation comes first
            raise WeightContractError(f"sampler {self.sampler.name!r} broke the weight contract at step {step}: {exc}") from None

    def flush(self) -> None:
        """Read the deferred verdicts (one host synchronisation); raise for the first violation."""
        if not self._pending:
            return
        steps = [step for step, _ in self._pending]
        stats = torch.stack([v for _, v in self._pending]).tolist()
        self._pending.clear()
        for step, (bits, empty, minimum) in zip(steps, stats):
            if bits:
                raise WeightContractError(f"sampler {self.sampler.name!r} broke the weight contract at step {step}: "
                                          f"{_describe(int(bits), minimum)}")
            self.empty += int(empty)

    def window_empty(self) -> bool:
        """Whether the steps since the last call had anchors and none of them got a negative;
        the counts start again."""
        self.flush()
        flagged = self.anchors > 0 and self.empty == self.anchors
        self.anchors = self.empty = 0
        return flagged

    def state(self) -> dict[str, int]:
        self.flush()
        return {"anchors": self.anchors, "empty": self.empty}

    def load_state(self, state: dict[str, int]) -> None:
        self.anchors, self.empty = int(state["anchors"]), int(state["empty"])
