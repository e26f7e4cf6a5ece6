"""Conformance suite run over every registered sampler (a new sampler is tested the day it
is added): shapes, W ≥ 0 and finite, 0 on invalid pairs, seeded determinism, state_dict
round trip (with the diagnostics' accumulators), declared metadata."""

from __future__ import annotations

import pytest
import torch

from negbench import list_samplers
from negbench.registry import SAMPLERS
from samplerkit import bound_sampler, frozen_views, run_steps

ALL = list_samplers()


def test_registry_has_the_design_samplers():
    assert {"uniform", "in_batch", "full_softmax", "emc2", "importance", "sogclr", "neg_cache"} <= set(ALL)
    assert SAMPLERS.get_class("simclr") is SAMPLERS.get_class("in_batch")
    assert not SAMPLERS.failures, SAMPLERS.failures


@pytest.mark.parametrize("name", ALL)
def test_metadata(name):
    cls = SAMPLERS.get_class(name)
    assert cls.description and "\n" not in cls.description
    assert cls.__module__.startswith("negbench.samplers.")
    module_doc = __import__(cls.__module__, fromlist=["x"]).__doc__
    assert module_doc and len(module_doc) > 100, "each sampler module states its maths"
    cls(**cls.test_params)  # the tiny configuration is valid


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("finite", [True, False])
def test_weights_shape_sign_and_support(name, finite):
    cls = SAMPLERS.get_class(name)
    if cls.requires_finite_views and not finite:
        pytest.skip("finite-view sampler")
    views = frozen_views()
    sampler = bound_sampler(name, m=2 if finite else None)
    for batch, weights in run_steps(sampler, views, steps=6, batch_size=6):
        a, c = batch.num_anchors, batch.candidate_items.numel()
        assert weights.shape == (a, c)
        assert torch.isfinite(weights).all() and (weights >= 0).all()
        assert not weights.requires_grad
        allowed = batch.valid.clone()
        allowed[torch.arange(a), batch.positive] = True  # a sampler may weigh the positive
        assert (weights[~allowed] == 0).all(), f"{name} puts weight on invalid pairs"
        if cls.normalised_weights:
            assert (weights.sum(1) <= 1 + 1e-5).all()


@pytest.mark.parametrize("name", ALL)
def test_seeded_determinism(name):
    views = frozen_views()
    first = [w for _, w in run_steps(bound_sampler(name, seed=3), views, steps=5, batch_size=5)]
    second = [w for _, w in run_steps(bound_sampler(name, seed=3), views, steps=5, batch_size=5)]
    for w1, w2 in zip(first, second):
        torch.testing.assert_close(w1, w2, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_state_dict_round_trip_resumes_identically(name):
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
    # the diagnostics of the window cover the steps before the snapshot too
    assert resumed.diagnostics() == reference.diagnostics()
    for (b1, w1), (b2, w2) in zip(expected, got):
        torch.testing.assert_close(w1, w2, rtol=0, atol=0)
        # the same extras too: W alone does not show which items a sampler drew
        assert torch.equal(b1.candidate_items, b2.candidate_items)
        assert torch.equal(b1.candidate_views, b2.candidate_views)
    assert resumed.state_bytes() == reference.state_bytes()


@pytest.mark.parametrize("name", ALL)
def test_state_bytes_counts_the_state(name):
    sampler = bound_sampler(name)
    expected = sum(t.numel() * t.element_size() for t in sampler.state_dict().values() if isinstance(t, torch.Tensor))
    assert sampler.state_bytes() == expected
