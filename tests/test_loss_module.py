"""``negbench.ContrastiveLoss`` (issue 12): for every registered sampler its gradient equals the
runner's for the same sampler state and random stream; a checkpointed training loop resumes
bit-identically; bad input is refused without touching the state; no reference to the model."""

from __future__ import annotations

import copy
import gc
import io
import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distworker
from negbench import ContrastiveLoss, UserError, list_samplers, training
from negbench.config import RunConfig
from negbench.registry import SAMPLERS
from negbench.resolution import prepare

STEPS = 3  # compared steps, after WARM runner steps that make the sampler state non-trivial
WARM = 2
#: distworker's variants (every registered sampler, plus emc2/neg_cache variants and the
#: random-augmentation task) except the runner's two-pass extras path, a memory device of its own
VARIANTS = {name: v for name, v in distworker.variants().items() if v.extra_chunk is None}


def _trainer(variant: distworker.Variant, out) -> Any:
    config = RunConfig(
        sampler=variant.sampler, task=variant.task, batch_size=distworker.BATCH, steps=WARM + STEPS, optimizer="sgd",
        lr=0.5, beta=5.0, seed=3, device="cpu", out=out, tv_steps=0,
        sampler_params={**SAMPLERS.get_class(variant.sampler).test_params, **variant.params},
        task_params=dict(distworker.SYNTHETIC) if variant.task == "synthetic" else {},
    )
    return training.Trainer.from_prepared(prepare(config))


class _Recorder:
    """What the runner's step fed its encoder and asked of its sampler (the module's test replays
    exactly those inputs)."""

    def __init__(self, trainer: Any) -> None:
        self.calls: list[tuple[torch.Tensor, bool]] = []
        self.batches: list[Any] = []
        self.extras: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.refreshed: list[tuple[torch.Tensor, torch.Tensor]] = []
        model, sampler = trainer.model, trainer.sampler
        forward, propose, refresh = model.forward, sampler.propose, sampler.refresh

        def recording_forward(x):  # type: ignore[no-untyped-def]
            self.calls.append((x.clone(), torch.is_grad_enabled()))
            return forward(x)

        def recording_propose(batch):  # type: ignore[no-untyped-def]
            self.batches.append(batch)
            extras = propose(batch)
            if extras is not None and extras.items.numel():
                self.extras.append((extras.items.clone(), extras.views.clone()))
            return extras

        def recording_refresh(encode):  # type: ignore[no-untyped-def]
            def recording_encode(items, views):  # type: ignore[no-untyped-def]
                self.refreshed.append((items.clone(), views.clone()))
                return encode(items, views)
            return refresh(recording_encode)

        model.forward, sampler.propose, sampler.refresh = recording_forward, recording_propose, recording_refresh

    def clear(self) -> None:
        self.calls.clear(), self.batches.clear(), self.extras.clear(), self.refreshed.clear()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gradient_equals_the_runners_for_the_same_state_and_random_stream(variant, tmp_path):
    spec = VARIANTS[variant]
    with distworker.augmented_task_registered():
        trainer = _trainer(spec, tmp_path)
        for _ in range(WARM):
            trainer.train_step()
        # the runner's surface used here: prepare, Trainer, train_step, and its model, params, sampler
        ctx = trainer.sampler.context
        criterion = ContrastiveLoss(spec.sampler, num_items=ctx.num_items, beta=ctx.beta, num_views=ctx.num_views,
                                    dim=ctx.dim, **trainer.sampler.config)
        criterion.sampler.load_state_dict(trainer.sampler.state_dict())  # the runner's state ...
        criterion.generator.set_state(trainer.sampler.generator.get_state())  # ... and random stream
        record = _Recorder(trainer)
        carried_refresh: list[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]] = []
        used_extras = 0
        for step in range(STEPS):
            model = copy.deepcopy(trainer.model)  # θ at the start of the step
            vars(model).pop("forward")  # the copy's own forward, not the recording one
            record.clear()
            runner_loss = trainer.train_step()
            runner_grads = [p.grad.clone() for p in trainer.params]
            grad_inputs = [x for x, grad in record.calls if grad]
            refresh_inputs = [x for x, grad in record.calls if not grad]

            [batch] = record.batches
            z = model(grad_inputs[0])
            views = batch.anchor_views.reshape(-1, 2) if ctx.num_views else None
            extra_queue = list(zip(record.extras, grad_inputs[1:]))
            refresh_queue = carried_refresh

            def encode(items: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
                queue = extra_queue if torch.is_grad_enabled() else refresh_queue
                (want_items, want_views), x = queue.pop(0)
                assert torch.equal(items, want_items) and torch.equal(views, want_views), "not the runner's request"
                return model(x)

            loss = criterion(z[0::2], z[1::2], batch.anchor_items[0::2], views=views, encode=encode)
            assert not extra_queue and not refresh_queue, "the module asked for fewer encodings than the runner"
            model.zero_grad()
            loss.backward()
            assert float(loss.detach()) == pytest.approx(runner_loss, abs=1e-5)
            grads = [p.grad for p in model.parameters() if p.requires_grad]
            assert any(float(g.abs().max()) > 1e-3 for g in runner_grads), "a zero gradient would prove nothing"
            for got, want in zip(grads, runner_grads):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=lambda m: f"step {step}: {m}")
            # the runner refreshed after its optimiser step; the module does it at its next call
            carried_refresh = list(zip(record.refreshed, refresh_inputs))
            used_extras += len(record.extras)
            if not carried_refresh:  # same state (to float rounding: the module normalises z again)
                for key, value in trainer.sampler.state_dict().items():
                    got = criterion.sampler.state_dict()[key]
                    if isinstance(value, torch.Tensor):
                        torch.testing.assert_close(got, value, atol=1e-6, rtol=1e-6, msg=lambda m: f"{key}: {m}")
                    else:
                        assert got == value, key
        if criterion.sampler.needs_encoder() and "refresh" not in variant:
            assert used_extras, "the extras path was not exercised"


def test_every_registered_sampler_is_compared():
    # built-ins (one file in samplers/ each); plugins other tests register later are not in VARIANTS
    built_in = {n for n in list_samplers() if SAMPLERS.get_class(n).__module__.startswith("negbench.samplers.")}
    assert {v.sampler for v in VARIANTS.values()} >= built_in


# ---- a training loop of one's own, checkpointed --------------------------------------------------
N, B, D = 40, 8, 6


def _loop(criterion: ContrastiveLoss, model: nn.Module, opt: torch.optim.Optimizer, data: torch.Tensor,
          gen: torch.Generator, steps: int) -> list[float]:
    losses = []

    def encode(items: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
        noise = 0.1 * torch.randn(items.numel(), data.shape[1], generator=gen)
        return model(data[items] + noise)

    for _ in range(steps):
        index = torch.randperm(N, generator=gen)[:B]
        x1 = data[index] + 0.1 * torch.randn(B, data.shape[1], generator=gen)
        x2 = data[index] + 0.1 * torch.randn(B, data.shape[1], generator=gen)
        loss = criterion(model(x1), model(x2), index, encode=encode)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list_samplers())
def test_a_loop_resumed_from_a_checkpoint_continues_bit_identically(name):
    if SAMPLERS.get_class(name).requires_finite_views:
        pytest.skip("needs a finite view set: the loop draws random augmentations")
    params = SAMPLERS.get_class(name).test_params
    data = torch.randn(N, 5, generator=torch.Generator().manual_seed(1))

    def fresh() -> tuple[ContrastiveLoss, nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, D))
        return ContrastiveLoss(name, num_items=N, beta=5.0, **params), model, torch.optim.Adam(model.parameters(), 1e-2)

    criterion, model, opt = fresh()
    gen = torch.Generator().manual_seed(2)
    _loop(criterion, model, opt, data, gen, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "loss": criterion.state_dict(),
                "gen": gen.get_state()}, buffer)
    expected = _loop(criterion, model, opt, data, gen, 4)
    expected_diag, expected_state = criterion.diagnostics(), copy.deepcopy(criterion.state_dict())

    criterion, model, opt = fresh()  # a new process would start here
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["opt"])
    criterion.load_state_dict(checkpoint["loss"])
    gen = torch.Generator()
    gen.set_state(checkpoint["gen"])
    assert _loop(criterion, model, opt, data, gen, 4) == expected
    assert criterion.diagnostics() == expected_diag
    for key, value in criterion.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, expected_state[key]), key


def test_state_is_in_buffers_and_dtypes_survive_module_conversions():
    criterion = ContrastiveLoss("emc2", num_items=N)
    assert set(criterion.state_dict()) == {"chain_state", "chain_score", "chain_step", "_extra_state"}
    criterion.double().to("cpu")
    assert criterion.chain_state.dtype == torch.int32 and criterion.chain_score.dtype == torch.float32
    assert criterion.state_bytes() == 12 * N
    z = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=1)
    criterion(z, z.flip(0), torch.arange(B))
    assert criterion.sampler.chain_state is criterion.chain_state  # one tensor, not two copies
    assert (criterion.chain_state[:B] >= 0).all()


def test_the_module_holds_no_reference_to_the_model_and_pickles():
    model = nn.Linear(5, D)
    alive = weakref.ref(model)
    criterion = ContrastiveLoss("neg_cache", num_items=N, k=2)
    data = torch.randn(N, 5)
    encode = lambda items, views: model(data[items])  # noqa: E731
    for _ in range(2):
        index = torch.randperm(N)[:B]
        loss = criterion(model(data[index]), model(data[index] + 0.1), index, encode=encode)
        loss.backward()
    del model, encode, loss
    assert alive() is None, "the loss keeps the model alive (a stored reference or a cycle)"
    gc.collect()
    copy.deepcopy(criterion)
    torch.save(criterion.state_dict(), io.BytesIO())
    torch.save(criterion, io.BytesIO())


def test_dimension_comes_from_the_first_batch_or_the_checkpoint():
    criterion = ContrastiveLoss("neg_cache", num_items=N)
    z = torch.randn(B, D)
    criterion(z, z + 0.1, torch.arange(B), encode=lambda it, vw: torch.randn(it.numel(), D))
    assert criterion.cache_emb.shape == (N, D)
    restored = ContrastiveLoss("neg_cache", num_items=N)
    restored.load_state_dict(criterion.state_dict())
    assert torch.equal(restored.cache_emb, criterion.cache_emb)
    with pytest.raises(UserError, match="dimension 3"):
        criterion(torch.randn(B, 3), torch.randn(B, 3), torch.arange(B), encode=lambda it, vw: torch.randn(it.numel(), 3))
    with pytest.raises(UserError, match="sampler='in_batch'"):
        ContrastiveLoss("neg_cache", num_items=N).load_state_dict(ContrastiveLoss("in_batch", num_items=N).state_dict())


def test_diagnostics_are_the_samplers():
    criterion = ContrastiveLoss("emc2", num_items=N)
    for _ in range(3):
        z = torch.randn(B, D)
        criterion(z, z + 0.1 * torch.randn(B, D), torch.randperm(N)[:B])
    diagnostics = criterion.diagnostics()
    assert set(diagnostics) == {"accept_rate", "stale_frac", "empty_frac", "chain_age"}
    assert 0 < diagnostics["accept_rate"] <= 1
    assert criterion.diagnostics()["accept_rate"] is None  # reset by the call


# ---- bad input -------------------------------------------------------------------------------------
def _good() -> dict[str, Any]:
    z = torch.randn(B, D)
    return {"z1": z, "z2": z + 0.1, "index": torch.arange(B)}


BAD_CALLS = {
    "z1 and z2 differ": ({"z2": torch.randn(B, D + 1)}, "same shape"),
    "index length": ({"index": torch.arange(B - 1)}, r"index must have shape \(8,\)"),
    "index out of range": ({"index": torch.arange(B) + N - 2}, "outside"),
    "negative index": ({"index": torch.arange(B) - 1}, "outside"),
    "duplicate index": ({"index": torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])}, "same item twice"),
    "float index": ({"index": torch.arange(B).float()}, "integer tensor"),
    "batch of one": ({"z1": torch.randn(1, D), "z2": torch.randn(1, D), "index": torch.tensor([0])}, "at least 2"),
    "nan in z1": ({"z1": torch.full((B, D), float("nan"))}, "NaN"),
    "inf in z2": ({"z2": torch.full((B, D), float("inf"))}, "NaN or infinite"),
    "1-d z": ({"z1": torch.randn(B), "z2": torch.randn(B)}, r"\(B, d\)"),
    "views without num_views": ({"views": torch.zeros(B, 2, dtype=torch.long)}, "finite view sets"),
}


@pytest.mark.parametrize("name", ["emc2", "sogclr", "neg_cache"])
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_is_one_sentence_and_changes_nothing(name, case):
    criterion = ContrastiveLoss(name, num_items=N, **SAMPLERS.get_class(name).test_params)
    encode = lambda items, views: torch.randn(items.numel(), D)  # noqa: E731
    criterion(**_good(), encode=encode)  # some state to keep
    before = copy.deepcopy(criterion.state_dict())
    overrides, message = BAD_CALLS[case]
    with pytest.raises(UserError, match=message) as info:
        criterion(**{**_good(), **overrides}, encode=encode)
    assert isinstance(info.value, ValueError) or isinstance(info.value, UserError)
    assert "\n" not in str(info.value)
    after = criterion.state_dict()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key]["generator"], value["generator"])
            assert after[key]["pending_refresh"] == value["pending_refresh"] and after[key]["steps"] == value["steps"]
            assert repr(after[key]["other_state"]) == repr(value["other_state"])


def test_a_wrong_encode_output_is_refused_and_changes_nothing():
    criterion = ContrastiveLoss("importance", num_items=N, k=4)
    good = lambda items, views: torch.randn(items.numel(), D)  # noqa: E731
    criterion(**_good(), encode=good)
    generator = criterion.generator.get_state()
    with pytest.raises(UserError, match=r"must return \(4, 6\)"):
        criterion(**_good(), encode=lambda items, views: torch.randn(items.numel() + 1, D))
    assert torch.equal(criterion.generator.get_state(), generator)


@pytest.mark.parametrize("name", ["importance", "neg_cache", "full_softmax"])
def test_samplers_that_need_more_than_the_batch_ask_for_encode(name):
    criterion = ContrastiveLoss(name, num_items=N, num_views=2 if name == "full_softmax" else None)
    with pytest.raises(UserError, match="pass encode=fn"):
        criterion(**_good())
    with pytest.raises(UserError, match="pass encode=fn"):
        ContrastiveLoss("emc2", num_items=N, stale="refresh")(**_good())


@pytest.mark.parametrize("kwargs, message", [
    ({"num_items": 1}, "num_items"), ({"num_items": None}, "num_items"), ({"beta": 0.0}, "beta"),
    ({"beta": float("nan")}, "beta"), ({"num_views": 1}, "num_views"), ({"dim": 0}, "dim"),
    ({"burn_in": 2.0}, "burn_in"), ({"no_such": 1}, "unknown sampler 'emc2' parameter"),
])
def test_bad_construction(kwargs, message):
    with pytest.raises(UserError, match=message):
        ContrastiveLoss("emc2", **{"num_items": N, **kwargs})
    with pytest.raises(UserError, match="did you mean"):
        ContrastiveLoss("emc3", num_items=N)


def test_full_softmax_with_every_view_is_the_exact_gcl_gradient():
    """With the batch covering every item, full_softmax's loss has the gradient of negbench.gcl_loss
    (an independent autograd of DESIGN §1.1) — the module's maths, not only the runner's."""
    from negbench import gcl_loss

    n, m = 6, 2
    table = torch.randn(n, m, D, dtype=torch.float64, requires_grad=True)  # encoder outputs, not unit
    criterion = ContrastiveLoss("full_softmax", num_items=n, beta=2.0, num_views=m)
    views = torch.tensor([[0, 1]] * n)
    loss = criterion(table[:, 0], table[:, 1], torch.arange(n), views=views, encode=lambda it, vw: table[it, vw])
    (got,) = torch.autograd.grad(loss, table)
    (want,) = torch.autograd.grad(gcl_loss(F.normalize(table, dim=2), 2.0), table)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["emc2", "in_batch", "sogclr", "uniform"])
def test_on_cuda_a_call_does_not_synchronise_with_the_host(name):
    criterion = ContrastiveLoss(name, num_items=1000, validate=False).to("cuda")
    assert criterion.generator.device.type == "cuda"
    z = torch.randn(64, 16, device="cuda", requires_grad=True)
    index = torch.randperm(1000, device="cuda")[:64]
    criterion(z, z + 0.1, index).backward()  # first call: kernel compilation may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            loss = criterion(z, z.flip(0), torch.randperm(1000, device="cuda")[:64])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("views, message", [
    (torch.tensor([[0, 0]] * B), "two different view ids"), (torch.tensor([[0, 3]] * B), r"in \[0, 3\)"),
    (torch.zeros(B, 3, dtype=torch.long), r"integer \(8, 2\) tensor"), (torch.zeros(B, 2), r"integer \(8, 2\) tensor"),
])
def test_bad_view_ids_on_a_finite_view_set(views, message):
    criterion = ContrastiveLoss("emc2", num_items=N, num_views=3)
    before = copy.deepcopy(criterion.state_dict())
    with pytest.raises(UserError, match=message):
        criterion(**_good(), views=views)
    assert all(torch.equal(criterion.state_dict()[k], v) for k, v in before.items() if isinstance(v, torch.Tensor))
