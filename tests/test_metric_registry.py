"""The metric registry: every key a run writes is declared once (by the framework or by the
sampler that reports it), the framework names no sampler's diagnostics, and the tables,
sorting and ``negbench list --metrics`` read the registry."""

from __future__ import annotations

from pathlib import Path

import pytest

import negbench
from clikit import invoke
from negbench import metric_registry
from negbench.registry import SAMPLERS
from negbench.results import read_json, read_rows

PROGRESS = {"step", "epoch", "samples_seen"}
TINY = {"num_items": 24, "input_dim": 8, "hidden": 16, "dim": 8}


@pytest.mark.parametrize("sampler", ["emc2", "neg_cache", "in_batch"])
def test_every_key_a_run_writes_is_declared(sampler, tmp_path):
    config = negbench.RunConfig(sampler=sampler, task="synthetic", task_params=TINY, batch_size=4, steps=4,
                                eval_every=2, tv_steps=2, seed=0, out=tmp_path, grad_error=True)
    outcome = negbench.run(config, show_progress=False)
    rows = read_rows(outcome.run_dir / "metrics.jsonl")
    summary = read_json(outcome.run_dir / "summary.json")
    keys = {k for row in rows for k in row} | set(summary["final"])
    keys |= {k for k in ("grad_norm_sq_avg", "grad_norm_sq_min") if k in summary}
    declared = set(metric_registry.metric_order())
    assert keys - PROGRESS - {"diverged_metric"} <= declared, sorted(keys - PROGRESS - declared)
    # the sampler's own diagnostics are declared by the sampler, not by the framework
    own = {m.name for m in SAMPLERS.get_class(sampler).diagnostic_metrics}
    assert own <= keys and not own & {m.name for m in metric_registry.FRAMEWORK_METRICS}


def test_names_are_unique_and_groups_ordered():
    metrics = metric_registry.all_metrics()
    names = [m.name for m in metrics]
    assert len(names) == len(set(names))
    groups = [metric_registry.GROUPS.index(m.group) for m in metrics]
    assert groups == sorted(groups)
    assert {m.name for m in metrics if m.better == "higher"} == {
        "lp_acc", "knn1_acc", "knn10_acc", "samples_per_s", "accept_rate"}
    assert metric_registry.higher_is_better("lp_acc") and not metric_registry.higher_is_better("gcl")
    assert not metric_registry.higher_is_better("not_declared")
    assert metric_registry.get_metric("accept_rate").applies == "sampler emc2"
    assert metric_registry.metric("peak_mem_bytes").format(3 * 2**20) == "3"
    with pytest.raises(KeyError):
        metric_registry.metric("not_declared")


def test_the_framework_names_no_sampler_diagnostic():
    package = Path(negbench.__file__).parent
    diagnostics = {m.name for m in metric_registry.diagnostic_metrics()}
    assert diagnostics >= {"accept_rate", "stale_frac", "empty_frac", "chain_age", "cache_age"}
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for name in diagnostics:
            assert name not in text, f"{path.relative_to(package)} names the diagnostic {name!r}"


def test_list_metrics_shows_every_metric(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = invoke(capsys, "list", "--metrics")
    assert code == 0
    for metric in metric_registry.all_metrics():
        line = next(line for line in out.splitlines() if f"│ {metric.name} " in line)
        assert f"{metric.better} {metric.arrow}" in line and metric.applies in line
    code, again, _ = invoke(capsys, "list", "metrics")
    assert code == 0 and again == out


def test_sort_must_be_a_declared_metric(capsys, tmp_path):
    code, _, err = invoke(capsys, "compare", "--collect", "--sort", "accept_rat", "--out", str(tmp_path / "runs"))
    assert code == 2 and "did you mean: accept_rate" in err
