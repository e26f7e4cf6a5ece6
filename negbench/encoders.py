"""Encoders: a backbone whose output is the probe's feature layer, then a projection head
whose output is L2-normalised, ``e = f_θ(x) / ||f_θ(x)||`` (DESIGN §1).

Every encoder comes from one factory, :func:`make_encoder` (``mlp``, ``cnn``, ``resnet18``,
``resnet50``). The ResNets are torchvision's residual blocks with no pretrained weights, and
the heads of the EMC² paper's code: the trunk's pooled output goes through
``Linear(trunk, mlp_dim) + ReLU`` — the *hidden features* the linear probe and k-NN read —
then a projection head to ``dim`` (one linear layer, or ``Linear-ReLU-Linear`` with
``head_hidden``).

On a CUDA device an encoder built with ``mixed_precision=True`` (the ResNets) runs its
backbone and head under bf16 autocast with channels_last inputs; the embedding is always
normalised and returned in float32, and :func:`full_precision` turns autocast off (exact
metrics). On the CPU nothing changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, conv1x1

from negbench.errors import UserError, suggest

_FULL_PRECISION: contextvars.ContextVar[bool] = contextvars.ContextVar("negbench_full_precision", default=False)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Inside this context (or a function it decorates) encoders never use autocast."""
    token = _FULL_PRECISION.set(True)
    try:
        yield
    finally:
        _FULL_PRECISION.reset(token)


class Encoder(nn.Module):
    """``features(x)`` is the layer the linear probe and k-NN read; ``forward(x)`` is the
    L2-normalised embedding the contrastive loss sees (always float32)."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        dim: int,
        hidden: int | None = None,
        *,
        mixed_precision: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.dim = dim
        self.mixed_precision = mixed_precision
        if hidden:
            self.head: nn.Module = nn.Sequential(
                nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim)
            )
        else:
            self.head = nn.Linear(feature_dim, dim)

    def _autocast(self, x: Tensor) -> contextlib.AbstractContextManager[Any]:
        if self.mixed_precision and x.is_cuda and not _FULL_PRECISION.get():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @staticmethod
    def _layout(x: Tensor) -> Tensor:
        # cuDNN picks its NHWC kernels when the input is channels_last
        if x.is_cuda and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def features(self, x: Tensor) -> Tensor:
        with self._autocast(x):
            return self.backbone(self._layout(x)).float()

    def forward(self, x: Tensor) -> Tensor:
        with self._autocast(x):
            z = self.head(self.backbone(self._layout(x)))
        return F.normalize(z.float(), dim=1)


class ImageInput(nn.Module):
    """uint8 images (B, 3, H, W) in [0, 255] → float in [0, 1]; float input passes unchanged.
    Tasks hand over uint8 tensors (4× less to copy to the device); as in the EMC² paper's code
    there is no mean/std normalisation."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.uint8:
            return x.float().div_(255.0)
        return x


def mlp_encoder(in_dim: int, hidden: int, dim: int, depth: int = 2) -> Encoder:
    """An MLP backbone (``depth`` Linear+ReLU layers of width ``hidden``) and a linear head."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_dim
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
        width = hidden
    return Encoder(nn.Sequential(*layers), hidden, dim)


def cnn_encoder(side: int, hidden: int, dim: int, channels: int = 16) -> Encoder:
    """A small CNN for flattened ``side × side`` one-channel images: conv3×3(c) – ReLU –
    conv3×3(2c, stride 2) – ReLU – flatten – Linear(hidden) – ReLU (the features), then a
    linear head."""
    reduced = (side + 1) // 2
    backbone = nn.Sequential(
        nn.Unflatten(1, (1, side, side)),
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1), nn.ReLU(inplace=True),
        nn.Flatten(),
        nn.Linear(2 * channels * reduced * reduced, hidden), nn.ReLU(inplace=True),
    )
    return Encoder(backbone, hidden, dim)


NORMS = ("batch", "group", "none")
STEMS = ("imagenet", "small")
_RESNETS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


def norm_layer(norm: str) -> Callable[[int], nn.Module]:
    """``batch``: BatchNorm2d; ``group``: GroupNorm with 32 groups (fewer when the channel
    count is not a multiple of 32); ``none``: identity (the EMC² paper's runs remove BatchNorm)."""
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(math.gcd(32, channels), channels)
    if norm == "none":
        return lambda channels: nn.Identity()
    raise UserError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}{suggest(norm, NORMS)}")


def resnet_trunk(arch: str = "resnet18", *, width: int = 64, norm: str = "batch", stem: str = "imagenet") -> tuple[nn.Sequential, int]:
    """torchvision's ResNet-18/50 without its classifier, randomly initialised as torchvision
    does: stem, four stages of widths ``width·(1, 2, 4, 8)``, global average pooling. With
    ``width=64, stem="imagenet", norm="batch"`` it is exactly ``torchvision.models.resnet18()``
    (or 50) up to ``fc``. ``stem="small"`` is the 32-px stem (3×3 conv, stride 1, no max-pool).
    Returns the trunk and its output width."""
    if arch not in _RESNETS:
        raise UserError(f"unknown ResNet {arch!r}{suggest(arch, _RESNETS)}; use one of {', '.join(_RESNETS)}")
    if stem not in STEMS:
        raise UserError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    block, depths = _RESNETS[arch]
    make_norm = norm_layer(norm)
    if stem == "imagenet":
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False), make_norm(width),
            nn.ReLU(inplace=True), nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        ]
    else:
        layers = [nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False), make_norm(width), nn.ReLU(inplace=True)]
    inplanes = width
    for stage, depth in enumerate(depths):
        planes = width * 2**stage
        stride = 1 if stage == 0 else 2
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride), make_norm(planes * block.expansion))
        blocks = [block(inplanes, planes, stride, downsample, norm_layer=make_norm)]
        inplanes = planes * block.expansion
        blocks += [block(inplanes, planes, norm_layer=make_norm) for _ in range(1, depth)]
        layers.append(nn.Sequential(*blocks))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    trunk = nn.Sequential(*layers)
    for module in trunk.modules():  # torchvision's initialisation
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(module.weight, 1)
            nn.init.constant_(module.bias, 0)
    return trunk, inplanes


def resnet_encoder(
    arch: str = "resnet18",
    *,
    dim: int = 512,
    mlp_dim: int = 512,
    head_hidden: int = 0,
    width: int = 64,
    norm: str = "batch",
    stem: str = "imagenet",
) -> Encoder:
    """A ResNet encoder with the EMC² paper's heads. Features (the probe's layer):
    ``ReLU(Linear(trunk(x)))`` of width ``mlp_dim`` (0: the pooled trunk itself). Projection:
    ``Linear(mlp_dim, dim)``, or ``Linear(mlp_dim, head_hidden) – ReLU – Linear(head_hidden, dim)``.
    STL-10 in the paper: resnet18, mlp_dim 512, dim 512, linear head; ImageNet-100: resnet50,
    mlp_dim 2048, head_hidden 2048, dim 128. Inputs are uint8 (or [0, 1] float) images."""
    trunk, trunk_dim = resnet_trunk(arch, width=width, norm=norm, stem=stem)
    layers: list[nn.Module] = [ImageInput(), trunk]
    feature_dim = trunk_dim
    if mlp_dim:
        layers += [nn.Linear(trunk_dim, mlp_dim), nn.ReLU(inplace=True)]
        feature_dim = mlp_dim
    return Encoder(nn.Sequential(*layers), feature_dim, dim, head_hidden or None, mixed_precision=True)


ENCODERS: dict[str, Callable[..., Encoder]] = {
    "mlp": mlp_encoder,
    "cnn": cnn_encoder,
    "resnet18": lambda **kw: resnet_encoder("resnet18", **kw),
    "resnet50": lambda **kw: resnet_encoder("resnet50", **kw),
}


def make_encoder(name: str, **kwargs: Any) -> Encoder:
    """An encoder by name: ``mlp(in_dim, hidden, dim, depth=2)``, ``cnn(side, hidden, dim,
    channels=16)``, ``resnet18`` / ``resnet50`` (keywords of :func:`resnet_encoder`)."""
    if name not in ENCODERS:
        raise UserError(f"unknown encoder {name!r}{suggest(name, ENCODERS)}; use one of {', '.join(ENCODERS)}")
    return ENCODERS[name](**kwargs)
