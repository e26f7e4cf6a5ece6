"""The task interface (DESIGN §3): data yielding views and item ids, an encoder factory, and
(when labelled) the data of the linear probe and k-NN evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from negbench.encoders import Encoder
from negbench.params import Configurable


@dataclass
class EvalData:
    """Un-augmented inputs and labels of the probe's train and test splits."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


class Task(Configurable):
    """Base class of every task. After :meth:`load`, ``num_items`` and ``num_views`` (m, or
    None with random augmentations) are set and :meth:`inputs` returns encoder inputs."""

    kind_label: ClassVar[str] = "task"
    finite_views: ClassVar[bool] = True
    labelled: ClassVar[bool] = True

    num_items: int = 0
    num_views: int | None = None

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
        views = views.clone()
        free = views < 0
        if bool(free.any()):
            views[free] = torch.randint(
                self.num_views, (int(free.sum()),), generator=generator, device=views.device
            )
        return self.view_inputs[items.cpu(), views.cpu()]

    def all_views(self) -> Tensor:
        return self.view_inputs

    def eval_data(self) -> EvalData | None:
        return self.evaluation
