"""negbench.threads.limit_threads: torch's pool and every BLAS / OpenMP pool threadpoolctl sees
(scikit-learn's and SciPy's included) are capped inside the block and restored after it."""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_info

from negbench.threads import limit_threads


def _pools() -> dict[str, int]:
    return {info["filepath"]: info["num_threads"] for info in threadpool_info()}


def test_limit_threads_caps_torch_and_every_blas_pool_then_restores():
    import negbench.metrics  # noqa: F401  the pools a run loads, so that "before" holds them all
    import scipy.linalg  # noqa: F401

    torch_before, pools_before = torch.get_num_threads(), _pools()
    with limit_threads(1):
        assert torch.get_num_threads() == 1
        inside = _pools()
        assert any("openblas" in path for path in inside)
        assert all(n == 1 for n in inside.values()), inside
    assert torch.get_num_threads() == torch_before
    assert _pools() == pools_before


def test_limit_threads_none_changes_nothing():
    before = (torch.get_num_threads(), _pools())
    with limit_threads(None):
        assert (torch.get_num_threads(), _pools()) == before
