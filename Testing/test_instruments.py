"""instruments.py: exact path lengths through metal (against a sampled reference), their line
integrals, their energy dependence, and their place in generated cases."""
import numpy as np
import pytest

from RadGSRegLib.cases import CaseGenConfig, make_case
from RadGSRegLib.geometry import biplanar_views, translation
from RadGSRegLib.instruments import (MATERIALS, Blade, InstrumentsConfig, Rod, instrument_from_dict,
                                     instrument_line_integrals)
from RadGSRegLib.simulate import XraySimConfig, formation


def _sampled(solid_inside, origin, dirs, t_max=400.0, n=40001):
    """The reference twin: sample each ray finely and count the samples inside."""
    t = np.linspace(0.0, t_max, n)
    out = []
    for d in dirs:
        pts = origin[None] + t[:, None] * d[None]
        out.append(solid_inside(pts).sum() * (t[1] - t[0]))
    return np.array(out)


def _rod_inside(r: Rod):
    A, B = np.array(r.start), np.array(r.end)
    a = (B - A) / np.linalg.norm(B - A)

    def inside(p):
        s = (p - A) @ a
        perp = p - A - s[:, None] * a
        return (s >= 0) & (s <= np.linalg.norm(B - A)) & (np.linalg.norm(perp, axis=1) <= r.radius_mm)
    return inside


def _blade_inside(b: Blade):
    R, c, h = np.array(b.axes), np.array(b.centre), np.array(b.half_mm)
    return lambda p: np.all(np.abs((p - c) @ R.T) <= h, axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_path_lengths_match_a_sampled_reference(seed):
    rng = np.random.default_rng(seed)
    rod = Rod("screw", tuple(rng.normal(size=3) * 5), tuple(rng.normal(size=3) * 5 + [0, 0, 40]), 3.25,
              "titanium", 29)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    blade = Blade("blade", tuple(rng.normal(size=3) * 5), tuple(map(tuple, q)), (1.0, 30.0, 12.0), "steel", 29)
    origin = np.array([0.0, -200.0, 20.0])
    for solid, inside in ((rod, _rod_inside(rod)), (blade, _blade_inside(blade))):
        target = np.asarray(solid.start if isinstance(solid, Rod) else solid.centre, dtype=float)
        aim = target + rng.normal(size=(60, 3)) * 6.0                     # rays around the solid: hits and misses
        dirs = (aim - origin) / np.linalg.norm(aim - origin, axis=1, keepdims=True)
        exact = solid.path_lengths(origin, dirs)
        ref = _sampled(inside, origin, dirs)
        assert np.allclose(exact, ref, atol=0.05), np.abs(exact - ref).max()
        assert (exact > 0).sum() >= 5 and (exact == 0).sum() >= 1        # the test sees both


def test_exact_chords():
    rod = Rod("K-wire", (0, 0, 0), (0, 0, 40), 1.0, "steel", 29)
    o = np.array([0.0, -100.0, 10.0])
    assert np.allclose(rod.path_lengths(o, np.array([[0, 1.0, 0]])), 2.0)                 # across: the diameter
    assert np.allclose(rod.path_lengths(np.array([0.5, -100, 10.0]), np.array([[0, 1.0, 0]])), 2 * np.sqrt(0.75))
    assert np.allclose(rod.path_lengths(np.array([0.0, 0, -50.0]), np.array([[0, 0, 1.0]])), 40.0)  # along: its length
    assert rod.path_lengths(np.array([0.0, 0, 50.0]), np.array([[0, 0, 1.0]]))[0] == 0     # behind the source
    assert instrument_from_dict(rod.__dict__) == rod


def test_a_screw_line_integral_is_its_length_through_metal():
    """On a real detector: the pixel whose ray runs through the screw's axis end to end sees
    mu * length; a pixel beside it sees nothing."""
    views = biplanar_views(pixels=128)
    v = views["ap"]
    src = v.source
    # a screw along the AP ray through the isocentre
    d = -src / np.linalg.norm(src)
    start = src + d * 690.0
    rod = Rod("pedicle screw", tuple(start), tuple(start + 45.0 * d), 3.25, "titanium", 29)
    L = instrument_line_integrals([rod], [v], np.eye(4))["titanium"][0]
    mu = MATERIALS["titanium"].mu_60kev
    assert np.isclose(L.max() / mu, 45.0, atol=0.05)
    assert L[0, 0] == 0 and np.count_nonzero(L) < 40
    # attached to a vertebra that moves: the screw moves with it
    M = translation([40.0, 0.0, 0.0])
    moved = instrument_line_integrals([rod], [v], np.eye(4), motions={29: M})["titanium"][0]
    assert np.argmax(moved) != np.argmax(L) and np.isclose(moved.max(), L.max(), rtol=0.05)


def test_metal_hardens_by_its_own_spectrum():
    v = biplanar_views(pixels=16)["ap"]
    z = np.zeros((16, 16))
    metal = np.full((16, 16), 2.0)
    rng = np.random.default_rng(0)
    mono = formation(z, z, v, XraySimConfig(beam_hardening=False, photons_per_mm2=None, scatter_to_primary=0,
                                            blur_sigma_mm=0), rng, {"steel": metal})
    assert np.allclose(mono, 2.0, atol=1e-4)                              # monochromatic: the line integral
    poly = formation(z, z, v, XraySimConfig(photons_per_mm2=None, scatter_to_primary=0, blur_sigma_mm=0), rng,
                     {"steel": metal})
    assert 0.5 < poly.mean() < 2.0                                        # hardened: the soft end is filtered out
    r = MATERIALS["steel"].ratios()
    assert r[2] == 1.0 and np.all(np.diff(r) < 0)                        # attenuation falls with energy


def test_cases_with_instruments_record_them(small_phantom):
    ct, seg = small_phantom
    base = dict(rot_deg=3.0, trans_mm=3.0, pixels=48, sim=XraySimConfig.ideal(), seed=4)
    plain = make_case(ct, seg, "L3", CaseGenConfig(**base), np.random.default_rng(4))
    assert "instruments" not in plain.extra["generator"]
    cfg = CaseGenConfig(**base, instruments=InstrumentsConfig(screws="neighbours", kwires=1, retractors=2))
    case = make_case(ct, seg, "L3", cfg, np.random.default_rng(4))
    rec = case.extra["generator"]["instruments"]
    kinds = [r["kind"] for r in rec]
    assert kinds.count("pedicle screw") == 4 and kinds.count("K-wire") == 1 and kinds.count("retractor blade") == 2
    assert {r["attached_to"] for r in rec if r["kind"] == "pedicle screw"} == {28, 30}     # L4 and L2
    assert np.allclose(case.ground_truth, plain.ground_truth)
    assert case.xrays["ap"].max() > plain.xrays["ap"].max() + 1.0          # metal is the densest thing in the image
    with pytest.raises(ValueError, match="screws"):
        InstrumentsConfig(screws="all")
