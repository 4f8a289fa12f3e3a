"""The module file ``RadGSReg/RadGSReg.py`` against the rules real Slicer enforces, and its
logic run for real on slicer-core (MRML without the application).

What only Slicer enforces is encoded here from Slicer's own source, read at the tags
``v5.8.0`` (Python 3.9) and ``main`` (2026-11, Python 3.12) of github.com/Slicer/Slicer:

- ``Base/Python/slicer/parameterNodeWrapper/guiConnectors.py``: which widget class binds to
  which parameter type (each connector's ``canRepresent``), and what ``create`` then
  demands (the ``Choice`` annotation for a string on a combo box; bounds for sliders); the
  node connector sets the selector's ``nodeTypes`` from the annotation, instantiating each
  annotated class (``util.getNodeTypes``).
- ``.../parameterNodeWrapper/serializers.py``: a ``Union`` of node classes needs ``None``
  among its members to hold "no node" (``UnionSerializer`` finds no serializer for None
  otherwise); ``validators.py``: a ``Choice``/``WithinRange`` default must satisfy it
  (``connectGui`` writes the default into the widget, and the combo-box connector raises
  for a value outside its choices).
- ``.../parameterNodeWrapper/wrapper.py``: ``connectGui`` binds every widget of the panel
  that carries a ``SlicerParameterName``; each name must be a field.
- ``Modules/Scripted/SampleData/SampleData.py``: sample files are copied into a shared cache
  under ``fileNames`` and reused when a file of that name exists and no checksum is given;
  a "SegmentationFile" goes through ``qSlicerSegmentationsReader`` ->
  ``vtkSlicerSegmentationsModuleLogic::LoadSegmentationFromFile``
  (``Modules/Loadable/Segmentations/qSlicerSegmentationsReader.cxx``).
"""
import dataclasses
import enum
import hashlib
import pathlib
import typing
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the 'slicer' module here is not slicer-core", allow_module_level=True)

from slicer_app_stub import ROOT, Choice, Maximum, Minimum, WithinRange, module_file  # noqa: E402

from RadGSRegLib import slicer_bridge as sb  # noqa: E402
from RadGSRegLib import slicer_panel as panel  # noqa: E402
from RadGSRegLib import slicer_selftest as st  # noqa: E402
from RadGSRegLib.register import RegisterConfig  # noqa: E402

UI = ROOT / "Resources" / "UI" / "RadGSReg.ui"
_NODE_COMBO, _UNBOUNDED_SLIDERS = "qMRMLNodeComboBox", ("QSlider", "ctkSliderWidget", "qMRMLSliderWidget")
_PATHS = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath,
          pathlib.PureWindowsPath)


@pytest.fixture()
def module(tmp_path):
    with module_file(slicer.vtkMRMLScene(), tmp_path) as m:
        yield m


def ui_bindings(path=UI) -> dict:
    """{parameter name: (widget class, {property: value})} of every bound widget in a .ui."""
    out = {}
    for w in ET.parse(path).iter("widget"):
        props = {p.get("name"): p for p in w.findall("property")}
        if "SlicerParameterName" in props:
            values = {k: (p.find("bool").text == "true" if p.find("bool") is not None else
                          [s.text for s in p.iter("string")]) for k, p in props.items()}
            out[props["SlicerParameterName"].find("string").text] = (w.get("class"), values)
    return out


def _split(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, extras
    return annotation, []


def _first(extras, kind):
    return next((e for e in extras if isinstance(e, kind)), None)


def _node_classes(base):
    """The node classes of a node annotation (one class or a Union), or None if it is not one."""
    members = typing.get_args(base) if typing.get_origin(base) is typing.Union else (base,)
    classes = [m for m in members if m is not type(None)]
    if classes and all(isinstance(c, type) and issubclass(c, slicer.vtkMRMLNode) for c in classes):
        return classes
    return None


def binding_problems(widget_class: str, props: dict, annotation, default) -> list:
    """Why Slicer's parameterNodeWrapper would refuse to bind this widget to this field
    (empty when it accepts it): the connectors of guiConnectors.py at v5.8.0 (a connector
    that exists only on main, such as ctkCheckablePushButton's, is not accepted)."""
    base, extras = _split(annotation)
    bounded = _first(extras, WithinRange) is not None or (
        _first(extras, Minimum) is not None and _first(extras, Maximum) is not None)
    if widget_class in ("QCheckBox", "ctkCheckBox", "QPushButton"):
        return [] if base is bool else [f"{widget_class} binds bool only, not {base}"]
    if widget_class in ("QSpinBox", "QSlider"):
        if base is not int:
            return [f"{widget_class} binds int only, not {base}"]
        return [] if bounded or widget_class != "QSlider" else ["a QSlider needs a bounded int (WithinRange)"]
    if widget_class in ("QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider",
                        "ctkDoubleSpinBox", "qMRMLSpinBox"):
        if base not in (float, int):
            return [f"{widget_class} binds float or int only, not {base}"]
        if widget_class in _UNBOUNDED_SLIDERS and not bounded:
            return [f"a {widget_class} needs bounds (WithinRange)"]
        r = _first(extras, WithinRange)
        return [] if r is None or r.minimum <= default <= r.maximum else [f"default {default} outside {r.args}"]
    if widget_class in ("QComboBox", "ctkComboBox"):
        if isinstance(base, type) and issubclass(base, enum.Enum):
            return []
        if base not in (int, float, str, bool):
            return [f"{widget_class} binds int/float/str/bool (with Choice) or an Enum, not {base}"]
        choice = _first(extras, Choice)
        if choice is None:
            return [f"{widget_class} needs Annotated[{base.__name__}, Choice([...])] "
                    "(ComboBoxToStringableConnector raises without it)"]
        problems = [] if default in choice.choices else [f"default {default!r} is not among the choices"]
        if props.get("editable"):
            problems.append("an editable combo box can hold text outside the choices; the connector reads "
                            "choices[currentIndex]")
        return problems
    if widget_class in ("QLineEdit", "QLabel", "QTextEdit"):
        return [] if base is str else [f"{widget_class} binds str only, not {base}"]
    if widget_class in ("ctkPathLineEdit", "ctkDirectoryButton"):
        return [] if base in _PATHS else [f"{widget_class} binds pathlib paths only, not {base}"]
    if widget_class == _NODE_COMBO:
        classes = _node_classes(base)
        if classes is None:
            return [f"{_NODE_COMBO} binds a node class or a Union of node classes, not {base}"]
        problems = []
        if len(classes) > 1 and type(None) not in typing.get_args(base):
            problems.append("a Union of node classes needs None as a member to hold 'no node'")
        types_ = []
        for c in classes:
            try:
                types_.append(c().GetClassName())         # what getNodeTypes does
            except TypeError as e:
                problems.append(f"{c.__name__} cannot be instantiated (abstract?): {e}")
        if not problems and types_ != props.get("nodeTypes"):
            problems.append(f"the connector would set nodeTypes {types_}, the .ui says {props.get('nodeTypes')}")
        return problems
    return [f"no Slicer connector binds a {widget_class}"]


def test_every_binding_is_one_slicer_accepts(module):
    hints = typing.get_type_hints(module.RadGSRegParameterNode, include_extras=True)
    bindings = ui_bindings()
    assert set(bindings) == set(hints), set(bindings) ^ set(hints)
    problems = {}
    for name, (cls, props) in bindings.items():
        default = getattr(module.RadGSRegParameterNode, name, None)
        p = binding_problems(cls, props, hints[name], default)
        if p:
            problems[name] = p
    assert not problems, problems


def test_the_binding_check_refuses_what_slicer_refuses():
    """The rules above are not vacuous: the bindings of the previous panel fail them."""
    assert binding_problems("QComboBox", {}, str, "learned")                 # no Choice
    assert binding_problems("QComboBox", {"editable": True}, typing.Annotated[str, Choice(["L3"])], "L3")
    assert binding_problems("QComboBox", {}, typing.Annotated[str, Choice(["a"])], "b")
    assert binding_problems(_NODE_COMBO, {"nodeTypes": ["vtkMRMLSegmentationNode"]}, slicer.vtkMRMLNode, None)
    both = typing.Union[slicer.vtkMRMLSegmentationNode, slicer.vtkMRMLLabelMapVolumeNode]
    assert binding_problems(_NODE_COMBO, {"nodeTypes": ["vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode"]},
                            both, None)                                          # no None member
    assert binding_problems(_NODE_COMBO, {"nodeTypes": ["vtkMRMLScalarVolumeNode"]},
                            slicer.vtkMRMLLabelMapVolumeNode, None)              # nodeTypes overwritten
    assert binding_problems("ctkSliderWidget", {}, float, 1.0)
    assert binding_problems("ctkCheckablePushButton", {}, bool, False)         # main only
    assert not binding_problems("QComboBox", {}, typing.Annotated[str, Choice(["a", "b"])], "b")


def test_panel_defaults_are_register_config_defaults(module, tmp_path):
    d = RegisterConfig()
    P = module.RadGSRegParameterNode
    assert (P.init, P.refine, P.device, P.reconstruct) == (d.init, d.refine, d.device, d.reconstruct)
    # the panel's untouched settings give RegisterConfig's defaults (+ the DRRs for its overlay)
    cfg = panel.config_from_panel(P.init, P.refine, P.device, P.reconstruct, Path("."))
    assert cfg == dataclasses.replace(d, drrs=True)
    # and so do the console API's and the CLI's
    from RadGSRegLib.cli import build_parser, register_config

    assert register_config(build_parser().parse_args(["register", "c", "--out", "o"])) == d
    assert panel.config_from_panel("learned", "2d", "cpu", False, None).model == "default"
    assert panel.config_from_panel("auto", "2d", "cpu", False, tmp_path / "w.pt").init_mode == "learned"


def test_sample_data_entry_is_unique_and_checksummed(module):
    src = module.sampleDataSource()
    n = len(src["uris"])
    assert len(src["fileNames"]) == len(src["nodeNames"]) == len(src["loadFileType"]) == len(src["checksums"]) == n
    assert src["loadFileType"] == ["VolumeFile", "SegmentationFile"]
    for uri, name, checksum in zip(src["uris"], src["fileNames"], src["checksums"]):
        path = Path(uri[len("file://"):])
        assert path.is_file(), uri
        # the cache is shared by every extension: a generic name would pick up someone else's file
        assert name.startswith("RadGSReg-"), name
        algo, digest = checksum.split(":")
        assert algo == "SHA256" and hashlib.sha256(path.read_bytes()).hexdigest() == digest


def test_segmentation_loaded_as_sample_data_resolves_every_level(tmp_path):
    scene = slicer.vtkMRMLScene()
    ct, seg = st.load_sample_data(scene)
    s = seg.GetSegmentation()
    names = [s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments())]
    assert names[0] == "Segment_26"                  # what Slicer names a label map's segments
    from RadGSRegLib.io import read_label_map
    from RadGSRegLib.levels import TOTALSEG_IDS, LevelError
    from RadGSRegLib.sample_data import lumbar_ct

    labels = sb.labelmap_from_node(seg, ct)
    truth = read_label_map(lumbar_ct().seg)
    assert np.array_equal(labels.labelmap.array, truth.array)          # each segment keeps its label value
    for level in ("L1", "L2", "L3", "L4", "L5", "S1"):
        for spelling in (level, f"vertebrae_{level}", str(TOTALSEG_IDS[level])):
            assert sb.vertebra_from_nodes(ct, seg, spelling)[2] == TOTALSEG_IDS[level]
    with pytest.raises(LevelError, match="cut by the edge"):
        sb.vertebra_from_nodes(ct, seg, "T12")
    # named segments win over the numbering; a name that says otherwise is not taken for a level
    s.GetNthSegment(0).SetName("L3 vertebra")        # label value 26 now named L3
    assert sb.vertebra_from_nodes(ct, seg, "L3")[2] == 26
    s.GetNthSegment(3).SetName("liver")             # label value 29
    s.GetNthSegment(0).SetName("Segment_26")
    with pytest.raises(LevelError, match="liver"):
        sb.vertebra_from_nodes(ct, seg, "L3")
    assert sb.vertebra_from_nodes(ct, seg, "liver")[2] == 29


def test_segments_sharing_a_value_are_chosen_by_name_only():
    """Overlapping segments live on separate layers and may share a label value; then
    values are positions, not levels: only names choose, and the chosen segment is whole."""
    from scipy.ndimage import binary_dilation

    from RadGSRegLib.io import read_label_map
    from RadGSRegLib.levels import LevelError
    from RadGSRegLib.sample_data import lumbar_ct

    scene = slicer.vtkMRMLScene()
    ct, seg = st.load_sample_data(scene)
    truth = read_label_map(lumbar_ct().seg).array
    grown = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    sb.volume_to_node(scene, sb.node_to_volume(ct), "grown", node=grown)
    slicer.util.updateVolumeFromArray(grown, np.where(binary_dilation(truth == 29, iterations=2), 29, 0).astype(np.int16))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(grown, seg)   # 2nd value 29
    s = seg.GetSegmentation()
    s.GetNthSegment(3).SetName("vertebrae_L3")
    s.GetNthSegment(8).SetName("L3 with margin")
    assert sb.labelmap_from_node(seg, ct).positional
    _, labels, value = sb.vertebra_from_nodes(ct, seg, "L3")
    assert value == 4 and np.array_equal(labels.array == 4, truth == 29)    # found by name, whole
    _, labels, value = sb.vertebra_from_nodes(ct, seg, "L3 with margin")
    assert value == 9 and (labels.array == 9).sum() > (truth == 29).sum()
    for level in ("29", "4", "L2"):                                  # a value, a position, an unnamed level
        with pytest.raises(LevelError):
            sb.vertebra_from_nodes(ct, seg, level)


def test_setup_python_requirements_pins_slicers_packages(module, monkeypatch):
    """Missing packages are installed with pip, without asking under --testing, constrained
    to the installed numpy/scipy/SimpleITK/VTK/Pillow; torch's absence without the PyTorch
    extension is an error that says what to install."""
    import importlib.metadata
    import sys

    from RadGSRegLib import slicer_requirements as req

    calls, missing = [], [["roma>=99"], []]
    monkeypatch.setattr(req, "missing_requirements", lambda: missing.pop(0))

    def pip_install(args):
        i = args.index("-c")
        calls.append((list(args), Path(args[i + 1]).read_text(encoding="utf-8")))

    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: pytest.fail("asked under --testing"),
                        raising=False)
    module.RadGSRegLogic().setupPythonRequirements()
    (args, constraints), = calls
    assert args[-1] == "roma>=99"
    assert f"numpy=={importlib.metadata.version('numpy')}" in constraints.split()
    assert f"SimpleITK=={importlib.metadata.version('SimpleITK')}" in constraints.split()
    assert not Path(args[args.index("-c") + 1]).exists()            # the constraints file is removed
    monkeypatch.setitem(sys.modules, "torch", None)                 # torch not installed ...
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)          # ... nor the PyTorch extension
    with pytest.raises(RuntimeError, match="PyTorch"):
        module.RadGSRegLogic().setupPythonRequirements()


def test_requirements_agree_with_pyproject():
    """The packages the module installs in Slicer, Slicer's own and torch are exactly the
    package's dependencies, with the same minimum versions."""
    import re
    import tomllib

    from RadGSRegLib import slicer_requirements as req

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    name = lambda r: re.split(r"[<>=!~;\s]", r, maxsplit=1)[0].lower()  # noqa: E731
    ours = {name(r): r for _, r in req.REQUIREMENTS + req.SLICER_OWNED}
    theirs = {name(r): r for r in deps}
    assert set(theirs) - {"torch"} == set(ours)
    for key, r in ours.items():
        m = re.search(r">=\s*[\d.]+", r)
        if m:
            assert m.group(0).replace(" ", "") in theirs[key].replace(" ", ""), (r, theirs[key])


def test_missing_requirements_sees_absent_and_old_packages(monkeypatch):
    from RadGSRegLib import slicer_requirements as req

    assert req.missing_requirements() == []                         # the test venv has everything
    monkeypatch.setattr(req, "REQUIREMENTS", (("numpy", "numpy>=999"), ("no_such_module_x", "no-such-module-x>=1"),
                                              ("numpy", "numpy>=1.0")))
    assert req.missing_requirements() == ["numpy>=999", "no-such-module-x>=1"]


def test_result_nodes_overlay_and_summary(tmp_path):
    """After a registration the panel shows: the transform, DRRs on the detector planes
    (coloured, X-ray polarity), the reconstruction with a window/level of its content, and a
    summary with the similarity per view and the warnings in words."""
    from RadGSRegLib.geometry import biplanar_views, pose_to_matrix
    from RadGSRegLib.io import Result
    from RadGSRegLib.volume import Volume, affine_from

    scene = slicer.vtkMRMLScene()
    views = biplanar_views(pixels=32, detector_mm=64.0)
    rng = np.random.default_rng(0)
    recon = np.zeros((16, 16, 16), np.float32)
    recon[4:12, 4:12, 4:12] = rng.uniform(0.01, 0.03, (8, 8, 8))
    res = Result(T_ct_to_carm=pose_to_matrix([1, 2, 3, 4, 5, 6]), runtime_s={"total": 3.2},
                 recon=Volume(recon, affine_from([0, 0, 0], [1.5] * 3)),
                 drrs={k: rng.uniform(0, 3, (32, 32)).astype(np.float32) for k in ("ap", "lat")},
                 info={"init": "search", "refine": "2d", "final_ncc_views": {"ap": 0.91, "lat": 0.62},
                       "final_ncc": 0.765, "min_ncc": 0.8, "doubtful": True, "diverged": True,
                       "warnings": ["doubtful result: final NCC 0.77 < 0.8", "2-D/3-D refinement diverged (...)",
                                    "no vertebra label: the whole CT is the target"]})
    nodes = sb.result_to_nodes(scene, res, views, image_kind="intensity")
    assert np.allclose(sb.node_to_transform(nodes["transform"]), res.T_ct_to_carm)
    lo, hi = nodes["recon"].GetDisplayNode().GetWindowLevelMin(), nodes["recon"].GetDisplayNode().GetWindowLevelMax()
    assert 0.009 < lo < hi < 0.031 and not nodes["recon"].GetDisplayNode().GetAutoWindowLevel()
    drr = nodes["drr_lat"]
    assert np.allclose(sb.node_to_xray(drr), np.exp(-res.drrs["lat"]), atol=1e-6)   # bone dark, like the X-ray
    assert drr.GetDisplayNode().GetColorNodeID() == sb.OVERLAY_COLOR_NODE_ID
    M = sb.array_from_vtk(drr.GetIJKToRASMatrix)
    assert np.allclose(M[:3, 3], sb.RAS_FROM_LPS[:3, :3] @ views["lat"].detector_origin)
    volumes = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    again = sb.result_to_nodes(scene, res, views, transform_node=nodes["transform"], recon_node=nodes["recon"])
    assert again["transform"] is nodes["transform"] and again["recon"] is nodes["recon"]
    assert again["drr_ap"] is nodes["drr_ap"] and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes
    sources = sb.source_markups(scene, views)
    assert sb.source_markups(scene, views) is sources and sources.GetNumberOfControlPoints() == 2
    text = panel.result_summary(res, "L3")
    assert "AP 0.91" in text and "lateral 0.62" in text and "DOUBTFUL" in text and "rejected" in text
    assert "whole CT is the target" in text and "3.2 s" in text and "metal" not in text
    res.info["final_ncc_similarity"] = "tiled"                  # a result of the second, tiled attempt
    text = panel.result_summary(res, "L3")
    assert "tiled NCC, metal left out" in text and "second attempt" in text
    res.info["metal"] = {"mode": "mask", "fraction": {"ap": 0.031, "lat": 0.002}}      # metal found and masked
    assert "Metal found in the X-rays (AP 3.1%, lateral 0.2% of the image) was left out" in panel.result_summary(res, "L3")
    res.info["metal"] = {"mode": "mask", "fraction": {"ap": 0.001, "lat": 0.002}}      # next to nothing: not said
    assert "Metal found" not in panel.result_summary(res, "L3")


@pytest.mark.slow
def test_sample_data_registers_every_lumbar_level_through_the_module_logic(module, tmp_path):
    """The Done-when of the Slicer issue: the Sample Data entry's files, loaded the way
    Slicer loads them, register at L1-L5 through RadGSRegLogic.register with its real
    defaults (pose search + 2-D/3-D), each to < 1 mm, with the RAS/LPS convention checked
    (the module's own self-test runs the same function inside Slicer)."""
    scene = slicer.mrmlScene
    ct, seg = st.load_sample_data(scene)
    logic = module.RadGSRegLogic()

    def register(ct_node, seg_node, level, ap, lat, views):
        return logic.register(ct_node, seg_node, level, ap, lat, views)[0]

    rows = st.run_self_test(scene, register, ct, seg, tmp_path, log=lambda *_: None)
    assert [r["level"] for r in rows] == ["L1", "L2", "L3", "L4", "L5"]
    for r in rows:
        assert r["mtre_mm"] < 1.0 < r["initial_mtre_mm"], r
