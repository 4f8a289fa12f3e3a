"""Registration and reconstruction metrics, exactly as ``shared/docs/metrics.md`` defines them.

Registration: mTRE over target points (centres of the registered vertebra's label voxels,
CT LPS mm), success (mTRE < 2 mm), capture range over 5 mm initial-mTRE bins, rotation and
translation errors, mean projection distance. Transforms are ``T_ct_to_carm`` 4x4s.
"""
from __future__ import annotations

import numpy as np

from .geometry import apply, geodesic_deg, mtre
from .volume import Volume

__all__ = ["target_points", "mtre", "registration_errors", "SUCCESS_MM"]

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
