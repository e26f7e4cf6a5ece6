"""The wall against bad input (DESIGN §6, issue 7), for every command: each bad input is one
line on stderr (``negbench: error: ...``, naming the problem), exit code 2, no traceback, and
nothing written. One table of cases, then property-based tests: random option values never
end in a traceback. (Bad data folders of the image tasks: test_image_tasks.py.)"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from clikit import TINY_SYNTHETIC, invoke
from negbench import list_samplers, runner
from negbench.config import RunConfig
from negbench.executors import cores
from negbench.registry import SAMPLERS

RANDOM_AUG_TASK = '''
from negbench.registry import register_task
from negbench.tasks.synthetic import SyntheticTask


@register_task("test_random_aug")
class RandomAug(SyntheticTask):
    description = "synthetic, declared as drawing random augmentations (test only)"
    finite_views = False

    def load(self, **kwargs):
        super().load(**kwargs)
        self.num_views = None
'''


def make_file(tmp: Path) -> None:
    (tmp / "file").write_text("x")


def make_read_only_folder(tmp: Path) -> None:
    (tmp / "locked").mkdir(mode=0o500)


def make_random_aug_plugin(tmp: Path) -> None:
    (tmp / "random_aug.py").write_text(RANDOM_AUG_TASK)


PLUGINS = Path(__file__).parent / "plugins"  # the fixtures of issue 17 (see plugins/README.md)


def plugin(name: str) -> Callable[[Path], None]:
    """A setup that copies the plugin fixture ``name`` into the test's folder."""
    def setup(tmp: Path) -> None:
        (tmp / name).write_text((PLUGINS / name).read_text())

    return setup


def make_empty_folder(tmp: Path) -> None:
    (tmp / "empty").mkdir()


def corrupt_summary(tmp: Path) -> None:
    """The folder of the run of ``CORRUPT_ARGS``, with a summary.json that is not JSON."""
    tiny = dict(pair.split("=") for pair in TINY_SYNTHETIC[3::2])
    prep = runner.prepare(RunConfig(sampler="uniform", task="synthetic", task_params=tiny, batch_size=4, steps=2,
                                    seed=0, out=tmp / "out"))
    prep.run_dir.mkdir(parents=True)
    (prep.run_dir / "summary.json").write_text("{garbage")


CORRUPT_ARGS = [*TINY_SYNTHETIC, "--sampler", "uniform", "--batch-size", "4", "--steps", "2", "--seed", "0"]
NO_CUDA = not torch.cuda.is_available()
CORES = cores()
HAS_DASK = find_spec("distributed") is not None
HAS_SUBMITIT = find_spec("submitit") is not None
ROOT = os.geteuid() == 0  # root ignores permission bits
NO_GPU_FOR_EACH = "--device cuda was asked for but CUDA is not available" if NO_CUDA else "--nproc 2 needs 2 GPUs"


@dataclass
class Case:
    args: list[str]  # "{tmp}" stands for the test's empty folder
    message: str  # a part of the one-line error
    setup: Callable[[Path], None] | None = None  # what exists before the command (not counted as written)
    skip: str | None = None  # why this case cannot be checked on this machine
    default_out: bool = True  # add --out {tmp}/out to run, compare and bench


RUN = [
    Case(["--sampler", "emcc"], "did you mean: emc2"),
    Case(["--task", "digit"], "did you mean: digits"),
    Case(["--batch-size", "0"], "--batch-size must be a positive integer"),
    Case(["--batch-size", "-4"], "--batch-size must be a positive integer"),
    Case(["--batch-size", "abc"], "Invalid value for '--batch-size'"),
    Case([*TINY_SYNTHETIC, "--batch-size", "25"], "larger than the data set (24 items)"),
    Case(["--steps", "0"], "--steps must be a positive integer"),
    Case(["--steps", "5", "--epochs", "1"], "not both"),
    Case(["--epochs", "nan"], "--epochs must be a positive number"),
    Case(["--optimizer", "rmsprop"], "--optimizer must be one of sgd, adam"),
    Case(["--lr", "-1"], "--lr must be a finite number >= 0"),
    Case(["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
    Case(["--momentum", "1"], "--momentum must be in [0, 1)"),
    Case(["--beta", "0"], "--beta must be a finite number > 0"),
    Case(["--seed", "-1"], "--seed must be in [0, 2^32)"),
    Case(["--eval-every", "0"], "--eval-every must be a positive integer"),
    Case(["--tv-steps", "-1"], "--tv-steps must be >= 0"),
    Case(["--tv-anchors", "0"], "--tv-anchors must be a positive integer"),
    Case(["--checkpoint-every", "0"], "--checkpoint-every must be a positive number of steps"),
    Case(["--grad-split", "1"], "--grad-split must be 0 (off) or a number of estimates R >= 2"),
    Case(["--init", "warm"], "--init must be one of random, stationary"),
    Case(["--init-lr", "0"], "--init-lr must be a finite number > 0"),
    Case(["--plugin", "{tmp}/random_aug.py", "--task", "test_random_aug", "--set", "num_items=24", "--batch-size", "4",
          "--sampler", "in_batch", "--grad-split", "2"], "--grad-split needs the exact gradient", make_random_aug_plugin),
    Case(["--device", "tpu"], "--device must be one of auto, cpu, cuda"),
    Case(["--device", "cuda"], "CUDA is not available", skip=None if NO_CUDA else "this machine has CUDA"),
    Case(["--preset", "paper"], "unknown preset 'paper'"),
    Case(["--set", "bogus=1"], "unknown --set key 'bogus'"),
    Case(["--set", "burnin=0.3"], "did you mean: burn_in"),
    Case(["--set", "burn_in=2"], "must be in [0, 0.99]"),
    Case(["--set", "noequals"], "--set expects key=value"),
    Case(["--set", "sampler.bogus=1"], "unknown sampler 'emc2' parameter 'bogus'"),
    Case(["--sampler", "sogclr", "--set", "gamma=0"], "sampler 'sogclr' parameter 'gamma' must be in (0, 1]"),
    Case([*TINY_SYNTHETIC, "--set", "num_items=many"], "task 'synthetic' parameter 'num_items' expects int"),
    Case(["--sampler", "dcl", "--set", "tau_plus=1"], "sampler 'dcl' parameter 'tau_plus' must be in [0, 1)"),
    Case(["--sampler", "hcl", "--set", "tau_plus=-0.1"], "sampler 'hcl' parameter 'tau_plus' must be in [0, 1)"),
    Case(["--sampler", "hcl", "--set", "beta_hard=-1"], "sampler 'hcl' parameter 'beta_hard' must be in [0, inf)"),
    Case(["--sampler", "queue", "--set", "size=0"], "sampler 'queue' parameter 'size' must be in [1, inf)"),
    Case(["--sampler", "queue", "--set", "size=2.5"], "sampler 'queue' parameter 'size' expects int"),
    Case([*TINY_SYNTHETIC, "--batch-size", "4", "--sampler", "queue"], "queue size=4096 is more than 16 epochs of anchors on 24 items"),
    Case([*TINY_SYNTHETIC, "--batch-size", "4", "--max-items", "12", "--sampler", "queue", "--set", "size=400"],
         "use --set size=384 or less"),
    Case(["--plugin", "/nonexistent/plugin.py"], "does not exist"),
    # issue 17, finding 1: a plugin that fails to import is loud, naming the file and the line
    Case(["--plugin", "{tmp}/syntax_err.py"], "plugin syntax_err.py line 9: SyntaxError", plugin("syntax_err.py")),
    Case(["--plugin", "{tmp}/syntax_err.py", "--sampler", "test_syntax"], "plugin syntax_err.py line 9: SyntaxError",
         plugin("syntax_err.py")),
    Case(["--plugin", "{tmp}/raising_import.py"], "plugin raising_import.py line 8: KeyError: 'sacle'",
         plugin("raising_import.py")),
    # finding 7: registering a name that exists names both places
    Case(["--plugin", "{tmp}/duplicate_name.py"], "sampler 'emc2' is already registered by negbench.samplers.emc2",
         plugin("duplicate_name.py")),
    # finding 4: a sampler left without negatives at B = 1
    *[Case([*TINY_SYNTHETIC, "--sampler", name, "--batch-size", "1"], f"sampler {name!r} needs --batch-size >= 2")
      for name in ("in_batch", "uniform", "emc2", "sogclr")],
    Case(["--no-such-option"], "No such option", default_out=False),
    Case(["--plugin", "{tmp}/random_aug.py", "--task", "test_random_aug", "--set", "num_items=24", "--batch-size", "4", "--sampler", "emc2",
          "--set", "chain=view"], "emc2 chain=view needs a finite-view task", make_random_aug_plugin),
    Case(["--plugin", "{tmp}/random_aug.py", "--task", "test_random_aug", "--set", "num_items=24", "--batch-size", "4", "--sampler",
          "neg_cache", "--set", "cache=view"], "neg_cache cache=view needs a finite-view task", make_random_aug_plugin),
    Case(["--plugin", "{tmp}/random_aug.py", "--task", "test_random_aug", "--sampler", "full_softmax"],
         "needs a finite view set", make_random_aug_plugin),
    Case([*TINY_SYNTHETIC, "--out", "{tmp}/file/runs"], "is a file, not a folder", make_file),
    Case([*TINY_SYNTHETIC, "--out", "{tmp}/locked/runs"], "not writable", make_read_only_folder,
         skip="root ignores permission bits" if ROOT else None),
    Case([*CORRUPT_ARGS, "--out", "{tmp}/out"], "summary.json: JSONDecodeError; delete it or the run folder",
         corrupt_summary),
    Case([*TINY_SYNTHETIC, "--batch-size", "4", "--nproc", "0"], "--nproc must be a positive integer"),
    Case([*TINY_SYNTHETIC, "--batch-size", "5", "--nproc", "2"], "--batch-size 5 is not divisible by the 2 processes"),
    Case([*TINY_SYNTHETIC, "--batch-size", "4", "--nproc", "2", "--device", "cuda"], NO_GPU_FOR_EACH,
         skip="two GPUs are visible" if torch.cuda.device_count() >= 2 else None),
]

COMPARE_BASE = [*TINY_SYNTHETIC, "--samplers", "in_batch,emc2", "--batch-sizes", "4", "--seeds", "1", "--steps", "2"]
COMPARE = [
    Case([*COMPARE_BASE, "--samplers", "emc"], "did you mean: emc2"),
    Case([*COMPARE_BASE, "--task", "digitz"], "did you mean: digits"),
    Case([*COMPARE_BASE, "--samplers", ","], "--samplers is empty"),
    Case([*COMPARE_BASE, "--samplers", "in_batch,simclr"], "more than once"),
    Case([*COMPARE_BASE, "--samplers", "emc2,emc2:stale=drop"], "same configuration"),
    Case([*COMPARE_BASE, "--samplers", "emc2:stale=bogus"], "must be one of drop, refresh"),
    Case([*COMPARE_BASE, "--samplers", "emc2:stale"], "expected key=value"),
    Case([*COMPARE_BASE, "--seeds", "many"], "--seeds expects integers"),
    Case([*COMPARE_BASE, "--seeds", "0"], "--seeds must be a positive count"),
    Case([*COMPARE_BASE, "--seeds", "1,1"], "repeats a value"),
    Case([*COMPARE_BASE, "--seeds", "0,4294967296"], "--seeds must be in [0, 2^32)"),
    Case([*COMPARE_BASE, "--batch-sizes", "0,4"], "--batch-sizes must be positive"),
    Case([*COMPARE_BASE, "--batch-sizes", "four"], "--batch-sizes expects integers"),
    Case([*COMPARE_BASE, "--batch-sizes", "4,1000"], "larger than the data set"),
    Case([*COMPARE_BASE, "--sort", "gap"], "is not a metric"),
    Case([*COMPARE_BASE, "--reference", "uniform"], "--reference 'uniform' is not in --samplers"),
    Case([*COMPARE_BASE, "--set", "burn_inn=0.3"], "unknown --set key 'burn_inn'"),
    Case([*COMPARE_BASE, "--set", "burn_in"], "--set expects key=value"),
    Case([*COMPARE_BASE, "--steps", "0"], "--steps must be a positive integer"),
    Case([*COMPARE_BASE, "--checkpoint-every", "0"], "--checkpoint-every must be a positive number of steps"),
    Case([*COMPARE_BASE, "--name", "out"], "in or around the runs folder"),
    Case([*COMPARE_BASE, "--name", ""], "--name is empty"),
    Case(["--plugin", "{tmp}/random_aug.py", "--task", "test_random_aug", "--set", "num_items=24", "--samplers",
          "emc2:chain=view", "--seeds", "1", "--batch-sizes", "4"], "emc2 chain=view needs a finite-view task",
         make_random_aug_plugin),
    Case([*COMPARE_BASE, "--out", "{tmp}/file/runs"], "is a file, not a folder", make_file),
    Case([*COMPARE_BASE, "--jobs", "0"], "--jobs must be between 1 and"),
    Case([*COMPARE_BASE, "--jobs", str(4 * CORES + 1)], f"--jobs must be between 1 and {4 * CORES}"),
    Case([*COMPARE_BASE, "--jobs", "2", "--threads-per-job", "0"], "--threads-per-job must be a positive integer"),
    Case([*COMPARE_BASE, "--backend", "ray"], "--backend must be one of local, dask, submitit"),
    Case([*COMPARE_BASE, "--slurm-partition", "gpu"], "only apply to Slurm; add --backend submitit"),
    Case([*COMPARE_BASE, "--slurm-time", "60", "--backend", "dask"], "only apply to Slurm"),
    Case([*COMPARE_BASE, "--scheduler", "tcp://127.0.0.1:9"], "add --backend dask"),
    Case([*COMPARE_BASE, "--backend", "submitit", "--jobs", "2"], "use --slurm-array-parallelism instead",
         skip=None if HAS_SUBMITIT else "submitit is not installed"),
    Case([*COMPARE_BASE, "--backend", "submitit", "--slurm-time", "2h"], "--slurm-time expects minutes",
         skip=None if HAS_SUBMITIT else "submitit is not installed"),
    Case([*COMPARE_BASE, "--backend", "dask", "--scheduler", "tcp://127.0.0.1:9"], "no Dask scheduler answered",
         skip=None if HAS_DASK else "dask is not installed"),
    Case([*COMPARE_BASE, "--plugin", "{tmp}/syntax_err.py"], "plugin syntax_err.py line 9: SyntaxError",
         plugin("syntax_err.py")),
    Case([*COMPARE_BASE, "--plugin", "{tmp}/duplicate_name.py"], "duplicate_name.py line 7 registers it again",
         plugin("duplicate_name.py")),
    Case([*COMPARE_BASE, "--batch-sizes", "1,4"], "sampler 'in_batch' needs --batch-size >= 2"),
    Case(["{tmp}", "--task", "digits"], "not both"),
    Case(["{tmp}/nothing*"], "no run folder matches"),
    Case(["{tmp}/file"], "is not a folder", make_file),
    Case(["{tmp}/empty"], "none of the given folders holds a readable run", make_empty_folder),
]

RATE_BASE = [*TINY_SYNTHETIC, "--samplers", "in_batch", "--batch-sizes", "4", "--seeds", "1", "--horizons", "8,16",
             "--evals", "2"]
RATE = [
    Case([*RATE_BASE, "--horizons", "400"], "--horizons needs at least two horizons"),
    Case([*RATE_BASE, "--horizons", "0,400"], "--horizons must be positive"),
    Case([*RATE_BASE, "--horizons", "1600,400"], "--horizons must be strictly increasing"),
    Case([*RATE_BASE, "--horizons", "400,400"], "--horizons must be strictly increasing"),
    Case([*RATE_BASE, "--horizons", "4e2,1600"], "--horizons expects integers"),
    Case([*RATE_BASE, "--lr-scale", "0"], "--lr-scale must be a finite number > 0"),
    Case([*RATE_BASE, "--lr-scale", "-3"], "--lr-scale must be a finite number > 0"),
    Case([*RATE_BASE, "--step-size", "linear"], "--step-size must be one of sqrt, constant"),
    Case([*RATE_BASE, "--evals", "1"], "--evals must be at least 2"),
    Case([*RATE_BASE, "--evals", "9"], "--evals 9 is more than the smallest horizon (8 steps)"),
    Case([*RATE_BASE, "--grad-split", "1"], "--grad-split must be 0 (off) or a number of estimates R >= 2"),
    Case([*RATE_BASE, "--init", "warm"], "--init must be one of random, stationary"),
    Case([*RATE_BASE, "--init-steps", "0"], "--init-steps must be a positive integer"),
    Case([*RATE_BASE, "--threads", "0"], "--threads must be a positive integer"),
    Case([*RATE_BASE, "--samplers", "emc2:stale"], "expected key=value"),
    Case([*RATE_BASE, "--samplers", "emc2:burn_in=2"], "must be in [0, 0.99]"),
    Case([*RATE_BASE, "--samplers", "emcc"], "did you mean: emc2"),
    Case(["--plugin", "{tmp}/random_aug.py", "--task", "test_random_aug", "--horizons", "8,16", "--evals", "2"],
         "negbench rate needs the exact gradient", make_random_aug_plugin),
]

BENCH = [
    Case(["--batch-sizes", "0"], "positive integers"),
    Case(["--batch-sizes", "32,x"], "positive integers"),
    Case(["--num-items", "100", "--batch-sizes", "64"], "needs at least 128 items"),
    Case(["--samplers", "emcc"], "did you mean: emc2"),
    Case(["--workloads", "resnet50"], "unknown workload"),
    Case(["--part", "everything"], "--part must be one of"),
    Case(["--repeats", "0"], "--repeats must be a positive integer"),
    Case(["--warmup", "-1"], "--warmup must be >= 0"),
    Case(["--dim", "0"], "--dim must be a positive integer"),
    Case(["--step-batch-size", "0"], "--step-batch-size must be a positive integer"),
    Case(["--part", "step", "--workloads", "digits-mlp", "--step-batch-size", "5000"],
         "--step-batch-size 5000 is larger than digits-mlp's 1797 items"),
    Case(["--device", "tpu"], "--device must be one of"),
    Case(["--threads", "0"], "--threads must be a positive integer"),
    Case(["--out", "{tmp}/file/bench"], "is a file, not a folder", make_file),
    Case(["--plugin", "{tmp}/syntax_err.py"], "plugin syntax_err.py line 9: SyntaxError", plugin("syntax_err.py")),
]

LIST = [
    Case(["widgets"], "takes samplers, tasks, metrics or all"),
    Case(["--plugin", "{tmp}/missing.py"], "does not exist"),
]

CASES = [(command, case) for command, cases in (("run", RUN), ("compare", COMPARE), ("rate", RATE), ("bench", BENCH),
                                                ("list", LIST))
         for case in cases]


def tree(folder: Path) -> dict[str, int]:
    """Every path under ``folder`` with its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(autouse=True)
def _forget_plugins(restore_registries):
    """The plugin fixtures' registrations and import errors are forgotten after each test."""


@pytest.mark.parametrize(("command", "case"), CASES, ids=[f"{c} {' '.join(case.args)}" for c, case in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(command, case, tmp_path, capsys):
    if case.skip:
        pytest.skip(case.skip)
    if case.setup:
        case.setup(tmp_path)
    before = tree(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in case.args]
    if command in ("run", "compare", "rate", "bench") and case.default_out and "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    code, stdout, err = invoke(capsys, command, *args)
    assert code == 2, (code, err)
    assert err.startswith("negbench: error:") and err.count("\n") == 1, err
    assert case.message in err, err
    assert "Traceback" not in err and stdout == ""
    assert tree(tmp_path) == before  # nothing written, not even an empty folder


def test_there_are_at_least_30_distinct_bad_inputs():
    assert len({(c, tuple(case.args)) for c, case in CASES}) >= 30
    assert {c for c, _ in CASES} == {"run", "compare", "rate", "bench", "list"}


def test_a_broken_plugin_stays_listed_with_its_error(tmp_path, capsys, monkeypatch):
    """`negbench list` is where a broken plugin is diagnosed: it is shown, not an error."""
    monkeypatch.setenv("COLUMNS", "300")
    plugin("syntax_err.py")(tmp_path)
    code, out, _ = invoke(capsys, "list", "samplers", "--plugin", str(tmp_path / "syntax_err.py"))
    assert code == 0 and "syntax_err.py" in out and "SyntaxError" in out and "emc2" in out
    SAMPLERS.failures.pop("syntax_err.py", None)


def test_a_huge_set_value_is_not_echoed_in_full(tmp_path, capsys):
    """Finding 8: a 100 KB --set value was echoed whole in the one-line error."""
    code, _, err = invoke(capsys, "run", "--set", "burn_in=" + "9" * 100_000, "--out", str(tmp_path / "out"))
    assert code == 2 and err.count("\n") == 1 and "burn_in" in err, err[:300]
    assert len(err) < 400 and "characters)" in err, err[:400]


def test_a_validation_error_does_not_import_torch_first():
    """Finding 8: a one-line validation error took seconds because torch was imported before
    the options were checked (a subprocess: this one has torch loaded already)."""
    import subprocess
    import sys

    code = ("import sys\nfrom negbench.cli import main\ntry:\n    main(['run', '--batch-size', '0'])\n"
            "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["2", "False"], (out.stdout, out.stderr)


def test_debug_shows_the_traceback_instead(tmp_path):
    from negbench.cli import main
    from negbench.errors import UserError

    with pytest.raises(UserError, match="--batch-size must be a positive integer"):
        main(["run", "--batch-size", "0", "--out", str(tmp_path / "out"), "--debug"])
    assert not (tmp_path / "out").exists()


# ---- property-based: random option values never end in a traceback -------------------------------------

#: option: (values that are fine on the tiny task, values that may be bad); None = not given.
#: Every valid draw trains at most 2 steps of the tiny synthetic task.
RUN_OPTIONS = {
    "--sampler": (list_samplers(), ["simclr", "emcc", ""]),
    "--batch-size": (["1", "4", "12"], ["24", "25", "0", "-3", "x"]),
    "--steps": (["1", "2"], ["0", "-1", "y"]),
    "--epochs": ([None], ["0.05", "0", "-1", "nan", "inf"]),  # drawn alone, or with --steps when both doubtful
    "--tv-steps": (["0", "1", "2"], ["-1"]),
    "--optimizer": ([None, "sgd", "adam"], ["rmsprop"]),
    "--lr": ([None, "0", "0.1"], ["1e30", "-1", "inf", "nan"]),
    "--momentum": ([None, "0.5"], ["1", "-0.1"]),
    "--weight-decay": ([None, "0.01"], ["-1", "nan"]),
    "--beta": ([None, "0.1", "5"], ["100", "0", "-1", "inf"]),
    "--seed": ([None, "0", "7"], ["-1", "4294967296"]),
    "--eval-every": ([None, "1"], ["0", "3"]),
    "--tv-anchors": ([None, "1"], ["30", "0"]),
    "--checkpoint-every": ([None, "1"], ["0"]),
    "--max-items": ([None, "12"], ["1", "2", "1000"]),
    "--device": ([None, "cpu"], ["tpu"]),
}
BAD_SET_VALUES = ["0", "1", "-1", "1e9", "x", "nan", "item", "view", "true", ""]


@st.composite
def run_options(draw) -> list[str]:
    """Options of ``negbench run`` on the tiny synthetic task: up to two of them (and maybe a
    ``--set``) drawn from their doubtful values, the others from fine ones — so that about
    half the draws train and the other half probe the validation."""
    doubtful = draw(st.sets(st.sampled_from([*RUN_OPTIONS, "--set"]), max_size=2))
    args = [*TINY_SYNTHETIC, "--quiet"]
    for flag, (fine, bad) in RUN_OPTIONS.items():
        value = draw(st.sampled_from(bad if flag in doubtful else fine))
        if flag == "--steps" and "--epochs" in doubtful and flag not in doubtful:
            continue
        if value is not None:
            args += [flag, value]
    sampler = args[args.index("--sampler") + 1]
    params = SAMPLERS.get_class(sampler).params if sampler in list_samplers() else {}
    for _ in range(draw(st.integers(0, 2))):
        if "--set" in doubtful or not params:
            key = draw(st.sampled_from([*params, "bogus", "num_items", "clusters", "sampler.k", "task.dim"]))
            value = draw(st.sampled_from(BAD_SET_VALUES))
        else:  # a parameter of the sampler at its default or one of its choices
            key = draw(st.sampled_from(sorted(params)))
            value = draw(st.sampled_from([str(params[key].default), *(params[key].choices or ())]))
        args += ["--set", f"{key}={value}"]
    if draw(st.booleans()):
        args.append("--grad-error")
    return args


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=run_options())
def test_random_run_options_never_end_in_a_traceback(options, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("run") / "out"
    code, _, err = invoke(capsys, "run", *options, "--out", str(out))  # an exception here fails the test
    event(f"exit code {code}")  # --hypothesis-show-statistics: how many draws were valid
    assert code in (0, 2, 3, 130), (code, err)  # 3: diverged (e.g. --lr 1e30); never 1: a built-in never fails
    assert "Traceback" not in err
    if code == 2:  # bad input: one line, and nothing written
        assert err.startswith("negbench: error:") and err.count("\n") == 1, err
        assert not out.exists()


COMPARE_OPTIONS = {
    "--samplers": (["in_batch", "in_batch,emc2", "emc2:stale=refresh", "all", "simclr,uniform"],
                   [",", "emc2:stale", "bogus", "emc2:burn_in=2", "in_batch,simclr", "emc2,emc2:stale=drop"]),
    "--batch-sizes": (["4", "4,8"], ["0", "x", "4,4", "100", ""]),
    "--seeds": (["1", "2", "0,3", "5,"], ["0", "-1", "a", "1,1", "0,4294967296"]),
    "--sort": ([None, "gcl", "lp_acc"], ["gap", ""]),
    "--reference": ([None], ["in_batch", "uniform", "emc2:stale=refresh", "x"]),
    "--name": ([None, "cmp"], ["", "out", "."]),
    "--set": ([None, "burn_in=0.3", "num_items=30"], ["bogus=1", "x", "burn_in=-1", "num_items=2"]),
}


@st.composite
def compare_options(draw) -> list[str]:
    """``negbench compare --collect`` options (grid parsing and validation; trains nothing),
    up to two of them doubtful."""
    doubtful = draw(st.sets(st.sampled_from(list(COMPARE_OPTIONS)), max_size=2))
    args = [*TINY_SYNTHETIC, "--collect", "--steps", "2"]
    for flag, (fine, bad) in COMPARE_OPTIONS.items():
        value = draw(st.sampled_from(bad if flag in doubtful else fine))
        if value is not None:
            args += [flag, value]
    return args


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=compare_options())
def test_random_compare_options_never_end_in_a_traceback(options, tmp_path_factory, capsys, monkeypatch):
    from negbench import plots

    monkeypatch.setattr(plots, "make_plots", lambda *args, **kwargs: {})
    root = tmp_path_factory.mktemp("compare")
    code, _, err = invoke(capsys, "compare", *options, "--out", str(root / "out"))
    event(f"exit code {code}")
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("negbench: error:") and err.count("\n") == 1, err
        assert list(root.iterdir()) == []
