"""Density voxelizer: the sum of radiative Gaussians sampled on a regular grid.

    V(x_j) = Σ_i rho_i exp(-1/2 (x_j - p_i)^T Sigma_i^-1 (x_j - p_i))

over the Gaussians whose ``cutoff``-sigma bounding box holds voxel centre ``x_j``. Units are
those of rho (1/mm: linear attenuation), so the DRR of the voxelized volume equals the
rasterized image up to discretisation (tested).

The grid is any ``(K, J, I)`` array with a 4x4 ``affine`` from voxel index ``(i, j, k)`` to
C-arm mm (any origin, spacing, direction). Work happens in index space: each Gaussian's
index-space box is enumerated flat, evaluated, and scatter-added, in chunks.
:func:`voxelize_dense` is the plain reference twin.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from ..volume import Volume
from ._scatter import box_scatter_add

__all__ = ["voxelize", "voxelize_many", "voxelize_dense", "to_volume"]


def _index_space(position, precision, covariance, affine, dev, dt):
    A = torch.as_tensor(np.asarray(affine, dtype=np.float64), device=dev)
    L = A[:3, :3].to(dt)
    Linv = torch.linalg.inv(A[:3, :3]).to(dt)
    mean = (position - A[:3, 3].to(dt)) @ Linv.T                      # (N, 3) continuous (i, j, k)
    prec = L.T @ precision @ L                                        # (N, 3, 3) in index units
    cov_diag = torch.einsum("ab,nbc,ac->na", Linv, covariance, Linv)  # diag(Linv Sigma Linv^T)
    return mean, prec, cov_diag


def _cube_values(P, q0, rho, ext, B: int) -> torch.Tensor:
    """(n, B, B, B) densities on B^3 cubes: precisions P (n, 3, 3) in index units, cube corner
    minus mean q0 (n, 3), densities rho (n,), true extents ext (n, 3) along (i, j, k); zero
    outside the true box (a huge exponent there, clamped: ~1e-35)."""
    dt = q0.dtype
    ar = torch.arange(B, device=q0.device, dtype=dt)
    big = torch.tensor(1e30, dtype=dt, device=q0.device)
    zero = torch.zeros((), dtype=dt, device=q0.device)
    x = (q0[:, 0, None] + ar)[:, None, None, :]                         # (n, 1, 1, B)
    y = (q0[:, 1, None] + ar)[:, None, :, None]                         # (n, 1, B, 1)
    z = (q0[:, 2, None] + ar)[:, :, None, None]                         # (n, B, 1, 1)
    p = lambda a, b: P[:, a, b][:, None, None, None]                    # noqa: E731
    out_x = torch.where(ar < ext[:, 0, None].to(dt), zero, big)[:, None, None, :]
    out_yz = (torch.where(ar < ext[:, 1, None].to(dt), zero, big)[:, None, :, None]
              + torch.where(ar < ext[:, 2, None].to(dt), zero, big)[:, :, None, None])
    lin = -(p(0, 1) * y + p(0, 2) * z)                                  # (n, B, B, 1), times -1/2 * 2
    quad = -0.5 * (p(1, 1) * y * y + 2.0 * p(1, 2) * y * z + p(2, 2) * z * z) - out_yz
    e = x * ((-0.5) * p(0, 0) * x + lin) + (quad - out_x)              # (n, B, B, B): -1/2 q^T P q
    return rho[:, None, None, None] * torch.exp(torch.clamp(e, min=-80.0))   # exp is slow on huge negatives


def voxelize(density: torch.Tensor, position: torch.Tensor, covariance: torch.Tensor, precision: torch.Tensor,
             shape: tuple[int, int, int], affine, *, cutoff: float = 3.0,
             chunk_pairs: int | None = None) -> torch.Tensor:
    """Density of Gaussians (C-arm frame) on a grid.

    Each Gaussian's index-space box (``cutoff`` sigmas along each grid axis) is padded to a
    B x B x B cube (B from the rasterizer's size ladder); Gaussians of one B are evaluated as
    one broadcast batch (the exponent is a quadratic in the fastest index with per-row
    coefficients), masked to their true box, and scatter-added.

    Args:
        density (N,), position (N, 3), covariance and precision (N, 3, 3): the Gaussians.
        shape: ``(K, J, I)`` array shape. affine: (4, 4) voxel (i, j, k) -> C-arm mm.
        cutoff: support in sigmas along each grid axis.
        chunk_pairs: at most this many (padded) Gaussian/voxel pairs at once (default: the
            rasterizer's ``CHUNK_PAIRS`` of the device).
    Returns:
        (K, J, I) tensor of densities (1/mm).
    """
    return voxelize_many([(density, position, covariance, precision, affine)], shape, cutoff=cutoff,
                         chunk_pairs=chunk_pairs)[0]


def voxelize_many(items, shape: tuple[int, int, int], *, cutoff: float = 3.0,
                  chunk_pairs: int | None = None) -> torch.Tensor:
    """:func:`voxelize` of several Gaussian sets, each on its own grid of one ``shape``, in
    one pass (every set's Gaussians grouped by cube size together: one group loop for a
    batch, which is what a GPU needs).

    Args:
        items: (density (N_i,), position (N_i, 3), covariance, precision (N_i, 3, 3),
            affine (4, 4)) per set; tensors on one device, of one dtype.
        shape: ``(K, J, I)`` of every grid.
    Returns:
        (S, K, J, I) tensor: set i's density on its grid.
    """
    from .rasterizer import _LADDER, _bucket, chunk_pairs_for

    K, J, I = (int(x) for x in shape)
    items = list(items)
    if not items:
        raise ValueError("no Gaussian sets to voxelize")
    dev, dt = items[0][1].device, items[0][1].dtype
    chunk_pairs = chunk_pairs_for(dev, chunk_pairs)
    means, precs, diags, dens, vol = [], [], [], [], []
    for k, (density, position, covariance, precision, affine) in enumerate(items):
        mean, prec, cov_diag = _index_space(position, precision, covariance, affine, dev, dt)
        means.append(mean)
        precs.append(prec)
        diags.append(cov_diag)
        dens.append(density)
        vol.append(torch.full((density.shape[0],), k, dtype=torch.long, device=dev))
    mean, prec, density, vol = torch.cat(means), torch.cat(precs), torch.cat(dens), torch.cat(vol)
    with torch.no_grad():
        half = cutoff * torch.sqrt(torch.clamp(torch.cat(diags), min=0))
        size = torch.tensor([I, J, K], device=dev)
        lo = torch.clamp(torch.ceil(mean - half), min=0).long()
        hi = torch.minimum(torch.floor(mean + half).long(), size - 1)
        ext = hi - lo + 1                                                   # (N, 3) along i, j, k
        live = (ext > 0).all(dim=1)
        bucket = torch.where(live, _bucket(ext.max(dim=1).values), torch.full_like(live, -1, dtype=torch.long))
    used = [b for b in torch.unique(bucket).tolist() if b >= 0]
    if not used:
        return torch.zeros(len(items), K, J, I, dtype=dt, device=dev)
    pad = _LADDER[used[-1]]
    grad = torch.is_grad_enabled() and (density.requires_grad or mean.requires_grad or prec.requires_grad)
    Ip, Jp = I + pad, J + pad
    cube = (K + pad) * Jp * Ip
    out = torch.zeros(len(items) * cube, dtype=dt, device=dev)
    first = vol * cube + (lo[:, 2] * Jp + lo[:, 1]) * Ip + lo[:, 0]          # each box's first voxel
    for bi in used:
        B = _LADDER[bi]
        idx_all = torch.nonzero(bucket == bi).flatten()
        step = max(1, chunk_pairs // B ** 3)
        for c0 in range(0, idx_all.numel(), step):
            idx = idx_all[c0:c0 + step]
            args = (prec[idx], lo[idx].to(dt) - mean[idx], density[idx], ext[idx], B)
            val = checkpoint(_cube_values, *args, use_reentrant=False) if grad else _cube_values(*args)
            out = box_scatter_add(out, val, first[idx], B, (Jp * Ip, Ip, 1))
    return out.reshape(len(items), K + pad, Jp, Ip)[:, :K, :J, :I]


def voxelize_dense(density, position, precision, shape, affine) -> torch.Tensor:
    """Reference twin of :func:`voxelize`: every Gaussian at every voxel, no truncation."""
    K, J, I = (int(x) for x in shape)
    dev, dt = position.device, position.dtype
    A = torch.as_tensor(np.asarray(affine, dtype=np.float64), device=dev).to(dt)
    k, j, i = torch.meshgrid(*(torch.arange(n, device=dev, dtype=dt) for n in (K, J, I)), indexing="ij")
    x = torch.stack([i, j, k], -1).reshape(-1, 3) @ A[:3, :3].T + A[:3, 3]          # (X, 3) mm
    q = x[None, :, :] - position[:, None, :]                                      # (N, X, 3)
    e = torch.einsum("nxa,nab,nxb->nx", q, precision, q)
    return (density[:, None] * torch.exp(-0.5 * e)).sum(0).reshape(K, J, I)


def to_volume(values: torch.Tensor, affine) -> Volume:
    """A voxelized tensor as a :class:`~RadGSRegLib.volume.Volume` (C-arm frame), for NRRD."""
    return Volume(values.detach().cpu().numpy().astype(np.float32), np.asarray(affine, dtype=np.float64))
