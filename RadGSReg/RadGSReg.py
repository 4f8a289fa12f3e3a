"""RadGSReg: register a spine CT to two intraoperative X-rays (AP + lateral) at one vertebra.

Four classes, in Slicer's order: module, widget, logic, test. The widget only binds the
panel (``Resources/UI/RadGSReg.ui``) to the parameter node and calls the logic; the logic
works without the widget (Slicer's Python console, batch scripts). Everything testable
without Qt lives in ``RadGSRegLib``: MRML <-> arrays and result display
(``slicer_bridge``), the background process, its progress events and cleanup (``job``,
``progress``), the settings (``register.config``, the one source of defaults), the
dependency checks (``slicer_requirements``). Written for the Python of every Slicer release
the README claims (3.9 in Slicer 5.8): no ``X | Y`` annotations here.

Console example::

    logic = slicer.util.getModuleLogic("RadGSReg")
    views = logic.readGeometry("/path/case/geometry.json")
    transformNode, reconNode = logic.register(ctNode, segNode, "L3", apNode, latNode, views)
    logic.applyResult(transformNode, ctNode, segNode)      # the CT moves onto the X-rays
"""
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional, Union

import qt
import slicer
import vtk
from slicer import (vtkMRMLLabelMapVolumeNode, vtkMRMLLinearTransformNode, vtkMRMLScalarVolumeNode,
                    vtkMRMLSegmentationNode)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin


def _ensure_lib_on_path():
    """RadGSRegLib sits next to this file in the built extension, one folder up in a source
    checkout (``Additional module paths`` = ``<checkout>/RadGSReg``)."""
    here = Path(__file__).resolve().parent
    for p in (here, here.parent):
        if (p / "RadGSRegLib").is_dir():
            if str(p) not in sys.path:
                sys.path.insert(0, str(p))
            return


_ensure_lib_on_path()

# torch-free imports only: the module loads at Slicer's start, before any install
from RadGSRegLib.geometry import STANDARD_PIXEL_MM, STANDARD_SDD_MM, STANDARD_SID_MM, biplanar_views  # noqa: E402
from RadGSRegLib.levels import LEVELS  # noqa: E402
from RadGSRegLib.register.config import DEVICES, INITS, REFINES, RegisterConfig  # noqa: E402
from RadGSRegLib.resources import find_resource, resource_path  # noqa: E402

#: the levels the panel offers, the lumbar spine first
PANEL_LEVELS = [lv for lv in LEVELS if lv[0] in "LS"] + [lv for lv in reversed(LEVELS) if lv[0] == "T"] + \
    [lv for lv in reversed(LEVELS) if lv[0] == "C"]
IMAGE_KINDS = ["line_integral", "intensity"]
GEOMETRY_SOURCES = ["file", "dicom", "typed"]
SAMPLE_NAME = "RadGSReg lumbar CT"


def _resource(*parts) -> str:
    """A shipped file, e.g. ``_resource("UI", "RadGSReg.ui")``, found by RadGSRegLib.resources
    (the Resources folder next to this file in the built extension, the checkout's top-level
    Resources in a source checkout); its error names every place looked at."""
    return str(resource_path("/".join(parts)))


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
            "C-arm geometry (geometry.json). Output: a linear transform that moves the CT onto the X-rays, "
            "DRRs at the result drawn over the X-rays, and optionally a reconstruction of the vertebra from the "
            "X-rays. See the extension's README.")
        self.parent.acknowledgementText = _(
            "After RadGS-Reg (Shen et al., MICCAI 2025). Sample CT from TotalSegmentator (Wasserthal et al., "
            "Radiology: AI 2023), Apache-2.0.")
        slicer.app.connect("startupCompleted()", registerSampleData)


def sampleDataSource():
    """The keyword arguments of the 'RadGSReg lumbar CT' Sample Data entry (the bundled
    files, loaded the way Slicer loads a volume and a segmentation; names prefixed so that
    they cannot collide in Slicer's download cache; SHA-256 from SHA256SUMS)."""
    from RadGSRegLib.sample_data import recorded_checksums

    d = Path(_resource("SampleData", "SHA256SUMS")).parent
    sums = recorded_checksums(d)
    files = ["example_ct.nii.gz", "totalseg.nii.gz"]
    return dict(
        category="RadGSReg",
        sampleName=SAMPLE_NAME,
        thumbnailFileName=_resource("Icons", "RadGSReg.png"),
        uris=[(d / f).as_uri() for f in files],
        fileNames=["RadGSReg-lumbar-ct.nii.gz", "RadGSReg-lumbar-ct-vertebrae.nii.gz"],
        nodeNames=[SAMPLE_NAME, SAMPLE_NAME + " vertebrae"],
        loadFileType=["VolumeFile", "SegmentationFile"],
        checksums=["SHA256:" + sums[f] for f in files],
    )


def registerSampleData():
    """A 'RadGSReg lumbar CT' entry in the Sample Data module, from the bundled files (once)."""
    import SampleData

    if find_resource("SampleData/example_ct.nii.gz") is None:
        return
    try:
        known = SampleData.SampleDataLogic().sourceForSampleName(SAMPLE_NAME)
    except AttributeError:                  # no source registered by anyone yet
        known = None
    if known is None:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(**sampleDataSource())


#
# Parameter node
#
@parameterNodeWrapper
class RadGSRegParameterNode:
    """The panel's state; every widget bound to a field carries its name as
    ``SlicerParameterName`` in the .ui. Registration defaults come from RegisterConfig."""

    ctVolume: vtkMRMLScalarVolumeNode
    segmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    level: Annotated[str, Choice(PANEL_LEVELS)] = "L3"
    otherLevel: str = ""
    apXray: vtkMRMLScalarVolumeNode
    latXray: vtkMRMLScalarVolumeNode
    geometrySource: Annotated[str, Choice(GEOMETRY_SOURCES)] = "file"
    geometryFile: Path
    sdd: Annotated[float, WithinRange(100.0, 5000.0)] = STANDARD_SDD_MM
    sid: Annotated[float, WithinRange(50.0, 5000.0)] = STANDARD_SID_MM
    pixelSpacing: Annotated[float, WithinRange(0.01, 10.0)] = STANDARD_PIXEL_MM
    imageKind: Annotated[str, Choice(IMAGE_KINDS)] = "line_integral"
    # the registration settings start from RegisterConfig's defaults (as the CLI and the API do)
    init: Annotated[str, Choice(list(INITS))] = RegisterConfig().init
    modelFile: Path
    device: Annotated[str, Choice(list(DEVICES))] = RegisterConfig().device
    refine: Annotated[str, Choice(list(REFINES))] = RegisterConfig().refine
    reconstruct: bool = RegisterConfig().reconstruct
    outputTransform: vtkMRMLLinearTransformNode
    outputRecon: vtkMRMLScalarVolumeNode


def effectiveLevel(p) -> str:
    """The level to register: the 'Other' text (a segment name or a label value) when given,
    else the chosen level."""
    other = (p.otherLevel or "").strip()
    return other if other else p.level


def _pathOrNone(path) -> Optional[str]:
    text = str(path) if path else ""
    return text if text not in ("", ".") else None


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
        self._job = None
        self._jobInputs = None       # the nodes and settings the running job was started with
        self._resultNodes = {}       # the last result's nodes (DRR overlays ...), for Show overlay
        self._timer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(_resource("UI", "RadGSReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RadGSRegLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._pollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.overlayButton.connect("clicked(bool)", self.onOverlayButton)
        self.ui.loadCaseButton.connect("clicked(bool)", self.onLoadCase)
        self.ui.exportCaseButton.connect("clicked(bool)", self.onExportCase)
        self.ui.simulateButton.connect("clicked(bool)", self.onSimulate)
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()
        if self._job is not None:
            self._job.cancel()
            self._job = None
        if self._timer is not None:
            self._timer.stop()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event):
        if self._job is not None:
            self._job.cancel()
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
        if self._job is not None or self._parameterNode is None:
            return
        p = self._parameterNode
        hasFile = p.geometrySource != "file" or _pathOrNone(p.geometryFile) is not None
        missing = [name for name, ok in ((_("CT"), p.ctVolume), (_("vertebra labels"), p.segmentation),
                                         (_("AP X-ray"), p.apXray), (_("lateral X-ray"), p.latXray),
                                         ("geometry.json", hasFile)) if not ok]
        self.ui.applyButton.enabled = not missing
        self.ui.applyButton.toolTip = _("Register (click again to cancel)") if not missing else \
            _("Missing: ") + ", ".join(missing)

    def onApplyButton(self):
        if self._job is not None:                          # Apply doubles as Cancel
            self._job.cancel()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Registration could not start."), waitCursor=True):
            self.logic.setupPythonRequirements()
            views = self.logic.geometryFor(p)
            self._job = self.logic.startRegistration(p.ctVolume, p.segmentation, effectiveLevel(p), p.apXray,
                                                     p.latXray, views, imageKind=p.imageKind,
                                                     config=self.logic.configFor(p),
                                                     threads=max(1, (os.cpu_count() or 2) - 1))   # one core for Slicer
            self._jobInputs = dict(ct=p.ctVolume, seg=p.segmentation, ap=p.apXray, lat=p.latXray, views=views,
                                   level=effectiveLevel(p), imageKind=p.imageKind)
            self.ui.applyButton.text = _("Cancel")
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting...")
            self._timer.start()

    def _pollJob(self):
        """Timer tick: progress events to the bar; the result to the scene when done."""
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for ev in job.poll():
            if ev.event in ("progress", "done"):
                self.ui.progressBar.value = int(round(100 * ev.fraction))
                if ev.message and ev.event == "progress":
                    self.ui.statusLabel.text = ev.message
        if not job.done:
            return
        self._timer.stop()
        self._job, inputs = None, self._jobInputs      # the result belongs to these, whatever the panel says now
        self.ui.applyButton.text = _("Apply")
        self._checkCanApply()
        p = self._parameterNode
        if job.state == "cancelled":
            self.ui.statusLabel.text = _("Registration cancelled.")
            self.ui.progressBar.value = 0
            return
        if job.state == "failed":
            self.ui.statusLabel.text = _("Registration failed: ") + (job.error or "")
            slicer.util.errorDisplay(_("Registration failed: ") + (job.error or ""),
                                     detailedText="\n".join(job.log))
            return
        with slicer.util.tryWithErrorDisplay(_("Showing the result failed."), waitCursor=True):
            nodes = self.logic.resultToNodes(job.result, inputs["views"], imageKind=inputs["imageKind"],
                                             transformNode=p.outputTransform, reconNode=p.outputRecon)
            p.outputTransform = nodes["transform"]
            if "recon" in nodes:
                p.outputRecon = nodes["recon"]
            self._resultNodes = nodes
            self.logic.applyResult(nodes["transform"], inputs["ct"], inputs["seg"])
            self.logic.showOverlay(inputs["ap"], inputs["lat"], nodes, inputs["views"], reconNode=nodes.get("recon"))
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = self.logic.summary(job.result, inputs["level"])

    def onOverlayButton(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Overlay failed."), waitCursor=True):
            self.logic.applyResult(p.outputTransform, p.ctVolume, p.segmentation)
            self.logic.showOverlay(p.apXray, p.latXray, self._resultNodes, self.logic.geometryFor(p),
                                   reconNode=p.outputRecon)

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
            name = nodes["case"].vertebra_name
            p.level, p.otherLevel = (name, "") if name in PANEL_LEVELS else (p.level, name or "")

    def onExportCase(self):
        path = qt.QFileDialog.getSaveFileName(None, _("New case folder"))
        if not path:
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Exporting the case failed."), waitCursor=True):
            self.logic.exportCase(path, p.ctVolume, p.segmentation, effectiveLevel(p), p.apXray, p.latXray,
                                  self.logic.geometryFor(p), imageKind=p.imageKind)

    def onSimulate(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Simulating X-rays failed."), waitCursor=True):
            self.logic.setupPythonRequirements()
            seed = random.randrange(10 ** 6)
            sim = self.logic.simulateXrays(p.ctVolume, p.segmentation, effectiveLevel(p), imageKind=p.imageKind,
                                           seed=seed)
            path = Path(slicer.app.temporaryPath) / "RadGSReg-simulated-geometry.json"   # geometry only
            self.logic.writeGeometry(sim["views"], path, imageKind=p.imageKind)
            p.apXray, p.latXray = sim["ap"], sim["lat"]
            p.geometrySource, p.geometryFile = "file", path
            self.ui.statusLabel.text = _("Simulated an AP + lateral pair of this CT (seed {seed}; geometry: {path}); "
                                         "the true pose is in the nodes' attribute RadGSReg.groundTruth.").format(
                                             seed=seed, path=path)


#
# Logic
#
class RadGSRegLogic(ScriptedLoadableModuleLogic):
    """Works without the widget: call :meth:`register` from Slicer's Python console. The
    keyword defaults of :meth:`register` and :meth:`startRegistration` are RegisterConfig's."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        _ensure_lib_on_path()

    def getParameterNode(self):
        return RadGSRegParameterNode(super().getParameterNode())

    # -- set-up
    def setupPythonRequirements(self, askConfirmation=None):
        """Install what RadGSRegLib needs, once, on first use (never at import time): torch
        through the PyTorch extension, the rest with pip constrained to Slicer's own numpy,
        scipy, SimpleITK, VTK and Pillow. Asks first unless Slicer runs with --testing."""
        from RadGSRegLib import slicer_requirements as req

        if askConfirmation is None:
            askConfirmation = not slicer.app.testingEnabled()
        if req.torch_problem() == "PyTorch is not installed":
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("RadGSReg needs PyTorch: install the 'PyTorch' extension from the Extensions "
                                     "Manager, restart Slicer, then press Apply again.")) from None
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                             torchVersionRequirement=req.TORCH_REQUIREMENT) is None:
                raise RuntimeError(_("PyTorch is required and was not installed."))
        problem = req.torch_problem()
        if problem:
            raise RuntimeError(problem)
        missing = req.missing_requirements()
        if not missing:
            return
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("RadGSReg will download and install these Python packages (a few minutes): ") + ", ".join(missing)):
            raise RuntimeError(_("Required Python packages are not installed: ") + ", ".join(missing))
        fd, constraints = tempfile.mkstemp(prefix="RadGSReg-constraints-", suffix=".txt")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(req.constraints())
            slicer.util.pip_install(req.pip_arguments(missing, constraints))
        finally:
            os.remove(constraints)
        still = req.missing_requirements()
        if still:
            raise RuntimeError(_("Installing failed for: ") + ", ".join(still))

    # -- settings
    def configFor(self, p):
        """The RegisterConfig of the panel's options (RadGSRegLib.slicer_panel.config_from_panel)."""
        from RadGSRegLib import slicer_panel

        return slicer_panel.config_from_panel(p.init, p.refine, p.device, p.reconstruct, _pathOrNone(p.modelFile))

    # -- geometry and cases
    def readGeometry(self, path):
        """{"ap": View, "lat": View} from a geometry.json."""
        from RadGSRegLib.io import read_geometry

        views, _images, _kind = read_geometry(path)
        return views

    def writeGeometry(self, views, path, imageKind="line_integral"):
        """Write {"ap": View, "lat": View} as a geometry.json (docs/case-format.md)."""
        from RadGSRegLib.io import write_geometry

        return write_geometry(views, path, image_kind=imageKind)

    def geometryFor(self, p):
        """{"ap": View, "lat": View} from the parameter node's geometry source."""
        if p.geometrySource == "file":
            if _pathOrNone(p.geometryFile) is None:
                raise ValueError(_("Choose the geometry.json of the two X-rays."))
            return self.readGeometry(p.geometryFile)
        if p.geometrySource == "dicom":
            return {"ap": self.geometryFromDicom(p.apXray, "ap"), "lat": self.geometryFromDicom(p.latXray, "lat")}
        return self.typedGeometry(p.apXray, p.latXray, p.sdd, p.sid, p.pixelSpacing)

    def geometryFromDicom(self, xrayNode, name):
        """The view of an X-ray loaded from DICOM, from its file's tags (needs Slicer's DICOM database)."""
        from RadGSRegLib.io import view_from_dicom

        uids = (xrayNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        if not uids or not slicer.dicomDatabase:
            raise ValueError(f"'{xrayNode.GetName()}' was not loaded from DICOM: choose a geometry.json or type the "
                             "geometry in")
        return view_from_dicom(slicer.dicomDatabase.fileForInstance(uids[0]), name)

    def typedGeometry(self, apNode, latNode, sdd, sid, pixelSpacing):
        """A standard biplanar C-arm (geometry.biplanar_views) sized like the two X-ray nodes."""
        from RadGSRegLib import slicer_bridge

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

    def simulateXrays(self, ctNode, segNode, level, imageKind="line_integral", seed=0, **kwargs):
        """An AP + lateral pair simulated from the CT at a random pose near the nominal one
        (for trying the module, and for its self-test); see slicer_selftest.simulate_xray_nodes.
        Each X-ray node records the true T_ct_to_carm in its attribute 'RadGSReg.groundTruth'."""
        import json

        from RadGSRegLib import slicer_selftest

        sim = slicer_selftest.simulate_xray_nodes(slicer.mrmlScene, ctNode, segNode, level, image_kind=imageKind,
                                                seed=seed, **kwargs)
        for k in ("ap", "lat"):
            sim[k].SetAttribute("RadGSReg.groundTruth", json.dumps(sim["ground_truth"].tolist()))
        return sim

    # -- registration
    def register(self, ctNode, segNode, level, apNode, latNode, views, imageKind="line_integral", config=None,
                 transformNode=None, reconNode=None, **settings):
        """Synchronous registration in this process (console, tests). Returns
        (transformNode, reconNode or None). ``config`` (a RegisterConfig) or single
        settings (``init="search"``, ``refine="2d"``, ``model=...``) override RegisterConfig's
        defaults; ``init="learned"`` without ``model`` uses the shipped weights."""
        import dataclasses

        from RadGSRegLib import slicer_bridge

        cfg = dataclasses.replace(config or RegisterConfig(), **settings)
        if cfg.init == "learned" and not cfg.model:
            cfg = dataclasses.replace(cfg, model="default")
        tnode, rnode, _result = slicer_bridge.register(slicer.mrmlScene, ctNode, segNode, level, apNode, latNode,
                                                       views, image_kind=imageKind, config=cfg, log=print,
                                                       transform_node=transformNode, recon_node=reconNode)
        return tnode, rnode

    def startRegistration(self, ctNode, segNode, level, apNode, latNode, views, imageKind="line_integral",
                          config=None, threads=None):
        """Start a registration in a separate process (Slicer stays responsive); returns the
        RadGSRegLib.job.RegistrationJob: ``poll()`` it for progress events, ``cancel()`` it;
        when ``done``, ``result`` or ``error``. The temporary copy of the data is removed in
        every case. ``threads``: CPU threads of the child (None: the CLI's default, 1)."""
        from RadGSRegLib import slicer_bridge
        from RadGSRegLib.job import RegistrationJob

        case = slicer_bridge.case_from_nodes(ctNode, segNode, level, apNode, latNode, views, image_kind=imageKind)
        return RegistrationJob(case, config or RegisterConfig(), threads=threads).start()

    def resultToNodes(self, result, views, imageKind="line_integral", transformNode=None, reconNode=None):
        """{"transform", "recon", "drr_ap", "drr_lat"} nodes of a registration result."""
        from RadGSRegLib import slicer_bridge

        return slicer_bridge.result_to_nodes(slicer.mrmlScene, result, views, image_kind=imageKind,
                                             transform_node=transformNode, recon_node=reconNode)

    def applyResult(self, transformNode, ctNode, segNode=None):
        """Put the CT (and its segmentation) under the result: they move onto the X-rays."""
        from RadGSRegLib import slicer_bridge

        if transformNode is None:
            raise ValueError(_("There is no result yet: press Apply first."))
        slicer_bridge.move_under(transformNode, ctNode, segNode)

    def summary(self, result, level=None):
        """The result in words: time, similarity per view, warnings (slicer_panel.result_summary)."""
        from RadGSRegLib import slicer_panel

        return slicer_panel.result_summary(result, level)

    def showOverlay(self, apNode, latNode, nodes, views, reconNode=None):
        """Each X-ray in its own slice view, aligned with its detector plane, with the DRR at
        the result (nodes["drr_ap"/"drr_lat"]) drawn over it in colour; the reconstruction (or
        nothing) over the AP view in 3-D; the X-ray sources as points; four-up layout."""
        from RadGSRegLib import slicer_bridge

        layout = slicer.app.layoutManager()
        layout.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
        for viewName, node, key in (("Red", apNode, "drr_ap"), ("Yellow", latNode, "drr_lat")):
            widget = layout.sliceWidget(viewName)
            composite = widget.sliceLogic().GetSliceCompositeNode()
            composite.SetBackgroundVolumeID(node.GetID())
            overlay = nodes.get(key)
            composite.SetForegroundVolumeID(overlay.GetID() if overlay is not None else None)
            composite.SetForegroundOpacity(0.5)
            sliceNode = widget.mrmlSliceNode()
            sliceNode.RotateToVolumePlane(node)
            sliceNode.SetSliceVisible(True)
            widget.sliceController().fitSliceToBackground()
        if reconNode is not None:
            green = layout.sliceWidget("Green").sliceLogic().GetSliceCompositeNode()
            green.SetBackgroundVolumeID(reconNode.GetID())
        slicer_bridge.source_markups(slicer.mrmlScene, views)


#
# Test
#
class RadGSRegTest(ScriptedLoadableModuleTest):
    """Loads the Sample Data entry as a user would, simulates an AP + lateral pair per lumbar
    level, registers it with the logic's defaults, and checks the error (< 1 mm) and the
    transform's RAS/LPS convention (RadGSRegLib.slicer_selftest.run_self_test; the same
    function runs in CI on slicer-core through this logic, Testing/test_slicer_module.py)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RadGSReg_sample_data()

    def test_RadGSReg_sample_data(self):
        import SampleData

        from RadGSRegLib import slicer_selftest

        logic = RadGSRegLogic()
        self.delayDisplay(_("Installing what RadGSReg needs (first run only)"))
        logic.setupPythonRequirements()
        registerSampleData()
        self.delayDisplay(_("Loading the sample CT"))
        ctNode, segNode = SampleData.downloadSamples(SAMPLE_NAME)
        self.assertTrue(ctNode.IsA("vtkMRMLScalarVolumeNode") and segNode.IsA("vtkMRMLSegmentationNode"))

        def register(ct, seg, level, ap, lat, views):
            return logic.register(ct, seg, level, ap, lat, views)[0]

        with tempfile.TemporaryDirectory(prefix="RadGSRegTest-") as workdir:      # removed afterwards
            rows = slicer_selftest.run_self_test(slicer.mrmlScene, register, ctNode, segNode, workdir,
                                                 log=self.delayDisplay)
        for row in rows:
            self.assertLess(row["mtre_mm"], 1.0)
        self.delayDisplay(_("Test passed"))
