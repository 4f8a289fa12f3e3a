"""2-D/3-D intensity refinement: DRRs of the CT against both X-rays, Levenberg-Marquardt.

Coarse to fine over :attr:`RefineConfig.levels` (:func:`refine_lm`): residuals are the
normalised (zero mean, unit variance, :func:`~RadGSRegLib.similarity.zscore`) DRR minus the
normalised X-ray inside a window around the projected vertebra, divided by the square root
of the window's pixel count (so each view's sum of squares is ``2 (1 - NCC)``); the Jacobian comes from
the DRRs' own derivatives with respect to the pose (:meth:`~.target.Target.render_jacobian`:
one pass of the compiled Joseph projector per view, :func:`_residuals_jacobian`, which every
trial pose gets, so that an accepted step needs no further pass) or, the reference
(``RefineConfig.jacobian = "finite"``), from forward finite differences of ``Level.step_deg`` /
``step_mm`` (six more renders per view). The DRR is of
the *whole* CT slab (neighbours, soft tissue), so it looks like the X-ray; only the
similarity is restricted to the vertebra's window. :func:`windowed_ncc` is that similarity
at one pose (the pipeline's checks use it). With a :class:`~.config.RobustConfig` the window
is tiled: each tile's residuals are scaled by the square root of its weight, so each view's
sum of squares is ``2 (1 - weighted mean tile NCC)``, and the tiles the CT cannot explain
(metal) are left out (:func:`outlier_fraction` counts them). Works on a :class:`~.target.Target` (X-rays as
line integrals); the starting poses come from the pose search (:mod:`.search`).

Poses are ``T_ct_to_carm``; the optimiser's internal steps are 6-vectors (rx, ry, rz deg
Euler, tx, ty, tz mm) applied in the C-arm frame about the vertebra's current centre.
"""
from __future__ import annotations

import time
from typing import NamedTuple, Optional

import numpy as np

from ..geometry import apply, compose, pose_to_matrix
from ..similarity import (contrast_outliers, highpass, ncc_from_residuals, ncc_residuals, ncc_residuals_jacobian,
                          noise_ceiling, noise_sigma, tile_grid)
from .config import Level, RefineConfig, RobustConfig
from .target import Target

__all__ = ["Level", "RefineConfig", "refine_lm", "windowed_ncc", "ncc_ceiling", "outlier_fraction"]


class _Window(NamedTuple):
    """One view's window at one level: the view, the window (col0, row0, cols, rows), the
    high-pass sigma (pixels) or None, the signal mask or None, and its tiles: (row slice,
    column slice, mask or None, weight) with the X-ray's pixels of each (flattened when
    masked). Without a robust similarity: one tile, the whole window, weight 1."""

    view: object
    win: tuple
    sig: Optional[float]
    valid: Optional[np.ndarray]
    tiles: list
    img: list


def _sampling(cfg: RefineConfig, level: Level) -> dict:
    """How ``level``'s DRRs are rendered: rays per pixel side, which copy of the CT and the
    sample spacing along a ray."""
    return {"supersample": cfg.supersample if level.pixels <= 64 else 1,
            "coarse": level.pixels <= cfg.coarse_below_pixels, "ray_step_mm": level.ray_step_mm}


def _render(tgt: Target, T, w: _Window, cfg: RefineConfig, level: Level) -> np.ndarray:
    drr = tgt.render(w.view.cropped(*w.win), T, **_sampling(cfg, level))
    return highpass(drr, w.sig, w.valid) if w.sig else drr


def _residuals_jacobian(tgt: Target, T, windows, cfg: RefineConfig, level: Level, center) -> tuple:
    """:func:`_residuals` at ``T`` and their Jacobian (residuals, 6) with respect to the LM
    step (deg, mm about ``center``), from the DRRs and their own derivatives
    (:meth:`~.target.Target.render_jacobian`: one pass per view) carried through the same
    high-pass (linear) and each tile's z-score."""
    rs_, out = [], []
    for w in windows.values():
        drr, jac = tgt.render_jacobian(w.view.cropped(*w.win), T, center, **_sampling(cfg, level))
        if w.sig:
            both = highpass(np.concatenate([drr[None], jac]), w.sig, w.valid)
            drr, jac = both[0], both[1:]
        for (rs, cs, m, wt), img in zip(w.tiles, w.img):
            d, dj = drr[rs, cs], jac[:, rs, cs]
            if m is not None:
                d, dj = d[m], dj[:, m]
            r, J = ncc_residuals_jacobian(d, dj.reshape(6, -1), img)
            rs_.append(r * np.sqrt(wt))
            out.append(J * np.sqrt(wt))
    return np.concatenate(rs_), np.concatenate(out)


def _residuals(tgt: Target, T, windows, cfg: RefineConfig, level: Level) -> np.ndarray:
    out = []
    for w in windows.values():
        drr = _render(tgt, T, w, cfg, level)
        for (rs, cs, m, wt), img in zip(w.tiles, w.img):
            d = drr[rs, cs]
            out.append(ncc_residuals(d if m is None else d[m], img) * np.sqrt(wt))     # weight 1: exactly r
    return np.concatenate(out)


def _windows(tgt: Target, T, level: Level, cfg: RefineConfig, robust: RobustConfig | None = None) -> dict:
    """Per view: its :class:`_Window` at pose ``T``. With ``robust``: tiles of
    ``robust.tile_mm``, weighted by the DRR's standard deviation at ``T`` (summing to 1), the
    :func:`~RadGSRegLib.similarity.contrast_outliers` left out (the fraction left out per
    view is the result's ``outliers``)."""
    windows = _Windows()
    for name in ("ap", "lat"):
        img, view, win, sig, valid = _view_window(tgt, name, T, level)
        c0, r0, w, h = win
        img_win = img[r0:r0 + h, c0:c0 + w]
        img_win = highpass(img_win, sig, valid) if sig else img_win
        if robust is None:
            tiles = [(slice(0, h), slice(0, w), valid, 1.0)]
            windows.outliers[name] = 0.0
        else:
            tile_px = robust.tile_mm * tgt.magnification(view, T) / view.pixel_spacing[0]
            drr = _render(tgt, T, _Window(view, win, sig, valid, [], []), cfg, level)
            tiles, ratio = [], []
            for rs, cs in tile_grid((h, w), tile_px):
                m = None if valid is None else valid[rs, cs]
                if m is not None and m.sum() < 8:
                    continue
                a, b = (img_win[rs, cs], drr[rs, cs]) if m is None else (img_win[rs, cs][m], drr[rs, cs][m])
                tiles.append((rs, cs, m, float(b.std())))
                ratio.append(a.std() / b.std() if b.std() > 1e-12 else np.inf)
            out = contrast_outliers(np.array(ratio), robust.reject_contrast) if robust.reject_contrast else \
                np.zeros(len(tiles), bool)
            windows.outliers[name] = float(out.mean()) if len(tiles) else 0.0
            tiles = [t for t, o in zip(tiles, out) if not o]
            total = sum(t[3] for t in tiles)
            tiles = [(rs, cs, m, wt / total) for rs, cs, m, wt in tiles] if total > 0 else \
                [(slice(0, h), slice(0, w), valid, 1.0)]
        windows[name] = _Window(view, win, sig, valid, tiles,
                                [img_win[rs, cs] if m is None else img_win[rs, cs][m] for rs, cs, m, _ in tiles])
    return windows


def _view_window(tgt: Target, name: str, T, level: Level):
    """View ``name`` at ``level`` and pose ``T``: (X-ray at the level's size, its view, the
    vertebra's window (col0, row0, cols, rows), the high-pass sigma in pixels or None, the
    window's comparable pixels (:func:`_usable`; None: all, or too few to correlate: the
    vertebra left the field, so the plain window))."""
    img, view = tgt.image(name, level.pixels)
    win = tgt.window(view, T, level.margin_mm)
    sig = level.highpass_mm * tgt.magnification(view, T) / view.pixel_spacing[0] if level.highpass_mm else None
    valid = _usable(tgt, name, level.pixels, view, T, win)
    if valid is not None and (valid.all() or valid.sum() < 16):
        valid = None
    return img, view, win, sig, valid


def ncc_ceiling(tgt: Target, T: np.ndarray, cfg: RefineConfig, level: Level | None = None) -> dict[str, float]:
    """Per view, the highest windowed NCC the X-ray's own noise allows at pose ``T``: the
    window and pixels :func:`windowed_ncc` compares (at ``level``, default the finest),
    with the noise measured where it is white, on the X-ray's own pixels
    (:func:`~RadGSRegLib.similarity.noise_sigma` in the same window), and carried through the
    resampling to the level's size and the high-pass by doing both to white noise
    (:func:`~RadGSRegLib.similarity.noise_ceiling`)."""
    from ..xray import resize_view_image

    level = level or cfg.levels[-1]
    out = {}
    for name in ("ap", "lat"):
        img, view, (c0, r0, w, h), sig, valid = _view_window(tgt, name, T, level)
        native = tgt.images[name]
        sy, sx = native.shape[0] / img.shape[0], native.shape[1] / img.shape[1]
        rows = slice(int(np.floor(r0 * sy)), int(np.ceil((r0 + h) * sy)))
        cols = slice(int(np.floor(c0 * sx)), int(np.ceil((c0 + w) * sx)))
        signal = tgt.signal[name]
        sigma = noise_sigma(native[rows, cols], None if signal is None else signal[rows, cols])
        white, _ = resize_view_image(np.random.default_rng(0).standard_normal(native.shape).astype(np.float32),
                                     tgt.views[name], (img.shape[1], img.shape[0]))
        white = white[r0:r0 + h, c0:c0 + w]
        win_img = img[r0:r0 + h, c0:c0 + w]
        if sig:
            white, win_img = highpass(white, sig, valid), highpass(win_img, sig, valid)
        gain = float(white.var() if valid is None else white[valid].var())
        out[name] = noise_ceiling(win_img, sigma ** 2 * gain, valid)
    return out


def _usable(tgt: Target, name: str, pixels: int, view, T, win) -> np.ndarray | None:
    """The pixels of ``view``'s window ``win`` that can be compared (bool (rows, cols),
    None: all): those with a signal (:meth:`~.target.Target.valid`) whose rays the CT covers
    at ``T`` (:meth:`~.target.Target.covered`)."""
    c0, r0, w, h = win
    valid = tgt.valid(name, pixels)
    valid = None if valid is None else valid[r0:r0 + h, c0:c0 + w]
    cov = tgt.covered(view.cropped(*win), T)
    if cov is None:
        return valid
    return cov if valid is None else valid & cov


class _Windows(dict):
    """{view name: :class:`_Window`} and ``outliers`` {view name: fraction of tiles left out}."""

    def __init__(self):
        super().__init__()
        self.outliers = {}


def windowed_ncc(tgt: Target, T: np.ndarray, cfg: RefineConfig, level: Level | None = None,
                 robust: RobustConfig | None = None) -> dict[str, float]:
    """Per-view NCC of the DRR at pose ``T`` with the X-ray, in the vertebra's window at
    ``level`` (default the finest): the similarity the refinement maximises (tiled, with
    ``robust``: the weighted mean of the kept tiles' NCC)."""
    level = level or cfg.levels[-1]
    windows = _windows(tgt, T, level, cfg, robust)
    return _view_ncc(windows, _residuals(tgt, T, windows, cfg, level))


def outlier_fraction(tgt: Target, T: np.ndarray, cfg: RefineConfig, robust: RobustConfig,
                     level: Level | None = None) -> dict[str, float]:
    """Per view, the fraction of the window's tiles at pose ``T`` whose X-ray contrast the
    CT cannot explain (``robust``'s tiles and factor; ``level`` default the refinement's
    middle one). Meaningful near the right pose, where the DRR explains the anatomy: at the
    true pose of the development suites' cases, the smaller of both views' fractions was 0
    on every clean case measured and 0.2-0.5 with instruments; at a pose tens of mm off
    it is noise (0-0.45 on clean cases)."""
    level = level or cfg.levels[len(cfg.levels) // 2]
    return dict(_windows(tgt, T, level, cfg, robust).outliers)


def _view_ncc(windows: dict, r: np.ndarray) -> dict[str, float]:
    """Each view's NCC from the stacked residuals ``r`` (:func:`~RadGSRegLib.similarity.ncc_residuals`
    of each view's tiles, weighted, in ``windows``' order)."""
    parts = np.split(r, np.cumsum([sum(a.size for a in w.img) for w in windows.values()])[:-1])
    return {name: ncc_from_residuals(seg) for name, seg in zip(windows, parts)}


def refine_lm(tgt: Target, T: np.ndarray, cfg: RefineConfig, log=None, progress=None,
              robust: RobustConfig | None = None, levels: list | None = None) -> tuple[np.ndarray, dict]:
    """Stage 2: coarse-to-fine Levenberg-Marquardt on the windowed NCC of both views (tiled,
    with ``robust``: the tiles, their weights and the outliers left out are fixed at each
    level's start; ``info["levels"][i]["outliers"]`` says how many were). Each level's
    record: ``pixels``, ``iterations``, ``ncc`` per view, and its profile: ``seconds``, the
    DRRs rendered (``renders``) and the rays they cast (``rays``).

    ``levels``: the :class:`Level` s to run (default ``cfg.levels``; the pipeline runs the
    first level of every candidate, then the rest of the best few).
    ``progress(i, n)``, if given, is called before level ``i`` of ``n``."""
    info = {"levels": []}
    levels = cfg.levels if levels is None else levels
    for li, level in enumerate(levels):
        if progress:
            progress(li, len(levels))
        t0, n0, rays0 = time.perf_counter(), tgt.renders, tgt.rays
        windows = _windows(tgt, T, level, cfg, robust)
        steps = np.array([level.step_deg] * 3 + [level.step_mm] * 3)
        lam = 1e-2
        analytic = cfg.jacobian == "analytic"
        if analytic:       # every pose evaluated with its Jacobian: an accepted step brings the next one's
            r, J = _residuals_jacobian(tgt, T, windows, cfg, level, apply(T, tgt.centre))
        else:
            r = _residuals(tgt, T, windows, cfg, level)
        cost = float(r @ r)
        for it in range(level.iterations):
            c = apply(T, tgt.centre)
            if not analytic:
                J = np.empty((r.size, 6))
                for k in range(6):
                    dp = np.zeros(6)
                    dp[k] = steps[k]
                    Tk = compose(pose_to_matrix(dp, center=c), T)
                    J[:, k] = (_residuals(tgt, Tk, windows, cfg, level) - r) / steps[k]
            g = J.T @ r
            H = J.T @ J
            improved = False
            for _ in range(6):
                delta = -np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-9), g)
                # trust region: no more than max_step per iteration (deg, mm)
                lim = np.array([cfg.max_step_deg] * 3 + [cfg.max_step_mm] * 3)
                delta = delta * min(1.0, float(np.min(lim / np.maximum(np.abs(delta), 1e-12))))
                Tn = compose(pose_to_matrix(delta, center=c), T)
                if analytic:
                    rn, Jn = _residuals_jacobian(tgt, Tn, windows, cfg, level, apply(Tn, tgt.centre))
                else:
                    rn = _residuals(tgt, Tn, windows, cfg, level)
                cn = float(rn @ rn)
                if cn < cost:
                    T, r, cost, lam = Tn, rn, cn, max(lam / 3, 1e-6)
                    if analytic:
                        J = Jn
                    improved = True
                    break
                lam *= 4
            if not improved or np.all(np.abs(delta) < 0.02 * steps):
                break
        ncc = _view_ncc(windows, r)
        info["levels"].append({"pixels": level.pixels, "iterations": it + 1, "ncc": ncc,
                               "seconds": time.perf_counter() - t0, "renders": tgt.renders - n0,
                               "rays": tgt.rays - rays0,
                               **({"outliers": windows.outliers} if robust is not None else {})})
        if log:
            log(f"  level {level.pixels}px: NCC ap {ncc['ap']:.3f}, lat {ncc['lat']:.3f}")
    return T, info
