"""The conformance suite (docs/design.md §7): the contract every sampler and task must keep,
as plain checks that run on any registered class — a built-in (``tests/
test_sampler_conformance.py`` parametrises pytest over the registry) or a plugin from outside
the repository (``negbench check PLUGIN.py``, one verdict line per check).

Sampler checks run the sampler at frozen random unit embeddings (N = 40 items, m = 2 views,
d = 6, β = 5) with its ``test_params``:

- W has shape (A, C) — A = 2B anchors, C = the candidates (the batch's A views, then the
  extras the sampler proposed) — is finite, non-negative (unless the sampler declares
  ``signed_weights``, as ``dcl`` and ``hcl`` do: their published losses need negative
  weights), detached, 0 on invalid pairs (the positive excepted), and rows sum to at most 1
  when ``normalised_weights``;
- the same seed gives the same W; ``state_dict`` + ``diagnostics_state`` + the generator state
  resume a sampler exactly (the same W, the same extras, the same diagnostics);
- ``state_bytes`` counts the tensors of ``state_dict``; ``diagnostics()`` returns only keys
  declared in ``diagnostic_metrics``.

Task checks load the task with its ``test_params``: the sizes, the inputs of a batch (seeded),
the encoder's embeddings (one unit vector per input), the finite view set. A task that needs
data it cannot find (a ``--data-root``) has its load-dependent checks skipped, with the reason.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from negbench.distribution import draw_views, frozen_step
from negbench.errors import UserError
from negbench.registry import SAMPLERS, TASKS
from negbench.sampler import Batch, Sampler, SamplerContext

N_ITEMS, N_VIEWS, DIM, BETA = 40, 2, 6, 5.0
Status = Literal["pass", "fail", "skip"]


class CheckSkipped(Exception):
    """A check that does not apply (e.g. a finite-view sampler on random augmentations)."""


def require(condition: bool, message: str) -> None:
    """Fail the check with ``message`` unless ``condition``."""
    if not condition:
        raise AssertionError(message)


# ---- helpers: frozen embeddings and bound samplers ---------------------------------------

def frozen_views(n: int = N_ITEMS, m: int = N_VIEWS, d: int = DIM, seed: int = 0) -> Tensor:
    """(n, m, d) random unit embeddings, seeded."""
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, m, d, generator=gen), dim=2)


def bound_sampler(name: str, seed: int = 0, n: int = N_ITEMS, m: int | None = N_VIEWS, beta: float = BETA,
                  **params: Any) -> Sampler:
    """The registered sampler ``name`` with its ``test_params`` (overridden by ``params``),
    bound to a task of ``n`` items with ``m`` fixed views (None: random augmentations)."""
    cls = SAMPLERS.get_class(name)
    sampler = cls(**{**cls.test_params, **params})
    gen = torch.Generator().manual_seed(seed)
    return sampler.bind(SamplerContext(num_items=n, num_views=m, beta=beta, dim=DIM, generator=gen))


def run_steps(sampler: Sampler, views: Tensor, steps: int, batch_size: int, seed: int = 0) -> list[tuple[Batch, Tensor]]:
    """``steps`` frozen-embedding steps of random batches; the (batch, W) of each."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        items = torch.randperm(views.shape[0], generator=gen)[:batch_size]
        item_views = draw_views(batch_size, views.shape[1], gen)
        out.append(frozen_step(sampler, views, items, item_views, gen))
    return out


# ---- sampler checks -------------------------------------------------------------------------

def check_sampler_metadata(name: str) -> None:
    cls = SAMPLERS.get_class(name)
    require(bool(cls.description) and "\n" not in cls.description, "description must be one non-empty line")
    module_doc = sys.modules[cls.__module__].__doc__ if cls.__module__ in sys.modules else None
    require(bool(module_doc and module_doc.strip()), f"module {cls.__module__} has no docstring stating the maths")
    try:
        cls(**cls.test_params)
    except UserError as exc:
        raise AssertionError(f"test_params {cls.test_params!r} are not valid: {exc}") from None


def _check_weights(name: str, finite: bool) -> None:
    cls = SAMPLERS.get_class(name)
    if cls.requires_finite_views and not finite:
        raise CheckSkipped("needs a finite view set")
    sampler = bound_sampler(name, m=N_VIEWS if finite else None)
    for step, (batch, weights) in enumerate(run_steps(sampler, frozen_views(), steps=6, batch_size=6)):
        a, c = batch.num_anchors, batch.candidate_items.numel()
        where = f"step {step}: W"
        require(isinstance(weights, Tensor), f"{where} is a {type(weights).__name__}, not a tensor")
        require(tuple(weights.shape) == (a, c), f"{where} has shape {tuple(weights.shape)}, expected (anchors, "
                f"candidates) = ({a}, {c})")
        require(bool(torch.isfinite(weights).all()), f"{where} has NaN or infinite entries")
        if not cls.signed_weights:
            require(bool((weights >= 0).all()), f"{where} has negative entries (set signed_weights = True if the "
                    "sampler's loss needs them)")
        require(not weights.requires_grad, f"{where} requires grad (return detached weights)")
        allowed = batch.valid.clone()
        allowed[torch.arange(a), batch.positive] = True  # a sampler may weigh the positive
        require(bool((weights[~allowed] == 0).all()), f"{where} puts weight on invalid pairs (batch.valid is False)")
        if cls.normalised_weights:
            require(bool((weights.sum(1) <= 1 + 1e-5).all()),
                    f"{where} has a row summing above 1 (set normalised_weights = False for a reweighting estimator)")


def check_weights_finite_views(name: str) -> None:
    _check_weights(name, finite=True)


def check_weights_random_augmentations(name: str) -> None:
    _check_weights(name, finite=False)


def check_seeded_determinism(name: str) -> None:
    views = frozen_views()
    first = [w for _, w in run_steps(bound_sampler(name, seed=3), views, steps=5, batch_size=5)]
    second = [w for _, w in run_steps(bound_sampler(name, seed=3), views, steps=5, batch_size=5)]
    for step, (w1, w2) in enumerate(zip(first, second)):
        require(torch.equal(w1, w2), f"step {step}: the same seed gave different W (draw only from self.generator)")


def check_state_round_trip(name: str) -> None:
    views = frozen_views()
    reference = bound_sampler(name, seed=1)
    run_steps(reference, views, steps=4, batch_size=5, seed=7)
    state = reference.state_dict()
    diagnostics = reference.diagnostics_state()  # mid-window: 4 steps accumulated, not yet reported
    generator_state = reference.generator.get_state()
    expected = run_steps(reference, views, steps=2, batch_size=5, seed=8)

    resumed = bound_sampler(name, seed=999)
    resumed.load_state_dict(state)
    resumed.load_diagnostics_state(diagnostics)
    resumed.generator.set_state(generator_state)
    got = run_steps(resumed, views, steps=2, batch_size=5, seed=8)
    require(resumed.diagnostics() == reference.diagnostics(),
            "diagnostics differ after a resume (name their accumulators in diagnostic_attributes)")
    for step, ((b1, w1), (b2, w2)) in enumerate(zip(expected, got)):
        require(torch.equal(w1, w2), f"step {step} after a resume: W differs (name every per-item state tensor "
                "in state_attributes, or extend state_dict)")
        # the same extras too: W alone does not show which items a sampler drew
        require(torch.equal(b1.candidate_items, b2.candidate_items) and torch.equal(b1.candidate_views, b2.candidate_views),
                f"step {step} after a resume: different extras were proposed")
    require(resumed.state_bytes() == reference.state_bytes(), "state_bytes changed after a resume")


def check_state_bytes(name: str) -> None:
    sampler = bound_sampler(name)
    expected = sum(t.numel() * t.element_size() for t in sampler.state_dict().values() if isinstance(t, Tensor))
    require(sampler.state_bytes() == expected,
            f"state_bytes() = {sampler.state_bytes()} but the tensors of state_dict() hold {expected} bytes")


def check_declared_diagnostics(name: str) -> None:
    sampler = bound_sampler(name)
    run_steps(sampler, frozen_views(), steps=3, batch_size=5)
    declared = {m.name for m in getattr(type(sampler), "diagnostic_metrics", ())}
    undeclared = sorted(set(sampler.diagnostics()) - declared)
    require(not undeclared, f"diagnostics() returns {', '.join(undeclared)}, not declared in diagnostic_metrics")


# ---- task checks ----------------------------------------------------------------------------

def check_task_metadata(name: str) -> None:
    cls = TASKS.get_class(name)
    require(bool(cls.description) and "\n" not in cls.description, "description must be one non-empty line")
    try:
        cls(**cls.test_params)
    except UserError as exc:
        raise AssertionError(f"test_params {cls.test_params!r} are not valid: {exc}") from None


def loaded_task(name: str, seed: int = 0) -> Any:
    """The task with its ``test_params``, loaded; :class:`CheckSkipped` when its data is missing."""
    cls = TASKS.get_class(name)
    task = cls(**cls.test_params)
    try:
        task.load(seed=seed, data_root=None)
    except UserError as exc:
        raise CheckSkipped(f"cannot load without its data: {' '.join(str(exc).split()).split(' (')[0]}") from None
    return task


def _batch_inputs(task: Any, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    items = torch.arange(min(4, task.num_items))
    if task.num_views:
        views = draw_views(items.numel(), task.num_views, gen).reshape(-1)
    else:  # random augmentations: views 0 and 1 are two fresh augmentations
        views = torch.arange(2).repeat(items.numel())
    return task.inputs(items.repeat_interleave(2), views, gen)


def check_task_loads(name: str) -> None:
    task = loaded_task(name)
    require(task.num_items >= 2, f"num_items = {task.num_items} after load(); a task needs at least 2 items")
    if type(task).finite_views:
        require(task.num_views is not None and task.num_views >= 2,
                f"a finite-view task needs num_views >= 2, got {task.num_views}")
        views = task.all_views()
        require(tuple(views.shape[:2]) == (task.num_items, task.num_views),
                f"all_views() has shape {tuple(views.shape)}, expected ({task.num_items}, {task.num_views}, ...)")
    else:
        require(task.num_views is None, f"a random-augmentation task has num_views None, got {task.num_views}")


def check_task_inputs_are_seeded(name: str) -> None:
    task = loaded_task(name)
    first, second = _batch_inputs(task, seed=5), _batch_inputs(task, seed=5)
    require(len(first) == len(second) == 2 * min(4, task.num_items), f"inputs() returned {len(first)} inputs for "
            f"{2 * min(4, task.num_items)} (item, view) pairs")
    if isinstance(first, Tensor):
        require(torch.equal(first, second), "the same generator gave different inputs (draw only from `generator`)")


def check_task_encoder(name: str) -> None:
    task = loaded_task(name)
    torch.manual_seed(0)
    encoder = task.make_encoder().eval()
    inputs = _batch_inputs(task, seed=0)
    with torch.no_grad():
        embeddings = encoder(inputs)
    require(embeddings.ndim == 2 and embeddings.shape[0] == len(inputs),
            f"the encoder maps {len(inputs)} inputs to shape {tuple(embeddings.shape)}, expected ({len(inputs)}, d)")
    norms = embeddings.float().norm(dim=1)
    require(bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3)), "the embeddings are not unit vectors")


# ---- the suite ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """One conformance check: ``run(name)`` raises AssertionError (fail) or CheckSkipped."""

    kind: Literal["sampler", "task"]
    title: str
    run: Callable[[str], None]

    @property
    def id(self) -> str:
        return self.run.__name__.removeprefix("check_")


SAMPLER_CHECKS: tuple[Check, ...] = (
    Check("sampler", "metadata: one-line description, module docstring, valid test_params", check_sampler_metadata),
    Check("sampler", "W on a finite-view task: shape, finite, >= 0, detached, 0 off support", check_weights_finite_views),
    Check("sampler", "W with random augmentations: the same", check_weights_random_augmentations),
    Check("sampler", "the same seed gives the same W", check_seeded_determinism),
    Check("sampler", "state_dict + diagnostics_state resume exactly", check_state_round_trip),
    Check("sampler", "state_bytes counts the state tensors", check_state_bytes),
    Check("sampler", "diagnostics() keys are declared in diagnostic_metrics", check_declared_diagnostics),
)
TASK_CHECKS: tuple[Check, ...] = (
    Check("task", "metadata: one-line description, valid test_params", check_task_metadata),
    Check("task", "loads: sizes and the finite view set", check_task_loads),
    Check("task", "inputs of a batch, the same for the same generator", check_task_inputs_are_seeded),
    Check("task", "the encoder gives one unit embedding per input", check_task_encoder),
)


@dataclass(frozen=True)
class Verdict:
    check: Check
    name: str
    status: Status
    message: str = ""

    def line(self) -> str:
        """``PASS  sampler plugin_uniform  <title>`` (``: why`` for a failure or a skip)."""
        text = f"{self.status.upper():4}  {self.check.kind} {self.name}  {self.check.title}"
        return text + (f": {self.message}" if self.message else "")


def run_check(check: Check, name: str) -> Verdict:
    """Run one check on the registered component ``name``; any exception is a failure."""
    try:
        check.run(name)
    except CheckSkipped as exc:
        return Verdict(check, name, "skip", str(exc))
    except AssertionError as exc:
        return Verdict(check, name, "fail", " ".join(str(exc).split()))
    except Exception as exc:  # a crash inside the component is a failed check, with its error
        return Verdict(check, name, "fail", " ".join(f"{type(exc).__name__}: {exc}".split()))
    return Verdict(check, name, "pass")


def run_suite(samplers: Sequence[str], tasks: Sequence[str]) -> list[Verdict]:
    """Every sampler check on ``samplers`` and every task check on ``tasks``, in order."""
    return [run_check(c, n) for n in samplers for c in SAMPLER_CHECKS] + [run_check(c, n) for n in tasks for c in TASK_CHECKS]
