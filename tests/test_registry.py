"""The registries: aliases, suggestions, plugins by file and entry point, broken plugins."""

from __future__ import annotations

import textwrap
from importlib.metadata import EntryPoint

import pytest

import negbench
from negbench.errors import UserError
from negbench.registry import SAMPLERS, Registry
from clikit import invoke

PLUGIN = textwrap.dedent('''
    """A plugin sampler: the README's example."""
    from negbench import Sampler, register_sampler
    from negbench.params import Param

    @register_sampler("plugin_uniform_{tag}")
    class PluginUniform(Sampler):
        description = "Uniform weights, from a plugin."
        params = {{"scale": Param(1.0, "unused", low=0.0)}}

        def weigh(self, sims, batch):
            valid = batch.in_batch_valid.to(sims.dtype)
            weights = sims.new_zeros(sims.shape)
            weights[:, : batch.num_anchors] = valid / valid.sum(1, keepdim=True).clamp_min(1)
            return weights
''')


def test_get_sampler_by_name_and_alias():
    assert negbench.get_sampler("simclr").name == "in_batch"
    assert negbench.get_sampler("emc2", burn_in=0.25).burn_in == 0.25
    with pytest.raises(UserError, match="did you mean: uniform"):
        negbench.get_sampler("unifrom")
    with pytest.raises(UserError, match="must be in"):
        negbench.get_sampler("emc2", burn_in=1.5)
    assert "digits" in negbench.list_tasks() and "emc2" in negbench.list_samplers()


def test_plugin_file_registers_a_sampler_and_lists_it(tmp_path, capsys):
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN.format(tag="a"))
    code, out, _ = invoke(capsys, "list", "samplers", "--plugin", str(path))
    assert code == 0 and "plugin_uniform_a" in out
    code, _, err = invoke(capsys, "run", "--sampler", "plugin_uniform_a", "--task", "synthetic", "--set",
                          "num_items=16", "--batch-size", "4", "--steps", "2", "--tv-steps", "2",
                          "--out", str(tmp_path / "o"), "--plugin", str(path), "--quiet")
    assert code == 0, err


def test_broken_plugin_is_listed_and_breaks_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    path = tmp_path / "broken_plugin.py"
    path.write_text("import no_such_module_xyz\n")
    code, out, _ = invoke(capsys, "list", "samplers", "--plugin", str(path))
    assert code == 0
    assert "broken_plugin.py" in out and "No module named" in out and "emc2" in out
    assert negbench.get_sampler("uniform").name == "uniform"
    SAMPLERS.failures.pop("broken_plugin.py", None)


def test_entry_points_are_loaded_and_failures_recorded(monkeypatch, tmp_path):
    module = tmp_path / "ep_plugin_mod.py"
    module.write_text(PLUGIN.format(tag="ep").replace('@register_sampler("plugin_uniform_ep")\n', ""))
    monkeypatch.syspath_prepend(str(tmp_path))
    good = EntryPoint(name="ep_uniform", value="ep_plugin_mod:PluginUniform", group="negbench.samplers")
    bad = EntryPoint(name="ep_broken", value="no_such_module_abc:Thing", group="negbench.samplers")
    monkeypatch.setattr("negbench.registry.entry_points", lambda group: [good, bad])
    registry = Registry("sampler", "negbench.samplers", "negbench.samplers")
    registry.discover()
    assert "ep_uniform" in registry.names()
    assert "ep_broken" in registry.failures
    with pytest.raises(UserError, match="failed to import"):
        registry.get_class("ep_broken")
