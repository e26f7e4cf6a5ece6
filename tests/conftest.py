from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Every test starts from the same global seed, on one intra-op thread: the tests' tensors
    are tiny, and on a loaded 2-core machine two threads make small ops many times slower."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def restore_registries():
    """Unregister what a test's plugins registered (and forget their import errors), so later
    tests see the built-ins only: a name registered again from another file is an error."""
    from negbench.registry import SAMPLERS, TASKS

    for registry in (SAMPLERS, TASKS):  # the built-ins first: saved undiscovered, they would be lost on restore
        registry.discover()
    saved = [(r, dict(r._classes), dict(r._aliases), dict(r.failures), dict(r.plugin_failures), dict(r.overrides))
             for r in (SAMPLERS, TASKS)]
    yield
    for registry, classes, aliases, failures, plugin_failures, overrides in saved:
        registry._classes, registry._aliases, registry.failures = classes, aliases, failures
        registry.plugin_failures, registry.overrides = plugin_failures, overrides
