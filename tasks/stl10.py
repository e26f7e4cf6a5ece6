"""``stl10``: STL-10 (Coates et al., 2011) through torchvision's ``STL10`` reader, with fresh
SimCLR augmentations every step, the EMC² paper's STL-10 setup.

Pretraining uses the 100,000 ``unlabeled`` images (96 px); the probe trains on the 5,000
``train`` images and is scored on the 8,000 ``test`` images (clean, resized to
``image_size``). Views: RandomResizedCrop(image_size), flip, ColorJitter(0.8, 0.8, 0.8, 0.2)
with p = 0.8, grayscale p = 0.2, Gaussian blur σ ~ U(0.1, 2) (:func:`simclr_augmentation`).
Encoder: ResNet-18 whose probe features are ``ReLU(Linear(512, 512))`` of the pooled trunk,
and a linear projection to ``dim`` = 512 (the paper's code).

**Data.** ``--data-root DIR`` holds ``DIR/stl10_binary/`` as extracted from
``stl10_binary.tar.gz``. torchvision checks the md5 of every file on each load (reading
3 GB); here an existing copy is instead checked for its layout — every file present, sizes
a whole number of 3×96×96 images, one label in 1..10 per labelled image — and read with
torchvision's own parser. ``--download`` keeps torchvision's integrity checks in full: the
archive's md5 is verified on download and every file's md5 afterwards, and
``--set verify_md5=true`` runs the md5 check on an existing copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import STL10

from negbench import EvalData, Param, register_task, UserError
from negbench.images import describe_transform, ImageTask, RESNET_TEST_PARAMS, resize_images, resnet_params, simclr_augmentation

SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
NUM_CLASSES = 10
FOLDER = STL10.base_folder  # "stl10_binary"
IMAGE_FILES = {"unlabeled": "unlabeled_X.bin", "train": "train_X.bin", "test": "test_X.bin"}
LABEL_FILES = {"train": "train_y.bin", "test": "test_y.bin"}
SOURCE = "http://ai.stanford.edu/~acoates/stl10/"


def data_error(root: Path | None, problem: str) -> UserError:
    """The one-paragraph missing-data message: what is wrong, the layout, where it comes from."""
    where = "--data-root DIR" if root is None else f"--data-root {root}"
    return UserError(
        f"STL-10 data not usable ({problem}). The STL-10 tasks read {where} holding "
        f"{FOLDER}/ with unlabeled_X.bin, train_X.bin, train_y.bin, test_X.bin, test_y.bin, class_names.txt "
        "and fold_indices.txt (images 3x96x96 uint8, column-major; labels 1-10, one byte each): "
        f"stl10_binary.tar.gz (2.6 GB) from {SOURCE}, extracted into that folder. "
        "Pass --download to fetch it (md5-checked) where the network allows it."
    )


def check_layout(root: Path | None) -> dict[str, int]:
    """Verify an STL-10 copy's binary layout without reading the images; return the number of
    images of each split. Raises :class:`UserError` naming the first problem."""
    if root is None:
        raise data_error(root, "no --data-root given")
    folder = Path(root) / FOLDER
    if not folder.is_dir():
        raise data_error(root, f"folder {folder} does not exist")
    counts: dict[str, int] = {}
    for split, name in IMAGE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise data_error(root, f"{path} is missing")
        size = path.stat().st_size
        if size == 0 or size % IMAGE_BYTES:
            raise data_error(root, f"{path} has {size} bytes, not a whole number of {IMAGE_BYTES}-byte images")
        counts[split] = size // IMAGE_BYTES
    for split, name in LABEL_FILES.items():
        path = folder / name
        if not path.is_file():
            raise data_error(root, f"{path} is missing")
        labels = np.fromfile(path, dtype=np.uint8)
        if len(labels) != counts[split]:
            raise data_error(root, f"{path} holds {len(labels)} labels for {counts[split]} images in {IMAGE_FILES[split]}")
        if len(labels) and not (labels.min() >= 1 and labels.max() <= NUM_CLASSES):
            raise data_error(root, f"{path} has labels outside 1-{NUM_CLASSES}")
    names = folder / STL10.class_names_file
    if names.is_file() and len(names.read_text().split()) != NUM_CLASSES:
        raise data_error(root, f"{names} does not list {NUM_CLASSES} class names")
    return counts


class _LayoutCheckedSTL10(STL10):
    """torchvision's reader for a copy that :func:`check_layout` has just verified: its md5
    check is replaced by that layout check. Never constructed with ``download=True``."""

    def _check_integrity(self) -> bool:
        return True


def open_stl10(root: Path | None, splits: tuple[str, ...], *, download: bool = False, verify_md5: bool = False) -> dict[str, STL10]:
    """torchvision ``STL10`` readers of ``splits`` under ``root``. ``download``: fetch the
    archive if torchvision's md5 check of the files fails (the archive's md5 is verified),
    then require every file's md5 to match. ``verify_md5``: the md5 check on an existing copy."""
    readers: dict[str, STL10] = {}
    if root is not None and download:
        try:
            readers[splits[0]] = STL10(str(root), split=splits[0], download=True)
        except Exception as exc:  # network or archive errors
            raise data_error(root, f"download failed: {type(exc).__name__}: {exc}") from None
        if not STL10._check_integrity(readers[splits[0]]):
            raise data_error(root, "the downloaded files fail torchvision's md5 check")
        verify_md5 = False  # just verified
    check_layout(root)
    if verify_md5:
        try:
            readers["test"] = STL10(str(root), split="test")
        except RuntimeError:
            raise data_error(root, "a file fails torchvision's md5 check of the official release") from None
    for split in splits:
        if split not in readers:
            readers[split] = _LayoutCheckedSTL10(str(root), split=split)
    return {split: readers[split] for split in splits}


def probe_data(readers: dict[str, STL10], image_size: int, max_eval_items: int) -> EvalData:
    """The clean ``train`` (probe training) and ``test`` images as uint8 tensors at
    ``image_size``, labels 0-9; each split capped at ``max_eval_items`` (fixed subset)."""

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        reader = readers[name]
        images = torch.from_numpy(np.ascontiguousarray(reader.data))
        return resize_images(images, image_size), torch.from_numpy(reader.labels.astype(np.int64))

    data = EvalData(*split("train"), *split("test"))
    return data.subset(max_eval_items) if max_eval_items else data


def to_pil(image: np.ndarray) -> Image.Image:
    """One torchvision STL10 image (3, 96, 96) as a PIL image."""
    return Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)))


STL10_PARAMS = {
    **resnet_params(arch="resnet18", dim=512, mlp_dim=512, head_hidden=0, norm="batch", image_size=SIDE, max_eval_items=0),
    "verify_md5": Param(False, "check the md5 of an existing copy against the official release (reads 3 GB)"),
}


@register_task("stl10")
class STL10Task(ImageTask):
    description = "STL-10 (--data-root): 100k unlabeled 96-px images, fresh SimCLR augmentations; ResNet-18; probe train->test."
    params = STL10_PARAMS
    test_params = dict(RESNET_TEST_PARAMS)

    def load(self, *, seed: int, data_root: Path | None = None) -> None:
        readers = open_stl10(data_root, ("unlabeled", "train", "test"), download=self.download, verify_md5=self.verify_md5)
        self._unlabeled = readers["unlabeled"].data  # (N, 3, 96, 96) uint8, oriented
        self.num_items = len(self._unlabeled)
        self.augmentation = simclr_augmentation(self.image_size)
        self.evaluation = probe_data(readers, self.image_size, self.max_eval_items)

    def image(self, item: int) -> Image.Image:
        return to_pil(self._unlabeled[item])

    def describe(self) -> dict[str, Any]:
        assert self.evaluation is not None
        return {
            **super().describe(),
            **self.encoder_info(),
            "augmentation": describe_transform(self.augmentation),
            "probe_split": f"STL-10 train ({len(self.evaluation.train_y)} images) -> test ({len(self.evaluation.test_y)} images), clean, {self.image_size} px",
        }
