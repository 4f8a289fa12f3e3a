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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..drr import DRR, hu_to_mu
from ..geometry import apply, translation
from ..io import Case, Result
from ..volume import Volume
from ..xray import as_line_integral
from .refine2d import RefineConfig, Target, block_average, refine_lm, search_pose, windowed_ncc
from .refine3d import Refine3DConfig, refine_3d

__all__ = ["RegisterConfig", "run", "slab_around", "reconstruct_volume", "default_model", "check_refinement",
           "make_target", "INITS", "REFINES"]

INITS = ("auto", "none", "search", "learned")
REFINES = ("none", "3d", "2d", "both")


def default_model() -> Path | None:
    """The shipped stage-1 weights (``Resources/Models/radgsreg_stage1.pt``), if present."""
    p = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "radgsreg_stage1.pt"
    return p if p.is_file() else None


@dataclass
class RegisterConfig:
    """Settings of :func:`run`.

    Attributes:
        init: "none" (the case's initial guess), "search" (pose search), "learned" (pose
            search, then the RadGS-Reg network) or "auto" ("learned" when ``model`` is
            given, else "search").
        refine: "none", "3d" (NCC between the CT vertebra and the reconstruction), "2d"
            (DRRs against both X-rays; the default: the most accurate) or "both" (3d then 2d).
            "3d" without a model reconstructs by per-case Gaussian fitting (about a minute).
        model: RadGS-Reg weights (``.pt``) for ``init="learned"``; "default": the shipped
            stage-1 weights. device: "cpu" or "cuda" for the network.
        slab_mm: half-height of the CT slab rendered around the vertebra (along the CT's
            cranio-caudal axis). It must reach past the detector's field of view (about
            ±90 mm at the isocentre) plus the pose offset: a slab whose cut ends show in the
            image adds edges the X-ray does not have (70 mm: 20 % success on the real-CT
            suite's first 10 cases, 150 mm: 70 %). Rays are mostly horizontal, so a taller
            slab costs little.
        refine2d / refine3d: the refinements' settings.
        min_ncc: a result whose final windowed NCC (mean of both views) is below this is
            flagged as doubtful in ``Result.info["warnings"]``.
        reject_drop: a 2-D/3-D result whose windowed NCC is more than this below its
            starting pose's is rejected (diverged) and the starting pose kept.
        reconstruct: also return a reconstruction of the vertebra region (``Result.recon``,
            C-arm frame): the network's when there is one, else radiative Gaussians fitted
            for ``recon_iterations`` steps.
    """

    init: str = "auto"
    refine: str = "2d"
    model: str | None = None
    device: str = "cpu"
    slab_mm: float = 150.0
    refine2d: RefineConfig = field(default_factory=RefineConfig)
    refine3d: Refine3DConfig = field(default_factory=Refine3DConfig)
    min_ncc: float = 0.75
    reject_drop: float = 0.02
    reconstruct: bool = False
    recon_iterations: int = 300

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, not {self.init!r}")
        if self.refine not in REFINES:
            raise ValueError(f"refine must be one of {REFINES}, not {self.refine!r}")
        if self.init == "learned" and not self.model:
            raise ValueError("init='learned' needs model weights: a .pt file, or 'default' for the shipped ones "
                             "(CLI: --model default)")

    @property
    def init_mode(self) -> str:
        return ("learned" if self.model else "search") if self.init == "auto" else self.init

    def model_path(self) -> Path:
        if self.model == "default":
            p = default_model()
            if p is None:
                raise FileNotFoundError("the shipped weights Resources/Models/radgsreg_stage1.pt are missing; "
                                        "give a weight file or train one (radgsreg train)")
            return p
        return Path(self.model)


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


def run(case: Case, config: RegisterConfig | None = None, log=None, *, net=None) -> Result:
    """Register a case. Returns a :class:`~RadGSRegLib.io.Result` with ``T_ct_to_carm``,
    per-stage ``runtime_s`` (model loading excluded) and ``info`` (similarities, warnings).

    Args:
        net: an already loaded :class:`~RadGSRegLib.learned.RadGSRegNet` (batch use: load
            once); otherwise ``config.model`` is loaded.
    """
    cfg = config or RegisterConfig()
    mode = cfg.init_mode
    if mode == "learned" and net is None:
        from ..learned.model import RadGSRegNet

        net = RadGSRegNet.load(cfg.model_path(), device=cfg.device)
    t0 = time.perf_counter()
    runtime, info, warnings = {}, {"init": mode, "refine": cfg.refine}, []
    if case.seg is None or case.vertebra_label is None:
        if mode == "learned" or cfg.refine in ("3d", "both"):
            raise ValueError("the learned method and the 3-D/3-D refinement need the vertebra's label map")
        warnings.append("no vertebra label: the whole CT is the target")
    tgt = make_target(case, cfg)
    T = case.initial_guess if case.initial_guess is not None else translation(-tgt.centre)
    info["initial_pose_from"] = "case" if case.initial_guess is not None else "nominal (vertebra at the isocentre)"
    runtime["preprocessing"] = time.perf_counter() - t0
    candidates = [(0.0, T, {})]
    if mode in ("search", "learned"):
        t = time.perf_counter()
        candidates = search_pose(tgt, T, cfg.refine2d)
        T = candidates[0][1]
        info["search"] = [ci for _, _, ci in candidates]
        runtime["search"] = time.perf_counter() - t
        if log:
            log(f"  pose search: best of {len(cfg.refine2d.search_rot_deg) ** 3} rotations, score {candidates[0][0]:.3f}")
    recon, region = None, None
    if mode == "learned":
        from ..learned.infer import predict

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
            recon = reconstruct_volume(case, iterations=cfg.recon_iterations, log=log,
                                       centre=apply(T, tgt.centre))
            runtime["reconstruction"] = time.perf_counter() - t
            t = time.perf_counter()
        if region is None:
            from ..learned.config import ModelConfig
            from ..learned.data import VertebraRegion

            region = VertebraRegion.of(case.ct, case.seg, case.vertebra_label, ModelConfig()).crop
        refined = []
        for score, Tc, ci in candidates:
            T3, i3 = refine_3d(recon, region, Tc, cfg.refine3d)
            refined.append((score, T3, {**ci, "refine3d": i3}))
        candidates = refined
        T = candidates[0][1]
        info["refine3d"] = [ci["refine3d"] for _, _, ci in candidates]
        runtime["refinement3d"] = time.perf_counter() - t
    if cfg.refine in ("2d", "both"):
        t = time.perf_counter()
        best = None
        for score, Tc, ci in candidates:
            Tr, ri = refine_lm(tgt, Tc, cfg.refine2d)
            m = float(np.mean(list(ri["levels"][-1]["ncc"].values())))
            if log:
                what = "network pose" if ci.get("learned") else f"search score {score:.3f}"
                log(f"  candidate ({what}): final NCC {m:.3f}")
            if best is None or m > best[0]:
                best = (m, Tr, ri, Tc)
        m, Tr, ri, Tstart = best
        info["refine2d"] = ri
        T, m, warn = check_refinement(tgt, Tstart, Tr, m, cfg)
        if warn:
            warnings.append(warn)
        info["final_ncc"] = m
        runtime["refinement"] = time.perf_counter() - t
        if m < cfg.min_ncc:
            warnings.append(f"doubtful result: final NCC {m:.2f} < {cfg.min_ncc}")
    if cfg.reconstruct and recon is None:
        t = time.perf_counter()
        recon = reconstruct_volume(case, iterations=cfg.recon_iterations, log=log,
                                   centre=apply(T, tgt.centre))
        runtime["reconstruction"] = time.perf_counter() - t
    runtime["total"] = time.perf_counter() - t0
    info["warnings"] = warnings
    return Result(T_ct_to_carm=T, runtime_s=runtime, recon=recon, info=info)


def reconstruct_volume(case: Case, *, iterations: int = 300, centre=(0.0, 0.0, 0.0), log=None) -> Volume:
    """Radiative Gaussians fitted to the case's two X-rays, voxelized on a 96 mm cube of
    1.5 mm voxels around ``centre`` (C-arm mm; the vertebra's estimated position)."""
    from ..gaussians.fit import FitConfig, fit_case_xrays

    if log:
        log(f"reconstructing: {iterations} iterations of Gaussian fitting")
    return fit_case_xrays(case, FitConfig(iterations=iterations), centre=centre)[1]
