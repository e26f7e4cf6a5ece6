"""Tiny image data sets in the exact on-disk formats: STL-10's binary layout and an ImageNet
ImageFolder tree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 96
CHANNEL = SIDE * SIDE

#: the tiny ResNet of the image tests, as --set arguments
TINY_RESNET = ["--set", "image_size=16", "--set", "width=2", "--set", "stem=small", "--set", "mlp_dim=8",
               "--set", "dim=4", "--set", "workers=0"]


@dataclass
class TinySTL10:
    root: Path
    unlabeled: np.ndarray  # (N, 3, 96, 96) [channel, row, column]
    train: np.ndarray
    train_labels: np.ndarray  # 0-based
    test: np.ndarray
    test_labels: np.ndarray


def stl10_bytes(images: np.ndarray) -> bytes:
    """STL-10's format, written from its specification: each image is 3 channels of 96×96
    bytes, red then green then blue, each channel in column-major order — pixel (row, col)
    of channel c of image n at byte n·3·96·96 + c·96·96 + col·96 + row."""
    n = len(images)
    out = np.empty(n * 3 * CHANNEL, dtype=np.uint8)
    image, channel, row, col = np.meshgrid(np.arange(n), np.arange(3), np.arange(SIDE), np.arange(SIDE), indexing="ij")
    out[image * 3 * CHANNEL + channel * CHANNEL + col * SIDE + row] = images[image, channel, row, col]
    return out.tobytes()


def marked_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """Random images with a known asymmetric mark: pixel (row 3, col 70) is pure red (255, 0, 0)
    and pixel (row 70, col 3) is black, so a transposed reader is caught."""
    images = rng.integers(20, 236, size=(n, 3, SIDE, SIDE), dtype=np.uint8)
    images[:, :, 3, 70] = np.array([255, 0, 0], dtype=np.uint8)[None, :]
    images[:, :, 70, 3] = 0
    return images


def write_stl10(root: Path, *, unlabeled: int = 12, train: int = 10, test: int = 10, seed: int = 0) -> TinySTL10:
    """A tiny copy of STL-10 in its exact binary layout under ``root/stl10_binary``."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    data = TinySTL10(
        root, marked_images(unlabeled, rng), marked_images(train, rng), np.arange(train) % 10,
        marked_images(test, rng), (np.arange(test) + 3) % 10,
    )
    (folder / "unlabeled_X.bin").write_bytes(stl10_bytes(data.unlabeled))
    (folder / "train_X.bin").write_bytes(stl10_bytes(data.train))
    (folder / "train_y.bin").write_bytes((data.train_labels + 1).astype(np.uint8).tobytes())
    (folder / "test_X.bin").write_bytes(stl10_bytes(data.test))
    (folder / "test_y.bin").write_bytes((data.test_labels + 1).astype(np.uint8).tobytes())
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    (folder / "fold_indices.txt").write_text("\n".join(" ".join(str(i) for i in range(k, train, 10)) for k in range(10)) + "\n")
    return data


def write_imagefolder(root: Path, classes: dict[str, int], *, size: tuple[int, int] = (24, 20), seed: int = 0) -> None:
    """``root/{train,val}/<wnid>/`` with ``classes[wnid]`` small random images each (JPEG and
    PNG alternately), named ``<wnid>_<k>``."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for wnid, count in classes.items():
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                suffix = "JPEG" if k % 2 == 0 else "png"
                Image.fromarray(pixels).save(folder / f"{wnid}_{k}.{suffix}")
