"""Trying the Slicer module and testing it, without Qt: the bundled sample loaded the way
Slicer's Sample Data loads it, AP + lateral pairs simulated from the scene's CT, how far a
transform node is from the truth, and the module's self-test (run by ``RadGSRegTest`` inside
Slicer and by ``Testing/test_slicer_module.py`` on slicer-core).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

from .geometry import apply
from .slicer_bridge import (RAS_FROM_LPS, array_from_vtk, move_under, node_to_transform, vertebra_from_nodes,
                            xray_to_node)
from .volume import Volume

__all__ = ["load_sample_data", "simulate_xray_nodes", "check_registration", "run_self_test", "SELF_TEST_SEEDS"]


def load_sample_data(scene, ct_path=None, seg_path=None):
    """Load the bundled sample the way Slicer's Sample Data entry does ("VolumeFile" for the
    CT, "SegmentationFile" for the labels): the CT through a volume archetype storage node,
    the labels through ``vtkSlicerSegmentationsModuleLogic.LoadSegmentationFromFile`` (what
    Slicer's segmentation reader calls for a label-map file), so segments are named
    ``Segment_26`` ... and keep their label values. Returns (CT node, segmentation node)."""
    import slicer

    from .sample_data import lumbar_ct

    sd = lumbar_ct()
    ct_path, seg_path = Path(ct_path or sd.ct), Path(seg_path or sd.seg)
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "RadGSReg lumbar CT")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(ct_path))
    if not storage.ReadData(ct):
        raise ValueError(f"{ct_path}: Slicer's volume reader could not read it")
    ct.SetAndObserveStorageNodeID(storage.GetID())
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    seg = logic.LoadSegmentationFromFile(str(seg_path), True, "RadGSReg lumbar CT vertebrae", None)
    if seg is None:
        raise ValueError(f"{seg_path}: Slicer's segmentation reader could not read it")
    return ct, seg


def simulate_xray_nodes(scene, ct_node, seg_node, level, *, rot_deg: float = 5.0, trans_mm: float = 10.0,
                        pixels: int = 256, seed: int = 0, image_kind: str = "line_integral", sim=None,
                        name: str = "simulated") -> dict:
    """A realistic AP + lateral pair of the scene's CT at a random pose (±``rot_deg`` /
    ±``trans_mm`` per axis around the vertebra at the isocentre), for trying the module and
    for its self-test. ``sim``: the X-ray formation (default
    :class:`~RadGSRegLib.simulate.XraySimConfig`: beam hardening, scatter, noise, blur).
    Returns {"ap", "lat": X-ray nodes on their detector planes, "views", "ground_truth": the
    true ``T_ct_to_carm``, "label": the vertebra's label value, "case": the simulated
    :class:`~RadGSRegLib.io.Case` (LPS, with its truth; made by
    :func:`~RadGSRegLib.cases.make_case` as every generated case is)}."""
    from .cases import CaseGenConfig, make_case
    from .simulate import XraySimConfig

    ct, labels, label = vertebra_from_nodes(ct_node, seg_node, level)
    cfg = CaseGenConfig(rot_deg=rot_deg, trans_mm=trans_mm, pixels=pixels, seed=seed,
                        sim=dataclasses.replace(sim or XraySimConfig(), output=image_kind))
    sim = make_case(ct, labels, str(level), cfg, np.random.default_rng(seed), label=label)
    return {"ap": xray_to_node(scene, sim.xrays["ap"], sim.views["ap"], f"{name} AP"),
            "lat": xray_to_node(scene, sim.xrays["lat"], sim.views["lat"], f"{name} LAT"),
            "views": sim.views, "ground_truth": sim.ground_truth, "label": label, "case": sim}


def check_registration(transform_node, ground_truth: np.ndarray, seg: Volume, label: int, *,
                       ct_node=None) -> dict:
    """How far a transform node is from the truth, measured the way Slicer applies it.

    Returns {"mtre_mm": mean target registration error over the vertebra's voxels (LPS,
    metrics.md), "ras_mtre_mm": the same measured in RAS through the node's to-parent matrix
    (equal when the node follows the RAS/LPS convention), "ct_moved_mm": when ``ct_node`` is
    given, the mean distance between where the CT's parent transform puts the vertebra and
    where the truth does (0 when the CT sits under this node)}."""
    from .metrics import registration_errors, target_points

    pts = target_points(seg, label, max_points=2000)
    T = node_to_transform(transform_node)
    out = {"mtre_mm": registration_errors(T, ground_truth, pts)["mtre_mm"]}
    ras = apply(RAS_FROM_LPS, pts)
    truth_ras = apply(RAS_FROM_LPS @ ground_truth @ RAS_FROM_LPS, ras)
    F = array_from_vtk(transform_node.GetMatrixTransformToParent)
    out["ras_mtre_mm"] = float(np.linalg.norm(apply(F, ras) - truth_ras, axis=1).mean())
    if ct_node is not None:
        import vtk

        parent = ct_node.GetParentTransformNode()
        M = vtk.vtkMatrix4x4()
        if parent is not None:
            parent.GetMatrixTransformToWorld(M)
        W = np.array([[M.GetElement(i, j) for j in range(4)] for i in range(4)])
        out["ct_moved_mm"] = float(np.linalg.norm(apply(W, ras) - truth_ras, axis=1).mean())
    return out


#: the self-test's cases: level -> seed of its simulated pair (±5° / ±10 mm from the nominal
#: pose, 256² detector)
SELF_TEST_SEEDS = {"L1": 2, "L2": 2, "L3": 2, "L4": 2, "L5": 2}


def run_self_test(scene, register_fn, ct_node, seg_node, workdir, *, levels=tuple(SELF_TEST_SEEDS),
                  tolerance_mm: float = 1.0, log: Callable[[str], None] = print) -> list:
    """The module's self-test, Qt-free: for each level, simulate an AP + lateral pair of the
    scene's CT (:func:`simulate_xray_nodes`), register it with ``register_fn`` (the module
    logic's ``register`` with its defaults: ``(ct, seg, level, ap, lat, views) ->
    transform node``), and check, the way Slicer applies the result:

    - the error after registration (mTRE over the vertebra's voxels) is below ``tolerance_mm``
      and below the error before;
    - the transform node follows the RAS/LPS convention: its to-parent matrix moves RAS
      points where ``RAS_FROM_LPS · T · RAS_FROM_LPS`` does (same error in RAS and LPS);
    - with the CT under the node (:func:`move_under`) the vertebra lands on the truth;
    - Slicer's transform writer and our reader agree on the ``.h5`` file.

    Raises AssertionError on failure; returns one dict of numbers per level."""
    from .metrics import truth_errors
    from .io import read_transform

    workdir = Path(workdir)
    rows = []
    for level in levels:
        log(f"self-test {level}: simulating an AP + lateral pair")
        sim = simulate_xray_nodes(scene, ct_node, seg_node, level, seed=SELF_TEST_SEEDS.get(level, 0),
                                  name=f"self-test {level}")
        case = sim["case"]
        err0 = truth_errors(case, case.initial_guess)["mtre_mm"]
        log(f"self-test {level}: registering (error before: {err0:.1f} mm)")
        tnode = register_fn(ct_node, seg_node, level, sim["ap"], sim["lat"], sim["views"])
        move_under(tnode, ct_node, seg_node)
        check = check_registration(tnode, case.ground_truth, case.seg, case.vertebra_label, ct_node=ct_node)
        log(f"self-test {level}: error after registration {check['mtre_mm']:.2f} mm")
        assert check["mtre_mm"] < min(tolerance_mm, err0), \
            f"{level}: error after registration {check['mtre_mm']:.2f} mm (before {err0:.2f} mm)"
        assert abs(check["ras_mtre_mm"] - check["mtre_mm"]) < 1e-6, \
            f"{level}: the transform node breaks the RAS/LPS convention ({check['ras_mtre_mm']:.3f} vs " \
            f"{check['mtre_mm']:.3f} mm)"
        assert abs(check["ct_moved_mm"] - check["mtre_mm"]) < 1e-6, f"{level}: the CT is not under the result"
        storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
        storage.SetFileName(str(workdir / f"{level}.h5"))
        assert storage.WriteData(tnode), "Slicer's transform writer failed"
        assert np.allclose(read_transform(workdir / f"{level}.h5"), node_to_transform(tnode), atol=1e-5), \
            "Slicer's .h5 file and RadGSRegLib disagree on the transform"
        move_under(None, ct_node, seg_node)
        rows.append({"level": level, "initial_mtre_mm": err0, **check})
    log("self-test passed: " + ", ".join(f"{r['level']} {r['initial_mtre_mm']:.1f} -> {r['mtre_mm']:.2f} mm"
                                         for r in rows))
    return rows
