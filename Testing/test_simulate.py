import numpy as np
import pytest

from RadGSRegLib.drr import DRR
from RadGSRegLib.geometry import biplanar_views, translation
from RadGSRegLib.simulate import XraySimConfig, beyond_ct, formation, simulate_xrays, split_soft_bone
from RadGSRegLib.xray import as_line_integral, resize_view_image


@pytest.fixture(scope="module")
def setup(small_phantom):
    ct, seg = small_phantom
    T = translation(-seg.label_centroid(29))
    return ct, seg, T, list(biplanar_views(pixels=48).values())


def test_split_soft_bone_sums_to_mu():
    hu = np.array([-1000.0, -100.0, 50.0, 100.0, 400.0, 1500.0])
    s, b = split_soft_bone(hu)
    assert np.allclose(s + b, 0.02 * (1 + hu / 1000))
    assert np.all(b[:4] == 0) and np.all(b[4:] > 0)


def test_ideal_config_is_the_plain_drr(setup):
    ct, _, T, views = setup
    xr = simulate_xrays(ct, views, T, XraySimConfig.ideal())
    ref = DRR.from_ct(ct).render(views, T).numpy()
    assert np.allclose(xr["ap"], ref[0], atol=1e-4) and np.allclose(xr["lat"], ref[1], atol=1e-4)


def test_beam_hardening_lowers_thick_bone():
    L_s, L_b = np.full((4, 4), 4.0), np.linspace(0, 2, 16).reshape(4, 4)
    view = biplanar_views(pixels=4)["ap"]
    rng = np.random.default_rng(0)
    on = formation(L_s, L_b, view, XraySimConfig(photons_per_mm2=None, scatter_to_primary=0, blur_sigma_mm=0), rng)
    off = formation(L_s, L_b, view, XraySimConfig(beam_hardening=False, photons_per_mm2=None, scatter_to_primary=0,
                                                  blur_sigma_mm=0), rng)
    # polychromatic: sub-linear growth with bone thickness (the beam hardens)
    d_on, d_off = np.diff(on.ravel()), np.diff(off.ravel())
    assert np.all(d_on > 0) and np.all(d_on < d_off + 1e-9)
    assert np.all(np.diff(d_on) < 1e-9)


def test_noise_follows_dose(setup):
    L = np.full((64, 64), 3.0)
    view = biplanar_views(pixels=64, detector_mm=64.0)["ap"]   # 1 mm pixels
    std = {}
    for dose in (1e2, 1e4):
        cfg = XraySimConfig(beam_hardening=False, photons_per_mm2=dose, scatter_to_primary=0, blur_sigma_mm=0)
        img = formation(L, np.zeros_like(L), view, cfg, np.random.default_rng(0))
        assert abs(img.mean() - 3.0) < 0.05
        std[dose] = img.std()
    # exposure control: `dose` photons per 1 mm pixel behind the patient; Poisson: std ~ 1/sqrt(dose)
    assert std[1e2] / std[1e4] == pytest.approx(10.0, rel=0.15)
    assert std[1e2] == pytest.approx(1 / np.sqrt(1e2), rel=0.15)


def test_exposure_control_evens_out_thickness():
    view = biplanar_views(pixels=64, detector_mm=64.0)["ap"]
    cfg = XraySimConfig(beam_hardening=False, photons_per_mm2=400, scatter_to_primary=0, blur_sigma_mm=0)
    thin = formation(np.full((64, 64), 2.0), np.zeros((64, 64)), view, cfg, np.random.default_rng(0))
    thick = formation(np.full((64, 64), 6.0), np.zeros((64, 64)), view, cfg, np.random.default_rng(0))
    assert thin.std() == pytest.approx(thick.std(), rel=0.15)


def test_scatter_lowers_contrast_and_blur_smooths(setup):
    ct, _, T, views = setup
    base = dict(beam_hardening=False, photons_per_mm2=None)
    clean = simulate_xrays(ct, views, T, XraySimConfig(scatter_to_primary=0, blur_sigma_mm=0, **base))["ap"]
    scat = simulate_xrays(ct, views, T, XraySimConfig(scatter_to_primary=0.5, blur_sigma_mm=0, **base))["ap"]
    assert scat.std() < clean.std()              # additive haze flattens the log image
    assert np.all(scat <= clean + 1e-5)          # more photons -> smaller line integral
    blur = simulate_xrays(ct, views, T, XraySimConfig(scatter_to_primary=0, blur_sigma_mm=4.0, **base))["ap"]
    assert np.abs(np.diff(blur, axis=1)).mean() < np.abs(np.diff(clean, axis=1)).mean()


def test_scatter_comes_from_what_the_beam_crosses_and_sets_the_central_ratio():
    """Scatter: each ray scatters in proportion to the primary it delivers times its
    attenuation. Under a uniform body the central third's scatter / primary is the set SPR;
    beside a body, an open-air region gains only the
    body's scatter that reaches it, none of its own (the old model, a blurred copy of the
    primary, made open air the strongest scatterer)."""
    from RadGSRegLib.geometry import View

    view = View(source=np.array([0.0, -700, 0]), detector_origin=np.array([-63.5, 424, -63.5]),
                u=np.array([1.0, 0, 0]), v=np.array([0, 0, 1.0]), pixel_spacing=(1.0, 1.0), size=(128, 128))
    cfg = XraySimConfig(beam_hardening=False, photons_per_mm2=None, scatter_to_primary=0.3, blur_sigma_mm=0)
    p = np.full((128, 128), 4.0)
    img = formation(p, np.zeros_like(p), view, cfg, np.random.default_rng(0))
    spr = np.exp(4.0 - img) - 1.0                                # scatter / primary per pixel
    assert np.median(spr[42:86, 42:86]) == pytest.approx(0.3, abs=5e-3)
    assert spr[0, 0] < spr[64, 64]                               # a collimated beam: less near the edges
    half = p.copy()
    half[:, :64] = 0.0                                           # open air on the left, far from the body
    img = formation(half, np.zeros_like(half), view, cfg, np.random.default_rng(0))
    # air 1.4-1.6 kernel widths from the body: a little of its haze (a blurred copy of the
    # primary gave the air its own, -ln(1.3) = -0.26)
    assert img[:, :8].min() > -0.05
    assert np.exp(4.0 - img[64, 100]) - 1.0 == pytest.approx(0.3, abs=0.1)


def test_beyond_ct_repeats_the_end_slices_outward(setup):
    ct = setup[0]
    lo, hi = beyond_ct(ct, 10.0)                                 # 4 mm slices: 3 of them
    assert lo.array.shape == hi.array.shape == (3, *ct.array.shape[1:])
    assert np.array_equal(lo.array[1], ct.array[0]) and np.array_equal(hi.array[2], ct.array[-1])
    assert np.allclose(lo.index_to_world([0, 0, 3]), ct.index_to_world([0, 0, 0]))     # adjacent below
    assert np.allclose(hi.index_to_world([0, 0, 0]), ct.index_to_world([0, 0, ct.size[2]]))
    assert beyond_ct(ct, 0.0) == []
    # a CT stored head first along another axis: the cranio-caudal axis is j, pointing to -z
    from RadGSRegLib.volume import Volume, affine_from

    turned = Volume(np.ascontiguousarray(np.moveaxis(ct.array, 0, 1)),            # [j, k, i] <- [k, j, i]
                    affine_from([0, 0, 0], [4.0, 3.0, 4.0], np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)))
    first, last = beyond_ct(turned, 7.0)                          # 3 mm slices: 3 of them
    assert first.array.shape == last.array.shape == (turned.array.shape[0], 3, turned.array.shape[2])
    assert np.array_equal(first.array[:, 0], turned.array[:, 0]) and np.array_equal(last.array[:, 2], turned.array[:, -1])
    assert np.allclose(first.index_to_world([0, 3, 0]), turned.index_to_world([0, 0, 0]))
    assert np.allclose(last.index_to_world([0, 0, 0]), turned.index_to_world([0, turned.size[1], 0]))
    assert first.index_to_world([0, 0, 0])[2] > turned.index_to_world([0, 0, 0])[2]      # -z axis: the first is above


def test_the_body_beyond_the_ct_shows_only_where_rays_leave_the_scan(setup):
    """With the patient going on beyond the scan, detector rows whose rays pass beyond the
    CT's ends gain attenuation; rows whose rays stay within it are unchanged."""
    ct, seg, _, _ = setup
    T = translation(-seg.label_centroid(31))                     # L1: the CT ends about 40 mm above
    views = list(biplanar_views(pixels=48).values())
    cfg = XraySimConfig.ideal()
    plain = simulate_xrays(ct, views, T, cfg)["lat"]
    more = simulate_xrays(ct, views, T, cfg, beyond_ct_mm=200.0)["lat"]
    assert np.allclose(more[-10:], plain[-10:], atol=1e-4)      # caudal rows: inside the scan
    assert np.all(more[:3].mean(axis=1) > plain[:3].mean(axis=1) + 1.0)       # beyond the top: body, not air


def test_intensity_output_is_bone_dark_and_seeded(setup):
    ct, _, T, views = setup
    cfg = XraySimConfig(output="intensity")
    a = simulate_xrays(ct, views, T, cfg, np.random.default_rng(3))
    b = simulate_xrays(ct, views, T, cfg, np.random.default_rng(3))
    li = simulate_xrays(ct, views, T, XraySimConfig(), np.random.default_rng(3))
    assert np.array_equal(a["ap"], b["ap"])
    assert a["ap"].min() >= 0 and a["ap"].max() <= 4095
    # same photons, other encoding: intensity falls where the line integral rises
    assert np.corrcoef(a["ap"].ravel(), li["ap"].ravel())[0, 1] < -0.9
    back = as_line_integral(a["ap"], "intensity")
    assert np.corrcoef(back.ravel(), li["ap"].ravel())[0, 1] > 0.99


def test_config_validation():
    with pytest.raises(ValueError, match="output"):
        XraySimConfig(output="raw")
    with pytest.raises(ValueError, match="photons"):
        XraySimConfig(photons_per_mm2=-1)


def test_resize_view_image_keeps_geometry(setup):
    ct, _, T, views = setup
    ap = views[0]
    big = DRR.from_ct(ct).render([ap], T)[0].numpy()
    small, v2 = resize_view_image(big, ap, 24)
    direct = DRR.from_ct(ct).render([v2], T)[0].numpy()
    assert small.shape == (24, 24)
    assert np.corrcoef(small.ravel(), direct.ravel())[0, 1] > 0.99


def test_an_xray_shows_where_the_body_ends_only_when_it_does(rng):
    """Air across whole detector lines along the patient's length: the X-ray shows the
    body's end (a DRR of a CT alone). Air at the body's sides (a narrow patient in an AP
    view) or a black round field is not that."""
    from RadGSRegLib.geometry import biplanar_views
    from RadGSRegLib.xray import body_ends_in_field, signal_mask

    view = biplanar_views(pixels=64)["ap"]                     # rows run across the long axis (v is -z)
    body = 4.0 + 0.2 * rng.normal(size=(64, 64))
    assert not body_ends_in_field(body, view)
    sides = body.copy()
    sides[:, :12] = sides[:, -12:] = 0.01                      # air beside a narrow body
    assert not body_ends_in_field(sides, view)
    end = body.copy()
    end[:10] = 0.02 * rng.normal(size=(10, 64))                # the scan (and the body) ends at the top
    assert body_ends_in_field(end, view)
    field = body.copy()
    yy, xx = np.mgrid[:64, :64]
    field[(yy - 31.5) ** 2 + (xx - 31.5) ** 2 > 30 ** 2] = 9.0  # no counts outside the round field
    assert not body_ends_in_field(field, view, signal_mask(field))
    turned = view.__class__(**{**view.__dict__, "u": view.v, "v": view.u})   # a detector turned by 90 degrees
    assert body_ends_in_field(end.T, turned) and not body_ends_in_field(sides.T, turned)
