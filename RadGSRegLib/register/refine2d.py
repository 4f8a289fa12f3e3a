"""2-D/3-D intensity registration: DRRs of the CT against both X-rays.

Stages (each works on the line-integral form of the X-rays; see :func:`xray.as_line_integral`):

1. **Translation search** (``search_translation``): at a coarse detector size, the DRR of
   the vertebra's window at the current pose is matched to each X-ray by normalised
   cross-correlation over every shift; the AP peak gives x and z, the lateral peak y and
   z, converted from pixels to mm at the vertebra's magnification. It captures offsets of
   tens of mm in one step.
2. **Levenberg-Marquardt** (``refine_lm``), coarse to fine: residuals are the normalised
   (zero mean, unit variance) DRR minus the normalised X-ray inside a window around the
   projected vertebra (so the sum of squares is ``2 (1 - NCC)`` per view); the Jacobian
   comes from finite differences of the compiled Joseph projector (forward only, fast).
   The DRR is of the *whole* CT slab (neighbours, soft tissue), so it looks like the
   X-ray; only the similarity is restricted to the vertebra's window.

Poses are ``T_ct_to_carm``; updates are 6-vectors (rx, ry, rz deg, tx, ty, tz mm) applied
in the C-arm frame about the vertebra's current centre.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..drr import DRR
from ..geometry import View, apply, compose, pose_to_matrix
from .config import Level, RefineConfig

__all__ = ["Level", "RefineConfig", "Target", "search_translation", "search_pose", "refine_lm", "block_average",
           "windowed_ncc"]


def block_average(mu: np.ndarray, affine: np.ndarray, target_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` ([k, j, i]) averaged over blocks of ``floor(target_mm / spacing)`` voxels per axis,
    and its affine (voxel centres at the blocks' centres)."""
    sp = np.linalg.norm(affine[:3, :3], axis=0)                      # (i, j, k)
    f = np.maximum(1, np.floor(target_mm / sp).astype(int))
    if np.all(f == 1):
        return mu, affine
    fk, fj, fi = f[2], f[1], f[0]
    K, J, I = (n // m * m for n, m in zip(mu.shape, (fk, fj, fi)))
    b = mu[:K, :J, :I].reshape(K // fk, fk, J // fj, fj, I // fi, fi).mean(axis=(1, 3, 5))
    A = affine.copy()
    A[:3, :3] = affine[:3, :3] * f[None, :]
    A[:3, 3] = affine[:3, :3] @ ((f - 1) / 2.0) + affine[:3, 3]
    return np.ascontiguousarray(b, dtype=np.float32), A


class Target:
    """What the 2-D/3-D stages need: a DRR of the CT, the vertebra's points (CT frame), the
    X-rays (line integrals) and their views."""

    def __init__(self, drr: DRR, points_ct: np.ndarray, images: dict[str, np.ndarray], views: dict[str, View],
                 coarse: DRR | None = None):
        self.drr = drr
        self.coarse = coarse or drr
        self.points = np.asarray(points_ct, dtype=np.float64)
        self.centre = self.points.mean(axis=0)
        self.images = images
        self.views = views
        self._cache = {}

    def image(self, name: str, pixels: int) -> tuple[np.ndarray, View]:
        """The X-ray resized to ``pixels`` per side (area-averaged) and its view."""
        key = (name, pixels)
        if key not in self._cache:
            from ..xray import resize_view_image

            self._cache[key] = resize_view_image(self.images[name], self.views[name], pixels)
        return self._cache[key]

    def magnification(self, view: View, T) -> float:
        """Detector mm per mm at the vertebra's centre (pose ``T``) for ``view``."""
        return abs(view.source_to_detector) / max(float(np.linalg.norm(view.source - apply(T, self.centre))), 1.0)

    def window(self, view: View, T, margin_mm: float) -> tuple[int, int, int, int]:
        """(col0, row0, cols, rows): bounding box of the projected vertebra + margin, clipped."""
        uv = view.project(apply(T, self.points))
        m = margin_mm * self.magnification(view, T) / view.pixel_spacing[0]
        c0 = int(np.clip(np.floor(uv[:, 0].min() - m), 0, view.size[0] - 2))
        r0 = int(np.clip(np.floor(uv[:, 1].min() - m), 0, view.size[1] - 2))
        c1 = int(np.clip(np.ceil(uv[:, 0].max() + m), c0 + 2, view.size[0]))
        r1 = int(np.clip(np.ceil(uv[:, 1].max() + m), r0 + 2, view.size[1]))
        return c0, r0, c1 - c0, r1 - r0

    def render(self, view: View, T, supersample: int = 1, coarse: bool = False) -> np.ndarray:
        """DRR of ``view`` at pose ``T`` (area-averaged from ``supersample``^2 rays per pixel;
        ``coarse``: from the block-averaged CT, for the low-resolution stages)."""
        drr = self.coarse if coarse else self.drr
        if supersample <= 1:
            return drr.render([view], T)[0].numpy()
        fine = view.resized((view.size[0] * supersample, view.size[1] * supersample))
        img = drr.render([fine], T)[0]
        return F.avg_pool2d(img[None, None], supersample)[0, 0].numpy()


def highpass(a: np.ndarray, sigma_px: float) -> np.ndarray:
    """``a`` minus its Gaussian blur (sigma in pixels): keeps bone edges, drops the smooth
    soft-tissue and scatter background that otherwise dominates a correlation."""
    from scipy import ndimage

    a = a.astype(np.float64)
    return a - ndimage.gaussian_filter(a, sigma_px, mode="nearest")


def _z(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64).ravel()
    s = a.std()
    return (a - a.mean()) / (s if s > 1e-12 else 1.0)


def _ncc_map(image: np.ndarray, template: np.ndarray, valid: np.ndarray | None = None,
             min_overlap: float = 0.5) -> np.ndarray:
    """NCC of ``template`` at every position inside ``image`` (valid correlation), computed
    over the pixels where ``valid`` is true only (masked NCC: positions that overlap the
    image's edge are scored on their overlap, not on padding); positions with less than
    ``min_overlap`` of the template inside score -1."""
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
    ncc = cov / torch.sqrt(var)
    return torch.where(n >= min_overlap * template.size, ncc, torch.full_like(ncc, -1.0))[0, 0].numpy()


def search_translation(tgt: Target, T: np.ndarray, cfg: RefineConfig) -> tuple[np.ndarray, dict]:
    """Stage 1: the translation that best aligns both views' vertebra windows (C-arm frame).

    Each view gives an NCC map over shifts (du along its u, dv along its v, in mm at the
    vertebra); both views' rows run along the shared cranio-caudal axis, so the shift along
    it is chosen jointly (sum of each view's best score at that shift), which keeps one
    view from locking onto a neighbouring vertebra on its own. A mild prior,
    ``search_prior * (shift / search_range)^2`` subtracted from each view's NCC, breaks near
    ties between neighbouring vertebrae (which look alike) in favour of the smaller shift.
    """
    maps, info = {}, {}
    for name in ("ap", "lat"):
        img, view = tgt.image(name, cfg.search_pixels)
        c0, r0, w, h = tgt.window(view, T, cfg.search_margin_mm)
        px_mm = view.pixel_spacing[0] / tgt.magnification(view, T)                                   # mm at the vertebra per pixel
        sig = cfg.search_highpass_mm / px_mm
        templ = highpass(tgt.render(view.cropped(c0, r0, w, h), T, cfg.supersample, coarse=True), sig)
        rng_px = int(np.ceil(cfg.search_range_mm / px_mm))
        pad = np.pad(highpass(img, sig), rng_px, mode="constant")
        inside = np.pad(np.ones(img.shape, bool), rng_px, mode="constant")
        sl = (slice(r0, r0 + h + 2 * rng_px), slice(c0, c0 + w + 2 * rng_px))
        m = _ncc_map(pad[sl], templ, inside[sl])                              # (2 rng + 1)^2
        k = np.arange(-rng_px, rng_px + 1) / max(rng_px, 1)
        m = m - cfg.search_prior * (k[:, None] ** 2 + k[None, :] ** 2)
        maps[name] = (m, rng_px, px_mm, view)
    # rows of both views run along -z: choose the row shift jointly
    rng = min(maps["ap"][1], maps["lat"][1])
    best_z, best = 0, -np.inf
    for dv in range(-rng, rng + 1):
        score = sum(m[dv + r_, :].max() for m, r_, _, _ in maps.values())
        if score > best:
            best, best_z = score, dv
    d = np.zeros(3)
    for name, (m, r_, px_mm, view) in maps.items():
        du = int(np.argmax(m[best_z + r_, :])) - r_
        info[f"search_ncc_{name}"] = float(m[best_z + r_, du + r_])
        for vec, amount in ((view.u, du * px_mm), (view.v, best_z * px_mm / 2)):
            ax = int(np.argmax(np.abs(vec)))
            d[ax] += amount * np.sign(vec[ax])
    info["search_shift_mm"] = d.tolist()
    info["search_score"] = float(sum(info[f"search_ncc_{n}"] for n in ("ap", "lat")) / 2)
    return compose(pose_to_matrix([0, 0, 0, *d]), T), info


def search_pose(tgt: Target, T: np.ndarray, cfg: RefineConfig, progress=None) -> list[tuple[float, np.ndarray, dict]]:
    """Stage 1 over rotation hypotheses: every combination of ``search_rot_deg`` about the
    three axes (about the vertebra's centre), each followed by :func:`search_translation`.
    Returns the ``candidates`` best (score, pose, info), best first.

    ``progress(i, n)``, if given, is called before hypothesis ``i`` of ``n``."""
    import itertools

    c = apply(T, tgt.centre)
    out = []
    hypotheses = list(itertools.product(cfg.search_rot_deg, repeat=3))
    for i, rot in enumerate(hypotheses):
        if progress:
            progress(i, len(hypotheses))
        Tr = compose(pose_to_matrix([*rot, 0, 0, 0], center=c), T)
        Ts, info = search_translation(tgt, Tr, cfg)
        info["search_rot_deg"] = list(rot)
        out.append((info["search_score"], Ts, info))
    out.sort(key=lambda x: -x[0])
    return out[: cfg.candidates]


def _residuals(tgt: Target, T, windows, cfg: RefineConfig, level: Level) -> np.ndarray:
    out = []
    for name, (view, win, img_win, sig) in windows.items():
        drr = tgt.render(view.cropped(*win), T, cfg.supersample if level.pixels <= 64 else 1,
                         coarse=level.pixels <= cfg.coarse_below_pixels)
        drr = highpass(drr, sig) if sig else drr
        out.append((_z(drr) - _z(img_win)) / np.sqrt(img_win.size))
    return np.concatenate(out)


def _windows(tgt: Target, T, level: Level) -> dict:
    windows = {}
    for name in ("ap", "lat"):
        img, view = tgt.image(name, level.pixels)
        win = tgt.window(view, T, level.margin_mm)
        c0, r0, w, h = win
        sig = level.highpass_mm * tgt.magnification(view, T) / view.pixel_spacing[0] if level.highpass_mm else None
        img_win = img[r0:r0 + h, c0:c0 + w]
        windows[name] = (view, win, highpass(img_win, sig) if sig else img_win, sig)
    return windows


def windowed_ncc(tgt: Target, T: np.ndarray, cfg: RefineConfig, level: Level | None = None) -> dict[str, float]:
    """Per-view NCC of the DRR at pose ``T`` with the X-ray, in the vertebra's window at
    ``level`` (default the finest): the similarity the refinement maximises."""
    level = level or cfg.levels[-1]
    windows = _windows(tgt, T, level)
    r = _residuals(tgt, T, windows, cfg, level)
    parts = np.split(r, np.cumsum([w_[2].size for w_ in windows.values()])[:-1])
    return {name: 1.0 - 0.5 * float(np.sum(seg ** 2)) for name, seg in zip(windows, parts)}


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
        ncc = {name: 1.0 - 0.5 * float(np.sum(seg ** 2)) for name, seg in
               zip(windows, np.split(r, np.cumsum([w_[2].size for w_ in windows.values()])[:-1]))}
        info["levels"].append({"pixels": level.pixels, "iterations": it + 1, "ncc": ncc})
        if log:
            log(f"  level {level.pixels}px: NCC ap {ncc['ap']:.3f}, lat {ncc['lat']:.3f}")
    return T, info
