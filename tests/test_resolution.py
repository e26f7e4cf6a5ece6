"""Resolution (issue 10): the defaults derived from the run's length, the seeds, the
finite-view rule, and a short run with every metric present."""

from __future__ import annotations

import pytest

from clikit import invoke
from negbench import RunConfig
from negbench.config import derive_seed
from negbench.errors import UserError
from negbench.evaluation import METRIC_GROUPS, Evaluator
from negbench.registry import SAMPLERS, TASKS
from negbench.resolution import (Seeds, check_finite_views, default_eval_every, default_tv_steps,
                                 finite_view_conflict, prepare)
from negbench.results import METRICS, read_rows
from negbench.training import Trainer


@pytest.mark.parametrize(("steps", "eval_every", "tv_steps"),
                         [(1, 1, 1), (10, 10, 1), (25, 10, 2), (100, 10, 10), (500, 50, 50), (1000, 100, 100), (5000, 500, 100)])
def test_the_schedule_scales_with_the_steps(steps, eval_every, tv_steps):
    assert default_eval_every(steps) == eval_every and default_tv_steps(steps) == tv_steps


def test_the_default_run_resolves_as_before():
    """1,000 steps, a row every 100, 100 TV probe batches, Adam at 1e-3: the run id of the
    committed reference (tests/data/reference/default.jsonl)."""
    prep = prepare(RunConfig(seed=0))
    run = prep.run
    assert (run.steps, run.eval_every, run.tv_steps, run.lr) == (1000, 100, 100, 1e-3)
    assert run.run_id == "digits-emc2-b32-s0-57e276a01e"
    assert prep.resolved["seeds"] == {p: derive_seed(0, p) for p in ("data", "init", "order", "sampler", "probe")}
    with pytest.raises(AttributeError):
        run.steps = 5  # frozen


def test_explicit_options_win_over_the_derived_defaults():
    run = prepare(RunConfig(task="synthetic", steps=10, eval_every=3, tv_steps=7, seed=0)).run
    assert (run.eval_every, run.tv_steps) == (3, 7)


def test_seeds_are_derived_per_purpose():
    seeds = Seeds.derive(5)
    assert seeds.as_dict() == {p: derive_seed(5, p) for p in ("data", "init", "order", "sampler", "probe")}
    assert len(set(seeds.as_dict().values())) == 5


def test_the_finite_view_rule_is_one_callable():
    full, uniform = SAMPLERS.get_class("full_softmax"), SAMPLERS.get_class("uniform")
    assert finite_view_conflict(uniform, False, "x") is None and finite_view_conflict(full, True) is None
    reason = finite_view_conflict(full, False, "stl10")
    assert reason == "sampler 'full_softmax' needs a finite view set but task 'stl10' draws random augmentations"
    with pytest.raises(UserError, match="use a finite-view task \\(digits, .*synthetic"):
        check_finite_views(full, False, "stl10")
    assert "random_images" not in str(finite_view_conflict(full, False))  # hidden tasks are never suggested
    assert TASKS.get_class("random_images").hidden


def test_a_ten_step_run_has_two_rows_with_every_metric(tmp_path, capsys):
    code, _, err = invoke(capsys, "run", "--steps", "10", "--task", "synthetic", "--sampler", "emc2", "--seed", "0",
                          "--out", str(tmp_path), "--quiet")
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    rows = read_rows(run_dir / METRICS, strict=True)
    assert [r["step"] for r in rows] == [0, 10]
    for key in ("loss", "gcl", "grad_norm_sq", "sampling_tv", "sampling_tv_floor", "alignment", "uniformity",
                "lp_acc", "knn1_acc", "knn10_acc", "accept_rate", "state_bytes"):
        assert rows[-1][key] is not None, key


def test_a_metric_group_added_to_the_evaluator_lands_in_the_row():
    task = TASKS.create("synthetic", **TASKS.get_class("synthetic").test_params)
    task.load(seed=0)
    trainer = Trainer.build(RunConfig(sampler="uniform", task="synthetic", batch_size=4, steps=2, tv_steps=0), task)
    trainer.train_step()

    def steps_squared(point):
        return {"steps_squared": point.trainer.step ** 2}

    row = Evaluator(trainer, [*METRIC_GROUPS, steps_squared]).evaluate()
    assert row["steps_squared"] == 1 and row["step"] == 1 and row["gcl"] is not None


def test_the_bench_task_is_hidden_from_negbench_list(capsys):
    code, out, err = invoke(capsys, "list", "tasks")
    assert code == 0, err
    assert "synthetic" in out and "random_images" not in out
