"""RadGSReg: register a spine CT to two intraoperative X-rays (AP + lateral) at one vertebra.

Four classes, in Slicer's order: module, widget, logic, test. The logic works without the
widget (Slicer's Python console, batch scripts); all MRML <-> array work is in the Qt-free
``RadGSRegLib.slicer_bridge``, and all algorithms in ``RadGSRegLib``.

Console example::

    logic = slicer.util.getModuleLogic("RadGSReg")
    views = logic.readGeometry("/path/case/geometry.json")
    transformNode, reconNode = logic.register(ctNode, segNode, "L3", apNode, latNode, views)
    ctNode.SetAndObserveTransformNodeID(transformNode.GetID())
"""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import qt
import slicer
import vtk
from slicer import vtkMRMLLinearTransformNode, vtkMRMLNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

#: Python packages RadGSRegLib needs beyond Slicer's own (torch comes from the PyTorch extension)
REQUIREMENTS = ["numba>=0.60", "monai>=1.4", "roma>=1.5", "pynrrd>=1.0", "tqdm>=4.60", "einops>=0.7"]
LEVEL_CHOICES = ["L1", "L2", "L3", "L4", "L5", "S1", "T12", "T11", "T10"]


def _resource(*parts) -> str:
    """A file of the extension's Resources folder (installed next to the module, or the
    repository's top-level Resources in a source checkout)."""
    here = Path(__file__).resolve().parent
    for base in (here / "Resources", here.parent / "Resources"):
        if (base.joinpath(*parts)).exists():
            return str(base.joinpath(*parts))
    return str(here / "Resources" / Path(*parts))


def _ensure_lib_on_path():
    here = Path(__file__).resolve().parent
    for p in (here, here.parent):
        if (p / "RadGSRegLib").is_dir() and str(p) not in sys.path:
            sys.path.insert(0, str(p))


#
# RadGSReg
#
class RadGSReg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RadGSReg")
        self.parent.categories = [_("Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["RadGSReg developers"]
        self.parent.helpText = _(
            "Registers a preoperative spine CT to an AP and a lateral intraoperative X-ray at one vertebra. "
            "Inputs: the CT, its vertebra segmentation (TotalSegmentator), the level, both X-rays and their "
            "C-arm geometry (geometry.json). Output: a linear transform that moves the CT onto the X-rays, and "
            "optionally a reconstruction of the vertebra from the X-rays. See the extension's README.")
        self.parent.acknowledgementText = _(
            "After RadGS-Reg (Shen et al., MICCAI 2025). Sample CT from TotalSegmentator (Wasserthal et al., "
            "Radiology: AI 2023), Apache-2.0.")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """A 'RadGSReg lumbar CT' entry in the Sample Data module, from the bundled files."""
    import SampleData

    d = Path(_resource("SampleData"))
    if not (d / "example_ct.nii.gz").exists():
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="RadGSReg",
        sampleName="RadGSReg lumbar CT",
        thumbnailFileName=_resource("Icons", "RadGSReg.png"),
        uris=[(d / "example_ct.nii.gz").as_uri(), (d / "totalseg.nii.gz").as_uri()],
        fileNames=["example_ct.nii.gz", "totalseg.nii.gz"],
        nodeNames=["RadGSReg lumbar CT", "RadGSReg lumbar CT vertebrae"],
        loadFileType=["VolumeFile", "SegmentationFile"],
        checksums=[None, None],
    )


#
# Parameter node
#
@parameterNodeWrapper
class RadGSRegParameterNode:
    ctVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLNode
    level: str = "L3"
    apXray: vtkMRMLScalarVolumeNode
    latXray: vtkMRMLScalarVolumeNode
    geometrySource: str = "file"
    geometryFile: Path
    sdd: float = 1124.0
    sid: float = 700.0
    pixelSpacing: float = 0.3
    imageKind: str = "line_integral"
    init: str = "learned"
    modelFile: Path
    device: str = "cpu"
    refine: str = "2d"
    reconstruct: bool = False
    outputTransform: vtkMRMLLinearTransformNode
    outputRecon: vtkMRMLScalarVolumeNode


def _modelArg(p):
    """The weights the panel asks for: its file, or the shipped ones (None) when empty."""
    m = str(p.modelFile) if p.modelFile else ""
    return m if m and m != "." else None


#
# Widget
#
class RadGSRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the panel to the parameter node and calls one logic method per button."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._process = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(_resource("UI", "RadGSReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RadGSRegLogic()

        self.ui.levelComboBox.addItems(LEVEL_CHOICES)
        self.ui.imageKindComboBox.addItems(["line_integral", "intensity"])
        self.ui.initComboBox.addItems(["learned", "search", "none"])
        self.ui.deviceComboBox.addItems(["cpu", "cuda"])
        self.ui.refineComboBox.addItems(["2d", "both", "3d", "none"])
        self.ui.geometrySourceComboBox.addItems(["file", "dicom", "typed"])

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.overlayButton.connect("clicked(bool)", self.onOverlayButton)
        self.ui.loadCaseButton.connect("clicked(bool)", self.onLoadCase)
        self.ui.exportCaseButton.connect("clicked(bool)", self.onExportCase)
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self._process is not None:
            self._process.cancel()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.ctVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.ctVolume = first

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None):
        """Enable Apply only with complete inputs; say what is missing on the button."""
        if self._process is not None:
            return
        p = self._parameterNode
        has_file = p.geometrySource != "file" or (p.geometryFile and str(p.geometryFile) not in ("", "."))
        missing = [name for name, ok in (("CT", p.ctVolume), ("vertebra labels", p.segmentation), ("AP X-ray", p.apXray),
                                         ("lateral X-ray", p.latXray), ("geometry.json", has_file))
                   if not ok]
        self.ui.applyButton.enabled = not missing
        self.ui.applyButton.toolTip = _("Register") if not missing else _("Missing: ") + ", ".join(missing)

    def onApplyButton(self):
        if self._process is not None:                       # Apply doubles as Cancel
            self._process.cancel()
            return
        p = self._parameterNode
        try:
            self.logic.setupPythonRequirements()
            views = self.logic.geometryFor(p)
            self.ui.applyButton.text = _("Cancel")
            self.ui.progressBar.value = 0
            self._process = self.logic.registerInBackground(
                p.ctVolume, p.segmentation, p.level, p.apXray, p.latXray, views, imageKind=p.imageKind,
                refine=p.refine, reconstruct=p.reconstruct, init=p.init, model=_modelArg(p), device=p.device,
                onProgress=self._onProgress, onDone=self._onDone)
        except Exception as e:
            self._process = None
            self.ui.applyButton.text = _("Apply")
            slicer.util.errorDisplay(_("Registration could not start: ") + str(e))

    def _onProgress(self, fraction, message):
        self.ui.progressBar.value = int(100 * fraction)
        self.ui.statusLabel.text = message

    def _onDone(self, transformNode, reconNode, error):
        self._process = None
        self.ui.applyButton.text = _("Apply")
        self._checkCanApply()
        if error:
            self.ui.statusLabel.text = error
            slicer.util.errorDisplay(error)
            return
        self._parameterNode.outputTransform = transformNode
        if reconNode is not None:
            self._parameterNode.outputRecon = reconNode
        self.ui.progressBar.value = 100

    def onOverlayButton(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Overlay failed."), waitCursor=True):
            self.logic.showOverlay(p.ctVolume, p.outputTransform, p.outputRecon, p.apXray, p.latXray,
                                   self.logic.geometryFor(p), segNode=p.segmentation)

    def onLoadCase(self):
        path = qt.QFileDialog.getExistingDirectory(None, _("Case folder"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Loading the case failed."), waitCursor=True):
            nodes = self.logic.loadCase(path)
            p = self._parameterNode
            p.ctVolume, p.segmentation, p.apXray, p.latXray = nodes["ct"], nodes["seg"], nodes["ap"], nodes["lat"]
            p.geometrySource = "file"
            p.geometryFile = Path(path) / "geometry.json"
            p.imageKind = nodes["case"].image_kind
            if nodes["case"].vertebra_name:
                p.level = nodes["case"].vertebra_name

    def onExportCase(self):
        path = qt.QFileDialog.getSaveFileName(None, _("New case folder"))
        if not path:
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Exporting the case failed."), waitCursor=True):
            self.logic.exportCase(path, p.ctVolume, p.segmentation, p.level, p.apXray, p.latXray,
                                  self.logic.geometryFor(p), imageKind=p.imageKind)


#
# Logic
#
class RadGSRegLogic(ScriptedLoadableModuleLogic):
    """Works without the widget: call :meth:`register` from Slicer's Python console."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        _ensure_lib_on_path()

    def getParameterNode(self):
        return RadGSRegParameterNode(super().getParameterNode())

    # -- set-up
    def setupPythonRequirements(self):
        """Install what RadGSRegLib needs, once, on first use (never at import time).
        torch comes from the PyTorch extension; Slicer's own packages are never replaced."""
        if slicer.app.testingEnabled():
            return
        try:
            import torch  # noqa: F401
        except ImportError:
            import PyTorchUtils

            if not PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True):
                raise RuntimeError("PyTorch is required (install the PyTorch extension)")
        missing = []
        for req, mod in zip(REQUIREMENTS, ["numba", "monai", "roma", "nrrd", "tqdm", "einops"]):
            try:
                __import__(mod)
            except ImportError:
                missing.append(req)
        if missing:
            if not slicer.util.confirmOkCancelDisplay(_("RadGSReg will install: ") + ", ".join(missing)):
                raise RuntimeError("required Python packages are not installed")
            slicer.util.pip_install(missing)

    # -- geometry and cases
    def readGeometry(self, path):
        """{"ap": View, "lat": View} from a geometry.json."""
        from RadGSRegLib.io import read_geometry

        views, _images, _kind = read_geometry(path)
        return views

    def geometryFor(self, p):
        """{"ap": View, "lat": View} from the parameter node's geometry source."""
        if p.geometrySource == "file":
            return self.readGeometry(p.geometryFile)
        if p.geometrySource == "dicom":
            return {"ap": self.geometryFromDicom(p.apXray, "ap"), "lat": self.geometryFromDicom(p.latXray, "lat")}
        return self.typedGeometry(p.apXray, p.latXray, p.sdd, p.sid, p.pixelSpacing)

    def geometryFromDicom(self, xrayNode, name):
        """The view of an X-ray loaded from DICOM, from its file's tags (needs Slicer's DICOM database)."""
        from RadGSRegLib.io import view_from_dicom

        uids = (xrayNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        if not uids or not slicer.dicomDatabase:
            raise ValueError(f"'{xrayNode.GetName()}' was not loaded from DICOM: choose a geometry.json or type the geometry in")
        return view_from_dicom(slicer.dicomDatabase.fileForInstance(uids[0]), name)

    def typedGeometry(self, apNode, latNode, sdd, sid, pixelSpacing):
        """A standard biplanar C-arm (geometry.biplanar_views) sized like the two X-ray nodes."""
        from RadGSRegLib import slicer_bridge
        from RadGSRegLib.geometry import biplanar_views

        views = {}
        for name, node in (("ap", apNode), ("lat", latNode)):
            rows, cols = slicer_bridge.node_to_xray(node).shape
            views[name] = biplanar_views(sdd=sdd, sid=sid, pixels=(cols, rows),
                                         detector_mm=(cols * pixelSpacing, rows * pixelSpacing))[name]
        return views

    def loadCase(self, path):
        from RadGSRegLib import slicer_bridge

        return slicer_bridge.load_case(slicer.mrmlScene, path)

    def exportCase(self, path, ctNode, segNode, level, apNode, latNode, views, imageKind="line_integral"):
        from RadGSRegLib import slicer_bridge

        return slicer_bridge.export_case(path, ctNode, segNode, level, apNode, latNode, views, image_kind=imageKind)

    # -- registration
    def register(self, ctNode, segNode, level, apNode, latNode, views, imageKind="line_integral", refine="2d",
                 reconstruct=False, init="auto", model=None, device="cpu"):
        """Synchronous registration (console, tests). Returns (transformNode, reconNode or None).
        ``init="learned"`` with ``model=None`` uses the shipped weights."""
        from RadGSRegLib import slicer_bridge
        from RadGSRegLib.register import RegisterConfig

        if init == "learned" and not model:
            model = "default"
        config = RegisterConfig(init=init, refine=refine, reconstruct=reconstruct, model=model, device=device)
        tnode, rnode, _result = slicer_bridge.register(slicer.mrmlScene, ctNode, segNode, level, apNode, latNode, views,
                                                       image_kind=imageKind, config=config, log=print)
        return tnode, rnode

    def registerInBackground(self, ctNode, segNode, level, apNode, latNode, views, imageKind="line_integral",
                             refine="2d", reconstruct=False, init="auto", model=None, device="cpu", onProgress=None,
                             onDone=None):
        """Export a case folder, run ``python -m RadGSRegLib.cli register`` in a separate process
        (Slicer stays responsive), parse its progress lines, load the result. Returns a handle
        with ``cancel()``."""
        workdir = Path(tempfile.mkdtemp(prefix="RadGSReg-"))
        self.exportCase(workdir / "case", ctNode, segNode, level, apNode, latNode, views, imageKind=imageKind)
        if init == "learned" and not model:
            model = "default"
        args = ["-m", "RadGSRegLib.cli", "register", str(workdir / "case"), "--out", str(workdir / "result"),
                "--refine", refine, "--init", init, "--device", device] + (["--reconstruct"] if reconstruct else [])
        if model:
            args += ["--model", str(model)]
        return _BackgroundRun(args, workdir, onProgress, onDone, self)

    def loadResult(self, resultDir, name="RadGSReg T_ct_to_carm"):
        from RadGSRegLib import slicer_bridge
        from RadGSRegLib.io import read_result

        res = read_result(resultDir)
        tnode = slicer_bridge.transform_to_node(slicer.mrmlScene, res.T_ct_to_carm, name)
        rnode = slicer_bridge.volume_to_node(slicer.mrmlScene, res.recon, "RadGSReg reconstruction") if res.recon else None
        return tnode, rnode, res

    def showOverlay(self, ctNode, transformNode, reconNode, apNode, latNode, views, segNode=None):
        """CT under the transform; reconstruction (or CT) over the AP X-ray in the slice views;
        the vertebra labels as an outline in 2-D and a surface in 3-D, under the same transform;
        both X-ray planes shown in 3-D; the X-ray sources as points."""
        from RadGSRegLib import slicer_bridge

        if transformNode is not None:
            ctNode.SetAndObserveTransformNodeID(transformNode.GetID())
            if segNode is not None:
                segNode.SetAndObserveTransformNodeID(transformNode.GetID())
        slicer.util.setSliceViewerLayers(background=apNode, foreground=reconNode or ctNode, foregroundOpacity=0.5)
        if segNode is not None and segNode.IsA("vtkMRMLSegmentationNode"):
            segNode.CreateDefaultDisplayNodes()
            segNode.CreateClosedSurfaceRepresentation()
            display = segNode.GetDisplayNode()
            display.SetVisibility2DFill(False)
            display.SetVisibility2DOutline(True)
            display.SetVisibility3D(True)
        slicer_bridge.source_markups(slicer.mrmlScene, views)
        # each X-ray in its own slice view, aligned with its detector plane and shown in 3-D
        layout = slicer.app.layoutManager()
        for viewName, node in (("Red", apNode), ("Yellow", latNode)):
            widget = layout.sliceWidget(viewName)
            widget.sliceLogic().GetSliceCompositeNode().SetBackgroundVolumeID(node.GetID())
            sliceNode = widget.mrmlSliceNode()
            sliceNode.RotateToVolumePlane(node)
            sliceNode.SetSliceVisible(True)
            widget.sliceController().fitSliceToBackground()
        layout.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)


class _BackgroundRun:
    """One registration subprocess: polled by a QTimer; progress lines parsed; Cancel kills it."""

    def __init__(self, args, workdir, onProgress, onDone, logic):
        self.workdir, self.onProgress, self.onDone, self.logic = workdir, onProgress, onDone, logic
        self.proc = qt.QProcess()
        env = qt.QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONPATH", os.pathsep.join([str(Path(__file__).resolve().parent),
                                                  str(Path(__file__).resolve().parent.parent),
                                                  env.value("PYTHONPATH")]))
        self.proc.setProcessEnvironment(env)
        self.proc.setProcessChannelMode(qt.QProcess.MergedChannels)
        self.proc.connect("readyRead()", self._read)
        self.proc.connect("finished(int,QProcess::ExitStatus)", self._finished)
        self.cancelled = False
        self._log = []
        # Slicer's own Python interpreter, as SlicerTotalSegmentator / MONAIAuto3DSeg launch their backends
        python = shutil.which("PythonSlicer") or sys.executable
        self.proc.start(python, args)
        if onProgress:
            onProgress(0.05, "registering...")

    def _read(self):
        text = bytes(self.proc.readAll()).decode(errors="replace")
        for line in text.splitlines():
            self._log.append(line)
            if self.onProgress:
                step = {"pose search": 0.3, "RadGS-Reg network": 0.45, "candidate": 0.6, "reconstructing": 0.7,
                        "T_ct_to_carm written": 0.95}
                frac = max([v for k, v in step.items() if k in line], default=None)
                if frac is not None:
                    self.onProgress(frac, line.strip())

    def cancel(self):
        self.cancelled = True
        self.proc.kill()

    def _finished(self, code, status):
        if self.cancelled:
            self.onDone(None, None, "Registration cancelled.")
            return
        if code != 0:
            self.onDone(None, None, "Registration failed:\n" + "\n".join(self._log[-15:]))
            return
        tnode, rnode, res = self.logic.loadResult(self.workdir / "result")
        warnings = res.info.get("warnings", [])
        if self.onProgress:
            self.onProgress(1.0, "done" + (": " + "; ".join(warnings) if warnings else ""))
        self.onDone(tnode, rnode, None)


#
# Test
#
class RadGSRegTest(ScriptedLoadableModuleTest):
    """Builds its own phantom case; the same checks run in CI on Qt-free MRML
    (``Testing/test_slicer.py`` calls ``slicer_bridge.run_self_test``)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RadGSReg_register()

    def test_RadGSReg_register(self):
        _ensure_lib_on_path()
        from RadGSRegLib import slicer_bridge

        self.delayDisplay("Registering a phantom case")
        result = slicer_bridge.run_self_test(slicer.mrmlScene, tempfile.mkdtemp(prefix="RadGSRegTest-"),
                                             log=self.delayDisplay)
        self.assertLess(result["mtre_mm"], 2.0)
        self.delayDisplay("Test passed")
