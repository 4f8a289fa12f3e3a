"""MRML nodes <-> RadGSRegLib, without Qt: everything the Slicer module's logic does.

Runs inside 3D Slicer and, for tests, on the Qt-free MRML of the ``slicer-core`` wheel.
``slicer`` is imported lazily, inside the functions.

Frames: Slicer's world is RAS; files and this library are LPS. ``RAS_FROM_LPS`` =
diag(-1, -1, 1, 1) converts points both ways. A volume node's IJKToRAS matrix is
``RAS_FROM_LPS @ Volume.affine``. The registration result ``T_ct_to_carm`` (LPS) becomes a
linear transform node whose *to-parent* matrix is ``RAS_FROM_LPS @ T @ RAS_FROM_LPS``:
set it as the CT's parent and the CT moves onto the X-rays (C-arm frame, shown as RAS).
X-ray nodes are single-slice volumes placed on their detector plane, so the two X-rays,
the registered CT and the reconstruction line up in the 3-D view.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .geometry import View, apply
from .io import Case, read_case, write_case
from .io.segmentation import Segmentation
from .volume import Volume

__all__ = ["RAS_FROM_LPS", "volume_to_node", "node_to_volume", "xray_to_node", "node_to_xray",
           "labelmap_from_node", "transform_to_node", "node_to_transform", "case_from_nodes", "register", "load_case",
           "export_case", "source_markups", "run_self_test"]

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _slicer():
    import slicer

    return slicer


def _matrix(node_getter) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node_getter(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def _vtk_matrix(a: np.ndarray):
    import vtk

    m = vtk.vtkMatrix4x4()
    for i in range(4):
        for j in range(4):
            m.SetElement(i, j, float(a[i, j]))
    return m


# ------------------------------------------------------------------ volumes
def volume_to_node(scene, vol: Volume, name: str, *, node=None, labelmap: bool = False):
    """A scalar (or label map) volume node holding ``vol`` (LPS) in RAS."""
    slicer = _slicer()
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(vol.array))
    node.SetIJKToRASMatrix(_vtk_matrix(RAS_FROM_LPS @ vol.affine))
    if node.GetDisplayNode() is None and hasattr(node, "CreateDefaultDisplayNodes"):
        node.CreateDefaultDisplayNodes()
    return node


def node_to_volume(node, dtype=np.float32) -> Volume:
    """A volume node as a :class:`Volume` in LPS (a copy of the voxels)."""
    slicer = _slicer()
    arr = np.array(slicer.util.arrayFromVolume(node), dtype=dtype, copy=True)
    if arr.ndim != 3:
        raise ValueError(f"volume node '{node.GetName()}' is not a scalar 3-D volume (array shape {arr.shape})")
    return Volume(arr, RAS_FROM_LPS @ _matrix(node.GetIJKToRASMatrix))


def xray_to_node(scene, image: np.ndarray, view: View, name: str, *, node=None):
    """A single-slice volume node showing an X-ray ``[row, column]`` on its detector plane (RAS)."""
    su, sv = view.pixel_spacing
    A = np.eye(4)
    A[:3, 0] = view.u * su
    A[:3, 1] = view.v * sv
    A[:3, 2] = view.normal
    A[:3, 3] = view.detector_origin
    return volume_to_node(scene, Volume(np.asarray(image, np.float32)[None], A), name, node=node)


def node_to_xray(node) -> np.ndarray:
    """The 2-D image ``[row, column]`` of a single-slice volume node."""
    arr = node_to_volume(node).array
    if arr.shape[0] != 1:
        raise ValueError(f"X-ray node '{node.GetName()}' has {arr.shape[0]} slices; expected a 2-D image")
    return arr[0]


def labelmap_from_node(node, reference_node) -> Segmentation:
    """Vertebra labels from a label map volume node or a segmentation node, on the grid of
    ``reference_node`` (the CT). Segment names (``vertebrae_L3`` ...) are kept."""
    slicer = _slicer()
    import vtk

    if node.IsA("vtkMRMLSegmentationNode"):
        seg = node.GetSegmentation()
        ids = vtk.vtkStringArray()
        names = {}
        for i in range(seg.GetNumberOfSegments()):
            ids.InsertNextValue(seg.GetNthSegmentID(i))
            names[i + 1] = seg.GetNthSegment(i).GetName()
        scene = node.GetScene()
        tmp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "RadGSReg temp labels")
        try:
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, ids, tmp, reference_node):
                raise ValueError(f"segmentation '{node.GetName()}' could not be exported to a label map")
            vol = node_to_volume(tmp, dtype=np.int32)
        finally:
            scene.RemoveNode(tmp)
        return Segmentation(vol, names)
    vol = node_to_volume(node, dtype=np.int32)
    ref = node_to_volume(reference_node)
    if not vol.same_grid(ref):
        raise ValueError(f"label map '{node.GetName()}' is not on the grid of '{reference_node.GetName()}'")
    return Segmentation(vol, {})


# ------------------------------------------------------------------ transforms
def transform_to_node(scene, T_ct_to_carm: np.ndarray, name: str = "RadGSReg T_ct_to_carm", *, node=None):
    """A linear transform node that moves the CT onto the X-rays when set as its parent."""
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(_vtk_matrix(RAS_FROM_LPS @ np.asarray(T_ct_to_carm) @ RAS_FROM_LPS))
    return node


def node_to_transform(node) -> np.ndarray:
    """``T_ct_to_carm`` (LPS) of a transform node made by :func:`transform_to_node`."""
    return RAS_FROM_LPS @ _matrix(node.GetMatrixTransformToParent) @ RAS_FROM_LPS


def source_markups(scene, views: dict[str, View], name: str = "RadGSReg X-ray sources"):
    """A point list with each view's X-ray source (RAS)."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for vn, v in views.items():
        p = apply(RAS_FROM_LPS, v.source)
        node.AddControlPoint(float(p[0]), float(p[1]), float(p[2]), f"source {vn}")
    return node


# ------------------------------------------------------------------ the work
def case_from_nodes(ct_node, seg_node, level, ap_node, lat_node, views: dict[str, View], *,
                    image_kind: str = "line_integral") -> Case:
    """A :class:`~RadGSRegLib.io.Case` (LPS) from the scene's nodes; the level is resolved in
    the segmentation (names or TotalSegmentator ids) and each X-ray checked against its view."""
    from .levels import resolve_level

    seg = labelmap_from_node(seg_node, ct_node)
    label = resolve_level(level, seg.labelmap, seg.names, source=f"segmentation '{seg_node.GetName()}'")
    xrays = {"ap": node_to_xray(ap_node), "lat": node_to_xray(lat_node)}
    for vn in ("ap", "lat"):
        if xrays[vn].shape != views[vn].shape:
            raise ValueError(f"the {vn} X-ray is {xrays[vn].shape[1]} x {xrays[vn].shape[0]} pixels, "
                             f"its geometry says {views[vn].size[0]} x {views[vn].size[1]}")
    return Case(ct=node_to_volume(ct_node), seg=seg.labelmap, vertebra_label=label, vertebra_name=str(level),
                views=views, xrays=xrays, image_kind=image_kind)


def register(scene, ct_node, seg_node, level, ap_node, lat_node, views: dict[str, View], *,
             image_kind: str = "line_integral", config=None, log: Callable[[str], None] | None = None):
    """Register the CT vertebra ``level`` to the two X-ray nodes.

    Args:
        views: {"ap": View, "lat": View} (geometry.json, C-arm frame).
        level: "L3", "vertebrae_L3" or an explicit label value.
        config: :class:`~RadGSRegLib.register.RegisterConfig` (``reconstruct=True`` also
            returns the reconstruction as a volume node).
    Returns:
        (transform node, reconstruction node or None, :class:`~RadGSRegLib.io.Result`).
    """
    from .register import RegisterConfig, run

    case = case_from_nodes(ct_node, seg_node, level, ap_node, lat_node, views, image_kind=image_kind)
    result = run(case, config or RegisterConfig(), log=log)
    tnode = transform_to_node(scene, result.T_ct_to_carm)
    recon_node = volume_to_node(scene, result.recon, "RadGSReg reconstruction") if result.recon is not None else None
    return tnode, recon_node, result


def load_case(scene, path) -> dict:
    """Load a case folder into the scene: CT, label map, both X-rays (on their detector
    planes), source markups. Returns {"ct", "seg", "ap", "lat", "sources", "case"}."""
    case = read_case(path)
    nodes = {"case": case,
             "ct": volume_to_node(scene, case.ct, f"{Path(path).name} CT"),
             "ap": xray_to_node(scene, case.xrays["ap"], case.views["ap"], f"{Path(path).name} AP"),
             "lat": xray_to_node(scene, case.xrays["lat"], case.views["lat"], f"{Path(path).name} LAT"),
             "sources": source_markups(scene, case.views)}
    nodes["seg"] = (volume_to_node(scene, case.seg, f"{Path(path).name} labels", labelmap=True)
                    if case.seg is not None else None)
    return nodes


def export_case(path, ct_node, seg_node, level, ap_node, lat_node, views: dict[str, View], *,
                image_kind: str = "line_integral", initial_guess=None, overwrite: bool = False) -> Path:
    """Write the scene's inputs as a case folder (docs/case-format.md)."""
    case = case_from_nodes(ct_node, seg_node, level, ap_node, lat_node, views, image_kind=image_kind)
    case.initial_guess = initial_guess
    return write_case(case, path, overwrite=overwrite)


# ------------------------------------------------------------------ self-test
def run_self_test(scene, workdir, log: Callable[[str], None] = print) -> dict:
    """The module's self-test, Qt-free: builds a small phantom case, loads it into ``scene``,
    registers it through :func:`register`, and checks the transform node against the truth in
    RAS, then saves and reloads it with a storage node. Raises AssertionError on failure."""
    from .cases import CaseGenConfig, make_case
    from .levels import level_name
    from .metrics import registration_errors, target_points
    from .phantom import PhantomConfig, make_phantom
    from .register import RegisterConfig
    from .register.refine2d import Level, RefineConfig

    slicer = _slicer()
    workdir = Path(workdir)
    log("self-test: building a phantom case")
    ct, seg = make_phantom(PhantomConfig(spacing=(3.0, 3.0, 3.0), seed=5, n_vertebrae=3, top_level="L2"))
    case = make_case(ct, seg, "L3", CaseGenConfig(rot_deg=4.0, trans_mm=8.0, pixels=128, seed=5),
                     np.random.default_rng(5))
    write_case(case, workdir / "case", overwrite=True)
    nodes = load_case(scene, workdir / "case")
    truth = read_case(workdir / "case", ground_truth=True)
    # the case's labels arrive as a label map; also exercise the segmentation-node path
    segnode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "self-test segmentation")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(nodes["seg"], segnode)
    s = segnode.GetSegmentation()
    for i in range(s.GetNumberOfSegments()):
        s.GetNthSegment(i).SetName(f"vertebrae_{level_name(s.GetNthSegment(i).GetLabelValue())}")
    cfg = RegisterConfig(refine2d=RefineConfig(search_rot_deg=(0.0,), candidates=1,
                                               levels=[Level(64, 10, 1.0, 1.0, 30.0, None),
                                                       Level(128, 8, 0.5, 0.5, 20.0, 12.0)]))
    log("self-test: registering")
    tnode, _, result = register(scene, nodes["ct"], segnode, "L3", nodes["ap"], nodes["lat"], truth.views,
                                config=cfg, log=log)
    pts = target_points(truth.seg, truth.vertebra_label, max_points=2000)
    T = node_to_transform(tnode)
    err = registration_errors(T, truth.ground_truth, pts)["mtre_mm"]
    err0 = registration_errors(truth.initial_guess, truth.ground_truth, pts)["mtre_mm"]
    # in RAS: the transform node maps the CT's RAS points where the truth does
    ras_pts = apply(RAS_FROM_LPS, pts)
    F = _matrix(tnode.GetMatrixTransformToParent)
    G_ras = RAS_FROM_LPS @ truth.ground_truth @ RAS_FROM_LPS
    ras_err = float(np.linalg.norm(apply(F, ras_pts) - apply(G_ras, ras_pts), axis=1).mean())
    assert abs(ras_err - err) < 1e-6, (ras_err, err)
    assert err < 2.0, f"self-test registration error {err:.2f} mm (started at {err0:.2f} mm)"
    # the CT can sit under the transform, as the module's overlay puts it
    nodes["ct"].SetAndObserveTransformNodeID(tnode.GetID())
    assert nodes["ct"].GetParentTransformNode() is tnode
    # save and reload the transform with a storage node
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(workdir / "result.h5"))
    assert storage.WriteData(tnode), "writing the transform failed"
    back = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "reloaded")
    reader = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    reader.SetFileName(str(workdir / "result.h5"))
    assert reader.ReadData(back), "reading the transform back failed"
    assert np.allclose(node_to_transform(back), T, atol=1e-5)
    from .io import read_transform

    assert np.allclose(read_transform(workdir / "result.h5"), T, atol=1e-5)   # Slicer's file = our convention
    log(f"self-test passed: mTRE {err0:.2f} mm -> {err:.2f} mm")
    return {"initial_mtre_mm": err0, "mtre_mm": err, "runtime_s": result.runtime_s}
