"""Rigid transforms as ITK transform files (``.h5``, ``.tfm``, ``.txt``), via SimpleITK.

Convention (case format): an ITK transform file holds the *resampling* transform, from the
fixed frame to the moving one. For a registration result we store ``T_carm_to_ct`` =
inverse(``T_ct_to_carm``), so ``sitk.ReadTransform(f).TransformPoint(p_carm)`` gives
``p_ct``, and Slicer (which reads the file as "from parent") moves the CT onto the X-rays.
The functions below take and return ``T_ct_to_carm`` so callers never handle the inverse.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..geometry import invert, is_rigid
from .atomic import atomic_file
from .errors import CaseFormatError

__all__ = ["write_transform", "read_transform", "sitk_transform_to_matrix"]


def sitk_transform_to_matrix(tx) -> np.ndarray:
    """(4, 4) matrix of a SimpleITK transform that is affine (checked on a test point)."""
    p0 = np.array(tx.TransformPoint((0.0, 0.0, 0.0)))
    M = np.eye(4)
    for i in range(3):
        e = np.zeros(3)
        e[i] = 100.0
        M[:3, i] = (np.array(tx.TransformPoint(tuple(e))) - p0) / 100.0
    M[:3, 3] = p0
    probe = np.array([37.0, -81.0, 123.0])
    if not np.allclose(np.array(tx.TransformPoint(tuple(probe))), M[:3, :3] @ probe + p0, atol=1e-4):
        raise ValueError("the transform is not affine")
    return M


def write_transform(T_ct_to_carm, path, *, overwrite: bool = False) -> Path:
    """Write ``T_ct_to_carm`` (4x4 rigid) as the ITK resampling transform ``T_carm_to_ct``."""
    import SimpleITK as sitk

    T = np.asarray(T_ct_to_carm, dtype=np.float64)
    if not is_rigid(T):
        raise ValueError("T_ct_to_carm must be a rigid 4x4 matrix")
    inv = invert(T)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(tuple(inv[:3, :3].reshape(-1)))
    tx.SetTranslation(tuple(inv[:3, 3]))
    path = Path(path)
    with atomic_file(path, overwrite) as tmp:
        sitk.WriteTransform(tx, str(tmp))
    return path


def read_transform(path, *, field: str | None = None) -> np.ndarray:
    """Read an ITK transform file written by :func:`write_transform` (or Slicer) and return
    ``T_ct_to_carm`` (the inverse of the stored resampling transform)."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise CaseFormatError(path, field, "file not found")
    try:
        tx = sitk.ReadTransform(str(path))
        M = sitk_transform_to_matrix(tx)
    except (RuntimeError, ValueError) as e:
        raise CaseFormatError(path, field, f"not a readable affine ITK transform ({e})") from None
    if not is_rigid(M, tol=1e-4):
        raise CaseFormatError(path, field, "the transform is not rigid")
    return invert(M)
