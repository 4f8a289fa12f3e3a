"""Normalised cross-correlation (NCC), the similarity every registration stage maximises,
in one place: global NCC of two arrays (any dimension; numpy), the same on torch batches of
volumes (differentiable), the NCC map of a template at every shift inside an image, masked
(template matching), and the high-pass filter the 2-D stages apply first.

*Tiled* NCC, for X-rays that hold what the CT cannot explain (metal instruments, absent
from the preoperative CT): the window is cut into tiles (:func:`tile_grid`), each tile's NCC
is taken on its own and the tiles are averaged (weighted), so no one structure dominates
through its variance; tiles whose X-ray contrast is far above what the CT's DRR shows there
(:func:`contrast_outliers`: metal adds contrast, bone and soft tissue do not) are left out.
:func:`ncc_map_tiled` is the same at every shift (the pose search).

All NCCs are in [-1, 1] (1: equal up to an affine change of intensity); a constant input
counts as zero variance clamped to a tiny positive number (NCC 0, not NaN). The residual
form the 2-D/3-D refinement minimises rests on :func:`zscore`: for two arrays of ``N``
values, ``1 - NCC = |zscore(a) - zscore(b)|^2 / (2 N)``.
"""
from __future__ import annotations

import warnings

import numpy as np

__all__ = ["zscore", "ncc", "ncc_residuals", "ncc_from_residuals", "ncc_torch", "ncc_map", "highpass", "tile_grid",
           "contrast_outliers", "ncc_map_tiled", "noise_sigma", "noise_ceiling"]


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


def ncc_residuals_jacobian(a: np.ndarray, da: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`ncc_residuals` of ``a`` (N values) against ``b`` and their Jacobian (N, K)
    with respect to K parameters, given ``da`` (K, N): the derivatives of ``a``. The
    z-score's derivative is ``(da - mean(da) - z mean(z da)) / std(a)``."""
    a = np.asarray(a, dtype=np.float64).ravel()
    da = np.asarray(da, dtype=np.float64).reshape(-1, a.size)
    n = np.sqrt(np.asarray(b).size)
    s = a.std()
    s = s if s > 1e-12 else 1.0
    z = (a - a.mean()) / s
    dz = (da - da.mean(axis=1, keepdims=True) - z[None] * (da @ z)[:, None] / a.size) / s
    return (z - zscore(b)) / n, dz.T / n


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
            min_overlap: float = 0.5, template_valid: np.ndarray | None = None) -> np.ndarray:
    """NCC of ``template`` (h, w) at every position inside ``image`` (H, W) (valid
    correlation: (H - h + 1, W - w + 1); entry [r, c] is the template's top-left corner at
    row r, column c), computed over the pixels where ``valid`` (H, W, bool) is true only
    (masked NCC: positions that overlap the image's edge are scored on their overlap, not
    on padding) and, with ``template_valid`` (h, w, bool), where the template is true too
    (e.g. DRR pixels whose rays leave the CT); positions with less than ``min_overlap`` of
    the template's (valid) pixels inside score -1. The reference twin is a loop of
    :func:`ncc` over the positions (tests)."""
    return _ncc_map_parts(image, template, valid, min_overlap, template_valid=template_valid)[0]


def _ncc_map_parts(image, template, valid, min_overlap, with_std: bool = False, template_valid=None):
    """:func:`ncc_map`, whether each position has ``min_overlap`` of the template inside,
    and (``with_std``) the image's standard deviation over the valid pixels under the
    (valid) template at each position (else None): six valid cross-correlations (sums over
    the overlap of the image's and the template's masks), by FFT from three spectra per side.
    An FFT at least the image's size is exact for the valid part (no wrap-around reaches
    it); correlating is convolving with the flipped template."""
    from scipy import fft

    img = np.asarray(image, dtype=np.float64)
    t = np.asarray(template, dtype=np.float64)
    m = np.ones(img.shape) if valid is None else np.asarray(valid, dtype=np.float64)
    img = np.where(m > 0, img, 0.0)                          # masked pixels: out, whatever they hold
    ones = np.ones(t.shape) if template_valid is None else np.asarray(template_valid, dtype=np.float64)
    t = np.where(ones > 0, t, 0.0)
    (H, W), (h, w) = img.shape, t.shape
    fs = tuple(fft.next_fast_len(k, real=True) for k in img.shape)
    fm, fi, fi2 = fft.rfft2(np.stack([m, img, img * img]), fs)             # each side's three spectra in one call
    f1, ft, ft2 = fft.rfft2(np.stack([ones, t, t * t])[:, ::-1, ::-1], fs)
    prods = np.stack([fm * f1, fm * ft, fm * ft2, fi * f1, fi2 * f1, fi * ft])
    n, st, st2, si, si2, sit = fft.irfft2(prods, fs)[:, h - 1:H, w - 1:W]
    n = np.round(n)                                          # counts: integers up to rounding
    nn = np.maximum(n, 1.0)
    cov = sit - si * st / nn
    var = np.maximum(si2 - si * si / nn, 1e-12) * np.maximum(st2 - st * st / nn, 1e-12)
    out = cov / np.sqrt(var)
    enough = n >= min_overlap * float(ones.sum())
    std = np.sqrt(np.maximum(si2 / nn - (si / nn) ** 2, 0.0)) if with_std else None
    return np.where(enough, out, -1.0), enough, std


def tile_grid(shape: tuple, tile_px: float) -> list[tuple[slice, slice]]:
    """An even grid of about ``tile_px`` pixels per side over an array of ``shape`` (rows,
    cols): the (row slice, column slice) of each tile, row by row; at least one tile."""
    h, w = shape
    ny, nx = max(1, int(round(h / tile_px))), max(1, int(round(w / tile_px)))
    ys = np.linspace(0, h, ny + 1).round().astype(int)
    xs = np.linspace(0, w, nx + 1).round().astype(int)
    return [(slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1])) for i in range(ny) for j in range(nx)]


def contrast_outliers(ratio: np.ndarray, factor: float, axis: int = 0) -> np.ndarray:
    """Which tiles hold contrast the CT cannot explain: ``ratio`` is each tile's X-ray
    standard deviation over the DRR's (the tiles along ``axis``); a tile is an outlier (True)
    when its ratio exceeds ``factor`` times the 25th percentile of the ratios (the X-ray's
    ordinary contrast relative to the DRR, which scatter and the detector set; robust to up
    to three quarters of the tiles being outliers). Non-finite ratios (NaN: a tile that is
    not there) are outliers and do not count in the reference."""
    r = np.asarray(ratio, dtype=np.float64)
    finite = np.isfinite(r)
    if not finite.any():
        return ~finite
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)             # positions where no tile is finite
        ref = np.nanpercentile(np.where(finite, r, np.nan), 25, axis=axis, keepdims=True)
        return ~finite | (r > factor * ref)


def ncc_map_tiled(image: np.ndarray, template: np.ndarray, valid: np.ndarray | None = None, *,
                  tile_px: float, reject: float = 0.0, min_overlap: float = 0.5,
                  template_valid: np.ndarray | None = None) -> np.ndarray:
    """Tiled NCC of ``template`` (h, w) at every position inside ``image`` (H, W): the
    template is cut into :func:`tile_grid` tiles, each tile's :func:`ncc_map` is taken over
    the image region it sweeps, and the maps are averaged, each tile weighted by its
    template standard deviation (flat tiles say little). With ``reject`` > 0, at each
    position the tiles that are :func:`contrast_outliers` of the image there are left out.
    A tile with less than ``min_overlap`` valid overlap at a position is left out there (and
    does not count in the outlier reference); a position with no tile left scores 0 (where
    :func:`ncc_map` gives -1). ``template_valid``: as for :func:`ncc_map` (a tile with fewer
    than 8 valid template pixels is left out). Returns (H - h + 1, W - w + 1) like
    :func:`ncc_map`; with one tile and no rejection it equals :func:`ncc_map` wherever the
    overlap suffices."""
    h, w = template.shape
    H, W = image.shape
    maps, ratios, weights = [], [], []
    for rs, cs in tile_grid((h, w), tile_px):
        t = template[rs, cs]
        tv = None if template_valid is None else template_valid[rs, cs]
        if tv is not None and tv.sum() < 8:
            continue
        sd = float(t.std() if tv is None else t[tv].std())
        if sd < 1e-9:
            continue
        region = (slice(rs.start, H - (h - rs.stop)), slice(cs.start, W - (w - cs.stop)))
        sub = image[region]
        v = None if valid is None else valid[region]
        m, inside, std = _ncc_map_parts(sub, t, v, min_overlap, with_std=bool(reject), template_valid=tv)
        maps.append(np.where(inside, m, 0.0))
        weights.append(sd * inside)
        if reject:
            ratios.append(np.where(inside, std / sd, np.nan))
    if not maps:
        return np.zeros((H - h + 1, W - w + 1))
    wt = np.array(weights, dtype=np.float64)
    if reject:                  # NaN (no overlap): left out, and not part of the outlier reference
        wt = wt * ~contrast_outliers(np.array(ratios), reject)
    return (np.array(maps) * wt).sum(0) / np.maximum(wt.sum(0), 1e-12)


def noise_sigma(image: np.ndarray, valid: np.ndarray | None = None) -> float:
    """The standard deviation of white noise in ``image`` (2-D; ``valid`` bool, same shape:
    only these pixels count, None: all), from the differences of neighbouring pixels,
    robustly: 1.4826 x their median absolute deviation / sqrt 2. Anatomy is smooth at the
    pixel scale of an X-ray, so its edges barely move the median; a noise-free, edge-rich
    image reads as a little noise. 0 with fewer than 8 neighbour pairs."""
    a = np.asarray(image, dtype=np.float64)
    v = np.ones(a.shape, bool) if valid is None else np.asarray(valid, dtype=bool)
    diffs = np.concatenate([(a[:, 1:] - a[:, :-1])[v[:, 1:] & v[:, :-1]],
                            (a[1:, :] - a[:-1, :])[v[1:, :] & v[:-1, :]]])
    if diffs.size < 8:
        return 0.0
    return 1.4826 * float(np.median(np.abs(diffs - np.median(diffs)))) / np.sqrt(2.0)


def noise_ceiling(compared: np.ndarray, noise_var: float, valid: np.ndarray | None = None) -> float:
    """The highest NCC any noise-free template can reach with ``compared`` (a window as it
    is compared, e.g. high-passed) holding noise of variance ``noise_var`` (in that window,
    after the same filtering): ``sqrt(1 - noise_var / variance)`` over the ``valid`` pixels
    (None: all). 0 for a flat window or fewer than 16 pixels.

    A right pose scores close to this ceiling; a wrong one (a neighbouring vertebra, a wrong
    rotation) well below it, whatever the dose (the doubtful check, issue #18's notes)."""
    a = np.asarray(compared, dtype=np.float64)
    vals = a.ravel() if valid is None else a[np.asarray(valid, dtype=bool)]
    if vals.size < 16:
        return 0.0
    total = float(vals.var())
    return float(np.sqrt(max(total - noise_var, 0.0) / total)) if total > 0 else 0.0


def highpass(a: np.ndarray, sigma_px: float, valid: np.ndarray | None = None) -> np.ndarray:
    """``a`` minus its Gaussian blur (sigma in pixels), float64: keeps bone edges, drops the
    smooth soft-tissue and scatter background that otherwise dominates a correlation.

    ``valid`` (same shape, bool): only these pixels carry a signal (e.g. inside an image
    intensifier's round field); the blur is then normalised over them (``blur(a m) /
    blur(m)``), so the black outside does not bleed in. Pixels outside ``valid`` come back 0.
    Without ``valid`` (or all true), the plain filter. ``a`` may be a stack (..., rows, cols):
    each image filtered alike (``valid``: (rows, cols))."""
    from scipy import ndimage

    a = a.astype(np.float64)
    sig = (0.0,) * (a.ndim - 2) + (sigma_px, sigma_px)           # a stack (..., rows, cols): each image
    if valid is None or valid.all():
        return a - ndimage.gaussian_filter(a, sig, mode="nearest")
    m = valid.astype(np.float64)
    num = ndimage.gaussian_filter(a * m, sig, mode="nearest")
    den = ndimage.gaussian_filter(m, sigma_px, mode="nearest")
    return np.where(valid, a - num / np.maximum(den, 1e-6), 0.0)
