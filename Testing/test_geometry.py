import math

import numpy as np
import pytest

from RadGSRegLib import geometry as g


def test_case_format_example_view():
    ap = g.biplanar_views()["ap"]
    assert np.allclose(ap.source, [0, 700, 0])
    assert np.allclose(ap.detector_origin, [-146.25, -424.0, 146.25])
    assert np.allclose(ap.u, [1, 0, 0]) and np.allclose(ap.v, [0, 0, -1])
    assert ap.size == (976, 976) and ap.pixel_spacing == pytest.approx((0.3, 0.3))
    assert abs(ap.source_to_detector) == pytest.approx(1124.0)


def test_projection_of_known_points():
    ap = g.biplanar_views()["ap"]
    # the isocentre projects to the detector centre
    assert np.allclose(ap.project(np.zeros(3)), [487.5, 487.5])
    # a pixel centre projects onto itself
    for i, j in [(0, 0), (975, 0), (10, 700), (487, 488)]:
        assert np.allclose(ap.project(ap.pixel_to_world(i, j)), [i, j], atol=1e-9)
    # a point halfway from source to a pixel: same pixel (perspective)
    p = 0.5 * (ap.source + ap.pixel_to_world(100, 200))
    assert np.allclose(ap.project(p), [100, 200])
    # by hand: x = 10 mm at the isocentre plane is magnified by 1124/700, then / 0.3 mm
    assert ap.project(np.array([10.0, 0, 0]))[0] == pytest.approx(487.5 + 10 * 1124 / 700 / 0.3)
    # z up (superior) goes to smaller rows (head at the top)
    assert ap.project(np.array([0, 0, 10.0]))[1] < 487.5


def test_projection_matrix_matches_project(rng):
    for v in g.biplanar_views(pixels=64).values():
        P = v.projection_matrix()
        pts = rng.uniform(-100, 100, (20, 3))
        h = pts @ P[:, :3].T + P[:, 3]
        assert np.all(h[:, 2] > 0)
        assert np.allclose(h[:, :2] / h[:, 2:], v.project(pts))


def test_lateral_is_ap_rotated():
    vs = g.biplanar_views()
    lat = vs["lat"]
    assert np.allclose(lat.source, [700, 0, 0], atol=1e-9)
    # a point to the patient's front (-y) appears to the right (larger column) in the lateral view
    assert lat.project(np.array([0, -10.0, 0]))[0] > 487.5
    R = g.euler_to_matrix((0, 0, -90))
    assert np.allclose(lat.source, R @ vs["ap"].source)


def test_rays_hit_their_pixels():
    v = g.biplanar_views(pixels=32)["lat"]
    o, d = v.pixel_rays()
    assert d.shape == (32, 32, 3) and np.allclose(np.linalg.norm(d, axis=-1), 1)
    # the ray of pixel (col 5, row 7) travels through points projecting to (5, 7)
    p = o + 500.0 * d[7, 5]
    assert np.allclose(v.project(p), [5, 7])


def test_resized_view_keeps_geometry(rng):
    v = g.biplanar_views()["ap"]
    small = v.resized(128)
    assert small.size == (128, 128)
    assert small.pixel_spacing[0] == pytest.approx(0.3 * 976 / 128)
    pts = rng.uniform(-80, 80, (10, 3))
    a, b = v.project(pts), small.project(pts)
    # same physical detector position: (pixel + 0.5) * spacing agrees
    assert np.allclose((a + 0.5) * 0.3, (b + 0.5) * small.pixel_spacing[0])
    assert np.allclose(small.detector_center, v.detector_center)


@pytest.mark.parametrize("kw,msg", [
    (dict(u=(1, 0.1, 0)), "unit"),
    (dict(v=(1, 0, 0)), "orthogonal"),
    (dict(pixel_spacing=(0, 1)), "pixel_spacing"),
    (dict(size=(0, 10)), "size"),
    (dict(source=(0, -424.0, 0)), "singular"),
])
def test_view_validation(kw, msg):
    base = dict(source=(0, 700, 0), detector_origin=(0, -424, 0), u=(1, 0, 0), v=(0, 0, -1),
                pixel_spacing=(1, 1), size=(10, 10))
    base.update(kw)
    with pytest.raises(ValueError, match=msg):
        g.View(**base)


def test_euler_and_pose_round_trips(rng):
    for _ in range(20):
        p = np.concatenate([rng.uniform(-80, 80, 3), rng.uniform(-60, 60, 3)])
        T = g.pose_to_matrix(p)
        assert g.is_rigid(T)
        assert np.allclose(g.matrix_to_pose(T), p)
        c = rng.uniform(-50, 50, 3)
        Tc = g.pose_to_matrix(p, center=c)
        assert np.allclose(g.matrix_to_pose(Tc, center=c), p)
        # rotation about c leaves c fixed up to the translation
        assert np.allclose(g.apply(Tc, c), c + p[3:])
        assert np.allclose(g.compose(T, g.invert(T)), np.eye(4))
        assert np.allclose(g.invert(T), np.linalg.inv(T))


def test_euler_convention():
    # rz = 90 deg maps x to y (right-handed about z); order Rz @ Ry @ Rx
    assert np.allclose(g.euler_to_matrix((0, 0, 90)) @ [1, 0, 0], [0, 1, 0])
    R = g.euler_to_matrix((30, 20, 10))
    assert np.allclose(R, g.euler_to_matrix((0, 0, 10)) @ g.euler_to_matrix((0, 20, 0)) @ g.euler_to_matrix((30, 0, 0)))


def test_geodesic_and_mtre():
    R = g.pose_to_matrix([0, 0, 30, 0, 0, 0])
    assert g.geodesic_deg(R, np.eye(4)) == pytest.approx(30.0)
    R2 = g.pose_to_matrix([10, 20, -5, 0, 0, 0])
    assert g.geodesic_deg(R2, R2) == pytest.approx(0.0, abs=1e-6)
    assert g.geodesic_deg(R, R2) == pytest.approx(g.geodesic_deg(R2, R))
    # mTRE by hand: a pure translation of 3 mm -> 3 mm; a 90 deg rotation about z of points at radius 1 -> sqrt(2)
    pts = np.array([[1.0, 0, 0], [0, 1.0, 0], [-1.0, 0, 0]])
    assert g.mtre(g.translation([3, 0, 0]), np.eye(4), pts) == pytest.approx(3.0)
    assert g.mtre(g.pose_to_matrix([0, 0, 90, 0, 0, 0]), np.eye(4), pts) == pytest.approx(math.sqrt(2))


def test_sample_offsets_ranges_and_seed():
    a = g.sample_offsets(200, np.random.default_rng(5), rot_deg=20, trans_mm=50)
    b = g.sample_offsets(200, np.random.default_rng(5), rot_deg=20, trans_mm=50)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    poses = np.array([g.matrix_to_pose(T) for T in a])
    assert np.all(np.abs(poses[:, :3]) <= 20 + 1e-9) and np.all(np.abs(poses[:, 3:]) <= 50 + 1e-9)
    assert np.abs(poses[:, :3]).max() > 15 and np.abs(poses[:, 3:]).max() > 40


def test_pose_delta_numpy_torch_and_roma_agree(rng):
    """The one delta convention (rotation vector rad + mm about a centre): numpy, its torch
    twin and roma's rotation vectors give the same matrices; the round trip is exact."""
    import roma
    import torch

    for _ in range(20):
        d = np.concatenate([rng.normal(size=3) * rng.uniform(0, 1.2), rng.normal(size=3) * 10])
        c = rng.normal(size=3) * 50
        D = g.delta_to_matrix(d, c)
        assert g.is_rigid(D)
        assert np.allclose(D[:3, :3], roma.rotvec_to_rotmat(torch.tensor(d[:3])).numpy())
        x = rng.normal(size=(5, 3))
        assert np.allclose(g.apply(D, x), (x - c) @ D[:3, :3].T + c + d[3:])
        assert np.allclose(g.matrix_to_delta(D, c), d)
        T = g.compose(g.pose_to_matrix(rng.normal(size=6) * 10), np.eye(4))
        Tt = g.apply_delta_torch(torch.tensor(d)[None], torch.tensor(T)[None], torch.tensor(c)[None])[0].numpy()
        assert np.allclose(Tt, g.apply_delta(d, T, c))
    # a single-axis Euler step is the same rotation as the rotation vector along that axis
    for k in range(3):
        e = np.zeros(6)
        e[k] = 4.0
        r = np.zeros(6)
        r[k] = np.deg2rad(4.0)
        assert np.allclose(g.pose_to_matrix(e), g.delta_to_matrix(r))
    # near pi the axis is recovered too
    d = np.array([0.0, np.pi - 1e-6, 0.0, 1.0, 2.0, 3.0])
    assert np.allclose(g.delta_to_matrix(g.matrix_to_delta(g.delta_to_matrix(d))), g.delta_to_matrix(d))
