"""3-D/3-D refinement: the CT vertebra moved onto a reconstruction from the X-rays (NCC).

The reconstruction (learned RadGS or per-case Gaussian fit) lives on a cube in the C-arm
frame; the CT vertebra region (attenuation of its dilated label, CT frame) is resampled
there at a pose ``T`` with :func:`~RadGSRegLib.region.resample_region` (trilinear,
differentiable), and ``1 - NCC`` is minimised over a 6-DOF correction about the cube's
centre with Adam, on a blurred copy first and then on the volumes themselves. Cheap (a 32^3
grid: well under a second on a CPU) and independent of the X-ray/DRR domain gap, but only
as accurate as the reconstruction.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..geometry import apply_delta_torch, orthonormalized
from ..region import resample_region
from ..similarity import ncc_torch
from ..volume import Volume
from .config import Refine3DConfig

__all__ = ["Refine3DConfig", "refine_3d"]


def _blur(v: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return v
    r = int(np.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=v.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k.numel()
        pad = [0] * 6
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = r
        v = F.conv3d(F.pad(v, pad, mode="replicate"), k.reshape(shape))
    return v


def refine_3d(recon: Volume, region: Volume, T: np.ndarray, config: Refine3DConfig | None = None) -> tuple[np.ndarray, dict]:
    """Pose ``T_ct_to_carm`` that best aligns ``region`` (CT frame) with ``recon`` (C-arm
    frame cube, K = J = I) by NCC, starting at ``T``. Returns (T, info with the NCC before
    and after)."""
    cfg = config or Refine3DConfig()
    n = recon.array.shape[0]
    if recon.array.shape != (n, n, n):
        raise ValueError(f"the reconstruction grid must be a cube, got {recon.array.shape}")
    rec = torch.as_tensor(recon.array, dtype=torch.float32)[None, None]
    ct = torch.as_tensor(region.array, dtype=torch.float32)[None, None]
    cta = torch.as_tensor(region.affine, dtype=torch.float32)[None]
    ga = torch.as_tensor(recon.affine, dtype=torch.float32)[None]
    T0 = torch.as_tensor(T, dtype=torch.float32)[None]
    centre = ga[:, :3, :3].sum(-1) * (n - 1) / 2 + ga[:, :3, 3]
    x = torch.zeros(1, 6, requires_grad=True)
    unit = torch.tensor([cfg.rot_unit] * 3 + [cfg.trans_unit] * 3)

    def ncc(target, Tk):
        return ncc_torch(_blur(resample_region(ct, cta, Tk, ga, n), sig), target)[0]

    sig = 0.0
    with torch.no_grad():
        before = float(ncc(rec, T0))
    for iters, sig in zip(cfg.iterations, cfg.blur_voxels):
        target = _blur(rec, sig)
        opt = torch.optim.Adam([x], lr=cfg.lr)
        for _ in range(iters):
            opt.zero_grad()
            loss = 1 - ncc(target, apply_delta_torch(x * unit, T0, centre))
            loss.backward()
            opt.step()
    with torch.no_grad():
        Tn = apply_delta_torch(x * unit, T0, centre)
        sig = 0.0
        after = float(ncc(rec, Tn))
    out = orthonormalized(Tn[0].numpy())
    if after < before:                                         # never make it worse than the start
        return np.asarray(T, dtype=np.float64), {"ncc_before": before, "ncc_after": before, "kept_input": True}
    return out, {"ncc_before": before, "ncc_after": after, "kept_input": False}
