"""``imagenet100``: ImageNet (ILSVRC-2012) restricted to the standard 100-class subset of
Tian et al.'s CMC (the list ships as ``negbench/tasks/data/imagenet100_classes.txt``; a
class's label is its line number there), with fresh augmentations every step: the EMC²
paper's ImageNet-100 setup.

``--data-root DIR`` holds ``DIR/train/<wnid>/*.JPEG`` and ``DIR/val/<wnid>/*.JPEG`` (the
validation images sorted into class folders), read with torchvision's ``ImageFolder``;
folders of other classes are ignored. Pretraining uses ``train``. Views (the paper's
recipe): RandomResizedCrop(224, scale 0.08-1), flip, ColorJitter(0.4, 0.4, 0.2, 0.1) with
p = 0.8, grayscale p = 0.2, Gaussian blur σ ~ U(0.1, 2). Encoder: ResNet-50 whose probe
features are ``ReLU(Linear(2048, 2048))`` of the pooled trunk, projection head
``Linear(2048, 2048) – ReLU – Linear(2048, 128)``. The probe trains on a fixed random
``max_eval_items`` (10,000) of the train images and is scored on the val images (at most
``max_eval_items``), clean: resized to 224×224 as in the paper's code.
"""

from __future__ import annotations

import warnings
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from negbench import EvalData, register_task, UserError
from negbench.images import describe_transform, RESNET_TEST_PARAMS, ImageTask, LazyImages, resnet_params, simclr_augmentation
from negbench.task import fixed_subset

CLASS_LIST = "data/imagenet100_classes.txt"


def class_list() -> list[str]:
    """The 100 wnids in their shipped order (label = position)."""
    return files("negbench.tasks").joinpath(CLASS_LIST).read_text().split()


def data_error(root: Path | None, problem: str) -> UserError:
    where = "--data-root DIR" if root is None else f"--data-root {root}"
    return UserError(
        f"ImageNet-100 data not usable ({problem}). Task imagenet100 reads {where} holding train/<wnid>/*.JPEG "
        "and val/<wnid>/*.JPEG (the ILSVRC-2012 training images, and the validation images sorted into one folder "
        "per class) for the 100 wnids listed in negbench/tasks/data/imagenet100_classes.txt; other folders are "
        "ignored. The images come from https://image-net.org (free registration; negbench cannot download them)."
    )


class SubsetImageFolder(ImageFolder):
    """An ImageFolder of the listed classes that exist under ``root``, labelled by their
    position in ``wanted`` (not alphabetically)."""

    def __init__(self, root: str, wanted: list[str]) -> None:
        self.wanted = wanted
        super().__init__(root)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        present = [w for w in self.wanted if (Path(directory) / w).is_dir()]
        if not present:
            raise FileNotFoundError(f"none of the {len(self.wanted)} listed class folders is in {directory}")
        return present, {w: self.wanted.index(w) for w in present}


def open_split(root: Path | None, split: str, wanted: list[str]) -> SubsetImageFolder:
    if root is None:
        raise data_error(root, "no --data-root given")
    folder = Path(root) / split
    if not folder.is_dir():
        raise data_error(root, f"folder {folder} does not exist")
    try:
        return SubsetImageFolder(str(folder), wanted)
    except FileNotFoundError as exc:
        raise data_error(root, str(exc).strip()) from None


@register_task("imagenet100")
class ImageNet100Task(ImageTask):
    description = "ImageNet-100 (--data-root with train/ and val/ class folders), fresh 224-px augmentations; ResNet-50."
    params = resnet_params(arch="resnet50", dim=128, mlp_dim=2048, head_hidden=2048, norm="batch", image_size=224, max_eval_items=10000)
    test_params = {**RESNET_TEST_PARAMS, "arch": "resnet18"}

    def load(self, *, seed: int, data_root: Path | None = None) -> None:
        if self.download:
            raise data_error(data_root, "--download is not available for ImageNet")
        wanted = class_list()
        self._train = open_split(data_root, "train", wanted)
        val = open_split(data_root, "val", wanted)
        missing = sorted(set(wanted) - set(self._train.classes))
        if missing:
            warnings.warn(
                f"imagenet100: {len(missing)} of the {len(wanted)} classes are missing under {data_root}/train "
                f"(e.g. {missing[0]}); running on the {len(self._train.classes)} present", stacklevel=2
            )
        self.classes_found = {"train": len(self._train.classes), "val": len(val.classes)}
        self.num_items = len(self._train.samples)
        self.augmentation = simclr_augmentation(self.image_size, jitter=(0.4, 0.4, 0.2, 0.1))
        self.clean = v2.Compose([v2.Resize((self.image_size, self.image_size), antialias=True), v2.PILToTensor()])
        threads = max(1, self.num_workers())

        def split(folder: SubsetImageFolder) -> tuple[LazyImages, torch.Tensor]:
            keep = fixed_subset(len(folder.samples), self.max_eval_items).tolist()
            load = lambda i: self.clean(folder.loader(folder.samples[i][0]))  # noqa: E731
            labels = torch.tensor([folder.samples[i][1] for i in keep], dtype=torch.long)
            return LazyImages(load, keep, self.image_size, threads), labels

        self.evaluation = EvalData(*split(self._train), *split(val))

    def image(self, item: int) -> Image.Image:
        return self._train.loader(self._train.samples[item][0])

    def describe(self) -> dict[str, Any]:
        assert self.evaluation is not None
        return {
            **super().describe(),
            **self.encoder_info(),
            "classes_found": self.classes_found,
            "augmentation": describe_transform(self.augmentation),
            "probe_split": f"fixed random {len(self.evaluation.train_y)} train images (seed 0) -> "
                           f"{len(self.evaluation.test_y)} val images, resized to {self.image_size}x{self.image_size}",
        }
