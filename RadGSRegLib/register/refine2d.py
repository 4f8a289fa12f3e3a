"""2-D/3-D intensity refinement: DRRs of the CT against both X-rays, Levenberg-Marquardt.

Coarse to fine over :attr:`RefineConfig.levels` (:func:`refine_lm`): residuals are the
normalised (zero mean, unit variance, :func:`~RadGSRegLib.similarity.zscore`) DRR minus the
normalised X-ray inside a window around the projected vertebra, divided by the square root
of the window's pixel count (so each view's sum of squares is ``2 (1 - NCC)``); the Jacobian comes from
finite differences of the compiled Joseph projector (forward only, fast). The DRR is of
the *whole* CT slab (neighbours, soft tissue), so it looks like the X-ray; only the
similarity is restricted to the vertebra's window. :func:`windowed_ncc` is that similarity
at one pose (the pipeline's checks use it). Works on a :class:`~.target.Target` (X-rays as
line integrals); the starting poses come from the pose search (:mod:`.search`).

Poses are ``T_ct_to_carm``; the optimiser's internal steps are 6-vectors (rx, ry, rz deg
Euler, tx, ty, tz mm) applied in the C-arm frame about the vertebra's current centre.
"""
from __future__ import annotations

import numpy as np

from ..geometry import apply, compose, pose_to_matrix
from ..similarity import highpass, ncc_from_residuals, ncc_residuals
from .config import Level, RefineConfig
from .target import Target

__all__ = ["Level", "RefineConfig", "refine_lm", "windowed_ncc"]


def _residuals(tgt: Target, T, windows, cfg: RefineConfig, level: Level) -> np.ndarray:
    out = []
    for name, (view, win, img_win, sig, valid) in windows.items():
        drr = tgt.render(view.cropped(*win), T, cfg.supersample if level.pixels <= 64 else 1,
                         coarse=level.pixels <= cfg.coarse_below_pixels)
        drr = highpass(drr, sig, valid) if sig else drr
        out.append(ncc_residuals(drr, img_win) if valid is None else ncc_residuals(drr[valid], img_win))
    return np.concatenate(out)


def _windows(tgt: Target, T, level: Level) -> dict:
    """Per view: (view, window (col0, row0, cols, rows), the X-ray's window (high-passed;
    only its pixels that carry a signal, flattened, when some do not), the high-pass sigma in
    pixels or None, the window's signal mask or None when every pixel carries one)."""
    windows = {}
    for name in ("ap", "lat"):
        img, view = tgt.image(name, level.pixels)
        win = tgt.window(view, T, level.margin_mm)
        c0, r0, w, h = win
        sig = level.highpass_mm * tgt.magnification(view, T) / view.pixel_spacing[0] if level.highpass_mm else None
        valid = tgt.valid(name, level.pixels)
        if valid is not None:
            valid = valid[r0:r0 + h, c0:c0 + w]
            # all carry a signal, or too few to correlate (the vertebra left the field): the plain window
            valid = None if valid.all() or valid.sum() < 16 else valid
        img_win = img[r0:r0 + h, c0:c0 + w]
        img_win = highpass(img_win, sig, valid) if sig else img_win
        windows[name] = (view, win, img_win if valid is None else img_win[valid], sig, valid)
    return windows


def windowed_ncc(tgt: Target, T: np.ndarray, cfg: RefineConfig, level: Level | None = None) -> dict[str, float]:
    """Per-view NCC of the DRR at pose ``T`` with the X-ray, in the vertebra's window at
    ``level`` (default the finest): the similarity the refinement maximises."""
    level = level or cfg.levels[-1]
    windows = _windows(tgt, T, level)
    return _view_ncc(windows, _residuals(tgt, T, windows, cfg, level))


def _view_ncc(windows: dict, r: np.ndarray) -> dict[str, float]:
    """Each view's NCC from the stacked residuals ``r`` (:func:`~RadGSRegLib.similarity.ncc_residuals`
    of each view's window, in ``windows``' order)."""
    parts = np.split(r, np.cumsum([w_[2].size for w_ in windows.values()])[:-1])
    return {name: ncc_from_residuals(seg) for name, seg in zip(windows, parts)}


def refine_lm(tgt: Target, T: np.ndarray, cfg: RefineConfig, log=None, progress=None) -> tuple[np.ndarray, dict]:
    """Stage 2: coarse-to-fine Levenberg-Marquardt on the windowed NCC of both views.

    ``progress(i, n)``, if given, is called before level ``i`` of ``n``."""
    info = {"levels": []}
    for li, level in enumerate(cfg.levels):
        if progress:
            progress(li, len(cfg.levels))
        windows = _windows(tgt, T, level)
        steps = np.array([level.step_deg] * 3 + [level.step_mm] * 3)
        lam = 1e-2
        r = _residuals(tgt, T, windows, cfg, level)
        cost = float(r @ r)
        for it in range(level.iterations):
            c = apply(T, tgt.centre)
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
                rn = _residuals(tgt, Tn, windows, cfg, level)
                cn = float(rn @ rn)
                if cn < cost:
                    T, r, cost, lam = Tn, rn, cn, max(lam / 3, 1e-6)
                    improved = True
                    break
                lam *= 4
            if not improved or np.all(np.abs(delta) < 0.02 * steps):
                break
        ncc = _view_ncc(windows, r)
        info["levels"].append({"pixels": level.pixels, "iterations": it + 1, "ncc": ncc})
        if log:
            log(f"  level {level.pixels}px: NCC ap {ncc['ap']:.3f}, lat {ncc['lat']:.3f}")
    return T, info
