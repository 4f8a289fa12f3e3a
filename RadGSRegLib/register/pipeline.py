"""One registration, end to end: a case (CT, labels, two X-rays, geometry) -> ``T_ct_to_carm``.

A registration is a list of *stages* run in order over one :class:`Registration` (the
case, its prepared :class:`~.target.Target`, the settings, and the :class:`Candidate`
poses on their way through); :func:`stages_for` picks them from :class:`RegisterConfig`:

1. ``search`` (``init`` "search"/"learned"): rotation hypotheses with template-matched
   translation (:mod:`.search`); the best ``search.candidates`` go on;
2. ``learned`` (``init`` "learned"): the RadGS-Reg network (RecM reconstructs the vertebra
   from the X-rays around the best searched position, RegM registers the CT to it); its
   pose goes first, the best search poses stay as further starts;
3. ``refine3d`` (``refine`` "3d"/"both"): each candidate's CT vertebra onto the
   reconstruction (the network's, else a per-case Gaussian fit; :mod:`.refine3d`);
4. ``refine2d`` (``refine`` "2d"/"both"): Levenberg-Marquardt on DRRs against both X-rays
   (:mod:`.refine2d`): the coarsest level from each candidate, the finer levels from the
   ``refine2d.keep`` best after it (one of those the first level brought to the same pose,
   ``refine2d.same_mm``); the best final NCC wins, and a result worse than its own
   start is rejected (the start is kept, and a warning says so);
5. ``check`` (always): the windowed NCC at the final pose, and its share of what each
   X-ray's noise allows (``explained``: NCC / :func:`~.refine2d.ncc_ceiling`, mean over the
   views); below ``min_ncc`` or ``min_explained`` the result is flagged doubtful; the DRRs
   at the final pose if asked for;
6. ``output`` (``reconstruct`` without a reconstruction yet): a Gaussian fit for display.

A result the check passes but that explains less than ``search.level_check`` of what the
noise allows has its level checked (:func:`_level_check`): itself moved one vertebra either
way (from the case's labels), refined; kept when that is not doubtful and explains more
(``info["level_check"]``; the ``level:`` warning).

A result the check finds doubtful is first tried at the other levels of the spine
(``search.rescue``, with the search and the 2-D/3-D refinement: :func:`_rescue_levels`):
the best hypotheses at levels the search's candidates did not try, and the result moved by
1 to ``search.level_steps`` whole vertebrae either way, are refined, and their
result replaces the first when its final NCC is higher (``info["rescue"]``; a ``level:``
warning when it lies at another level): a look-alike neighbour that won the search is then
caught where the fine levels' NCC tells the levels apart.

A result still doubtful is tried from the pose search run again about each of the first
search's candidates (``search.research``, :func:`_research`): a pose turned beyond the
rotation grid's reach from the start is within it from a candidate's; their result replaces
the first when its final NCC is higher (``info["research"]``; the same ``level:`` warning,
measured from the first attempt's result).

A result still doubtful is refined again from six starts, its pose turned by
``refine2d.restart_deg`` either way about each axis (:func:`_restart`): the best replaces it
when its final NCC is higher (``info["restart"]``): a refinement stopped a few mm off in a
local optimum is left that way.

With ``robust.mode`` "auto" (the default), a result that is still doubtful is registered
a second time (without a rescue of its own) with the tiled, outlier-rejecting similarity
(:class:`~.config.RobustConfig`:
X-rays with metal the CT does not have), which replaces the first when it scores higher on
that similarity and its pose shows the metal (outlier tiles in both views;
``info["robust"]``); "always" uses it from the start, "never" not at all. A result the plain
similarity accepts is never changed by it; ``info["final_ncc_similarity"]`` says which
similarity the final NCC is.

Before the stages, with ``metal.mode`` "mask" (the default), the metal in both X-rays
(screws, K-wires, retractors: not in the CT) is found by a small network and left out of
every comparison with the CT's DRRs and of the network's inputs (:func:`mask_metal`,
``info["metal"]``); the Gaussian-fit reconstruction still sees the whole X-rays.

Without ``search`` the case's own initial guess (or the vertebra at the isocentre) is the
one candidate. A new stage is one function ``stage(reg: Registration) -> None`` that reads
and replaces ``reg.candidates`` (best first) and records its ``info``/``runtime``.

Never reads the case's ground truth.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

import numpy as np

from ..errors import InputError
from ..geometry import apply, compose, mtre, pose_to_matrix, translation
from ..io import Case, Result
from ..volume import Volume
from .config import MetalConfig, RefineConfig, RegisterConfig, RobustConfig
from .refine2d import ncc_ceiling, outlier_fraction, refine_lm, windowed_ncc
from .refine3d import refine_3d
from .search import level_steps, neighbour_offsets, rotation_hypotheses, search_other_levels, search_pose
from .target import Target, make_target

__all__ = ["run", "load_networks", "reconstruct_volume", "check_refinement", "fitted_levels", "Candidate",
           "Registration", "stages_for", "mask_metal", "search_stage", "learned_stage", "refine3d_stage",
           "refine2d_stage", "check_stage", "output_stage", "untrained_level", "network_inputs"]


@dataclass
class Candidate:
    """A pose on its way through the stages.

    Attributes:
        T: (4, 4) ``T_ct_to_carm``. score: the pose search's score (mean NCC of both
            views; 0 for a pose the search did not make). info: what the stages said about
            it (the search's per-view NCC and shift, ``learned``, ``refine3d``).
    """

    T: np.ndarray
    score: float = 0.0
    info: dict = field(default_factory=dict)


@dataclass
class Registration:
    """The state of one registration, shared by its stages.

    ``candidates`` is the current list of poses, best first; ``recon`` / ``region`` the
    reconstruction (C-arm frame) and the CT vertebra region (CT frame) once a stage made
    them; ``robust`` the :class:`~.config.RobustConfig` whose tiled similarity this
    attempt's search, refinement and check use (None: plain windowed NCC); ``info``,
    ``runtime`` (seconds per stage) and ``warnings`` become the :class:`~RadGSRegLib.io.Result`'s."""

    case: Case
    cfg: RegisterConfig
    target: Target
    candidates: list
    report: object
    log: Optional[Callable] = None
    net: object = None
    info: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)
    recon: Optional[Volume] = None
    region: Optional[Volume] = None
    drrs: Optional[dict] = None
    robust: Optional[RobustConfig] = None
    searched: list = field(default_factory=list)        # the poses the search passed on, (4, 4) each
    origin_T: Optional[np.ndarray] = None                # the first attempt's result: a rescue's move is from here
    profile: dict = field(default_factory=dict)         # per stage and refinement level: seconds, DRRs, rays

    @property
    def T(self) -> np.ndarray:
        """The current best pose."""
        return self.candidates[0].T

    @contextmanager
    def timed(self, key: str):
        """Sets ``runtime[key]`` to the seconds of the ``with`` block and ``profile[key]`` to
        them and the DRRs rendered and rays cast in it (``{"seconds", "renders", "rays"}``)."""
        t, n, rays = time.perf_counter(), self.target.renders, self.target.rays
        try:
            yield
        finally:
            self.runtime[key] = time.perf_counter() - t
            self.profile[key] = {"seconds": self.runtime[key], "renders": self.target.renders - n,
                                 "rays": self.target.rays - rays}

    def add_profile(self, key: str, record: dict) -> None:
        """Adds a record's ``seconds``, ``renders`` and ``rays`` to ``profile[key]``."""
        mine = self.profile.setdefault(key, {"seconds": 0.0, "renders": 0, "rays": 0})
        for q in mine:
            mine[q] += record[q]

    def say(self, line: str) -> None:
        if self.log:
            self.log(line)


def fitted_levels(cfg: RefineConfig, tgt: Target, T: np.ndarray) -> list:
    """``cfg.levels`` with each level's detector pixels halved while its pixels, at the
    vertebra (pose ``T``, the larger of both views'), are smaller than
    ``cfg.min_pixel_voxels`` of the CT's smallest voxel spacing, but never below the
    previous level's, nor (when the block-averaged copy differs from the CT) down to
    ``cfg.coarse_below_pixels`` for a level above it: it would render the coarse copy. Finer
    pixels show no more of the CT (a 3 mm CT's finest level at 128 px, not 256; issue #21)."""
    vox = float(tgt.drr.spacing.min())
    out = []
    for lv in cfg.levels:
        p, floor = lv.pixels, out[-1].pixels if out else 1
        if tgt.coarse is not tgt.drr and p > cfg.coarse_below_pixels:
            floor = max(floor, cfg.coarse_below_pixels + 1)    # a full-resolution level stays one
        while p // 2 >= floor:
            mm = max(v.size[0] * v.pixel_spacing[0] / p / tgt.magnification(v, T) for v in tgt.views.values())
            if mm >= cfg.min_pixel_voxels * vox:
                break
            p //= 2
        out.append(lv if p == lv.pixels else replace(lv, pixels=p))
    return out


def check_refinement(tgt: Target, T_start: np.ndarray, T_result: np.ndarray, ncc_result: float,
                     cfg: RegisterConfig, robust=None) -> tuple[np.ndarray, float, str | None]:
    """The divergence check: a refined pose whose windowed NCC (finest level) is more than
    ``cfg.reject_drop`` below its starting pose's is rejected. Returns (pose kept, its NCC,
    a warning or None). ``robust``: the similarity the refinement used (None: plain)."""
    start = float(np.mean(list(windowed_ncc(tgt, T_start, cfg.refine2d, robust=robust).values())))
    if ncc_result < start - cfg.reject_drop:
        return (np.asarray(T_start, dtype=np.float64), start,
                f"2-D/3-D refinement diverged (NCC {start:.3f} at its start, {ncc_result:.3f} after): rejected, "
                "the starting pose is kept")
    return T_result, ncc_result, None


# ------------------------------------------------------------------ stages
def search_stage(reg: Registration) -> None:
    """The pose search from the current pose (tiled when ``reg.robust``): its best
    hypotheses become the candidates."""
    cfg = reg.cfg.search
    label = " (tiled)" if reg.robust else ""
    rotations = len(rotation_hypotheses(cfg.rot_deg))

    def progress(i, n):
        second = f" (second pass, {i + 1 - rotations}/{n - rotations})" if i >= rotations else ""
        reg.report.stage("search", f"pose search{label}: hypothesis {i + 1}/{n}{second}", within=(i, n))

    with reg.timed("search"):
        found = search_pose(reg.target, reg.T, cfg, robust=reg.robust, progress=progress)
        reg.candidates = [Candidate(h.T, h.score, h.info) for h in found]
        reg.searched = [h.T for h in found]
        reg.info["search"] = [h.info for h in found]
    reg.say(f"  pose search{label}: best of {rotations} rotations, "
            f"score {found[0].score:.3f}")


def learned_stage(reg: Registration) -> None:
    """The RadGS-Reg network from the best candidate, behind a gate: its pose goes first only
    when it explains the X-rays better than its input (:func:`learned_gate`), otherwise the
    input stays first and the network's pose goes last; the best search poses stay as
    further starts either way (``search.candidates`` poses in all, one more when the gate
    keeps the input of a single one). So without refinement a network output that
    explains less cannot replace the search's pose, and with it the network's pose is one
    more start (``info["learned"]["gate"]`` says which went first and why; ``T_input`` and
    ``T_network`` are both poses, ``T_ct_to_carm`` (4, 4))."""
    from ..learned.infer import predict

    reg.report.stage("learned", "RadGS-Reg network")
    with reg.timed("learned"):
        net = reg.net
        images, valid = network_inputs(reg.target, net.cfg.input_pixels)
        pred = predict(net, reg.case, reg.T, images=images, valid=valid, device=reg.cfg.device)
        reg.recon, reg.region = pred.recon, pred.region.crop
        best = reg.candidates[0]
        gate = learned_gate(reg.target, best.T, pred.T_ct_to_carm, reg.cfg, reg.robust)
        mine = Candidate(pred.T_ct_to_carm, best.score, {"learned": True})
        n = reg.cfg.search.candidates
        if gate["kept"] == "network":
            reg.candidates = [mine] + reg.candidates[:max(n - 1, 0)]
        else:                                            # the input first, always kept; the network's last
            reg.candidates = reg.candidates[:max(n - 1, 1)] + [mine]
        reg.info["learned"] = {"runtime_s": pred.runtime_s, "gate": gate,
                               "T_input": np.asarray(best.T, dtype=float).tolist(),
                               "T_network": np.asarray(pred.T_ct_to_carm, dtype=float).tolist()}
        unseen = untrained_level(net, reg.case)
        if unseen:
            reg.warnings.append(unseen)
    reg.say(f"  RadGS-Reg network: {reg.runtime['learned']:.2f} s; its pose explains the X-rays "
            f"{'better' if gate['kept'] == 'network' else 'less well'} than its input (windowed NCC "
            f"{gate['ncc_network']:.3f} vs {gate['ncc_input']:.3f}): the {gate['kept']}'s goes first")


def network_inputs(tgt: Target, pixels: int) -> tuple[dict, dict]:
    """The X-rays as the RadGS-Reg network takes them from a prepared :class:`~.target.Target`
    (line integrals on a ``pixels``-square working detector; :func:`~RadGSRegLib.learned.infer.predict`'s
    ``images`` and ``valid``): ({"ap", "lat"} -> (image (P, P), View), {"ap", "lat"} -> (P, P)
    mask of the pixels that carry a signal, metal left out where the target excludes it)."""
    names = ("ap", "lat")
    return {n: tgt.image(n, pixels) for n in names}, {n: tgt.valid(n, pixels) for n in names}


def untrained_level(net, case) -> str | None:
    """A warning when the case's vertebra (its ``vertebra_name``, read as a level) is not
    among the levels the network's weights were trained on
    (:attr:`~RadGSRegLib.learned.model.RadGSRegNet.trained_levels`); None when it is, or when
    either cannot be told (no level name, weights whose card does not say)."""
    from ..levels import level_of_segment_name

    seen = net.trained_levels
    level = level_of_segment_name(case.vertebra_name) if case.vertebra_name else None
    if not seen or level is None or level in seen:
        return None
    return (f"the RadGS-Reg network was not trained on {level} (its weights saw {_level_span(seen)}): its pose is "
            "less sure there; the gate still keeps the search's pose unless the network's explains the X-rays "
            "better")


def _level_span(levels: list[str]) -> str:
    """"T6-S1" for levels that follow each other in the spine, else "L1, L3"."""
    from ..levels import LEVELS

    idx = [LEVELS.index(lv) for lv in levels if lv in LEVELS]
    if len(idx) == len(levels) > 1 and idx == list(range(idx[0], idx[0] + len(idx))):
        return f"{levels[0]}-{levels[-1]}"
    return ", ".join(levels)


def learned_gate(tgt: Target, T_input: np.ndarray, T_network: np.ndarray, cfg: RegisterConfig,
                 robust: RobustConfig | None = None) -> dict:
    """Which pose goes on first, the network's or its input's (``T_ct_to_carm`` (4, 4) each):
    the network's when its windowed NCC (the check's similarity: both views' mean at the
    finest refinement level, :func:`.refine2d.windowed_ncc`, tiled with ``robust``) is
    higher; a NaN (no comparable pixel at that pose) loses. Returns ``{"kept": "network" |
    "input", "ncc_network", "ncc_input"}``."""
    n, i = (float(np.mean(list(windowed_ncc(tgt, T, cfg.refine2d, robust=robust).values())))
            for T in (T_network, T_input))
    better = np.isfinite(n) and (not np.isfinite(i) or n > i)
    return {"kept": "network" if better else "input", "ncc_network": n, "ncc_input": i}


def refine3d_stage(reg: Registration) -> None:
    """Each candidate's CT vertebra onto the reconstruction (made here by a Gaussian fit
    around the best candidate when no network made one)."""
    from ..region import VertebraRegion

    case, cfg = reg.case, reg.cfg
    if reg.recon is None:
        with reg.timed("reconstruction"):
            reg.recon = reconstruct_volume(case, iterations=cfg.recon_iterations, log=reg.log,
                                           centre=apply(reg.T, reg.target.centre), grid_mm=cfg.refine3d.region_mm,
                                           progress=lambda i, n: reg.report.stage(
                                               "reconstruct", f"reconstructing the vertebra (Gaussian fit {i}/{n})",
                                               within=(i, n)))
    with reg.timed("refinement3d"):
        if reg.region is None:
            reg.region = VertebraRegion.of(case.ct, case.seg, case.vertebra_label, side_mm=cfg.refine3d.region_mm,
                                           voxel_mm=cfg.refine3d.region_voxel_mm).crop
        refined = []
        for k, c in enumerate(reg.candidates):
            reg.report.stage("refine3d", f"3-D/3-D refinement: candidate {k + 1}/{len(reg.candidates)}",
                             within=(k, len(reg.candidates)))
            T3, i3 = refine_3d(reg.recon, reg.region, c.T, cfg.refine3d)
            refined.append(Candidate(T3, c.score, {**c.info, "refine3d": i3}))
        reg.candidates = refined
        reg.info["refine3d"] = [c.info["refine3d"] for c in refined]


def refine2d_stage(reg: Registration) -> None:
    """Levenberg-Marquardt from each candidate, one level at a time over all of them: the
    first (coarsest) level from every one, then the finer levels from the ``refine2d.keep``
    best of them (by their NCC after the first level: a verification of the search's
    hypotheses). Of candidates the first level brought within ``refine2d.same_mm`` mean
    distance over the vertebra's points, only the better goes on; and after every level but
    the last, none goes on whose NCC there is more than ``refine2d.keep_within`` below the
    best's (``info["refine2d_coarse"]`` says ``same_as``, or ``behind``: the level it stopped
    after). The best final NCC is kept unless it is worse than its own start
    (:func:`check_refinement`)."""
    cfg = reg.cfg
    levels = cfg.refine2d.levels
    n = len(reg.candidates)
    keep = min(n, cfg.refine2d.keep)
    done, total = 0, n + keep * (len(levels) - 1)

    def ncc(lv):
        return float(np.mean(list(lv["ncc"].values())))

    with reg.timed("refinement"):
        runs = []                                        # [NCC at the last level run, k, T, level records, candidate]
        for k, c in enumerate(reg.candidates):
            reg.report.stage("refine2d", f"2-D/3-D refinement: candidate {k + 1}/{n}, level 1/{len(levels)}",
                             within=(done, total))
            Tc, ci = refine_lm(reg.target, c.T, cfg.refine2d, robust=reg.robust, levels=levels[:1])
            reg.add_profile("refinement level 1", ci["levels"][0])
            runs.append([ncc(ci["levels"][0]), k, Tc, ci["levels"], c])
            done += 1
        order = sorted(runs, key=lambda x: -x[0] if np.isfinite(x[0]) else np.inf)     # NaN (no overlap) last
        # a candidate that the first level brought to where a better one already is goes no further,
        # nor one that a level left well behind the best
        alive, same, behind = [], {}, {}
        for run_ in order:
            twin = next((o for o in alive if mtre(run_[2], o[2], reg.target.points) < cfg.refine2d.same_mm), None)
            if twin is not None:
                same[run_[1]] = twin[1]
            elif alive and run_[0] < alive[0][0] - cfg.refine2d.keep_within:        # NaN: not behind
                behind[run_[1]] = 1
            elif len(alive) < keep:
                alive.append(run_)
        total = done + len(alive) * (len(levels) - 1)
        for li in range(1, len(levels)):
            for run_ in alive:
                reg.report.stage("refine2d", f"2-D/3-D refinement: candidate {run_[1] + 1}/{n}, "
                                             f"level {li + 1}/{len(levels)}", within=(done, total))
                run_[2], ri = refine_lm(reg.target, run_[2], cfg.refine2d, robust=reg.robust, levels=levels[li:li + 1])
                reg.add_profile(f"refinement level {li + 1}", ri["levels"][0])
                run_[3] = run_[3] + ri["levels"]
                run_[0] = ncc(ri["levels"][0])
                done += 1
            if li < len(levels) - 1:
                top = max((r[0] for r in alive if np.isfinite(r[0])), default=np.nan)
                for r in alive:              # NaN: no overlap left, it cannot win (unless none has any)
                    if np.isfinite(top) and (not np.isfinite(r[0]) or r[0] < top - cfg.refine2d.keep_within):
                        behind[r[1]] = li + 1
                alive = [r for r in alive if r[1] not in behind]
                total = done + len(alive) * (len(levels) - 1 - li)
        reg.info["refine2d_coarse"] = []
        for m, k, Tr, lv, c in runs:
            record = {"candidate": k, "ncc": ncc(lv[0])}
            if k in same:
                record["same_as"], end = same[k], f"the same pose as candidate {same[k] + 1} after it"
            elif k in behind:
                record["behind"], end = behind[k], f"left behind after level {behind[k]} (NCC {m:.3f})"
            else:
                end = f"final NCC {m:.3f}" if len(lv) == len(levels) else "not among the best"
            reg.info["refine2d_coarse"].append(record)
            what = "network pose" if c.info.get("learned") else \
                f"the result moved {c.info['level_step']:+d} level(s)" if "level_step" in c.info else \
                f"search score {c.score:.3f}"
            reg.say(f"  candidate ({what}): NCC {ncc(lv[0]):.3f} after the first level, {end}")
        m, Tr, lv, start = max(((r[0], r[2], r[3], r[4]) for r in alive),
                               key=lambda x: x[0] if np.isfinite(x[0]) else -np.inf)
        reg.info["refine2d"] = {"levels": lv}
        T, m, warn = check_refinement(reg.target, start.T, Tr, m, cfg, reg.robust)
        reg.info["diverged"] = warn is not None
        if warn:
            reg.warnings.append(warn)
        reg.candidates = [Candidate(T, start.score, start.info)]


def check_stage(reg: Registration) -> None:
    """Every answer is checked: the similarity the refinement maximises, at the final pose."""
    cfg = reg.cfg
    reg.report.stage("check", "checking the result")
    with reg.timed("check"):
        views_ncc = windowed_ncc(reg.target, reg.T, cfg.refine2d, robust=reg.robust)
        ceiling = ncc_ceiling(reg.target, reg.T, cfg.refine2d)
        reg.info["final_ncc_views"] = views_ncc
        reg.info["final_ncc"] = m = float(np.mean(list(views_ncc.values())))
        reg.info["final_ncc_similarity"] = "tiled" if reg.robust is not None else "plain"
        reg.info["ncc_ceiling_views"] = ceiling
        reg.info["explained"] = e = float(np.mean([views_ncc[k] / ceiling[k] if ceiling[k] > 0 else 0.0
                                                   for k in views_ncc]))
        reg.info["min_ncc"], reg.info["min_explained"] = cfg.min_ncc, cfg.min_explained
        reg.info["doubtful"] = m < cfg.min_ncc or e < cfg.min_explained
        what = f"final {'tiled ' if reg.robust is not None else ''}NCC {m:.2f}"
        if m < cfg.min_ncc:
            reg.warnings.append(f"doubtful result: {what} < {cfg.min_ncc}")
        elif e < cfg.min_explained:
            reg.warnings.append(f"doubtful result: {what} is {e:.0%} of what the X-rays' noise allows "
                                f"(< {cfg.min_explained:.0%})")
        if cfg.drrs:
            reg.drrs = {name: reg.target.render(reg.case.views[name], reg.T) for name in ("ap", "lat")}


def output_stage(reg: Registration) -> None:
    """A reconstruction for display when asked for and no stage made one."""
    if reg.recon is not None:
        return
    with reg.timed("reconstruction"):
        reg.recon = reconstruct_volume(reg.case, iterations=reg.cfg.recon_iterations, log=reg.log,
                                       centre=apply(reg.T, reg.target.centre), grid_mm=reg.cfg.refine3d.region_mm,
                                       progress=lambda i, n: reg.report.stage(
                                           "output", f"reconstructing the vertebra for display (Gaussian fit {i}/{n})",
                                           within=(i, n)))


def stages_for(cfg: RegisterConfig) -> list:
    """The stage functions a configuration runs, in order."""
    mode = cfg.init_mode
    stages = []
    if mode in ("search", "learned"):
        stages.append(search_stage)
    if mode == "learned":
        stages.append(learned_stage)
    if cfg.refine in ("3d", "both"):
        stages.append(refine3d_stage)
    if cfg.refine in ("2d", "both"):
        stages.append(refine2d_stage)
    stages.append(check_stage)
    if cfg.reconstruct:
        stages.append(output_stage)
    return stages


def load_networks(cfg: RegisterConfig, *, net=None, metal_net=None) -> tuple:
    """(RadGS-Reg network, metal network) that ``cfg`` needs, on ``cfg.device``: those given
    are kept, the others loaded from ``cfg.model_path()`` (init learned) and
    ``cfg.metal.model_path()`` (metal "mask"); None where ``cfg`` needs none. Load once
    for many cases (a batch's worker) and pass them to :func:`run`.

    Raises:
        WeightFileError: a weight file missing, unsafe or not ours (names the file).
    """
    if cfg.init_mode == "learned" and net is None:
        from ..learned.model import RadGSRegNet

        net = RadGSRegNet.load(cfg.model_path(), device=cfg.device)
    if cfg.metal.mode == "mask" and metal_net is None:
        from ..learned.metal import MetalNet

        metal_net = MetalNet.load(cfg.metal.model_path(), device=cfg.device)
    return net, metal_net


def run(case: Case, config: RegisterConfig | None = None, log=None, *, net=None, metal_net=None,
        progress=None) -> Result:
    """Register a case. Returns a :class:`~RadGSRegLib.io.Result` with ``T_ct_to_carm``,
    per-stage ``runtime_s`` (model loading excluded) and ``info`` (similarities, warnings).

    The inputs are checked first (:func:`RadGSRegLib.checks.check_case`: what cannot be right
    raises :class:`~RadGSRegLib.checks.PlausibilityError`, what is unusual becomes a warning;
    a case read with :func:`~RadGSRegLib.io.read_case` brings its own). Every result is
    checked, whatever ``init``/``refine``: ``info["final_ncc_views"]`` is the
    windowed NCC of each view at the final pose (finest refinement level),
    ``info["final_ncc"]`` their mean (``info["final_ncc_similarity"]``: "plain", or "tiled"
    when the tiled attempt was kept, see the module docstring); a mean below ``min_ncc`` sets
    ``info["doubtful"]`` and adds a warning. ``info["diverged"]`` (2-D/3-D refinement only)
    says the refinement was rejected. ``info["profile"]``: per stage (the keys of
    ``runtime_s``; their DRRs add up to the total), per refinement level over every
    candidate ("refinement level 1", ...: parts of "refinement", not to be added to it) and
    in ``total``: ``seconds``, DRRs rendered (``renders``) and rays cast (``rays``).

    Args:
        log: a callable taking one line of human-readable text, or None.
        net: an already loaded :class:`~RadGSRegLib.learned.model.RadGSRegNet` (batch use:
            load once); otherwise ``config.model`` is loaded.
        metal_net: an already loaded :class:`~RadGSRegLib.learned.metal.MetalNet`; otherwise
            ``config.metal.model`` is loaded (when ``config.metal.mode`` is "mask").
        progress: a callable taking :class:`~RadGSRegLib.progress.ProgressEvent` s (stage
            starts, fractions of the whole job; see :mod:`RadGSRegLib.progress`), or None.
    """
    from ..checks import check_case
    from ..progress import Reporter

    cfg = config or RegisterConfig()
    report = Reporter(progress)
    # the inputs first: what cannot be right is refused before any work, what is unusual is said
    warnings = list(case.warnings) if case.checked else check_case(case)
    mode = cfg.init_mode
    net, metal_net = load_networks(cfg, net=net, metal_net=metal_net)
    t0 = time.perf_counter()
    if case.seg is None or case.vertebra_label is None:
        if mode == "learned" or cfg.refine in ("3d", "both"):
            raise InputError("the learned method (init learned) and the 3-D/3-D refinement (refine 3d/both) need "
                             "the vertebra's label map: this case has no segmentation/vertebra_label; use --init "
                             "search --refine 2d, or add the labels")
        warnings.append("no vertebra label: the whole CT is the target")
    report.stage("preprocessing", "preparing the CT and the X-rays")
    tgt = make_target(case, slab_mm=cfg.slab_mm, coarse_mm=cfg.coarse_mm)
    T = case.initial_guess if case.initial_guess is not None else translation(-tgt.centre)
    info = {"init": mode, "refine": cfg.refine,
            "initial_pose_from": "case" if case.initial_guess is not None else "nominal (vertebra at the isocentre)"}
    levels = fitted_levels(cfg.refine2d, tgt, T)
    if levels != cfg.refine2d.levels:
        cfg = replace(cfg, refine2d=replace(cfg.refine2d, levels=levels))
        info["refine2d_pixels"] = [lv.pixels for lv in levels]
    prep = time.perf_counter() - t0
    t1 = time.perf_counter()
    info["metal"] = mask_metal(tgt, cfg.metal, net=metal_net, report=report, log=log)
    if "warning" in info["metal"]:
        warnings.append(info["metal"]["warning"])
    metal_s = time.perf_counter() - t1

    stages = stages_for(cfg)
    core = [st for st in stages if st is not output_stage]        # display output: once, for the kept attempt

    def attempt(robust, candidates=None, stages=core, settings=cfg):
        reg = Registration(case, settings, tgt, candidates or [Candidate(T)], report, log=log, net=net,
                           warnings=list(warnings), info=dict(info), robust=robust)
        reg.runtime["preprocessing"] = prep
        reg.profile["preprocessing"] = {"seconds": prep, "renders": 0, "rays": 0}
        if cfg.metal.mode != "never":
            reg.runtime["metal"] = metal_s
            reg.profile["metal"] = {"seconds": metal_s, "renders": 0, "rays": 0}
        for stage in stages:
            stage(reg)
        return reg

    rc = cfg.robust
    reg = attempt(rc if rc.mode == "always" else None)
    reg.origin_T = reg.T
    reg.info["robust"] = {"mode": rc.mode, "on": rc.mode == "always"}
    def refine_every(cands):          # the rescues: each start refined through every level, then checked
        every = replace(cfg, refine2d=replace(cfg.refine2d, keep=max(len(cands), cfg.refine2d.keep), same_mm=0.0,
                                              keep_within=2.0))        # NCCs differ by at most 2: none dropped
        return attempt(reg.robust, cands, [refine2d_stage, check_stage], every)

    if cfg.search.level_check and not reg.info["doubtful"] and reg.info["explained"] < cfg.search.level_check \
            and search_stage in core and refine2d_stage in core:
        reg = _level_check(reg, refine_every)
    if (cfg.search.rescue or cfg.search.level_steps) and reg.info["doubtful"] and search_stage in core \
            and refine2d_stage in core:
        reg = _rescue_levels(reg, T, refine_every)
    if cfg.search.research and reg.info["doubtful"] and search_stage in core and refine2d_stage in core:
        reg = _research(reg, lambda cands: attempt(reg.robust, cands, [refine2d_stage, check_stage]))
    if cfg.refine2d.restart_deg and reg.info["doubtful"] and refine2d_stage in core:
        reg = _restart(reg, refine_every)
    # a second attempt can only differ where the similarity chooses the pose: the search, the 2-D/3-D refinement
    if rc.mode == "auto" and reg.info["doubtful"] and (search_stage in core or refine2d_stage in core):
        reg = _second_attempt(reg, attempt)
    if output_stage in stages:
        output_stage(reg)
    reg.runtime["total"] = time.perf_counter() - t0
    reg.info["warnings"] = reg.warnings
    reg.info["profile"] = {**reg.profile, "total": {"seconds": reg.runtime["total"], "renders": tgt.renders,
                                                    "rays": tgt.rays}}
    for w in reg.warnings:
        report.warning(w)
    return Result(T_ct_to_carm=reg.T, runtime_s=reg.runtime, recon=reg.recon, info=reg.info, drrs=reg.drrs)


#: more of an X-ray than this marked as metal: the mask is not used for it (and a warning says so)
MAX_METAL = 0.5


def mask_metal(tgt: Target, cfg: MetalConfig, *, net=None, report=None, log=None) -> dict:
    """Find the metal in both X-rays (:func:`~RadGSRegLib.learned.metal.segment_metal`) and
    leave it out of every comparison (:meth:`~.target.Target.exclude`). Returns the record
    for ``info["metal"]``: ``mode`` and, when masking, ``model`` (the weights named) and per
    view the fraction of the X-ray's signal pixels marked (``fraction``); a view marked over
    :data:`MAX_METAL` is not masked (``skipped``, ``warning``: the run adds it to its warnings). ``net``: the loaded
    :class:`~RadGSRegLib.learned.metal.MetalNet` (None: ``cfg.model`` is loaded)."""
    if cfg.mode == "never":
        return {"mode": "never"}
    from ..learned.metal import MetalNet, segment_metal

    if net is None:
        net = MetalNet.load(cfg.model_path())
    if report is not None:
        report.stage("metal", "finding metal in the X-rays")
    frac, masks, skipped = {}, {}, []
    for name in ("ap", "lat"):
        img, view = tgt.images[name], tgt.views[name]
        valid = tgt.signal[name]
        m = segment_metal(net, img, view, valid, threshold=cfg.threshold, dilate_mm=cfg.dilate_mm)
        frac[name] = float(m.sum() / (m.size if valid is None else max(int(valid.sum()), 1)))
        if frac[name] > MAX_METAL:           # not an X-ray like those it learned from: compare every pixel
            skipped.append(name)
        else:
            masks[name] = m
    for name, m in masks.items():
        tgt.exclude(name, m)
    if log:
        log(f"  metal: {frac['ap']:.1%} of the AP and {frac['lat']:.1%} of the lateral X-ray"
            + (f" (not left out: {', '.join(skipped)})" if skipped else " left out"))
    out = {"mode": cfg.mode, "model": str(cfg.model), "fraction": frac}
    if skipped:
        out["skipped"] = skipped
        out["warning"] = (f"the metal network marked more than {MAX_METAL:.0%} of the {' and '.join(skipped)} X-ray "
                          "(not an X-ray like those it was trained on?): nothing left out there")
    return out


def _rescue_levels(first: Registration, T0: np.ndarray, refine) -> Registration:
    """A doubtful result tried again at other levels of the spine: the best hypotheses at
    levels the search's candidates did not try (:func:`.search.search_other_levels` from the
    search's start ``T0``; ``search.rescue`` of them) and the result itself moved by whole
    vertebrae (:func:`.search.level_steps`, up to ``search.level_steps`` either way, from the
    case's labels), refined and checked (``refine(candidates)``: the 2-D/3-D
    refinement of every one through every level and the check, a new :class:`Registration`). Their result replaces
    the first when its final NCC (the same similarity) is higher, with a warning that names
    the move along the spine when it is ``search.level_mm`` or more (a different level: the
    surgeon should see it); ``info["rescue"]`` records both NCCs, the hypotheses' search
    record and the move; the runtimes and profiles add up (``rescue_search``: its search).
    Only the 2-D/3-D refinement runs on the rescue's hypotheses (no 3-D/3-D refinement, no
    network); a network's reconstruction is kept with the rescued pose."""
    tgt, cfg, case = first.target, first.cfg.search, first.case
    first.say("  doubtful: " + " and ".join(
        ["the best hypotheses at other levels of the spine"] * bool(cfg.rescue)
        + ["the result moved by whole vertebrae"] * bool(cfg.level_steps)))
    with first.timed("rescue_search"):
        found = search_other_levels(tgt, T0, cfg, first.searched, robust=first.robust,
                                    progress=lambda i, n: first.report.stage(
                                        "check", f"doubtful: searching other levels of the spine ({i + 1}/{n})",
                                        within=(i, n))) if cfg.rescue else []
        if cfg.level_steps and case.seg is not None and case.vertebra_label is not None:
            found += level_steps(first.T, neighbour_offsets(case.seg, case.vertebra_label, cfg.level_steps))
    return _try_hypotheses(first, found, refine, "rescue", "other-level")


def _level_check(first: Registration, refine) -> Registration:
    """A result not doubted but not clearly right (``explained`` below ``search.level_check``)
    checked for its level: the result moved one vertebra either way (:func:`.search.level_steps`
    from the case's labels), refined and checked (``refine(candidates)``). Their result
    replaces the first only when the check does not doubt it and it explains *more* of what
    the noise allows (``explained``, not the raw NCC: two windows at different places have
    different ceilings, and the first result passed the check); ``info["level_check"]``, the
    ``level:`` warning when it moved; ``level_check`` in the runtimes: finding the neighbours."""
    case = first.case
    if case.seg is None or case.vertebra_label is None:
        return first
    first.say(f"  explains {first.info['explained']:.0%} of what the noise allows: checking the level "
              "(the result moved one vertebra either way)")
    with first.timed("level_check"):
        found = level_steps(first.T, neighbour_offsets(case.seg, case.vertebra_label, 1))
    return _try_hypotheses(first, found, refine, "level_check", "level-checked", by="explained")


def _research(first: Registration, refine) -> Registration:
    """A doubtful result tried again from the pose search run anew about each of the first
    search's candidates (``search.research`` of them, :func:`.search.search_pose` from its
    pose: the rotation grid about a pose turned beyond the grid's reach): every candidate
    of each, refined and checked (``refine(candidates)``: the 2-D/3-D refinement as the
    first's, the starts that cannot win stopped after the first level, and the check).
    Their result replaces the first when its final NCC is higher, with the same ``level:``
    warning when it moved ``search.level_mm`` or more along the spine; ``info["research"]``
    records both NCCs and the hypotheses' search record (``research_search``: the
    searches' time)."""
    tgt, cfg = first.target, first.cfg.search
    about = first.searched[:cfg.research]
    first.say(f"  doubtful: the pose search again about {len(about)} of its candidates")
    found = []
    with first.timed("research_search"):
        for n, T in enumerate(about):
            first.report.stage("check", f"doubtful: searching again about candidate {n + 1}/{len(about)}",
                               within=(n, len(about)))
            found += search_pose(tgt, T, cfg, robust=first.robust)
    return _try_hypotheses(first, found, refine, "research", "searched-again")


def _try_hypotheses(first: Registration, found: list, refine, key: str, label: str, by: str = "ncc") -> Registration:
    """A rescue's hypotheses ``found`` refined and checked (``refine(candidates)``, a new
    :class:`Registration`), kept when its final NCC is higher than ``first``'s (``by``
    "explained": when it is not doubtful and its ``explained`` is higher; the runtimes
    and profiles add up, :func:`_better`); ``info[key]`` records ``hypotheses``, ``kept``,
    ``final_ncc_first``, ``final_ncc_<key>``, their ``search`` records, the ``other_warnings``
    and, when kept, the move (``moved_mm``, with a ``level:`` warning at ``search.level_mm``
    or more along the spine: the surgeon must see it)."""
    record = {"hypotheses": len(found), "kept": False, "final_ncc_first": first.info["final_ncc"],
              "search": [h.info for h in found]}
    if not found:
        first.info[key] = record
        return first
    second = refine([Candidate(h.T, h.score, h.info) for h in found])
    record[f"final_ncc_{key}"] = second.info["final_ncc"]
    keep, other, switch = _better(first, second, by)
    if switch:
        keep.searched = first.searched + [h.T for h in found]
        tgt, cfg = first.target, first.cfg.search
        origin = first.origin_T if first.origin_T is not None else first.T
        moved = apply(keep.T, tgt.centre) - apply(origin, tgt.centre)      # from the first attempt's result
        record["moved_mm"] = moved.tolist()
        keep.warnings = [w for w in keep.warnings if not w.startswith("level:")]   # an earlier rescue's: restated
        if abs(moved[2]) >= cfg.level_mm:
            first_fit = (f"the first result passed the check but explained {first.info['explained']:.0%} of what the "
                         "noise allows" if by == "explained" else
                         f"the search's first choice fit poorly (final NCC {first.info['final_ncc']:.2f})")
            keep.warnings.append(f"level: {first_fit}; a pose {abs(moved[2]):.0f} mm along the spine (C-arm z "
                                 f"{moved[2]:+.0f} mm) explains the X-rays better (final NCC "
                                 f"{second.info['final_ncc']:.2f}) and was kept: check the level")
    record["kept"] = switch
    record["other_warnings"] = [w for w in other.warnings if w not in keep.warnings]
    keep.info[key] = record
    keep.say(f"  kept the {label if switch else 'first'} result (final NCC {second.info['final_ncc']:.3f} vs "
             f"{first.info['final_ncc']:.3f})")
    return keep


def _better(first: Registration, second: Registration, by: str = "ncc") -> tuple:
    """(kept, other, switched): ``second`` (a new attempt's refinement and check) replaces
    ``first`` when its final NCC is higher (``by`` "explained": when the check does not doubt
    it and its ``explained`` is higher). The runtimes and profiles add up; a kept second
    takes the first's other records (the search's, the robust mode) and its reconstruction
    when it has none (a network's, init learned)."""
    if by == "explained":
        switch = not second.info["doubtful"] and second.info["explained"] > first.info["explained"]
    else:
        switch = second.info["final_ncc"] > first.info["final_ncc"]
    keep, other = (second, first) if switch else (first, second)
    _absorb(keep, other)
    if switch:
        keep.origin_T = first.origin_T
        keep.warnings += [w for w in first.warnings if w.startswith("level:") and w not in keep.warnings]
        for k, v in first.info.items():
            keep.info.setdefault(k, v)
        keep.searched = first.searched
        if keep.recon is None:
            keep.recon, keep.region = first.recon, first.region
    return keep, other, switch


def _restart(first: Registration, refine) -> Registration:
    """A doubtful result refined again from six starts: its pose turned by
    ``refine2d.restart_deg`` either way about each axis (about its vertebra's centre, C-arm
    frame), each through every level (``refine(candidates)``: the 2-D/3-D refinement and the
    check on them). The best replaces the result when its final NCC is higher (a local
    optimum left); ``info["restart"]`` records both NCCs."""
    tgt, deg = first.target, first.cfg.refine2d.restart_deg
    first.say(f"  doubtful: the refinement restarted from the result turned by ±{deg:g}° about each axis")
    c = apply(first.T, tgt.centre)
    starts = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            d = np.zeros(6)
            d[axis] = sign * deg
            starts.append(Candidate(compose(pose_to_matrix(d, center=c), first.T)))
    second = refine(starts)
    keep, other, switch = _better(first, second)
    keep.info["restart"] = {"starts": len(starts), "kept": switch, "final_ncc_first": first.info["final_ncc"],
                            "final_ncc_restart": second.info["final_ncc"],
                            "other_warnings": [w for w in other.warnings if w not in keep.warnings]}
    keep.say(f"  kept the {'restarted' if switch else 'first'} result (final NCC {second.info['final_ncc']:.3f} "
             f"vs {first.info['final_ncc']:.3f})")
    return keep


def _absorb(keep: Registration, other: Registration) -> None:
    """Adds ``other``'s stage runtimes and profile to ``keep``'s (the work of both attempts;
    preprocessing and the metal mask were shared, done once)."""
    for k, v in other.runtime.items():
        if k not in ("preprocessing", "metal"):
            keep.runtime[k] = keep.runtime.get(k, 0.0) + v
    for k, v in other.profile.items():
        if k not in ("preprocessing", "metal"):
            keep.add_profile(k, v)


def _second_attempt(first: Registration, attempt) -> Registration:
    """A doubtful result registered again with the tiled similarity. The tiled attempt is
    kept when its final pose scores higher on the tiled NCC than the first attempt's (finest
    level) *and* there is metal to explain it: at its final pose at least
    ``robust.min_outliers`` of each view's tiles are outliers (:func:`.refine2d.outlier_fraction`);
    otherwise the first result stays, as without this setting. ``info["robust"]`` records
    both scores, the outlier tiles and the other attempt's warnings; the runtimes of both
    attempts add up (``robust_choice``: the comparison)."""
    rc = first.cfg.robust
    first.say("  doubtful: a second attempt with the tiled similarity (metal in the X-rays?)")
    second = attempt(rc)
    t = time.perf_counter()
    tgt, cfg = first.target, first.cfg.refine2d
    n0, rays0 = tgt.renders, tgt.rays
    score_first = float(np.mean(list(windowed_ncc(tgt, first.T, cfg, robust=rc).values())))
    score_second = second.info["final_ncc"]
    outliers = outlier_fraction(tgt, second.T, cfg, rc)
    switch = score_second > score_first and min(outliers.values()) >= rc.min_outliers
    keep, other = (second, first) if switch else (first, second)
    _absorb(keep, other)
    keep.info["robust"] = {"mode": rc.mode, "on": switch, "second_attempt": True,
                           "tiled_ncc_first_attempt": score_first, "tiled_ncc_second_attempt": score_second,
                           "outlier_tiles_second_attempt": outliers,
                           "other_attempt_warnings": [w for w in other.warnings if w not in keep.warnings]}
    keep.runtime["robust_choice"] = time.perf_counter() - t
    keep.profile["robust_choice"] = {"seconds": keep.runtime["robust_choice"], "renders": tgt.renders - n0,
                                     "rays": tgt.rays - rays0}
    for k in ("level_check", "rescue", "research", "restart"):   # the first attempt's, whichever is kept
        if k in first.info:
            keep.info.setdefault(k, first.info[k])
    keep.say(f"  kept the {'tiled' if switch else 'first'} attempt (tiled NCC {score_second:.3f} vs {score_first:.3f}; "
             f"outlier tiles AP {outliers['ap']:.0%}, LAT {outliers['lat']:.0%})")
    return keep


def reconstruct_volume(case: Case, *, iterations: int = 300, centre=(0.0, 0.0, 0.0), grid_mm: float = 96.0,
                       log=None, progress=None) -> Volume:
    """Radiative Gaussians fitted to the case's two X-rays, voxelized on a ``grid_mm`` cube of
    1.5 mm voxels around ``centre`` (C-arm mm; the vertebra's estimated position).
    ``progress(i, n)``, if given, is called (about 50 times) as fitting step ``i`` of ``n`` ends."""
    from ..gaussians.fit import FitConfig, fit_case_xrays

    if log:
        log(f"reconstructing: {iterations} iterations of Gaussian fitting")
    every = max(1, iterations // 50)                     # about 50 reports, not one per step

    def step(i, _rec):
        if (i + 1) % every == 0 or i + 1 == iterations:
            progress(i + 1, iterations)

    return fit_case_xrays(case, FitConfig(iterations=iterations), centre=centre, grid_mm=grid_mm,
                          progress=step if progress else None)[1]
