"""negbench rate (issue 11): the gradient's bias/variance split against independent references,
the warm start, the slope and its interval, the per-sampler TV floor, and the command end to end."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from scipy import stats
from torch import nn

from clikit import invoke
from negbench import get_sampler, gradsplit, rate, warmstart
from negbench.config import RunConfig
from negbench.distribution import exact_negative_distribution, iid_tv_floor, negative_distribution_counts, sampling_tv
from negbench.objective import exact_gradient
from negbench.runner import Trainer, prepare
from negbench.sampler import SamplerContext
from negbench.task import FiniteViewTask

TINY_DIGITS = {"max_items": "40", "hidden": "16", "dim": "8"}


def trainer_for(sampler: str, batch_size: int, tmp_path: Path, **params: str) -> Trainer:
    config = RunConfig(sampler=sampler, task="digits", batch_size=batch_size, steps=2, seed=0, sampler_params=params,
                       task_params=dict(TINY_DIGITS), out=tmp_path, tv_steps=0)
    return Trainer.from_prepared(prepare(config))


def split_of(trainer: Trainer, repeats: int, seed: int = 0) -> dict[str, float]:
    _, exact = trainer.exact_gradient()
    return gradsplit.gradient_split(trainer.model, trainer.params, trainer.task, trainer.sampler, trainer.beta,
                                    trainer.batch_size, exact, repeats, seed)


# ---- the bias / variance split --------------------------------------------------------------

def test_full_softmax_with_the_batch_covering_the_data_set_has_bias_and_variance_0(tmp_path):
    trainer = trainer_for("full_softmax", 40, tmp_path)
    out = split_of(trainer, 3)
    assert abs(out["grad_bias_sq"]) < 1e-6 and out["grad_var"] < 1e-6, out
    assert sum(float(g.pow(2).sum()) for g in trainer.exact_gradient()[1]) > 1e-3  # not a trivial θ


def se_of_bias(out: dict[str, float], repeats: int) -> float:
    """Standard error of grad_bias_sq: at most sqrt(4·bias·tr Σ/R + 2 (tr Σ)²/R²)."""
    bias, var = max(out["grad_bias_sq"], 0.0), out["grad_var"]
    return math.sqrt(4 * bias * var / repeats + 2 * var**2 / repeats**2)


def test_in_batch_at_batch_4_has_bias_clearly_above_0_where_full_softmax_has_none(tmp_path):
    trainer = trainer_for("in_batch", 4, tmp_path)
    for _ in range(200):  # away from the near-collapsed initialisation, where every softmax is flat
        _, grads = trainer.exact_gradient()
        with torch.no_grad():
            for p, g in zip(trainer.params, grads):
                p -= 0.5 * g
    gap = sum(float(g.pow(2).sum()) for g in trainer.exact_gradient()[1])
    out = split_of(trainer, 128)
    assert out["grad_bias_sq"] > 4 * se_of_bias(out, 128) and out["grad_bias_sq"] > 0.1 * gap, (out, gap)
    exact_sampler = trainer_for("full_softmax", 4, tmp_path)
    exact_sampler.model.load_state_dict(trainer.model.state_dict())
    unbiased = split_of(exact_sampler, 128)
    assert abs(unbiased["grad_bias_sq"]) < 4 * se_of_bias(unbiased, 128) < out["grad_bias_sq"], unbiased


def test_split_formula_against_numpy():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(5, 7))
    exact = rng.normal(size=7)
    torch_samples = [[torch.tensor(s[:3]), torch.tensor(s[3:])] for s in samples]
    out = gradsplit.split(torch_samples, [torch.tensor(exact[:3]), torch.tensor(exact[3:])])
    mean = samples.mean(axis=0)
    var = ((samples - mean) ** 2).sum() / 4
    assert out["grad_var"] == pytest.approx(var)
    assert out["grad_bias_sq"] == pytest.approx(((mean - exact) ** 2).sum() - var / 5)


class OneHotTask(FiniteViewTask):
    """N items × 2 views, each view a one-hot input: with a linear encoder, view v's embedding is
    the normalised column v of the weight matrix (the parameters are the embeddings)."""

    name = "onehot"
    params: dict = {}

    def __init__(self, n: int) -> None:
        super().__init__()
        self._set_views(torch.eye(2 * n).reshape(n, 2, 2 * n))


class Columns(nn.Module):
    def __init__(self, weight: np.ndarray) -> None:
        super().__init__()
        self.linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.dim = weight.shape[0]
        with torch.no_grad():
            self.linear.weight.copy_(torch.from_numpy(weight))

    def forward(self, x):
        return nn.functional.normalize(self.linear(x), dim=1)


def numpy_embedding_grad_to_weight(u: np.ndarray, grad_e: np.ndarray) -> np.ndarray:
    """∂L/∂u_v = (I - e_v e_vᵀ) ∂L/∂e_v / ‖u_v‖ for e_v = u_v / ‖u_v‖ (columns v)."""
    norm = np.linalg.norm(u, axis=0)
    e = u / norm
    return (grad_e - e * (e * grad_e).sum(axis=0)) / norm


def numpy_exact_grad(u: np.ndarray, n: int, beta: float) -> np.ndarray:
    """∇_u F from DESIGN §1.1 with m = 2, written directly (views 2i, 2i+1 of item i)."""
    e = u / np.linalg.norm(u, axis=0)
    m_total = 2 * n
    item = np.arange(m_total) // 2
    grad = np.zeros_like(e)
    for x in range(m_total):
        negatives = item != item[x]
        logits = beta * e[:, x] @ e[:, negatives]
        p = np.exp(logits - logits.max())
        p /= p.sum()
        grad[:, x] += beta * e[:, negatives] @ p  # anchor side of the log-partition
        grad[:, negatives] += beta * np.outer(e[:, x], p)  # candidate side
        partner = x ^ 1
        grad[:, x] -= beta * e[:, partner]  # -β <e_x, e_x+>, gradient through both sides
        grad[:, partner] -= beta * e[:, x]
    return numpy_embedding_grad_to_weight(u, grad / m_total)


def numpy_uniform_estimate(u: np.ndarray, batch: tuple[int, ...], beta: float) -> np.ndarray:
    """∇_u ℓ of the uniform sampler on one batch: W_ac = 1/K_a on the views of other batch items."""
    e = u / np.linalg.norm(u, axis=0)
    anchors = [2 * i + v for i in batch for v in (0, 1)]
    a_count = len(anchors)
    grad = np.zeros_like(e)
    for x in anchors:
        negatives = [c for c in anchors if c // 2 != x // 2]
        for c in negatives:
            grad[:, x] += beta / a_count * e[:, c] / len(negatives)
            grad[:, c] += beta / a_count * e[:, x] / len(negatives)
        grad[:, x] -= beta / a_count * e[:, x ^ 1]
        grad[:, x ^ 1] -= beta / a_count * e[:, x]
    return numpy_embedding_grad_to_weight(u, grad)


def test_uniform_bias_and_variance_equal_a_brute_force_enumeration_over_batches():
    n, b, d, beta, repeats = 6, 4, 3, 8.0, 1500
    u = np.random.default_rng(1).normal(size=(d, 2 * n))
    exact = numpy_exact_grad(u, n, beta)
    estimates = np.stack([numpy_uniform_estimate(u, s, beta) for s in itertools.combinations(range(n), b)])
    mean = estimates.mean(axis=0)
    bias = float(((mean - exact) ** 2).sum())
    deviations = ((estimates - mean) ** 2).sum(axis=(1, 2))
    var = float(deviations.mean())

    task, model = OneHotTask(n), Columns(u)
    params = list(model.parameters())
    _, torch_exact = exact_gradient(model, params, task.all_views(), beta)
    np.testing.assert_allclose(torch_exact[0].double().numpy(), exact, atol=1e-5)  # the two ∇F agree
    sampler = get_sampler("uniform").bind(SamplerContext(n, 2, beta, d))
    out = gradsplit.gradient_split(model, params, task, sampler, beta, b, torch_exact, repeats, seed=3)
    # standard errors of the two estimators (R draws, exact moments from the enumeration)
    se_bias = math.sqrt(4 * bias * var / repeats + 2 * var**2 / repeats**2)
    se_var = math.sqrt((deviations**2).mean() - var**2) / math.sqrt(repeats)
    assert bias > 8 * se_bias  # a wrong bias (0, the variance) would be told apart
    assert out["grad_bias_sq"] == pytest.approx(bias, abs=4 * se_bias)
    assert out["grad_var"] == pytest.approx(var, abs=4 * se_var)


def test_gradient_split_leaves_the_sampler_and_model_untouched(tmp_path):
    trainer = trainer_for("emc2", 4, tmp_path)
    for _ in range(3):
        trainer.train_step()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in trainer.sampler.state_dict().items()}
    generator = trainer.sampler_generator.get_state()
    params = [p.detach().clone() for p in trainer.params]
    grads = [p.grad.clone() for p in trainer.params]
    split_of(trainer, 4)
    after = trainer.sampler.state_dict()
    assert all(torch.equal(state[k], after[k]) if isinstance(state[k], torch.Tensor) else state[k] == after[k]
               for k in state)
    assert torch.equal(generator, trainer.sampler_generator.get_state())
    assert all(torch.equal(a, p) for a, p in zip(params, trainer.params))
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, trainer.params))


TIMING = {"step_ms", "sampler_ms", "samples_per_s", "peak_mem_bytes"}


@pytest.mark.parametrize("sampler", ["emc2", "importance", "sogclr"])
def test_a_runs_own_metrics_are_bit_identical_with_and_without_grad_split(sampler, tmp_path):
    import negbench

    rows = []
    for split in (0, 3):
        config = RunConfig(sampler=sampler, task="digits", batch_size=4, steps=12, eval_every=4, optimizer="sgd", lr=0.5,
                           seed=2, task_params=dict(TINY_DIGITS), out=tmp_path, tv_steps=3, grad_split=split)
        outcome = negbench.run(config, show_progress=False, console=Console(quiet=True))
        rows.append([json.loads(line) for line in (outcome.run_dir / "metrics.jsonl").read_text().splitlines()])
    plain, split_rows = rows
    assert len(plain) == len(split_rows) == 4
    for a, b in zip(plain, split_rows):
        assert b["grad_bias_sq"] is not None and b["grad_var"] > 0
        assert {k: v for k, v in a.items() if k not in TIMING} == \
               {k: v for k, v in b.items() if k not in TIMING | {"grad_bias_sq", "grad_var"}}


# ---- the warm start -------------------------------------------------------------------------

class Quadratic(nn.Module):
    """F(θ) = ½‖θ - 1‖² + 3: gradient descent at step η contracts the gap by (1-η)² a step."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.full((4,), 3.0, dtype=torch.float64))

    def exact(self) -> tuple[float, list[torch.Tensor]]:
        diff = self.theta.detach() - 1
        return 0.5 * float(diff.pow(2).sum()) + 3, [diff.clone()]


def test_warm_start_stops_at_the_threshold_or_the_budget_and_records_which():
    model = Quadratic()
    info = warmstart.gradient_descent([model.theta], model.exact, warmstart.DescentSettings(lr=0.5, tol=1e-4, max_steps=100))
    # gap_k = 16·(1/4)^k: below 1e-4 first at k = 9 (16/4^9 = 6.1e-5)
    assert info["stopped_by"] == "threshold" and info["steps"] == 9
    assert info["grad_norm_sq"] == pytest.approx(16 / 4**9) and info["grad_norm_sq_start"] == pytest.approx(16)
    model = Quadratic()
    info = warmstart.gradient_descent([model.theta], model.exact, warmstart.DescentSettings(lr=0.5, tol=1e-4, max_steps=3))
    assert info["stopped_by"] == "budget" and info["steps"] == 3 and info["kept_step"] == 3
    assert torch.allclose(model.theta.detach(), torch.full((4,), 1.25, dtype=torch.float64))


def test_warm_start_never_keeps_an_iterate_above_the_starting_objective():
    model = Quadratic()  # lr 2.5: every step overshoots, F grows; the start is kept
    info = warmstart.gradient_descent([model.theta], model.exact, warmstart.DescentSettings(lr=2.5, tol=1e-4, max_steps=5))
    assert info["stopped_by"] == "budget" and info["kept_step"] == 0
    assert torch.equal(model.theta.detach(), torch.full((4,), 3.0, dtype=torch.float64))


def test_warm_start_is_computed_once_per_seed_and_recorded(tmp_path):
    import negbench

    def config(sampler: str, steps: int, seed: int = 0) -> RunConfig:
        return RunConfig(sampler=sampler, task="digits", batch_size=4, steps=steps, optimizer="sgd", lr=0.1, seed=seed,
                         task_params=dict(TINY_DIGITS), out=tmp_path, tv_steps=0, init="stationary", init_steps=20)

    first = negbench.run(config("in_batch", 4), show_progress=False, console=Console(quiet=True))
    second = negbench.run(config("emc2", 8), show_progress=False, console=Console(quiet=True))
    other_seed = negbench.run(config("in_batch", 4, seed=1), show_progress=False, console=Console(quiet=True))
    results = [json.loads((o.run_dir / "config.json").read_text())["init_result"] for o in (first, second, other_seed)]
    assert [r["cached"] for r in results] == [False, True, False]
    assert results[0]["key"] == results[1]["key"] != results[2]["key"]
    assert results[0]["stopped_by"] in ("threshold", "budget")
    rows = [json.loads((o.run_dir / "metrics.jsonl").read_text().splitlines()[0]) for o in (first, second)]
    assert rows[0]["grad_norm_sq"] == rows[1]["grad_norm_sq"] == pytest.approx(results[0]["grad_norm_sq"])
    cold = negbench.run(RunConfig(**{**config("in_batch", 4).__dict__, "init": "random"}), show_progress=False,
                        console=Console(quiet=True))
    assert cold.run_dir != first.run_dir  # the warm start is part of the run's identity
    assert len(list((tmp_path / warmstart.CACHE_FOLDER).glob("*.pt"))) == 2


# ---- the slope --------------------------------------------------------------------------------

def test_slope_and_its_interval_against_a_direct_least_squares_fit():
    rng = np.random.default_rng(0)
    t = np.repeat([400, 1600, 6400], 5)
    gaps = 3.0 * t**-0.5 * np.exp(rng.normal(0, 0.1, t.size))
    out = rate.slope(t, gaps)
    x, y = np.log(t), np.log(gaps)
    design = np.column_stack([np.ones_like(x), x])
    coef, residual, *_ = np.linalg.lstsq(design, y, rcond=None)
    se = math.sqrt(residual[0] / (x.size - 2) / ((x - x.mean()) ** 2).sum())
    half = stats.t.ppf(0.975, x.size - 2) * se
    assert out["slope"] == pytest.approx(coef[1])
    assert (out["slope_ci_low"], out["slope_ci_high"]) == pytest.approx((coef[1] - half, coef[1] + half))
    assert out["points"] == 15 and out["verdict"] == "falls"


@pytest.mark.parametrize(("power", "noise", "verdict"), [(-0.5, 0.05, "falls"), (0.0, 0.05, "plateau"),
                                                         (-0.15, 0.01, "unclear"), (0.3, 0.01, "unclear")])
def test_verdicts(power, noise, verdict):
    rng = np.random.default_rng(1)
    t = np.repeat([400, 1600, 6400], 5)
    assert rate.slope(t, t**power * np.exp(rng.normal(0, noise, t.size)))["verdict"] == verdict


def test_horizons_are_parsed_strictly():
    assert rate.parse_horizons("400, 1600,6400") == [400, 1600, 6400]
    assert rate.Schedule(lr_scale=10).lr(400) == pytest.approx(0.5)
    assert rate.Schedule(lr_scale=0.3, step_size="constant").lr(6400) == 0.3
    assert rate.Schedule(evals=16).eval_every(400) == 25


# ---- the TV floor per sampler ---------------------------------------------------------------

@pytest.mark.parametrize(("name", "k"), [("importance", 3), ("neg_cache", 2)])
def test_tv_floor_counts_the_negatives_the_sampler_draws(name, k):
    n, batch, steps, beta, anchors = 30, 4, 20, 5.0, [0, 1]
    views = nn.functional.normalize(torch.randn(n, 2, 4, generator=torch.Generator().manual_seed(0)), dim=2)
    sampler = get_sampler(name, k=k)
    tv, floor = sampling_tv(sampler, views, beta, batch_size=batch, steps=steps, anchors=anchors, seed=7)
    _, appearances = negative_distribution_counts(sampler, views, beta, batch_size=batch, steps=steps,
                                                  anchors=anchors, seed=7)
    p = exact_negative_distribution(views, beta, anchors)
    seen = appearances > 0
    expected = iid_tv_floor(p[seen], appearances[seen] * k, torch.Generator().manual_seed(9))
    in_batch_count = iid_tv_floor(p[seen], appearances[seen] * 2 * batch, torch.Generator().manual_seed(9))
    assert floor == pytest.approx(expected) and floor > in_batch_count  # fewer draws, a higher floor
    assert get_sampler(name, k=k).negatives_per_anchor(batch) == k


def test_tv_floor_of_the_exact_sampler_is_0_and_in_batch_keeps_2b():
    assert get_sampler("full_softmax").negatives_per_anchor(4) is None
    assert get_sampler("in_batch").negatives_per_anchor(4) == 8
    views = nn.functional.normalize(torch.randn(12, 2, 4, generator=torch.Generator().manual_seed(0)), dim=2)
    tv, floor = sampling_tv(get_sampler("full_softmax"), views, 5.0, batch_size=3, steps=4, anchors=[0], seed=0)
    assert floor == 0.0 and tv < 1e-6


# ---- the command ------------------------------------------------------------------------------

def test_rate_end_to_end_writes_the_study_and_a_rerun_skips_every_run(tmp_path, capsys):
    from clikit import TINY_SYNTHETIC

    args = ["rate", *TINY_SYNTHETIC, "--samplers", "in_batch,uniform", "--batch-sizes", "4", "--horizons", "8,16",
            "--seeds", "2", "--evals", "2", "--init-steps", "5", "--grad-split", "2", "--out", str(tmp_path / "runs")]
    code, stdout, err = invoke(capsys, *args)
    assert code == 0, err
    folder = tmp_path / "rate" / "synthetic"
    assert "slope of log(run-average" in stdout and "in_batch" in stdout
    assert {p.name for p in folder.iterdir()} == {"points.csv", "cells.csv", "slopes.csv", "table.md", "rate_b4.png"}
    points = rate.pd.read_csv(folder / "points.csv")
    assert len(points) == 8 and set(points["horizon"]) == {8, 16} and points["grad_var"].gt(0).all()
    assert sorted(set(points["lr"])) == pytest.approx([10 / math.sqrt(16), 10 / math.sqrt(8)])
    slopes = rate.pd.read_csv(folder / "slopes.csv")
    assert list(slopes["points"]) == [4, 4] and set(slopes["verdict"]) <= {"falls", "plateau", "unclear"}
    assert "negbench rate --task synthetic" in (folder / "table.md").read_text()
    first = (folder / "slopes.csv").read_bytes()
    code, _, err = invoke(capsys, *args)
    assert code == 0 and "0 trained, 8 already finished" in " ".join(err.split()), err
    assert (folder / "slopes.csv").read_bytes() == first
    code, _, err = invoke(capsys, *args, "--collect")
    assert code == 0 and (folder / "slopes.csv").read_bytes() == first
