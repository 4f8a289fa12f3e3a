import json

import numpy as np
import pytest
from tiny_cases import tiny_case
import SimpleITK as sitk

from RadGSRegLib import io
from RadGSRegLib.geometry import biplanar_views, invert, pose_to_matrix
from RadGSRegLib.io import CaseFormatError
from RadGSRegLib.volume import Volume, affine_from


def _oblique_volume(rng, shape=(12, 10, 8)):
    R = pose_to_matrix([20, -10, 35, 0, 0, 0])[:3, :3]
    return Volume(rng.normal(size=shape).astype(np.float32), affine_from([5.0, -7.0, 11.0], [0.8, 1.1, 2.5], R))


@pytest.mark.parametrize("ext", [".nrrd", ".nii.gz", ".mha"])
def test_volume_round_trip_keeps_lps_geometry(tmp_path, rng, ext):
    vol = _oblique_volume(rng)
    io.write_volume(vol, tmp_path / f"v{ext}")
    back = io.read_volume(tmp_path / f"v{ext}")
    assert np.allclose(back.array, vol.array)
    assert np.allclose(back.affine, vol.affine, atol=1e-5)
    # our index->world agrees with SimpleITK's on a non-trivial direction
    img = sitk.ReadImage(str(tmp_path / f"v{ext}"))
    for ijk in [(0, 0, 0), (3, 2, 7), (7, 9, 11)]:
        assert np.allclose(vol.index_to_world(np.array(ijk, float)), img.TransformIndexToPhysicalPoint(ijk), atol=1e-4)


def test_dicom_series_folder(tmp_path, rng):
    arr = rng.integers(-1000, 2000, (6, 16, 12)).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.7, 0.7, 2.0))
    img.SetOrigin((-5.0, 3.0, 10.0))
    (tmp_path / "dcm").mkdir()
    names = [str(tmp_path / "dcm" / f"s{k:03d}.dcm") for k in range(arr.shape[0])]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(arr.shape[0]):
        sl = img[:, :, k]
        sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0020|0013", str(k))
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1")
        sl.SetMetaData("0018|0050", "2.0")
        writer.SetFileName(names[k])
        writer.Execute(sl)
    vol = io.read_volume(tmp_path / "dcm")
    assert vol.array.shape == arr.shape
    assert np.allclose(vol.array, arr)
    assert np.allclose(vol.spacing, [0.7, 0.7, 2.0], atol=1e-4)
    assert np.allclose(vol.origin, [-5, 3, 10], atol=1e-4)


@pytest.mark.parametrize("ext", [".nrrd", ".tif", ".png", ".dcm"])
def test_xray_formats(tmp_path, rng, ext):
    img = rng.uniform(0, 1000, (20, 30)).astype(np.float32)
    if ext in (".png", ".dcm"):
        img = np.round(img).astype(np.uint16)
        sitk.WriteImage(sitk.GetImageFromArray(img), str(tmp_path / f"x{ext}"))
    else:
        io.write_xray(img, tmp_path / f"x{ext}")
    back = io.read_xray(tmp_path / f"x{ext}")
    assert back.shape == (20, 30) and back.dtype == np.float32
    assert np.allclose(back, img)


def test_xray_refuses_rgb_and_volumes(tmp_path):
    sitk.WriteImage(sitk.Compose([sitk.Image(8, 8, sitk.sitkUInt8)] * 3), str(tmp_path / "rgb.png"))
    with pytest.raises(CaseFormatError, match="grey-level"):
        io.read_xray(tmp_path / "rgb.png")
    sitk.WriteImage(sitk.Image(8, 8, 3, sitk.sitkFloat32), str(tmp_path / "vol.nrrd"))
    with pytest.raises(CaseFormatError, match="3 slices"):
        io.read_xray(tmp_path / "vol.nrrd")


def test_transform_file_direction_convention(tmp_path, rng):
    T = pose_to_matrix([12, -7, 25, 30, -40, 15])  # T_ct_to_carm
    io.write_transform(T, tmp_path / "t.h5")
    tx = sitk.ReadTransform(str(tmp_path / "t.h5"))
    # the file holds the resampling transform: C-arm point -> CT point
    for _ in range(5):
        p_ct = rng.uniform(-100, 100, 3)
        p_carm = T[:3, :3] @ p_ct + T[:3, 3]
        assert np.allclose(tx.TransformPoint(tuple(p_carm)), p_ct, atol=1e-6)
    assert np.allclose(io.read_transform(tmp_path / "t.h5"), T)
    with pytest.raises(FileExistsError):
        io.write_transform(T, tmp_path / "t.h5")
    io.write_transform(invert(T), tmp_path / "t.h5", overwrite=True)
    assert np.allclose(io.read_transform(tmp_path / "t.h5"), invert(T))


def test_transform_refuses_non_rigid(tmp_path):
    tx = sitk.AffineTransform(3)
    tx.SetMatrix((2, 0, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteTransform(tx, str(tmp_path / "a.h5"))
    with pytest.raises(CaseFormatError, match="not rigid"):
        io.read_transform(tmp_path / "a.h5")


# ------------------------------------------------------------------ case folders
def _tiny_case(rng):
    return tiny_case(rng, extra={"note": "tiny"})


@pytest.fixture()
def case_dir(tmp_path, rng):
    case = _tiny_case(rng)
    io.write_case(case, tmp_path / "case", ct_dtype="float32")
    return case, tmp_path / "case"


def test_case_round_trip(case_dir):
    case, path = case_dir
    back = io.read_case(path, ground_truth=True)
    assert np.allclose(back.ct.array, case.ct.array) and np.allclose(back.ct.affine, case.ct.affine)
    assert np.array_equal(back.seg.array, case.seg.array)
    assert back.vertebra_label == 29 and back.vertebra_name == "L3"
    for k in ("ap", "lat"):
        assert np.allclose(back.xrays[k], case.xrays[k])
        assert np.allclose(back.views[k].projection_matrix(), case.views[k].projection_matrix())
        assert back.views[k].size == (40, 32)
    assert np.allclose(back.initial_guess, case.initial_guess)
    assert np.allclose(back.ground_truth, case.ground_truth)
    assert back.extra == {"note": "tiny"}
    # registration reads never see the answer
    assert io.read_case(path).ground_truth is None


def test_case_int16_ct_is_whole_hu(tmp_path, rng):
    case = _tiny_case(rng)
    io.write_case(case, tmp_path / "c")
    back = io.read_case(tmp_path / "c")
    assert np.abs(back.ct.array - case.ct.array).max() <= 0.5 + 1e-4


def test_writer_refuses_to_overwrite(case_dir, rng):
    case, path = case_dir
    before = (path / "case.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite"):
        io.write_case(case, path)
    assert (path / "case.json").read_text() == before
    io.write_case(case, path, overwrite=True)
    assert io.read_case(path).vertebra_label == 29


def _edit(path, file, fn):
    data = json.loads((path / file).read_text())
    fn(data)
    (path / file).write_text(json.dumps(data))


@pytest.mark.parametrize("edit,file_,field_,msg", [
    (lambda p: (p / "ct.nrrd").unlink(), "ct.nrrd", "ct", "not found"),
    (lambda p: (p / "case.json").write_text("{not json"), "case.json", None, "not valid JSON"),
    (lambda p: _edit(p, "case.json", lambda d: d.pop("ct")), "case.json", "ct", "missing"),
    (lambda p: _edit(p, "case.json", lambda d: d.update(vertebra_label=12)), "case.json", "vertebra_label", "absent"),
    (lambda p: _edit(p, "case.json", lambda d: d.pop("segmentation")), "case.json", "segmentation", "together"),
    (lambda p: _edit(p, "geometry.json", lambda d: d["views"]["ap"].update(detector_u=[1, 1, 0])),
     "geometry.json", "views.ap.detector_u", "unit"),
    (lambda p: _edit(p, "geometry.json", lambda d: d["views"]["lat"].update(source=d["views"]["lat"]["detector_origin"])),
     "geometry.json", "views.lat", "singular"),
    (lambda p: _edit(p, "geometry.json", lambda d: d["views"]["ap"].update(size=[30, 20])),
     "xray_ap.nrrd", "views.ap.size", "geometry says"),
    (lambda p: _edit(p, "geometry.json", lambda d: d["views"]["ap"].update(source=[0, 1])),
     "geometry.json", "views.ap.source", "shape"),
    (lambda p: _edit(p, "geometry.json", lambda d: d["views"].pop("lat")), "geometry.json", "views.lat", "missing"),
    (lambda p: _edit(p, "geometry.json", lambda d: d.update(image_kind="raw")), "geometry.json", "image_kind", "one of"),
    (lambda p: _edit(p, "geometry.json", lambda d: d["views"]["ap"]["projection_matrix"][0].__setitem__(3, 5.0)),
     "geometry.json", "views.ap.projection_matrix", "disagrees"),
    (lambda p: _edit(p, "case.json", lambda d: d["initial_guess"]["T_ct_to_carm"][0].__setitem__(0, 2.0)),
     "case.json", "initial_guess.T_ct_to_carm", "rigid"),
    (lambda p: _edit(p, "case.json", lambda d: d["initial_guess"]["T_ct_to_carm"][0].__setitem__(3, float("nan"))),
     "case.json", "initial_guess.T_ct_to_carm", "NaN"),
])
def test_case_validation_names_file_and_field(case_dir, edit, file_, field_, msg):
    _, path = case_dir
    edit(path)
    with pytest.raises(CaseFormatError, match=msg) as e:
        io.read_case(path)
    assert e.value.file.endswith(file_)
    assert e.value.field == field_


def test_case_validation_nan_ct_and_offgrid_seg(case_dir):
    case, path = case_dir
    arr = case.ct.array.copy()
    arr[1, 1, 1] = np.nan
    io.write_volume(Volume(arr, case.ct.affine), path / "ct.nrrd", overwrite=True)
    with pytest.raises(CaseFormatError, match="NaN") as e:
        io.read_case(path)
    assert e.value.field == "ct"
    io.write_volume(case.ct, path / "ct.nrrd", overwrite=True)
    io.write_volume(Volume(case.seg.array[1:], case.seg.affine), path / "seg.nrrd", overwrite=True)
    with pytest.raises(CaseFormatError, match="not on the CT grid") as e:
        io.read_case(path)
    assert e.value.field == "segmentation"


def test_ground_truth_missing_is_reported(case_dir):
    _, path = case_dir
    _edit(path, "case.json", lambda d: d.pop("ground_truth"))
    assert io.read_case(path).ground_truth is None
    with pytest.raises(CaseFormatError, match="no known answer"):
        io.read_case(path, ground_truth=True)
    assert io.read_case(path, ground_truth="if-present").ground_truth is None


def test_ground_truth_if_present(case_dir):
    """"if-present" reads the truth a case has (as True does), is silent when it has none,
    and validates it when it is there; the default never reads it."""
    case, path = case_dir
    back = io.read_case(path, ground_truth="if-present")
    assert np.allclose(back.ground_truth, case.ground_truth)
    assert io.read_case(path).ground_truth is None
    _edit(path, "case.json", lambda d: d["ground_truth"].update(T_ct_to_carm=np.eye(4).tolist()[:3]))
    with pytest.raises(CaseFormatError, match="shape") as e:
        io.read_case(path, ground_truth="if-present")
    assert e.value.field == "ground_truth.T_ct_to_carm"
    assert io.read_case(path).ground_truth is None                   # registration never looks
    for bad in ("yes", "if_present", None, 1):
        with pytest.raises(ValueError, match="'if-present'"):
            io.read_case(path, ground_truth=bad)


def test_result_round_trip(tmp_path, rng):
    recon = _oblique_volume(rng)
    T = pose_to_matrix([3, 4, 5, 6, 7, 8])
    io.write_result(io.Result(T, runtime_s={"reconstruction": 0.2}, recon=recon, info={"method": "test"}), tmp_path / "out")
    r = io.read_result(tmp_path / "out")
    assert np.allclose(r.T_ct_to_carm, T) and r.runtime_s == {"reconstruction": 0.2}
    assert np.allclose(r.recon.affine, recon.affine, atol=1e-5) and r.info["method"] == "test"
    assert "version" in r.info
    with pytest.raises(FileExistsError):
        io.write_result(io.Result(T), tmp_path / "out")
    # a tampered transform.h5 is caught
    io.write_transform(np.eye(4), tmp_path / "out" / "transform.h5", overwrite=True)
    with pytest.raises(CaseFormatError, match="disagrees"):
        io.read_result(tmp_path / "out")


def _dicom_xray(path, tags, spacing=0.3, size=(40, 30)):
    img = sitk.Image(size[0], size[1], sitk.sitkUInt16)
    img.SetSpacing((spacing, spacing))          # GDCM writes Imager Pixel Spacing from it
    for k, v in tags.items():
        img.SetMetaData(k, v)
    sitk.WriteImage(img, str(path))


def test_view_from_dicom_tags(tmp_path):
    from RadGSRegLib.io import view_from_dicom

    base = {"0008|0060": "XA", "0018|1110": "1124", "0018|1111": "700"}
    _dicom_xray(tmp_path / "ap.dcm", {**base, "0018|1510": "0", "0018|1511": "0"})
    ap = view_from_dicom(tmp_path / "ap.dcm", "ap")
    ref = biplanar_views(pixels=(40, 30), detector_mm=(12.0, 9.0))["ap"]
    assert np.allclose(ap.projection_matrix(), ref.projection_matrix()) and ap.size == (40, 30)
    # LAO 90: the detector on the patient's left, the source on the right (-x in LPS)
    _dicom_xray(tmp_path / "lao.dcm", {**base, "0018|1510": "90"})
    lao = view_from_dicom(tmp_path / "lao.dcm")
    assert np.allclose(lao.source, [-700, 0, 0], atol=1e-9) and lao.detector_center[0] > 400
    # cranial tilt: the detector moves toward the head, the source toward the feet
    _dicom_xray(tmp_path / "cra.dcm", {**base, "0018|1511": "20"})
    cra = view_from_dicom(tmp_path / "cra.dcm")
    assert cra.source[2] < -200 and cra.detector_center[2] > 100
    assert np.linalg.norm(cra.source) == pytest.approx(700)
    # a missing tag is named
    _dicom_xray(tmp_path / "bad.dcm", {"0008|0060": "XA", "0018|1111": "700"})
    with pytest.raises(CaseFormatError, match=r"Distance Source to Detector \(0018,1110\)"):
        view_from_dicom(tmp_path / "bad.dcm")


def test_coarsen_keeps_the_place_the_line_integrals_and_the_labels(small_phantom):
    """coarsen: block means for intensities (a ray's sum through whole blocks is kept), the
    block's voxel f // 2 for labels, the new grid where the old one was (a rotated,
    anisotropic affine: block centres map to the mean of their voxels' positions)."""
    from scipy.spatial.transform import Rotation

    from RadGSRegLib.volume import block_factors, coarsen

    ct, seg = small_phantom
    R = Rotation.from_euler("xyz", [10, -20, 30], degrees=True).as_matrix()
    A = affine_from([5.0, -7.0, 11.0], [1.0, 0.5, 1.5], R)
    vol, lab = Volume(ct.array.astype(np.float32), A), Volume(seg.array, A)
    f = block_factors(vol.spacing, 2.0)
    assert f == (2, 4, 1) and block_factors([3.0, 3.0, 3.0], 2.0) == (1, 1, 1)
    c, cl = coarsen(vol, f), coarsen(lab, f, labels=True)
    K, J, I = vol.array.shape
    assert c.array.shape == (K // 1, J // 4, I // 2) and c.array.dtype == np.float32
    assert np.allclose(c.spacing, [2.0, 2.0, 1.5])
    # place: the coarse voxel (i, j, k) sits at the mean position of its block's voxels
    i, j, k = 3, 2, 5
    block = np.array([[i * 2 + a, j * 4 + b, k] for a in range(2) for b in range(4)], dtype=float)
    assert np.allclose(c.index_to_world([[i, j, k]])[0], vol.index_to_world(block).mean(0))
    # line integrals along k through whole blocks: sums over the block's rays, averaged
    crop = vol.array[:, :J // 4 * 4, :I // 2 * 2].astype(np.float64)
    fine_sum = crop.sum(0).reshape(J // 4, 4, I // 2, 2).mean(axis=(1, 3))
    assert np.allclose(c.array.sum(0), fine_sum, rtol=1e-4, atol=1e-2)
    # labels stay labels: the block's voxel (f // 2), every coarse label one of the fine ones
    assert cl.array.dtype == lab.array.dtype and set(np.unique(cl.array)) <= set(np.unique(lab.array))
    assert cl.array[k, j, i] == lab.array[k, j * 4 + 2, i * 2 + 1]
    assert coarsen(vol, (1, 1, 1)) is vol
    with pytest.raises(ValueError, match="integers >= 1"):
        coarsen(vol, (0, 1, 1))
