"""The run, in one import (DESIGN §5, §6): a façade over the modules that do it, by concern:

- :mod:`negbench.resolution` — options → a typed, frozen :class:`ResolvedRun` (defaults, seeds,
  the finite-view rule, the run id); :func:`prepare` also loads the task's data;
- :mod:`negbench.training` — the :class:`Trainer`: one step, data → encoder → sampler → loss →
  optimiser, and its checkpoint state;
- :mod:`negbench.evaluation` — the :class:`Evaluator`: the metric row of an evaluation point;
- :mod:`negbench.session` — :func:`run`: the run folder, lock, resume, checkpoints, signals,
  divergence, the summary.

Samplers and tasks never import these modules.
"""

from __future__ import annotations

from negbench.config import RunConfig
from negbench.evaluation import EVAL_SAMPLE_ITEMS, Evaluator
from negbench.resolution import Prepared, ResolvedRun, Seeds, prepare, provenance, resolve
from negbench.session import RunFolderBusy, RunOutcome, run, summarise, summary_table
from negbench.training import EXACT_CHUNK, EXTRA_CHUNK, WARMUP_STEPS, Trainer

__all__ = [
    "EVAL_SAMPLE_ITEMS", "EXACT_CHUNK", "EXTRA_CHUNK", "Evaluator", "Prepared", "ResolvedRun", "RunConfig",
    "RunFolderBusy", "RunOutcome", "Seeds", "Trainer", "WARMUP_STEPS", "prepare", "provenance",
    "resolve", "run", "summarise", "summary_table",
]
