"""Normalised cross-correlation (NCC), the similarity every registration stage maximises,
in one place: global NCC of two arrays (any dimension; numpy), the same on torch batches of
volumes (differentiable), the NCC map of a template at every shift inside an image, masked
(template matching), and the high-pass filter the 2-D stages apply first.

All NCCs are in [-1, 1] (1: equal up to an affine change of intensity); a constant input
counts as zero variance clamped to a tiny positive number (NCC 0, not NaN). The residual
form the 2-D/3-D refinement minimises rests on :func:`zscore`: for two arrays of ``N``
values, ``1 - NCC = |zscore(a) - zscore(b)|^2 / (2 N)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["zscore", "ncc", "ncc_residuals", "ncc_from_residuals", "ncc_torch", "ncc_map", "highpass"]


def zscore(a: np.ndarray) -> np.ndarray:
    """``a`` flattened to float64, zero mean, unit (population) standard deviation; a
    constant array becomes zeros."""
    a = np.asarray(a).astype(np.float64).ravel()
    s = a.std()
    return (a - a.mean()) / (s if s > 1e-12 else 1.0)


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Global NCC of two arrays of the same shape (any dimension)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"ncc needs arrays of one shape, got {a.shape} and {b.shape}")
    return float(np.mean(zscore(a) * zscore(b)))


def ncc_residuals(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The residual vector whose sum of squares is ``2 (1 - NCC(a, b))``:
    ``(zscore(a) - zscore(b)) / sqrt(N)`` for two arrays of ``N`` values (what a
    least-squares optimiser minimises to maximise the NCC)."""
    return (zscore(a) - zscore(b)) / np.sqrt(np.asarray(b).size)


def ncc_from_residuals(r: np.ndarray) -> float:
    """The NCC that :func:`ncc_residuals` ``r`` stand for: ``1 - |r|^2 / 2``."""
    return 1.0 - 0.5 * float(np.sum(np.asarray(r) ** 2))


def ncc_torch(a, b):
    """Global NCC per sample of torch batches ``a``, ``b`` (B, ...) of one shape
    (differentiable). Returns (B,)."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-8)


def ncc_map(image: np.ndarray, template: np.ndarray, valid: np.ndarray | None = None,
            min_overlap: float = 0.5) -> np.ndarray:
    """NCC of ``template`` (h, w) at every position inside ``image`` (H, W) (valid
    correlation: (H - h + 1, W - w + 1); entry [r, c] is the template's top-left corner at
    row r, column c), computed over the pixels where ``valid`` (H, W, bool) is true only
    (masked NCC: positions that overlap the image's edge are scored on their overlap, not
    on padding); positions with less than ``min_overlap`` of the template inside score -1.
    The reference twin is a loop of :func:`ncc` over the positions (tests)."""
    import torch
    import torch.nn.functional as F

    img = torch.from_numpy(image.astype(np.float64))[None, None]
    t = torch.from_numpy(template.astype(np.float64))[None, None]
    m = torch.ones_like(img) if valid is None else torch.from_numpy(valid.astype(np.float64))[None, None]
    img = img * m
    ones = torch.ones_like(t)
    n = F.conv2d(m, ones)
    st, st2 = F.conv2d(m, t), F.conv2d(m, t * t)
    si, si2, sit = F.conv2d(img, ones), F.conv2d(img * img, ones), F.conv2d(img, t)
    nn = torch.clamp(n, min=1.0)
    cov = sit - si * st / nn
    var = torch.clamp(si2 - si * si / nn, min=1e-12) * torch.clamp(st2 - st * st / nn, min=1e-12)
    out = cov / torch.sqrt(var)
    return torch.where(n >= min_overlap * template.size, out, torch.full_like(out, -1.0))[0, 0].numpy()


def highpass(a: np.ndarray, sigma_px: float, valid: np.ndarray | None = None) -> np.ndarray:
    """``a`` minus its Gaussian blur (sigma in pixels), float64: keeps bone edges, drops the
    smooth soft-tissue and scatter background that otherwise dominates a correlation.

    ``valid`` (same shape, bool): only these pixels carry a signal (e.g. inside an image
    intensifier's round field); the blur is then normalised over them (``blur(a m) /
    blur(m)``), so the black outside does not bleed in. Pixels outside ``valid`` come back 0.
    Without ``valid`` (or all true), the plain filter."""
    from scipy import ndimage

    a = a.astype(np.float64)
    if valid is None or valid.all():
        return a - ndimage.gaussian_filter(a, sigma_px, mode="nearest")
    m = valid.astype(np.float64)
    num = ndimage.gaussian_filter(a * m, sigma_px, mode="nearest")
    den = ndimage.gaussian_filter(m, sigma_px, mode="nearest")
    return np.where(valid, a - num / np.maximum(den, 1e-6), 0.0)
