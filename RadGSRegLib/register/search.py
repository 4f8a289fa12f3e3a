"""The pose search: where is the vertebra, roughly, and how is it turned?

Every combination of :attr:`SearchConfig.rot_deg` about the three axes (about the
vertebra's centre) is a rotation hypothesis; for each, :func:`search_translation` finds the
shift that best aligns both views' vertebra windows, and the ``candidates`` best
hypotheses (by the mean of both views' NCC; the ``verify`` best searched again from where
they put the vertebra, then spread over distinct vertebra positions) go on to the
refinement. This stage decides
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
from dataclasses import dataclass, replace

import numpy as np

from ..geometry import apply, compose, pose_to_matrix, translation
from ..similarity import highpass, ncc_map, ncc_map_tiled
from .config import RobustConfig, SearchConfig
from .target import Target

__all__ = ["SearchConfig", "Hypothesis", "rotation_hypotheses", "search_translation", "search_levels", "search_pose",
           "search_other_levels", "neighbour_offsets", "level_steps"]


@dataclass
class Hypothesis:
    """One result of the search: ``score`` (mean NCC of both views), pose ``T``
    (``T_ct_to_carm``, (4, 4)) and ``info`` (per-view NCC, shift mm, rotation deg)."""

    score: float
    T: np.ndarray
    info: dict


def search_translation(tgt: Target, T: np.ndarray, cfg: SearchConfig,
                       robust: RobustConfig | None = None, templates: dict | None = None) -> tuple[np.ndarray, dict]:
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
    (unless fewer than a tenth of the window would be left). ``templates``: as
    :func:`search_levels`.

    Returns:
        (``T`` shifted, info: ``search_ncc_ap``/``_lat``, ``search_shift_mm``, ``search_score``).
    """
    return search_levels(tgt, T, cfg, robust, count=1, templates=templates)[0]


def search_levels(tgt: Target, T: np.ndarray, cfg: SearchConfig, robust: RobustConfig | None = None,
                  count: int = 1, sep_mm: float = 0.0, templates: dict | None = None) -> list[tuple[np.ndarray, dict]]:
    """:func:`search_translation`'s best placement (first) and the next best ones along the
    spine: the ``count`` best cranio-caudal shifts (the joint score of both views, best
    first) at least ``sep_mm`` (mm at the vertebra, along the column) from each other, each
    with its best shift across the column in each view. A look-alike neighbour often wins a
    rotation's translation search; the true level is then one of these (issue #18's notes).

    ``templates``: this pose's :func:`_templates` (view name -> (window, template, covered)),
    made for a batch of poses at once; None: made here.

    Returns:
        up to ``count`` (``T`` shifted, info) as :func:`search_translation` returns them.
    """
    templates = templates or _templates(tgt, [T], cfg)[0]
    maps = {}
    for name in ("ap", "lat"):
        img, view = tgt.image(name, cfg.pixels)
        valid = tgt.valid(name, cfg.pixels)
        px_mm = _px_mm(tgt, view, T)
        sig = cfg.highpass_mm / px_mm
        (c0, r0, w, h), templ, cov = templates[name]
        rng_px = int(np.ceil(cfg.range_mm / px_mm))
        pad = np.pad(tgt.highpassed(name, cfg.pixels, sig), rng_px, mode="constant")
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
    # rows of both views run along -z: the row shift is chosen jointly, each view moving the
    # vertebra by half its rows' mm (so one row of both is the mean of their mm per row)
    rng = min(maps["ap"][1], maps["lat"][1])
    joint = sum(m[r_ - rng:r_ + rng + 1].max(axis=1) for m, r_, _, _ in maps.values())    # per row shift
    mm_per_row = sum(px_mm for _, _, px_mm, _ in maps.values()) / 2
    rows = []
    for i in np.argsort(-joint, kind="stable"):                # best first; ties: the first row, as before
        if all(abs(int(i) - j) * mm_per_row >= sep_mm for j in rows):
            rows.append(int(i))
        if len(rows) == count:
            break
    out = []
    for i in rows:
        best_z, info, d = i - rng, {}, np.zeros(3)
        for name, (m, r_, px_mm, view) in maps.items():
            du = int(np.argmax(m[best_z + r_, :])) - r_
            info[f"search_ncc_{name}"] = float(m[best_z + r_, du + r_])
            for vec, amount in ((view.u, du * px_mm), (view.v, best_z * px_mm / 2)):
                ax = int(np.argmax(np.abs(vec)))
                d[ax] += amount * np.sign(vec[ax])
        info["search_shift_mm"] = d.tolist()
        info["search_score"] = float(sum(info[f"search_ncc_{n}"] for n in ("ap", "lat")) / 2)
        out.append((compose(pose_to_matrix([0, 0, 0, *d]), T), info))
    return out


def _px_mm(tgt: Target, view, T: np.ndarray) -> float:
    """mm at the vertebra per pixel of ``view`` at pose ``T``."""
    return view.pixel_spacing[0] / tgt.magnification(view, T)


def _templates(tgt: Target, poses: list, cfg: SearchConfig) -> list[dict]:
    """For each pose, per view: the vertebra's window (col0, row0, cols, rows), the high-passed
    DRR template of it and its comparable pixels (``covered``; None: all), every pose's DRRs
    of a view rendered in one pass (:meth:`~.target.Target.render_each`: the pose search's
    rotation hypotheses are a batch; the DRR of each is cut from a common size, the same
    rays as alone). The X-ray is high-passed whole and then cut,
    so the template is too: rendered with a border as wide as the filter's kernel (scipy's,
    four sigmas), high-passed, cut back: the crop of the whole detector's template, for the
    price of the window and its border.
    High-passing the cut window alone puts edge effects where the X-ray has none: a strong
    edge just outside the window (the back's skin in a lateral view) turned the NCC at the
    true pose of a real-CT case from 0.99 to 0.16 (issue #18's notes)."""
    out = [{} for _ in poses]
    for name in ("ap", "lat"):
        _, view = tgt.image(name, cfg.pixels)
        jobs = []
        for T in poses:
            c0, r0, w, h = tgt.window(view, T, cfg.margin_mm)
            sig = cfg.highpass_mm / _px_mm(tgt, view, T)                # as search_levels
            b = int(4.0 * sig + 0.5) + 1                        # scipy.ndimage.gaussian_filter's radius (truncate 4)
            ca, ra = max(c0 - b, 0), max(r0 - b, 0)                # the border, as far as the detector goes (the
            cb, rb = min(c0 + w + b, view.size[0]), min(r0 + h + b, view.size[1])   # X-ray's filter repeats its edge)
            jobs.append(((c0, r0, w, h), sig, (ca, ra, cb - ca, rb - ra)))
        cols, rows = max(j[2][2] for j in jobs), max(j[2][3] for j in jobs)
        views = [view.cropped(ca, ra, cols, rows) for _, _, (ca, ra, _, _) in jobs]   # one size: may reach past
        drrs = tgt.render_each(views, poses, cfg.supersample, coarse=True, ray_step_mm=cfg.ray_step_mm)             # the detector (cut below)
        covs = tgt.covered_each(views, poses)
        for n, ((c0, r0, w, h), sig, (ca, ra, wa, ha)) in enumerate(jobs):
            cov = None if covs[n] is None else covs[n][:ha, :wa]     # DRR pixels whose rays leave the CT: not compared
            if cov is not None and cov.all():
                cov = None
            inner = (slice(r0 - ra, r0 - ra + h), slice(c0 - ca, c0 - ca + w))
            if cov is not None and cov[inner].sum() < max(16, 0.1 * h * w):
                cov = None                                         # too few left to correlate: the whole window
            templ = highpass(drrs[n][:ha, :wa], sig, cov)
            out[n][name] = ((c0, r0, w, h), templ[inner], None if cov is None else cov[inner])
    return out


def rotation_hypotheses(rot_deg) -> list[tuple[float, float, float]]:
    """The search's rotation hypotheses (Euler deg about x, y, z): every combination of
    ``rot_deg`` about the three axes, and the starting rotation itself when the grid lacks it."""
    hypotheses = list(itertools.product(rot_deg, repeat=3))
    if (0.0, 0.0, 0.0) not in hypotheses:
        hypotheses.append((0.0, 0.0, 0.0))
    return hypotheses


def search_pose(tgt: Target, T: np.ndarray, cfg: SearchConfig, progress=None,
                robust: RobustConfig | None = None) -> list[Hypothesis]:
    """Every rotation hypothesis (``rot_deg`` about each axis, about where ``T`` puts the
    vertebra's centre; and ``T``'s own rotation, when the grid lacks it), each followed by
    :func:`search_translation`; the ``verify`` best of them searched again from where they
    put the vertebra (``verify_range_mm``, no prior: the template now rendered there, with
    the magnification and the parallax of that place, so a right hypothesis that started far
    from the truth scores as it should; one that scores lower there keeps its first pose and
    score: no evidence against it) and ranked by that score. Returns the
    ``candidates`` best, best first (the verified ones before the rest), taking first, one by
    one, those that put the vertebra at least ``distinct_mm`` from every one already taken (a
    look-alike neighbour's hypotheses, often several rotations of it, do not crowd out the
    true level's), then the others in the same order.
    ``robust``: see :func:`search_translation`. Each hypothesis's ``info`` holds the
    search's scores (``search_score``: the one ranked by; ``first_pass_score``,
    ``second_pass_score``).

    ``progress(i, n)``, if given, is called before hypothesis ``i`` of ``n``."""
    c = apply(T, tgt.centre)
    out = []
    hypotheses = rotation_hypotheses(cfg.rot_deg)
    n = len(hypotheses) + min(cfg.verify, len(hypotheses))
    turned = [compose(pose_to_matrix([*rot, 0, 0, 0], center=c), T) for rot in hypotheses]
    templates = _templates(tgt, turned, cfg)                      # every hypothesis's DRRs in one pass
    for i, (rot, Tr) in enumerate(zip(hypotheses, turned)):
        if progress:
            progress(i, n)
        Ts, info = search_translation(tgt, Tr, cfg, robust, templates=templates[i])
        info["search_rot_deg"] = list(rot)
        info["first_pass_score"] = info["search_score"]
        out.append(Hypothesis(info["search_score"], Ts, info))
    out.sort(key=lambda h: -h.score)
    if cfg.verify:
        done = len(hypotheses)
        out = _second_pass(tgt, out[:cfg.verify], cfg, robust,
                           progress and (lambda j, _: progress(done + j, n))) + out[cfg.verify:]   # the rest: first-pass order
    chosen, rest = [], []
    for h in out:
        p = apply(h.T, tgt.centre)
        distinct = all(np.linalg.norm(p - apply(o.T, tgt.centre)) >= cfg.distinct_mm for o in chosen)
        (chosen if distinct else rest).append(h)
        if len(chosen) == cfg.candidates:
            break
    return (chosen + rest)[: cfg.candidates]


def _second_pass(tgt: Target, hyps: list, cfg: SearchConfig, robust, progress=None) -> list[Hypothesis]:
    """Each hypothesis searched again (``verify_range_mm``, no prior) from where it puts the
    vertebra; the new pose and score replace the first only when the score is higher (a lower
    one is no evidence against it). Returns them sorted by score, best first (stable).
    ``progress(j, len(hyps))`` before hypothesis ``j``."""
    again = replace(cfg, range_mm=cfg.verify_range_mm, prior=0.0)
    out = list(hyps)
    templates = _templates(tgt, [h.T for h in hyps], again) if hyps else []
    for j, h in enumerate(hyps):
        if progress:
            progress(j, len(hyps))
        Ts, info = search_translation(tgt, h.T, again, robust, templates=templates[j])
        h.info["second_pass_score"] = info["search_score"]
        if info["search_score"] > h.score:
            shift = np.asarray(h.info["search_shift_mm"]) + np.asarray(info["search_shift_mm"])
            out[j] = Hypothesis(info["search_score"], Ts, {**h.info, **info, "search_shift_mm": shift.tolist()})
    return sorted(out, key=lambda h: -h.score)


def search_other_levels(tgt: Target, T: np.ndarray, cfg: SearchConfig, tried: list,
                        robust: RobustConfig | None = None, progress=None) -> list[Hypothesis]:
    """The best hypotheses at levels of the spine the search's candidates did not try: the
    rescue of a doubtful result (:attr:`SearchConfig.rescue`).

    Every rotation hypothesis of :func:`search_pose` (from ``T``), each with its best
    placements along the column (:func:`search_levels`, one per level: ``2 * level_mm``
    apart); of these, best first, those whose vertebra centre lies at least ``level_mm``
    along the column (the C-arm's z) from every pose in ``tried`` ((4, 4) ``T_ct_to_carm``)
    and from every one already taken, up to ``rescue`` of them; each searched a second time
    as in :func:`search_pose` (which may move one back towards a tried level: refined, it is
    then another start at that level, still welcome). Returns them best first (``info`` as
    :func:`search_pose`'s, and ``"other_level": True``).

    ``progress(i, n)``, if given, is called before each of the ``n`` searches."""
    c = apply(T, tgt.centre)
    zs = [float(apply(Tt, tgt.centre)[2]) for Tt in tried]
    hypotheses = rotation_hypotheses(cfg.rot_deg)
    n = len(hypotheses) + cfg.rescue
    pool = []
    sep = 2 * cfg.level_mm                                                    # one placement per level
    per_rotation = int(np.floor(2 * cfg.range_mm / sep)) + 1                  # as many as the range holds
    turned = [compose(pose_to_matrix([*rot, 0, 0, 0], center=c), T) for rot in hypotheses]
    templates = _templates(tgt, turned, cfg)
    for i, (rot, Tr) in enumerate(zip(hypotheses, turned)):
        if progress:
            progress(i, n)
        for Ts, info in search_levels(tgt, Tr, cfg, robust, count=per_rotation, sep_mm=sep, templates=templates[i]):
            info.update(search_rot_deg=list(rot), first_pass_score=info["search_score"], other_level=True)
            pool.append(Hypothesis(info["search_score"], Ts, info))
    pool.sort(key=lambda h: -h.score)
    taken = []
    for h in pool:
        z = float(apply(h.T, tgt.centre)[2])
        if all(abs(z - z0) >= cfg.level_mm for z0 in zs):
            taken.append(h)
            zs.append(z)
        if len(taken) == cfg.rescue:
            break
    if cfg.verify:
        taken = _second_pass(tgt, taken, cfg, robust,
                             progress and (lambda j, _: progress(len(hypotheses) + j, n)))
    return taken


def neighbour_offsets(seg, label: int, max_step: int, hop_mm: tuple = (8.0, 60.0)) -> dict[int, np.ndarray]:
    """CT-frame vectors (mm, (3,) each) from the centroid of vertebra ``label`` to the
    centroids of the vertebrae up to ``max_step`` levels above and below it in the label
    map ``seg`` (a :class:`~RadGSRegLib.volume.Volume`): {step: vector}, step -k for the
    label k below ``label``'s value, +k above (TotalSegmentator's ids and the phantom's run
    one per level along the spine, :mod:`RadGSRegLib.levels`). A direction ends at the
    first label that is not a positive id the map holds (0 is the background), or whose
    centroid is not the next vertebra's: the first hop outside ``hop_mm`` (min, max), a
    later one outside 0.6-1.6 times the first (a level missing from another numbering)."""
    out = {}
    if max_step <= 0 or seg is None:
        return out
    cents = seg.label_centroids(lb for lb in range(label - max_step, label + max_step + 1) if lb > 0)   # one pass
    if label not in cents:
        return out
    centre = cents[label]
    for sign in (-1, 1):
        last, first = centre, None
        for k in range(1, max_step + 1):
            nb = label + sign * k
            if nb not in cents:                          # absent, or not positive (0 is the background)
                break
            c = cents[nb]
            hop = float(np.linalg.norm(c - last))
            lo, hi = hop_mm if first is None else (0.6 * first, 1.6 * first)
            if not lo <= hop <= hi:
                break
            first = hop if first is None else first
            out[sign * k] = c - centre
            last = c
    return out


def level_steps(T: np.ndarray, offsets: dict[int, np.ndarray]) -> list[Hypothesis]:
    """``T`` (``T_ct_to_carm``) moved by whole vertebrae: for each {step: CT-frame vector
    (mm)} of :func:`neighbour_offsets`, the pose that puts the CT's target where ``T`` put
    that neighbour (``T @ translation(vector)``): a result that aligned the whole column
    one level over is then aligned with its own level, within the column's bend. Returns
    them nearest steps first, score NaN (no search scored them), ``info``
    ``{"level_step": step, "other_level": True}``."""
    order = sorted(offsets, key=lambda k: (abs(k), k))
    return [Hypothesis(float("nan"), np.asarray(T, dtype=np.float64) @ translation(offsets[k]),
                       {"level_step": int(k), "other_level": True}) for k in order]
