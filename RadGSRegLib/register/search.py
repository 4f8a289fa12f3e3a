"""The pose search: where is the vertebra, roughly, and how is it turned?

Every combination of :attr:`SearchConfig.rot_deg` about the three axes (about the
vertebra's centre) is a rotation hypothesis; for each, :func:`search_translation` finds the
shift that best aligns both views' vertebra windows, and the ``candidates`` best
hypotheses (by the mean of both views' NCC) go on to the refinement. This stage decides
whether a registration succeeds: it captures offsets of tens of mm in one step, and its
typical failure is a look-alike neighbouring vertebra (``prior`` and the joint
cranio-caudal shift below work against that).

Works on the line-integral X-rays of a :class:`~.target.Target`, at ``SearchConfig.pixels``,
high-passed, with DRR templates rendered from the block-averaged CT; with a
:class:`~.config.RobustConfig` the NCC maps are tiled and leave out the tiles the CT
cannot explain (metal; :func:`~RadGSRegLib.similarity.ncc_map_tiled`). Poses are
``T_ct_to_carm``; hypotheses are Euler angles per axis (degrees, :mod:`RadGSRegLib.geometry`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ..geometry import apply, compose, pose_to_matrix
from ..similarity import highpass, ncc_map, ncc_map_tiled
from .config import RobustConfig, SearchConfig
from .target import Target

__all__ = ["SearchConfig", "Hypothesis", "search_translation", "search_pose"]


@dataclass
class Hypothesis:
    """One result of the search: ``score`` (mean NCC of both views), pose ``T``
    (``T_ct_to_carm``, (4, 4)) and ``info`` (per-view NCC, shift mm, rotation deg)."""

    score: float
    T: np.ndarray
    info: dict


def search_translation(tgt: Target, T: np.ndarray, cfg: SearchConfig,
                       robust: RobustConfig | None = None) -> tuple[np.ndarray, dict]:
    """The translation that best aligns both views' vertebra windows (C-arm frame).

    Each view gives an NCC map over shifts (du along its u, dv along its v, in mm at the
    vertebra); both views' rows run along the shared cranio-caudal axis, so the shift along
    it is chosen jointly (sum of each view's best score at that shift), which keeps one
    view from locking onto a neighbouring vertebra on its own. A mild prior,
    ``prior * (shift / range_mm)^2`` subtracted from each view's NCC, breaks near ties
    between neighbouring vertebrae (which look alike) in favour of the smaller shift.
    ``robust``: the tiled NCC (tiles of ``robust.tile_mm``) instead of the plain one. The
    template's pixels that the CT does not cover at ``T`` (:meth:`~.target.Target.covered`:
    their rays leave the rendered slab through its ends) are left out of the correlation
    (unless fewer than a tenth of the window would be left).

    Returns:
        (``T`` shifted, info: ``search_ncc_ap``/``_lat``, ``search_shift_mm``, ``search_score``).
    """
    maps, info = {}, {}
    for name in ("ap", "lat"):
        img, view = tgt.image(name, cfg.pixels)
        valid = tgt.valid(name, cfg.pixels)
        c0, r0, w, h = tgt.window(view, T, cfg.margin_mm)
        px_mm = view.pixel_spacing[0] / tgt.magnification(view, T)                   # mm at the vertebra per pixel
        sig = cfg.highpass_mm / px_mm
        vwin = view.cropped(c0, r0, w, h)
        cov = tgt.covered(vwin, T)                         # DRR pixels whose rays leave the CT: not compared
        if cov is not None and cov.sum() < max(16, 0.1 * cov.size):
            cov = None                                     # too few left to correlate: the whole window
        templ = highpass(tgt.render(vwin, T, cfg.supersample, coarse=True), sig, cov)
        rng_px = int(np.ceil(cfg.range_mm / px_mm))
        pad = np.pad(highpass(img, sig, valid), rng_px, mode="constant")
        inside = np.pad(np.ones(img.shape, bool) if valid is None else valid, rng_px, mode="constant")
        sl = (slice(r0, r0 + h + 2 * rng_px), slice(c0, c0 + w + 2 * rng_px))
        if robust is None:
            m = ncc_map(pad[sl], templ, inside[sl], min_overlap=cfg.min_overlap, template_valid=cov)  # (2 rng + 1)^2
        else:
            m = ncc_map_tiled(pad[sl], templ, inside[sl], tile_px=robust.tile_mm / px_mm,
                              reject=robust.reject_contrast, min_overlap=cfg.min_overlap,
                              template_valid=cov)
        k = np.arange(-rng_px, rng_px + 1) / max(rng_px, 1)
        m = m - cfg.prior * (k[:, None] ** 2 + k[None, :] ** 2)
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


def search_pose(tgt: Target, T: np.ndarray, cfg: SearchConfig, progress=None,
                robust: RobustConfig | None = None) -> list[Hypothesis]:
    """Every rotation hypothesis (``rot_deg`` about each axis, about where ``T`` puts the
    vertebra's centre; and ``T``'s own rotation, when the grid lacks it), each followed by
    :func:`search_translation`. Returns the
    ``candidates`` best, best first. ``robust``: see :func:`search_translation`.

    ``progress(i, n)``, if given, is called before hypothesis ``i`` of ``n``."""
    c = apply(T, tgt.centre)
    out = []
    hypotheses = list(itertools.product(cfg.rot_deg, repeat=3))
    if (0.0, 0.0, 0.0) not in hypotheses:            # the starting rotation itself is always tried
        hypotheses.append((0.0, 0.0, 0.0))
    for i, rot in enumerate(hypotheses):
        if progress:
            progress(i, len(hypotheses))
        Tr = compose(pose_to_matrix([*rot, 0, 0, 0], center=c), T)
        Ts, info = search_translation(tgt, Tr, cfg, robust)
        info["search_rot_deg"] = list(rot)
        out.append(Hypothesis(info["search_score"], Ts, info))
    out.sort(key=lambda h: -h.score)
    return out[: cfg.candidates]
