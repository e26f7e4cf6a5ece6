"""Encoders: a backbone whose output is the probe's feature layer, then a projection head
whose output is L2-normalised, ``e = f_θ(x) / ||f_θ(x)||`` (DESIGN §1)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Encoder(nn.Module):
    """``features(x)`` is the layer the linear probe and k-NN read; ``forward(x)`` is the
    L2-normalised embedding the contrastive loss sees."""

    def __init__(self, backbone: nn.Module, feature_dim: int, dim: int, hidden: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.dim = dim
        if hidden:
            self.head: nn.Module = nn.Sequential(
                nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
            )
        else:
            self.head = nn.Linear(feature_dim, dim)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


def mlp_encoder(in_dim: int, hidden: int, dim: int, depth: int = 2) -> Encoder:
    """An MLP backbone (``depth`` Linear+ReLU layers of width ``hidden``) and a linear head."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    return Encoder(nn.Sequential(*layers), hidden, dim)
