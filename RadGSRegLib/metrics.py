"""Registration and reconstruction metrics, exactly as ``shared/docs/metrics.md`` defines them.

Registration: mTRE over target points (centres of the registered vertebra's label voxels,
CT LPS mm), success (mTRE < 2 mm), capture range over 5 mm initial-mTRE bins, rotation and
translation errors, mean projection distance. Transforms are ``T_ct_to_carm`` 4x4s.
"""
from __future__ import annotations

import numpy as np

from .geometry import apply, geodesic_deg, mtre
from .volume import Volume

__all__ = ["target_points", "mtre", "registration_errors", "truth_errors", "SUCCESS_MM", "recon_metrics",
           "success_rate", "capture_range"]

SUCCESS_MM = 2.0


def target_points(seg: Volume, label: int, *, max_points: int = 5000, seed: int = 0) -> np.ndarray:
    """(N, 3) CT-frame mm centres of the voxels of ``label`` (a fixed random subset of
    ``max_points`` if there are more; metrics.md asks for all or >= 2000)."""
    if max_points < 2000:
        raise ValueError("metrics.md asks for at least 2000 target points")
    pts = seg.label_points(label, max_points=max_points, seed=seed)
    if len(pts) == 0:
        raise ValueError(f"label {label} has no voxels")
    return pts


def registration_errors(T, G, points, views=None) -> dict:
    """mTRE (mm), rotation error (geodesic, deg), translation error (mm, of the target
    centroid) and, with views, mean projection distance (mm in the detector plane).

    Args:
        T: estimate, G: truth, (4, 4) ``T_ct_to_carm``; points (N, 3) CT mm.
        views: optional {name: View}; mPD averages over views and points.
    """
    out = {"mtre_mm": mtre(T, G, points),
           "rot_err_deg": geodesic_deg(T, G),
           "trans_err_mm": float(np.linalg.norm(apply(T, points.mean(0)) - apply(G, points.mean(0))))}
    if views:
        d = []
        for v in views.values():
            a, b = v.project(apply(T, points)), v.project(apply(G, points))
            d.append(np.linalg.norm((a - b) * np.asarray(v.pixel_spacing), axis=1).mean())
        out["mpd_mm"] = float(np.mean(d))
    return out


def truth_errors(case, T) -> dict:
    """How far the pose ``T`` (``T_ct_to_carm``) is from the case's ground truth:
    :func:`registration_errors` (mTRE, rotation and translation errors,
    mean projection distance over the case's views) on 2000 target points of its vertebra
    (metrics.md). ``case``: a :class:`~RadGSRegLib.io.Case` with its ground truth and vertebra
    labels (a generated case, or one read with ``ground_truth=True``)."""
    if case.ground_truth is None or case.seg is None:
        raise ValueError("truth_errors needs a case with its ground truth and vertebra labels")
    pts = target_points(case.seg, case.vertebra_label, max_points=2000)
    return registration_errors(T, case.ground_truth, pts, case.views)


def recon_metrics(recon: np.ndarray, gt: np.ndarray) -> dict:
    """PSNR (dB) and 3-D SSIM (%) of a reconstruction against the ground truth on the same
    grid, both scaled by the map GT min -> 0, GT max -> 1 (metrics.md)."""
    import torch
    from monai.metrics.regression import SSIMMetric

    gt = np.asarray(gt, dtype=np.float64)
    lo, hi = gt.min(), gt.max()
    if hi <= lo:
        raise ValueError("the ground-truth volume is constant")
    a = (np.asarray(recon, dtype=np.float64) - lo) / (hi - lo)
    b = (gt - lo) / (hi - lo)
    mse = float(np.mean((a - b) ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)
    m = SSIMMetric(spatial_dims=3, data_range=1.0, kernel_type="gaussian", win_size=11, kernel_sigma=1.5,
                   k1=0.01, k2=0.03)
    ssim = float(m(torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float()).mean())
    return {"psnr_db": psnr, "ssim_pct": 100.0 * ssim}


def mass_offset(volume: np.ndarray, affine: np.ndarray, *, floor: float = 0.3) -> np.ndarray:
    """(3,) mm: where a volume's mass lies relative to its grid's centre, in the frame of
    ``affine`` (4, 4, voxel ``[i, j, k]`` -> mm; ``volume`` indexed ``[k, j, i]``): the
    value-weighted centroid of the voxels at or above ``floor`` x its maximum, minus the
    grid's centre. NaN where the volume has no positive voxel."""
    v = np.asarray(volume, dtype=np.float64)
    top = float(v.max()) if v.size else 0.0
    if not top > 0:
        return np.full(3, np.nan)
    w = np.where(v >= floor * top, v, 0.0)
    k, j, i = np.indices(v.shape)
    ijk = np.array([(w * i).sum(), (w * j).sum(), (w * k).sum()]) / w.sum()
    mid = (np.array(v.shape[::-1], dtype=np.float64) - 1) / 2
    return np.asarray(affine, dtype=np.float64)[:3, :3] @ (ijk - mid)


def localization(rows_true, rows_recon, *, max_offset_mm: float = 15.0) -> dict:
    """How a reconstruction follows the vertebra within its grid, over cases: ``rows_true``
    and ``rows_recon`` (N, 3) mm, :func:`mass_offset` of the true vertebra volume and of the
    reconstruction on the same grids (centred where the input pose puts the vertebra). Cases
    whose true offset is over ``max_offset_mm`` (the cube may cut the vertebra) or NaN are
    left out. Returns ``follow`` (the least-squares slope of the reconstruction's offset on
    the true one, all axes pooled: 1 = the reconstruction is where the vertebra is, 0 = it
    sits at the grid's centre whatever the X-rays show), ``offset_error_median_mm`` (median
    distance between the two centroids) and ``n``; NaN where no case is left."""
    g = np.asarray(rows_true, dtype=np.float64).reshape(-1, 3)
    r = np.asarray(rows_recon, dtype=np.float64).reshape(-1, 3)
    ok = np.isfinite(g).all(1) & np.isfinite(r).all(1)
    ok[ok] = np.linalg.norm(g[ok], axis=1) <= max_offset_mm
    g, r = g[ok], r[ok]
    gg = float((g * g).sum())
    return {"follow": float((r * g).sum() / gg) if gg > 0 else float("nan"),
            "offset_error_median_mm": float(np.median(np.linalg.norm(r - g, axis=1))) if len(g) else float("nan"),
            "n": int(len(g))}


def success_rate(final_mtre) -> float:
    """Share (0..1) of cases with final mTRE < 2 mm."""
    m = np.asarray(final_mtre, dtype=np.float64)
    return float(np.mean(m < SUCCESS_MM)) if m.size else float("nan")


def capture_range(initial_mtre, final_mtre, *, bin_mm: float = 5.0, min_sr: float = 0.8) -> tuple[float, list[dict]]:
    """Capture range (metrics.md): cases binned by initial mTRE in ``bin_mm`` bins from 0;
    CR is the upper edge of the last bin such that it and every bin below it has
    SR >= ``min_sr``. An empty bin has no SR and is skipped (neither breaks nor extends
    the chain): a suite with offsets of ±20°/±50 mm has no case below ~10 mm, and the
    strict reading would give every method CR = 0. Returns (CR in mm, per-bin table)."""
    init = np.asarray(initial_mtre, dtype=np.float64)
    fin = np.asarray(final_mtre, dtype=np.float64)
    if init.size == 0:
        return 0.0, []
    nbins = int(np.floor(init.max() / bin_mm)) + 1
    table, cr, chain = [], 0.0, True
    for b in range(nbins):
        sel = (init >= b * bin_mm) & (init < (b + 1) * bin_mm)
        n = int(sel.sum())
        sr = success_rate(fin[sel]) if n else float("nan")
        table.append({"bin_mm": [b * bin_mm, (b + 1) * bin_mm], "n": n, "sr": sr})
        if not n:
            continue
        if chain and sr >= min_sr:
            cr = (b + 1) * bin_mm
        else:
            chain = False
    return cr, table
