"""The Slicer module's logic on real MRML (the Qt-free slicer-core wheel), without the app."""
import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not slicer-core", allow_module_level=True)

from RadGSRegLib import slicer_bridge as sb  # noqa: E402
from RadGSRegLib.cases import CaseGenConfig, make_case  # noqa: E402
from RadGSRegLib.geometry import apply, pose_to_matrix  # noqa: E402
from RadGSRegLib.io import read_case, read_volume, write_case, write_volume  # noqa: E402
from RadGSRegLib.register import RegisterConfig  # noqa: E402
from RadGSRegLib.register.config import Level, RefineConfig, SearchConfig  # noqa: E402
from RadGSRegLib.volume import Volume, affine_from  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


def _oblique(rng):
    R = pose_to_matrix([25, -15, 40, 0, 0, 0])[:3, :3]
    return Volume(rng.normal(size=(7, 9, 11)).astype(np.float32), affine_from([12.0, -30.0, 5.0], [0.7, 1.3, 2.1], R))


def test_ijk_to_ras_matches_simpleitk_both_ways(scene, tmp_path, rng):
    vol = _oblique(rng)
    # our file -> Slicer's reader
    write_volume(vol, tmp_path / "v.nrrd")
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    reader = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    reader.SetFileName(str(tmp_path / "v.nrrd"))
    assert reader.ReadData(node)
    img = sitk.ReadImage(str(tmp_path / "v.nrrd"))
    ijk2ras = sb.array_from_vtk(node.GetIJKToRASMatrix)
    for ijk in [(0, 0, 0), (10, 8, 6), (3, 5, 2)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
        assert np.allclose(apply(ijk2ras, np.array(ijk, float)), apply(sb.RAS_FROM_LPS, lps), atol=1e-4)
    back = sb.node_to_volume(node)
    assert np.allclose(back.affine, vol.affine, atol=1e-5) and np.allclose(back.array, vol.array)
    # our node -> Slicer's writer -> SimpleITK
    node2 = sb.volume_to_node(scene, vol, "ours")
    writer = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    writer.SetFileName(str(tmp_path / "w.nrrd"))
    assert writer.WriteData(node2)
    assert np.allclose(read_volume(tmp_path / "w.nrrd").affine, vol.affine, atol=1e-5)


def test_transform_node_convention(scene, rng):
    T = pose_to_matrix([10, -20, 30, 5, -6, 7])
    node = sb.transform_to_node(scene, T)
    assert np.allclose(sb.node_to_transform(node), T)
    # in RAS, the node moves a CT point to where T puts it in the C-arm frame
    p_lps = rng.uniform(-50, 50, 3)
    F = sb.array_from_vtk(node.GetMatrixTransformToParent)
    assert np.allclose(apply(F, apply(sb.RAS_FROM_LPS, p_lps)), apply(sb.RAS_FROM_LPS, apply(T, p_lps)))


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory, small_phantom):
    ct, seg = small_phantom
    case = make_case(ct, seg, "L3", CaseGenConfig(rot_deg=4.0, trans_mm=8.0, pixels=96, seed=4),
                     np.random.default_rng(4))
    d = tmp_path_factory.mktemp("slicer") / "case"
    write_case(case, d)
    return d


def test_xray_nodes_sit_on_their_detectors(scene, phantom_case):
    nodes = sb.load_case(scene, phantom_case)
    case = nodes["case"]
    for k in ("ap", "lat"):
        v = case.views[k]
        M = sb.array_from_vtk(nodes[k].GetIJKToRASMatrix)
        assert np.allclose(apply(M, np.array([5.0, 7.0, 0.0])), apply(sb.RAS_FROM_LPS, v.pixel_to_world(5, 7)))
        assert np.allclose(sb.node_to_xray(nodes[k]), case.xrays[k])
    src = slicer.util.arrayFromMarkupsControlPoints(nodes["sources"])
    assert np.allclose(src[0], apply(sb.RAS_FROM_LPS, case.views["ap"].source))


def test_logic_registers_on_mrml_and_places_the_reconstruction(scene, phantom_case):
    nodes = sb.load_case(scene, phantom_case)
    truth = read_case(phantom_case, ground_truth=True)
    cfg = RegisterConfig(search=SearchConfig(rot_deg=(0.0,), candidates=1),
                         refine2d=RefineConfig(levels=[Level(64, 10, 1.0, 1.0, 30.0, None),
                                                       Level(96, 8, 0.5, 0.5, 20.0, 12.0)]),
                         reconstruct=True, recon_iterations=3)
    tnode, rnode, result = sb.register(scene, nodes["ct"], nodes["seg"], "L3", nodes["ap"], nodes["lat"],
                                       truth.views, config=cfg)
    from RadGSRegLib.metrics import registration_errors, target_points

    pts = target_points(truth.seg, truth.vertebra_label, max_points=2000)
    G_ras = sb.RAS_FROM_LPS @ truth.ground_truth @ sb.RAS_FROM_LPS
    F = sb.array_from_vtk(tnode.GetMatrixTransformToParent)
    ras = apply(sb.RAS_FROM_LPS, pts)
    assert np.linalg.norm(apply(F, ras) - apply(G_ras, ras), axis=1).mean() < 2.0
    assert registration_errors(truth.initial_guess, truth.ground_truth, pts)["mtre_mm"] > 4.0
    # the reconstruction: a 64^3 grid of 1.5 mm centred on the registered vertebra, in RAS
    arr = slicer.util.arrayFromVolume(rnode)
    assert arr.shape == (64, 64, 64)
    M = sb.array_from_vtk(rnode.GetIJKToRASMatrix)
    vertebra_ras = apply(sb.RAS_FROM_LPS @ result.T_ct_to_carm, truth.seg.label_points(truth.vertebra_label).mean(0))
    assert np.allclose(apply(M, np.full(3, 31.5)), vertebra_ras, atol=1.0) and np.allclose(np.abs(np.diag(M)[:3]), 1.5)


def test_export_case_round_trip(scene, phantom_case, tmp_path):
    nodes = sb.load_case(scene, phantom_case)
    case = nodes["case"]
    segnode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(nodes["seg"], segnode)
    s = segnode.GetSegmentation()
    for i in range(s.GetNumberOfSegments()):
        s.GetNthSegment(i).SetName(f"vertebrae_L{32 - s.GetNthSegment(i).GetLabelValue()}" if
                                   27 <= s.GetNthSegment(i).GetLabelValue() <= 31 else "other")
    sb.export_case(tmp_path / "out", nodes["ct"], segnode, "L3", nodes["ap"], nodes["lat"], case.views,
                   initial_guess=case.initial_guess)
    back = read_case(tmp_path / "out")
    assert np.allclose(back.ct.affine, case.ct.affine, atol=1e-5)
    assert np.abs(back.ct.array - case.ct.array).max() <= 0.5 + 1e-3
    # each segment keeps its own label value (not its position in the segmentation)
    assert back.vertebra_label == 29 and np.array_equal(back.seg.array, case.seg.array)
    assert np.allclose(back.xrays["lat"], case.xrays["lat"])


def test_ui_holds_every_widget_the_module_uses():
    tree = ET.parse(ROOT / "Resources" / "UI" / "RadGSReg.ui")
    names = {w.get("name") for w in tree.iter("widget")}
    code = (ROOT / "RadGSReg" / "RadGSReg.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", code))
    assert used and used <= names, f"missing in the .ui: {sorted(used - names)}"
    # every widget bound to the parameter node names a field of RadGSRegParameterNode
    bound = {p.find("string").text for p in tree.iter("property") if p.get("name") == "SlicerParameterName"}
    cls = next(n for n in ast.parse(code).body if isinstance(n, ast.ClassDef) and n.name == "RadGSRegParameterNode")
    fields = {st.target.id for st in cls.body if isinstance(st, ast.AnnAssign)}
    assert bound == fields, (bound ^ fields)


def test_module_file_follows_the_template():
    code = (ROOT / "RadGSReg" / "RadGSReg.py").read_text()
    classes = [n.name for n in ast.parse(code).body if isinstance(n, ast.ClassDef)]
    order = [c for c in classes if c in ("RadGSReg", "RadGSRegWidget", "RadGSRegLogic", "RadGSRegTest")]
    assert order == ["RadGSReg", "RadGSRegWidget", "RadGSRegLogic", "RadGSRegTest"]
    cm = (ROOT / "RadGSReg" / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cm and "slicer_add_python_unittest" in cm
