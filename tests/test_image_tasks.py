"""The image tasks on tiny files in the exact on-disk formats: STL-10's binary layout read
the right way round, the cached finite-view subset, the ImageNet-100 class restriction,
seeded augmentation and prefetching, two-step CLI runs, presets and bad data roots."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clikit import invoke
from imagekit import TINY_RESNET, write_imagefolder, write_stl10
from negbench.errors import UserError
from negbench.images import prefetch_views, simclr_augmentation, view_seeds
from negbench.registry import get_task



TINY = {"image_size": 16, "width": 2, "stem": "small", "mlp_dim": 8, "dim": 4, "workers": 0}


@pytest.fixture(scope="module")
def stl(tmp_path_factory):
    return write_stl10(tmp_path_factory.mktemp("stl"))


def rows_of(out):
    (run_dir,) = [d for d in out.iterdir() if d.is_dir()]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return run_dir, rows


# ---- STL-10 -------------------------------------------------------------------------------
def test_stl10_reads_every_split_the_right_way_round(stl):
    task = get_task("stl10", **{**TINY, "image_size": 96})
    task.load(seed=0, data_root=stl.root)
    assert task.num_items == len(stl.unlabeled) and task.num_views is None and not task.finite_views
    data = task.eval_data()
    assert data.train_x.dtype == torch.uint8
    # the known pixel: (row 3, col 70) is pure red, (row 70, col 3) black
    assert data.train_x[0, :, 3, 70].tolist() == [255, 0, 0] and data.train_x[0, :, 70, 3].tolist() == [0, 0, 0]
    assert torch.equal(data.train_x, torch.from_numpy(stl.train))
    assert torch.equal(data.test_x, torch.from_numpy(stl.test))
    assert data.train_y.tolist() == stl.train_labels.tolist() and data.test_y.tolist() == stl.test_labels.tolist()
    for i in (0, len(stl.unlabeled) - 1):
        pixels = np.asarray(task.image(i))  # (row, col, channel)
        assert pixels[3, 70].tolist() == [255, 0, 0]
        assert np.array_equal(pixels, stl.unlabeled[i].transpose(1, 2, 0))


def test_stl10_views_are_fresh_seeded_and_sized(stl):
    task = get_task("stl10", **TINY)
    task.load(seed=0, data_root=stl.root)
    items, views = torch.tensor([0, 0, 5]), torch.full((3,), -1)
    x = task.inputs(items, views, torch.Generator().manual_seed(1))
    assert x.shape == (3, 3, 16, 16) and x.dtype == torch.uint8
    assert not torch.equal(x[0], x[1])  # two fresh augmentations of one image
    assert torch.equal(x, task.inputs(items, views, torch.Generator().manual_seed(1)))
    state = torch.get_rng_state()
    task.inputs(items, views, torch.Generator().manual_seed(2))
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    assert task.eval_data().train_x.shape == (len(stl.train), 3, 16, 16)


def test_prefetch_is_the_same_with_and_without_workers(stl):
    task = get_task("stl10", **TINY)
    task.load(seed=0, data_root=stl.root)
    batches = [(1, torch.tensor([3, 1])), (2, torch.tensor([0, 7])), (3, torch.tensor([2, 2]))]
    runs = [list(prefetch_views(task.views(), iter(batches), seed=9, workers=w, pin_memory=False)) for w in (0, 2)]
    for (items_a, x_a), (items_b, x_b), (_, items) in zip(*runs, batches):
        assert torch.equal(items_a, items) and torch.equal(items_b, items)
        assert x_a.shape == (4, 3, 16, 16) and torch.equal(x_a, x_b)
    # view v of batch item k is anchor 2k+v, seeded by view_seeds(seed, step)
    seeds = view_seeds(9, 2, 4)
    assert torch.equal(runs[0][1][1][3], task.views()[(7, seeds[3])])
    assert view_seeds(9, 2, 4) == seeds and view_seeds(9, 3, 4) != seeds


def test_stl10_subset_views_are_cached_and_deterministic(tmp_path, monkeypatch):
    stl = write_stl10(tmp_path)
    task = get_task("stl10_subset", **TINY, subset_size=5)
    task.load(seed=3, data_root=stl.root)
    views = task.all_views()
    assert task.finite_views and task.num_items == 5 and task.num_views == 2
    assert views.shape == (5, 2, 3, 16, 16) and views.dtype == torch.uint8
    assert not torch.equal(views[:, 0], views[:, 1])
    cache = stl.root / "negbench_cache"
    assert [p.name for p in cache.iterdir()] == ["stl10_subset-v1-n5-px16-seed3.pt"]  # no temporary left
    assert task.describe()["num_views"] == 2 and task.norm == "none"

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cache was not used")

    again = get_task("stl10_subset", **TINY, subset_size=5)
    with monkeypatch.context() as m:
        m.setattr("negbench.tasks.stl10_subset.build_views", no_rebuild)
        again.load(seed=3, data_root=stl.root)
    assert torch.equal(again.all_views(), views)
    from negbench.tasks.stl10_subset import build_views

    assert torch.equal(build_views(stl.unlabeled, 5, 16, 3), views)  # rebuilt: the same
    monkeypatch.setattr("negbench.images.PARALLEL_REQUEST", 4)
    assert torch.equal(build_views(stl.unlabeled, 5, 16, 3, workers=2), views)  # in worker processes: the same
    other = get_task("stl10_subset", **TINY, subset_size=5)
    other.load(seed=4, data_root=stl.root)
    assert not torch.equal(other.all_views(), views)


def test_stl10_subset_takes_the_first_images(stl, monkeypatch, tmp_path):
    """With the augmentation replaced by the identity the views are the first N images."""
    from torchvision.transforms import v2

    root = tmp_path / "copy"
    write_stl10(root)
    monkeypatch.setattr("negbench.tasks.stl10_subset.simclr_augmentation", lambda size: v2.PILToTensor())
    task = get_task("stl10_subset", **{**TINY, "image_size": 96}, subset_size=4)
    task.load(seed=0, data_root=root)
    first = torch.from_numpy(write_stl10(tmp_path / "again").unlabeled[:4])
    assert torch.equal(task.all_views()[:, 0], first) and torch.equal(task.all_views()[:, 1], first)
    with pytest.raises(UserError, match="needs 50 unlabeled images"):
        get_task("stl10_subset", **TINY, subset_size=50).load(seed=0, data_root=root)


# ---- ImageNet-100 --------------------------------------------------------------------------
def test_imagenet100_keeps_only_the_listed_classes_in_list_order(tmp_path):
    from negbench.tasks.imagenet100 import class_list

    wanted = class_list()
    assert len(wanted) == 100 and len(set(wanted)) == 100 and wanted[0] == "n02869837"
    chosen = {wanted[7]: 3, wanted[2]: 2, wanted[60]: 2, "n99999999": 4}  # the last one is not listed
    write_imagefolder(tmp_path, chosen)
    task = get_task("imagenet100", **TINY)
    with pytest.warns(UserWarning, match="97 of the 100 classes are missing"):
        task.load(seed=0, data_root=tmp_path)
    assert task.num_items == 7
    for path, label in task._train.samples:
        assert "n99999999" not in path and f"/{wanted[label]}/" in path
    data = task.eval_data()
    assert sorted(set(data.train_y.tolist())) == [2, 7, 60] and sorted(set(data.test_y.tolist())) == [2, 7, 60]
    assert data.train_x.shape == (7, 3, 16, 16) and len(data.test_y) == 7
    first = data.train_x[0:3]
    assert first.shape == (3, 3, 16, 16) and first.dtype == torch.uint8
    assert torch.equal(first, data.train_x[0:3])  # clean views are deterministic
    x = task.inputs(torch.tensor([0, 6]), torch.full((2,), -1), torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16)
    assert task.describe()["classes_found"] == {"train": 3, "val": 3}
    capped = get_task("imagenet100", **TINY, max_eval_items=4)
    with pytest.warns(UserWarning):
        capped.load(seed=0, data_root=tmp_path)
    assert len(capped.eval_data().train_y) == 4 and capped.eval_data().train_x[0:4].shape[0] == 4


# ---- bad data roots ----------------------------------------------------------------------
def _corrupt(root, name, data):
    (root / "stl10_binary" / name).write_bytes(data)


STL_PROBLEMS = [
    ("missing", lambda root: (root / "stl10_binary" / "train_y.bin").unlink(), "train_y.bin is missing"),
    ("truncated", lambda root: _corrupt(root, "test_X.bin", b"\0" * 1000), "not a whole number of 27648-byte images"),
    ("labels", lambda root: _corrupt(root, "train_y.bin", b"\1\2\3"), "holds 3 labels for 10 images"),
    ("range", lambda root: _corrupt(root, "test_y.bin", bytes([11] * 10)), "labels outside 1-10"),
]


@pytest.mark.parametrize("name,damage,message", STL_PROBLEMS, ids=[p[0] for p in STL_PROBLEMS])
def test_malformed_stl10_is_a_clear_error(tmp_path, name, damage, message):
    write_stl10(tmp_path)
    damage(tmp_path)
    with pytest.raises(UserError, match=message) as info:
        get_task("stl10", **TINY).load(seed=0, data_root=tmp_path)
    assert "stl10_binary" in str(info.value) and "--download" in str(info.value)


@pytest.mark.parametrize("task", ["stl10", "stl10_subset", "imagenet100"])
def test_missing_data_root_exits_2_with_one_line(tmp_path, capsys, task):
    out = tmp_path / "out"
    for root in ([], ["--data-root", str(tmp_path / "nowhere")]):
        code, _, err = invoke(capsys, "run", "--task", task, *root, "--out", str(out))
        assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0, err
        assert "data not usable" in err and ("stl10_binary/" in err or "train/<wnid>/" in err), err
    assert not out.exists()


def test_imagenet100_without_listed_classes_is_a_clear_error(tmp_path, capsys):
    write_imagefolder(tmp_path, {"n99999999": 2})
    code, _, err = invoke(capsys, "run", "--task", "imagenet100", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "none of the 100 listed class folders" in err and err.strip().count("\n") == 0


# ---- two-step runs through the CLI ---------------------------------------------------------
@pytest.mark.parametrize("sampler", ["in_batch", "emc2"])
def test_stl10_two_step_run(stl, tmp_path, capsys, sampler):
    out = tmp_path / "runs"
    code, _, err = invoke(capsys, "run", "--task", "stl10", "--data-root", str(stl.root), *TINY_RESNET,
                          "--sampler", sampler, "--batch-size", "2", "--steps", "2", "--eval-every", "1",
                          "--seed", "0", "--max-items", "8", "--out", str(out), "--quiet")
    assert code == 0, err
    run_dir, rows = rows_of(out)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_items"] == 8 and config["max_items"] == 8 and config["finite_views"] is False
    assert config["task_info"]["probe_split"].startswith("STL-10 train (8 images) -> test (8 images)")
    assert [r["step"] for r in rows] == [0, 1, 2]
    last = rows[-1]
    for key in ("loss", "alignment", "uniformity", "lp_acc", "knn1_acc", "knn10_acc"):
        assert isinstance(last[key], float), key
    for key in ("gcl", "grad_norm_sq", "sampling_tv"):
        assert last[key] is None, key  # not computable with random augmentations
    if sampler == "emc2":
        assert last["accept_rate"] is not None and last["state_bytes"] == 8 * 12


def test_stl10_runs_reproduce_whatever_the_workers(stl, tmp_path, capsys):
    losses = []
    for workers in ("0", "1"):
        out = tmp_path / workers
        code, _, err = invoke(capsys, "run", "--task", "stl10", "--data-root", str(stl.root), *TINY_RESNET,
                              "--set", f"workers={workers}", "--sampler", "in_batch", "--batch-size", "2",
                              "--steps", "3", "--eval-every", "3", "--seed", "5", "--out", str(out), "--quiet")
        assert code == 0, err
        losses.append([(r["loss"], r["alignment"], r["lp_acc"]) for r in rows_of(out)[1]])
    assert losses[0] == losses[1]


def test_stl10_subset_two_step_run_has_exact_metrics(stl, tmp_path, capsys):
    out = tmp_path / "runs"
    code, _, err = invoke(capsys, "run", "--task", "stl10_subset", "--data-root", str(stl.root), *TINY_RESNET,
                          "--set", "subset_size=6", "--sampler", "emc2", "--batch-size", "2", "--steps", "2",
                          "--eval-every", "2", "--tv-steps", "2", "--seed", "0", "--out", str(out), "--quiet")
    assert code == 0, err
    _, rows = rows_of(out)
    last = rows[-1]
    for key in ("gcl", "grad_norm_sq", "sampling_tv", "sampling_tv_floor", "lp_acc", "knn1_acc", "alignment"):
        assert isinstance(last[key], float), key
    assert last["state_bytes"] == 6 * 2 * 12  # one chain per view


def test_imagenet100_two_step_run(tmp_path, capsys):
    from negbench.tasks.imagenet100 import class_list

    wanted = class_list()
    write_imagefolder(tmp_path / "data", {wanted[0]: 3, wanted[1]: 3, "n99999999": 2})
    out = tmp_path / "runs"
    with pytest.warns(UserWarning):
        code, _, err = invoke(capsys, "run", "--task", "imagenet100", "--data-root", str(tmp_path / "data"),
                              *TINY_RESNET, "--set", "arch=resnet18", "--set", "head_hidden=8", "--sampler", "emc2",
                              "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--seed", "0",
                              "--out", str(out), "--quiet")
    assert code == 0, err
    run_dir, rows = rows_of(out)
    assert json.loads((run_dir / "config.json").read_text())["num_items"] == 6
    assert isinstance(rows[-1]["lp_acc"], float) and isinstance(rows[-1]["knn10_acc"], float)


# ---- presets and --max-items ---------------------------------------------------------------
def test_preset_sets_defaults_that_explicit_options_override(stl, tmp_path, capsys):
    out = tmp_path / "runs"
    code, _, err = invoke(capsys, "run", "--preset", "paper-stl10-subset", "--data-root", str(stl.root), *TINY_RESNET,
                          "--set", "subset_size=6", "--batch-size", "2", "--steps", "2", "--tv-steps", "0",
                          "--seed", "0", "--out", str(out), "--quiet")
    assert code == 0, err
    run_dir, rows = rows_of(out)
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["task"], config["sampler"], config["optimizer"]) == ("stl10_subset", "emc2", "sgd")
    assert (config["lr"], config["beta"], config["weight_decay"]) == (1e-3, 5.0, 1e-4)
    assert (config["batch_size"], config["steps"], config["eval_every"]) == (2, 2, 2)  # explicit, and min(25, steps)
    assert config["task_params"]["norm"] == "none" and config["task_params"]["subset_size"] == 6
    assert config["sampler_params"]["burn_in"] == 0.5 and config["options"]["preset"] == "paper-stl10-subset"


def test_apply_preset_rules():
    from negbench.presets import apply_preset

    base = {"sampler": "emc2", "task": "digits", "batch_size": 32, "steps": None, "epochs": None, "lr": None}
    options, pairs = apply_preset("paper-stl10", base, set(), [])
    assert options["task"] == "stl10" and options["epochs"] == 100.0 and options["lr"] == 1e-4
    assert "sampler.burn_in=0.5" in pairs and "task.norm=none" in pairs
    # an explicit length replaces the preset's; a --set key wins; parameters the sampler lacks are dropped
    options, pairs = apply_preset("paper-stl10", {**base, "steps": 10, "sampler": "in_batch"}, {"steps", "sampler"},
                                  ["norm=group"])
    assert options["steps"] == 10 and options["epochs"] is None and options["sampler"] == "in_batch"
    assert pairs == ["task.arch=resnet18", "norm=group"]
    with pytest.raises(UserError, match="did you mean: paper-stl10"):
        apply_preset("paper-stl1O", base, set(), [])


def test_max_items_subsamples_any_task(tmp_path, capsys):
    code, _, err = invoke(capsys, "run", "--task", "digits", "--set", "hidden=16", "--set", "dim=8", "--max-items", "30",
                          "--batch-size", "4", "--steps", "2", "--tv-steps", "2", "--seed", "0", "--out", str(tmp_path),
                          "--quiet")
    assert code == 0, err
    run_dir, rows = rows_of(tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_items"] == 30 and config["options"]["max_items"] == 30
    assert rows[-1]["state_bytes"] == 30 * 2 * 12 and isinstance(rows[-1]["gcl"], float)
    code, _, err = invoke(capsys, "run", "--max-items", "1", "--out", str(tmp_path / "x"))
    assert code == 2 and "--max-items must be an integer >= 2" in err


def test_subsample_caps_probe_splits_with_a_fixed_subset():
    task = get_task("digits", hidden=16, dim=8)
    task.load(seed=0)
    full = task.eval_data()
    task.subsample(50)
    capped = task.eval_data()
    assert task.num_items == 50 and task.all_views().shape[0] == 50
    assert len(capped.train_y) == 50 and len(capped.test_y) == 50
    again = get_task("digits", hidden=16, dim=8)
    again.load(seed=1)  # another seed: the same probe items
    again.subsample(50)
    assert torch.equal(again.eval_data().test_x, capped.test_x)
    rows = {tuple(r.tolist()) for r in full.test_x}
    assert all(tuple(r.tolist()) in rows for r in capped.test_x)


def test_augmentation_is_simclr():
    from torchvision.transforms import v2

    steps = simclr_augmentation(96).transforms
    assert isinstance(steps[0], v2.RandomResizedCrop) and steps[0].size == (96, 96)
    jitter = steps[2]
    assert isinstance(jitter, v2.RandomApply) and jitter.p == 0.8
    assert jitter.transforms[0].brightness == (pytest.approx(0.2), pytest.approx(1.8))
    assert jitter.transforms[0].hue == (pytest.approx(-0.2), pytest.approx(0.2))
    assert isinstance(steps[3], v2.RandomGrayscale) and steps[3].p == 0.2
    assert isinstance(steps[-1], v2.PILToTensor)


def test_every_preset_is_documented_with_its_values():
    from pathlib import Path

    from negbench.presets import PRESETS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()

    def spellings(value):
        if isinstance(value, str):
            return {value}
        forms = {repr(value), f"{value:g}", f"{value:.0e}".replace("e-0", "e-")}
        return forms | ({str(int(value))} if float(value).is_integer() else set())

    for name, preset in PRESETS.items():
        (row,) = [line for line in readme.splitlines() if line.startswith(f"| `{name}` |")]
        for key, value in preset.options.items():
            flag = "--" + key.replace("_", "-")
            assert any(f"{flag} {form}" in row for form in spellings(value)), (name, flag, value)
        for key, value in {**preset.sampler_params, **preset.task_params}.items():
            assert any(f"{key}={form}" in row for form in spellings(value)), (name, key, value)
