"""X-ray image handling: normalisation to line integrals and resizing with the view.

Images are float32 arrays ``[row, column]``; see :mod:`RadGSRegLib.geometry` for views.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .geometry import View

__all__ = ["as_line_integral", "resize_view_image", "signal_mask", "body_ends_in_field"]


def as_line_integral(image: np.ndarray, kind: str, *, i0_percentile: float = 99.9) -> np.ndarray:
    """Any X-ray as a line-integral-like image (bone bright, air ~0).

    ``line_integral`` images are returned as float32 copies; ``intensity`` images become
    ``-ln(I / I0)`` with ``I0`` the ``i0_percentile`` percentile (the unattenuated level,
    which needs some air or thin tissue in the field; otherwise values are shifted by a
    constant, which a normalised similarity ignores).
    """
    img = np.asarray(image, dtype=np.float32)
    if kind == "line_integral":
        return img.copy()
    if kind != "intensity":
        raise ValueError(f"image kind must be 'line_integral' or 'intensity', not {kind!r}")
    i0 = float(np.percentile(img, i0_percentile))
    if i0 <= 0:
        raise ValueError("an intensity image must have positive values")
    return (-np.log(np.clip(img, i0 * 1e-6, None) / i0)).astype(np.float32)


def signal_mask(line_integral: np.ndarray, *, min_fraction: float = 0.01) -> np.ndarray:
    """(rows, cols) bool: the pixels that carry a signal. A detector records nothing outside
    an image intensifier's circular field or behind a shutter, and a log-converted image
    holds its largest value there, on a plateau: when at least ``min_fraction`` of the
    pixels share the image's maximum exactly, those pixels (and non-finite ones) are no
    signal; otherwise every finite pixel is."""
    a = np.asarray(line_integral)
    ok = np.isfinite(a)
    if not ok.any():
        return ok
    top = a[ok].max()
    plateau = ok & (a == top)
    return ok & ~plateau if plateau.mean() >= min_fraction else ok


def body_ends_in_field(line_integral: np.ndarray, view: View, valid: np.ndarray | None = None, *,
                       air: float = 0.2, min_lines: float = 0.02) -> bool:
    """Whether the X-ray shows the body ending (open air beyond it) along the patient's
    length: at least ``min_lines`` of the detector lines (those with a signal on at least a
    tenth of their pixels) across the cranio-caudal direction
    (rows when the detector's v axis is closer than u to the C-arm's z, the patient's long
    axis at the nominal pose; else columns) hold nothing thicker than ``air`` times the
    typical line's (each line's 90th percentile of the line integral over its ``valid``
    pixels, against the median of those). On a real patient the body goes on past the
    field; a DRR of a CT shows air past the scan's ends.

    ``line_integral``: (rows, cols), bone bright. ``valid``: (rows, cols) bool pixels with a
    signal (None: all)."""
    a = np.asarray(line_integral, dtype=np.float64)
    ok = np.isfinite(a) if valid is None else valid & np.isfinite(a)
    along_rows = abs(view.v[2]) >= abs(view.u[2])          # rows run across the patient's long axis
    a, ok = (a, ok) if along_rows else (a.T, ok.T)
    lines = [np.percentile(r[m], 90) for r, m in zip(a, ok) if m.sum() >= max(4, 0.1 * m.size)]
    if len(lines) < 3:
        return False
    lines = np.array(lines)
    ref = np.median(lines)
    return bool(ref > 0 and np.mean(lines < air * ref) >= min_lines)


def resize_view_image(image: np.ndarray, view: View, size) -> tuple[np.ndarray, View]:
    """Resample an image and its view to ``size`` = (columns, rows) (or one int).

    The detector area is kept (:meth:`View.resized`), so geometry stays exact; pixel values
    are area-averaged (antialiased bilinear) when shrinking.
    """
    new = view.resized(size)
    if np.asarray(image).shape != view.shape:
        raise ValueError(f"image shape {np.asarray(image).shape} does not match the view's {view.shape}")
    t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=new.shape, mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy(), new
