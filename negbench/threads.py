"""One knob for every thread pool a run touches.

``torch.set_num_threads`` sizes torch's own intra-op pool only. A run also calls NumPy and
scikit-learn (the linear probe of the downstream metrics), whose BLAS (OpenBLAS in NumPy's and
SciPy's wheels) starts one thread per core and leaves them spinning after each call. In one
process on an idle machine that costs CPU but little wall time; with N worker processes on N
cores the spinning threads take the cores from the other workers' runs: measured on 2 cores, two
concurrent 300-step digits cells in spawned workers with torch at 1 thread took 60.7 s of CPU and
38.7 s wall, and 22.4 s of CPU and 18.6 s wall with ``OMP_NUM_THREADS=1`` (each worker had two
extra threads, OpenBLAS's, burning about 11 s). :func:`limit_threads` caps them all, through
threadpoolctl (a dependency of scikit-learn), for the duration of a cell.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def limit_threads(threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op pool and every BLAS / OpenMP pool that threadpoolctl
    finds (OpenBLAS, MKL, libgomp) at ``threads`` threads; restore them after. ``None``: change
    nothing."""
    if threads is None:
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    # threadpoolctl caps the pools loaded now: load the run's own first (scikit-learn brings a
    # second libgomp, SciPy a second OpenBLAS), or they would start uncapped mid-run
    import negbench.metrics  # noqa: F401  (scikit-learn)
    import scipy.linalg  # noqa: F401

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield
    finally:
        torch.set_num_threads(before)
