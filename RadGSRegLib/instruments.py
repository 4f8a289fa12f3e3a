"""Metal that is in the operating room but not in the CT (simulation): pedicle screws,
K-wires, retractor blades.

Each instrument is an exact solid in the CT frame of the vertebra it is attached to (a
finite cylinder for screws and wires, a box for blades) and moves with that vertebra (its
pose is ``T_ct_to_carm @ motion`` when the spine bends, :mod:`RadGSRegLib.articulation`).
Its projection is analytic: the length (mm) of each detector ray inside the solid
(:meth:`Rod.path_lengths`, :meth:`Blade.path_lengths`), times the metal's attenuation at the
effective energy (60 keV) gives its line integral; the X-ray formation hardens it with the
metal's own energy dependence (:data:`MATERIALS`, :func:`RadGSRegLib.simulate.formation`).

Placement (:func:`place_instruments`) is plausible, not planned: screws enter each chosen
vertebra's pedicles from behind and converge towards the body; K-wires leave the target's
pedicle backwards out of the patient; retractor blades stand either side of the spinous
processes. Frames: CT mm (LPS: +x left, +y posterior, +z superior).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .geometry import View, apply

__all__ = ["Material", "MATERIALS", "Rod", "Blade", "InstrumentsConfig", "place_instruments",
           "instrument_line_integrals", "instrument_from_dict", "case_metal_line_integrals"]


@dataclass(frozen=True)
class Material:
    """A metal: density (g/cm³) and mass attenuation (cm²/g) at the simulation's spectrum
    energies (40, 50, 60, 80, 100 keV; :data:`RadGSRegLib.simulate.SPECTRUM_KEV`)."""

    density: float
    mass_attenuation: tuple

    @property
    def mu_60kev(self) -> float:
        """Linear attenuation at 60 keV, 1/mm."""
        return self.mass_attenuation[2] * self.density / 10.0

    def ratios(self) -> np.ndarray:
        """mu(E) / mu(60 keV) per spectrum energy."""
        m = np.asarray(self.mass_attenuation, dtype=np.float64)
        return m / m[2]


#: NIST XCOM mass attenuation of the elements (rounded): titanium (screws, Ti-6Al-4V's
#: density) and iron for stainless steel (K-wires, retractors)
MATERIALS = {"titanium": Material(4.43, (2.214, 1.213, 0.766, 0.405, 0.272)),
             "steel": Material(7.9, (3.629, 1.958, 1.205, 0.595, 0.372))}


def _slab(o, d, lo, hi):
    """Ray parameters ``(t_enter, t_leave)`` of rays ``o + t d`` inside the slab
    ``lo <= x <= hi`` along one coordinate (any broadcastable shapes); a ray parallel to the
    slab is inside for every t or for none."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s0, s1 = (lo - o) / d, (hi - o) / d
    par = np.abs(d) < 1e-12
    inside = (o >= lo) & (o <= hi)
    enter = np.where(par, np.where(inside, -np.inf, np.inf), np.minimum(s0, s1))
    leave = np.where(par, np.where(inside, np.inf, -np.inf), np.maximum(s0, s1))
    return enter, leave


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


@dataclass
class Rod:
    """A finite solid cylinder (a screw's shaft, a K-wire): axis from ``start`` to ``end``
    (CT mm), ``radius_mm``, flat ends; attached to the vertebra of label ``attached_to``."""

    kind: str
    start: tuple
    end: tuple
    radius_mm: float
    material: str
    attached_to: int

    def path_lengths(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Length (mm) inside the rod of each ray ``origin + t dirs`` (t >= 0), all in the
        rod's frame. origin (3,), dirs (..., 3) unit vectors. Returns (...)."""
        A = np.asarray(self.start, dtype=np.float64)
        axis = np.asarray(self.end, dtype=np.float64) - A
        L = float(np.linalg.norm(axis))
        a = axis / L
        w = origin - A
        d_par, w_par = dirs @ a, float(w @ a)
        d_perp = dirs - d_par[..., None] * a
        w_perp = w - w_par * a
        qa = np.einsum("...i,...i->...", d_perp, d_perp)
        qb = 2 * (d_perp @ w_perp)
        qc = float(w_perp @ w_perp) - self.radius_mm ** 2
        disc = qb ** 2 - 4 * qa * qc
        along = qa <= 1e-12                                   # parallel to the axis: inside the radius or not
        ok = np.where(along, qc <= 0, disc > 0)
        sq = np.sqrt(np.where(ok & ~along, disc, 0.0))
        qa_safe = np.where(along, 1.0, qa)
        t0 = np.where(along, -np.inf, (-qb - sq) / (2 * qa_safe))
        t1 = np.where(along, np.inf, (-qb + sq) / (2 * qa_safe))
        lo, hi = _slab(w_par, d_par, 0.0, L)                # 0 <= (x - A).a <= L along the axis
        enter, leave = np.maximum(np.maximum(t0, lo), 0.0), np.minimum(t1, hi)
        return np.where(ok, np.clip(leave - enter, 0.0, None), 0.0)


@dataclass
class Blade:
    """A box (a retractor blade): ``centre`` (CT mm), its three unit ``axes`` (rows) and
    ``half_mm`` extents along them; attached to the vertebra of label ``attached_to``."""

    kind: str
    centre: tuple
    axes: tuple
    half_mm: tuple
    material: str
    attached_to: int

    def path_lengths(self, origin: np.ndarray, dirs: np.ndarray) -> np.ndarray:
        """Length (mm) inside the box of each ray ``origin + t dirs`` (t >= 0); see
        :meth:`Rod.path_lengths`."""
        R = np.asarray(self.axes, dtype=np.float64)
        o = R @ (origin - np.asarray(self.centre, dtype=np.float64))
        d = dirs @ R.T
        h = np.asarray(self.half_mm, dtype=np.float64)
        lo, hi = _slab(o, d, -h, h)                          # per box axis
        enter, leave = np.maximum(lo.max(axis=-1), 0.0), hi.min(axis=-1)
        return np.clip(leave - enter, 0.0, None)


def instrument_from_dict(d: dict):
    """A :class:`Rod` or :class:`Blade` from its record (case.json)."""
    return (Rod if "radius_mm" in d else Blade)(**d)


@dataclass
class InstrumentsConfig:
    """Which instruments a simulated X-ray shows (none by default).

    Attributes:
        screws: pedicle screws (titanium, 6.5 mm x 45 mm, two per vertebra) in the
            "neighbours" (the vertebrae next to the target), "target", "both" or "none".
        kwires: K-wires (steel, 2 mm) leaving the target's pedicles backwards (0-2).
        retractors: retractor blades (steel, 2 mm thick) beside the spinous processes (0-2).
    """

    screws: str = "none"
    kwires: int = 0
    retractors: int = 0

    def __post_init__(self):
        if self.screws not in ("none", "neighbours", "target", "both"):
            raise ValueError(f"screws must be none, neighbours, target or both, not {self.screws!r}")
        for name in ("kwires", "retractors"):
            v = getattr(self, name)
            if not 0 <= int(v) <= 2 or int(v) != v:
                raise ValueError(f"{name} must be 0, 1 or 2, not {v}")

    @property
    def enabled(self) -> bool:
        return self.screws != "none" or self.kwires > 0 or self.retractors > 0

    def to_dict(self) -> dict:
        return asdict(self)


def _screws(c: np.ndarray, label: int, rng) -> list:
    """Two pedicle screws of vertebra ``label`` (centroid ``c``, CT mm): entry behind and
    beside the body, tip in the body, converging medially (with a little random play)."""
    out = []
    for side in (-1.0, 1.0):
        jitter = rng.uniform(-2.0, 2.0, size=3)
        entry = c + np.array([side * 20.0, 28.0, 0.0]) + jitter
        tip_dir = _unit(np.array([-side * np.tan(np.deg2rad(15.0 + rng.uniform(-5, 5))), -1.0,
                                  np.tan(np.deg2rad(rng.uniform(-5, 5)))]))
        out.append(Rod("pedicle screw", tuple(entry), tuple(entry + 45.0 * tip_dir), 3.25, "titanium", int(label)))
    return out


def place_instruments(seg, target: int, config: InstrumentsConfig, rng: np.random.Generator,
                      neighbours: Sequence[int] = ()) -> list:
    """Instruments for one case (CT frame; see the module docstring).

    Args:
        seg: the label map (CT frame). target: the target's label.
        config: what to place. rng: their small random play.
        neighbours: the labels next to the target (for ``screws="neighbours"``/``"both"``).
    """
    c = seg.label_centroid(target)
    out = []
    levels = {"none": [], "target": [target], "neighbours": list(neighbours),
              "both": [target, *neighbours]}[config.screws]
    for lb in levels:
        out += _screws(seg.label_centroid(lb), lb, rng)
    for k in range(int(config.kwires)):
        side = -1.0 if k == 0 else 1.0
        start = c + np.array([side * 14.0, 10.0, 0.0]) + rng.uniform(-2, 2, size=3)
        d = _unit(np.array([side * np.tan(np.deg2rad(15.0)), 1.0, np.tan(np.deg2rad(rng.uniform(-10, 10)))]))
        out.append(Rod("K-wire", tuple(start), tuple(start + 250.0 * d), 1.0, "steel", int(target)))
    for k in range(int(config.retractors)):
        side = -1.0 if k == 0 else 1.0
        # from the laminae (~40 mm behind the centroid) out of the wound; thin along x, beside the midline
        centre = c + np.array([side * 30.0, 95.0, 0.0]) + rng.uniform(-3, 3, size=3)
        out.append(Blade("retractor blade", tuple(centre), tuple(map(tuple, np.eye(3))), (1.0, 55.0, 25.0), "steel",
                         int(target)))
    return out


def instrument_line_integrals(instruments: Sequence, views: Sequence[View], T_ct_to_carm,
                              motions: dict | None = None) -> dict:
    """The metal's line integrals at 60 keV per material: {material: (V, rows, cols)}
    (``mu_60kev`` x path length), each instrument placed by ``T_ct_to_carm @ motion`` of the
    vertebra it is attached to (``motions``: {label: (4, 4) CT-frame motion}; default none)."""
    out = {}
    T = np.asarray(T_ct_to_carm, dtype=np.float64)
    rays = [v.pixel_rays() for v in views]                   # once per view, for every instrument
    for inst in instruments:
        M = (motions or {}).get(inst.attached_to, np.eye(4))
        Pinv = np.linalg.inv(T @ M)                          # C-arm -> the instrument's CT frame
        mu = MATERIALS[inst.material].mu_60kev
        acc = out.setdefault(inst.material, np.zeros((len(views), views[0].size[1], views[0].size[0])))
        for i, (src, dirs) in enumerate(rays):
            o = apply(Pinv, src)
            d = dirs @ Pinv[:3, :3].T
            acc[i] += mu * inst.path_lengths(o, d)
    return out


def case_metal_line_integrals(case) -> dict:
    """{"ap", "lat": (rows, cols) metal line integral at 60 keV, all materials} of a simulated
    :class:`~RadGSRegLib.io.Case` with its ground truth: the instruments its ``case.json``
    records (``generator.instruments``), each at its vertebra's true pose (``ground_truth @
    motion``, ``generator.articulation``). Zeros for a case without instruments: the exact
    footprint of the metal, for labels and for scoring a metal segmentation."""
    gen = (case.extra or {}).get("generator", {})
    tools = [instrument_from_dict(d) for d in gen.get("instruments", [])]
    names = ("ap", "lat")
    views = [case.views[n] for n in names]
    if not tools:
        return {n: np.zeros(v.shape) for n, v in zip(names, views)}
    if case.ground_truth is None:
        raise ValueError("the metal's footprint needs the case's ground truth (read_case(..., ground_truth=True))")
    motions = {int(v["label"]): np.asarray(v["motion"], dtype=np.float64)
               for v in gen.get("articulation", {}).get("vertebrae", [])}
    L = sum(instrument_line_integrals(tools, views, case.ground_truth, motions=motions or None).values())
    return {n: L[i] for i, n in enumerate(names)}
