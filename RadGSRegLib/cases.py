"""The registration-case generator (``radgsreg simulate-cases``).

For each case: pick a vertebra level, place the CT at the *nominal* pose (the vertebra's
centroid at the C-arm isocentre, the CT's LPS axes along the C-arm axes), sample the
*ground-truth* pose as a random rigid offset of it (rotation about the isocentre, uniform
Euler angles in ±rot_deg and translations in ±trans_mm per axis), and render AP + lateral
X-rays of the whole CT at the true pose with the realistic simulation. The nominal pose is
written as ``initial_guess``; registration must recover ``ground_truth``.

The CTs cases are made of: a CT file with its vertebra labels (:func:`load_labelled_ct`), or
the bundled lumbar CT / a phantom (:func:`load_sample`, :func:`sample_case`: what ``radgsreg
demo`` and ``radgsreg sample-case`` make).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .articulation import ArticulationConfig, articulate, spine_order
from .geometry import biplanar_views, compose, geodesic_deg, sample_offsets, translation
from .io import Case, write_case
from .io.atomic import atomic_dir
from .instruments import InstrumentsConfig, place_instruments
from .io.outputs import check_output
from .levels import LevelError, level_id, level_name
from .metrics import truth_errors
from .simulate import XraySimConfig, simulate_xrays
from .volume import Volume

__all__ = ["CaseGenConfig", "nominal_pose", "make_case", "generate_cases", "LabelledCT", "load_labelled_ct",
           "sample_level", "load_sample", "sample_case", "SAMPLE_SOURCE", "random_case_config"]

#: provenance of the cases made from the bundled lumbar CT (case.json ``generator.source``)
SAMPLE_SOURCE = "RadGSReg lumbar sample CT (TotalSegmentator 2.18.0 test data)"


@dataclass
class CaseGenConfig:
    """Parameters of generated cases.

    Attributes:
        rot_deg / trans_mm: offset ranges (± per axis) of the true pose from the nominal.
        pixels / detector_mm / sdd / sid: the biplanar C-arm (see ``biplanar_views``).
        sim: the X-ray formation model.
        articulation: how much each intervertebral joint moves between the CT and the
            X-rays (:mod:`RadGSRegLib.articulation`; default none); the target vertebra is
            exactly at the true pose, its neighbours are not.
        instruments: metal in the X-rays that the CT does not have (screws, K-wires,
            retractor blades; :mod:`RadGSRegLib.instruments`; default none).
        beyond_ct_mm: the patient continues this far (mm) beyond each cranio-caudal end of
            the CT in the X-rays (:func:`~RadGSRegLib.simulate.beyond_ct`: anatomy the scan
            did not cover, as on a real patient; default 150 mm, more than a C-arm's field
            reaches past a vertebra); 0: the body ends with the scan, air beyond it, as in a
            DRR of the CT alone.
        seed: base seed; case i uses ``(seed, i)``.
    """

    rot_deg: float = 20.0
    trans_mm: float = 50.0
    pixels: int = 976
    detector_mm: float = 292.8
    sdd: float = 1124.0
    sid: float = 700.0
    sim: XraySimConfig = field(default_factory=XraySimConfig)
    articulation: ArticulationConfig = field(default_factory=ArticulationConfig)
    instruments: InstrumentsConfig = field(default_factory=InstrumentsConfig)
    beyond_ct_mm: float = 150.0
    seed: int = 0

    def views(self):
        return biplanar_views(sdd=self.sdd, sid=self.sid, pixels=self.pixels, detector_mm=self.detector_mm)

    def to_dict(self) -> dict:
        return asdict(self)


def random_case_config(rng: np.random.Generator, *, pixels: int = 256, detector_mm: float = 292.8,
                       metal_share: float = 0.8, rot_deg: float = 20.0, trans_mm: float = 50.0,
                       seed: int = 0) -> CaseGenConfig:
    """A :class:`CaseGenConfig` with every realism effect drawn, as training data needs it
    (the metal network's and RadGS-Reg's): instruments (in ``metal_share`` of the cases:
    screws in the neighbours and/or the target, K-wires, retractor blades, at least one),
    articulation (half: up to 3° / 1.5 mm per joint), a round field of 180-300 mm (a
    third), dose 150-6000 photons/mm² (log-uniform), scatter-to-primary 0.1-0.5, the body
    0-200 mm beyond the scan; the pose ranges ``rot_deg`` / ``trans_mm`` (± per axis) and a
    ``pixels``² detector of ``detector_mm`` (mm) on the standard C-arm."""
    if rng.random() < metal_share:
        while True:
            tools = InstrumentsConfig(screws=str(rng.choice(["none", "neighbours", "target", "both"])),
                                      kwires=int(rng.integers(0, 3)), retractors=int(rng.integers(0, 3)))
            if tools.enabled:
                break
    else:
        tools = InstrumentsConfig()
    art = ArticulationConfig(float(rng.uniform(0, 3)), float(rng.uniform(0, 1.5))) if rng.random() < 0.5 \
        else ArticulationConfig()
    sim = XraySimConfig(photons_per_mm2=float(np.exp(rng.uniform(np.log(150), np.log(6000)))),
                        scatter_to_primary=float(rng.uniform(0.1, 0.5)),
                        field_diameter_mm=float(rng.uniform(180, 300)) if rng.random() < 1 / 3 else None)
    return CaseGenConfig(rot_deg=rot_deg, trans_mm=trans_mm, pixels=pixels, detector_mm=detector_mm, sim=sim,
                         articulation=art, instruments=tools, beyond_ct_mm=float(rng.uniform(0, 200)), seed=seed)


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
    art = articulate(ct, seg, label, config.articulation, rng) if config.articulation.enabled else None
    tools = []
    if config.instruments.enabled:
        order = art.labels if art is not None else spine_order(seg)
        k = order.index(label)
        tools = place_instruments(seg, label, config.instruments, rng, neighbours=order[max(k - 1, 0):k] + order[k + 1:k + 2])
    xr = simulate_xrays(ct, list(views.values()), G, config.sim, rng, articulation=art, instruments=tools,
                        beyond_ct_mm=config.beyond_ct_mm)
    extra = {"generator": {"source": source, "level": level, "config": config.to_dict(),
                           "offset_rot_deg": geodesic_deg(D, np.eye(4)),
                           "offset_trans_mm": float(np.linalg.norm(D[:3, 3]))}}
    if art is not None:                   # the neighbours' true poses: G @ motion (CT frame motion)
        extra["generator"]["articulation"] = art.to_dict()
    if tools:                             # CT frame of the vertebra each is attached to
        extra["generator"]["instruments"] = [asdict(t) for t in tools]
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
            rows.append({"case": names[i], "level": level, "label": case.vertebra_label,
                         "rot_offset_deg": case.extra["generator"]["offset_rot_deg"],
                         "trans_offset_mm": case.extra["generator"]["offset_trans_mm"],
                         "initial_mtre_mm": truth_errors(case, case.initial_guess)["mtre_mm"],
                         "seconds": time.perf_counter() - t})
        (tmp / "summary.json").write_text(json.dumps(rows, indent=2))
    return rows


# ------------------------------------------------------------------ the CTs cases are made of
@dataclass
class LabelledCT:
    """A CT with its vertebra labels, the levels asked for resolved: what :func:`make_case`
    makes cases of.

    Attributes:
        ct: CT in HU (CT frame). seg: label map on the CT's grid.
        labels: {level as asked (normalised, e.g. "L3", or digits "29"): its label value}.
        source: provenance for case.json (``generator.source``).
        warnings: what the CT's plausibility check found unusual, each "FILE: what".
    """

    ct: Volume
    seg: Volume
    labels: dict
    source: str
    warnings: list = field(default_factory=list)


def load_labelled_ct(ct_path, seg_path, levels, *, fields=("ct", "segmentation"),
                     source: str | None = None) -> LabelledCT:
    """Read a CT (a file or DICOM folder, in HU) and its vertebra label map (a label map or a
    Slicer ``.seg.nrrd``) and resolve each level to its label value
    (:func:`~RadGSRegLib.levels.resolve_level`: segment names, TotalSegmentator ids, or label
    values given as digits).

    Refuses, naming the file and ``fields`` (the CT's, the labels'; the command line gives its
    options, ``("--ct", "--seg")``): an unreadable file, a CT that is not plausibly in HU
    (:func:`~RadGSRegLib.checks.check_ct`; :class:`~RadGSRegLib.io.CaseFormatError`), a label
    map off the CT's grid, a level absent from it or cut by the scan's edge
    (:class:`~RadGSRegLib.levels.LevelError`). ``source``: the provenance (default the CT's
    path)."""
    from .checks import PlausibilityError, check_ct
    from .io import CaseFormatError, read_segmentation, read_volume
    from .levels import resolve_level

    ct_field, seg_field = fields
    ct = read_volume(ct_path, field=ct_field)
    try:
        warnings = [f"{ct_path}: {w}" for w in check_ct(ct)]
    except PlausibilityError as e:
        raise CaseFormatError(ct_path, ct_field, e.detail) from None
    seg = read_segmentation(seg_path, field=seg_field)
    if not seg.labelmap.same_grid(ct):
        raise CaseFormatError(seg_path, seg_field, f"not on the CT grid (labels {seg.labelmap.size} voxels, CT "
                              f"{ct.size}, origin/spacing/direction must match); resample the label map onto the "
                              "CT first")
    labels = {lv: resolve_level(lv, seg.labelmap, seg.names, source=str(seg_path), positional=seg.positional)
              for lv in levels}
    return LabelledCT(ct, seg.labelmap, labels, str(ct_path) if source is None else source, warnings)


def sample_level(level, *, phantom: bool = False) -> str:
    """A level of :func:`load_sample`'s sources as they key it: a name normalised ("l3" ->
    "L3"), or a label value's digits ("29"; the lumbar CT only). Raises
    :class:`~RadGSRegLib.levels.LevelError` for an unknown name and, with ``phantom``, for a
    level the phantom does not span ("C3: the phantom spans L1, ..."); whether the lumbar CT
    has a level is known once it is loaded."""
    text = str(level).strip()
    if not text.isdigit():
        try:
            text = level_name(level_id(text))
        except ValueError as e:
            raise LevelError(str(e)) from None
    if phantom:
        from .phantom import PhantomConfig

        spans = PhantomConfig().levels
        if text not in spans:
            raise LevelError(f"{text}: the phantom spans {', '.join(spans)}")
    return text


def load_sample(level: str = "L3", *, phantom: bool = False, seed: int = 0) -> LabelledCT:
    """The CT a demo or sample case is made of, with ``level`` resolved in it: the bundled
    lumbar CT (:func:`RadGSRegLib.sample_data.lumbar_ct`: L1-L5 and S1 complete; ``level`` a
    name or a label value) or, with ``phantom``, the procedural spine of ``seed`` (L1-L5,
    1 mm; a name). Raises :class:`~RadGSRegLib.levels.LevelError` for a level the source does
    not have whole."""
    level = sample_level(level, phantom=phantom)
    if phantom:
        from .phantom import PhantomConfig, make_phantom

        ct, seg = make_phantom(PhantomConfig(seed=seed))
        return LabelledCT(ct, seg, {level: level_id(level)}, f"phantom seed {seed}")
    from .sample_data import lumbar_ct

    sd = lumbar_ct()
    return load_labelled_ct(sd.ct, sd.seg, [level], fields=(None, None), source=SAMPLE_SOURCE)


def sample_case(level: str = "L3", config: CaseGenConfig | None = None, *, phantom: bool = False,
                sample: LabelledCT | None = None) -> Case:
    """A case of one vertebra of the bundled lumbar CT, or with ``phantom`` of the phantom
    seeded ``config.seed`` (:func:`load_sample`): what ``radgsreg sample-case`` writes and
    ``radgsreg demo`` registers. :func:`make_case` with the true pose drawn by
    ``numpy.random.default_rng(config.seed)``: the same level, config and seed give the same
    case.

    Args:
        level: "L3" (a name) or, for the lumbar CT, a label value ("29").
        config: the C-arm, the pose offsets, the X-ray simulation and the seed (default
            :class:`CaseGenConfig`).
        sample: what :func:`load_sample` returned for this level and seed, when the caller
            loaded it first (e.g. to report progress in between).

    Returns:
        the :class:`~RadGSRegLib.io.Case` in memory, with its ground truth; ``warnings``: what
        the CT's plausibility check found unusual.
    """
    config = config or CaseGenConfig()
    level = sample_level(level)
    if sample is None:
        sample = load_sample(level, phantom=phantom, seed=config.seed)
    case = make_case(sample.ct, sample.seg, level, config, np.random.default_rng(config.seed),
                     label=sample.labels[level], source=sample.source)
    case.warnings = list(sample.warnings)
    return case
