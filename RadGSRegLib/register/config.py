"""Settings of one registration: the one source of defaults for the CLI, the Python API and
the Slicer module (whose panel starts from these values and hands them to the child
process as a JSON file).

Torch-free on purpose: Slicer imports this when the module loads, before any heavy
dependency is installed.

JSON form (``radgsreg register --config FILE``, :func:`config_to_dict`,
:meth:`RegisterConfig.from_dict`): the dataclass fields by name, nested for ``search``, ``robust``, ``metal``,
``refine2d`` (with ``levels`` as a list of objects) and ``refine3d``; fields left out keep
their defaults; every value is checked against its field's type and an unknown field is an
error that names it (:mod:`RadGSRegLib.configio`). Files written before the pose search had
its own settings (``refine2d.search_*``, ``refine2d.candidates``, ``refine2d.coarse_mm``)
are refused with the key's new name.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..configio import ConfigError, build, check, read_json

__all__ = ["Level", "SearchConfig", "RefineConfig", "Refine3DConfig", "RobustConfig", "ROBUST_MODES", "MetalConfig", "METAL_MODES", "RegisterConfig", "INITS", "REFINES", "DEVICES",
           "JACOBIANS",
           "default_model", "config_to_dict", "read_config", "ConfigError"]

#: ``RegisterConfig.init`` values
INITS = ("auto", "none", "search", "learned")
#: ``RegisterConfig.refine`` values
REFINES = ("none", "3d", "2d", "both")
#: ``RobustConfig.mode`` values
ROBUST_MODES = ("auto", "always", "never")
#: ``MetalConfig.mode`` values
METAL_MODES = ("mask", "never")
#: ``RegisterConfig.device`` values
DEVICES = ("cpu", "cuda")
#: ``RefineConfig.jacobian`` values
JACOBIANS = ("analytic", "finite")


def default_model() -> Optional[Path]:
    """The shipped stage-1 weights (resource ``Models/radgsreg_stage1.pt``, see
    :mod:`RadGSRegLib.resources`), if present."""
    from ..resources import find_resource

    return find_resource("Models/radgsreg_stage1.pt")


def check_ray_step(cfg) -> None:
    """``cfg.ray_step_mm`` is None or positive (:class:`~RadGSRegLib.drr.DRR`'s sample
    spacing along a ray)."""
    if cfg.ray_step_mm is not None and not cfg.ray_step_mm > 0:
        raise ConfigError(f"must be a positive spacing (mm) or null (every slice), not {cfg.ray_step_mm}",
                          field="ray_step_mm")


@dataclass
class Level:
    """One resolution level of the 2-D/3-D refinement: detector pixels per side (of the full
    detector), LM iterations, steps (deg, mm: the finite differences of ``jacobian="finite"``;
    either way the LM stops when its step is below 2 % of them), the window margin around
    the vertebra (mm), the high-pass scale (mm at the vertebra; None: no high-pass) and the
    sample spacing along a ray (mm; None: every slice of the CT copy the level renders;
    :class:`~RadGSRegLib.drr.DRR`): the finest level's 2 mm halves a 1 mm CT's samples (its
    high-passed DRR within NCC 0.9998 of every slice's) and leaves a 3 mm CT as it is."""

    pixels: int
    iterations: int
    step_deg: float
    step_mm: float
    margin_mm: float = 20.0
    highpass_mm: Optional[float] = 8.0
    ray_step_mm: Optional[float] = None

    def __post_init__(self):
        check(self)
        check_ray_step(self)


@dataclass
class SearchConfig:
    """Settings of the pose search (:mod:`.search`): rotation hypotheses, each followed by a
    template-matched translation search.

    Attributes:
        rot_deg: angles (deg) tried about each of the three axes (every combination, about
            the vertebra's centre; the starting rotation is tried too when the grid lacks
            it). The default's 4 per axis (64 hypotheses, at most 5° per axis from any pose
            within ±20° per axis) registered 47 of 50 real-CT cases at ±20°/±50 mm
            where (-12, 0, 12) (27, up to 8° off near the corners) registered 45, in about
            the same time: the search's ranking degrades fast with the rotation error (issue
            #18's notes).
        pixels: detector pixels per side the search works at.
        range_mm: translation searched, ± mm at the vertebra, per detector axis.
        prior: penalty on a shift of the whole ``range_mm`` (NCC units, quadratic in the shift):
            breaks near ties between look-alike neighbouring vertebrae in favour of the nearer.
        candidates: best hypotheses kept for the refinement.
        margin_mm: margin of the vertebra's window (mm at the vertebra).
        highpass_mm: high-pass scale (mm at the vertebra) of both images.
        supersample: rays per pixel side of the DRR templates (1: one per pixel; 2, the
            earlier default, gave the same poses for about twice the search's time, issue #21).
        min_overlap: a shift is scored only where at least this fraction of the template's
            pixels meets X-ray pixels with a signal (inside the field, not metal). With
            metal and a round field together more than half of the vertebra's window can be
            left out at the true pose: 0.5 then never scored the truth (real CT, every effect,
            the true metal masked: 4 of the first 10 cases registered, 0.25: 8; clean cases
            unchanged, issue #18's notes).
        verify: the best this many hypotheses are searched a second time (``verify_range_mm``,
            ± mm, no prior) with the template rendered where the first pass put the vertebra:
            a right rotation that started tens of mm off was scored through the wrong
            magnification and parallax and ranked below look-alikes (0: no second pass). A
            hypothesis that scores lower in the second pass keeps its first pose and score.
        distinct_mm: candidates that put the vertebra at least this far from every better one
            already taken are taken first (a look-alike neighbour's rotations no longer fill every slot;
            the real-CT and phantom failures these two and the template fix rescued are in
            issue #18's notes).
        rescue: a result the check finds doubtful is tried again from this many hypotheses at
            levels of the spine the candidates did not try (:func:`.search.search_other_levels`:
            each rotation's best placements along the column, not only its best), each
            refined (2-D/3-D only); the best of them replaces the result when its final NCC
            is higher (0: none of these; ``level_steps`` still runs). Runs with the pose search and the 2-D/3-D refinement
            (``init`` search/learned, ``refine`` 2d/both); otherwise never. The search's
            look-alike neighbours often outscore the true level, whose best placement is
            then no rotation's first: on the all-effects suites it
            ranked 13th-17th; refined, the right level's final NCC was the higher in every
            case measured (issue #18's notes).
        research: a result still doubtful after the rescue is tried again from the pose
            search run anew about each of this many of the first search's candidates (every
            rotation hypothesis about that candidate's pose, :func:`.search.search_pose`):
            the ``candidates`` best of each, refined as the first's (those that cannot win
            stop after the first level); the best replaces the result when its final NCC is
            higher (0: none). A pose turned beyond the grid's reach from the start is in
            reach from a candidate's (a phantom all-effects case: its search's candidates
            72, 36 and 13 mm off; about the second, the truth; issue #18's notes). Same
            conditions as ``rescue``.
        ray_step_mm: the templates' sample spacing along a ray (mm; None: every slice of the
            block-averaged CT; :class:`~RadGSRegLib.drr.DRR`): 4 mm halves the samples of the
            2 mm copy of a 1 mm CT (the high-passed template within NCC 0.999 of every
            slice's) and leaves a 3 mm one as it is (issue #21).
        level_mm: a rescue placement at least this far (mm at the vertebra, along the
            column) from the candidates' and from every other one taken is at another level
            (about half a lumbar vertebra's spacing); each rotation's placements are twice
            this apart (one per level). On the all-effects suites 15 mm and 3 hypotheses
            rescued four of the eight doubtful results (30 mm: three; 2 hypotheses: three;
            issue #18's notes).
        level_steps: the rescue also starts from the doubtful result moved along the spine by
            one to this many whole vertebrae either way: the CT's target put where the result
            put its neighbour (the vector between their centroids in the CT's labels,
            :func:`.search.neighbour_offsets`; only neighbours the label map holds, at a
            plausible spacing), refined like the other-level hypotheses. A result a level off
            has usually aligned the whole column one vertebra over, so the step lands within
            a few mm of the truth, where the search's placements along the column may all miss
            the true level (a phantom all-effects case: placements at -103 to +22 mm along
            the column, none within 9 mm of the truth; issue #18's notes). 0: none.
        level_check: a result the check does not doubt but that explains less than this share
            of what the X-rays' noise allows (``RegisterConfig.min_explained``'s measure) has
            its level checked: the result moved one vertebra either way (as ``level_steps``),
            both refined through every level; their result replaces it only when the check
            does not doubt it and it explains more (not by the raw NCC: the first result
            passed, and windows at two places have different ceilings), with the level
            warning when it moved. A look-alike neighbour can explain 0.94 of it (a phantom
            all-effects case of other poses, 36 mm off; one vertebra over it refined to
            0.56 mm, 1.00), right results on the clean suites 0.97-1.01; 22 of the 350 results
            of the development and held-out suites were below 0.97 (issue #18's tenth-session
            note). Runs with the pose search and the 2-D/3-D refinement, as ``rescue``. 0, or
            a bar at or below ``min_explained``: never.
    """

    rot_deg: tuple = (-15.0, -5.0, 5.0, 15.0)
    pixels: int = 64
    range_mm: float = 60.0
    prior: float = 0.1
    candidates: int = 3
    margin_mm: float = 30.0
    highpass_mm: float = 8.0
    supersample: int = 1
    min_overlap: float = 0.25
    verify: int = 12
    verify_range_mm: float = 15.0
    distinct_mm: float = 10.0
    rescue: int = 3
    level_mm: float = 15.0
    research: int = 3
    ray_step_mm: Optional[float] = 4.0
    level_steps: int = 2
    level_check: float = 0.97

    def __post_init__(self):
        check(self)
        check_ray_step(self)
        if self.rescue < 0:
            raise ConfigError(f"must be 0 (no search of other levels) or more, not {self.rescue}", field="rescue")
        if self.research < 0:
            raise ConfigError(f"must be 0 (no second search) or more, not {self.research}", field="research")
        if not 0 <= self.level_check <= 1.5:
            raise ConfigError(f"must be a share of the noise ceiling in [0, 1.5] (0: never), not {self.level_check}",
                              field="level_check")
        if self.level_steps < 0:
            raise ConfigError(f"must be 0 (no level steps) or more, not {self.level_steps}", field="level_steps")
        if self.level_mm <= 0:
            raise ConfigError(f"must be positive, not {self.level_mm}", field="level_mm")
        if self.verify < 0:
            raise ConfigError(f"must be 0 (no second pass) or more, not {self.verify}", field="verify")
        if self.verify_range_mm <= 0:
            raise ConfigError(f"must be positive, not {self.verify_range_mm}", field="verify_range_mm")
        if self.distinct_mm < 0:
            raise ConfigError(f"must be 0 (rank by score alone) or more, not {self.distinct_mm}", field="distinct_mm")
        if not 0 < self.min_overlap <= 1:
            raise ConfigError(f"must be a fraction in (0, 1], not {self.min_overlap}", field="min_overlap")


@dataclass
class RefineConfig:
    """Settings of the 2-D/3-D Levenberg-Marquardt refinement (:mod:`.refine2d`): its
    resolution levels, its trust region (``max_step_deg`` / ``max_step_mm`` per iteration),
    the levels rendered from the block-averaged CT (detector sizes up to
    ``coarse_below_pixels``), the rays per pixel side at 64 px and below (``supersample``:
    the refinement's only; the search has its own, :attr:`SearchConfig.supersample`), how
    many candidates go on past the first level (``keep``: the best by their NCC there; a
    candidate the first level brought within ``same_mm`` (mean distance over the vertebra's
    points) of a better one does not: the same start twice; nor, after any level but the
    last, one whose NCC there is more than ``keep_within`` below the best's: on the
    development suites a wrong level's NCC was 0.01-0.35 below the true one's after the first
    level and up to 0.25 after the second, and the true level's was never more than 0.01 below
    the best, issue #21) and
    the restarts of a doubtful result (``restart_deg``: the result turned by this many
    degrees either way about each axis, six starts, each refined through every level; the
    best replaces it when its final NCC is higher; 0: none). A result that stops 2-5 mm off
    in a local optimum is usually left by one of them: phantom all-effects 2.31 → 0.49 mm,
    real-CT all-effects 1.99 → 0.54 mm, a round-field case 4.97 → 0.74 mm, the best final NCC
    each time the best pose (issue #18's notes). ``jacobian``: how each LM iteration gets its
    derivatives: ``"analytic"`` (default) from the projector's own derivative of each DRR
    (one pass per view; a projector without that pass, e.g. the torch backend on a GPU, gives
    it by finite differences of 0.05°/mm, seven DRRs), ``"finite"`` from forward finite
    differences of each level's ``step_deg`` / ``step_mm`` (six more DRRs per view: the plain
    reference, issue #21). ``min_pixel_voxels``: a level whose pixels, at the vertebra, are
    smaller than this share of the CT's smallest voxel spacing has its pixels per side halved
    until they are not, but never below the previous level's (:func:`.pipeline.fitted_levels`;
    ``info["refine2d_pixels"]`` then says how many): finer pixels show no more of the CT. A 3 mm CT's finest level then
    works at 128 px, not 256 (about a quarter of its time; mTRE 0.079 → 0.086 mm on 12
    real-CT cases, issue #21); a 1 mm CT keeps 256; 0: never."""

    levels: list[Level] = field(default_factory=lambda: [Level(64, 15, 1.0, 1.0, 30.0, None),
                                                         Level(128, 10, 0.5, 0.5, 20.0, 20.0),
                                                         Level(256, 6, 0.25, 0.25, 15.0, 8.0, 2.0)])
    max_step_deg: float = 4.0
    max_step_mm: float = 8.0
    coarse_below_pixels: int = 128
    supersample: int = 1
    keep: int = 3
    restart_deg: float = 5.0
    same_mm: float = 3.0
    keep_within: float = 0.05
    jacobian: str = "analytic"
    min_pixel_voxels: float = 0.4

    def __post_init__(self):
        check(self)
        if self.jacobian not in JACOBIANS:
            raise ConfigError(f"must be one of {JACOBIANS}, not {self.jacobian!r}", field="jacobian")
        if self.restart_deg < 0:
            raise ConfigError(f"must be 0 (no restarts) or more, not {self.restart_deg}", field="restart_deg")
        if not self.levels:
            raise ConfigError("must hold at least one level", field="levels")
        if not self.keep_within >= 0:
            raise ConfigError(f"must be 0 or more, not {self.keep_within}", field="keep_within")
        if self.same_mm < 0:
            raise ConfigError(f"must be 0 (never the same) or more, not {self.same_mm}", field="same_mm")
        if self.keep < 1:
            raise ConfigError(f"must be at least 1, not {self.keep}", field="keep")
        if not 0 <= self.min_pixel_voxels < 8:
            raise ConfigError(f"must be a share of a voxel in [0, 8), not {self.min_pixel_voxels}",
                              field="min_pixel_voxels")


@dataclass
class Refine3DConfig:
    """Settings of :func:`.refine3d.refine_3d`: Adam iterations per level, blur (voxels) per
    level, step sizes (rad, mm per unit of the optimised variables), learning rate; and,
    when no network made the reconstruction: the side of the cube the Gaussian fit
    reconstructs on (``region_mm``, 1.5 mm voxels, around the best candidate's vertebra) and
    the voxel size of the CT vertebra region built for it (``region_voxel_mm``; a cube
    :data:`RadGSRegLib.region.CROP_FACTOR` times larger)."""

    iterations: tuple = (40, 40)
    blur_voxels: tuple = (1.5, 0.0)
    rot_unit: float = 0.05
    trans_unit: float = 2.0
    lr: float = 0.1
    region_mm: float = 96.0
    region_voxel_mm: float = 3.0

    def __post_init__(self):
        check(self)
        for name in ("region_mm", "region_voxel_mm"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"must be positive, not {getattr(self, name)}", field=name)


@dataclass
class RobustConfig:
    """The similarity for X-rays that hold what the CT cannot explain (metal instruments and
    implants, absent from the preoperative CT): *tiled* NCC (:mod:`RadGSRegLib.similarity`).

    The vertebra's window is cut into tiles of about ``tile_mm`` (mm at the vertebra); each
    tile's NCC counts on its own, weighted by the DRR's contrast there, and tiles whose
    X-ray contrast exceeds ``reject_contrast`` times the X-ray's ordinary contrast relative
    to the DRR (:func:`~RadGSRegLib.similarity.contrast_outliers`) are left out.

    Attributes:
        mode: "auto" (a result the check finds doubtful is registered a second time with
            the tiled similarity, which replaces the first when its final pose scores higher
            on it and shows metal: ``min_outliers``; a result the plain similarity accepts is
            left as it is), "always" (tiled from the start) or "never" (plain windowed NCC
            only).
        tile_mm: tile side, mm at the vertebra.
        reject_contrast: the outlier factor (0: keep every tile).
        min_outliers: "auto" keeps the tiled attempt only when, at its final pose, at least
            this fraction of each view's tiles (the refinement's middle level) are outliers:
            metal shows in both views (0.2-0.5 of the tiles on the development suites at the
            true pose), a clean X-ray has next to none, so a doubtful clean case keeps its
            first result.
    """

    mode: str = "auto"
    tile_mm: float = 24.0
    reject_contrast: float = 2.5
    min_outliers: float = 0.15

    def __post_init__(self):
        check(self)
        if self.mode not in ROBUST_MODES:
            raise ConfigError(f"must be one of {', '.join(ROBUST_MODES)}, not {self.mode!r}", field="mode")
        if self.tile_mm <= 0:
            raise ConfigError(f"must be positive, not {self.tile_mm}", field="tile_mm")
        if not 0 <= self.min_outliers <= 1:
            raise ConfigError(f"must be a fraction in [0, 1], not {self.min_outliers}", field="min_outliers")
        if self.reject_contrast < 0 or (0 < self.reject_contrast <= 1):
            raise ConfigError(f"must be 0 (keep every tile) or above 1, not {self.reject_contrast}",
                              field="reject_contrast")


@dataclass
class MetalConfig:
    """Metal in the X-rays that the CT does not have (screws, K-wires, retractor blades),
    found before registering by a small segmentation network
    (:mod:`RadGSRegLib.learned.metal`) and left out of every comparison of the X-rays with
    the CT's DRRs (search, refinement, check) and of the RadGS-Reg network's inputs
    (:meth:`~RadGSRegLib.register.target.Target.exclude`); the per-case Gaussian-fit
    reconstruction still sees the whole X-rays.

    Attributes:
        mode: "mask" (find and leave out) or "never" (compare every pixel).
        model: the network's weight file; "default": the shipped one
            (``Resources/Models/metal_seg.pt``, model card beside it).
        threshold: the network's probability above which a pixel is metal.
        dilate_mm: the marked pixels grown by this much (detector mm): the metal's blurred
            rim goes too.
    """

    mode: str = "mask"
    model: str = "default"
    threshold: float = 0.5
    dilate_mm: float = 1.5

    def __post_init__(self):
        check(self)
        if self.mode not in METAL_MODES:
            raise ConfigError(f"must be one of {', '.join(METAL_MODES)}, not {self.mode!r}", field="mode")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"must be a probability in (0, 1), not {self.threshold}", field="threshold")
        if not 0 <= self.dilate_mm <= 20:
            raise ConfigError(f"must be in [0, 20] mm, not {self.dilate_mm}", field="dilate_mm")
        if not str(self.model).strip():
            raise ConfigError("must name a weight file or be 'default'", field="model")

    def model_path(self) -> Path:
        """The weight file ``model`` names ("default": the shipped one)."""
        if self.model == "default":
            from ..resources import resource_path

            return resource_path("Models/metal_seg.pt", hint="Give a weight file (radgsreg train-metal) or "
                                                              "register with --metal never")
        return Path(self.model)


@dataclass
class RegisterConfig:
    """Settings of :func:`RadGSRegLib.register.run`.

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
        coarse_mm: voxel size of the block-averaged copy of the slab that the search and the
            coarse refinement levels render (faster, and smoother to match).
        search: the pose search's settings. refine2d / refine3d: the refinements' settings.
        robust: when and how the 2-D stages switch to the tiled, outlier-rejecting
            similarity (:class:`RobustConfig`; metal in the X-rays).
        metal: finding the metal in the X-rays and leaving it out (:class:`MetalConfig`).
        min_ncc: a result whose final windowed NCC (mean of both views) is below this is
            flagged as doubtful in ``Result.info["warnings"]``.
        min_explained: so is a result whose final NCC is below this share of what the
            X-rays' own noise allows (mean over the views of NCC / the window's noise
            ceiling, :func:`~RadGSRegLib.similarity.noise_ceiling`): on the development suites
            right poses scored 0.90-1.01 of it (one at 1.99 mm: 0.81), a neighbouring vertebra
            or a wrong rotation 0.51-0.86, at full dose and at a tenth (issue #18's notes), where a fixed NCC cannot tell a noisy
            right result from a clean wrong one. 0.87 until a phantom case in a round field (its
            vertebra half outside the field) ended three vertebrae off at 0.889 while the 269
            successes of the 270 development cases scored 0.897-1.01; at 0.90 that case is
            rescued, and so is the success at 0.897 (1.1 → 0.34 mm, the restarts); every final
            result of the 270 then scores 0.907 or more, and of 80 cases of other poses and
            phantoms (seed 22) the successes 0.913 or more, the one failure 0.59 (issue #18's
            tenth-session note).
        reject_drop: a 2-D/3-D result whose windowed NCC is more than this below its
            starting pose's is rejected (diverged) and the starting pose kept.
        reconstruct: also return a reconstruction of the vertebra region (``Result.recon``,
            C-arm frame): the network's when there is one, else radiative Gaussians fitted
            for ``recon_iterations`` steps.
        drrs: also return the DRRs of the CT at the final pose (``Result.drrs``, line
            integrals on each X-ray's pixel grid), for an X-ray/DRR overlay.
    """

    init: str = "auto"
    refine: str = "2d"
    model: Optional[str] = None
    device: str = "cpu"
    slab_mm: float = 150.0
    coarse_mm: float = 2.0
    search: SearchConfig = field(default_factory=SearchConfig)
    refine2d: RefineConfig = field(default_factory=RefineConfig)
    refine3d: Refine3DConfig = field(default_factory=Refine3DConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)
    metal: MetalConfig = field(default_factory=MetalConfig)
    min_ncc: float = 0.6
    min_explained: float = 0.90
    reject_drop: float = 0.02
    reconstruct: bool = False
    recon_iterations: int = 300
    drrs: bool = False

    def __post_init__(self):
        check(self)
        if self.init not in INITS:
            raise ConfigError(f"must be one of {', '.join(INITS)}, not {self.init!r}", field="init")
        if self.refine not in REFINES:
            raise ConfigError(f"must be one of {', '.join(REFINES)}, not {self.refine!r}", field="refine")
        if self.device not in DEVICES and not re.fullmatch(r"cuda:\d+", str(self.device)):
            raise ConfigError(f"must be one of {', '.join(DEVICES)} (or cuda:N), not {self.device!r}", field="device")
        if not 0 <= self.min_explained <= 1:
            raise ConfigError(f"must be a share in [0, 1], not {self.min_explained}", field="min_explained")
        if self.init == "learned" and not self.model:
            raise ConfigError("'learned' needs model weights: a .pt file, or 'default' for the shipped ones "
                              "(CLI: --model default)", field="init")

    @property
    def init_mode(self) -> str:
        """The initial pose actually used: ``init`` with "auto" resolved."""
        return ("learned" if self.model else "search") if self.init == "auto" else self.init

    def model_path(self) -> Path:
        """The weight file ``model`` names ("default": the shipped one)."""
        if self.model == "default":
            from ..resources import resource_path

            return resource_path("Models/radgsreg_stage1.pt",
                                 hint="Give a weight file or train one (radgsreg train)")
        return Path(self.model)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "the registration config") -> "RegisterConfig":
        """A config from its JSON form (see the module docstring); missing fields keep their
        defaults. Raises :class:`ConfigError` naming ``source`` and the field."""
        old = data.get("refine2d") if isinstance(data, dict) else None
        for key in (old if isinstance(old, dict) else ()):
            new = _MOVED.get(key)
            if new:
                raise ConfigError(f"moved: the pose search has its own settings now; write {new} instead",
                                  field=f"refine2d.{key}", source=source)
        return build(cls, data, source=source)


#: keys of ``refine2d`` that moved (the pose search got its own settings) -> where they are
_MOVED = {**{f"search_{k}": f"search.{k}" for k in ("pixels", "range_mm", "rot_deg", "prior", "margin_mm",
                                                    "highpass_mm")},
          "candidates": "search.candidates", "coarse_mm": "coarse_mm (top level)"}


def config_to_dict(cfg: RegisterConfig) -> dict:
    """The JSON form of ``cfg`` (every field; tuples as lists, paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def read_config(path) -> RegisterConfig:
    """A :class:`RegisterConfig` from a JSON file (errors name the file and the field)."""
    return RegisterConfig.from_dict(read_json(path), source=str(path))
