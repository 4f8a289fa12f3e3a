"""The vertebra region and the cubes it is seen on: the one home of both.

Two grids appear wherever a vertebra is reconstructed or compared in 3-D:

- the **reconstruction cube** (C-arm frame): an axis-aligned cube around where a pose puts
  the vertebra; the learned network's RecM/RegM grid, the per-case Gaussian fit's grid and
  metrics.md's reconstruction target all live on one (:func:`cube_affine`,
  :func:`cube_affine_batch` for torch batches);
- the **vertebra region** (CT frame): the CT's attenuation inside the vertebra's label
  dilated by a few mm (:func:`vertebra_region`), and that region on a CT-frame cube around
  the vertebra's centroid (:class:`VertebraRegion`), which a pose moves onto a
  reconstruction cube (3-D/3-D refinement, RegM, its training loss).

Voxel centres: a cube of ``n`` voxels of ``voxel_mm`` centred on ``c`` has its first voxel
centre at ``c - (n - 1) / 2 * voxel_mm`` on every axis; ``n = round(side_mm / voxel_mm)``.
Arrays are ``[k, j, i]`` with affines mapping ``(i, j, k, 1)`` to mm (:mod:`.volume`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .volume import Volume, affine_from, resample_to_grid

__all__ = ["cube_affine", "cube_affine_batch", "cube_voxels", "vertebra_region", "ground_truth_volume",
           "VertebraRegion", "CROP_FACTOR", "resample_region"]

#: a CT-frame region cube is this many times the reconstruction cube's side: room for the
#: pose to rotate the vertebra's corners into the reconstruction cube
CROP_FACTOR = 1.25


def cube_voxels(side_mm: float, voxel_mm: float) -> int:
    """Voxels per side of a cube of ``side_mm`` at ``voxel_mm`` (rounded, at least 1)."""
    if side_mm <= 0 or voxel_mm <= 0:
        raise ValueError(f"a cube needs a positive side and voxel size, got {side_mm} mm / {voxel_mm} mm")
    return max(1, int(round(side_mm / voxel_mm)))


def cube_affine(centre, side_mm: float, voxel_mm: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """An axis-aligned cube centred on ``centre`` (3,) mm of any frame.

    Returns:
        ``((n, n, n), affine)``: the array shape ``[k, j, i]`` and the (4, 4) float64 affine
        voxel ``(i, j, k)`` -> mm of ``centre``'s frame, ``n = round(side_mm / voxel_mm)``.
    """
    n = cube_voxels(side_mm, voxel_mm)
    origin = np.asarray(centre, dtype=np.float64).reshape(3) - (n - 1) / 2 * voxel_mm
    return (n, n, n), affine_from(origin, [voxel_mm] * 3)


def cube_affine_batch(centre, side_mm: float, voxels: int):
    """:func:`cube_affine` for a batch, in torch: ``voxels`` per side of ``side_mm`` around
    each of ``centre`` (B, 3) mm. Returns a (B, 4, 4) float32 tensor (voxel -> mm) on
    ``centre``'s device."""
    import torch

    centre = torch.as_tensor(centre, dtype=torch.float32).reshape(-1, 3)
    sp = side_mm / voxels
    A = torch.eye(4, device=centre.device).repeat(centre.shape[0], 1, 1)
    A[:, :3, :3] *= sp
    A[:, :3, 3] = centre - side_mm / 2 + sp / 2          # = centre - (voxels - 1) / 2 * sp
    return A


def vertebra_region(ct: Volume, seg: Volume, label: int, *, dilate_mm: float = 3.0) -> Volume:
    """Attenuation (1/mm, float32) of the CT's vertebra region: CT x label dilated by
    ``dilate_mm``, zero elsewhere; on the CT's grid (CT frame)."""
    from scipy import ndimage

    from .drr import hu_to_mu

    it = max(1, int(round(dilate_mm / float(np.min(seg.spacing)))))
    mask = ndimage.binary_dilation(seg.array == label, iterations=it)
    return Volume((hu_to_mu(ct.array) * mask).astype(np.float32), ct.affine)


def ground_truth_volume(ct: Volume, seg: Volume, label: int, T_ct_to_carm, shape, affine, *,
                        dilate_mm: float = 3.0) -> Volume:
    """The reconstruction target (metrics.md): :func:`vertebra_region` resampled at the
    true pose ``T_ct_to_carm`` (4, 4) onto a C-arm grid (``shape`` ``[k, j, i]``, ``affine``
    voxel -> C-arm mm). Returns a Volume in 1/mm (see :func:`~RadGSRegLib.drr.hu_to_mu`)."""
    return resample_to_grid(vertebra_region(ct, seg, label, dilate_mm=dilate_mm), shape, affine, T_ct_to_carm)


def resample_region(ct: torch.Tensor, ct_affine: torch.Tensor, T: torch.Tensor, grid_affine: torch.Tensor,
                voxels: int) -> torch.Tensor:
    """A CT-frame volume (the vertebra region) placed by ``T`` and sampled on a cube
    (torch, differentiable in ``T``): RegM's second channel, its loss, the 3-D/3-D refinement.

    Args:
        ct: (B, 1, K, J, I) CT-frame volume. ct_affine: (B, 4, 4) its voxel -> CT mm.
        T: (B, 4, 4) ``T_ct_to_carm``. grid_affine: (B, 4, 4) grid voxel -> C-arm mm.
        voxels: grid size per side.
    Returns:
        (B, 1, voxels, voxels, voxels), trilinear, zero outside the CT volume.
    """
    import torch
    import torch.nn.functional as F

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


@dataclass
class VertebraRegion:
    """One vertebra of one CT, prepared once and reused (registration, training samples).

    Attributes:
        ct: the CT (HU, CT frame). label: the vertebra's label value.
        centroid: (3,) CT mm, the label's centroid.
        region: :func:`vertebra_region` on the CT grid (1/mm).
        crop: ``region`` on a CT-frame cube of side ``CROP_FACTOR * side_mm`` around the
            centroid, at ``voxel_mm``.
    """

    ct: Volume
    label: int
    centroid: np.ndarray
    region: Volume
    crop: Volume

    @classmethod
    def of(cls, ct: Volume, seg: Volume, label: int, *, side_mm: float, voxel_mm: float,
           dilate_mm: float = 3.0) -> "VertebraRegion":
        """The region of ``label`` for a reconstruction cube of ``side_mm`` at ``voxel_mm``."""
        if not np.any(seg.array == label):
            raise ValueError(f"label {label} is not in the label map")
        region = vertebra_region(ct, seg, label, dilate_mm=dilate_mm)
        c = seg.label_centroid(label)
        shape, A = cube_affine(c, CROP_FACTOR * side_mm, voxel_mm)
        return cls(ct, int(label), c, region, resample_to_grid(region, shape, A))

    @property
    def drr(self):
        """A projector of ``region`` alone (:class:`~RadGSRegLib.drr.DRR`, built on first use):
        the vertebra's own projection, the target of the network's image loss."""
        if getattr(self, "_drr", None) is None:
            from .drr import DRR

            self._drr = DRR(self.region.array, self.region.affine)
        return self._drr
