"""The README agrees with the code: the Quickstart commands are the ones CI runs, and the
README's sampler example works as a plugin."""

from __future__ import annotations

import re
from pathlib import Path

from clikit import invoke

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_test_one():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert commands[0].endswith("negbench run") and "pip install -e ." in commands[0]
    assert "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_readme_sampler_example_runs_as_a_plugin(tmp_path, capsys):
    example = re.search(r"```python\n(\"\"\"``plugin_uniform``.+?)```", README, re.S).group(1)
    path = tmp_path / "my_sampler.py"
    path.write_text(example)
    code, _, err = invoke(capsys, "run", "--plugin", str(path), "--sampler", "plugin_uniform", "--task", "synthetic",
                          "--set", "num_items=16", "--batch-size", "4", "--steps", "2", "--tv-steps", "2",
                          "--out", str(tmp_path / "o"), "--quiet")
    assert code == 0, err


def test_every_registered_sampler_is_in_the_readme_table():
    from negbench.registry import SAMPLERS

    for name in SAMPLERS.names():
        if SAMPLERS.get_class(name).__module__.startswith("negbench.samplers."):
            assert f"| `{name}`" in README, name
