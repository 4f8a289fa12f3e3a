import hashlib

import numpy as np
import pytest
import SimpleITK as sitk

from RadGSRegLib.bench.rtk import rtk_available, rtk_joseph
from RadGSRegLib.cli import main
from RadGSRegLib.drr import DRR, hu_to_mu
from RadGSRegLib.io import read_case, read_segmentation, read_volume
from RadGSRegLib.levels import LevelError, resolve_level
from RadGSRegLib.sample_data import LUMBAR_LEVELS, lumbar_ct, recorded_checksums
from RadGSRegLib.volume import Volume


@pytest.fixture(scope="module")
def sample():
    sd = lumbar_ct()
    return sd, read_volume(sd.ct), read_segmentation(sd.seg)


def test_checksums_and_notice():
    sd = lumbar_ct()
    sums = recorded_checksums()
    assert set(sums) == {"example_ct.nii.gz", "totalseg.nii.gz", "LICENSE"}
    for name, digest in sums.items():
        assert hashlib.sha256((sd.ct.parent / name).read_bytes()).hexdigest() == digest, name
    assert "Apache License" in sd.license.read_text()
    notice = sd.notice.read_text()
    assert "TotalSegmentator" in notice and "2.18.0" in notice and "10.1148/ryai.230024" in notice


def test_reader_frames_agree_with_simpleitk(sample):
    sd, ct, _ = sample
    img = sitk.ReadImage(str(sd.ct))
    assert ct.array.shape == (112, 101, 122)
    assert np.allclose(ct.spacing, 3.0)
    for ijk in [(0, 0, 0), (121, 100, 111), (60, 20, 50)]:
        assert np.allclose(ct.index_to_world(np.array(ijk, float)), img.TransformIndexToPhysicalPoint(ijk), atol=1e-4)
    # LPS: the file's direction diag(-1, -1, 1): increasing i goes to the patient's right (-x)
    assert ct.affine[0, 0] < 0 and ct.affine[1, 1] < 0 and ct.affine[2, 2] > 0
    assert ct.array.min() < -1000 and ct.array.max() > 2000


def test_totalsegmentator_ids_resolve(sample):
    _, ct, seg = sample
    assert seg.labelmap.same_grid(ct)
    ids = {lv: resolve_level(lv, seg.labelmap) for lv in LUMBAR_LEVELS}
    assert ids == {"L1": 31, "L2": 30, "L3": 29, "L4": 28, "L5": 27, "S1": 26}
    # anatomy: L1 above L5 (LPS +z is superior), bodies roughly stacked
    z = [seg.labelmap.label_centroid(ids[f"L{i}"])[2] for i in range(1, 6)]
    assert all(a > b for a, b in zip(z, z[1:]))
    assert resolve_level("vertebrae_L4", seg.labelmap) == 28
    assert resolve_level(29, seg.labelmap) == 29 and resolve_level("29", seg.labelmap) == 29


def test_cut_and_absent_levels_are_refused(sample):
    _, _, seg = sample
    with pytest.raises(LevelError, match=r"T12 .*cut by the edge of the scan.*top.*complete levels: .*L1 \(31\)"):
        resolve_level("T12", seg.labelmap, source="totalseg.nii.gz")
    with pytest.raises(LevelError, match=r"T5 .*absent.*present: .*L3 \(29\)"):
        resolve_level("T5", seg.labelmap)
    with pytest.raises(LevelError, match="label 77 is absent"):
        resolve_level(77, seg.labelmap)
    assert resolve_level("T12", seg.labelmap, allow_cut=True) == 32


def test_slicer_segmentation_names(tmp_path, sample):
    _, _, seg = sample
    # a Slicer segmentation with its own label values and TotalSegmentator-style names
    lab = np.zeros_like(seg.labelmap.array)
    for value, lv in ((3, 29), (4, 28)):
        lab[seg.labelmap.array == lv] = value
    img = Volume(lab.astype(np.uint8), seg.labelmap.affine).to_sitk()
    for n, (name, value) in enumerate((("vertebrae_L3", 3), ("vertebrae_L4", 4))):
        img.SetMetaData(f"Segment{n}_Name", name)
        img.SetMetaData(f"Segment{n}_LabelValue", str(value))
        img.SetMetaData(f"Segment{n}_Layer", "0")
        img.SetMetaData(f"Segment{n}_ID", f"Segment_{n + 1}")
    sitk.WriteImage(img, str(tmp_path / "vert.seg.nrrd"))
    s = read_segmentation(tmp_path / "vert.seg.nrrd")
    assert s.names == {3: "vertebrae_L3", 4: "vertebrae_L4"}
    assert resolve_level("L3", s.labelmap, s.names) == 3
    assert resolve_level("vertebrae_L4", s.labelmap, s.names) == 4
    with pytest.raises(LevelError, match=r"present: vertebrae_L3 \(3\), vertebrae_L4 \(4\)"):
        resolve_level("L1", s.labelmap, s.names)


def test_offgrid_label_map_is_refused(tmp_path, sample):
    sd, ct, seg = sample
    shifted = Volume(seg.labelmap.array, seg.labelmap.affine.copy())
    shifted.affine[0, 3] += 3.0
    sitk.WriteImage(shifted.to_sitk(), str(tmp_path / "shifted.nii.gz"))
    rc = main(["simulate-cases", "--ct", str(sd.ct), "--seg", str(tmp_path / "shifted.nii.gz"), "--levels", "L3",
               "--n", "1", "--out", str(tmp_path / "c"), "--pixels", "32"])
    assert rc == 1 and not (tmp_path / "c" / "case_000").exists()


@pytest.mark.parametrize("kind", ["line_integral", "intensity"])
def test_sample_case_command(tmp_path, kind):
    assert main(["sample-case", "--level", "L2", "--out", str(tmp_path / "c"), "--pixels", "48",
                 "--image-kind", kind, "--seed", "3"]) == 0
    case = read_case(tmp_path / "c", ground_truth=True)
    assert case.vertebra_label == 30 and case.image_kind == kind and case.xrays["lat"].shape == (48, 48)
    assert main(["sample-case", "--level", "T12", "--out", str(tmp_path / "d"), "--pixels", "48"]) == 1


@pytest.mark.skipif(not rtk_available(), reason="itk-rtk is not installed (pip install -e .[test])")
def test_real_ct_case_matches_rtk(tmp_path):
    assert main(["simulate-cases", "--ct", str(lumbar_ct().ct), "--seg", str(lumbar_ct().seg), "--levels", "L4",
                 "--n", "1", "--out", str(tmp_path), "--pixels", "64", "--seed", "2"]) == 0
    case = read_case(tmp_path / "case_000", ground_truth=True)
    views = [case.views["ap"], case.views["lat"]]
    ours = DRR.from_ct(case.ct).render(views, case.ground_truth).numpy()
    ref = rtk_joseph(hu_to_mu(case.ct.array), case.ground_truth @ case.ct.affine, views)
    for i in range(2):
        assert np.corrcoef(ours[i].ravel(), ref[i].ravel())[0, 1] >= 0.99
        assert ours[i].sum() / ref[i].sum() == pytest.approx(1.0, abs=0.02)
