"""The network's view of two X-rays: line integrals on a working detector, standardised.

Used by inference (:func:`RadGSRegLib.learned.infer.predict`) and by the training samples
(:mod:`RadGSRegLib.training.data`), so both see exactly the same input.
"""
from __future__ import annotations

import numpy as np
import torch

from ..geometry import View

__all__ = ["network_images", "prepare_images"]


def network_images(resized: dict, valid: dict | None = None) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The network's input from X-rays already converted and resized.

    Args:
        resized: {"ap", "lat"} -> (image (P, P) line integrals on the working detector, its
            :class:`~RadGSRegLib.geometry.View`), e.g. from
            :func:`~RadGSRegLib.xray.resize_view_image` or
            :meth:`RadGSRegLib.register.target.Target.image`.
        valid: {"ap", "lat"} -> (P, P) bool, the pixels that carry a signal (e.g. inside an
            image intensifier's field; :meth:`~RadGSRegLib.register.target.Target.valid`), or
            None / a missing entry for all of them: the standardisation uses these only and
            the others become 0 (the mean).
    Returns:
        images (2, P, P) float32 tensor, each standardised (zero mean, unit variance: robust
        to dose, windowing and scale); the working views {name: View}; proj (2, 3, 4)
        float32 tensor, their projection matrices (C-arm mm -> pixels).
    """
    out, wviews = [], {}
    for name in ("ap", "lat"):
        if name not in resized:
            raise ValueError(f"the learned method needs both an 'ap' and a 'lat' X-ray; missing {name!r}")
        img, v = resized[name]
        m = (valid or {}).get(name)
        if m is None:
            img = (img - img.mean()) / max(float(img.std()), 1e-6)
        else:
            img = np.where(m, (img - img[m].mean()) / max(float(img[m].std()), 1e-6), 0.0)
        out.append(img)
        wviews[name] = v
    proj = np.stack([wviews[n].projection_matrix() for n in ("ap", "lat")])
    return torch.from_numpy(np.stack(out).astype(np.float32)), wviews, torch.from_numpy(proj.astype(np.float32))


def prepare_images(xrays: dict, views: dict[str, View], image_kind: str, pixels: int):
    """:func:`network_images` from raw X-rays: {"ap", "lat"} -> (rows, cols) images of
    ``image_kind`` ("line_integral" or "intensity", converted to line integrals) and their
    views, resized (area-averaged, geometry kept exact) to ``pixels`` per side."""
    from ..xray import as_line_integral, resize_view_image

    for name in ("ap", "lat"):
        if name not in xrays or name not in views:
            raise ValueError(f"the learned method needs both an 'ap' and a 'lat' X-ray; missing {name!r}")
    return network_images({name: resize_view_image(as_line_integral(xrays[name], image_kind), views[name], pixels)
                           for name in ("ap", "lat")})
