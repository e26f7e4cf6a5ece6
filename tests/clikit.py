"""Run the CLI in-process and capture exit code, stdout and stderr."""

from __future__ import annotations

import pytest

from negbench.cli import main

TINY_SYNTHETIC = ["--task", "synthetic", "--set", "num_items=24", "--set", "input_dim=8",
                  "--set", "hidden=16", "--set", "dim=8"]


def invoke(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    captured = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else int(code)), captured.out, captured.err
