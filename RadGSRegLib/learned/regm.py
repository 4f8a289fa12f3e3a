"""RegM: 3-D/3-D registration of the reconstruction to the CT vertebra (paper Sec. 2, Eq. 3).

Input: two channels on the reconstruction grid (C-arm frame, :func:`~RadGSRegLib.region.cube_affine_batch`):
the voxelized RadGS volume and the CT vertebra resampled there at the input pose
``T_in`` (``T_ct_to_carm``). A MONAI 3-D ResNet regresses a correction ``Δ`` (rotation
vector and translation, about the grid's centre, C-arm frame); the estimate is
``T = Δ ∘ T_in``. The last layer starts at zero, so an untrained RegM returns ``T_in``.
"""
from __future__ import annotations

import roma
import torch
from torch import nn

from .config import ModelConfig

__all__ = ["RegM", "pose_loss"]

ROT_SCALE = 0.25             # rad per unit of raw output
TRANS_SCALE = 10.0           # mm per unit of raw output
VOLUME_SCALE = 0.04          # 1/mm: bone-like attenuation -> ~1 at the network's input


def pose_loss(T: torch.Tensor, G: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Per-sample geodesic rotation error (rad) + translation error of the vertebra's
    centre ``points`` (B, 3) CT mm, in units of 10 mm. (B,)"""
    rot = roma.rotmat_geodesic_distance(T[:, :3, :3], G[:, :3, :3])
    a = torch.einsum("bij,bj->bi", T[:, :3, :3], points) + T[:, :3, 3]
    b = torch.einsum("bij,bj->bi", G[:, :3, :3], points) + G[:, :3, 3]
    return rot + (a - b).norm(dim=-1) / 10.0


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
