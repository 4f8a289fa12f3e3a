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

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import InputError
from .geometry import View, apply
from .io import Case, read_case, write_case
from .io.segmentation import Segmentation
from .volume import Volume

__all__ = ["RAS_FROM_LPS", "volume_to_node", "node_to_volume", "xray_to_node", "node_to_xray",
           "labelmap_from_node", "transform_to_node", "node_to_transform", "case_from_nodes", "register", "load_case",
           "export_case", "source_markups", "result_to_nodes", "set_display_range", "vertebra_from_nodes",
           "move_under", "array_from_vtk", "OVERLAY_COLOR_NODE_ID", "role_node", "ROLE_ATTRIBUTE"]

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _slicer():
    import slicer

    return slicer


def array_from_vtk(node_getter) -> np.ndarray:
    """A (4, 4) array of the vtkMatrix4x4 that ``node_getter`` fills (e.g. a node's
    ``GetIJKToRASMatrix`` or ``GetMatrixTransformToParent``)."""
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
    return Volume(arr, RAS_FROM_LPS @ array_from_vtk(node.GetIJKToRASMatrix))


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


def labelmap_from_node(node, reference_node, *, segment_ids=None) -> Segmentation:
    """Vertebra labels from a label map volume node or a segmentation node, on the grid of
    ``reference_node`` (the CT).

    A segmentation keeps each segment's own label value (``vtkSegment.GetLabelValue``: a
    label map loaded as a segmentation, as Slicer's Sample Data and *Add data* do, has
    segments ``Segment_26`` ... with values 26 ...; SlicerTotalSegmentator's have names such
    as ``vertebrae_L3``) and its name (``Segmentation.names``). Only when segments share a
    value (several layers of one-label segments) are they numbered 1..N in segment order
    (``Segmentation.positional``); then only the names identify them, and a level given as a
    label value is refused.
    """
    slicer = _slicer()
    import vtk

    if node.IsA("vtkMRMLSegmentationNode"):
        seg = node.GetSegmentation()
        chosen = list(segment_ids) if segment_ids is not None else \
            [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
        n = len(chosen)
        if n == 0:
            raise ValueError(f"segmentation '{node.GetName()}' has no segments")
        ids = vtk.vtkStringArray()
        values, seg_names = [], []
        for sid in chosen:
            ids.InsertNextValue(sid)
            values.append(int(seg.GetSegment(sid).GetLabelValue()))
            seg_names.append(seg.GetSegment(sid).GetName())
        scene = node.GetScene()
        tmp = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "RadGSReg temp labels")
        try:
            # the export numbers the segments 1..N in the order of ``ids``
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(node, ids, tmp, reference_node):
                raise ValueError(f"segmentation '{node.GetName()}' could not be exported to a label map")
            vol = node_to_volume(tmp, dtype=np.int32)
        finally:
            scene.RemoveNode(tmp)
        if len(set(values)) == n and min(values) > 0:          # each segment's own value
            lut = np.zeros(n + 1, np.int32)
            lut[1:] = values
            return Segmentation(Volume(lut[np.clip(vol.array, 0, n)], vol.affine), dict(zip(values, seg_names)))
        return Segmentation(vol, {i + 1: name for i, name in enumerate(seg_names)}, positional=True)
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
    return RAS_FROM_LPS @ array_from_vtk(node.GetMatrixTransformToParent) @ RAS_FROM_LPS


#: node attribute that marks the nodes this module made for a purpose (reused, not piled up)
ROLE_ATTRIBUTE = "RadGSReg.role"


def role_node(scene, class_name: str, role: str, name: str):
    """The node of ``class_name`` this module made for ``role`` (attribute
    :data:`ROLE_ATTRIBUTE`), or a new one named ``name``: repeated registrations and
    overlays update their nodes instead of adding new ones."""
    nodes = scene.GetNodesByClass(class_name)
    nodes.UnRegister(scene)                       # the method returns a new reference (as slicer.util does)
    for i in range(nodes.GetNumberOfItems()):
        node = nodes.GetItemAsObject(i)
        if node.GetAttribute(ROLE_ATTRIBUTE) == role:
            return node
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    return node


def source_markups(scene, views: dict[str, View], name: str = "RadGSReg X-ray sources"):
    """A point list with each view's X-ray source (RAS); the same node on every call."""
    node = role_node(scene, "vtkMRMLMarkupsFiducialNode", "sources", name)
    node.RemoveAllControlPoints()
    for vn, v in views.items():
        p = apply(RAS_FROM_LPS, v.source)
        node.AddControlPoint(float(p[0]), float(p[1]), float(p[2]), f"source {vn}")
    return node


# ------------------------------------------------------------------ the work
def vertebra_from_nodes(ct_node, seg_node, level) -> tuple[Volume, Volume, int]:
    """(CT, label map on the CT grid, the level's label value) from the scene's nodes; the
    level is resolved in the segmentation (segment names, label values or TotalSegmentator
    ids; :func:`~RadGSRegLib.levels.resolve_level`)."""
    from .levels import named_segment, resolve_level

    seg = labelmap_from_node(seg_node, ct_node)
    if seg.positional:
        # overlapping segments: the merged label map may hide part of the chosen one; paint it on top
        position = named_segment(str(level), seg.names)
        if position is not None:
            mask = labelmap_from_node(seg_node, ct_node, segment_ids=[_segment_id(seg_node, position - 1)])
            arr = seg.labelmap.array.copy()
            arr[mask.labelmap.array > 0] = position
            seg = dataclasses.replace(seg, labelmap=Volume(arr, seg.labelmap.affine))
    label = resolve_level(level, seg.labelmap, seg.names, source=f"segmentation '{seg_node.GetName()}'",
                          positional=seg.positional)
    return node_to_volume(ct_node), seg.labelmap, label


def _segment_id(seg_node, index: int) -> str:
    return seg_node.GetSegmentation().GetNthSegmentID(index)


def case_from_nodes(ct_node, seg_node, level, ap_node, lat_node, views: dict[str, View], *,
                    image_kind: str = "line_integral") -> Case:
    """A :class:`~RadGSRegLib.io.Case` (LPS) from the scene's nodes; the level is resolved in
    the segmentation (:func:`vertebra_from_nodes`), each X-ray checked against its view and
    everything for plausibility (:func:`RadGSRegLib.checks.check_case`: an impossible input
    raises an InputError naming the field; warnings are in ``Case.warnings``)."""
    from .checks import check_case

    ct, labels, label = vertebra_from_nodes(ct_node, seg_node, level)
    xrays = {"ap": node_to_xray(ap_node), "lat": node_to_xray(lat_node)}
    for vn in ("ap", "lat"):
        if xrays[vn].shape != views[vn].shape:
            raise InputError(f"the {vn} X-ray '{(ap_node if vn == 'ap' else lat_node).GetName()}' is "
                             f"{xrays[vn].shape[1]} x {xrays[vn].shape[0]} pixels, its geometry says "
                             f"{views[vn].size[0]} x {views[vn].size[1]}")
    case = Case(ct=ct, seg=labels, vertebra_label=label, vertebra_name=str(level), views=views, xrays=xrays,
                image_kind=image_kind)
    case.warnings = check_case(case)          # refuses what cannot be right, before any work
    case.checked = True
    return case


def register(scene, ct_node, seg_node, level, ap_node, lat_node, views: dict[str, View], *,
             image_kind: str = "line_integral", config=None, log: Callable[[str], None] | None = None,
             progress=None, transform_node=None, recon_node=None):
    """Register the CT vertebra ``level`` to the two X-ray nodes, in this process.

    Args:
        views: {"ap": View, "lat": View} (geometry.json, C-arm frame).
        level: "L3", "vertebrae_L3", a segment's name, or an explicit label value.
        config: :class:`~RadGSRegLib.register.RegisterConfig` (default: its defaults;
            ``reconstruct=True`` also returns the reconstruction as a volume node).
        progress: a callable taking :class:`~RadGSRegLib.progress.ProgressEvent` s.
        transform_node / recon_node: existing nodes to update instead of adding new ones.
    Returns:
        (transform node, reconstruction node or None, :class:`~RadGSRegLib.io.Result`).
    """
    from .register import RegisterConfig, run

    case = case_from_nodes(ct_node, seg_node, level, ap_node, lat_node, views, image_kind=image_kind)
    result = run(case, config or RegisterConfig(), log=log, progress=progress)
    nodes = result_to_nodes(scene, result, views, image_kind=image_kind, transform_node=transform_node,
                            recon_node=recon_node)
    return nodes["transform"], nodes.get("recon"), result


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


# ------------------------------------------------------------------ showing a result
def set_display_range(node, low_percentile: float = 1.0, high_percentile: float = 99.5, *,
                      nonzero: bool = False) -> tuple[float, float]:
    """Window/level of a scalar volume node from percentiles of its voxels (of the non-zero
    ones with ``nonzero``: a reconstruction is mostly empty space). Returns (min, max)."""
    slicer = _slicer()
    arr = np.asarray(slicer.util.arrayFromVolume(node), dtype=np.float64)
    vals = arr[arr != 0] if nonzero and np.any(arr != 0) else arr.ravel()
    lo, hi = (float(v) for v in np.percentile(vals, [low_percentile, high_percentile]))
    if not hi > lo:
        hi = lo + 1.0
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(lo, hi)
    return lo, hi


#: colour of the DRR drawn over each X-ray (a Slicer colour table node id)
OVERLAY_COLOR_NODE_ID = "vtkMRMLColorTableNodeGreen"


def result_to_nodes(scene, result, views: dict[str, View], *, image_kind: str = "line_integral",
                    transform_node=None, recon_node=None, name: str = "RadGSReg") -> dict:
    """Nodes showing a registration result: {"transform": linear transform node, "recon":
    reconstruction (or absent), "drr_ap"/"drr_lat": the DRRs at the result on their detector
    planes (or absent)}. Existing ``transform_node`` / ``recon_node`` are updated in place, and
    the DRR nodes of an earlier result are reused (:func:`role_node`).

    The reconstruction gets a window/level from its non-zero voxels; each DRR the X-ray's
    polarity (``image_kind="intensity"``: exp(-line integral), bone dark) and
    :data:`OVERLAY_COLOR_NODE_ID` as colour, for drawing it over its X-ray."""
    nodes = {"transform": transform_to_node(scene, result.T_ct_to_carm, f"{name} T_ct_to_carm", node=transform_node)}
    if result.recon is not None:
        nodes["recon"] = volume_to_node(scene, result.recon, f"{name} reconstruction", node=recon_node)
        set_display_range(nodes["recon"], 1.0, 99.5, nonzero=True)
    for vn, image in (result.drrs or {}).items():
        shown = np.exp(-np.asarray(image, np.float64)) if image_kind == "intensity" else image
        node = xray_to_node(scene, shown, views[vn], f"{name} DRR {vn.upper()}",
                            node=role_node(scene, "vtkMRMLScalarVolumeNode", f"drr_{vn}", f"{name} DRR {vn.upper()}"))
        set_display_range(node, 0.5, 99.5)
        node.GetDisplayNode().SetAndObserveColorNodeID(OVERLAY_COLOR_NODE_ID)
        nodes[f"drr_{vn}"] = node
    return nodes


def move_under(transform_node, *nodes) -> None:
    """Set ``transform_node`` as the parent of each node (None entries are skipped): the CT
    and its segmentation then appear where the registration puts them, over the X-rays."""
    for node in nodes:
        if node is not None:
            node.SetAndObserveTransformNodeID(transform_node.GetID() if transform_node is not None else None)
