"""The encoder factory: the ResNet trunks are torchvision's ResNets, the paper's heads, the
normalisation options, the small stem, uint8 inputs, and the MLP/CNN encoders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from negbench.encoders import Encoder, full_precision, make_encoder, resnet_trunk
from negbench.errors import UserError




def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_trunk_is_torchvisions_resnet(arch):
    """Same parameters, buffers and function as torchvision's model without ``fc``."""
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    trunk, width = resnet_trunk(arch)
    trunk.eval()
    assert width == reference.fc.in_features
    assert _count(trunk) == _count(reference) - _count(reference.fc)
    ours = list(trunk.state_dict().values())
    theirs = [v for k, v in reference.state_dict().items() if not k.startswith("fc.")]
    assert [tuple(v.shape) for v in ours] == [tuple(v.shape) for v in theirs]
    trunk.load_state_dict(dict(zip(trunk.state_dict(), theirs)))
    reference.fc = nn.Identity()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), reference(x))


def test_paper_heads_and_feature_layer():
    stl = make_encoder("resnet18", dim=512, mlp_dim=512, width=4)
    assert stl.feature_dim == 512 and stl.dim == 512 and isinstance(stl.head, nn.Linear)
    imagenet = make_encoder("resnet50", dim=128, mlp_dim=2048, head_hidden=2048, width=4)
    assert imagenet.feature_dim == 2048 and imagenet.dim == 128
    assert [type(m) for m in imagenet.head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert imagenet.head[0].out_features == 2048
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    for encoder in (stl, imagenet):
        encoder.eval()
        with torch.no_grad():
            feats = encoder.features(x)
            emb = encoder(x)
            # forward = normalise(head(features)): the probe reads the layer before the head
            torch.testing.assert_close(emb, F.normalize(encoder.head(feats), dim=1))
        assert feats.shape == (3, encoder.feature_dim) and bool((feats >= 0).all())  # after a ReLU
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    no_mlp = make_encoder("resnet18", dim=8, mlp_dim=0, width=2)
    assert no_mlp.feature_dim == 16  # the pooled trunk, 8·width


def test_uint8_inputs_are_scaled_to_unit_range():
    encoder = make_encoder("resnet18", dim=4, mlp_dim=8, width=2, stem="small").eval()
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), encoder(x.float() / 255))


@pytest.mark.parametrize("norm,kind", [("batch", nn.BatchNorm2d), ("group", nn.GroupNorm), ("none", None)])
def test_norm_options(norm, kind):
    encoder = make_encoder("resnet18", dim=4, mlp_dim=8, width=4, norm=norm)
    kinds = {type(m) for m in encoder.modules()}
    assert (nn.BatchNorm2d in kinds) == (kind is nn.BatchNorm2d)
    assert (nn.GroupNorm in kinds) == (kind is nn.GroupNorm)
    if norm != "batch":
        # without batch statistics an embedding depends on its own image only
        encoder.train()
        x = torch.rand(4, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(encoder(x)[:1], encoder(x[:1]))
    with pytest.raises(UserError, match="norm must be one of"):
        make_encoder("resnet18", norm="layer")


def test_small_stem_keeps_resolution():
    imagenet, _ = resnet_trunk("resnet18", width=2)
    small, _ = resnet_trunk("resnet18", width=2, stem="small")
    x = torch.rand(1, 3, 32, 32)
    # the stem's output: 32 px → 8 px (stride-2 conv, max-pool) or 32 px (3×3 conv, stride 1)
    assert imagenet[:4](x).shape[-1] == 8 and small[:3](x).shape[-1] == 32
    assert isinstance(small[0], nn.Conv2d) and small[0].kernel_size == (3, 3) and small[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.modules())


def test_mlp_cnn_and_unknown_names():
    mlp = make_encoder("mlp", in_dim=64, hidden=16, dim=8)
    cnn = make_encoder("cnn", side=8, hidden=16, dim=8)
    x = torch.rand(5, 64)
    for encoder in (mlp, cnn):
        assert isinstance(encoder, Encoder) and encoder.features(x).shape == (5, 16)
        torch.testing.assert_close(encoder(x).norm(dim=1), torch.ones(5))
    with pytest.raises(UserError, match="did you mean: resnet18"):
        make_encoder("resnet19")


def test_cpu_forward_is_plain_fp32():
    """On the CPU the mixed-precision switch changes nothing: fp32 throughout."""
    encoder = make_encoder("resnet18", dim=4, mlp_dim=8, width=2, stem="small").eval()
    assert encoder.mixed_precision
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = encoder(x)
        with full_precision():
            again = encoder(x)
        manual = F.normalize(encoder.head(encoder.backbone(x)), dim=1)
    assert out.dtype == torch.float32
    assert torch.equal(out, again) and torch.equal(out, manual)
