"""One registration, end to end: a case (CT, labels, two X-rays, geometry) -> ``T_ct_to_carm``.

Stages, each timed: preprocessing (X-rays to line integrals, CT slab around the vertebra,
target points), translation search, coarse-to-fine 2-D/3-D refinement
(:mod:`.refine2d`). Never reads the case's ground truth.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..drr import DRR, hu_to_mu
from ..geometry import translation
from ..io import Case, Result
from ..volume import Volume
from ..xray import as_line_integral
from .refine2d import RefineConfig, Target, block_average, refine_lm, search_pose

__all__ = ["RegisterConfig", "run", "slab_around", "reconstruct_volume"]

STAGES = ("none", "search", "2d")


@dataclass
class RegisterConfig:
    """Settings of :func:`run`.

    Attributes:
        refine: "none" (initial pose only), "search" (+ translation search) or "2d"
            (+ coarse-to-fine 2-D/3-D refinement; the default).
        slab_mm: half-height of the CT slab rendered around the vertebra (along the CT's
            cranio-caudal axis). It must reach past the detector's field of view (about
            ±90 mm at the isocentre) plus the pose offset: a slab whose cut ends show in the
            image adds edges the X-ray does not have (70 mm: 20 % success on the real-CT
            suite's first 10 cases, 150 mm: 70 %). Rays are mostly horizontal, so a taller
            slab costs little.
        refine2d: the refinement's levels and search range.
        min_ncc: a result whose final windowed NCC (mean of both views) is below this is
            flagged as doubtful in ``Result.info["warnings"]``.
        reconstruct: also reconstruct the vertebra region from the two X-rays (radiative
            Gaussians fitted for ``recon_iterations`` steps; ``Result.recon``, C-arm frame).
    """

    refine: str = "2d"
    slab_mm: float = 150.0
    refine2d: RefineConfig = field(default_factory=RefineConfig)
    min_ncc: float = 0.75
    reconstruct: bool = False
    recon_iterations: int = 300

    def __post_init__(self):
        if self.refine not in STAGES:
            raise ValueError(f"refine must be one of {STAGES}, not {self.refine!r}")


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


def run(case: Case, config: RegisterConfig | None = None, log=None) -> Result:
    """Register a case. Returns a :class:`~RadGSRegLib.io.Result` with ``T_ct_to_carm``,
    per-stage ``runtime_s`` and ``info`` (similarities, warnings)."""
    cfg = config or RegisterConfig()
    t0 = time.perf_counter()
    runtime, info, warnings = {}, {"refine": cfg.refine}, []
    if case.seg is not None and case.vertebra_label is not None:
        pts = case.seg.label_points(case.vertebra_label, max_points=3000)
    else:
        pts = case.ct.index_to_world(np.array([[(n - 1) / 2 for n in case.ct.size]]))
        warnings.append("no vertebra label: the whole CT is the target")
    centre = pts.mean(axis=0)
    T = case.initial_guess if case.initial_guess is not None else translation(-centre)
    info["initial_pose_from"] = "case" if case.initial_guess is not None else "nominal (vertebra at the isocentre)"
    images = {k: as_line_integral(case.xrays[k], case.image_kind) for k in ("ap", "lat")}
    slab = slab_around(case.ct, centre, cfg.slab_mm)
    mu = hu_to_mu(slab.array)
    coarse_mu, coarse_affine = block_average(mu, slab.affine, cfg.refine2d.coarse_mm)
    coarse = DRR(coarse_mu, coarse_affine) if coarse_mu is not mu else None
    tgt = Target(DRR(mu, slab.affine), pts, images, case.views, coarse=coarse)
    runtime["preprocessing"] = time.perf_counter() - t0
    candidates = [(0.0, T, {})]
    if cfg.refine in ("search", "2d"):
        t = time.perf_counter()
        candidates = search_pose(tgt, T, cfg.refine2d)
        T = candidates[0][1]
        info["search"] = [ci for _, _, ci in candidates]
        runtime["search"] = time.perf_counter() - t
        if log:
            log(f"  pose search: best of {len(cfg.refine2d.search_rot_deg) ** 3} rotations, score {candidates[0][0]:.3f}")
    if cfg.refine == "2d":
        t = time.perf_counter()
        best = None
        for score, Tc, _ in candidates:
            Tr, ri = refine_lm(tgt, Tc, cfg.refine2d)
            final = ri["levels"][-1]["ncc"]
            m = float(np.mean(list(final.values())))
            if log:
                log(f"  candidate (search score {score:.3f}): final NCC {m:.3f}")
            if best is None or m > best[0]:
                best = (m, Tr, ri)
        m, T, ri = best
        info["refine2d"] = ri
        info["final_ncc"] = ri["levels"][-1]["ncc"]
        runtime["refinement"] = time.perf_counter() - t
        if m < cfg.min_ncc:
            warnings.append(f"doubtful result: final NCC {m:.2f} < {cfg.min_ncc}")
    recon = None
    if cfg.reconstruct:
        t = time.perf_counter()
        recon = reconstruct_volume(case, iterations=cfg.recon_iterations, log=log)
        runtime["reconstruction"] = time.perf_counter() - t
    runtime["total"] = time.perf_counter() - t0
    info["warnings"] = warnings
    return Result(T_ct_to_carm=T, runtime_s=runtime, recon=recon, info=info)


def reconstruct_volume(case: Case, *, iterations: int = 300, log=None) -> Volume:
    """Radiative Gaussians fitted to the case's two X-rays, voxelized on a 96 mm cube of
    1.5 mm voxels around the isocentre (C-arm frame). The learned reconstruction replaces
    this when it lands."""
    from ..gaussians.fit import FitConfig, fit_case_xrays

    if log:
        log(f"reconstructing: {iterations} iterations of Gaussian fitting")
    return fit_case_xrays(case, FitConfig(iterations=iterations))[1]
