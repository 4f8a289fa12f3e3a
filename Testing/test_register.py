import numpy as np
import pytest

from RadGSRegLib.cases import CaseGenConfig, make_case
from RadGSRegLib.io import read_case, write_case
from RadGSRegLib.metrics import registration_errors, target_points
from RadGSRegLib.register import RegisterConfig, run, slab_around
from RadGSRegLib.register.config import Level, RefineConfig, SearchConfig


@pytest.fixture(scope="module")
def easy_case(tmp_path_factory, small_phantom):
    ct, seg = small_phantom
    cfg = CaseGenConfig(rot_deg=4.0, trans_mm=8.0, pixels=128, seed=2)
    case = make_case(ct, seg, "L3", cfg, np.random.default_rng(2))
    d = tmp_path_factory.mktemp("reg") / "case"
    write_case(case, d)
    return d


def _fast_config(**kw):
    return RegisterConfig(search=SearchConfig(rot_deg=(0.0,), candidates=1),
                          refine2d=RefineConfig(levels=[Level(64, 10, 1.0, 1.0, 30.0, None), Level(128, 8, 0.5, 0.5, 20.0, 12.0)]),
                          **kw)


def test_refinement_recovers_a_small_offset(easy_case):
    case = read_case(easy_case)                     # no ground truth for the registration
    assert case.ground_truth is None
    res = run(case, _fast_config())
    truth = read_case(easy_case, ground_truth=True)
    pts = target_points(truth.seg, truth.vertebra_label, max_points=2000)
    before = registration_errors(truth.initial_guess, truth.ground_truth, pts)["mtre_mm"]
    after = registration_errors(res.T_ct_to_carm, truth.ground_truth, pts)["mtre_mm"]
    assert before > 4.0
    assert after < 2.0 and after < 0.3 * before
    assert set(res.runtime_s) >= {"preprocessing", "search", "refinement", "total"}
    assert res.info["warnings"] == []


def test_divergence_check_flags_a_corrupted_case(easy_case):
    case = read_case(easy_case)
    case.xrays["ap"] = np.random.default_rng(0).permutation(case.xrays["ap"].ravel()).reshape(case.xrays["ap"].shape)
    case.xrays["lat"] = np.random.default_rng(1).permutation(case.xrays["lat"].ravel()).reshape(case.xrays["lat"].shape)
    res = run(case, _fast_config())
    assert any("doubtful" in w for w in res.info["warnings"])


def test_none_keeps_the_initial_pose(easy_case):
    case = read_case(easy_case)
    res = run(case, RegisterConfig(init="none", refine="none"))
    assert np.allclose(res.T_ct_to_carm, case.initial_guess)
    with pytest.raises(ValueError, match="refine must be one of"):
        RegisterConfig(refine="3d-magic")
    with pytest.raises(ValueError, match="needs model weights"):
        RegisterConfig(init="learned")


def test_divergence_check_rejects_a_corrupted_result(easy_case):
    from RadGSRegLib.geometry import compose, pose_to_matrix
    from RadGSRegLib.register.pipeline import check_refinement
    from RadGSRegLib.register.refine2d import windowed_ncc
    from RadGSRegLib.register.target import make_target

    truth = read_case(easy_case, ground_truth=True)
    cfg = _fast_config()
    tgt = make_target(truth, slab_mm=cfg.slab_mm, coarse_mm=cfg.coarse_mm)
    G = truth.ground_truth
    bad = compose(pose_to_matrix([6.0, -4.0, 0.0, 12.0, 0.0, -15.0], center=tgt.centre @ G[:3, :3].T + G[:3, 3]), G)
    ncc_bad = float(np.mean(list(windowed_ncc(tgt, bad, cfg.refine2d).values())))
    T, m, warn = check_refinement(tgt, G, bad, ncc_bad, cfg)
    assert np.allclose(T, G) and warn is not None and "rejected" in warn
    assert m > ncc_bad + 0.05
    # a result as good as its start is kept
    ncc_good = float(np.mean(list(windowed_ncc(tgt, G, cfg.refine2d).values())))
    T, m, warn = check_refinement(tgt, bad, G, ncc_good, cfg)
    assert np.allclose(T, G) and warn is None and m == ncc_good


def test_3d_refinement_recovers_a_known_offset(small_phantom):
    from RadGSRegLib.geometry import apply, compose, mtre, pose_to_matrix
    from RadGSRegLib.learned.config import ModelConfig
    from RadGSRegLib.region import VertebraRegion, cube_affine_batch
    from RadGSRegLib.register.refine3d import refine_3d
    from RadGSRegLib.volume import resample_to_grid

    ct, seg = small_phantom
    mc = ModelConfig(voxels=32)
    vr = VertebraRegion.of(ct, seg, 29, side_mm=mc.roi_mm, voxel_mm=mc.voxel_mm)
    G = compose(pose_to_matrix([3.0, -5.0, 8.0, 4.0, -3.0, 6.0]), np.eye(4))
    G[:3, 3] -= G[:3, :3] @ vr.centroid
    A = cube_affine_batch(apply(G, vr.centroid)[None], mc.roi_mm, mc.voxels)[0].numpy().astype(np.float64)
    recon = resample_to_grid(vr.region, (32, 32, 32), A, G)            # a perfect reconstruction
    start = compose(pose_to_matrix([4.0, 3.0, -4.0, 5.0, -4.0, 3.0], center=apply(G, vr.centroid)), G)
    pts = seg.label_points(29, max_points=2000)
    T, info = refine_3d(recon, vr.crop, start)
    assert mtre(start, G, pts) > 6.0
    assert mtre(T, G, pts) < 1.5
    assert info["ncc_after"] > info["ncc_before"]


def test_slab_keeps_geometry(small_phantom):
    ct, seg = small_phantom
    c = seg.label_centroid(29)
    slab = slab_around(ct, c, 30.0)
    assert slab.array.shape[0] < ct.array.shape[0] and slab.array.shape[1:] == ct.array.shape[1:]
    # the same world point holds the same value
    ijk = np.round(slab.world_to_index(c)).astype(int)
    ijk_full = np.round(ct.world_to_index(c)).astype(int)
    assert slab.array[ijk[2], ijk[1], ijk[0]] == ct.array[ijk_full[2], ijk_full[1], ijk_full[0]]


def test_capture_range_and_success_rate_by_hand():
    from RadGSRegLib.metrics import capture_range, success_rate

    init = [1, 3, 6, 7, 12, 14, 17, 22]
    fin = [0.5, 1.0, 0.9, 1.5, 3.0, 1.0, 0.5, 0.4]
    assert success_rate(fin) == pytest.approx(7 / 8)
    cr, bins = capture_range(init, fin)
    # bins 0-5: 2/2, 5-10: 2/2, 10-15: 1/2 (50 % < 80 %): CR = 10 mm, even though 15-20 and 20-25 succeed
    assert cr == 10.0
    assert [b["n"] for b in bins] == [2, 2, 2, 1, 1]
    assert bins[2]["sr"] == pytest.approx(0.5)
    assert capture_range([1, 12], [0.1, 0.1])[0] == 15.0    # an empty 5-10 bin is skipped
    assert capture_range([1, 12, 13], [0.1, 0.1, 5.0])[0] == 5.0


def test_bench_register_reports_table_columns(easy_case, tmp_path):
    from RadGSRegLib.bench.register_bench import run_register_bench

    lines = []
    out = run_register_bench([easy_case.parent], ["initial"], json_path=tmp_path / "r.json", log=lines.append)
    s = out["suites"][easy_case.parent.name]["initial"]["summary"]
    assert s["n"] == 1 and s["sr_pct"] == 0.0 and s["mtre_mean"] > 4.0
    assert any("SR %" in line for line in lines) and (tmp_path / "r.json").exists()


def test_block_average_keeps_the_physical_position():
    from RadGSRegLib.register.target import block_average
    from RadGSRegLib.volume import affine_from

    A = affine_from([10.0, -5.0, 3.0], [1.0, 1.0, 2.5], np.diag([-1.0, -1.0, 1.0]))
    idx = np.stack(np.meshgrid(np.arange(9), np.arange(8), np.arange(6), indexing="ij"), -1)   # (k, j, i)
    world = idx[..., ::-1].astype(float) @ A[:3, :3].T + A[:3, 3]
    mu = (world @ [1.0, 2.0, 3.0]).astype(np.float32)        # linear: block means equal the centre values
    b, B = block_average(mu, A, 2.0)
    assert b.shape == (9, 4, 3)                               # k not averaged (2.5 mm), j and i by 2
    ijk = np.array([1.0, 2.0, 4.0])
    assert b[4, 2, 1] == pytest.approx(float((B[:3, :3] @ ijk + B[:3, 3]) @ [1.0, 2.0, 3.0]), rel=1e-5)


def test_evaluate_scores_result_folders(easy_case, tmp_path):
    import json

    from RadGSRegLib.cli import main
    from RadGSRegLib.io import read_result

    results = tmp_path / "results"
    assert main(["register", str(easy_case), "--out", str(results / easy_case.name), "--init", "none",
                 "--refine", "none"]) == 0
    assert main(["evaluate", str(easy_case.parent), "--results", str(results)]) == 0
    out = json.loads((results / "evaluation.json").read_text())
    truth = read_case(easy_case, ground_truth=True)
    pts = target_points(truth.seg, truth.vertebra_label, max_points=2000)
    expect = registration_errors(read_result(results / easy_case.name).T_ct_to_carm, truth.ground_truth, pts)
    assert out["summary"]["n"] == 1 and out["missing"] == []
    assert out["rows"][0]["mtre_mm"] == pytest.approx(expect["mtre_mm"])
    assert out["summary"]["sr_pct"] == (100.0 if expect["mtre_mm"] < 2 else 0.0)


def test_every_answer_is_checked_even_without_refinement(easy_case):
    """--refine none and --init none still report the similarity per view and flag a
    doubtful answer: here the X-rays are swapped, which no pose explains."""
    case = read_case(easy_case)
    good = run(case, RegisterConfig(init="none", refine="none"))
    assert set(good.info["final_ncc_views"]) == {"ap", "lat"} and "check" in good.runtime_s
    case.xrays["ap"], case.xrays["lat"] = case.xrays["lat"], case.xrays["ap"]
    bad = run(case, RegisterConfig(init="none", refine="none"))
    assert bad.info["final_ncc"] < good.info["final_ncc"] and bad.info["doubtful"]
    assert any(w.startswith("doubtful") for w in bad.info["warnings"])


def test_register_config_json_round_trip_and_errors(tmp_path):
    import json
    from pathlib import Path

    from RadGSRegLib.register import ConfigError, read_config
    from RadGSRegLib.register.config import Refine3DConfig, config_to_dict

    cfg = _fast_config(min_ncc=0.8, model=Path("w.pt"), device="cuda:1", refine3d=Refine3DConfig(iterations=(5, 6)))
    (tmp_path / "c.json").write_text(json.dumps(config_to_dict(cfg)))
    back = read_config(tmp_path / "c.json")
    assert back.refine2d == cfg.refine2d and back.search == cfg.search and back.model == "w.pt" and back.refine3d.iterations == (5, 6)
    assert RegisterConfig.from_dict({}) == RegisterConfig()                     # missing fields: defaults
    bad = {"min_ncc": "high", "typo": 1, "refine2d": {"levels": [{"pixels": 64}]},
           "refine3d": {"iterations": [1.5, 2]}, "init": "magic", "reconstruct": 1}
    words = {"min_ncc": "must be a number", "typo": "unknown field 'typo'",
             "refine2d": r"refine2d.levels\[0\] needs iterations, step_deg, step_mm",
             "refine3d": r"refine3d.iterations\[0\] must be an integer", "init": "init must be one of",
             "reconstruct": "must be true or false"}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=words[key]) as e:
            RegisterConfig.from_dict({key: value}, source="my.json")
        assert "my.json" in str(e.value)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        read_config(tmp_path / "broken.json")
    # the pose search's settings moved out of refine2d: an old file is told where they went
    for old, new in (("search_rot_deg", "search.rot_deg"), ("candidates", "search.candidates"),
                     ("coarse_mm", "coarse_mm")):
        with pytest.raises(ConfigError, match=rf"old.json: refine2d.{old} moved: .* write {new}"):
            RegisterConfig.from_dict({"refine2d": {old: 1}}, source="old.json")


def test_cli_settings_are_defaults_then_config_file_then_options(tmp_path, capsys):
    import json

    from RadGSRegLib.cli import build_parser, main, register_config

    parse = build_parser().parse_args
    assert register_config(parse(["register", "c", "--out", "o"])) == RegisterConfig()
    (tmp_path / "c.json").write_text(json.dumps({"refine": "none", "min_ncc": 0.9}))
    cfg = register_config(parse(["register", "c", "--out", "o", "--config", str(tmp_path / "c.json")]))
    assert (cfg.refine, cfg.min_ncc, cfg.init) == ("none", 0.9, "auto")
    cfg = register_config(parse(["register", "c", "--out", "o", "--config", str(tmp_path / "c.json"), "--refine", "2d"]))
    assert (cfg.refine, cfg.min_ncc) == ("2d", 0.9)
    (tmp_path / "bad.json").write_text(json.dumps({"refine": "sideways"}))
    assert main(["register", "c", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "bad.json")]) == 1
    assert "bad.json" in capsys.readouterr().err


def test_a_round_field_is_ignored_by_the_similarity(small_phantom):
    """An image intensifier's black surround carries no signal: the windowed NCC at the truth
    stays what it is without it, and the registration still recovers the pose."""
    from dataclasses import replace

    from RadGSRegLib.metrics import truth_errors
    from RadGSRegLib.register.refine2d import windowed_ncc
    from RadGSRegLib.register.target import make_target
    from RadGSRegLib.simulate import XraySimConfig

    ct, seg = small_phantom
    ncc = {}
    for field in (None, 170.0):
        cfg = CaseGenConfig(rot_deg=4.0, trans_mm=8.0, pixels=128, seed=2, sim=XraySimConfig(field_diameter_mm=field))
        case = make_case(ct, seg, "L3", cfg, np.random.default_rng(2))
        rc = _fast_config()
        tgt = make_target(case, slab_mm=rc.slab_mm, coarse_mm=rc.coarse_mm)
        assert (tgt.signal["ap"] is None) == (field is None)
        ncc[field] = np.mean(list(windowed_ncc(tgt, case.ground_truth, rc.refine2d).values()))
    assert ncc[170.0] > ncc[None] - 0.05 and ncc[170.0] > 0.8
    res = run(replace(case, ground_truth=None), rc)
    assert truth_errors(case, res.T_ct_to_carm)["mtre_mm"] < 1.0 and not res.info["doubtful"]
