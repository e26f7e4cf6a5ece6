"""The task interface (DESIGN §3): data yielding views and item ids, an encoder factory, and
(when labelled) the data of the linear probe and k-NN evaluation."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from negbench.encoders import Encoder
from negbench.params import Configurable


@dataclass
class EvalData:
    """Un-augmented inputs and labels of the probe's train and test splits. ``train_x`` and
    ``test_x`` are tensors, or lazy stand-ins with ``shape`` whose slices are tensors (large
    image splits decoded chunk by chunk, see ``negbench.images.LazyImages``)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    def subset(self, max_items: int) -> "EvalData":
        """At most ``max_items`` of each split: a fixed random subset (seed 0, whatever the
        run's seed, so every run is scored on the same items), in the original order."""
        return EvalData(*cap_split(self.train_x, self.train_y, max_items), *cap_split(self.test_x, self.test_y, max_items))


def fixed_subset(n: int, max_items: int) -> Tensor:
    """Sorted indices of a fixed random subset of ``max_items`` of ``range(n)`` (seed 0)."""
    if max_items <= 0 or max_items >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_items].sort().values


def cap_split(x: Any, y: Tensor, max_items: int) -> tuple[Any, Tensor]:
    """One probe split cut to :func:`fixed_subset`; ``x`` may be lazy (indexed by a tensor)."""
    if max_items <= 0 or max_items >= len(y):
        return x, y
    keep = fixed_subset(len(y), max_items)
    return x[keep], y[keep]


def resolve_free_views(views: Tensor, num_views: int, generator: torch.Generator) -> Tensor:
    """View id -1 ("any view") becomes a uniformly random fixed view in [0, num_views); other
    ids are kept. Returns ``views`` itself when none is free (the generator is then untouched)."""
    free = views < 0
    if not bool(free.any()):
        return views
    views = views.clone()
    views[free] = torch.randint(num_views, (int(free.sum()),), generator=generator).to(views.device)
    return views


class Task(Configurable):
    """Base class of every task. After :meth:`load`, ``num_items`` and ``num_views`` (m, or
    None with random augmentations) are set and :meth:`inputs` returns encoder inputs."""

    kind_label: ClassVar[str] = "task"
    finite_views: ClassVar[bool] = True
    labelled: ClassVar[bool] = True
    #: not a user task (e.g. a benchmark workload): left out of ``negbench list``
    hidden: ClassVar[bool] = False

    num_items: int = 0
    num_views: int | None = None
    #: set by the runner from ``--download`` before :meth:`load`: fetch missing data where a
    #: network exists (tasks that cannot download ignore it or say so)
    download: bool = False

    def load(self, *, seed: int, data_root: Path | None = None) -> None:
        """Read or build the data (deterministically from ``seed``)."""
        raise NotImplementedError

    def inputs(self, items: Tensor, views: Tensor, generator: torch.Generator) -> Tensor:
        """Encoder inputs of view ``views[k]`` of item ``items[k]``; view -1 = any view (a
        fresh augmentation, or a uniformly random fixed view on finite-view tasks)."""
        raise NotImplementedError

    def all_views(self) -> Tensor:
        """Every view of every item, shape (N, m, ...) (finite-view tasks only)."""
        raise NotImplementedError(f"task {self.name!r} has no finite view set")

    def make_encoder(self) -> Encoder:
        raise NotImplementedError

    def eval_data(self) -> EvalData | None:
        """The probe's data, or None on unlabelled tasks."""
        return None

    def subsample(self, max_items: int) -> None:
        """``--max-items``: train on the first ``max_items`` items only (item ids stay
        ``0..max_items-1``). The default suits any task whose :meth:`inputs` is indexed by
        item id; tasks with probe data also cap its splits (:meth:`EvalData.subset`)."""
        self.num_items = min(self.num_items, max_items)

    def prefetch(
        self, batches: Iterator[tuple[int, Tensor]], *, seed: int, pin_memory: bool
    ) -> Iterator[tuple[Tensor, Tensor]] | None:
        """Optional, for random-augmentation tasks: from ``(step, items)`` pairs (the runner's
        upcoming batches, in order) yield ``(items, inputs)`` where ``inputs[2k + v]`` is a
        fresh view v of ``items[k]``, computed ahead (e.g. by DataLoader workers). The views
        of a step must depend only on ``(seed, step)``, so a run is reproducible whatever
        the number of workers. ``None`` (the default): the runner calls :meth:`inputs`."""
        return None

    def describe(self) -> dict[str, Any]:
        """Facts recorded in config.json (sizes, evaluation protocol)."""
        return {"num_items": self.num_items, "num_views": self.num_views}


class FiniteViewTask(Task):
    """A task whose m views per item are fixed tensors held in memory."""

    view_inputs: Tensor  # (N, m, ...)
    evaluation: EvalData | None = None

    def _set_views(self, view_inputs: Tensor) -> None:
        self.view_inputs = view_inputs.contiguous()
        self.num_items, self.num_views = view_inputs.shape[:2]

    def inputs(self, items: Tensor, views: Tensor, generator: torch.Generator) -> Tensor:
        views = resolve_free_views(views, self.num_views, generator)
        return self.view_inputs[items.cpu(), views.cpu()]

    def all_views(self) -> Tensor:
        return self.view_inputs

    def eval_data(self) -> EvalData | None:
        return self.evaluation

    def subsample(self, max_items: int) -> None:
        """The first ``max_items`` items' views; each probe split capped at ``max_items``."""
        if max_items < self.num_items:
            self._set_views(self.view_inputs[:max_items])
        if self.evaluation is not None:
            self.evaluation = self.evaluation.subset(max_items)
