"""The README agrees with the code: the Quickstart commands are the ones CI runs, and the
README's sampler example works as a plugin."""

from __future__ import annotations

import re
from pathlib import Path

import torch

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


def test_readme_sampler_example_runs_as_a_plugin(tmp_path, capsys, restore_registries):
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


DESIGN = (ROOT / "docs" / "design.md").read_text()
#: "DESIGN §2.1", "design.md §6", "docs/design.md §4" (the last dot of a sentence is not part of it)
SECTION_REF = re.compile(r"(?:DESIGN|design\.md) §(\d+(?:\.\d+)*)")


def design_sections() -> set[str]:
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)*)\.? ", DESIGN, re.M))


def test_every_design_reference_points_to_a_section_of_docs_design():
    sections = design_sections()
    assert {"1", "1.1", "1.2", "1.3", "2", "2.1", "2.2", "3", "4", "5", "6", "7"} <= sections
    files = [ROOT / "README.md", ROOT / "results" / "README.md", *(ROOT / "docs").glob("*.md")]
    for folder in ("negbench", "samplers", "tasks", "tests"):
        files += sorted((ROOT / folder).rglob("*.py"))
    found = 0
    for path in files:
        for ref in SECTION_REF.findall(path.read_text(encoding="utf-8")):
            found += 1
            assert ref in sections, f"{path.relative_to(ROOT)} cites §{ref}, which docs/design.md does not have"
    assert found > 20  # the references are there to check


def test_design_metric_table_is_the_registry():
    from negbench.metric_registry import markdown_table

    copy = DESIGN.split("<!-- metrics:begin -->\n", 1)[1].split("\n<!-- metrics:end -->", 1)[0]
    assert copy.strip() == markdown_table(), "regenerate docs/design.md §4 from metric_registry.markdown_table()"


def test_design_module_map_lists_every_framework_module():
    modules = {p.name for p in (ROOT / "negbench").glob("*.py") if p.name not in ("__main__.py",)}
    missing = [m for m in sorted(modules) if f"negbench/{m}" not in DESIGN]
    assert not missing, f"docs/design.md §5 does not list {missing}"


def training_loop_blocks() -> list[str]:
    section = README.split("## Use a sampler in your own training loop", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.+?)```", section, re.S)


def test_readme_training_loop_examples_run_verbatim(tmp_path, monkeypatch):
    """The README's emc2 and sogclr loops, exactly as printed (one namespace, in order), on
    torchvision's ResNet-18; each at most 30 lines."""
    blocks = training_loop_blocks()
    assert len(blocks) == 2 and '"emc2"' in blocks[0] and '"sogclr"' in blocks[1]
    assert all(len(block.strip().splitlines()) <= 30 for block in blocks)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(blocks[0], "README.md[emc2]", "exec"), namespace)
    emc2 = namespace["criterion"]
    assert emc2.sampler.name == "emc2" and bool((emc2.chain_state >= 0).any())  # the chains moved
    assert (tmp_path / "checkpoint.pt").exists()
    exec(compile(blocks[1], "README.md[sogclr]", "exec"), namespace)
    sogclr = namespace["criterion"]
    assert sogclr.sampler.name == "sogclr" and bool(torch.isfinite(sogclr.log_u).any())


def test_readme_notebook_tables_example_runs_verbatim(tmp_path, monkeypatch):
    """The README's five-line notebook use of ``negbench.compare`` and ``negbench.load_runs``,
    exactly as printed, in a fresh folder."""
    import matplotlib

    matplotlib.use("Agg")
    section = README.split("### From Python: tables for a notebook", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.+?)```", section, re.S)
    assert len(blocks) == 1 and len(blocks[0].strip().splitlines()) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(blocks[0], "README.md[tables]", "exec"), namespace)
    result, rows = namespace["result"], namespace["rows"]
    assert set(result.runs["sampler"]) == {"in_batch", "emc2"} and set(result.runs["status"]) == {"completed"}
    assert (tmp_path / "results" / "synthetic" / "table.csv").exists()
    assert len(rows) == 4 * 3 and {"step", "grad_norm_sq", "sampler_label", "seed"} <= set(rows.columns)
