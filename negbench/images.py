"""Shared machinery of the image tasks (DESIGN §3): the SimCLR augmentation built from
torchvision.transforms.v2, seeded per-view augmentation, a prefetching DataLoader, lazily
decoded evaluation splits, the ResNet parameters every image task shares, and
:class:`ImageTask`, the base of random-augmentation image tasks.

**Reproducibility.** Every augmented view is computed from its own seed: torch's RNG is
seeded with it just before the view's transform runs (the caller's RNG state is restored
afterwards). Training views of step t take their seeds from ``(seed, t)`` alone
(:func:`view_seeds`), so a run gives the same views with 0 or 16 DataLoader workers, and after
a resume.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from negbench.encoders import Encoder, make_encoder, NORMS, STEMS
from negbench.params import Param
from negbench.task import EvalData, Task

#: requests for more fresh views than this are augmented by DataLoader workers
PARALLEL_REQUEST = 256
#: augmented batches the prefetching loader keeps in flight per worker
PREFETCH_FACTOR = 4


def view_seeds(seed: int, step: int, count: int) -> list[int]:
    """``count`` independent 64-bit seeds for the views of step ``step`` (numpy SeedSequence
    of ``[seed, step]``): a pure function, whoever computes it."""
    return np.random.SeedSequence([seed, step]).generate_state(count, dtype=np.uint64).tolist()


class PILGaussianBlur:
    """SimCLR's Gaussian blur: σ ~ U(sigma) pixels, applied with Pillow's
    ``ImageFilter.GaussianBlur(σ)`` (three box-blur passes: about 1 ms at 224 px, where an
    exact 23-tap 2-D convolution, ``v2.GaussianBlur(23)``, takes about 50 ms). σ is drawn from
    torch's RNG, so the seeding of :class:`AugmentedViews` covers it. PIL images only."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return image.filter(ImageFilter.GaussianBlur(sigma))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma}, p=1.0, Pillow)"


def simclr_augmentation(
    size: int, *, jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2), scale: tuple[float, float] = (0.08, 1.0)
) -> v2.Compose:
    """PIL image → uint8 tensor (3, size, size): RandomResizedCrop(size, scale), horizontal
    flip (p = 0.5), ColorJitter(*jitter) with p = 0.8, grayscale with p = 0.2, Gaussian blur
    with σ ~ U(0.1, 2) (always, as in the EMC² paper's code)."""
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(*jitter)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        PILGaussianBlur((0.1, 2.0)),
        v2.PILToTensor(),
    ])


def describe_transform(transform: Any) -> str:
    """A transform's repr on one line (for config.json)."""
    return " ".join(repr(transform).split())


class AugmentedViews(Dataset):
    """``views[[(item, seed), ...]] → (item ids, uint8 images)``: ``augment(image(item))`` with
    torch's RNG seeded by ``seed`` for each view."""

    def __init__(self, image: Callable[[int], Image.Image], augment: Callable[[Image.Image], Tensor]) -> None:
        self.image = image
        self.augment = augment

    def __getitems__(self, keys: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        with torch.random.fork_rng(devices=[]):
            views = []
            for item, seed in keys:
                torch.manual_seed(seed)
                views.append(self.augment(self.image(item)))
        return torch.tensor([item for item, _ in keys], dtype=torch.long), torch.stack(views)

    def __getitem__(self, key: tuple[int, int]) -> Tensor:
        return self.__getitems__([key])[1][0]


def _as_batch(batch: Any) -> Any:
    return batch


def _loader(dataset: AugmentedViews, batches: Any, workers: int, pin_memory: bool) -> DataLoader:
    # fork shares the decoded data set with the workers instead of pickling it (the default
    # start method is no longer fork from Python 3.14 on)
    context = None
    if workers and "fork" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("fork")
    return DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=_as_batch, pin_memory=pin_memory,
        prefetch_factor=PREFETCH_FACTOR if workers else None, multiprocessing_context=context,
    )


def augment(dataset: AugmentedViews, keys: list[tuple[int, int]], workers: int) -> Tensor:
    """Views of ``keys`` now (in order), in worker processes when there are many."""
    if workers <= 0 or len(keys) < PARALLEL_REQUEST:
        return dataset.__getitems__(keys)[1]
    chunk = -(-len(keys) // (4 * workers))
    chunks = [keys[s : s + chunk] for s in range(0, len(keys), chunk)]
    return torch.cat([x for _, x in _loader(dataset, chunks, min(workers, len(chunks)), False)])


def prefetch_views(
    dataset: AugmentedViews, batches: Iterator[tuple[int, Tensor]], *, seed: int, workers: int, pin_memory: bool
) -> Iterator[tuple[Tensor, Tensor]]:
    """For each ``(step, items)`` yield ``(items, views)`` with ``views[2k + v]`` view v of
    ``items[k]``, seeded by :func:`view_seeds` ``(seed, step)``; computed ahead by ``workers``
    DataLoader workers (0: in this process, on demand), into pinned memory if asked."""

    def keys() -> Iterator[list[tuple[int, int]]]:
        for step, items in batches:
            ids = items.repeat_interleave(2).tolist()
            yield list(zip(ids, view_seeds(seed, step, len(ids))))

    for ids, views in _loader(dataset, keys(), workers, pin_memory):
        yield ids[::2], views


class LazyImages:
    """An evaluation split decoded on demand. ``x[a:b]`` decodes those images (a thread pool
    of ``threads``) into a uint8 tensor; ``x[index_tensor]`` is a lazy sub-split. ``shape`` is
    ``(n, 3, size, size)``, so the runner reads it chunk by chunk like a tensor."""

    def __init__(self, load: Callable[[int], Tensor], indices: Sequence[int], size: int, threads: int = 1) -> None:
        self.load = load
        self.indices = list(indices)
        self.size = size
        self.threads = max(1, threads)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.indices), 3, self.size, self.size)

    def __getitem__(self, key: slice | Tensor) -> Any:
        if isinstance(key, slice):
            chosen = self.indices[key]
            if self.threads == 1 or len(chosen) < 2:
                images = [self.load(i) for i in chosen]
            else:
                with ThreadPoolExecutor(self.threads) as pool:
                    images = list(pool.map(self.load, chosen))
            return torch.stack(images) if images else torch.empty(0, 3, self.size, self.size, dtype=torch.uint8)
        return LazyImages(self.load, [self.indices[i] for i in torch.as_tensor(key).tolist()], self.size, self.threads)


def resize_images(images: Tensor, size: int) -> Tensor:
    """A uint8 batch (N, 3, H, W) resized to (N, 3, size, size) (antialiased; a no-op at size)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return v2.functional.resize(images, [size, size], antialias=True)


def default_workers() -> int:
    """DataLoader workers when ``workers=-1``: one per spare CPU core, at most 12."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(12, cpus - 1))


def resnet_params(
    *, arch: str, dim: int, mlp_dim: int, head_hidden: int, norm: str, image_size: int, max_eval_items: int
) -> dict[str, Param]:
    """The parameters every image task shares (encoder, input size, probe cap, workers)."""
    return {
        "image_size": Param(image_size, "side of the square input images in pixels", low=8),
        "arch": Param(arch, "ResNet backbone", choices=("resnet18", "resnet50")),
        "width": Param(64, "channels of the first ResNet stage (64 = the standard ResNet)", low=1),
        "norm": Param(norm, "normalisation layers: BatchNorm, GroupNorm or none (identity)", choices=NORMS),
        "stem": Param("imagenet", "ResNet stem: imagenet (7x7 conv + max-pool) or small (3x3 conv, for 32 px)", choices=STEMS),
        "mlp_dim": Param(mlp_dim, "width of the Linear+ReLU after the trunk: the probe's features (0: the pooled trunk)", low=0),
        "head_hidden": Param(head_hidden, "hidden width of the projection head (0: one linear layer)", low=0),
        "dim": Param(dim, "embedding dimension", low=1),
        "max_eval_items": Param(max_eval_items, "cap of each probe split: a fixed random subset, seed 0 (0 = all)", low=0),
        "workers": Param(-1, "DataLoader workers for augmentations (-1: one per spare core, at most 12; 0: none)", low=-1),
    }


#: small ResNet settings for the test suites
RESNET_TEST_PARAMS = {"image_size": 16, "width": 2, "stem": "small", "mlp_dim": 8, "dim": 4, "workers": 0}


class ResNetTask(Task):
    """Mixin of the image tasks: the encoder from the :func:`resnet_params` values."""

    arch: str
    width: int
    norm: str
    stem: str
    mlp_dim: int
    head_hidden: int
    dim: int
    workers: int
    image_size: int
    max_eval_items: int

    def make_encoder(self) -> Encoder:
        return make_encoder(
            self.arch, dim=self.dim, mlp_dim=self.mlp_dim, head_hidden=self.head_hidden,
            width=self.width, norm=self.norm, stem=self.stem,
        )

    def num_workers(self) -> int:
        return default_workers() if self.workers < 0 else self.workers

    def encoder_info(self) -> dict[str, Any]:
        return {"encoder": {k: getattr(self, k) for k in ("arch", "width", "norm", "stem", "mlp_dim", "head_hidden", "dim")}}


class ImageTask(ResNetTask):
    """A random-augmentation image task. Subclasses' :meth:`load` sets ``num_items``,
    ``augmentation`` and ``evaluation`` and implements :meth:`image` (training image i)."""

    finite_views = False
    num_views = None
    augmentation: Callable[[Image.Image], Tensor]
    evaluation: EvalData | None = None

    def image(self, item: int) -> Image.Image:
        raise NotImplementedError

    def views(self) -> AugmentedViews:
        return AugmentedViews(self.image, self.augmentation)

    def inputs(self, items: Tensor, views: Tensor, generator: torch.Generator) -> Tensor:
        """A fresh augmentation of each item (the view ids are ignored), seeded from ``generator``."""
        seeds = torch.randint(0, 2**62, (items.numel(),), generator=generator).tolist()
        return augment(self.views(), list(zip(items.tolist(), seeds)), self.num_workers())

    def prefetch(
        self, batches: Iterator[tuple[int, Tensor]], *, seed: int, pin_memory: bool
    ) -> Iterator[tuple[Tensor, Tensor]]:
        return prefetch_views(self.views(), batches, seed=seed, workers=self.num_workers(), pin_memory=pin_memory)

    def eval_data(self) -> EvalData | None:
        return self.evaluation

    def subsample(self, max_items: int) -> None:
        self.num_items = min(self.num_items, max_items)
        if self.evaluation is not None:
            self.evaluation = self.evaluation.subset(max_items)
