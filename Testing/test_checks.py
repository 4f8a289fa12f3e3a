"""Physical plausibility of the inputs (RadGSRegLib.checks): for each check, inputs it must
refuse, inputs it must warn about, and realistic inputs it must pass silently: simulated
AP + lateral pairs of the bundled lumbar CT and of phantoms, both image kinds, with and
without noise and scatter, and the case folders the command line writes (the false-positive
guard). Small detectors (128 px) and 3-4 mm voxels keep it fast."""
from dataclasses import replace

import numpy as np
import pytest

from RadGSRegLib import checks
from RadGSRegLib.checks import (PlausibilityError, check_case, check_ct, check_pair, check_view, check_xray,
                                check_xray_pair, xray_polarity)
from RadGSRegLib.errors import InputError
from RadGSRegLib.geometry import View, biplanar_views, c_arm_view, translation
from RadGSRegLib.volume import Volume, affine_from

KINDS = ("line_integral", "intensity")


# ------------------------------------------------------------------ realistic inputs
@pytest.fixture(scope="module")
def lumbar():
    from RadGSRegLib.io import read_label_map, read_volume
    from RadGSRegLib.sample_data import lumbar_ct

    sd = lumbar_ct()
    return read_volume(sd.ct), read_label_map(sd.seg)


def _sims():
    from RadGSRegLib.simulate import XraySimConfig

    return {"default": XraySimConfig, "ideal": XraySimConfig.ideal,
            "no scatter": lambda output: XraySimConfig(output=output, scatter_to_primary=0.0),
            "low dose": lambda output: XraySimConfig(output=output, photons_per_mm2=100.0, scatter_to_primary=0.6)}


@pytest.fixture(scope="module")
def simulated(lumbar, small_phantom):
    """Cases of the lumbar CT (L1..S1) and of a 4 mm phantom (L1, L3, L5), both kinds, with
    the default physics and other settings: [(name, Case)]."""
    from RadGSRegLib.cases import CaseGenConfig, make_case
    from RadGSRegLib.levels import level_id

    sims = _sims()
    out, i = [], 0
    plan = [(lumbar, lv, "default") for lv in ("L1", "L2", "L3", "L4", "L5", "S1")]
    plan += [(lumbar, "L3", s) for s in ("ideal", "no scatter", "low dose")]
    plan += [(small_phantom, lv, "default") for lv in ("L1", "L3", "L5")] + [(small_phantom, "L2", "ideal")]
    for (ct, seg), level, sim in plan:
        for kind in KINDS:
            i += 1
            cfg = CaseGenConfig(pixels=128, sim=sims[sim](output=kind), seed=i)
            case = make_case(ct, seg, level, cfg, np.random.default_rng(i), label=level_id(level))
            out.append((f"{'lumbar' if ct is lumbar[0] else 'phantom'} {level} {sim} {kind}", case))
    return out


def test_simulated_cases_pass_silently(simulated):
    for name, case in simulated:
        assert check_case(case) == [], name


def test_polarity_margins_on_simulated_images(simulated):
    """The bright-body evidence keeps a margin from both warning thresholds (whole image and
    central window must both contradict the kind for a warning)."""
    T = checks.LIMITS["polarity_warn"]
    for name, case in simulated:
        for vn, img in case.xrays.items():
            p = xray_polarity(img)
            if case.image_kind == "line_integral":
                assert p["bright"] > 0.05 and p["bright_max"] > -T + 0.1, (name, vn, p)
            else:
                assert p["bright"] < 0 and p["bright_min"] < T - 0.1 and p["median_position"] < 0.45, (name, vn, p)


def test_inverted_and_negated_images_are_flagged(simulated):
    """Inverted images (max - image) are caught: every intensity image; line integrals where
    the anatomy decides (the central window of an AP full of bowel gas may not; measured:
    192 of 210 over a wider simulated set). Negated line integrals are always caught."""
    hits = {"line_integral": [], "intensity": []}
    for name, case in simulated:
        for vn, img in case.xrays.items():
            w = check_xray(img.max() - img, case.image_kind, f"views.{vn}.image")
            assert all(m.startswith(f"views.{vn}.image: ") for m in w)
            hits[case.image_kind].append(any("inverted polarity?" in m for m in w))
            if case.image_kind == "line_integral":
                w = check_xray(-img, "line_integral", "x")
                assert any("below -0.5" in m for m in w), (name, vn, w)
            else:
                with pytest.raises(PlausibilityError, match="negative"):
                    check_xray(-img, "intensity", "x")
    assert all(hits["intensity"])
    assert np.mean(hits["line_integral"]) >= 0.85, hits


def test_masked_borders_do_not_fake_a_polarity(simulated):
    """Collimator shutters and an image intensifier's round field (fully attenuated, noisy)
    read like air of the other polarity at the borders: the central window keeps them from
    raising a polarity warning."""
    rng = np.random.default_rng(0)
    for name, case in simulated:
        for vn, img in case.xrays.items():
            h, w = img.shape
            dark = img.max() if case.image_kind == "line_integral" else img.min()   # most attenuated
            noise = lambda n: rng.normal(0, 0.02 * np.ptp(img), n)   # noqa: E731
            shutter = img.copy()
            shutter[:, : w // 7] = dark + noise((h, w // 7))
            shutter[:, w - w // 7:] = dark + noise((h, w // 7))
            yy, xx = np.mgrid[:h, :w]
            circle = img.copy()
            m = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 > (h / 2) ** 2
            circle[m] = dark + noise(m.sum())
            for masked in (shutter, circle):
                masked = np.abs(masked) if case.image_kind == "intensity" else masked
                assert not any("polarity" in m for m in check_xray(masked, case.image_kind, "x")), (name, vn)


def test_wrong_image_kind_is_named(simulated):
    for name, case in simulated:
        for vn, img in case.xrays.items():
            if case.image_kind == "intensity":
                with pytest.raises(PlausibilityError,
                                   match="looks like detector intensities; set image_kind to intensity"):
                    check_xray(img, "line_integral", f"views.{vn}.image")
                # normalised I/I0 labelled as line integrals
                w = check_xray(img / 4095.0, "line_integral", "x")
                assert any("normalised intensities" in m for m in w), (name, vn, w)
            else:
                try:
                    w = check_xray(img, "intensity", "x")
                    assert any("look like line integrals" in m for m in w), (name, vn, w)
                except PlausibilityError as e:    # line integrals with noise dip below 0
                    assert "set image_kind to line_integral" in str(e)


def test_generated_case_folders_pass(tmp_path, small_phantom):
    """What the command line writes: sample-case (the real CT, 48 px) and simulate-cases
    (phantom, 64 px, as Testing/test_cases.py generates), read back with read_case."""
    from RadGSRegLib.cli import main
    from RadGSRegLib.io import read_case, write_volume

    for kind in KINDS:
        assert main(["sample-case", "--level", "L2", "--out", str(tmp_path / kind), "--pixels", "48",
                     "--image-kind", kind, "--seed", "3"]) == 0
        assert check_case(read_case(tmp_path / kind)) == []
    ct, seg = small_phantom
    write_volume(ct, tmp_path / "ct.nrrd")
    write_volume(seg, tmp_path / "seg.nii.gz")
    assert main(["simulate-cases", "--ct", str(tmp_path / "ct.nrrd"), "--seg", str(tmp_path / "seg.nii.gz"),
                 "--levels", "L2,L4", "--n", "2", "--out", str(tmp_path / "cases"), "--pixels", "64",
                 "--seed", "5"]) == 0
    for i in range(2):
        assert check_case(read_case(tmp_path / "cases" / f"case_{i:03d}")) == []


# ------------------------------------------------------------------ views
def _view(**kw) -> View:
    base = biplanar_views(pixels=128)["ap"]
    return replace(base, **kw)


@pytest.mark.parametrize("view", [
    *biplanar_views().values(), *biplanar_views(pixels=128).values(), *biplanar_views(pixels=48).values(),
    c_arm_view(0, sdd=1020, sid=600, pixels=1536, pixel_spacing=0.194),     # Siemens Cios Fusion (DeepFluoro)
    c_arm_view(90, sdd=1000, sid=650, pixels=1024, pixel_spacing=0.3),      # LAO 90, 12" image intensifier
    c_arm_view(-30, sdd=1200, sid=785, pixels=(1240, 960), pixel_spacing=0.308),  # angiography C-arm
])
def test_real_c_arm_geometries_pass(view):
    assert check_view(view, "ap") == []


def test_source_at_the_isocentre_is_refused():
    with pytest.raises(PlausibilityError, match=r"^views\.ap\.source: the source is 0\.0 mm from the isocentre") as e:
        check_view(_view(source=np.zeros(3)), "ap")
    assert isinstance(e.value, InputError) and e.value.field == "views.ap.source"


def test_detector_between_source_and_patient_is_refused():
    v = biplanar_views(pixels=128)["ap"]
    moved = replace(v, detector_origin=v.detector_origin + [0, 724, 0])    # detector plane at y = +300
    with pytest.raises(PlausibilityError,
                       match=r"views\.ap\.detector_origin: the detector plane lies between the source"):
        check_view(moved, "ap")
    # the whole C-arm moved so that the isocentre lies behind the source
    behind = replace(v, source=v.source - [0, 900, 0], detector_origin=v.detector_origin - [0, 900, 0])
    with pytest.raises(PlausibilityError, match=r"views\.ap\.source: the isocentre is behind the source"):
        check_view(behind, "ap")


@pytest.mark.parametrize("kw, field, what", [
    (dict(sdd=1000, sid=150), "source", "magnification"),
    (dict(sdd=3500, sid=2600), "source", "at most 2500"),
    (dict(sdd=4000, sid=2000), "detector_origin", "at most 3000"),
    (dict(pixels=100, pixel_spacing=0.3), "size", "30.0 mm along u"),
    (dict(pixels=(976, 2100), pixel_spacing=0.3), "size", "630.0 mm along v"),
    (dict(pixels=9000, pixel_spacing=0.03), "size", "at most 8192"),
    (dict(pixels=20000, pixel_spacing=0.01), "size", "at most 8192"),
    (dict(pixels=1000, pixel_spacing=0.01), "pixel_spacing", "0.01 mm"),
    (dict(pixels=20, pixel_spacing=15.0), "pixel_spacing", "15 mm"),
])
def test_impossible_geometry_is_refused(kw, field, what):
    with pytest.raises(PlausibilityError, match=rf"^views\.lat\.{field}: .*{what}"):
        check_view(c_arm_view(-90, **kw), "lat")


def test_unusual_geometry_warns():
    w = check_view(c_arm_view(0, sdd=1050, sid=1000, pixels=128, pixel_spacing=2.0), "ap")
    assert len(w) == 1 and w[0].startswith("views.ap: magnification SDD/SID = 1.05 is unusual")
    w = check_view(c_arm_view(0, sdd=1300, sid=450, pixels=128, pixel_spacing=2.0), "ap")
    assert len(w) == 1 and "magnification SDD/SID = 2.89" in w[0]
    v = biplanar_views(pixels=128)["ap"]
    w = check_view(replace(v, detector_origin=v.detector_origin + 400 * v.u), "ap")
    assert len(w) == 1 and "the isocentre projects to pixel" in w[0] and "outside the 128 x 128 detector" in w[0]
    tilted = c_arm_view(0, pixels=128, pixel_spacing=2.0)
    R = np.array([[1, 0, 0], [0, np.cos(0.5), -np.sin(0.5)], [0, np.sin(0.5), np.cos(0.5)]])   # 29 deg about x
    w = check_view(replace(tilted, u=R @ tilted.u, v=R @ tilted.v), "ap")
    assert any(m.startswith("views.ap.detector_u: the detector is tilted 29 deg") for m in w)


# ------------------------------------------------------------------ the pair
def test_pair():
    vs = biplanar_views(pixels=128)
    assert check_pair(vs) == []
    assert check_pair({"ap": c_arm_view(0, pixels=64), "lat": c_arm_view(90, pixels=64)}) == []   # source at -x
    with pytest.raises(PlausibilityError, match=r"^views\.lat: is the same view as views\.ap"):
        check_pair({"ap": vs["ap"], "lat": vs["ap"]})
    with pytest.raises(PlausibilityError,
                       match=r"^views\.lat: looks along the same line as views\.ap \(central rays 0\.0"):
        check_pair({"ap": vs["ap"], "lat": c_arm_view(180, pixels=128)})                       # AP + PA
    with pytest.raises(PlausibilityError, match=r"^views\.lat: missing"):
        check_pair({"ap": vs["ap"]})
    w = check_pair({"ap": vs["ap"], "lat": c_arm_view(-20, pixels=128)})
    assert w == ["views: the AP and lateral central rays are only 20 deg apart; depth along the rays will be "
                 "poorly determined (biplanar set-ups use ~90 deg)",
                 "views.lat: its central ray runs along LPS y (anterior-posterior), not x (left-right) as a lateral "
                 "view's does; check the geometry or the view names"]
    w = check_pair({"ap": vs["lat"], "lat": vs["ap"]})
    assert len(w) == 1 and "AP and lateral look swapped" in w[0]
    w = check_pair({"ap": vs["ap"], "lat": vs["ap"].transformed(np.array(
        [[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]]))})                          # looks along z
    assert w == ["views.lat: its central ray runs along LPS z (head-foot), not x (left-right) as a lateral "
                 "view's does; check the geometry or the view names"]


# ------------------------------------------------------------------ CT
def _ct(arr, spacing=(3.0, 3.0, 3.0)):
    return Volume(np.asarray(arr), affine_from([0, 0, 0], spacing))


def test_realistic_cts_pass(lumbar, small_phantom):
    ct = lumbar[0]
    assert check_ct(ct) == [] and check_ct(small_phantom[0]) == []
    assert check_ct(_ct(np.rint(ct.array).astype(np.int16))) == []
    padded = ct.array.copy()
    padded[:, :5] = -3024                       # scanner padding outside the reconstruction circle
    assert check_ct(_ct(padded)) == []
    padded[:, :5] = -32768
    assert check_ct(_ct(padded)) == []


def test_impossible_cts_are_refused(lumbar):
    a = lumbar[0].array
    cases = [
        (np.full((20, 20, 20), 40.0, np.float32), "every voxel is 40"),
        (np.zeros((20, 20, 20), np.int16), "every voxel is 0"),
        ((a - a.min()) / np.ptp(a), r"looks like a normalised image"),
        (np.clip((a + 1000) / 8, 0, 255).astype(np.uint8), r"looks like an 8-bit"),
        (np.clip(a, -1000, 80), r"no voxel is above 100 HU, so there is no bone"),
        (np.where(np.arange(a.size).reshape(a.shape) == 7, np.nan, a), "NaN or infinite"),
        (np.where(np.arange(a.size).reshape(a.shape) == 7, np.inf, a), "NaN or infinite"),
        (a[:10], r"122 x 101 x 10 voxels; at least 16"),
    ]
    for arr, what in cases:
        with pytest.raises(PlausibilityError, match=rf"^ct: .*{what}"):
            check_ct(_ct(arr))
    for sp, what in (((0.05, 0.05, 0.05), r"\[0\.05, 0\.05, 0\.05\]"), ((3.0, 3.0, 12.0), r"\[3\.0, 3\.0, 12\.0\]")):
        with pytest.raises(PlausibilityError, match=rf"^ct: voxel size {what} mm; expected 0\.1-10"):
            check_ct(_ct(a, sp))


def test_unusual_cts_warn(lumbar):
    a = lumbar[0].array
    w = check_ct(_ct(np.clip(a, -1024, None) + 1024))                     # stored values without the rescale intercept
    assert len(w) == 1 and w[0].startswith("ct: no voxel is negative") and "subtract 1024" in w[0]
    raw = np.clip(a, -1024, None) + 1024
    raw[:, :4, :] = -2000                                                  # GE-style padding around it
    w = check_ct(_ct(raw))
    assert len(w) == 1 and "outside the padding" in w[0] and "subtract 1024" in w[0]
    w = check_ct(_ct(np.clip(a, -200, None)))           # field of view inside the body
    assert len(w) == 1 and w[0].startswith("ct: no voxel below -500 HU (minimum -200)")
    b = a.copy()
    b[0, 0, 0] = 40000
    w = check_ct(_ct(b))
    assert len(w) == 1 and "beyond the extended Hounsfield scale" in w[0]
    w = check_ct(_ct(a[:, :, :16], (1.0, 1.0, 1.0)))
    assert len(w) == 1 and "the field of view is only [16.0, 101.0, 112.0] mm" in w[0]


# ------------------------------------------------------------------ X-ray basics
def test_impossible_xrays_are_refused():
    ok = np.random.default_rng(0).uniform(0, 5, (64, 64)).astype(np.float32)
    for kind in KINDS:
        for img, what in ((np.zeros((64, 64), np.float32), "is empty: every pixel is 0"),
                          (np.full((64, 64), 7.0), "is constant: every pixel is 7"),
                          (np.where(np.eye(64) > 0, np.nan, ok), "contains NaN or infinite"),
                          (ok[:20], "64 x 20 pixels; at least 32"),
                          (ok[None], r"expected a 2-D image")):
            with pytest.raises(PlausibilityError, match=rf"^views\.ap\.image: {what}"):
                check_xray(img, kind, "views.ap.image")
    with pytest.raises(PlausibilityError, match=r"^image_kind: must be"):
        check_xray(ok, "log", "x")
    # a zero-mean (standardised) image is no intensity
    with pytest.raises(PlausibilityError, match=r"negative .* set image_kind to line_integral"):
        check_xray(ok - ok.mean(), "intensity", "x")
    # raw 12-bit values with a few noisy negatives after offset correction are fine
    raw = np.random.default_rng(1).uniform(0, 4095, (64, 64))
    raw.flat[:10] = -3
    check_xray(raw, "intensity", "x")


# ------------------------------------------------------------------ the case
def test_swapped_images_are_named(simulated):
    """The lateral path through a trunk is longer than the AP path: an 'ap' image that
    attenuates clearly more than the 'lat' one is the lateral (images exchanged, geometry not)."""
    for name, case in simulated:
        swapped = replace(case, xrays={"ap": case.xrays["lat"], "lat": case.xrays["ap"]})
        w = check_xray_pair(swapped.xrays, case.image_kind)
        if case.image_kind == "line_integral":
            assert len(w) == 1 and w[0].startswith("views: AP and lateral look swapped: the 'ap' image attenuates "
                                                   "more than the 'lat' image"), (name, w)
            assert check_case(swapped) == w
    # images of different scales (exposure control) are not compared as intensities
    x = next(c for n, c in simulated if n.endswith("intensity")).xrays
    assert check_xray_pair({"ap": x["lat"] * 3.0, "lat": x["ap"]}, "intensity") == []


def test_the_bad_input_table_case():
    """The case of Testing/bad_inputs.py (4 mm phantom, L3, 96 px): its AP inverted gets a
    polarity warning, its images exchanged a "swapped" warning."""
    from RadGSRegLib.cases import CaseGenConfig, make_case
    from RadGSRegLib.phantom import PhantomConfig, make_phantom

    ct, seg = make_phantom(PhantomConfig(spacing=(4.0, 4.0, 4.0), seed=1))
    case = make_case(ct, seg, "L3", CaseGenConfig(rot_deg=3.0, trans_mm=6.0, pixels=96, seed=3),
                     np.random.default_rng(3))
    assert check_case(case) == []
    ap = case.xrays["ap"]
    w = check_case(replace(case, xrays={**case.xrays, "ap": ap.max() - ap}))
    assert len(w) == 1 and w[0].startswith("views.ap.image: inverted polarity?")
    w = check_case(replace(case, xrays={"ap": case.xrays["lat"], "lat": ap}))
    assert len(w) == 1 and "AP and lateral look swapped" in w[0]


def test_case_level_checks(simulated):
    case = next(c for n, c in simulated if n.startswith("phantom"))
    assert check_case(case) == []
    bad = replace(case, xrays={**case.xrays, "lat": case.xrays["lat"][:, :100]})
    with pytest.raises(PlausibilityError,
                       match=r"^views\.lat\.size: the image is 100 columns x 128 rows, the geometry says 128 x 128"):
        check_case(bad)
    with pytest.raises(PlausibilityError, match=r"^vertebra_label: label 99 is absent"):
        check_case(replace(case, vertebra_label=99))
    off = Volume(case.seg.array, case.seg.affine @ translation([3.0, 0, 0]))
    with pytest.raises(PlausibilityError, match=r"^segmentation: not on the CT grid"):
        check_case(replace(case, seg=off))
    with pytest.raises(PlausibilityError, match=r"^views\.ap\.source"):
        check_case(replace(case, views={**case.views, "ap": replace(case.views["ap"], source=np.array([0, 50.0, 0]))}))
    # an initial guess 300 mm away: the vertebra is out of both views
    w = check_case(replace(case, initial_guess=translation([300.0, 300.0, 0]) @ case.initial_guess))
    assert len(w) == 2 and all("outside the 128 x 128 detector" in m and "at the initial guess" in m for m in w)
    assert w[0].startswith("views.ap: the vertebra (label")
    # without an initial guess: the nominal pose (vertebra at the isocentre) is in view
    assert check_case(replace(case, initial_guess=None)) == []
    # without a segmentation: the CT's centre
    assert check_case(replace(case, seg=None, vertebra_label=None, initial_guess=None)) == []
    # warnings of every part come back together
    w = check_case(replace(case, ct=Volume(np.clip(case.ct.array, -200, None), case.ct.affine),
                           views={"ap": case.views["lat"], "lat": case.views["ap"]},
                           xrays={"ap": case.xrays["lat"], "lat": case.xrays["ap"]}))
    assert [m.split(":")[0] for m in w] == ["ct", "views"]


def test_rescaled_log_images_warn_and_shutters_do_not_fake_a_swap(simulated):
    """A vendor's log image stored as 12/16-bit (bone bright, large values) is a warning,
    not a refusal (NCC is scale-invariant); detector intensities labelled as line integrals
    (bone dark) stay refused. Dark collimator shutters on one view do not make it 'attenuate
    more' (the swap check looks at the centre)."""
    for name, case in simulated:
        if case.image_kind != "line_integral" or "ideal" in name:
            continue
        img = case.xrays["ap"]
        w = check_xray(img * 4000.0 + 100.0, "line_integral", "views.ap.image")
        assert any("rescaled" in x for x in w), (name, w)
        with pytest.raises(PlausibilityError, match="looks like detector intensities"):
            check_xray(np.exp(-img) * 4095.0, "line_integral", "views.ap.image")
        shut = case.xrays["ap"].copy()
        shut[:, : shut.shape[1] // 8] = shut.max() + 6.0          # shutters: no photons, -ln huge
        shut[:, -shut.shape[1] // 8:] = shut.max() + 6.0
        assert check_xray_pair({"ap": shut, "lat": case.xrays["lat"]}, "line_integral") == [], name


def test_a_small_round_field_does_not_fake_a_polarity(simulated):
    """An image intensifier's field smaller than the central window: its constant black
    surround (no counts: the maximum of a line integral, 0 of an intensity) is not read as
    air; the same images inverted are still flagged."""
    hits = []
    for name, case in simulated:
        for vn, img in case.xrays.items():
            h, w = img.shape
            yy, xx = np.mgrid[:h, :w]
            out = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 > (0.35 * w) ** 2     # a 70 % field
            black = img.max() * 1.5 if case.image_kind == "line_integral" else 0.0
            field = np.where(out, black, img).astype(np.float32)
            assert not [m for m in check_xray(field, case.image_kind, "x") if "polarity" in m], (name, vn)
            if case.image_kind == "intensity":
                inv = np.where(out, 0.0, img.max() - img).astype(np.float32)
                hits.append(any("inverted polarity?" in m for m in check_xray(inv, "intensity", "x")))
    assert np.mean(hits) >= 0.85, hits


def test_metal_and_air_past_the_scan_do_not_read_as_swapped_views(lumbar):
    """The swap check needs both of its measures (issue #18): pedicle screws, a K-wire and
    retractor blades in the AP (they raised its 90th percentile 0.68 above the lateral's)
    and a field reaching past the scan's end into air (the lateral's body median 1.0 below
    the AP's) each fool one measure alone: the pair as it is passes (clean pairs exchanged
    are still named: test_swapped_images_are_named)."""
    from RadGSRegLib.cases import CaseGenConfig, make_case
    from RadGSRegLib.checks import _attenuation_stats
    from RadGSRegLib.instruments import InstrumentsConfig
    from RadGSRegLib.levels import level_id

    ct, seg = lumbar
    metal = CaseGenConfig(pixels=128, seed=41, instruments=InstrumentsConfig(screws="both", kwires=1, retractors=2))
    air = CaseGenConfig(pixels=128, seed=43, beyond_ct_mm=0.0)
    for cfg, fooled in ((metal, 0), (air, 1)):
        case = make_case(ct, seg, "L1", cfg, np.random.default_rng(cfg.seed), label=level_id("L1"))
        ap, lat = (_attenuation_stats(case.xrays[k], "line_integral", None) for k in ("ap", "lat"))
        assert ap[fooled] - lat[fooled] > 0.5                    # that measure alone would have warned
        assert check_xray_pair(case.xrays, case.image_kind) == []
