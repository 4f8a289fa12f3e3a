"""A picture of a case for a person to look at (``radgsreg show``).

Layout, one row per view (AP, then lateral), each panel ``size`` pixels square:

1. the X-ray as given (windowed 1st-99.5th percentile);
2. the DRR of the CT at the initial pose;
3. the DRR at the ground-truth pose (when the case has one; else at ``T`` if given);
4. an overlay: the X-ray in grey, edges of the initial-pose DRR in red and of the
   true-pose (or given-pose) DRR in green. A good answer puts the green edges on the bone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .drr import DRR
from .io import Case
from .xray import as_line_integral, resize_view_image, signal_mask

__all__ = ["case_montage", "save_montage"]


def _window(a: np.ndarray, ref: np.ndarray | None = None) -> np.ndarray:
    """``a`` scaled to 0..1 between the 1st and 99.5th percentiles of ``ref`` (default ``a``)
    over its pixels that carry a signal (not the black outside a circular field,
    :func:`~RadGSRegLib.xray.signal_mask`)."""
    ref = a if ref is None else ref
    ok = signal_mask(ref)
    lo, hi = np.percentile(ref[ok] if ok.any() else ref, [1.0, 99.5])
    return np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)


def _edges(a: np.ndarray) -> np.ndarray:
    g = np.hypot(ndimage.sobel(a, 0), ndimage.sobel(a, 1))
    return g > np.percentile(g, 93)


def case_montage(case: Case, *, size: int = 320, T=None) -> np.ndarray:
    """(rows, cols, 3) uint8 montage of a case (see the module docstring).

    Args:
        case: the case (ground truth used when present). size: panel size in pixels.
        T: an extra pose (4, 4 ``T_ct_to_carm``) to show instead of the ground truth
            (e.g. a registration result).
    """
    from PIL import Image, ImageDraw

    drr = DRR.from_ct(case.ct)
    shown = T if T is not None else case.ground_truth
    rows = []
    for name in ("ap", "lat"):
        li = as_line_integral(case.xrays[name], case.image_kind)
        img, view = resize_view_image(li, case.views[name], size)
        panels = [_window(img, li)]
        init = None
        if case.initial_guess is not None:
            init = drr.render([view], case.initial_guess)[0].numpy()
            panels.append(_window(init))
        else:
            panels.append(np.zeros_like(img))
        truth = drr.render([view], shown)[0].numpy() if shown is not None else None
        panels.append(_window(truth) if truth is not None else np.zeros_like(img))
        rgb = np.repeat(panels[0][..., None], 3, axis=-1) * 0.8
        if init is not None:
            rgb[_edges(init)] = (1.0, 0.15, 0.15)
        if truth is not None:
            rgb[_edges(truth)] = (0.2, 1.0, 0.2)
        row = np.concatenate([np.repeat(p[..., None], 3, -1) for p in panels] + [rgb], axis=1)
        rows.append(row)
    out = (np.concatenate(rows, axis=0) * 255).astype(np.uint8)
    im = Image.fromarray(out)
    draw = ImageDraw.Draw(im)
    third = "truth" if T is None else "result"
    for r, name in enumerate(("AP", "LAT")):
        for c, title in enumerate((f"{name} X-ray", "DRR initial", f"DRR {third}", f"red init / green {third}")):
            draw.text((c * size + 4, r * size + 4), title, fill=(255, 255, 0))
    return np.asarray(im)


def save_montage(case: Case, path, *, overwrite: bool = True, inputs=(), allow_in=(), **kw) -> Path:
    """Write :func:`case_montage` as a PNG, atomically, marked as RadGSReg's (tEXt
    ``Software: RadGSReg <version>``).

    The location is checked before the montage is rendered
    (:func:`~RadGSRegLib.io.outputs.check_output_file`, kind "preview"): with ``overwrite``
    (default) an existing preview that RadGSReg wrote is replaced; any other file never is.
    """
    from .io.outputs import check_output_file, write_png

    path = Path(path)
    check_output_file(path, "preview", overwrite=overwrite, inputs=inputs, allow_in=allow_in)
    return write_png(case_montage(case, **kw), path, "preview", overwrite=overwrite, inputs=inputs,
                     allow_in=allow_in)
