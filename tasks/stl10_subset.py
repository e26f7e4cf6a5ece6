"""``stl10_subset``: the first ``subset_size`` (500) ``unlabeled`` STL-10 images with 2 fixed
SimCLR augmentations each — the EMC² paper's gradient-norm study (batch 4, SGD, β = 5).
Finite views, so every exact metric (``gcl``, ``grad_norm_sq``, ``sampling_tv``) applies.

The views are computed once per (subset_size, image_size, data seed) — view v of image i
from seeds :func:`view_seeds` ``(seed, i)`` — and cached, written atomically, under
``DIR/negbench_cache/`` next to the data; later runs read the cache. The probe is the STL-10
``train`` → ``test`` split, as in ``stl10``. BatchNorm is off by default (``norm=none``, as in
the paper): exact metrics need each embedding to be a function of its own image, which
batch statistics are not.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from negbench import FiniteViewTask, Param, register_task, UserError
from negbench.images import augment, describe_transform, AugmentedViews, RESNET_TEST_PARAMS, ResNetTask, simclr_augmentation, view_seeds
from negbench.results import atomic_torch_save
from negbench.tasks.stl10 import STL10_PARAMS, check_layout, open_stl10, probe_data, to_pil

VIEWS = 2
CACHE_FOLDER = "negbench_cache"
#: bump when the augmentation changes, so old caches are not reused
CACHE_VERSION = 1


def cache_path(root: Path, subset_size: int, image_size: int, seed: int) -> Path:
    return Path(root) / CACHE_FOLDER / f"stl10_subset-v{CACHE_VERSION}-n{subset_size}-px{image_size}-seed{seed}.pt"


def build_views(unlabeled: Any, subset_size: int, image_size: int, seed: int, workers: int = 0) -> torch.Tensor:
    """(subset_size, 2, 3, S, S) uint8: view v of image i augmented with seed
    ``view_seeds(seed, i, 2)[v]`` (the same with any number of ``workers``)."""
    dataset = AugmentedViews(lambda i: to_pil(unlabeled[i]), simclr_augmentation(image_size))
    keys = [(i, s) for i in range(subset_size) for s in view_seeds(seed, i, VIEWS)]
    views = augment(dataset, keys, workers)
    return views.reshape(subset_size, VIEWS, *views.shape[1:])


def read_cache(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached views, or None when absent or not of the expected shape and dtype."""
    if not path.is_file():
        return None
    try:
        views = torch.load(path, weights_only=True)["views"]
    except Exception:
        return None
    if tuple(views.shape) != shape or views.dtype != torch.uint8:
        return None
    return views


@register_task("stl10_subset")
class STL10SubsetTask(FiniteViewTask, ResNetTask):
    description = "First 500 unlabeled STL-10 images (--data-root), 2 cached SimCLR views each; ResNet-18, no BatchNorm."
    params = {
        "subset_size": Param(500, "number of unlabeled images N (the first N)", low=2),
        **{**STL10_PARAMS, "norm": Param("none", STL10_PARAMS["norm"].help, choices=STL10_PARAMS["norm"].choices)},
    }
    test_params = {**RESNET_TEST_PARAMS, "subset_size": 6}

    def load(self, *, seed: int, data_root: Path | None = None) -> None:
        readers = open_stl10(data_root, ("train", "test"), download=self.download, verify_md5=self.verify_md5)
        assert data_root is not None  # open_stl10 raised otherwise
        shape = (self.subset_size, VIEWS, 3, self.image_size, self.image_size)
        path = cache_path(data_root, self.subset_size, self.image_size, seed)
        views = read_cache(path, shape)
        self.cache_status = "read"
        if views is None:
            available = check_layout(data_root)["unlabeled"]
            if available < self.subset_size:
                raise UserError(
                    f"stl10_subset needs {self.subset_size} unlabeled images but {data_root} has {available}; "
                    f"use --set subset_size={available} or the full STL-10"
                )
            unlabeled = open_stl10(data_root, ("unlabeled",))["unlabeled"].data
            views = build_views(unlabeled, self.subset_size, self.image_size, seed, self.num_workers())
            del unlabeled
            try:
                atomic_torch_save(path, {"views": views, "seed": seed, "version": CACHE_VERSION})
                self.cache_status = "built"
            except OSError as exc:
                warnings.warn(f"could not cache the stl10_subset views at {path} ({exc}); they are rebuilt each run", stacklevel=2)
                self.cache_status = "not cached"
        self.cache_file = str(path)
        self._set_views(views)
        self.evaluation = probe_data(readers, self.image_size, self.max_eval_items)

    def describe(self) -> dict[str, Any]:
        assert self.evaluation is not None
        return {
            **super().describe(),
            **self.encoder_info(),
            "augmentation": describe_transform(simclr_augmentation(self.image_size)),
            "views_cache": self.cache_file,
            "probe_split": f"STL-10 train ({len(self.evaluation.train_y)} images) -> test ({len(self.evaluation.test_y)} images), clean, {self.image_size} px",
        }
