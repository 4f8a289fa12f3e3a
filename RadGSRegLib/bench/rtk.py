"""RTK's Joseph forward projector (PyPI ``itk-rtk``) as an independent reference DRR.

Used by the tests (our projector must match it) and by ``radgsreg bench drr``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..geometry import View

__all__ = ["rtk_available", "rtk_joseph"]


def rtk_available() -> bool:
    try:
        from itk import RTK  # noqa: F401
    except Exception:
        return False
    return True


def rtk_joseph(mu: np.ndarray, affine_carm: np.ndarray, views: Sequence[View], threads: int | None = None) -> np.ndarray:
    """Line integrals of ``mu`` (K, J, I; 1/mm) placed in the C-arm frame by ``affine_carm``
    ((4, 4), voxel (i, j, k) -> C-arm mm, rigid directions), for views of equal size.

    Returns:
        (V, rows, cols) float32.
    """
    import itk
    from itk import RTK as rtk

    if threads is not None:
        itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
    A = np.asarray(affine_carm, dtype=np.float64)
    spacing = np.linalg.norm(A[:3, :3], axis=0)
    vol = itk.image_from_array(np.ascontiguousarray(mu, dtype=np.float32))
    vol.SetOrigin(A[:3, 3].tolist())
    vol.SetSpacing(spacing.tolist())
    vol.SetDirection(itk.matrix_from_array(np.ascontiguousarray(A[:3, :3] / spacing[None, :])))

    geo = rtk.ThreeDCircularProjectionGeometry.New()
    for v in views:
        geo.AddProjection(itk.Point[itk.D, 3](v.source.tolist()), itk.Point[itk.D, 3](v.detector_origin.tolist()),
                          itk.Vector[itk.D, 3](v.u.tolist()), itk.Vector[itk.D, 3](v.v.tolist()))
    cols, rows = views[0].size
    su, sv = views[0].pixel_spacing
    ImageType = itk.Image[itk.F, 3]
    src = rtk.ConstantImageSource[ImageType].New()
    src.SetOrigin([0.0, 0.0, 0.0])
    src.SetSpacing([su, sv, 1.0])
    src.SetSize([cols, rows, len(views)])
    src.SetConstant(0.0)
    fp = rtk.JosephForwardProjectionImageFilter[ImageType, ImageType].New()
    fp.SetInput(0, src.GetOutput())
    fp.SetInput(1, vol)
    fp.SetGeometry(geo)
    fp.Update()
    return np.asarray(itk.array_from_image(fp.GetOutput()), dtype=np.float32).copy()
