"""``random_images``: random 3×size×size images with random "augmentations", and a ResNet-18 —
the image workload of ``negbench bench`` (what a training step costs on image-sized inputs).

A fixed pool of ``pool`` images with pixels i.i.d. U[0, 1) is drawn from the seed; every view of
every item is an independent uniform pick from the pool (so the task draws fresh random views,
like an augmented image data set, with no data to read). No labels. The encoder is
torchvision's ResNet-18 (random initialisation, standard ImageNet stem) without its classifier —
512 features — and a linear head to ``dim``. Not a learning task: hidden from ``negbench list``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from negbench import Encoder, Param, register_task, Task


def torchvision_resnet18(dim: int) -> Encoder:
    """``torchvision.models.resnet18()`` with ``fc`` removed and a linear head to ``dim``."""
    from torchvision.models import resnet18

    backbone = resnet18(weights=None)
    backbone.fc = nn.Identity()
    return Encoder(backbone, 512, dim)


@register_task("random_images")
class RandomImagesTask(Task):
    description = "Random 3xSxS images (a fixed pool; each view a random pick) and a ResNet-18: bench's workload."
    finite_views = False
    labelled = False
    hidden = True
    params = {
        "size": Param(32, "image side S in pixels", low=1),
        "num_items": Param(10_000, "number of items N", low=2),
        "pool": Param(256, "distinct random images the views are picked from", low=1),
        "dim": Param(128, "embedding dimension", low=1),
    }
    test_params = {"size": 8, "num_items": 16, "pool": 4, "dim": 8}

    def load(self, *, seed: int, data_root: Path | None = None) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.num_views = None
        self.images = torch.rand(self.pool, 3, self.size, self.size, generator=gen)

    def inputs(self, items: Tensor, views: Tensor, generator: torch.Generator) -> Tensor:
        return self.images[torch.randint(self.pool, (items.numel(),), generator=generator)]

    def make_encoder(self) -> Encoder:
        return torchvision_resnet18(self.dim)
