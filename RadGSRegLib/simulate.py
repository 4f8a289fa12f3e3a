"""From line integrals to what a C-arm records.

Pipeline for one view (each step has a switch in :class:`XraySimConfig`):

1. Two DRRs at the effective energy (60 keV, :data:`~RadGSRegLib.drr.MU_WATER`): a
   water-like part ``L_s`` (all tissue, capped at 100 HU) and a bone part ``L_b`` (the
   attenuation above that cap).
2. **Beam hardening** (``beam_hardening``): a 5-bin spectrum of an ~80 kVp filtered beam;
   per bin, water and bone attenuation are scaled by their NIST mass-attenuation ratios to
   60 keV: ``p = -ln Σ_k w_k exp(-(r_s,k L_s + r_b,k L_b))``. Off: ``p = L_s + L_b``.
3. Primary photons per pixel ``N0 exp(-p)``. Like a C-arm's automatic exposure control,
   ``N0`` is set so that the central third of the detector receives ``photons_per_mm2``
   on average (behind the patient): a thick lateral view gets more dose than an AP view.
4. **Scatter** (``scatter_to_primary``): a smooth additive field, the low-frequency haze an
   anti-scatter grid leaves: each pixel's ray scatters in proportion to the primary it
   delivers times its attenuation, ``N0 exp(-p) p`` (single scatter: nothing where the beam
   crosses only air, little behind very thick parts), spread by a ``scatter_sigma_mm``
   Gaussian and scaled so that the median scatter / primary over the central third of the
   detector, where the beam crosses the body, is ``scatter_to_primary``.
5. **Quantum noise** (``photons_per_mm2`` not None): Poisson counts.
6. **Detector blur** (``blur_sigma_mm``): Gaussian point-spread function.
7. **Circular field** (``field_diameter_mm``): an image intensifier's round field; outside
   it the detector records nothing (black: no counts).
8. **Output**: ``"line_integral"``: ``-ln(I / N0)`` (log-converted, flat-field corrected,
   bone bright; no counts gives ``-ln(0.5 / N0)``, the largest value); ``"intensity"``:
   ``I / N0`` scaled to 0..4095 like a 12-bit detector (bone dark).

A bending spine (:mod:`RadGSRegLib.articulation`) enters at step 1: each vertebra's bone
part is projected at its own pose and the line integrals summed. So does the patient beyond
the scan (``beyond_ct_mm``): a C-arm's field is often longer than the CT, and the body does
not end where the CT does; the CT's first and last cranio-caudal slices, repeated outward
(:func:`beyond_ct`), stand in for the anatomy the scan did not cover (a crude stand-in: the
same cross-section on and on, no discs or ribs), which the registration's CT lacks.

Defaults aim at a single lumbar fluoroscopy shot with an anti-scatter grid.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Sequence

import numpy as np
from scipy import ndimage

from .drr import DRR, MU_WATER
from .geometry import View
from .volume import Volume

__all__ = ["XraySimConfig", "split_soft_bone", "simulate_xrays", "formation", "field_mask", "beyond_ct", "OUTPUTS",
           "SPECTRUM_KEV"]

OUTPUTS = ("line_integral", "intensity")
# spectrum bins (keV), relative photon weights, and mass-attenuation ratios mu(E)/mu(60 keV)
_E = np.array([40.0, 50.0, 60.0, 80.0, 100.0])
#: the spectrum's energies (keV); materials give their attenuation at these
SPECTRUM_KEV = tuple(float(e) for e in _E)
_W = np.array([0.15, 0.30, 0.30, 0.20, 0.05])
_R_WATER = np.array([0.268, 0.227, 0.206, 0.184, 0.171]) / 0.206
_R_BONE = np.array([0.665, 0.424, 0.315, 0.223, 0.186]) / 0.315
_SOFT_CAP_HU = 100.0


@dataclass
class XraySimConfig:
    """Switches and parameters of the X-ray formation model (see the module docstring).

    Attributes:
        beam_hardening: polychromatic spectrum with a bone/soft split.
        photons_per_mm2: photon fluence (per mm²) that the exposure control aims at behind
            the patient, averaged over the central third of the detector; None: no noise.
        scatter_to_primary: scatter-to-primary ratio of the additive haze behind the body
            in the central third of the detector (median; 0: none).
        scatter_sigma_mm: width (mm at the detector) of the scatter kernel.
        blur_sigma_mm: detector PSF sigma (mm); 0: none.
        field_diameter_mm: diameter (mm at the detector, centred) of a circular field, as
            an image intensifier gives; None: the whole detector.
        output: "line_integral" or "intensity".
    """

    beam_hardening: bool = True
    photons_per_mm2: float | None = 3000.0
    scatter_to_primary: float = 0.3
    scatter_sigma_mm: float = 40.0
    blur_sigma_mm: float = 0.4
    field_diameter_mm: float | None = None
    output: str = "line_integral"

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, not {self.output!r}")
        if self.photons_per_mm2 is not None and self.photons_per_mm2 <= 0:
            raise ValueError(f"photons_per_mm2 must be positive or None, got {self.photons_per_mm2}")
        for name in ("scatter_to_primary", "scatter_sigma_mm", "blur_sigma_mm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.field_diameter_mm is not None and not self.field_diameter_mm > 0:
            raise ValueError(f"field_diameter_mm must be positive or None, got {self.field_diameter_mm}")

    @classmethod
    def ideal(cls, output: str = "line_integral") -> "XraySimConfig":
        """No physics beyond the monochromatic line integral (every effect off)."""
        return cls(beam_hardening=False, photons_per_mm2=None, scatter_to_primary=0.0,
                   blur_sigma_mm=0.0, output=output)

    def to_dict(self) -> dict:
        return asdict(self)


def split_soft_bone(hu: np.ndarray, mu_water: float = MU_WATER) -> tuple[np.ndarray, np.ndarray]:
    """Attenuation (1/mm) split into a water-like part (HU capped at 100) and the bone excess."""
    hu = np.asarray(hu, dtype=np.float32)
    soft = mu_water * (1.0 + np.clip(hu, -1000.0, _SOFT_CAP_HU) / 1000.0)
    bone = mu_water * np.clip(hu - _SOFT_CAP_HU, 0.0, None) / 1000.0
    return soft.astype(np.float32), bone.astype(np.float32)


def formation(L_soft: np.ndarray, L_bone: np.ndarray, view: View, config: XraySimConfig,
              rng: np.random.Generator, L_metal: dict | None = None) -> np.ndarray:
    """Steps 2-8 for one view: (rows, cols) line integrals -> (rows, cols) image.

    ``L_metal``: {material name: (rows, cols) line integral at 60 keV} of instruments
    (:mod:`RadGSRegLib.instruments`), hardened with each metal's own energy dependence."""
    metal = [(np.asarray(L, dtype=np.float64), _metal_ratios(m)) for m, L in (L_metal or {}).items()]
    if config.beam_hardening:
        x = L_soft[None] * _R_WATER[:, None, None] + L_bone[None] * _R_BONE[:, None, None]
        for L, r in metal:
            x = x + L[None] * r[:, None, None]
        p = -np.log(np.tensordot(_W, np.exp(-x), axes=1))
    else:
        p = L_soft + L_bone
        for L, _ in metal:
            p = p + L
    su, sv = view.pixel_spacing
    h, w = p.shape
    centre = np.exp(-p[h // 3: h - h // 3 or None, w // 3: w - w // 3 or None]).mean()
    n0 = (config.photons_per_mm2 or 1e6) * su * sv / max(float(centre), 1e-12)   # exposure control
    primary = n0 * np.exp(-p)
    expected = primary
    if config.scatter_to_primary > 0:
        # what each ray scatters (primary x attenuation: air scatters nothing), blurred on a
        # coarse grid (the kernel is wide), back to full size, scaled to the SPR at the centre
        f = max(1, int(min(primary.shape) // 64))
        source = primary * np.maximum(p, 0.0)
        small = source[: h // f * f, : w // f * f]
        small = small.reshape(small.shape[0] // f, f, small.shape[1] // f, f).mean(axis=(1, 3))
        blur = ndimage.gaussian_filter(small, (config.scatter_sigma_mm / (sv * f), config.scatter_sigma_mm / (su * f)),
                                       mode="constant")
        zoom = (h / blur.shape[0], w / blur.shape[1])
        scatter = np.maximum(ndimage.zoom(blur, zoom, order=1, mode="nearest"), 0.0)
        # the ratio behind the patient: pixels of the central third the beam crosses the body at
        # (p > 0.5: ~25 mm of water; open air there must not set it), else anywhere in the body
        body = p > 0.5
        mid = np.zeros_like(body)
        mid[h // 3: h - h // 3 or None, w // 3: w - w // 3 or None] = True
        sel = body & mid if (body & mid).any() else body
        if sel.any():
            k = config.scatter_to_primary / max(float(np.median(scatter[sel] / primary[sel])), 1e-12)
            expected = primary + k * scatter
    counts = rng.poisson(expected).astype(np.float64) if config.photons_per_mm2 is not None else expected
    if config.blur_sigma_mm > 0:
        counts = ndimage.gaussian_filter(counts, (config.blur_sigma_mm / sv, config.blur_sigma_mm / su), mode="nearest")
    inside = None if config.field_diameter_mm is None else field_mask(view, config.field_diameter_mm)
    if inside is not None:
        counts = np.where(inside, counts, 0.0)
    rel = np.maximum(counts, 0.5) / n0
    if config.output == "line_integral":
        return (-np.log(rel)).astype(np.float32)
    if inside is not None:
        rel = np.where(inside, rel, 0.0)                 # black outside the field
    return (np.clip(rel, 0, 1) * 4095.0).astype(np.float32)


def _metal_ratios(material: str) -> np.ndarray:
    from .instruments import MATERIALS

    return MATERIALS[material].ratios()


def field_mask(view: View, diameter_mm: float) -> np.ndarray:
    """(rows, cols) bool: the pixels whose centres lie within a circle of ``diameter_mm``
    (detector mm) around the detector's centre."""
    cols, rows = view.size
    su, sv = view.pixel_spacing
    u = (np.arange(cols) - (cols - 1) / 2) * su
    v = (np.arange(rows) - (rows - 1) / 2) * sv
    return (u[None, :] ** 2 + v[:, None] ** 2) <= (diameter_mm / 2) ** 2


def beyond_ct(ct: Volume, mm: float) -> list[Volume]:
    """The patient beyond the scan: the CT's first and last slices along its cranio-caudal
    axis (the volume axis closest to LPS z), each repeated ``mm`` outward (rounded up to
    whole slices). Returns the two blocks (same values as those slices, CT frame; the one
    before index 0, then the one after the last index), or [] when ``mm`` <= 0. They move
    with the CT as a whole: under articulation the scan's end vertebra moves and its
    repeated slices do not (a seam, far from the target)."""
    if mm <= 0:
        return []
    ax = ct.axis_along_z
    arr = 2 - ax                                          # the array's axis ([k, j, i])
    n = int(np.ceil(mm / ct.spacing[ax]))
    out = []
    for end, first in ((0, -n), (ct.size[ax] - 1, ct.size[ax])):
        block = np.repeat(np.take(ct.array, [end], axis=arr), n, axis=arr)
        start = np.zeros(3)
        start[ax] = first
        out.append(Volume(np.ascontiguousarray(block), ct.affine_at(start)))
    return out


def simulate_xrays(ct: Volume, views: Sequence[View], T_ct_to_carm, config: XraySimConfig | None = None,
                   rng: np.random.Generator | None = None, *, mu_water: float = MU_WATER,
                   backend: str = "auto", articulation=None, instruments=(),
                   beyond_ct_mm: float = 0.0) -> dict[str, np.ndarray]:
    """Realistic X-rays of a CT (HU) placed in the C-arm frame by ``T_ct_to_carm``.

    Args:
        ct: CT in HU (CT frame). views: views of equal size (C-arm frame).
        T_ct_to_carm: (4, 4). config: the formation model (default :class:`XraySimConfig`).
        rng: random generator for the noise (default seeded 0).
        articulation: a :class:`~RadGSRegLib.articulation.Articulation` of this CT: each
            vertebra's bone is projected at ``T_ct_to_carm @ motion`` (None: the CT is rigid).
        instruments: :mod:`RadGSRegLib.instruments` solids (CT frame), each moving with the
            vertebra it is attached to.
        beyond_ct_mm: the patient continues this far (mm) beyond each cranio-caudal end of
            the CT (:func:`beyond_ct`; rigid with the CT); 0: the body ends with the scan.
    Returns:
        {view.name or index: (rows, cols) float32 image}.
    """
    config = config or XraySimConfig()
    rng = rng or np.random.default_rng(0)
    soft, bone = split_soft_bone(ct.array, mu_water)
    T = np.asarray(T_ct_to_carm, dtype=np.float64)
    L_s = DRR(soft, ct.affine, backend=backend).render(views, T).numpy().astype(np.float64)
    if articulation is None:
        L_b = DRR(bone, ct.affine, backend=backend).render(views, T).numpy().astype(np.float64)
    else:                                   # each vertebra's bone at its own pose, the rest rigid
        L_b = 0.0
        for _, b, A, M in articulation.parts(bone, ct.affine):
            L_b = L_b + DRR(b, A, backend=backend).render(views, T @ M).numpy().astype(np.float64)
    for block in beyond_ct(ct, beyond_ct_mm):
        soft_x, bone_x = split_soft_bone(block.array, mu_water)
        L_s = L_s + DRR(soft_x, block.affine, backend=backend).render(views, T).numpy().astype(np.float64)
        L_b = L_b + DRR(bone_x, block.affine, backend=backend).render(views, T).numpy().astype(np.float64)
    metal = {}
    if instruments:
        from .instruments import instrument_line_integrals

        metal = instrument_line_integrals(instruments, list(views), T,
                                          motions=articulation.motions if articulation is not None else None)
    return {(v.name or str(i)): formation(L_s[i], L_b[i], v, config, rng, {m: L[i] for m, L in metal.items()})
            for i, v in enumerate(views)}
