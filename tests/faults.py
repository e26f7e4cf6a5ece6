"""Fault injection for the reliability tests: a run that signals itself at a chosen step.

:func:`kill_at` is a step hook (``negbench.session.after_each_step``) that sends the process
a signal once step k is done, its metric row and checkpoint written. In-process tests install
it with ``after_each_step``; a real process to SIGKILL is started through this file, which
installs the hook and then runs the CLI::

    python tests/faults.py 6:KILL run --task synthetic ...    # (or 6:TERM, 6:INT; KILL by default)
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from negbench.session import StepHook, after_each_step

LAUNCHER = str(Path(__file__).resolve())


def kill_at(step: int, sig: signal.Signals = signal.SIGKILL) -> StepHook:
    """A step hook that sends ``sig`` to this process once ``step`` is done."""

    def hook(done: int) -> None:
        if done == step:
            os.kill(os.getpid(), sig)

    return hook


def parse(text: str) -> tuple[int, signal.Signals]:
    """``"k"`` or ``"k:NAME"`` → (k, SIGNAME); SIGKILL by default."""
    step, _, name = text.partition(":")
    return int(step), signal.Signals[f"SIG{name or 'KILL'}"]


def run_cell_killed_at_step_5(cell, console):  # noqa: ANN001, ANN201 - a grid.CellRunner
    """A per-cell runner for ``negbench.grid.run_grid`` whose process SIGKILLs itself once step
    5 is done (module-level, so that spawned grid workers can unpickle it)."""
    from negbench.grid import run_cell

    with after_each_step(kill_at(5)):
        return run_cell(cell, console)


if __name__ == "__main__":
    from negbench.cli import main

    at, signum = parse(sys.argv[1])
    with after_each_step(kill_at(at, signum)):
        main(sys.argv[2:])
