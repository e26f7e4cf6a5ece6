"""Presets of ``negbench run --preset NAME``: the published configurations, one command each.

A preset only sets defaults: every option given explicitly on the command line wins (an
explicit ``--steps`` or ``--epochs`` replaces the preset's run length), and ``--set`` keys
win over the preset's parameters. The preset's sampler and task parameters apply only when
the sampler or task in use has them (``--preset paper-stl10 --sampler in_batch`` drops
``burn_in``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from negbench.errors import UserError, suggest
from negbench.registry import SAMPLERS, TASKS

EMC2_CODE = "github.com/amazon-science/contrastive_emc2"


@dataclass(frozen=True)
class Preset:
    description: str
    source: str
    options: dict[str, Any]
    sampler_params: dict[str, Any] = field(default_factory=dict)
    task_params: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "paper-stl10": Preset(
        description="EMC² paper (Yau et al., ICML 2024): ResNet-18 on STL-10, Adam, 100 epochs",
        source=f"{EMC2_CODE} README: main_mcmc.py --beta 14.28 --lr 1e-4 --disable_batchnorm --pos_batch_size 32 "
               "--epoch 100 --sampler mcmc --mcmc_burn_in 0.5 (Adam and weight decay 1e-4 are that code's defaults)",
        options={"sampler": "emc2", "task": "stl10", "batch_size": 32, "epochs": 100.0, "optimizer": "adam",
                 "lr": 1e-4, "weight_decay": 1e-4, "beta": 14.28},
        sampler_params={"burn_in": 0.5},
        task_params={"arch": "resnet18", "norm": "none"},
    ),
    "paper-stl10-subset": Preset(
        description="EMC² paper: gradient-norm study on the first 500 STL-10 images with 2 fixed views, batch 4, SGD",
        source=f"{EMC2_CODE} README: main_mcmc.py --beta 5 --lr 1e-3 --disable_batchnorm --pos_batch_size 4 --epoch 10 "
               "--eval_freq 25 --eval_iteration --finite_aug --n_aug 2 --optimizer sgd --mcmc_burn_in 0.5 "
               "(10 epochs of 500/4 steps = 1,250 steps; weight decay 1e-4 is that code's default)",
        options={"sampler": "emc2", "task": "stl10_subset", "batch_size": 4, "steps": 1250, "eval_every": 25,
                 "optimizer": "sgd", "lr": 1e-3, "weight_decay": 1e-4, "beta": 5.0},
        sampler_params={"burn_in": 0.5},
        task_params={"subset_size": 500, "arch": "resnet18", "norm": "none"},
    ),
}

_LENGTH = ("steps", "epochs")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}{suggest(name, PRESETS)}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def _bare_key(pair: str) -> str:
    key = pair.partition("=")[0].strip()
    scope, dot, bare = key.partition(".")
    return bare if dot and scope in ("sampler", "task") else key


def apply_preset(name: str, options: dict[str, Any], given: set[str], set_pairs: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``options`` (the run options, by RunConfig field name) with the preset's values for
    every option not in ``given``; and ``set_pairs`` preceded by the preset's parameters
    (as ``sampler.key=value`` / ``task.key=value``) whose keys the user did not ``--set``."""
    preset = get_preset(name)
    merged = dict(options)
    explicit_length = bool(given & set(_LENGTH))
    for key, value in preset.options.items():
        if key in given or (key in _LENGTH and explicit_length):
            continue
        merged[key] = value
    user_keys = {_bare_key(p) for p in set_pairs}
    sampler_keys = SAMPLERS.get_class(merged["sampler"]).params
    task_keys = TASKS.get_class(merged["task"]).params
    pairs = [f"sampler.{k}={v}" for k, v in preset.sampler_params.items() if k in sampler_keys and k not in user_keys]
    pairs += [f"task.{k}={v}" for k, v in preset.task_params.items() if k in task_keys and k not in user_keys]
    return merged, pairs + list(set_pairs)
