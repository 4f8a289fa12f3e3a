"""Inference: a case's two X-rays and CT vertebra -> RadGS reconstruction + pose.

Takes a :class:`~RadGSRegLib.io.Case` (never its ground truth) and an input pose ``T_in``
(``T_ct_to_carm``) that puts the vertebra roughly where it is (the pose search's result in
the registration pipeline; the reconstruction cube is centred where ``T_in`` puts the
vertebra, so ``T_in`` must be within about ``roi_mm / 4`` of the truth).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from ..geometry import apply, orthonormalized
from ..region import VertebraRegion, cube_affine_batch
from ..volume import Volume
from .inputs import network_images, prepare_images
from .model import RadGSRegNet
from .recm import GaussianSet

__all__ = ["Prediction", "predict", "register_volume", "network_region"]


@dataclass
class Prediction:
    """What the network says about one case.

    Attributes:
        T_ct_to_carm: (4, 4) RegM's pose. recon: the voxelized RadGS (C-arm frame, 1/mm).
        gaussians: the predicted Gaussians (C-arm frame). region: the CT vertebra region
            (reusable by a 3-D/3-D refinement). runtime_s: per step.
    """

    T_ct_to_carm: np.ndarray
    recon: Volume
    gaussians: GaussianSet
    region: VertebraRegion
    runtime_s: dict


def predict(net: RadGSRegNet, case, T_in: np.ndarray, *, images: dict | None = None, valid: dict | None = None,
            device="cpu", region: VertebraRegion | None = None) -> Prediction:
    """Run RecM then RegM once (see the module docstring).

    Args:
        net: the loaded network. case: the :class:`~RadGSRegLib.io.Case` (CT, labels,
            vertebra label, X-rays, views). T_in: (4, 4) input pose.
        images: the X-rays already prepared as line integrals on the network's working
            detector, {"ap", "lat"} -> (image (P, P), View) with ``P = net.cfg.input_pixels``
            (e.g. the registration target's :meth:`~RadGSRegLib.register.target.Target.image`);
            None: made from ``case.xrays``. valid: their pixels that carry a signal
            (:func:`~RadGSRegLib.learned.inputs.network_images`).
        region: the vertebra region on the network's grid, if already built.
    """
    cfg = net.cfg
    net.eval()
    t0 = time.perf_counter()
    runtime = {}
    vr = region or network_region(net, case)
    if images is None:
        x, _, proj = prepare_images(case.xrays, case.views, case.image_kind, cfg.input_pixels)
    else:
        x, _, proj = network_images(images, valid)
    centre = apply(T_in, vr.centroid)
    runtime["prepare"] = time.perf_counter() - t0
    with torch.no_grad():
        t = time.perf_counter()
        c = torch.as_tensor(centre, dtype=torch.float32, device=device)[None]
        fact, rec = net.reconstruct(x[None].to(device), proj[None].to(device), c)
        A = cube_affine_batch(c.cpu(), cfg.roi_mm, cfg.voxels)
        runtime["reconstruction"] = time.perf_counter() - t
        t = time.perf_counter()
        T = orthonormalized(net.estimate(_regm_batch(vr, T_in, c, device), rec).cpu().numpy()[0])
        runtime["registration"] = time.perf_counter() - t
    recon = Volume(rec[0, 0].cpu().numpy().astype(np.float32), A[0].numpy().astype(np.float64))
    return Prediction(T, recon, fact[0], vr, runtime)


def network_region(net: RadGSRegNet, case) -> VertebraRegion:
    """The case's vertebra region on the network's grid (its cube side and voxel size)."""
    return VertebraRegion.of(case.ct, case.seg, case.vertebra_label, side_mm=net.cfg.roi_mm,
                             voxel_mm=net.cfg.voxel_mm)


def _regm_batch(vr: VertebraRegion, T_in: np.ndarray, centre: torch.Tensor, device) -> dict:
    """RegM's inputs but the volume, for one case (see :meth:`RadGSRegNet.estimate`)."""
    return {"ct": torch.as_tensor(vr.crop.array, dtype=torch.float32, device=device)[None],
            "ct_affine": torch.as_tensor(vr.crop.affine, dtype=torch.float32, device=device)[None],
            "T_in": torch.as_tensor(T_in, dtype=torch.float32, device=device)[None], "centre": centre}


def register_volume(net: RadGSRegNet, case, T_in: np.ndarray, volume: Volume, *, device="cpu",
                    region: VertebraRegion | None = None) -> np.ndarray:
    """RegM alone: the (4, 4) pose ``T_ct_to_carm`` it returns from ``T_in`` when fed
    ``volume`` (1/mm, C-arm frame) in place of RecM's reconstruction. ``volume`` must lie on
    the grid :func:`predict` uses for this ``T_in`` (its ``recon.affine``): e.g. the true
    vertebra volume there (:func:`~RadGSRegLib.region.ground_truth_volume`), which tells
    RegM's share of the network's error from RecM's (``radgsreg bench register``)."""
    cfg = net.cfg
    vr = region or network_region(net, case)
    c = torch.as_tensor(apply(T_in, vr.centroid), dtype=torch.float32, device=device)[None]
    A = cube_affine_batch(c.cpu(), cfg.roi_mm, cfg.voxels)[0].numpy()
    if volume.array.shape != (cfg.voxels,) * 3 or not np.allclose(volume.affine, A, atol=1e-3):
        raise ValueError(f"the volume is not on the network's grid for this input pose "
                         f"({cfg.voxels}^3 voxels of {cfg.voxel_mm:g} mm centred where T_in puts the vertebra)")
    net.eval()
    with torch.no_grad():
        v = torch.as_tensor(volume.array, dtype=torch.float32, device=device)[None, None]
        return orthonormalized(net.estimate(_regm_batch(vr, T_in, c, device), v).cpu().numpy()[0])
