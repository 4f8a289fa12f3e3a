"""Settings of one registration: the one source of defaults for the CLI, the Python API and
the Slicer module (whose panel starts from these values and hands them to the child
process as a JSON file).

Torch-free on purpose: Slicer imports this when the module loads, before any heavy
dependency is installed.

JSON form (``radgsreg register --config FILE``, :func:`config_to_dict`,
:meth:`RegisterConfig.from_dict`): the dataclass fields by name, nested for ``refine2d``
(with ``levels`` as a list of objects) and ``refine3d``; fields left out keep their
defaults; every value is checked against its field's type and an unknown field is an
error that names it (:mod:`RadGSRegLib.configio`).
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..configio import ConfigError, build, check, read_json

__all__ = ["Level", "RefineConfig", "Refine3DConfig", "RegisterConfig", "INITS", "REFINES", "DEVICES",
           "default_model", "config_to_dict", "read_config", "ConfigError"]

#: ``RegisterConfig.init`` values
INITS = ("auto", "none", "search", "learned")
#: ``RegisterConfig.refine`` values
REFINES = ("none", "3d", "2d", "both")
#: ``RegisterConfig.device`` values
DEVICES = ("cpu", "cuda")


def default_model() -> Optional[Path]:
    """The shipped stage-1 weights (``Resources/Models/radgsreg_stage1.pt``), if present."""
    p = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "radgsreg_stage1.pt"
    return p if p.is_file() else None


@dataclass
class Level:
    """One resolution level of the 2-D/3-D refinement: detector pixels per side (of the full
    detector), LM iterations, finite-difference steps (deg, mm), the window margin around
    the vertebra (mm) and the high-pass scale (mm at the vertebra; None: no high-pass)."""

    pixels: int
    iterations: int
    step_deg: float
    step_mm: float
    margin_mm: float = 20.0
    highpass_mm: Optional[float] = 8.0

    def __post_init__(self):
        check(self)


@dataclass
class RefineConfig:
    """Settings of the pose search and the 2-D/3-D refinement (:mod:`.refine2d`)."""

    search_pixels: int = 64
    search_range_mm: float = 60.0
    search_rot_deg: tuple = (-12.0, 0.0, 12.0)
    search_prior: float = 0.1
    candidates: int = 3
    coarse_mm: float = 2.0
    coarse_below_pixels: int = 128
    search_margin_mm: float = 30.0
    search_highpass_mm: float = 8.0
    max_step_deg: float = 4.0
    max_step_mm: float = 8.0
    levels: list[Level] = field(default_factory=lambda: [Level(64, 15, 1.0, 1.0, 30.0, None),
                                                         Level(128, 10, 0.5, 0.5, 20.0, 20.0),
                                                         Level(256, 6, 0.25, 0.25, 15.0, 8.0)])
    supersample: int = 2

    def __post_init__(self):
        check(self)
        if not self.levels:
            raise ConfigError("must hold at least one level", field="levels")


@dataclass
class Refine3DConfig:
    """Settings of :func:`.refine3d.refine_3d`: Adam iterations per level, blur (voxels) per
    level, step sizes (rad, mm per unit of the optimised variables), learning rate."""

    iterations: tuple = (40, 40)
    blur_voxels: tuple = (1.5, 0.0)
    rot_unit: float = 0.05
    trans_unit: float = 2.0
    lr: float = 0.1

    def __post_init__(self):
        check(self)


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
        refine2d / refine3d: the refinements' settings.
        min_ncc: a result whose final windowed NCC (mean of both views) is below this is
            flagged as doubtful in ``Result.info["warnings"]``.
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
    refine2d: RefineConfig = field(default_factory=RefineConfig)
    refine3d: Refine3DConfig = field(default_factory=Refine3DConfig)
    min_ncc: float = 0.75
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
            p = default_model()
            if p is None:
                raise FileNotFoundError("the shipped weights Resources/Models/radgsreg_stage1.pt are missing; "
                                        "give a weight file or train one (radgsreg train)")
            return p
        return Path(self.model)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "the registration config") -> "RegisterConfig":
        """A config from its JSON form (see the module docstring); missing fields keep their
        defaults. Raises :class:`ConfigError` naming ``source`` and the field."""
        return build(cls, data, source=source)


def config_to_dict(cfg: RegisterConfig) -> dict:
    """The JSON form of ``cfg`` (every field; tuples as lists, paths as strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def read_config(path) -> RegisterConfig:
    """A :class:`RegisterConfig` from a JSON file (errors name the file and the field)."""
    return RegisterConfig.from_dict(read_json(path), source=str(path))
