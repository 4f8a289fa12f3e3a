"""Losses shared by per-case fitting and training (RadGS-Reg Eq. 2-3).

Images are (B, 1, H, W) or (V, H, W) tensors; volumes (D, H, W) or (B, 1, D, H, W).
SSIM comes from MONAI (Gaussian window sigma 1.5, K1 0.01, K2 0.03).
"""
from __future__ import annotations

import torch

__all__ = ["ssim_loss", "tv_3d", "projection_loss"]

_SSIM = {}


def ssim_loss(x: torch.Tensor, y: torch.Tensor, *, spatial_dims: int = 2, data_range: float = 1.0) -> torch.Tensor:
    """1 - SSIM (MONAI's SSIMLoss), for images (N, 1, H, W) or volumes (N, 1, D, H, W)."""
    from monai.losses import SSIMLoss

    key = (spatial_dims, float(data_range))
    if key not in _SSIM:
        _SSIM[key] = SSIMLoss(spatial_dims=spatial_dims, data_range=data_range)
    return _SSIM[key](x, y)


def tv_3d(v: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between neighbouring voxels (anisotropic 3-D total variation)."""
    v = v.reshape(v.shape[-3:])
    return ((v[1:] - v[:-1]).abs().mean() + (v[:, 1:] - v[:, :-1]).abs().mean()
            + (v[:, :, 1:] - v[:, :, :-1]).abs().mean()) / 3.0


def projection_loss(pred: torch.Tensor, target: torch.Tensor, *, lambda_ssim: float = 0.2,
                    scale: float | None = None) -> torch.Tensor:
    """L1 + lambda_ssim * (1 - SSIM) between (V, H, W) projections, both divided by ``scale``
    (default: the target's maximum) so that SSIM's data range is 1."""
    s = float(target.detach().abs().max()) if scale is None else scale
    p, t = pred / s, target / s
    return (p - t).abs().mean() + lambda_ssim * ssim_loss(p[:, None], t[:, None], spatial_dims=2)
