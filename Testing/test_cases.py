import json
import re

import numpy as np
import pytest

from RadGSRegLib.cli import build_parser, main
from RadGSRegLib.drr import DRR
from RadGSRegLib.geometry import apply, geodesic_deg, invert, matrix_to_pose
from RadGSRegLib.io import read_case, write_volume


def _ncc(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


@pytest.fixture(scope="module")
def generated(tmp_path_factory, small_phantom):
    ct, seg = small_phantom
    d = tmp_path_factory.mktemp("gen")
    write_volume(ct, d / "ct.nrrd")
    write_volume(seg, d / "seg.nii.gz")
    rc = main(["simulate-cases", "--ct", str(d / "ct.nrrd"), "--seg", str(d / "seg.nii.gz"), "--levels", "L2,L4",
               "--n", "3", "--out", str(d / "cases"), "--pixels", "64", "--seed", "5"])
    assert rc == 0
    return d


def test_generated_cases_read_back(generated):
    rows = json.loads((generated / "cases" / "summary.json").read_text())
    assert [r["level"] for r in rows] == ["L2", "L4", "L2"]
    for i, r in enumerate(rows):
        case = read_case(generated / "cases" / f"case_{i:03d}", ground_truth=True)
        assert case.vertebra_label == {"L2": 30, "L4": 28}[r["level"]]
        assert case.xrays["ap"].shape == (64, 64)
        # nominal pose: the vertebra centroid at the isocentre, axes aligned
        c = case.seg.label_centroid(case.vertebra_label)
        assert np.allclose(apply(case.initial_guess, c), 0, atol=1e-6)
        assert np.allclose(case.initial_guess[:3, :3], np.eye(3))
        # the truth is a bounded offset of it
        D = case.ground_truth @ invert(case.initial_guess)
        p = matrix_to_pose(D)
        assert np.all(np.abs(p[:3]) <= 20 + 1e-6) and np.all(np.abs(p[3:]) <= 50 + 1e-6)
        assert geodesic_deg(D, np.eye(4)) == pytest.approx(r["rot_offset_deg"])
        assert r["initial_mtre_mm"] > 0


def test_the_body_goes_on_beyond_the_scan_unless_asked_not_to(generated, tmp_path):
    """By default the X-rays show the patient going on past the CT's ends (recorded in
    case.json); ``--beyond-ct-mm 0`` gives the CT alone (air beyond), which shows in the
    rows past the scan's top."""
    from RadGSRegLib.cases import CaseGenConfig

    case = read_case(generated / "cases" / "case_000", ground_truth=True)
    assert case.extra["generator"]["config"]["beyond_ct_mm"] == CaseGenConfig().beyond_ct_mm == 150.0
    args = ["simulate-cases", "--ct", str(generated / "ct.nrrd"), "--seg", str(generated / "seg.nii.gz"),
            "--levels", "L1", "--n", "1", "--pixels", "64", "--seed", "5", "--dose", "0", "--scatter", "0"]
    assert main(args + ["--out", str(tmp_path / "on")]) == 0
    assert main(args + ["--beyond-ct-mm", "0", "--out", str(tmp_path / "off")]) == 0
    on, off = (read_case(tmp_path / k / "case_000", ground_truth=True) for k in ("on", "off"))
    assert off.extra["generator"]["config"]["beyond_ct_mm"] == 0.0
    top_on, top_off = on.xrays["lat"][:4].mean(), off.xrays["lat"][:4].mean()   # rows past L1's end of the scan
    assert top_on > top_off + 1.0
    assert np.allclose(on.xrays["lat"][-8:], off.xrays["lat"][-8:], atol=0.05)   # rows within it: the same


def test_xrays_show_the_true_pose(generated):
    """Where the CT covers the rays (the body goes on past the scan: not there), the X-rays
    are its DRRs at the true pose, not at the initial one."""
    from RadGSRegLib.register.target import make_target

    case = read_case(generated / "cases" / "case_001", ground_truth=True)
    drr = DRR.from_ct(case.ct)
    views = [case.views["ap"], case.views["lat"]]
    at_truth = drr.render(views, case.ground_truth).numpy()
    at_init = drr.render(views, case.initial_guess).numpy()
    tgt = make_target(case, slab_mm=1000.0, coarse_mm=2.0)
    for i, k in enumerate(("ap", "lat")):
        cov = tgt.covered(views[i], case.ground_truth)
        cov = np.ones(at_truth[i].shape, bool) if cov is None else cov
        x = case.xrays[k][cov]
        assert _ncc(x, at_truth[i][cov]) > 0.9
        assert _ncc(x, at_truth[i][cov]) > _ncc(x, at_init[i][cov]) + 0.02


def test_seeded_generation_and_overwrite_refusal(generated, tmp_path, capsys):
    args = ["simulate-cases", "--ct", str(generated / "ct.nrrd"), "--seg", str(generated / "seg.nii.gz"),
            "--levels", "L2,L4", "--n", "1", "--pixels", "64", "--seed", "5"]
    assert main(args + ["--out", str(tmp_path / "again")]) == 0
    a = read_case(generated / "cases" / "case_000", ground_truth=True)
    b = read_case(tmp_path / "again" / "case_000", ground_truth=True)
    assert np.array_equal(a.ground_truth, b.ground_truth) and np.array_equal(a.xrays["ap"], b.xrays["ap"])
    assert main(args + ["--out", str(tmp_path / "again")]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_absent_level_is_refused_by_name(generated, capsys):
    rc = main(["simulate-cases", "--ct", str(generated / "ct.nrrd"), "--seg", str(generated / "seg.nii.gz"),
               "--levels", "T5", "--n", "1", "--out", str(generated / "x")])
    assert rc == 1
    assert re.search(r"T5 .*absent.*L3 \(29\)", capsys.readouterr().err)
    assert not (generated / "x" / "case_000").exists()


def test_phantom_source_and_intensity_kind(tmp_path):
    rc = main(["simulate-cases", "--phantom", "--levels", "L3", "--n", "1", "--out", str(tmp_path / "c"),
               "--pixels", "48", "--phantom-spacing", "4", "--image-kind", "intensity"])
    assert rc == 0
    case = read_case(tmp_path / "c" / "case_000")
    assert case.image_kind == "intensity" and case.vertebra_name == "L3"
    assert case.extra["generator"]["source"].startswith("phantom")


def test_show_writes_a_montage(generated, tmp_path):
    from PIL import Image

    out = tmp_path / "m.png"
    assert main(["show", str(generated / "cases" / "case_000"), "--out", str(out), "--size", "64"]) == 0
    im = np.asarray(Image.open(out))
    assert im.shape == (128, 256, 3)
    red = (im[..., 0] > 200) & (im[..., 1] < 100)
    green = (im[..., 1] > 200) & (im[..., 0] < 100)
    assert red[:, 192:].sum() > 20 and green[:, 192:].sum() > 20          # both edge sets on the overlay


def test_help_teaches():
    text = build_parser().format_help()
    for word in ("simulate-cases", "show", "bench", "demo", "examples", "T_ct_to_carm"):
        assert word in text


def test_every_option_of_every_command_says_what_it_does():
    """`radgsreg CMD --help` explains each argument: none is listed bare (name and metavar only)."""
    import argparse

    bare = []

    def walk(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    walk(sp, path + [name])
            elif not a.help:
                bare.append(" ".join(path + [a.option_strings[0] if a.option_strings else a.dest]))

    walk(build_parser(), ["radgsreg"])
    assert bare == []
    args = build_parser().parse_args(["bench", "metal", "--cases", "x"])
    assert str(args.json) == "bench_out/metal.json"


# ------------------------------------------------------------------ the CTs cases are made of
def _same_case(a, b):
    assert a.vertebra_label == b.vertebra_label and a.vertebra_name == b.vertebra_name
    assert np.array_equal(a.ct.array, b.ct.array) and np.array_equal(a.seg.array, b.seg.array)
    assert np.array_equal(a.initial_guess, b.initial_guess) and np.array_equal(a.ground_truth, b.ground_truth)
    for k in ("ap", "lat"):
        assert np.array_equal(a.xrays[k], b.xrays[k])
    assert a.extra == b.extra


def test_sample_case_is_the_recipe_sample_case_and_demo_used():
    """sample_case makes exactly what `radgsreg sample-case` and `radgsreg demo` made before it
    was shared: the bundled files, the level's label, make_case with default_rng(seed)."""
    from RadGSRegLib.cases import SAMPLE_SOURCE, CaseGenConfig, make_case, sample_case
    from RadGSRegLib.io import read_segmentation, read_volume
    from RadGSRegLib.sample_data import lumbar_ct

    cfg = CaseGenConfig(pixels=40, seed=5)
    case = sample_case("l2", cfg)                           # names are normalised
    sd = lumbar_ct()
    before = make_case(read_volume(sd.ct), read_segmentation(sd.seg).labelmap, "L2", cfg,
                       np.random.default_rng(5), label=30, source=SAMPLE_SOURCE)
    _same_case(case, before)
    assert case.warnings == []                             # the bundled CT is plausible
    by_value = sample_case("30", cfg)                      # a label value
    _same_case(by_value, sample_case("30", cfg))            # seeded: the same case again
    assert by_value.vertebra_name == "30" and by_value.vertebra_label == 30
    other = sample_case("L2", CaseGenConfig(pixels=40, seed=6))
    assert not np.array_equal(other.ground_truth, case.ground_truth)


def test_sample_case_of_a_phantom_builds_the_seeded_phantom(monkeypatch, small_phantom):
    import RadGSRegLib.phantom as phantom
    from RadGSRegLib.cases import CaseGenConfig, make_case, sample_case

    built = []
    monkeypatch.setattr(phantom, "make_phantom", lambda cfg: built.append(cfg) or small_phantom)
    cfg = CaseGenConfig(pixels=32, seed=7)
    case = sample_case("L4", cfg, phantom=True)
    assert [c.seed for c in built] == [7] and built[0].spacing == (1.0, 1.0, 1.0)
    _same_case(case, make_case(*small_phantom, "L4", cfg, np.random.default_rng(7), source="phantom seed 7"))


def test_sample_levels_are_checked_before_loading():
    from RadGSRegLib.cases import sample_level
    from RadGSRegLib.levels import LevelError

    assert sample_level(" l3") == "L3" and sample_level("vertebrae_S1") == "S1" and sample_level("29") == "29"
    assert sample_level("L5", phantom=True) == "L5"
    with pytest.raises(LevelError, match=r"^C3: the phantom spans L1, L2, L3, L4, L5$"):
        sample_level("C3", phantom=True)
    with pytest.raises(LevelError, match="the phantom spans"):
        sample_level("29", phantom=True)
    with pytest.raises(LevelError, match="unknown vertebra level 'X9'"):
        sample_level("X9")


def test_load_labelled_ct_names_the_fields_it_is_given(generated, tmp_path):
    from RadGSRegLib.cases import load_labelled_ct
    from RadGSRegLib.io import CaseFormatError, read_volume
    from RadGSRegLib.levels import LevelError
    from RadGSRegLib.volume import Volume

    ct_path, seg_path = generated / "ct.nrrd", generated / "seg.nii.gz"
    src = load_labelled_ct(ct_path, seg_path, ["L2", "vertebrae_L4", "29"])
    assert src.labels == {"L2": 30, "vertebrae_L4": 28, "29": 29}
    assert src.source == str(ct_path) and src.warnings == []
    assert src.seg.same_grid(src.ct)
    seg = read_volume(seg_path)
    write_volume(Volume(seg.array[1:], seg.affine), tmp_path / "cut.nrrd")
    with pytest.raises(CaseFormatError, match="not on the CT grid") as e:
        load_labelled_ct(ct_path, tmp_path / "cut.nrrd", ["L2"])
    assert e.value.field == "segmentation"
    with pytest.raises(CaseFormatError) as e:
        load_labelled_ct(ct_path, tmp_path / "cut.nrrd", ["L2"], fields=("--ct", "--seg"))
    assert e.value.field == "--seg"
    ct = read_volume(ct_path)
    write_volume(Volume(ct.array / 1000.0, ct.affine), tmp_path / "not_hu.nrrd")        # a normalised CT
    with pytest.raises(CaseFormatError) as e:
        load_labelled_ct(tmp_path / "not_hu.nrrd", seg_path, ["L2"], fields=("--ct", "--seg"))
    assert e.value.field == "--ct" and "not_hu.nrrd" in str(e.value)
    with pytest.raises(LevelError, match="T5"):
        load_labelled_ct(ct_path, seg_path, ["T5"])


def test_truth_errors_score_a_pose_against_the_case(generated):
    from RadGSRegLib.metrics import truth_errors
    from RadGSRegLib.metrics import registration_errors, target_points

    rows = json.loads((generated / "cases" / "summary.json").read_text())
    case = read_case(generated / "cases" / "case_001", ground_truth=True)
    at_truth = truth_errors(case, case.ground_truth)
    assert at_truth["mtre_mm"] == pytest.approx(0, abs=1e-9) and at_truth["mpd_mm"] == pytest.approx(0, abs=1e-9)
    before = truth_errors(case, case.initial_guess)
    assert before["mtre_mm"] == pytest.approx(rows[1]["initial_mtre_mm"])      # the generator's own number
    pts = target_points(case.seg, case.vertebra_label, max_points=2000)
    assert before == registration_errors(case.initial_guess, case.ground_truth, pts, case.views)
    with pytest.raises(ValueError, match="ground truth"):
        truth_errors(read_case(generated / "cases" / "case_001"), case.initial_guess)
