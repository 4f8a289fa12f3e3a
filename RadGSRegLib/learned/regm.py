"""RegM: 3-D/3-D registration of the reconstruction to the CT vertebra (paper Sec. 2, Eq. 3).

Input: two channels on the reconstruction grid (C-arm frame, :func:`~RadGSRegLib.region.cube_affine_batch`):
the voxelized RadGS volume and the CT vertebra resampled there at the input pose
``T_in`` (``T_ct_to_carm``). RegM returns a correction ``Δ`` (rotation vector and
translation, about the grid's centre, C-arm frame); the estimate is ``T = Δ ∘ T_in``.
Two kinds (``ModelConfig.regm``), each starting as the identity (an untrained RegM
returns ``T_in``):

- ``"resnet"`` (:class:`RegM`, the paper's form): a MONAI 3-D ResNet regresses ``Δ``
  from the globally pooled features.
- ``"flow"`` (:class:`FlowRegM`): a MONAI 3-D U-Net predicts, at every voxel, where the CT
  point seen there at ``T_in`` lies in the reconstruction (a displacement, mm) and how much
  to trust it (a weight); ``Δ`` is the weighted least-squares rigid fit of those
  correspondences (Kabsch, :func:`roma.rigid_points_registration`). Translation-equivariant
  and without global pooling before the pose, so it is not held to a voxel by a regressor.
"""
from __future__ import annotations

import roma
import torch
from torch import nn

from .config import ModelConfig

__all__ = ["RegM", "FlowRegM", "make_regm", "pose_loss", "grid_offsets", "true_flow", "support"]

ROT_SCALE = 0.25             # rad per unit of raw output
TRANS_SCALE = 10.0           # mm per unit of raw output
VOLUME_SCALE = 0.04          # 1/mm: bone-like attenuation -> ~1 at the network's input
FLOW_SCALE = 10.0            # mm of displacement per unit of FlowRegM's raw output


def pose_loss(T: torch.Tensor, G: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Per-sample geodesic rotation error (rad) + translation error of the vertebra's
    centre ``points`` (B, 3) CT mm, in units of 10 mm. (B,)"""
    rot = roma.rotmat_geodesic_distance(T[:, :3, :3], G[:, :3, :3])
    a = torch.einsum("bij,bj->bi", T[:, :3, :3], points) + T[:, :3, 3]
    b = torch.einsum("bij,bj->bi", G[:, :3, :3], points) + G[:, :3, 3]
    return rot + (a - b).norm(dim=-1) / 10.0


def grid_offsets(voxels: int, voxel_mm: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(V³, 3) the reconstruction grid's voxel centres relative to its centre (mm, C-arm
    axes x, y, z), in the order of a (V, V, V) array flattened (index [k, j, i] -> (i, j, k))."""
    r = (torch.arange(voxels, device=device, dtype=dtype) - (voxels - 1) / 2) * voxel_mm
    k, j, i = torch.meshgrid(r, r, r, indexing="ij")
    return torch.stack([i, j, k], -1).reshape(-1, 3)


def true_flow(T_in: torch.Tensor, G: torch.Tensor, centre: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(B, V³, 3) the displacement (mm) that takes each grid point ``centre + offsets``
    (C-arm mm), where ``T_in`` (B, 4, 4) puts a CT point, to where the truth ``G`` puts it:
    ``G T_in⁻¹ x - x``. centre (B, 3); offsets (V³, 3) from :func:`grid_offsets`."""
    D = G @ torch.linalg.inv(T_in)
    x = centre[:, None, :] + offsets[None]
    return torch.einsum("bij,bmj->bmi", D[:, :3, :3], x) + D[:, None, :3, 3] - x


def support(volume: torch.Tensor) -> torch.Tensor:
    """(B, 1, V, V, V) 1.0 where ``volume`` (1/mm) holds tissue (above a quarter of bone-like
    attenuation), else 0.0: the voxels where FlowRegM's correspondences are weighed and supervised."""
    return (volume > 0.25 * VOLUME_SCALE).to(volume.dtype)


class RegM(nn.Module):
    """(reconstruction, CT at T_in) on one grid -> correction Δ: a 3-D ResNet regressor
    (see the module docstring)."""

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


class FlowRegM(nn.Module):
    """(reconstruction, CT at T_in) -> per-voxel correspondences -> rigid fit Δ (see the
    module docstring). ``regm_channels`` are the U-Net's widths (4 levels)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        from monai.networks.nets import UNet

        self.cfg = cfg
        ch = list(cfg.regm_channels)
        self.net = UNet(spatial_dims=3, in_channels=2, out_channels=ch[0], channels=ch,
                        strides=[2] * (len(ch) - 1), num_res_units=1)
        self.head = nn.Conv3d(ch[0], 4, 1)          # 3 displacement channels (x, y, z) + a weight logit
        with torch.no_grad():                       # zero flow, uniform weights: Δ = identity
            self.head.weight.zero_()
            self.head.bias.zero_()

    def field(self, recon: torch.Tensor, ct_at_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The correspondences: ((B, V³, 3) displacement, mm, C-arm axes; (B, V³) weights
        summing to 1), voxels in :func:`grid_offsets`' order.

        Args:
            recon, ct_at_input: (B, 1, V, V, V) attenuation (1/mm) on the reconstruction grid.
        """
        out = self.head(self.net(torch.cat([recon, ct_at_input], 1) / VOLUME_SCALE))
        B = out.shape[0]
        flow = out[:, :3].reshape(B, 3, -1).transpose(1, 2) * FLOW_SCALE
        # only where the CT shows something at T_in can a correspondence be seen: the weights
        # live there (a soft mask: log 1e-6 ~ -14 on the logits elsewhere; all voxels alike
        # when it shows nothing in the cube)
        seen = support(ct_at_input).reshape(B, -1)
        weight = torch.softmax(out[:, 3].reshape(B, -1) + torch.log(seen + 1e-6), dim=1)
        return flow, weight

    def fit(self, flow: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """(B, 6) Δ (rotation vector rad, translation mm, about the grid's centre): the
        weighted rigid fit of grid points to grid points + ``flow`` (:meth:`field`)."""
        y = grid_offsets(self.cfg.voxels, self.cfg.voxel_mm, device=flow.device, dtype=flow.dtype)
        y = y.expand(flow.shape[0], -1, -1)
        R, t = roma.rigid_points_registration(y, y + flow, weights=weight)
        return torch.cat([roma.rotmat_to_rotvec(R), t], 1)

    def forward(self, recon: torch.Tensor, ct_at_input: torch.Tensor) -> torch.Tensor:
        """(B, 6) correction: rotation vector (rad), translation (mm); see :meth:`field`."""
        return self.fit(*self.field(recon, ct_at_input))


def make_regm(cfg: ModelConfig) -> nn.Module:
    """The RegM of ``cfg.regm``: :class:`RegM` ("resnet") or :class:`FlowRegM` ("flow")."""
    return FlowRegM(cfg) if cfg.regm == "flow" else RegM(cfg)
