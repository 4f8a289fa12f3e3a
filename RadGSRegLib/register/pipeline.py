"""One registration, end to end: a case (CT, labels, two X-rays, geometry) -> ``T_ct_to_carm``.

Stages, each timed and each switchable (:class:`RegisterConfig`):

1. preprocessing: X-rays to line integrals, CT slab around the vertebra, target points;
2. initial pose (``init``): the case's own guess ("none"); a pose search over rotation
   hypotheses with template-matched translation ("search", :mod:`.refine2d`); or the
   search followed by the learned RadGS-Reg network ("learned": RecM reconstructs the
   vertebra from the X-rays around the searched position, RegM registers the CT to it);
3. refinement (``refine``): 3-D/3-D ("3d", CT vertebra onto the reconstruction,
   :mod:`.refine3d`), 2-D/3-D ("2d", DRRs against the X-rays, :mod:`.refine2d`), or both
   in that order;
4. checks: a 2-D/3-D result whose windowed NCC is worse than its starting pose's is
   rejected (the starting pose is kept, and a warning says so); a final NCC below
   ``min_ncc`` is flagged as doubtful.

Never reads the case's ground truth.
"""
from __future__ import annotations

import time

import numpy as np

from ..drr import DRR, hu_to_mu
from ..errors import InputError
from ..geometry import apply, translation
from ..io import Case, Result
from ..volume import Volume
from ..xray import as_line_integral
from .config import INITS, REFINES, RegisterConfig, default_model
from .refine2d import Target, block_average, refine_lm, search_pose, windowed_ncc
from .refine3d import refine_3d

__all__ = ["RegisterConfig", "run", "slab_around", "reconstruct_volume", "default_model", "check_refinement",
           "make_target", "INITS", "REFINES"]


def slab_around(ct: Volume, centre_ct: np.ndarray, half_mm: float) -> Volume:
    """The CT cropped to the slices within ``half_mm`` of ``centre_ct`` along the volume
    axis closest to the patient's cranio-caudal (LPS z) direction; full in-plane extent."""
    ax = int(np.argmax(np.abs(ct.direction[2])))          # volume axis (i, j, k) along z
    n = ct.size[ax]
    coord = ct.world_to_index(centre_ct)[ax]
    half = half_mm / ct.spacing[ax]
    lo, hi = int(max(0, np.floor(coord - half))), int(min(n, np.ceil(coord + half) + 1))
    sl = [slice(None)] * 3
    sl[2 - ax] = slice(lo, hi)
    shift = np.zeros(3)
    shift[ax] = lo
    A = ct.affine.copy()
    A[:3, 3] = ct.index_to_world(shift)
    return Volume(np.ascontiguousarray(ct.array[tuple(sl)]), A)


def check_refinement(tgt: Target, T_start: np.ndarray, T_result: np.ndarray, ncc_result: float,
                     cfg: RegisterConfig) -> tuple[np.ndarray, float, str | None]:
    """The divergence check: a refined pose whose windowed NCC (finest level) is more than
    ``cfg.reject_drop`` below its starting pose's is rejected. Returns (pose kept, its NCC,
    a warning or None)."""
    start = float(np.mean(list(windowed_ncc(tgt, T_start, cfg.refine2d).values())))
    if ncc_result < start - cfg.reject_drop:
        return (np.asarray(T_start, dtype=np.float64), start,
                f"2-D/3-D refinement diverged (NCC {start:.3f} at its start, {ncc_result:.3f} after): rejected, "
                "the starting pose is kept")
    return T_result, ncc_result, None


def make_target(case: Case, cfg: RegisterConfig) -> Target:
    """What the 2-D/3-D stages need for ``case``: the CT slab around its vertebra (and a
    block-averaged copy for the coarse levels), the vertebra's points and the X-rays as
    line integrals."""
    if case.seg is not None and case.vertebra_label is not None:
        pts = case.seg.label_points(case.vertebra_label, max_points=3000)
    else:
        pts = case.ct.index_to_world(np.array([[(n - 1) / 2 for n in case.ct.size]]))
    images = {k: as_line_integral(case.xrays[k], case.image_kind) for k in ("ap", "lat")}
    slab = slab_around(case.ct, pts.mean(axis=0), cfg.slab_mm)
    mu = hu_to_mu(slab.array)
    coarse_mu, coarse_affine = block_average(mu, slab.affine, cfg.refine2d.coarse_mm)
    coarse = DRR(coarse_mu, coarse_affine) if coarse_mu is not mu else None
    return Target(DRR(mu, slab.affine), pts, images, case.views, coarse=coarse)


def run(case: Case, config: RegisterConfig | None = None, log=None, *, net=None, progress=None) -> Result:
    """Register a case. Returns a :class:`~RadGSRegLib.io.Result` with ``T_ct_to_carm``,
    per-stage ``runtime_s`` (model loading excluded) and ``info`` (similarities, warnings).

    The inputs are checked first (:func:`RadGSRegLib.checks.check_case`: what cannot be right
    raises :class:`~RadGSRegLib.checks.PlausibilityError`, what is unusual becomes a warning;
    a case read with :func:`~RadGSRegLib.io.read_case` brings its own). Every result is
    checked, whatever ``init``/``refine``: ``info["final_ncc_views"]`` is the
    windowed NCC of each view at the final pose (finest refinement level),
    ``info["final_ncc"]`` their mean; a mean below ``min_ncc`` sets ``info["doubtful"]`` and
    adds a warning. ``info["diverged"]`` (2-D/3-D refinement only) says the refinement was
    rejected.

    Args:
        log: a callable taking one line of human-readable text, or None.
        net: an already loaded :class:`~RadGSRegLib.learned.RadGSRegNet` (batch use: load
            once); otherwise ``config.model`` is loaded.
        progress: a callable taking :class:`~RadGSRegLib.progress.ProgressEvent` s (stage
            starts, fractions of the whole job; see :mod:`RadGSRegLib.progress`), or None.
    """
    from ..progress import Reporter

    from ..checks import check_case

    cfg = config or RegisterConfig()
    report = Reporter(progress)
    # the inputs first: what cannot be right is refused before any work, what is unusual is said
    plausibility = list(case.warnings) if case.checked else check_case(case)
    mode = cfg.init_mode
    if mode == "learned" and net is None:
        from ..learned.model import RadGSRegNet

        net = RadGSRegNet.load(cfg.model_path(), device=cfg.device)
    t0 = time.perf_counter()
    runtime, info, warnings = {}, {"init": mode, "refine": cfg.refine}, list(plausibility)
    if case.seg is None or case.vertebra_label is None:
        if mode == "learned" or cfg.refine in ("3d", "both"):
            raise InputError("the learned method (init learned) and the 3-D/3-D refinement (refine 3d/both) need "
                             "the vertebra's label map: this case has no segmentation/vertebra_label; use --init "
                             "search --refine 2d, or add the labels")
        warnings.append("no vertebra label: the whole CT is the target")
    report.stage("preprocessing", "preparing the CT and the X-rays")
    tgt = make_target(case, cfg)
    T = case.initial_guess if case.initial_guess is not None else translation(-tgt.centre)
    info["initial_pose_from"] = "case" if case.initial_guess is not None else "nominal (vertebra at the isocentre)"
    runtime["preprocessing"] = time.perf_counter() - t0
    candidates = [(0.0, T, {})]
    if mode in ("search", "learned"):
        t = time.perf_counter()
        candidates = search_pose(tgt, T, cfg.refine2d, progress=lambda i, n: report.stage(
            "search", f"pose search: rotation hypothesis {i + 1}/{n}", within=(i, n)))
        T = candidates[0][1]
        info["search"] = [ci for _, _, ci in candidates]
        runtime["search"] = time.perf_counter() - t
        if log:
            log(f"  pose search: best of {len(cfg.refine2d.search_rot_deg) ** 3} rotations, score {candidates[0][0]:.3f}")
    recon, region = None, None
    if mode == "learned":
        from ..learned.infer import predict

        report.stage("learned", "RadGS-Reg network")
        t = time.perf_counter()
        pred = predict(net, case.xrays, case.views, case.image_kind, case.ct, case.seg, case.vertebra_label, T,
                       device=cfg.device)
        T, recon, region = pred.T_ct_to_carm, pred.recon, pred.region.crop
        # the network's pose goes first; the best search poses stay as further starts (a wrong
        # network output cannot lose a case the search alone would have won), same count
        candidates = [(candidates[0][0], T, {"learned": True})] + candidates[:max(cfg.refine2d.candidates - 1, 0)]
        info["learned"] = {"runtime_s": pred.runtime_s}
        runtime["learned"] = time.perf_counter() - t
        if log:
            log(f"  RadGS-Reg network: {runtime['learned']:.2f} s")
    if cfg.refine in ("3d", "both"):
        t = time.perf_counter()
        if recon is None:                       # no network: fit Gaussians around the current vertebra position
            recon = reconstruct_volume(case, iterations=cfg.recon_iterations, log=log, centre=apply(T, tgt.centre),
                                       progress=lambda i, n: report.stage(
                                           "reconstruct", f"reconstructing the vertebra (Gaussian fit {i}/{n})",
                                           within=(i, n)))
            runtime["reconstruction"] = time.perf_counter() - t
            t = time.perf_counter()
        if region is None:
            from ..learned.config import ModelConfig
            from ..learned.data import VertebraRegion

            region = VertebraRegion.of(case.ct, case.seg, case.vertebra_label, ModelConfig()).crop
        refined = []
        for k, (score, Tc, ci) in enumerate(candidates):
            report.stage("refine3d", f"3-D/3-D refinement: candidate {k + 1}/{len(candidates)}",
                         within=(k, len(candidates)))
            T3, i3 = refine_3d(recon, region, Tc, cfg.refine3d)
            refined.append((score, T3, {**ci, "refine3d": i3}))
        candidates = refined
        T = candidates[0][1]
        info["refine3d"] = [ci["refine3d"] for _, _, ci in candidates]
        runtime["refinement3d"] = time.perf_counter() - t
    if cfg.refine in ("2d", "both"):
        t = time.perf_counter()
        best = None
        n_levels = len(cfg.refine2d.levels)
        for k, (score, Tc, ci) in enumerate(candidates):
            def level_progress(i, n, k=k):
                report.stage("refine2d", f"2-D/3-D refinement: candidate {k + 1}/{len(candidates)}, level {i + 1}/{n}",
                             within=(k * n_levels + i, len(candidates) * n_levels))

            Tr, ri = refine_lm(tgt, Tc, cfg.refine2d, progress=level_progress)
            m = float(np.mean(list(ri["levels"][-1]["ncc"].values())))
            if log:
                what = "network pose" if ci.get("learned") else f"search score {score:.3f}"
                log(f"  candidate ({what}): final NCC {m:.3f}")
            if best is None or m > best[0]:
                best = (m, Tr, ri, Tc)
        m, Tr, ri, Tstart = best
        info["refine2d"] = ri
        T, m, warn = check_refinement(tgt, Tstart, Tr, m, cfg)
        info["diverged"] = warn is not None
        if warn:
            warnings.append(warn)
        runtime["refinement"] = time.perf_counter() - t
    # every answer is checked: the similarity the refinement maximises, at the final pose
    report.stage("check", "checking the result")
    t = time.perf_counter()
    views_ncc = windowed_ncc(tgt, T, cfg.refine2d)
    info["final_ncc_views"] = views_ncc
    info["final_ncc"] = m = float(np.mean(list(views_ncc.values())))
    info["min_ncc"] = cfg.min_ncc
    info["doubtful"] = m < cfg.min_ncc
    if m < cfg.min_ncc:
        warnings.append(f"doubtful result: final NCC {m:.2f} < {cfg.min_ncc}")
    drrs = {name: tgt.render(case.views[name], T) for name in ("ap", "lat")} if cfg.drrs else None
    runtime["check"] = time.perf_counter() - t
    if cfg.reconstruct and recon is None:
        t = time.perf_counter()
        recon = reconstruct_volume(case, iterations=cfg.recon_iterations, log=log, centre=apply(T, tgt.centre),
                                   progress=lambda i, n: report.stage(
                                       "output", f"reconstructing the vertebra for display (Gaussian fit {i}/{n})",
                                       within=(i, n)))
        runtime["reconstruction"] = time.perf_counter() - t
    runtime["total"] = time.perf_counter() - t0
    info["warnings"] = warnings
    for w in warnings:
        report.warning(w)
    return Result(T_ct_to_carm=T, runtime_s=runtime, recon=recon, info=info, drrs=drrs)


def reconstruct_volume(case: Case, *, iterations: int = 300, centre=(0.0, 0.0, 0.0), log=None,
                       progress=None) -> Volume:
    """Radiative Gaussians fitted to the case's two X-rays, voxelized on a 96 mm cube of
    1.5 mm voxels around ``centre`` (C-arm mm; the vertebra's estimated position).
    ``progress(i, n)``, if given, is called (about 50 times) as fitting step ``i`` of ``n`` ends."""
    from ..gaussians.fit import FitConfig, fit_case_xrays

    if log:
        log(f"reconstructing: {iterations} iterations of Gaussian fitting")
    every = max(1, iterations // 50)                     # about 50 reports, not one per step

    def step(i, _rec):
        if (i + 1) % every == 0 or i + 1 == iterations:
            progress(i + 1, iterations)

    return fit_case_xrays(case, FitConfig(iterations=iterations), centre=centre,
                          progress=step if progress else None)[1]
