"""Is this input physically plausible?

The readers (:mod:`RadGSRegLib.io`) check that every field is *well formed*; the checks here
ask whether it can be *right*: a C-arm whose source sits at the isocentre, a detector
between the source and the patient, a CT in 0..1 instead of Hounsfield units, an all-zero
X-ray, a detector image labelled as line integrals. Each such input used to run to the end
and come back as a registration "doubtful: NCC 0.07" without a word on the cause.

Every check returns a list of warnings (unusual but possible; each starts with the field it
is about) and raises :class:`PlausibilityError` (an :class:`~RadGSRegLib.errors.InputError`)
for the first input that cannot be right. Messages say what was found, what was expected
and what to do. Pure NumPy; large arrays are read without full-size copies (statistics come
from a strided sample, min/max from the array itself), so a check takes milliseconds.

Where the numbers come from (typical values; the refusal limits are set well outside them):

* **Source-to-detector distance (SDD)**: 900-1200 mm on surgical C-arms: 1020 mm for the
  Siemens Cios Fusion of the DeepFluoro data (Grupp et al. 2020, as loaded by DiffDRR /
  DiffPose), 1124 mm in this project's paper set-up
  (:data:`~RadGSRegLib.geometry.STANDARD_SDD_MM`), ~1000 mm on image-intensifier C-arms,
  900-1200 mm adjustable on angiography C-arms; chest radiography rooms reach 1800 mm.
* **Source-to-isocentre distance (SID)**: 500-800 mm (700 mm in the standard set-up), so
  the magnification SDD/SID is 1.3-2.0 on C-arms (1.61 in the standard set-up); 1.1 is a
  detector pressed against the patient.
* **Detector**: 230 / 310 mm image intensifiers (9" / 12"), 200x200 to 300x400 mm flat panels
  on C-arms (DeepFluoro: 1536 x 1536 pixels of 0.194 mm, 298 mm), 430x430 mm radiography
  panels.
* **Pixel pitch**: 0.14-0.2 mm native flat panels (0.194 mm DeepFluoro), 0.3-0.4 mm binned,
  0.3 mm in the standard set-up. Images are often resampled for speed: 976 -> 64 pixels
  over 292.8 mm is 4.6 mm, 48 pixels 6.1 mm (the tests' sample cases), hence the 10 mm limit.
* **Raw detector images** are 12-16 bit counts (0..4095 in this project's simulation;
  DeepFluoro's I0 is ~65 500); collimator shutters leave fully attenuated borders.
* **Hounsfield units**: air -1000, fat -100..-50, water 0, soft tissue 20-80, cancellous
  bone 100-400, cortical bone 700-1900; padding values -1024, -2048, -3024 and -32768 are
  common and normal; extended-scale scanners go up to ~30 700 (metal).
* **Line integrals** ``-ln(I/I0)`` of a 60 keV beam through a patient: water attenuates
  0.02/mm, so 0 (air) to ~6-8 through a 300-400 mm trunk with bone; the project's simulated
  lumbar images span -0.5..8.4 (see ``Testing/test_checks.py``).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .errors import InputError
from .geometry import View, apply, is_rigid, translation

__all__ = ["PlausibilityError", "check_view", "check_pair", "check_ct", "check_xray", "check_xray_pair",
           "check_case", "check_consistency", "xray_polarity", "LIMITS"]


class PlausibilityError(InputError):
    """An input that is well formed but cannot be right. ``field`` says which one
    ("views.ap.source", "ct", ...); ``detail`` is the message without the field."""

    def __init__(self, field: str, detail: str):
        self.field = field
        self.detail = detail
        super().__init__(f"{field}: {detail}")


#: Every threshold, in one place (see the module docstring for the sources).
LIMITS = {
    # geometry (mm)
    "sid_refuse_min": 100.0,          # a source this close to the isocentre is a wrong field or unit
    "sid_refuse_max": 2500.0,         # beyond any C-arm or radiography room: units?
    "sid_warn": (400.0, 1200.0),      # typical 500-800
    "sdd_refuse_max": 3000.0,
    "sdd_warn": (700.0, 1600.0),      # typical 900-1200
    "magnification_refuse": (1.0, 5.0),
    "magnification_warn": (1.1, 2.5),  # typical 1.3-2.0
    "pixel_spacing_refuse": (0.02, 10.0),
    "detector_side_refuse": (50.0, 600.0),
    "max_pixels": 8192,
    "detector_tilt_warn_deg": 15.0,   # angle between the detector normal and the source-isocentre ray
    "pair_angle_refuse_deg": 2.0,     # two views along the same line: no depth at all
    "pair_angle_warn_deg": 30.0,      # biplanar set-ups use ~90 deg
    # CT (HU, mm, voxels)
    "ct_spacing_refuse": (0.1, 10.0),
    "ct_min_voxels": 16,
    "ct_min_extent_warn_mm": 30.0,
    "ct_bone_min_hu": 100.0,          # no voxel above this: no bone
    "ct_air_warn_hu": -500.0,         # no voxel below this: no air in the field of view
    "ct_max_warn_hu": 31000.0,        # beyond the extended-HU scale
    # X-rays
    "xray_min_pixels": 32,
    "li_refuse_median": 20.0,         # line integrals of a patient are rarely above ~15
    "li_refuse_max": 100.0,
    "li_intensity_like_p99": 1.5,     # -ln(I/I0) through a trunk reaches 4-8; I/I0 stays in 0..1
    "li_negative_value": -0.5,        # -ln(I/I0) < -0.5: 65 % more than the unattenuated beam
    "li_negative_warn_fraction": 0.05,
    "intensity_negative_fraction": 0.01,  # more than 1 % of pixels below -5 % of the bright level
    "intensity_negative_level": 0.05,
    "intensity_li_like_max": (1.5, 20.0),  # a float image with its 99th percentile here looks like -ln(I/I0)
    "swap_margin": 0.5,               # AP attenuating more than the lateral by this (-ln units): swapped
    "swap_body_min": 1.0,             # -ln(I/I0) above this is body (~50 mm of water), for the swap check
    "polarity_warn": 0.10,            # |bone-bright evidence| that counts as a clear contradiction
    "intensity_compression_warn": 0.60,  # median position in the 1-99 % range of a raw intensity image
}

_SAMPLE_VOXELS = 2_000_000
_SAMPLE_PIXELS_SIDE = 256


def _sample2d(image) -> np.ndarray:
    """An image sampled to at most 256 pixels a side (a strided view), as float64."""
    a = np.asarray(image)
    step = max(1, int(math.ceil(max(a.shape) / _SAMPLE_PIXELS_SIDE)))
    return np.asarray(a[::step, ::step], dtype=np.float64)


def _fail(field: str, detail: str):
    raise PlausibilityError(field, detail)


def _fmt(x, nd=1) -> str:
    return f"{x:.{nd}f}"


# ------------------------------------------------------------------------- geometry
def _geometry_numbers(view: View, isocentre) -> dict:
    iso = np.asarray(isocentre, dtype=np.float64)
    s, o, n = view.source, view.detector_origin, view.normal
    d_s = float(n @ (s - o))            # signed distance of the source from the detector plane
    d_i = float(n @ (iso - o))          # signed distance of the isocentre from the detector plane
    return dict(iso=iso, sid=float(np.linalg.norm(s - iso)), d_s=d_s, d_i=d_i, sdd=abs(d_s),
                sid_perp=abs(d_s - d_i))


def check_view(view: View, name: str = "", *, isocentre=(0.0, 0.0, 0.0)) -> list[str]:
    """Physical plausibility of one C-arm view (C-arm frame, mm, isocentre at ``isocentre``).

    Refuses (:class:`PlausibilityError`): the source closer than 100 mm to the isocentre or
    farther than 2500 mm; the source in the detector plane; the detector not on the far
    side of the isocentre (the patient must lie between source and detector, i.e. the
    source-to-detector distance must exceed the source-to-isocentre distance, both along
    the detector normal); magnification SDD/SID <= 1.0 or > 5; SDD > 3000 mm; a pixel
    spacing outside 0.02-10 mm; a detector side (size x spacing) outside 50-600 mm; more
    than 8192 pixels a side (memory).

    Warns: SID outside 400-1200 mm (typical 500-800), SDD outside 700-1600 mm (typical
    900-1200), magnification outside 1.1-2.5 (typical 1.3-2.0), a detector tilted more than
    15 deg from the source-isocentre ray, and the isocentre projecting outside the detector
    (a vertebra placed there would not be imaged).

    Args:
        view: the view. name: its name in geometry.json ("ap", "lat"): messages name
            ``views.<name>.<field>``.
    Returns:
        warnings, each starting with the field.
    """
    f = f"views.{name}" if name else "view"
    L = LIMITS
    g = _geometry_numbers(view, isocentre)
    warnings: list[str] = []
    cols, rows = view.size
    su, sv = view.pixel_spacing

    # --- memory first: a huge image must not reach anything that allocates
    if max(cols, rows) > L["max_pixels"]:
        _fail(f"{f}.size", f"{cols} x {rows} pixels; at most {L['max_pixels']} a side is accepted (the largest "
              "clinical detectors have ~3000-4300 pixels a side; a larger image would need tens of GB per "
              "rendered view). Check the size field, or downsample the image and scale pixel_spacing.")
    lo, hi = L["pixel_spacing_refuse"]
    for k, sp in enumerate((su, sv)):
        if not (lo <= sp <= hi):
            _fail(f"{f}.pixel_spacing", f"{sp:g} mm along {'uv'[k]}; expected {lo}-{hi} mm (detectors have "
                  "0.14-0.4 mm pixels; 10 mm is a 30-pixel image of a 30 cm detector). Is it in mm "
                  "(not cm or m)?")
    lo, hi = L["detector_side_refuse"]
    for k, (npx, sp) in enumerate(((cols, su), (rows, sv))):
        side = npx * sp
        if not (lo <= side <= hi):
            _fail(f"{f}.size", f"the detector is {_fmt(side)} mm along {'uv'[k]} ({npx} pixels x {sp:g} mm); "
                  f"expected {lo:g}-{hi:g} mm (C-arm detectors are 200-430 mm). Check size and pixel_spacing "
                  "(mm per pixel).")

    # --- the source and the detector plane
    if g["sid"] < L["sid_refuse_min"]:
        _fail(f"{f}.source", f"the source is {_fmt(g['sid'])} mm from the isocentre (the C-arm origin); a C-arm's "
              f"focal spot is 500-800 mm from it (at least {L['sid_refuse_min']:g} mm accepted). Is the source "
              "given in the C-arm frame, in mm?")
    if g["sid"] > L["sid_refuse_max"]:
        _fail(f"{f}.source", f"the source is {_fmt(g['sid'])} mm from the isocentre; at most "
              f"{L['sid_refuse_max']:g} mm is accepted (C-arms: 500-800 mm). Is it in mm?")
    if g["sdd"] < 1.0:
        _fail(f"{f}.source", "the source lies in the detector plane (source-to-detector distance "
              f"{g['sdd']:.3g} mm); expected 900-1200 mm. Check source, detector_origin, detector_u/v.")
    t = g["d_i"] / g["d_s"]             # where the isocentre lies between detector (0) and source (1)
    if t <= 0:
        _fail(f"{f}.detector_origin", f"the detector plane lies between the source and the isocentre (source "
              f"{_fmt(g['sdd'])} mm from the detector plane, the isocentre {_fmt(abs(g['d_i']))} mm on the "
              "other side of it); the patient must lie between source and detector. Check detector_origin "
              "(the centre of pixel (0, 0), C-arm frame) and the sign of source.")
    if t >= 1:
        _fail(f"{f}.source", f"the isocentre is behind the source (source {_fmt(g['sdd'])} mm from the detector "
              f"plane, the isocentre {_fmt(abs(g['d_i']))} mm): the X-rays would leave the source away from "
              "the patient. The source-to-detector distance must exceed the source-to-isocentre distance; "
              "check source and detector_origin.")
    mag = g["sdd"] / g["sid_perp"]
    lo, hi = L["magnification_refuse"]
    if mag > hi:
        _fail(f"{f}.source", f"magnification SDD/SID = {g['sdd']:.0f}/{g['sid_perp']:.0f} mm = {mag:.2f}; "
              f"at most {hi:g} is accepted (C-arms: 1.3-2.0): the source is almost at the isocentre. "
              "Check source and detector_origin.")
    if g["sdd"] > L["sdd_refuse_max"]:
        _fail(f"{f}.detector_origin", f"the detector plane is {_fmt(g['sdd'])} mm from the source; at most "
              f"{L['sdd_refuse_max']:g} mm is accepted (C-arms: 900-1200 mm). Is it in mm?")

    # --- unusual but possible
    lo, hi = L["magnification_warn"]
    if not (lo <= mag <= hi):
        warnings.append(f"{f}: magnification SDD/SID = {mag:.2f} is unusual (C-arms: 1.3-2.0; "
                        f"SDD {g['sdd']:.0f} mm, SID {g['sid_perp']:.0f} mm): check the source and detector positions")
    lo, hi = L["sid_warn"]
    if not (lo <= g["sid"] <= hi):
        warnings.append(f"{f}.source: {_fmt(g['sid'])} mm from the isocentre is unusual (C-arms: 500-800 mm)")
    lo, hi = L["sdd_warn"]
    if not (lo <= g["sdd"] <= hi):
        warnings.append(f"{f}: source-to-detector distance {_fmt(g['sdd'])} mm is unusual (C-arms: 900-1200 mm)")
    ray = g["iso"] - view.source
    tilt = math.degrees(math.acos(min(1.0, abs(float(view.normal @ ray)) / max(np.linalg.norm(ray), 1e-12))))
    if tilt > L["detector_tilt_warn_deg"]:
        warnings.append(f"{f}.detector_u: the detector is tilted {tilt:.0f} deg from the source-isocentre ray "
                        "(a C-arm's detector faces its source); check detector_u and detector_v")
    c, r = view.project(g["iso"])
    if not (-0.5 <= c <= cols - 0.5 and -0.5 <= r <= rows - 0.5):
        warnings.append(f"{f}: the isocentre projects to pixel ({c:.0f}, {r:.0f}), outside the {cols} x {rows} "
                        "detector: a vertebra at the isocentre would not be imaged (check detector_origin: "
                        "the centre of pixel (0, 0))")
    return warnings


def _central_ray(view: View) -> np.ndarray:
    d = view.detector_center - view.source
    return d / np.linalg.norm(d)


def check_pair(views: Mapping[str, View]) -> list[str]:
    """The AP + lateral pair: two views that see the patient from different directions,
    named as they look.

    Refuses: a missing "ap" or "lat" view; the two views identical, or looking along the same
    line (central rays less than 2 deg apart, e.g. AP and PA): the second view adds no depth.
    Warns: central rays less than 30 deg apart (depth poorly determined; biplanar set-ups use
    ~90 deg); "AP and lateral look swapped" when the AP's central ray is closer to the LPS
    x axis (left-right) than to y and the lateral's closer to y (:func:`~RadGSRegLib.geometry.biplanar_views`:
    AP source at +y, lateral at +x); otherwise a view whose ray is closer to another axis
    than its own.
    """
    for k in ("ap", "lat"):
        if k not in views:
            _fail(f"views.{k}", f"missing (views present: {sorted(views)}); both 'ap' and 'lat' are needed")
    ap, lat = views["ap"], views["lat"]
    warnings: list[str] = []
    same = (np.allclose(ap.source, lat.source, atol=1e-3)
            and np.allclose(ap.detector_origin, lat.detector_origin, atol=1e-3)
            and np.allclose(ap.u, lat.u, atol=1e-6) and np.allclose(ap.v, lat.v, atol=1e-6))
    if same:
        _fail("views.lat", "is the same view as views.ap (same source and detector): a biplanar registration "
              "needs two different directions, typically AP and lateral 90 deg apart. Was the AP copied?")
    da, dl = _central_ray(ap), _central_ray(lat)
    angle = math.degrees(math.acos(min(1.0, abs(float(da @ dl)))))   # between the two lines
    if angle < LIMITS["pair_angle_refuse_deg"]:
        _fail("views.lat", f"looks along the same line as views.ap (central rays {angle:.1f} deg apart): the second "
              "view adds no depth. The lateral must be taken from the side, ~90 deg from the AP.")
    if angle < LIMITS["pair_angle_warn_deg"]:
        warnings.append(f"views: the AP and lateral central rays are only {angle:.0f} deg apart; depth along the "
                        "rays will be poorly determined (biplanar set-ups use ~90 deg)")
    ax = lambda d: int(np.argmax(np.abs(d)))   # noqa: E731  dominant LPS axis of a direction
    names = "x (left-right)", "y (anterior-posterior)", "z (head-foot)"
    if abs(da[0]) > abs(da[1]) and abs(dl[1]) > abs(dl[0]):
        warnings.append("views: AP and lateral look swapped: the 'ap' central ray runs along LPS "
                        f"x (left-right, {math.degrees(math.acos(min(1, abs(da[0])))):.0f} deg off) and the 'lat' "
                        "ray along y (anterior-posterior); an AP view looks along y, a lateral along x. Swap the "
                        "views (and their images) if so.")
    else:
        if ax(da) != 1:
            warnings.append(f"views.ap: its central ray runs along LPS {names[ax(da)]}, not y (anterior-posterior) "
                            "as an AP view's does; check the geometry or the view names")
        if ax(dl) != 0:
            warnings.append(f"views.lat: its central ray runs along LPS {names[ax(dl)]}, not x (left-right) as a "
                            "lateral view's does; check the geometry or the view names")
    return warnings


# ------------------------------------------------------------------------------ CT
def check_ct(volume, field: str = "ct") -> list[str]:
    """Physical plausibility of a CT volume (:class:`~RadGSRegLib.volume.Volume`, Hounsfield units).

    Refuses: fewer than 16 voxels along an axis; voxel sizes outside 0.1-10 mm; NaN or
    infinite values; a constant volume; values that cannot be Hounsfield units: all within
    [-1, 1] ("a normalised image" or attenuation coefficients), all within [-100, 255] (an
    8-bit image), or no voxel above 100 HU (no bone).
    Warns: no voxel below -500 HU (no air: a tightly cropped field of view, or stored without
    the rescale intercept when no voxel is negative at all), values above 31 000 HU, a field
    of view under 30 mm along an axis. Padding values (-1024, -3024, -32768) are normal and
    not reported.
    """
    arr = np.asarray(volume.array)
    warnings: list[str] = []
    if arr.ndim != 3:
        _fail(field, f"expected a 3-D volume, got shape {arr.shape}")
    size = tuple(int(x) for x in arr.shape[::-1])   # (I, J, K)
    if min(size) < LIMITS["ct_min_voxels"]:
        _fail(field, f"{size[0]} x {size[1]} x {size[2]} voxels; at least {LIMITS['ct_min_voxels']} along every "
              "axis are needed (a vertebra at 1-3 mm spans 15-50 voxels). Is this a single slice or a thumbnail?")
    sp = np.asarray(volume.spacing, dtype=np.float64)
    lo, hi = LIMITS["ct_spacing_refuse"]
    if not np.all((sp >= lo) & (sp <= hi)):
        _fail(field, f"voxel size {np.round(sp, 4).tolist()} mm; expected {lo}-{hi} mm per axis (clinical CT: "
              "0.3-1 mm in-plane, 0.5-5 mm slices). Is the spacing in mm?")
    ext = sp * np.asarray(size)
    if ext.min() < LIMITS["ct_min_extent_warn_mm"]:
        warnings.append(f"{field}: the field of view is only {np.round(ext, 1).tolist()} mm; a lumbar vertebra is "
                        "40-50 mm wide, so it may be cut")
    if arr.dtype.kind not in "iuf":
        _fail(field, f"voxel type {arr.dtype} is not a number")
    mn, mx = arr.min(), arr.max()     # NaN propagates through min/max: no full-size mask needed
    if not (np.isfinite(mn) and np.isfinite(mx)):
        _fail(field, "contains NaN or infinite voxels")
    mn, mx = float(mn), float(mx)
    if mx == mn:
        _fail(field, f"every voxel is {mn:g}: the CT is empty or constant. Check the file and its reader.")
    if mn >= -1.0 and mx <= 1.0:
        _fail(field, f"values lie in [{mn:.3g}, {mx:.3g}]: this looks like a normalised image (or attenuation "
              "coefficients), not Hounsfield units (air -1000, water 0, bone +300 to +1900). Give the CT in HU.")
    if mn >= -100.0 and mx <= 255.0:
        _fail(field, f"values lie in [{mn:.4g}, {mx:.4g}] with nothing below -100: this looks like an 8-bit "
              "(display) image, not Hounsfield units (air -1000, water 0, bone +300 to +1900). Give the CT in HU.")
    if mx < LIMITS["ct_bone_min_hu"]:
        _fail(field, f"the largest value is {mx:.4g}: no voxel is above {LIMITS['ct_bone_min_hu']:g} HU, so there "
              "is no bone (cancellous bone 100-400 HU, cortical 700-1900). Is this a CT in HU?")
    # padding (the scanner's -1024 ... -32768 outside the reconstruction circle) says nothing
    # about the calibration: look at the smallest value that is not padding
    body_min = mn
    if mn <= -1500.0:
        sample = np.asarray(arr[::max(1, arr.shape[0] // 32), ::4, ::4], dtype=np.float64)
        rest = sample[sample > -1500.0]
        body_min = float(rest.min()) if rest.size else mn
    if mn >= 0.0:
        warnings.append(f"{field}: no voxel is negative (values {mn:.4g} to {mx:.4g}): no air or fat, which a CT in HU "
                        "always shows; if the values are HU + 1024 (stored values without the DICOM rescale "
                        "intercept) subtract 1024, and check that this is a CT")
    elif body_min >= 0.0:
        warnings.append(f"{field}: no voxel outside the padding (values <= -1500) is negative (values {body_min:.4g} "
                        f"to {mx:.4g}): no air or fat, which a CT in HU always shows; if the values are HU + 1024 "
                        "(stored without the DICOM rescale intercept) subtract 1024, and check that this is a CT")
    elif mn > LIMITS["ct_air_warn_hu"]:
        warnings.append(f"{field}: no voxel below {LIMITS['ct_air_warn_hu']:g} HU (minimum {mn:.4g}): no air in the "
                        "field of view, a tightly cropped CT; the X-rays see more of the body than the CT holds")
    if mx > LIMITS["ct_max_warn_hu"]:
        warnings.append(f"{field}: values up to {mx:.6g} lie beyond the extended Hounsfield scale (~30 700): "
                        "check the rescale slope and intercept")
    return warnings


# ---------------------------------------------------------------------------- X-rays
def _trim_flat_border(img: np.ndarray, tol: float) -> np.ndarray:
    """Drop image rows/columns at the borders that are constant (masked shutters, padding)."""
    rows = np.ptp(img, axis=1) > tol
    cols = np.ptp(img, axis=0) > tol
    if not rows.any() or not cols.any():
        return img[:0, :0]
    r = np.flatnonzero(rows)
    c = np.flatnonzero(cols)
    return img[r[0]: r[-1] + 1, c[0]: c[-1] + 1]


def _round_field_surround(img: np.ndarray) -> np.ndarray | None:
    """The black surround of an image intensifier's round field, if ``img`` has one: at least
    1 % of the pixels share the image's minimum or maximum exactly and all of them lie
    farther from the centre than every other pixel (a centred disc of signal, a constant
    ring around it). None otherwise (air, saturated skin, shutters: :func:`_trim_flat_border`)."""
    h, w = img.shape
    if h < 8 or w < 8:
        return None
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot((yy - (h - 1) / 2) / h, (xx - (w - 1) / 2) / w)
    step = 1.5 / min(h, w)                    # a pixel's worth of radius (the disc's edge is pixelated)
    for value in (img.max(), img.min()):
        flat = img == value
        if flat.mean() >= 0.01 and (~flat).any() and r[flat].min() >= r[~flat].max() - step:
            return flat
    return None


def _cues(img: np.ndarray) -> dict | None:
    """Bright-body cues of one (sampled, float) image; None when it has no usable range."""
    h, w = img.shape
    if h < 8 or w < 8:
        return None
    p1, p50, p99 = np.percentile(img, [1, 50, 99])
    spread = float(p99 - p1)
    if spread <= 0:
        return None
    b = max(1, h // 8), max(1, w // 8)
    ring = np.concatenate([img[: b[0]].ravel(), img[h - b[0]:].ravel(),
                           img[b[0]: h - b[0], : b[1]].ravel(), img[b[0]: h - b[0], w - b[1]:].ravel()])
    centre = (float(np.median(img[h // 3: h - h // 3, w // 3: w - w // 3])) - float(np.median(ring))) / spread
    x = np.linspace(-1.0, 1.0, w)
    profile = -float(np.polyfit(x, np.median(img, axis=0), 2)[0]) / spread
    return {"bright": centre + profile, "centre": centre, "profile": profile,
            "median_position": float((p50 - p1) / spread)}


def xray_polarity(image: np.ndarray) -> dict:
    """The evidence on which way an X-ray's grey levels run (used by :func:`check_xray`).

    Two anatomical cues, each scaled by the image's 1-99 % range and positive when the
    attenuating body is *bright* (a line-integral image): ``centre``, the median of the
    central third minus the median of the outer eighth (a body attenuates more in its middle
    than at its edges or in the air around it); ``profile``, minus the curvature of the
    column profile (median over rows, quadratic fit over [-1, 1]; the trunk's thickness
    peaks in the middle); ``bright = centre + profile``. And ``median_position``, where
    the median lies in the 1-99 % range: a raw detector image is ``I0 exp(-p)``, which
    crowds the body into the dark end (below ~0.4 in all simulated images).

    Collimator shutters and the round field of an image intensifier put structureless,
    fully attenuated regions at the borders, which read like air of the opposite polarity.
    So constant border rows/columns (masks, padding) are dropped, a round field's constant
    surround is set to the median of the field (:func:`_round_field_surround`), and the cues are computed
    twice: on the whole image (``bright``) and on its central 70 % (``bright_window``: inside
    the inscribed circle, clear of shutters). ``bright_min`` / ``bright_max`` are the smaller
    and larger of the two; a decision needs both to agree. Images are sampled to at most
    256 pixels a side.

    Returns:
        {"bright", "centre", "profile", "median_position", "bright_window", "bright_min",
        "bright_max", "decided"}; ``decided`` is False when the image has too little range.
    """
    img = _sample2d(image)
    img = _trim_flat_border(img, 1e-6 * max(float(np.ptp(img)), 1e-30))
    outside = _round_field_surround(img)
    if outside is not None:                   # structureless: neither body nor air; neutral grey
        img = np.where(outside, float(np.median(img[~outside])), img)
    h, w = img.shape
    whole = _cues(img)
    m_h, m_w = int(round(0.15 * h)), int(round(0.15 * w))
    win = _cues(img[m_h: h - m_h, m_w: w - m_w])
    if whole is None or win is None:
        return {"bright": 0.0, "centre": 0.0, "profile": 0.0, "median_position": 0.5, "bright_window": 0.0,
                "bright_min": 0.0, "bright_max": 0.0, "decided": False}
    return {**whole, "bright_window": win["bright"], "bright_min": min(whole["bright"], win["bright"]),
            "bright_max": max(whole["bright"], win["bright"]), "decided": True}


def check_xray(image, kind: str, field: str = "xray") -> list[str]:
    """Physical plausibility of one X-ray image ``[row, column]`` of kind ``kind``.

    Refuses: not 2-D; fewer than 32 pixels a side; NaN or infinite pixels; an empty (all
    zero) or constant image. ``line_integral``: a median above 20 or a maximum above 100
    with the body dark ("looks like detector intensities": -ln(I/I0) of a patient is 0 to
    ~10); with the body bright the same values are a rescaled log image: a warning.
    ``intensity``: more than 1 % of the pixels below -5 % of the bright level (photon counts
    cannot be negative).
    Warns: ``line_integral`` with more than 5 % of the pixels below -0.5 (negated or offset),
    or with values in 0..1.5 and the body dark (normalised intensities I/I0);
    ``intensity`` whose values (99th percentile 1.5-20, not integers, body not dark) look
    like line integrals; and, for both, a polarity that contradicts the kind (:func:`xray_polarity`):
    for line integrals, bright-body evidence below -0.1 on the whole image *and* on its central
    window; for intensities, a median above 0.6 of the range (not the dark-crowded histogram
    of ``I0 exp(-p)``) with a bright body on the whole image, or a median above 0.5 with
    bright-body evidence above +0.1 on both. Conservative: on the project's simulated images
    (lumbar CT and phantoms, both kinds, with and without noise, scatter, beam hardening)
    it stays silent, and it fires on the same images inverted.
    """
    L = LIMITS
    if kind not in ("line_integral", "intensity"):
        _fail("image_kind", f"must be 'line_integral' or 'intensity', got {kind!r}")
    a = np.asarray(image)
    if a.ndim != 2:
        _fail(field, f"expected a 2-D image [row, column], got shape {a.shape}")
    rows, cols = a.shape
    if min(rows, cols) < L["xray_min_pixels"]:
        _fail(field, f"{cols} x {rows} pixels; at least {L['xray_min_pixels']} a side are needed to see a vertebra")
    if a.dtype.kind not in "iuf":
        _fail(field, f"pixel type {a.dtype} is not a number")
    mn, mx = a.min(), a.max()
    if not (np.isfinite(mn) and np.isfinite(mx)):
        _fail(field, "contains NaN or infinite pixels")
    mn, mx = float(mn), float(mx)
    if mn == mx == 0.0:
        _fail(field, "is empty: every pixel is 0 (a constant image). Check the file (a failed export or an "
              "unexposed frame).")
    if mn == mx:
        _fail(field, f"is constant: every pixel is {mn:g}. Check the file (a failed export or a saturated frame).")
    warnings: list[str] = []
    warnings_scaled = None
    s = _sample2d(a)
    p1, p50, p99 = (float(x) for x in np.percentile(s, [1, 50, 99]))
    floaty = a.dtype.kind == "f" and not np.allclose(s, np.round(s))
    pol = xray_polarity(a)
    if kind == "line_integral":
        if p50 > L["li_refuse_median"] or mx > L["li_refuse_max"]:
            if pol["decided"] and pol["bright_min"] > 0.0:
                # bone bright, large values: a log image rescaled (e.g. a vendor's 12/16-bit log output)
                warnings_scaled = (f"{field}: values up to {mx:.5g} (median {p50:.4g}) with the body bright: a log "
                                   "image rescaled, not -ln(I/I0) itself? The 2-D/3-D registration compares images "
                                   "up to scale and offset and is unaffected; the learned method and the "
                                   "reconstructions need -ln(I/I0): divide the scale back out for them.")
            else:
                _fail(field, f"values up to {mx:.5g} (median {p50:.4g}) for image_kind line_integral; -ln(I/I0) "
                      "through a patient is 0 (air) to ~10: this looks like detector intensities; set image_kind to "
                      "intensity (raw values, bone dark). If it is a log image rescaled for display, divide it back "
                      "to -ln(I/I0).")
        neg = float(np.mean(s < L["li_negative_value"]))
        if neg > L["li_negative_warn_fraction"]:
            warnings.append(f"{field}: {neg:.0%} of the pixels are below {L['li_negative_value']:g} "
                            f"(minimum {mn:.3g}); line integrals -ln(I/I0) are >= 0 up to noise (0 in air). "
                            "The image may be negated, "
                            "offset or normalised to zero mean: give -ln(I/I0) (bone bright)")
    else:
        level = L["intensity_negative_level"] * max(p99, 0.0)
        neg = float(np.mean(s < -level)) if mn < 0 else 0.0
        if neg > L["intensity_negative_fraction"]:
            _fail(field, f"{neg:.0%} of the pixels are negative (minimum {mn:.4g}, 99th percentile {p99:.4g}) for "
                  "image_kind intensity; transmitted intensities cannot be negative beyond noise. If the image holds "
                  "line integrals or a processed (log, zero-mean) image, set image_kind to line_integral.")
    if warnings_scaled:
        warnings.append(warnings_scaled)
    if kind == "line_integral" and p99 <= L["li_intensity_like_p99"] and mn >= -0.1 and pol["bright"] < 0:
        warnings.append(f"{field}: inverted polarity? Values {mn:.3g} to {mx:.3g} with the body darker than its "
                        "surroundings look like normalised intensities I/I0 (0..1, bone dark) or an inverted image, "
                        "not line integrals (bone bright; -ln(I/I0) through a trunk reaches 4-8); set image_kind to "
                        "intensity, or invert the image back")
        pol["decided"] = False
    if kind == "intensity":
        lo, hi = L["intensity_li_like_max"]
        if lo < p99 <= hi and floaty and mn > -1.0 and pol["bright"] >= 0:
            pol["decided"] = False     # one warning for one cause
            warnings.append(f"{field}: values {mn:.3g} to {mx:.3g} (not integers, body not darker than its "
                            "surroundings) look like line integrals -ln(I/I0), not detector intensities; set "
                            "image_kind to line_integral if bone is bright")
    if pol["decided"]:
        T = L["polarity_warn"]
        what = (f"(bright-body evidence {pol['bright']:+.2f}, {pol['bright_window']:+.2f} in the central 70 %; "
                f"median at {pol['median_position']:.2f} of the range)")
        if kind == "line_integral" and pol["bright_max"] < -T:
            warnings.append(f"{field}: inverted polarity? The body looks dark (less in the middle than at the edges) "
                            f"{what}, but image_kind line_integral means bone bright. If this is a raw detector "
                            "image set image_kind to intensity; if it was inverted for display (MONOCHROME1), "
                            "invert it back.")
        q = pol["median_position"]
        if kind == "intensity" and ((q > L["intensity_compression_warn"] and pol["bright"] > 0)
                                    or (q > 0.5 and pol["bright_min"] > T)):
            warnings.append(f"{field}: inverted polarity? The body looks bright (more in the middle than at the "
                            f"edges) {what}, but image_kind intensity means bone dark. If this is a log image (bone "
                            "bright) set image_kind to line_integral; if it was inverted for display, invert it back.")
    return warnings


# ---------------------------------------------------------------------------- a case
def _attenuation_stats(img: np.ndarray, kind: str, i0: float | None) -> tuple[float, float | None]:
    """Two measures of how much an image attenuates, in the central 70 % of it (sampled to
    <= 256 pixels a side; collimator shutters at the borders, fully dark, would say nothing
    about the anatomy): the 90th percentile of -ln(I/I0) over every pixel, and the median
    over the body's pixels (above ``LIMITS["swap_body_min"]``; None when fewer than a
    twentieth are body). Metal (screws seen end-on, retractor blades) pulls the first up;
    air (a field that reaches past the scan, the body's edge) moves the second."""
    a = _sample2d(img)
    r, c = a.shape
    a = a[int(0.15 * r): r - int(0.15 * r) or None, int(0.15 * c): c - int(0.15 * c) or None]
    if kind == "intensity":
        a = -np.log(np.clip(a, i0 * 1e-6, None) / i0)
    body = a[a > LIMITS["swap_body_min"]]
    return float(np.percentile(a, 90)), (float(np.median(body)) if body.size >= 0.05 * a.size else None)


def check_xray_pair(xrays: Mapping[str, np.ndarray], kind: str) -> list[str]:
    """The two images as a pair: is the "ap" image really the AP?

    Through a trunk the lateral path (300-350 mm, left to right) is longer than the AP path
    (200-250 mm), so the lateral image attenuates more (:func:`_attenuation_stats`: its 90th
    percentile of -ln(I/I0), and its body's median). Warns "AP and lateral look swapped" when
    the AP's are higher by more than 0.5 on both: on the 250 cases of the development suites
    (lumbar CT and phantoms, with metal, a round field, a bending spine, a tenth of the dose,
    a field longer than the scan or not) this never fires, and it names 88 % of them with
    their images exchanged; either measure alone fired on two (the percentile with pedicle
    screws in the AP, the median with air past the scan's end; issue #18). For intensities
    both images are converted with one I0 (the larger 99.9th percentile), and only when
    they share a scale (99.9th percentiles within a factor of 1.5; exposure control may
    differ between views); images that are not in physical line-integral units (99th
    percentile below 1.5) are skipped.
    """
    if not all(k in xrays for k in ("ap", "lat")):
        return []
    ap, lat = _sample2d(xrays["ap"]), _sample2d(xrays["lat"])
    i0 = None
    if kind == "intensity":
        hi = [float(np.percentile(x, 99.9)) for x in (ap, lat)]
        if min(hi) <= 0 or max(hi) / min(hi) > 1.5:
            return []
        i0 = max(hi)
    elif min(float(np.percentile(x, 99)) for x in (ap, lat)) < LIMITS["li_intensity_like_p99"]:
        return []
    (p_ap, m_ap), (p_lat, m_lat) = _attenuation_stats(ap, kind, i0), _attenuation_stats(lat, kind, i0)
    margin = LIMITS["swap_margin"]
    if m_ap is not None and m_lat is not None and p_ap - p_lat > margin and m_ap - m_lat > margin:
        return [f"views: AP and lateral look swapped: the 'ap' image attenuates more than the 'lat' image (-ln(I/I0) "
                f"90th percentile {p_ap:.2f} vs {p_lat:.2f}, the body's median {m_ap:.2f} vs {m_lat:.2f}), but "
                "through a trunk the lateral path (300-350 mm) is longer than the AP path (200-250 mm). Check that "
                "the AP image is the one of views.ap (xray_ap) and the lateral the one of views.lat."]
    return []


def _label_centroid(seg, label: int):
    """Centroid (CT mm) of ``label`` from a strided sample (the full array when too sparse);
    None when the label is absent."""
    arr = np.asarray(seg.array)
    step = max(1, int(math.ceil((arr.size / _SAMPLE_VOXELS) ** (1 / 3))))
    for st in ((step, 1) if step > 1 else (1,)):
        kji = np.argwhere(arr[::st, ::st, ::st] == label)
        if len(kji) >= (64 if st > 1 else 1):
            return seg.index_to_world((kji.mean(axis=0) * st)[::-1])
    return None


def check_case(case) -> list[str]:
    """All of the above on a :class:`~RadGSRegLib.io.Case`, plus how its parts fit together.

    Runs :func:`check_ct`, :func:`check_view` on each view, :func:`check_pair`,
    :func:`check_xray` on each image (with the case's ``image_kind``) and
    :func:`check_xray_pair` (unless the geometry already looks swapped), and refuses an X-ray
    whose shape differs from its view's size, a segmentation off the CT grid, a
    ``vertebra_label`` absent from the segmentation and a non-rigid initial guess. Warns
    when the vertebra (label centroid, or the CT's centre without a label) projects outside
    a detector at the initial guess (or, without one, at the nominal pose: centroid at the
    isocentre, axes aligned).

    Returns:
        every warning, in order (CT, views, pair, images, placement).
    Raises:
        PlausibilityError: for the first input that cannot be right (``.field`` names it).
    """
    warnings: list[str] = []
    kind = case.image_kind
    if kind not in ("line_integral", "intensity"):
        _fail("image_kind", f"must be 'line_integral' or 'intensity', got {kind!r}")
    warnings += check_ct(case.ct, "ct")
    for vn in ("ap", "lat"):
        if vn not in case.views:
            _fail(f"views.{vn}", f"missing (views present: {sorted(case.views)})")
        warnings += check_view(case.views[vn], vn)
    warnings += check_pair(case.views)
    for vn in ("ap", "lat"):
        if vn not in case.xrays:
            _fail(f"views.{vn}.image", "missing: no X-ray for this view")
        img, view = np.asarray(case.xrays[vn]), case.views[vn]
        if img.shape != view.shape:
            shape = f"{img.shape[1]} columns x {img.shape[0]} rows" if img.ndim == 2 else f"shape {img.shape}"
            _fail(f"views.{vn}.size", f"the image is {shape}, the geometry says {view.size[0]} x {view.size[1]}")
        warnings += check_xray(img, kind, f"views.{vn}.image")
    return warnings + check_consistency(case, warnings)


def check_consistency(case, prior: list = ()) -> list[str]:
    """The part of :func:`check_case` about how a case's parts fit together (the parts
    themselves already checked, e.g. by :func:`~RadGSRegLib.io.read_case` as it reads them,
    with the warnings ``prior``): the two images as a pair (unless ``prior`` already says they
    look swapped), the segmentation on the CT grid with its label, a rigid initial guess, and
    the vertebra projecting onto each detector. Returns its warnings; raises
    :class:`PlausibilityError` as :func:`check_case` does."""
    warnings: list[str] = []
    kind = case.image_kind
    if not any("look swapped" in m for m in prior):          # one warning for one cause
        warnings += check_xray_pair(case.xrays, kind)

    label = case.vertebra_label
    centroid = None
    if case.seg is not None:
        if not case.seg.same_grid(case.ct):
            _fail("segmentation", f"not on the CT grid (labels {case.seg.size}, CT {case.ct.size}; origin, spacing "
                  "and direction must match)")
        if label is None:
            _fail("vertebra_label", "missing: a segmentation needs the label of the target vertebra")
        centroid = _label_centroid(case.seg, int(label))
        if centroid is None:
            _fail("vertebra_label", f"label {label} is absent from the segmentation")
    if centroid is None:
        centroid = case.ct.corners().mean(axis=0)
    if case.initial_guess is not None:
        T = np.asarray(case.initial_guess, dtype=np.float64)
        if not is_rigid(T, tol=1e-4):
            _fail("initial_guess.T_ct_to_carm", "not a rigid transform (orthonormal rotation, last row 0 0 0 1)")
        where = "at the initial guess"
    else:
        T = translation(-centroid)
        where = "at the nominal pose (vertebra centroid at the isocentre)"
    p = apply(T, centroid)
    what = f"the vertebra (label {label})" if label is not None else "the CT's centre"
    for vn in ("ap", "lat"):
        view = case.views[vn]
        c, r = view.project(p)
        cols, rows = view.size
        if not (-0.5 <= c <= cols - 0.5 and -0.5 <= r <= rows - 0.5):
            warnings.append(f"views.{vn}: {what} projects to pixel ({c:.0f}, {r:.0f}) {where}, outside the "
                            f"{cols} x {rows} detector; the registration starts with it out of view (check "
                            "initial_guess and the geometry)")
    return warnings
