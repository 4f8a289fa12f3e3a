"""The DiffDRR peer sees the case exactly as we do (geometry checked before any benchmark
number is trusted), and the bench reports its run-time ratio.

The mapping (our View -> DiffDRR's detector, the poses) is NumPy and tested here without
DiffDRR, against DiffDRR's placement of its pixels as ``diffdrr/detector.py`` writes it. The
tests marked ``peer`` run DiffDRR itself in its own environment
(``RADGSREG_DIFFDRR_PYTHON``, or ``.peers/diffdrr/bin/python``); they are skipped where there
is none (CI has none).
"""
import ast
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from RadGSRegLib.bench import diffdrr_peer as dp
from RadGSRegLib.bench.register_bench import format_ratios, rt_ratios, run_register_bench
from RadGSRegLib.cases import CaseGenConfig, make_case
from RadGSRegLib.drr import DRR
from RadGSRegLib.geometry import apply, biplanar_views, c_arm_view, invert, pose_to_matrix
from RadGSRegLib.register.target import slab_around

ROOT = Path(__file__).resolve().parents[1]


def _peer_python():
    try:
        return dp.find_diffdrr_python()
    except dp.PeerNotFoundError:
        return None


PEER = _peer_python()
peer = pytest.mark.skipif(PEER is None, reason="no DiffDRR peer environment (set RADGSREG_DIFFDRR_PYTHON or create "
                                               ".peers/diffdrr: RadGSRegLib/bench/diffdrr-requirements.txt)")


def _odd_views() -> dict:
    """Our standard pair, an odd-sized view with non-square pixels and an off-centre
    principal point, and one whose columns run the other way (DiffDRR's reverse_x_axis)."""
    vs = dict(biplanar_views(pixels=(33, 24), detector_mm=(120.0, 96.0)))
    lat = c_arm_view(-90.0, pixels=(41, 37), pixel_spacing=(2.5, 3.0))
    vs["crop"] = lat.cropped(9, 4, 23, 19)
    vs["flip"] = replace(lat, u=-lat.u, detector_origin=lat.detector_origin + (lat.size[0] - 1) * 2.5 * lat.u)
    return vs


# ------------------------------------------------------------------ geometry, without DiffDRR
@pytest.mark.parametrize("name", ["ap", "lat", "crop", "flip"])
def test_each_view_is_a_diffdrr_detector(name):
    view = _odd_views()[name]
    det = dp.diffdrr_detector(view)
    cam = det.camera_to_carm
    assert np.allclose(cam[:3, :3] @ cam[:3, :3].T, np.eye(3)) and np.linalg.det(cam[:3, :3]) > 0   # a rotation
    assert np.allclose(cam[:3, 3], view.source)
    assert (det.width, det.height) == view.size and (det.delx, det.dely) == view.pixel_spacing
    assert det.sdd == pytest.approx(abs(view.source_to_detector))
    # DiffDRR's pixel centres (its grid and calibration, in its camera frame) are our pixel centres
    rows, cols = np.meshgrid(np.arange(view.size[1]), np.arange(view.size[0]), indexing="ij")
    targets = det.camera_targets() @ cam[:3, :3].T + cam[:3, 3]
    assert np.abs(targets - view.pixel_to_world(cols, rows)).max() < 1e-9
    # a point projects to the same pixel
    pts = np.random.default_rng(0).uniform(-60, 60, (20, 3))
    assert np.abs(det.project((pts - cam[:3, 3]) @ cam[:3, :3]) - view.project(pts)).max() < 1e-9
    assert det.reverse_x_axis == (name == "flip")
    assert det.intrinsics().shape == (8,)


def test_the_standard_views_need_no_mirroring_and_centre_their_principal_point():
    for v in biplanar_views().values():
        det = dp.diffdrr_detector(v)
        assert not det.reverse_x_axis and abs(det.x0) < 1e-9 and abs(det.y0) < 1e-9 and det.sdd == pytest.approx(1124.0)


def test_pose_and_rig_round_trip():
    T = pose_to_matrix([12.0, -7.0, 25.0, 30.0, -40.0, 15.0])
    centre = np.array([3.0, -120.0, 400.0])
    rig = dp.rig_from_pose(T, centre)
    assert np.allclose(dp.pose_from_rig(rig, centre), T, atol=1e-12)
    # the rig takes the C-arm frame to the CT frame moved so that the centre is the origin
    p_ct = np.array([[10.0, 20.0, 30.0], centre])
    assert np.allclose(apply(rig, apply(T, p_ct)), p_ct - centre)
    # a view's DiffDRR pose (rig @ camera) puts its source where the view's is, in world coordinates
    v = biplanar_views()["lat"]
    pose = rig @ dp.diffdrr_detector(v).camera_to_carm
    assert np.allclose(pose[:3, 3], apply(invert(T), v.source[None])[0] - centre)


def test_inputs_hold_the_slab_the_binned_xrays_and_no_truth(small_phantom):
    ct, seg = small_phantom
    case = make_case(ct, seg, "L3", CaseGenConfig(rot_deg=5.0, trans_mm=10.0, pixels=64, seed=2),
                     np.random.default_rng(2))
    case = replace(case, ground_truth=None)
    cfg = dp.DiffDRRConfig(slab_mm=40.0)
    inputs, centre = dp.prepare_inputs(case, cfg, threads=3)
    assert np.allclose(centre, case.seg.label_centroid(case.vertebra_label))
    slab = slab_around(case.ct, centre, 40.0)
    assert inputs["density"].shape == slab.array.shape and inputs["density"].dtype == np.float32
    assert np.allclose(inputs["affine"][:3, 3], slab.origin - centre)
    assert np.allclose(dp.pose_from_rig(inputs["rig"], centre), case.initial_guess)
    conf = json.loads(str(inputs["config"]))
    assert conf["threads"] == 3 and [s["binning"] for s in conf["stages"]] == [8, 8, 4]
    for name in ("ap", "lat"):
        for b in (4, 8):
            img, intr = inputs[f"{name}_b{b}_image"], inputs[f"{name}_b{b}_intrinsics"]
            assert img.shape == (64 // b, 64 // b) and intr[1:3].tolist() == [64 // b, 64 // b]
            k = 64 // b
            blocks = case.xrays[name].reshape(k, b, k, b).mean(axis=(1, 3))
            assert np.corrcoef(img.ravel(), blocks.ravel())[0, 1] > 0.98               # area-averaged (antialiased)
    assert not any("truth" in k for k in inputs)


def test_runner_imports_only_numpy_torch_and_diffdrr():
    tree = ast.parse(dp.RUNNER.read_text())
    mods = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    mods |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))       # nothing relative
    assert mods - {"__future__", "json", "math", "sys", "time", "types"} == {"numpy", "torch", "diffdrr"}


def test_requirements_pin_the_peer():
    lines = [x.strip() for x in dp.REQUIREMENTS.read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert lines == ["torch==2.14.1", "torchvision==0.29.1", "diffdrr==0.6.1"]
    assert ".peers/" in (ROOT / ".gitignore").read_text().splitlines()


# ------------------------------------------------------------------ finding the peer
def test_missing_peer_says_how_to_make_it(tmp_path, monkeypatch):
    monkeypatch.delenv(dp.ENV_VAR, raising=False)
    monkeypatch.chdir(ROOT)
    with pytest.raises(dp.PeerNotFoundError) as err:
        dp.find_diffdrr_python(tmp_path / "nope" / "python")
    msg = str(err.value)
    assert "--diffdrr-python" in msg and str(tmp_path / "nope" / "python") in msg
    assert ("python3 -m venv .peers/diffdrr && .peers/diffdrr/bin/pip install -r "
            "RadGSRegLib/bench/diffdrr-requirements.txt") in msg
    monkeypatch.setenv(dp.ENV_VAR, str(tmp_path / "env-python"))
    with pytest.raises(dp.PeerNotFoundError, match=dp.ENV_VAR):
        dp.find_diffdrr_python()
    monkeypatch.delenv(dp.ENV_VAR)
    monkeypatch.chdir(tmp_path)                   # the default is under the current folder
    with pytest.raises(dp.PeerNotFoundError, match=r"the default \.peers/diffdrr/bin/python"):
        dp.find_diffdrr_python()


def test_a_python_without_diffdrr_is_refused(tmp_path):
    import sys

    with pytest.raises(dp.PeerNotFoundError, match="does not have numpy, torch and diffdrr"):
        dp.find_diffdrr_python(sys.executable)          # the project's python: no diffdrr here


def test_bench_fails_before_any_case_without_the_peer(tmp_path, monkeypatch):
    from RadGSRegLib.io import write_case
    from tiny_cases import tiny_case

    write_case(tiny_case(), tmp_path / "suite" / "case_000")
    monkeypatch.delenv(dp.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    lines = []
    with pytest.raises(dp.PeerNotFoundError, match="pip install -r"):
        run_register_bench([tmp_path / "suite"], ["initial", "diffdrr"], json_path=tmp_path / "r.json",
                           log=lines.append)
    assert lines == [] and not (tmp_path / "r.json").exists()


def test_cli_without_the_peer_exits_1_with_the_commands(tmp_path, monkeypatch, capsys):
    from RadGSRegLib.cli import main
    from RadGSRegLib.io import write_case
    from tiny_cases import tiny_case

    write_case(tiny_case(), tmp_path / "suite" / "case_000")
    monkeypatch.delenv(dp.ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    args = ["bench", "register", "--cases", str(tmp_path / "suite"), "--json", str(tmp_path / "r.json")]
    assert main(args + ["--methods", "ours-2d,diffdrr"]) == 1
    err = capsys.readouterr().err
    assert f"python3 -m venv .peers/diffdrr && .peers/diffdrr/bin/pip install -r {dp.REQUIREMENTS}" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "r.json").exists()
    assert main(args + ["--methods", "ours-2d", "--diffdrr-python", "py"]) == 2
    assert "--diffdrr-python: only with --methods ...,diffdrr" in capsys.readouterr().err


# ------------------------------------------------------------------ the ratio
def _rows(rts):
    return [{"runtime_s": {"total": t}} for t in rts]


def test_rt_ratio_of_peer_over_ours():
    r = rt_ratios({"initial": _rows([0.0, 0.0, 0.0]), "ours-2d": _rows([2.0, 4.0, 3.0]),
                   "diffdrr": _rows([40.0, 40.0, 45.0])})
    assert set(r) == {"diffdrr"} and set(r["diffdrr"]) == {"ours-2d"}           # not against "initial"
    d = r["diffdrr"]["ours-2d"]
    assert d["rt_mean_ratio"] == pytest.approx(125.0 / 9.0) and d["rt_median_case_ratio"] == pytest.approx(15.0)
    assert d["peer_rt_s_mean"] == pytest.approx(125.0 / 3) and d["ours_rt_s_mean"] == pytest.approx(3.0) and d["n"] == 3
    lines = format_ratios({"suite": r})
    assert "diffdrr / ours-2d = 13.9x" in lines[0] and "ours-2d is 13.9x faster than DiffDRR" in lines[0]
    assert any("measured inside its runner" in x for x in lines)
    assert rt_ratios({"ours-2d": _rows([1.0])}) == {} and format_ratios({"s": {}}) == []


# ------------------------------------------------------------------ DiffDRR itself (peer environment)
@pytest.fixture(scope="module")
def case(small_phantom):
    """A case of the phantom's slab around L3 (+-70 mm: 37 x 64 x 86 voxels, <= 64^3 in all),
    air beyond its ends, so that the X-rays show what the peer renders."""
    ct, seg = small_phantom
    centre = seg.label_centroid(29)                 # L3
    ct, seg = slab_around(ct, centre, 70.0), slab_around(seg, centre, 70.0)
    assert np.prod(ct.array.shape) <= 64 ** 3
    return make_case(ct, seg, "L3", CaseGenConfig(rot_deg=8.0, trans_mm=15.0, pixels=64, seed=3, beyond_ct_mm=0.0),
                     np.random.default_rng(3))


@peer
def test_diffdrr_projects_the_ct_where_our_drr_does(case):
    views = {"ap": case.views["ap"].resized(48), "lat": case.views["lat"].resized(48), "flip": _odd_views()["flip"]}
    pts = case.ct.index_to_world(np.array([[0, 0, 0], [10.0, 20.0, 5.0], [30.0, 40.0, 20.0]]))
    out = dp.render_diffdrr(case.ct, views, case.ground_truth, python=PEER, points_ct=pts)
    drr = DRR.from_ct(case.ct)
    for name, v in views.items():
        ours = drr.render([v], case.ground_truth).numpy()[0]
        o = out[name]
        assert np.corrcoef(o["drr"].ravel(), ours.ravel())[0, 1] > 0.99, name      # Siddon vs Joseph
        assert o["drr"].mean() == pytest.approx(ours.mean(), rel=0.01), name        # same units: mu x mm
        assert np.abs(o["pixels"] - v.project(apply(case.ground_truth, pts))).max() < 0.01, name
        rows, cols = np.meshgrid(np.arange(v.size[1]), np.arange(v.size[0]), indexing="ij")
        assert np.abs(o["targets"] - v.pixel_to_world(cols, rows)).max() < 0.01, name     # float32 mm
        assert np.abs(o["source"] - v.source).max() < 0.01, name


@peer
def test_diffdrr_registration_moves_towards_the_truth(case):
    from RadGSRegLib.evaluate import truth_errors

    cfg = dp.DiffDRRConfig(stages=(dp.DiffDRRStage(2, 1.0, 40, 1.5e-2, 7.5), dp.DiffDRRStage(1, 0.0, 10, 2.5e-3, 2.5)),
                           slab_mm=70.0)
    res = dp.register_diffdrr(replace(case, ground_truth=None), python=PEER, threads=1, config=cfg)
    e0 = truth_errors(case, case.initial_guess)["mtre_mm"]
    e1 = truth_errors(case, res.T_ct_to_carm)["mtre_mm"]
    assert e1 < 0.35 * e0, (e0, e1)                       # 12.8 -> 2.3 mm with 20 more steps
    assert res.runtime_s["total"] < res.runtime_s["subprocess_wall"]
    assert res.info["peer"]["diffdrr"] == "0.6.1" and res.info["peer"]["threads"] == 1
    assert len(res.info["stages"]) == 2 and res.info["stages"][0]["ncc_last"] > res.info["stages"][0]["ncc_first"]
    assert set(res.runtime_s) >= {"preprocessing", "diffdrr_setup", "diffdrr_stage1_2x", "diffdrr_stage2_1x"}
