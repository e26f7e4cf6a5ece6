"""The metric registry (docs/design.md §4): every metric negbench reports, declared once — its
name, what it means, which direction is better, how it is shown and where it applies. The
run's summary table, ``negbench compare`` (table order, sorting, headers), the plots and
``negbench list --metrics`` all read it.

The framework declares the metrics it computes itself (:data:`FRAMEWORK_METRICS`); a sampler
declares its own diagnostics on its class (``diagnostic_metrics``, the keys its
``diagnostics()`` returns), so the framework never names a particular sampler. The order of
:func:`all_metrics` — objective, representation, sampler diagnostics, cost — is the order of
every table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

Better = Literal["lower", "higher"]
Group = Literal["objective", "representation", "sampler", "cost"]
#: the metric ``negbench compare --sort`` ranks by when not given
DEFAULT_SORT = "grad_norm_sq"
#: table order of the groups
GROUPS: tuple[Group, ...] = ("objective", "representation", "sampler", "cost")


@dataclass(frozen=True)
class Metric:
    """One reported metric.

    Attributes:
        name: the key in ``metrics.jsonl`` / ``summary.json`` (part of the public interface).
        description: one line: what it measures.
        better: ``"lower"`` or ``"higher"``: the direction ``compare --sort`` ranks best first.
        label: the column header of the comparison tables (default: the name).
        scale: shown divided by this (``peak_mem_bytes`` is shown in MiB).
        applies: where it has a value (e.g. ``finite-view tasks``); for a sampler diagnostic,
            filled in with the sampler's name when left empty.
        group: its place in the table order (:data:`GROUPS`).
        summary: printed in ``negbench run``'s summary table.
        headline: a column of the comparison's headline table (``table.md``).
        plot_label: the axis label of its plot, if it has one.
        low, high: the range its definition allows (inclusive; a total variation and an
            accuracy are in [0, 1], uniformity is ≤ 0); a value outside is a bug, and
            :func:`negbench.contract.check_range` stops the run before it reaches a table.
    """

    name: str
    description: str
    better: Better = "lower"
    label: str = ""
    scale: float = 1.0
    applies: str = "every run"
    group: Group = "sampler"
    summary: bool = False
    headline: bool = False
    plot_label: str = ""
    low: float = -math.inf
    high: float = math.inf

    @property
    def header(self) -> str:
        return self.label or self.name

    @property
    def arrow(self) -> str:
        """↑ when higher is better, ↓ when lower is."""
        return "↑" if self.better == "higher" else "↓"

    def format(self, value: float | None) -> str:
        """``value / scale`` to 4 significant digits (``–`` when missing or not finite)."""
        if value is None or not math.isfinite(value):
            return "–"
        return f"{value / self.scale:.4g}"


_FINITE = "finite-view tasks"
_UNIT = {"low": 0.0, "high": 1.0}  # a fraction, a probability distance, an accuracy
_NON_NEGATIVE = {"low": 0.0}
_LABELLED = "labelled tasks"
#: the metrics the framework computes (sampler diagnostics come from the samplers)
FRAMEWORK_METRICS: tuple[Metric, ...] = (
    Metric("gcl", "F(θ): the exact global contrastive loss", label="gcl F(θ)", applies=_FINITE,
           group="objective", summary=True, plot_label="exact GCL F(θ)", headline=True),
    Metric("grad_norm_sq", "‖∇F(θ)‖²: the exact stationarity gap", label="‖∇F‖² final", applies=_FINITE,
           group="objective", summary=True, plot_label="stationarity gap ‖∇F(θ)‖² (log scale)", headline=True,
           **_NON_NEGATIVE),
    Metric("grad_norm_sq_avg", "mean stationarity gap over the evaluations of the second half of the run "
           "(summary.json)", label="‖∇F‖² avg", applies=_FINITE, group="objective", headline=True, **_NON_NEGATIVE),
    Metric("grad_norm_sq_min", "smallest stationarity gap of the run (summary.json)", applies=_FINITE,
           group="objective", **_NON_NEGATIVE),
    Metric("grad_norm_sq_run_avg", "mean stationarity gap over the evaluations at t < T: the run's average "
           "1/T Σ_t ‖∇F(θ_t)‖², what the convergence theorems bound (summary.json; negbench rate)",
           label="‖∇F‖² run avg", applies=_FINITE, group="objective", **_NON_NEGATIVE),
    Metric("loss", "the surrogate ℓ averaged since the last row", group="objective", summary=True),
    Metric("grad_error_sq", "mean ‖ĝ_t − ∇F(θ_t)‖² of the sampler's gradient since the last row",
           applies="finite-view tasks with --grad-error", group="objective", **_NON_NEGATIVE),
    # unbiased with the finite-R correction, so an estimate may fall below 0: no range declared
    Metric("grad_bias_sq", "‖ḡ − ∇F‖² − grad_var/R from R sampler gradient estimates at θ: unbiased for the "
           "squared bias ‖Eĝ − ∇F‖²", label="grad bias²", applies="finite-view tasks with --grad-split", group="objective"),
    Metric("grad_var", "1/(R−1) Σ_r ‖ĝ_r − ḡ‖² from R sampler gradient estimates at θ: the variance tr Σ",
           label="grad var", applies="finite-view tasks with --grad-split", group="objective", **_NON_NEGATIVE),
    Metric("sampling_tv", "mean total variation between the sampler's negative distribution and the exact "
           "softmax, at frozen θ", label="sampling TV", applies=_FINITE, group="objective", summary=True, headline=True,
           **_UNIT),
    Metric("sampling_tv_floor", "the same TV for i.i.d. exact draws of as many samples as the sampler draws "
           "negatives per anchor: the noise floor",
           label="TV floor", applies=_FINITE, group="objective", summary=True, headline=True, **_UNIT),
    Metric("alignment", "mean ‖e − e⁺‖² over positive pairs (Wang & Isola, 2020)", group="representation",
           summary=True, low=0.0, high=4.0),  # unit vectors: ‖e − e⁺‖² ≤ 4
    Metric("uniformity", "log mean exp(−2‖e − e′‖²) over pairs (Wang & Isola, 2020); near 0: collapse",
           group="representation", summary=True, headline=True, high=0.0),  # log of a mean of values ≤ 1
    Metric("lp_acc", "linear-probe test accuracy on frozen features", better="higher", applies=_LABELLED,
           group="representation", summary=True, plot_label="linear-probe test accuracy", headline=True, **_UNIT),
    Metric("knn1_acc", "1-NN (cosine) test accuracy on frozen features", better="higher", applies=_LABELLED,
           group="representation", summary=True, plot_label="1-NN test accuracy", **_UNIT),
    Metric("knn10_acc", "10-NN (cosine) test accuracy on frozen features", better="higher", applies=_LABELLED,
           group="representation", summary=True, plot_label="10-NN test accuracy", headline=True, **_UNIT),
    Metric("step_ms", "median step time (ms)", label="step ms", group="cost", summary=True, headline=True),
    Metric("sampler_ms", "median time inside the sampler per step (ms)", group="cost", summary=True,
           plot_label="time in sampler (ms/step)"),
    Metric("samples_per_s", "items per second", better="higher", group="cost", summary=True,
           plot_label="throughput (items/s)"),
    Metric("peak_mem_bytes", "peak memory: CUDA max_memory_allocated, or the process's peak RSS on CPU",
           label="peak MiB", scale=2.0**20, group="cost", summary=True, plot_label="peak memory (MiB)", headline=True),
    Metric("state_bytes", "exact bytes of the sampler's per-item state", group="cost", summary=True),
)


def diagnostic_metrics() -> list[Metric]:
    """The diagnostics declared by the registered samplers (``diagnostic_metrics``), in
    registry order, each once; ``applies`` names the declaring sampler when left empty."""
    from negbench.registry import SAMPLERS

    seen: dict[str, Metric] = {}
    for name in SAMPLERS.names():
        for metric in getattr(SAMPLERS.get_class(name), "diagnostic_metrics", ()):
            if metric.name not in seen:
                applies = metric.applies if metric.applies != "every run" else f"sampler {name}"
                seen[metric.name] = replace(metric, applies=applies, group="sampler")
    return list(seen.values())


def all_metrics() -> list[Metric]:
    """Every metric, in table order: the framework's by group, the samplers' diagnostics in
    the ``sampler`` group (a diagnostic may not redefine a framework metric)."""
    framework = {m.name for m in FRAMEWORK_METRICS}
    metrics = [*FRAMEWORK_METRICS, *(m for m in diagnostic_metrics() if m.name not in framework)]
    return sorted(metrics, key=lambda m: GROUPS.index(m.group))  # stable: declaration order within a group


def metric_order() -> tuple[str, ...]:
    """The names of :func:`all_metrics`, in table order."""
    return tuple(m.name for m in all_metrics())


def get_metric(name: str) -> Metric | None:
    """The declared metric ``name``, or None for a key no one declared."""
    return next((m for m in all_metrics() if m.name == name), None)


def metric(name: str) -> Metric:
    """The declared metric ``name``; a ``KeyError`` for a key no one declared (a bug of ours)."""
    declared = get_metric(name)
    if declared is None:
        raise KeyError(f"metric {name!r} is not declared in the metric registry")
    return declared


def higher_is_better(name: str) -> bool:
    """True when ``name`` is declared with ``better="higher"`` (undeclared keys: lower)."""
    metric = get_metric(name)
    return metric is not None and metric.better == "higher"


def summary_keys() -> tuple[str, ...]:
    """The metrics of ``negbench run``'s summary table: the framework's marked ``summary``,
    then every sampler diagnostic marked ``summary``, in table order."""
    return tuple(m.name for m in all_metrics() if m.summary)


def markdown_table() -> str:
    """The registry as a markdown table (docs/design.md §4 holds it; a test checks the copy)."""
    lines = ["| key | meaning | better | where |", "|---|---|---|---|"]
    lines += [f"| `{m.name}` | {m.description} | {m.better} | {m.applies} |" for m in all_metrics()]
    return "\n".join(lines)
