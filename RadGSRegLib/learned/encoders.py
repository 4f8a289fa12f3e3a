"""RecM's 2-D image encoders, built from MONAI's networks.

Every encoder maps a (B, 1, P, P) normalised X-ray to a (B, C, h, w) feature map covering
the same detector area (h = w = P / stride); features are later sampled at the
projections of 3-D anchors, so only the map's extent matters, not its stride.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["make_encoder"]


class _ResNetTrunk(nn.Module):
    """The stem and the first ``n_layers`` stages of a MONAI ResNet (no pooling head)."""

    def __init__(self, net, n_layers: int, out_channels: int, in_channels: int):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act, *([] if net.no_max_pool else [net.maxpool]))
        self.layers = nn.Sequential(*[getattr(net, f"layer{i + 1}") for i in range(n_layers)])
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.proj(self.layers(self.stem(x)))


class _DenseTrunk(nn.Module):
    def __init__(self, out_channels: int):
        super().__init__()
        from monai.networks.nets import DenseNet121

        feats = DenseNet121(spatial_dims=2, in_channels=1, out_channels=1).features
        keep = []
        for name, mod in feats.named_children():
            keep.append(mod)
            if name == "transition2":                     # stride 16: 8 x 8 at 128 px
                break
        self.body = nn.Sequential(*keep)
        with torch.no_grad():
            c = self.body(torch.zeros(1, 1, 64, 64)).shape[1]
        self.proj = nn.Conv2d(c, out_channels, 1)

    def forward(self, x):
        return self.proj(self.body(x))


class _ViTTrunk(nn.Module):
    def __init__(self, pixels: int, out_channels: int, patch: int = 16):
        super().__init__()
        from monai.networks.nets import ViT

        if pixels % patch:
            raise ValueError(f"the ViT encoder needs image_pixels divisible by {patch}, got {pixels}")
        self.side = pixels // patch
        self.vit = ViT(in_channels=1, img_size=pixels, patch_size=patch, hidden_size=192, mlp_dim=768, num_layers=6,
                       num_heads=6, spatial_dims=2)
        self.proj = nn.Conv2d(192, out_channels, 1)

    def forward(self, x):
        tokens, _ = self.vit(x)                                            # (B, side^2, 192)
        b = tokens.shape[0]
        return self.proj(tokens.transpose(1, 2).reshape(b, -1, self.side, self.side))


def make_encoder(backbone: str, out_channels: int, pixels: int) -> nn.Module:
    """The encoder named ``backbone`` ("small", "resnet50", "densenet121", "vit")."""
    from monai.networks.nets import ResNet

    if backbone == "small":
        # stride 4 (conv 7 stride 2, no max-pool; layer2 strides 2): 32 x 32 features at 128 px
        net = ResNet("basic", [1, 1, 1, 1], [16, 32, 64, 128], spatial_dims=2, n_input_channels=1, conv1_t_stride=2,
                     no_max_pool=True, num_classes=1)
        return _ResNetTrunk(net, 2, out_channels, 32)
    if backbone == "resnet50":
        net = ResNet("bottleneck", [3, 4, 6, 3], [64, 128, 256, 512], spatial_dims=2, n_input_channels=1,
                     conv1_t_stride=2, num_classes=1)
        return _ResNetTrunk(net, 3, out_channels, 1024)                     # stride 16
    if backbone == "densenet121":
        return _DenseTrunk(out_channels)
    if backbone == "vit":
        return _ViTTrunk(pixels, out_channels)
    raise ValueError(f"unknown backbone {backbone!r}")
