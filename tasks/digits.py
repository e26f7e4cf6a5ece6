"""``digits``: scikit-learn's bundled handwritten digits (1,797 real 8×8 images, 10 classes).

No download: the data ship inside scikit-learn. Pixels are scaled to [0, 1]. The m fixed views
of each image are generated once from the seed: a random integer shift of up to ``max_shift``
pixels in each direction (zero fill) plus Gaussian pixel noise of std ``noise``. The encoder
is a small MLP on the 64 pixels (``encoder=cnn``: a small CNN on the 8×8 image). The probe
trains on a fixed stratified split of the clean images (1,000 train / 797 test, independent
of the run seed, so every run is scored on the same test images).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from negbench import Encoder, EvalData, FiniteViewTask, make_encoder, Param, register_task

PROBE_TRAIN_SIZE = 1000


def shift_image(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Shift an image by (dy, dx) pixels, filling with zeros."""
    out = np.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


@register_task("digits")
class DigitsTask(FiniteViewTask):
    description = "scikit-learn's 1,797 real 8x8 digits (no download); m fixed shift+noise views; MLP."
    params = {
        "views": Param(2, "fixed augmented views per item (m)", low=2),
        "max_shift": Param(1, "largest pixel shift of a view", low=0, high=3),
        "noise": Param(0.1, "std of the Gaussian pixel noise of a view", low=0.0),
        "max_items": Param(0, "use only the first N images (0 = all 1,797)", low=0),
        "encoder": Param("mlp", "encoder: an MLP on the 64 pixels, or a small CNN", choices=("mlp", "cnn")),
        "hidden": Param(128, "width of the MLP (of the CNN's feature layer)", low=1),
        "dim": Param(64, "embedding dimension", low=1),
    }
    test_params = {"max_items": 40, "hidden": 16, "dim": 8}

    def load(self, *, seed: int, data_root: Path | None = None) -> None:
        data = load_digits()
        images = (data.images / 16.0).astype(np.float32)
        labels = data.target.astype(np.int64)
        if self.max_items:
            images, labels = images[: self.max_items], labels[: self.max_items]
        rng = np.random.default_rng(seed)
        n = len(images)
        shifts = rng.integers(-self.max_shift, self.max_shift + 1, size=(n, self.views, 2))
        views = np.empty((n, self.views, 8, 8), dtype=np.float32)
        for i in range(n):
            for v in range(self.views):
                views[i, v] = shift_image(images[i], *shifts[i, v])
        views += rng.normal(0.0, self.noise, size=views.shape).astype(np.float32)
        self._set_views(torch.from_numpy(views.reshape(n, self.views, 64)))

        flat = torch.from_numpy(images.reshape(n, 64))
        train_size = min(PROBE_TRAIN_SIZE, n // 2) if n < 2 * PROBE_TRAIN_SIZE else PROBE_TRAIN_SIZE
        stratify = labels if np.bincount(labels).min() >= 2 else None
        train, test = train_test_split(
            np.arange(n), train_size=train_size, random_state=0, stratify=stratify
        )
        y = torch.from_numpy(labels)
        self.evaluation = EvalData(flat[train], y[train], flat[test], y[test])

    def make_encoder(self) -> Encoder:
        if self.encoder == "cnn":
            return make_encoder("cnn", side=8, hidden=self.hidden, dim=self.dim)
        return make_encoder("mlp", in_dim=64, hidden=self.hidden, dim=self.dim)

    def describe(self) -> dict:
        return {**super().describe(), "probe_split": "stratified 1,000 train / 797 test (random_state=0)"}
