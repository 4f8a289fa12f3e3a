"""The registration-case generator (``radgsreg simulate-cases``).

For each case: pick a vertebra level, place the CT at the *nominal* pose (the vertebra's
centroid at the C-arm isocentre, the CT's LPS axes along the C-arm axes), sample the
*ground-truth* pose as a random rigid offset of it (rotation about the isocentre, uniform
Euler angles in ±rot_deg and translations in ±trans_mm per axis), and render AP + lateral
X-rays of the whole CT at the true pose with the realistic simulation. The nominal pose is
written as ``initial_guess``; registration must recover ``ground_truth``.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .geometry import biplanar_views, compose, geodesic_deg, mtre, sample_offsets, translation
from .io import Case, write_case
from .io.atomic import atomic_dir
from .io.outputs import check_output
from .levels import level_id
from .metrics import target_points
from .simulate import XraySimConfig, simulate_xrays
from .volume import Volume

__all__ = ["CaseGenConfig", "nominal_pose", "make_case", "generate_cases"]


@dataclass
class CaseGenConfig:
    """Parameters of generated cases.

    Attributes:
        rot_deg / trans_mm: offset ranges (± per axis) of the true pose from the nominal.
        pixels / detector_mm / sdd / sid: the biplanar C-arm (see ``biplanar_views``).
        sim: the X-ray formation model.
        seed: base seed; case i uses ``(seed, i)``.
    """

    rot_deg: float = 20.0
    trans_mm: float = 50.0
    pixels: int = 976
    detector_mm: float = 292.8
    sdd: float = 1124.0
    sid: float = 700.0
    sim: XraySimConfig = field(default_factory=XraySimConfig)
    seed: int = 0

    def views(self):
        return biplanar_views(sdd=self.sdd, sid=self.sid, pixels=self.pixels, detector_mm=self.detector_mm)

    def to_dict(self) -> dict:
        return asdict(self)


def nominal_pose(seg: Volume, label: int, isocentre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """(4, 4) ``T_ct_to_carm`` putting the label's centroid at the isocentre, axes aligned."""
    return translation(np.asarray(isocentre, dtype=np.float64) - seg.label_centroid(label))


def make_case(ct: Volume, seg: Volume, level: str, config: CaseGenConfig, rng: np.random.Generator,
              *, label: int | None = None, source: str = "") -> Case:
    """One case (in memory) for ``level`` (label id from TotalSegmentator unless given)."""
    label = level_id(level) if label is None else int(label)
    if not np.any(seg.array == label):
        raise ValueError(f"level {level} (label {label}) is not in the segmentation")
    views = config.views()
    T0 = nominal_pose(seg, label)
    D = sample_offsets(1, rng, rot_deg=config.rot_deg, trans_mm=config.trans_mm)[0]
    G = compose(D, T0)
    xr = simulate_xrays(ct, list(views.values()), G, config.sim, rng)
    extra = {"generator": {"source": source, "level": level, "config": config.to_dict(),
                           "offset_rot_deg": geodesic_deg(D, np.eye(4)),
                           "offset_trans_mm": float(np.linalg.norm(D[:3, 3]))}}
    return Case(ct=ct, seg=seg, vertebra_label=label, vertebra_name=level, views=views, xrays=xr,
                image_kind=config.sim.output, initial_guess=T0, ground_truth=G, extra=extra)


def generate_cases(sources: Callable[[int], tuple[Volume, Volume, str]], levels: list[str], n: int,
                   out: Path, config: CaseGenConfig, *, labels: dict[str, int] | None = None,
                   overwrite: bool = False, progress: Iterable | None = None, inputs: Iterable = ()) -> list[dict]:
    """Write the suite folder ``out``: ``n`` cases ``out/case_000`` ... and ``out/summary.json``
    (one row per case, also returned).

    The suite is written whole and atomically (a hidden temp folder beside ``out``, renamed
    into place when every case and the summary are written; marker kind "suite"): an
    interrupted run leaves ``out`` as it was. ``out`` is checked first
    (:func:`~RadGSRegLib.io.outputs.check_output`): an existing folder is replaced only with
    ``overwrite`` and only when it is a suite RadGSReg wrote; ``inputs`` (e.g. the CT and
    label files) must not be, hold or contain it.

    Args:
        sources: ``i -> (ct, seg, source_name)``; called once per case (a fixed CT, or a new
            phantom per case).
        levels: cycled over the cases.
        labels: label value of each level (default: TotalSegmentator ids).
        progress: optional wrapper for the case index iterator (e.g. ``tqdm``).
    """
    out = Path(out)
    check_output(out, "suite", overwrite=overwrite, inputs=inputs)
    names = [f"case_{i:03d}" for i in range(n)]
    rows = []
    with atomic_dir(out, overwrite, kind="suite", inputs=inputs) as tmp:
        it = range(n) if progress is None else progress(range(n))
        for i in it:
            t = time.perf_counter()
            ct, seg, src = sources(i)
            level = levels[i % len(levels)]
            rng = np.random.default_rng([config.seed, i])
            case = make_case(ct, seg, level, config, rng, source=src, label=(labels or {}).get(level))
            write_case(case, tmp / names[i])
            pts = target_points(seg, case.vertebra_label, max_points=2000)
            rows.append({"case": names[i], "level": level, "label": case.vertebra_label,
                         "rot_offset_deg": case.extra["generator"]["offset_rot_deg"],
                         "trans_offset_mm": case.extra["generator"]["offset_trans_mm"],
                         "initial_mtre_mm": mtre(case.initial_guess, case.ground_truth, pts),
                         "seconds": time.perf_counter() - t})
        (tmp / "summary.json").write_text(json.dumps(rows, indent=2))
    return rows
