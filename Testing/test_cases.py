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


def test_xrays_show_the_true_pose(generated):
    case = read_case(generated / "cases" / "case_001", ground_truth=True)
    drr = DRR.from_ct(case.ct)
    views = [case.views["ap"], case.views["lat"]]
    at_truth = drr.render(views, case.ground_truth).numpy()
    at_init = drr.render(views, case.initial_guess).numpy()
    for i, k in enumerate(("ap", "lat")):
        assert _ncc(case.xrays[k], at_truth[i]) > 0.9
        assert _ncc(case.xrays[k], at_truth[i]) > _ncc(case.xrays[k], at_init[i]) + 0.02


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
