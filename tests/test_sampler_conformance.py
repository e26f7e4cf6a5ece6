"""The conformance suite (:mod:`negbench.conformance`, the checks ``negbench check`` runs on
a plugin) over every registered sampler and task: a new sampler or task is tested the day it
is added. Plus what only built-ins must satisfy (they live in the package, their module
states the maths at length), and ``negbench check`` itself on plugins from outside the
repository."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from clikit import invoke
from negbench import list_samplers, list_tasks
from negbench.conformance import SAMPLER_CHECKS, TASK_CHECKS, run_check
from negbench.registry import SAMPLERS, TASKS

ALL = list_samplers()
README = Path(__file__).resolve().parent.parent / "README.md"


def test_registry_has_the_design_samplers():
    assert {"uniform", "in_batch", "full_softmax", "emc2", "importance", "sogclr", "neg_cache", "dcl", "hcl",
            "queue"} <= set(ALL)
    assert SAMPLERS.get_class("simclr") is SAMPLERS.get_class("in_batch")
    assert not SAMPLERS.failures, SAMPLERS.failures


@pytest.mark.parametrize("name", ALL)
def test_builtin_sampler_lives_in_the_package_and_states_its_maths(name):
    cls = SAMPLERS.get_class(name)
    assert cls.__module__.startswith("negbench.samplers.")
    module_doc = __import__(cls.__module__, fromlist=["x"]).__doc__
    assert module_doc and len(module_doc) > 100, "each sampler module states its maths"


@pytest.mark.parametrize("check", SAMPLER_CHECKS, ids=lambda c: c.id)
@pytest.mark.parametrize("name", ALL)
def test_sampler_conformance(name, check):
    verdict = run_check(check, name)
    if verdict.status == "skip":
        pytest.skip(verdict.message)
    assert verdict.status == "pass", verdict.line()


def test_signed_weights_is_declared_only_where_needed():
    """The W ≥ 0 check is relaxed for exactly the samplers whose published loss needs it."""
    assert {name for name in ALL if SAMPLERS.get_class(name).signed_weights} == {"dcl", "hcl"}


@pytest.mark.parametrize("check", TASK_CHECKS, ids=lambda c: c.id)
@pytest.mark.parametrize("name", list_tasks())
def test_task_conformance(name, check):
    verdict = run_check(check, name)
    if verdict.status == "skip":
        pytest.skip(verdict.message)
    assert verdict.status == "pass", verdict.line()


def readme_plugin() -> str:
    """The plugin example of the README's "Adding a sampler" section, as written there."""
    section = README.read_text(encoding="utf-8").split("## Adding a sampler", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_check_passes_on_the_readme_plugin(tmp_path, capsys, restore_registries):
    path = tmp_path / "readme_sampler.py"
    path.write_text(readme_plugin())
    code, out, err = invoke(capsys, "check", str(path))
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert len(lines) == len(SAMPLER_CHECKS) + 1  # one verdict per check, then the count
    assert all(line.startswith("PASS  sampler plugin_uniform  ") for line in lines[:-1])
    assert lines[-1] == f"{len(SAMPLER_CHECKS)} passed, 0 failed, 0 skipped"


WRONG_SHAPE = textwrap.dedent('''
    """A broken plugin: W misses the last candidate column."""
    from negbench import Sampler, register_sampler

    @register_sampler("plugin_wrong_shape")
    class WrongShape(Sampler):
        description = "Uniform weights with one column too few."

        def weigh(self, sims, batch):
            valid = batch.in_batch_valid.to(sims.dtype)
            return (valid / valid.sum(1, keepdim=True).clamp_min(1))[:, :-1]
''')


def test_check_fails_with_a_clear_line_on_a_wrong_shaped_w(tmp_path, capsys, restore_registries):
    path = tmp_path / "wrong_shape.py"
    path.write_text(WRONG_SHAPE)
    code, out, _ = invoke(capsys, "check", str(path))
    assert code == 1
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert failed, out
    assert ("FAIL  sampler plugin_wrong_shape  W on a finite-view task: shape, finite, >= 0, detached, 0 off "
            "support: step 0: W has shape (12, 11), expected (anchors, candidates) = (12, 12)") in failed
    assert out.strip().splitlines()[-1].startswith(f"{len(SAMPLER_CHECKS) - len(failed)} passed, {len(failed)} failed")
    assert "plugin_wrong_shape weights_finite_views" in out.strip().splitlines()[-1]


def test_check_of_a_file_registering_nothing_is_a_user_error(tmp_path, capsys, restore_registries):
    path = tmp_path / "empty_plugin.py"
    path.write_text('"""Nothing here."""\n')
    code, _, err = invoke(capsys, "check", str(path))
    assert code == 2 and "registers no sampler or task" in err and len(err.strip().splitlines()) == 1


def test_check_of_a_plugin_that_fails_to_import(tmp_path, capsys, restore_registries):
    path = tmp_path / "import_error_plugin.py"
    path.write_text("import no_such_module_for_check\n")
    code, out, err = invoke(capsys, "check", str(path))
    # issue 17: a plugin that fails to import is bad input for every command but list
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "plugin import_error_plugin.py line 1: ModuleNotFoundError" in err
