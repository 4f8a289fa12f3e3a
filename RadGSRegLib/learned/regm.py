"""RegM: 3-D/3-D registration of the reconstruction to the CT vertebra (paper Sec. 2, Eq. 3).

Input: two channels on the reconstruction grid (C-arm frame, :func:`.recm.roi_affine`):
the voxelized RadGS volume and the CT vertebra resampled there at the input pose
``T_in`` (``T_ct_to_carm``). A MONAI 3-D ResNet regresses a correction ``Δ`` (rotation
vector and translation, about the grid's centre, C-arm frame); the estimate is
``T = Δ ∘ T_in``. The last layer starts at zero, so an untrained RegM returns ``T_in``.
"""
from __future__ import annotations

import roma
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

__all__ = ["RegM", "resample_ct", "apply_correction", "pose_loss", "ncc_3d"]

ROT_SCALE = 0.25             # rad per unit of raw output
TRANS_SCALE = 10.0           # mm per unit of raw output
VOLUME_SCALE = 0.04          # 1/mm: bone-like attenuation -> ~1 at the network's input


def resample_ct(ct: torch.Tensor, ct_affine: torch.Tensor, T: torch.Tensor, grid_affine: torch.Tensor,
                voxels: int) -> torch.Tensor:
    """The CT vertebra volume placed by ``T`` and sampled on a grid (differentiable in ``T``).

    Args:
        ct: (B, 1, K, J, I) CT-frame volume. ct_affine: (B, 4, 4) its voxel -> CT mm.
        T: (B, 4, 4) ``T_ct_to_carm``. grid_affine: (B, 4, 4) grid voxel -> C-arm mm.
        voxels: grid size per side.
    Returns:
        (B, 1, voxels, voxels, voxels), trilinear, zero outside the CT volume.
    """
    B = ct.shape[0]
    dev, dt = ct.device, ct.dtype
    r = torch.arange(voxels, device=dev, dtype=dt)
    k, j, i = torch.meshgrid(r, r, r, indexing="ij")
    ijk = torch.stack([i, j, k, torch.ones_like(i)], -1).reshape(-1, 4)                 # (M, 4)
    x = ijk @ grid_affine.transpose(1, 2)                                                # (B, M, 4) C-arm
    R, t = T[:, :3, :3], T[:, :3, 3]
    p = torch.einsum("bji,bmj->bmi", R, x[..., :3] - t[:, None, :])                      # R^T (x - t): CT mm
    Ainv = torch.linalg.inv(ct_affine)
    q = p @ Ainv[:, :3, :3].transpose(1, 2) + Ainv[:, None, :3, 3]                       # CT voxel (i, j, k)
    size = torch.tensor(ct.shape[-3:][::-1], device=dev, dtype=dt)                       # (I, J, K)
    g = (q + 0.5) / size * 2 - 1
    out = F.grid_sample(ct, g.reshape(B, voxels, voxels, voxels, 3), mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out


def apply_correction(delta: torch.Tensor, T_in: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """``Δ ∘ T_in`` with ``Δ`` (B, 6) = (rotation vector rad, translation mm) about ``centre``
    (B, 3) mm: ``x -> R_Δ (x - c) + c + t_Δ``."""
    R = roma.rotvec_to_rotmat(delta[:, :3])
    T = T_in.clone()
    T[:, :3, :3] = R @ T_in[:, :3, :3]
    T[:, :3, 3] = torch.einsum("bij,bj->bi", R, T_in[:, :3, 3] - centre) + centre + delta[:, 3:]
    return T


def pose_loss(T: torch.Tensor, G: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Per-sample geodesic rotation error (rad) + translation error of the vertebra's
    centre ``points`` (B, 3) CT mm, in units of 10 mm. (B,)"""
    rot = roma.rotmat_geodesic_distance(T[:, :3, :3], G[:, :3, :3])
    a = torch.einsum("bij,bj->bi", T[:, :3, :3], points) + T[:, :3, 3]
    b = torch.einsum("bij,bj->bi", G[:, :3, :3], points) + G[:, :3, 3]
    return rot + (a - b).norm(dim=-1) / 10.0


def ncc_3d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Global normalised cross-correlation per sample of (B, 1, D, H, W) volumes. (B,)"""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-8)


class RegM(nn.Module):
    """(reconstruction, CT at T_in) on one grid -> correction Δ (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from monai.networks.nets import ResNet

        self.cfg = cfg
        self.net = ResNet("basic", [1, 1, 1, 1], list(cfg.regm_channels), spatial_dims=3, n_input_channels=2,
                          conv1_t_stride=2, num_classes=6)
        with torch.no_grad():
            self.net.fc.weight.zero_()
            self.net.fc.bias.zero_()

    def forward(self, recon: torch.Tensor, ct_at_input: torch.Tensor) -> torch.Tensor:
        """(B, 6) correction: rotation vector (rad), translation (mm).

        Args:
            recon, ct_at_input: (B, 1, V, V, V) attenuation (1/mm) on the reconstruction grid.
        """
        raw = self.net(torch.cat([recon, ct_at_input], 1) / VOLUME_SCALE)
        return torch.cat([raw[:, :3] * ROT_SCALE, raw[:, 3:] * TRANS_SCALE], 1)
