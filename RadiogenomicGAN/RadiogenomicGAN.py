"""RadiogenomicGAN: insert gene-controlled synthetic lung nodules into a CT (Xu et al., MIDL 2019).

Slicer's ExtensionWizard layout: Module (metadata), a parameter-node dataclass (the state, saved with the
scene), Widget (wires the .ui to the Logic), Logic (nodes in, nodes out; usable from the Python console)
and Test (the in-Slicer self test). The heavy work lives in RadiogenomicGANLib: `request` is the one request
path shared with the CLI (slice syntax, gene-sample label, OOM fallback), `background` runs that CLI in a
child process for the Widget, `radiogenomic_map` is the one t-SNE map, `mrml_adapter` converts nodes.

Two ways to run the same request:
- the Widget's Apply: the input CT is written to a temporary file and `python -m RadiogenomicGANLib insert`
  runs in a child process (Slicer's PythonSlicer); the UI stays responsive behind a modal progress dialog,
  Cancel kills the child, and a torch/CUDA crash cannot take Slicer down;
- the Python console: `RadiogenomicGANLogic().insertNodules(...)` runs in-process (nodes in, nodes out).
Both produce the same nodes (Testing/test_module_logic.py compares them voxel for voxel).

Supported Slicer: 5.10 or later (Python ≥ 3.10). The Lib needs Python 3.10 (`dataclass(kw_only=True)`,
`X | Y` types at run time) and torch ≥ 2.3 (Slicer 5.10 bundles NumPy 2, which older torch cannot use).
This file itself still imports under Python 3.9 (Slicer 5.8), so the module appears there and says so
instead of vanishing with a SyntaxError in the log: see `unsupportedReason`.

Headless use: Slicer's Qt layer (qt, ctk, ScriptedLoadableModule, parameterNodeWrapper) only exists inside
the application. Outside it (slicer-core, the test suite) the guarded import below substitutes plain base
classes and a dataclass for the parameter node, so the *same* Logic code runs on a bare vtkMRMLScene —
the Widget and the Test class are then inert. Torch and the other heavy packages are imported lazily, so
the module loads in a Slicer without PyTorch and can offer to install it.
"""

from __future__ import annotations  # annotations stay strings: this file must import under Python 3.9

import dataclasses
import enum
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import typing
import unittest
from typing import Annotated, Any

import numpy as np
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.util import VTKObservationMixin

try:  # inside the Slicer application (these modules need Qt)
    import qt
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import *

    SLICER_APPLICATION = True
except ImportError:  # slicer-core without Qt: only the Logic is usable (see the module docstring)
    if hasattr(slicer, "app"):  # inside the application a failed import is a real error, never hidden
        raise
    SLICER_APPLICATION = False
    qt = None

    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

    class WithinRange:
        """Stand-in for slicer.parameterNodeWrapper.WithinRange (kept only as an annotation)."""

        def __init__(self, minimum: float, maximum: float) -> None:
            self.minimum, self.maximum = minimum, maximum

    def parameterNodeWrapper(cls: type) -> type:
        """Stand-in: a dataclass with the wrapper's defaults (no node → None, Path → Path(), str → "")."""
        for name, hint in typing.get_type_hints(cls, include_extras=True).items():
            if not hasattr(cls, name):
                base = typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint
                setattr(cls, name, base() if base in (str, int, float, bool, pathlib.Path) else None)
        return dataclasses.dataclass(cls)

    class ScriptedLoadableModule:
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent: Any = None) -> None:
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent: Any = None) -> None:
            self.moduleName = type(self).__name__[: -len("Logic")]

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message: str, msec: int | None = None) -> None:
            logging.info(message)


#: Slicer 5.10 (Python 3.10+) is the oldest supported release; see the module docstring.
MINIMUM_SLICER = "5.10"
MINIMUM_PYTHON = (3, 10)
#: PyTorch requirement passed to the PyTorch extension's installer: torch < 2.3 fails under NumPy 2, which
#: Slicer 5.10 bundles.
TORCH_REQUIREMENT = ">=2.3"
#: The bundled demo generator (installed next to the module's resources; see the top-level CMakeLists.txt).
BUNDLED_WEIGHTS_FILE = "demo_model.safetensors"
#: The phantom CT registered as Sample Data: patient 0 of this cohort seed.
PHANTOM_SAMPLE_NAME = "RadiogenomicGANPhantom"
PHANTOM_SEED = 2019
PROJECT_URL = "https://github.com/radiogenomicgan/SlicerRadiogenomicGAN"
PAPER_URL = "https://arxiv.org/abs/1907.03728"
#: Node attribute that marks the radiogenomic-map chart, which every new map refills.
MAP_CHART_ROLE = "radiogenomicMap"


def unsupportedReason() -> str | None:
    """Why this Slicer cannot run the module (None when it can): said in the panel, raised by the Logic."""
    if sys.version_info < MINIMUM_PYTHON:
        return (f"RadiogenomicGAN needs 3D Slicer {MINIMUM_SLICER} or later (Python "
                f"{MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]}+); this Slicer runs Python "
                f"{sys.version_info[0]}.{sys.version_info[1]}. Please install a newer Slicer.")
    return None


def ensureLibImportable() -> None:
    """Make `import RadiogenomicGANLib` work when running from source.

    Installed, CMake copies the Lib beside this file (both in qt-scripted-modules, on sys.path). From a source
    checkout (module path .../RadiogenomicGAN) Slicer adds only this folder to sys.path, and the Lib sits one
    level up, at the repository root: that root is added, once, and only if it holds the Lib.
    """
    if importlib.util.find_spec("RadiogenomicGANLib") is not None:
        return
    root = pathlib.Path(__file__).resolve().parent.parent
    if (root / "RadiogenomicGANLib" / "__init__.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))


ensureLibImportable()


#
# RadiogenomicGAN
#


class RadiogenomicGAN(ScriptedLoadableModule):
    """Module metadata; see https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py"""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RadiogenomicGAN")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Radiogenomics")]
        self.parent.dependencies = []  # PyTorch comes from the PyTorch extension, asked for when needed
        self.parent.contributors = [
            "RadiogenomicGAN project (re-implementation of Z. Xu, X. Wang, H.-C. Shin, H. Roth, D. Yang, "
            "F. Milletari, L. Zhang, D. Xu, MIDL 2019)"]
        self.parent.helpText = _("""
Insert synthetic lung nodules whose appearance is driven by a patient's gene-expression profile into a
chest CT, as in <a href="{paper}">Xu et al., "Correlation via synthesis", MIDL 2019</a>.
Pick a CT, a gene table (GEO text or CSV) and a sample (or a blend of two samples), click nodule centres
in the lung (or let the module choose them), choose the slices, and press Apply: the result is a
<b>new</b> volume, a <b>new</b> segmentation ("Synthetic nodule N", tagged as synthetic with the model,
sample and seed) and, on request, the generator's fusion weight map. Apply runs in a background process
that Cancel stops. "Show radiogenomic map" plots the t-SNE of the learned gene codes of every sample.
Slices: fitted to each nodule's size (its centre slice is drawn first; the default), "±K" around each centre,
or indices such as "40, 41, 45-48"; one group per centre separated by ";" ("auto" in a group fits that one).
From the Python console: <code>slicer.util.getModuleLogic("RadiogenomicGAN").insertNodules(volumeNode,
"genes.txt", "R01-001", autoCount=2)</code>.
Needs Slicer {minimum} or later and the PyTorch extension.
See the <a href="{project}">project documentation</a>.
""").format(paper=PAPER_URL, project=PROJECT_URL, minimum=MINIMUM_SLICER)
        self.parent.acknowledgementText = _("""
A re-implementation of Z. Xu, X. Wang, H.-C. Shin, D. Yang, H. Roth, F. Milletari, L. Zhang and D. Xu,
"Correlation via synthesis: end-to-end nodule image generation and radiogenomic map learning based on
generative adversarial network", Medical Imaging with Deep Learning (MIDL) 2019. Data formats follow the
NSCLC-Radiogenomics collection (TCIA) and GEO GSE103584. The bundled demo model was trained on a synthetic
phantom cohort and is for demonstration only: synthetic nodules are not real findings.
""")
        if SLICER_APPLICATION and unsupportedReason() is None:
            slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: a phantom chest CT, generated in memory on demand and cached as NRRD
#


def phantomCachePath() -> pathlib.Path:
    """Where the generated phantom CT is kept between sessions (Slicer's cache folder)."""
    return pathlib.Path(slicer.app.cachePath) / "RadiogenomicGAN" / f"{PHANTOM_SAMPLE_NAME}-{PHANTOM_SEED}.nrrd"


def loadPhantomSample() -> Any:
    """Load the phantom CT into the application scene, generating and caching it the first time.

    The CT is built in memory (numpy + scipy, both bundled with Slicer) and saved as NRRD: no DICOM writer,
    so neither highdicom nor pydicom 3 is needed (Slicer 5.10 bundles pydicom 2.4 and no highdicom).
    """
    path = phantomCachePath()
    if path.is_file():
        return slicer.util.loadVolume(str(path), {"name": PHANTOM_SAMPLE_NAME})
    with slicer.util.WaitCursor():
        node = RadiogenomicGANLogic().createPhantomVolume(slicer.mrmlScene, name=PHANTOM_SAMPLE_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not slicer.util.saveNode(node, str(path)):
        logging.warning(f"Could not cache the phantom CT at {path}; it will be generated again next time")
    return node


def registerSampleData() -> None:
    """Register the phantom CT in the Sample Data module (generated by RadiogenomicGANLib.phantom)."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources/Icons")
    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):
        SampleData.SampleDataLogic.registerCustomSampleDataCategory("RadiogenomicGAN", title=_("RadiogenomicGAN"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="RadiogenomicGAN",
        sampleName=PHANTOM_SAMPLE_NAME,
        thumbnailFileName=os.path.join(iconsPath, "RadiogenomicGAN.png"),
        # Nothing is downloaded: the custom downloader generates the phantom (or loads the cached copy).
        uris=phantomCachePath().as_uri(),
        fileNames=phantomCachePath().name,
        nodeNames=PHANTOM_SAMPLE_NAME,
        customDownloader=lambda source: loadPhantomSample(),
    )


#
# Dependencies: asked for when needed, installed only with the user's consent
#


def requirementsPath() -> str:
    return os.path.join(os.path.dirname(__file__), "Resources", "requirements.txt")


def missingDependencies() -> list:
    """torch (TORCH_REQUIREMENT) and the packages of Resources/requirements.txt that are absent or too old."""
    requirements = [f"torch{TORCH_REQUIREMENT}", *RadiogenomicGANLogic.readRequirements(requirementsPath())]
    return RadiogenomicGANLogic.missingRequirements(requirements)


def ensureDependencies(askConfirmation: bool = True) -> bool:
    """Install what is missing, with the user's consent; False when declined or impossible (already said).

    Call it inside slicer.util.tryWithErrorDisplay, so a failed install is a dialog, not a console line.
    PyTorch comes from the PyTorch extension (it picks the CUDA or CPU build). The background run uses the
    new packages at once; only the in-process Logic of this session needs a restart after an upgrade of an
    already imported torch, which is offered.
    """
    torchWasImported = "torch" in sys.modules
    if RadiogenomicGANLogic.missingRequirements([f"torch{TORCH_REQUIREMENT}"]):
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            slicer.util.errorDisplay(_(
                "RadiogenomicGAN runs its generator with PyTorch, which Slicer installs through the 'PyTorch' "
                "extension.\n\nOpen View → Extensions Manager, install 'PyTorch', restart Slicer, then press "
                "Apply again: you will be offered to install PyTorch ({req}) for your GPU or CPU."
            ).format(req=TORCH_REQUIREMENT))
            return False
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            return False
        if torchWasImported and slicer.util.confirmYesNoDisplay(_(
                "PyTorch was upgraded. Apply already uses the new version; the Python console's RadiogenomicGAN "
                "logic needs a restart of Slicer to use it. Restart now?")):
            slicer.util.restart()
    requirements = RadiogenomicGANLogic.readRequirements(requirementsPath())
    missing = RadiogenomicGANLogic.missingRequirements(requirements)
    if not missing:
        return True
    try:  # Slicer ≥ 5.12 has one dialog for checking, confirming and installing
        from slicer.packaging import pip_ensure
    except ImportError:
        pip_ensure = None
    if pip_ensure is not None:
        try:
            pip_ensure(requirements, requester="RadiogenomicGAN")
        except RuntimeError:  # the user declined
            return False
        return True
    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            _("RadiogenomicGAN needs these Python packages: {packages}. Install them now?").format(
                packages=", ".join(missing))):
        return False
    slicer.util.pip_install(" ".join(f'"{r}"' for r in missing))
    return True


#
# RadiogenomicGANParameterNode
#


class Device(enum.Enum):
    """Where the generator runs."""

    AUTO = "auto"
    GPU = "cuda"
    CPU = "cpu"

    def label(self) -> str:
        return {"auto": _("Auto (GPU if available)"), "cuda": _("GPU (CUDA)"), "cpu": _("CPU")}[self.value]


class Placement(enum.Enum):
    """How nodule centres are chosen."""

    POINTS = "points"
    AUTOMATIC = "automatic"

    def label(self) -> str:
        return {"points": _("Points of a point list"), "automatic": _("Automatic (in the lung)")}[self.value]


class SliceMode(enum.Enum):
    """Which slices receive each nodule."""

    FIT_TO_SIZE = "fitToSize"
    AROUND_CENTRE = "aroundCentre"
    LIST = "list"

    def label(self) -> str:
        return {"fitToSize": _("Fitted to the nodule's size"), "aroundCentre": _("± k slices around the centre"),
                "list": _("Explicit slice list")}[self.value]


#: Parameters the Widget syncs by hand; every other field has a SlicerParameterName widget. The samples' combo
#: boxes are filled from the gene table at run time (a Choice annotation cannot express that); the two paths
#: are plain strings because the wrapper's ctkPathLineEdit connector takes pathlib.Path, whose empty value
#: Path() shows as "." in the field.
PARAMETERS_WITHOUT_WIDGET = ("sampleId", "blendSampleId", "weightsPath", "geneTablePath")


@parameterNodeWrapper
class RadiogenomicGANParameterNode:
    """The module's state, saved with the scene.

    inputVolume - CT to insert into (never modified). useBundledWeights / weightsPath - the generator.
    device - auto / GPU / CPU. geneTablePath, sampleId - the profile; blendEnabled, blendSampleId,
    blendWeight - optional blend of two profiles; imputeMissingGenes - fill genes the table lacks.
    placement, pointList, autoCount, allowOutsideLung - nodule centres. sliceMode, halfSlices, sliceList -
    slices. seed - noise and automatic placement. outputVolume, outputSegmentation, outputWeightMapEnabled,
    outputWeightMap - results (None = create new nodes).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    useBundledWeights: bool = True
    weightsPath: str = ""
    device: Device = Device.AUTO
    geneTablePath: str = ""
    sampleId: str = ""
    blendEnabled: bool = False
    blendSampleId: str = ""
    blendWeight: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    imputeMissingGenes: bool = False
    placement: Placement = Placement.POINTS
    pointList: vtkMRMLMarkupsFiducialNode
    autoCount: Annotated[int, WithinRange(1, 20)] = 1
    allowOutsideLung: bool = False
    # Fitted by default: a clicked point gets a whole nodule, not one cut flat by too short a range.
    sliceMode: SliceMode = SliceMode.FIT_TO_SIZE
    halfSlices: Annotated[int, WithinRange(0, 50)] = 2
    sliceList: str = ""
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    outputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    outputWeightMapEnabled: bool = False
    outputWeightMap: vtkMRMLScalarVolumeNode



#
# RadiogenomicGANWidget
#


class RadiogenomicGANWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wires the .ui to the Logic; see https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py

    Apply and the map run in a background process (`RadiogenomicGANLogic.startInsertion`); a modal progress
    dialog keeps the scene and the buttons out of reach until it ends, and its Cancel kills the process.
    """

    POLL_MS = 200

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._fillingSampleLists = False
        self._job = None
        self._dialog = None
        self._timer = None
        self._onJobFinished = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RadiogenomicGAN.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = RadiogenomicGANLogic()
        reason = unsupportedReason()
        if reason is not None:  # Slicer 5.8 and older: say so, offer nothing that would fail
            self.ui.statusLabel.text = reason
            self.ui.applyButton.enabled = False
            self.ui.radiogenomicMapButton.enabled = False
            self.ui.installTorchButton.visible = False
            return

        # Centres are clicked in the views: only the place button, persistent placement.
        self.ui.pointPlaceWidget.buttonsVisible = False
        self.ui.pointPlaceWidget.placeButton().show()
        self.ui.pointPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.radiogenomicMapButton.connect("clicked(bool)", self.onRadiogenomicMapButton)
        self.ui.installTorchButton.connect("clicked(bool)", self.onInstallTorchButton)
        self.ui.geneTablePathLineEdit.connect("currentPathChanged(QString)", self.onGeneTableChanged)
        self.ui.weightsPathLineEdit.connect("currentPathChanged(QString)", self.onWeightsPathChanged)
        self.ui.sampleComboBox.connect("currentTextChanged(QString)", self.onSampleChanged)
        self.ui.blendSampleComboBox.connect("currentTextChanged(QString)", self.onBlendSampleChanged)
        self.ui.pointListSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.ui.pointPlaceWidget, "setCurrentNode(vtkMRMLNode*)")

        self.initializeParameterNode()
        self.updateTorchStatus()

    def cleanup(self) -> None:
        self._cancelJob()
        self.removeObservers()
        if self.logic is not None:
            self.logic.releaseResources()

    def enter(self) -> None:
        if unsupportedReason() is None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._cancelJob()  # a run must not fill nodes of a scene that is going away
        self.setParameterNode(None)
        self.logic.releaseResources()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: RadiogenomicGANParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carry a "SlicerParameterName" dynamic property naming their parameter.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._fillSampleLists()
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Paths to their fields; enable what applies to the current choices, Apply when the inputs are complete."""
        p = self._parameterNode
        if not p:
            return
        for lineEdit, value in ((self.ui.weightsPathLineEdit, p.weightsPath),
                                (self.ui.geneTablePathLineEdit, p.geneTablePath)):
            if lineEdit.currentPath != value:
                lineEdit.currentPath = value
        self.ui.weightsPathLineEdit.enabled = not p.useBundledWeights
        self.ui.blendSampleComboBox.enabled = p.blendEnabled
        self.ui.blendWeightSliderWidget.enabled = p.blendEnabled
        byPoints = p.placement == Placement.POINTS
        self.ui.pointListSelector.enabled = byPoints
        self.ui.pointPlaceWidget.enabled = byPoints
        self.ui.autoCountSpinBox.enabled = not byPoints
        self.ui.halfSlicesSpinBox.enabled = p.sliceMode == SliceMode.AROUND_CENTRE
        self.ui.sliceListLineEdit.enabled = p.sliceMode == SliceMode.LIST
        self.ui.outputWeightMapSelector.enabled = p.outputWeightMapEnabled
        missing = []
        if not p.inputVolume:
            missing.append(_("an input volume"))
        weightsPath = None if p.useBundledWeights else (p.weightsPath or None)
        needsGenes = RadiogenomicGANLogic.modelKind(weightsPath) != "inpainting"  # inpainting: context only
        if needsGenes and not p.geneTablePath:
            missing.append(_("a gene table"))
        if needsGenes and not p.sampleId:
            missing.append(_("a sample"))
        if byPoints and not p.pointList:
            missing.append(_("a point list with nodule centres"))
        running = self._job is not None
        self.ui.applyButton.enabled = not missing and not running
        self.ui.applyButton.toolTip = (
            _("Insert the synthetic nodules") if not missing else _("Select {what}").format(what=", ".join(missing))
        )
        self.ui.radiogenomicMapButton.enabled = bool(p.geneTablePath) and not running

    # --- paths and gene table → sample lists (synced by hand, see PARAMETERS_WITHOUT_WIDGET) ----------------
    def onWeightsPathChanged(self, path: str) -> None:
        if self._parameterNode and self._parameterNode.weightsPath != path:
            self._parameterNode.weightsPath = path

    def onGeneTableChanged(self, path: str) -> None:
        if self._parameterNode and self._parameterNode.geneTablePath != path:
            self._parameterNode.geneTablePath = path
        self._fillSampleLists(path)

    def _fillSampleLists(self, path: str | None = None) -> None:
        p = self._parameterNode
        sampleIds: list = []
        path = path if path is not None else (p.geneTablePath if p else "")
        if path:
            try:
                sampleIds = self.logic.sampleIds(path)
                self.ui.statusLabel.text = _("{count} samples in the gene table.").format(count=len(sampleIds))
            except Exception as error:  # a bad table is reported here, not as a dialog on every keystroke
                self.ui.statusLabel.text = _("Cannot read the gene table: {error}").format(error=error)
        self._fillingSampleLists = True
        try:
            for comboBox, current in ((self.ui.sampleComboBox, p.sampleId if p else ""),
                                      (self.ui.blendSampleComboBox, p.blendSampleId if p else "")):
                comboBox.clear()
                comboBox.addItems(sampleIds)
                comboBox.currentIndex = sampleIds.index(current) if current in sampleIds else (0 if sampleIds else -1)
        finally:
            self._fillingSampleLists = False
        if p:
            p.sampleId = self.ui.sampleComboBox.currentText
            p.blendSampleId = self.ui.blendSampleComboBox.currentText

    def onSampleChanged(self, text: str) -> None:
        if self._parameterNode and not self._fillingSampleLists:
            self._parameterNode.sampleId = text

    def onBlendSampleChanged(self, text: str) -> None:
        if self._parameterNode and not self._fillingSampleLists:
            self._parameterNode.blendSampleId = text

    # --- PyTorch and other packages ---------------------------------------------------------------------
    def updateTorchStatus(self) -> None:
        version = RadiogenomicGANLogic.installedVersion("torch")
        missing = missingDependencies()
        torchMissing = RadiogenomicGANLogic.missingRequirements([f"torch{TORCH_REQUIREMENT}"])
        if version and not torchMissing:
            self.ui.torchStatusLabel.text = _("PyTorch {version}").format(version=version)
        elif version:
            self.ui.torchStatusLabel.text = _("PyTorch {version} is too old (needs {req})").format(
                version=version, req=TORCH_REQUIREMENT)
        else:
            self.ui.torchStatusLabel.text = _("PyTorch is not installed")
        if missing and not torchMissing:
            self.ui.torchStatusLabel.text += _("; missing: {packages}").format(packages=", ".join(missing))
        self.ui.installTorchButton.visible = bool(missing)

    def onInstallTorchButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages RadiogenomicGAN needs.")):
            ensureDependencies()
        self.updateTorchStatus()

    # --- background runs --------------------------------------------------------------------------------
    def _startJob(self, job: Any, labelText: str, onFinished: Any) -> None:
        """Show a modal progress dialog for a background job and poll it from a timer until it ends."""
        self._job = job
        self._onJobFinished = onFinished
        self._dialog = slicer.util.createProgressDialog(
            windowTitle=_("RadiogenomicGAN"), labelText=labelText, maximum=100, autoClose=False, autoReset=False)
        # Modal for the whole application: no second Apply, no scene close, while the run lasts. Qt ignores a
        # modality change on a visible window, hence hide → set → show.
        self._dialog.hide()
        self._dialog.windowModality = qt.Qt.ApplicationModal
        self._dialog.show()
        self._dialog.connect("canceled()", self._cancelJob)
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_MS)
        self._timer.connect("timeout()", self._pollJob)
        self._timer.start()
        self._onParameterNodeModified()

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            return
        if job.poll():
            self._dialog.labelText = job.message
            self._dialog.value = round(100 * job.fraction)
            return
        self._endJob()
        with slicer.util.tryWithErrorDisplay(_("RadiogenomicGAN failed."), waitCursor=True):
            self._onJobFinished(job)

    def _cancelJob(self) -> None:
        if self._job is not None:
            job = self._job
            job.cancel()
            self._endJob()
            self.ui.statusLabel.text = _("Cancelled: nothing was added to the scene.")

    def _endJob(self) -> None:
        # Forget the job first: closing a QProgressDialog emits canceled(), which must not cancel a finished job.
        timer, dialog = self._timer, self._dialog
        self._job, self._timer, self._dialog = None, None, None
        if timer is not None:
            timer.stop()
        if dialog is not None:
            dialog.close()
        self._onParameterNodeModified()

    # --- actions ------------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        """Insert nodules in a background process; the outputs are loaded when it ends."""
        if self._job is not None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to insert synthetic nodules."), waitCursor=True):
            if not ensureDependencies():
                return
            job = self.logic.startParameterNode(self._parameterNode, python=pythonSlicerExecutable())
            self._startJob(job, _("Inserting synthetic nodules…"), self._onInsertionFinished)

    def _onInsertionFinished(self, job: Any) -> None:
        volume, segmentation, _weightMap = self.logic.finishParameterNode(self._parameterNode, job)
        self._showResult(volume, segmentation)

    def _showResult(self, volume, segmentation) -> None:
        from RadiogenomicGANLib import mrml_adapter

        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        if segmentation.GetDisplayNode():
            segmentation.GetDisplayNode().SetVisibility(True)
        centres = mrml_adapter.world_points(volume, RadiogenomicGANLogic.insertedCentres(segmentation))
        if len(centres):  # the slice views take world coordinates; the centres are in the volume's frame
            x, y, z = (float(v) for v in centres[0])
            slicer.modules.markups.logic().JumpSlicesToLocation(x, y, z, True)
        status = _("Inserted {count} synthetic nodule(s) into '{name}'.").format(
            count=segmentation.GetSegmentation().GetNumberOfSegments(), name=volume.GetName())
        note = RadiogenomicGANLogic.emptyNoduleNote(segmentation, volume)
        self.ui.statusLabel.text = status + (" " + note[0].upper() + note[1:] if note else "")

    def onRadiogenomicMapButton(self) -> None:
        """t-SNE of the cohort's gene codes (background process) as one Slicer plot, the chosen sample(s) marked."""
        if self._job is not None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the radiogenomic map."), waitCursor=True):
            if not ensureDependencies():
                return
            p = self._parameterNode
            job = self.logic.startRadiogenomicMap(
                p.geneTablePath, weightsPath=None if p.useBundledWeights else (p.weightsPath or None),
                device=p.device.value, imputeMissingGenes=p.imputeMissingGenes, seed=p.seed,
                python=pythonSlicerExecutable())
            self._startJob(job, _("Computing the radiogenomic map…"), self._onMapFinished)

    def _onMapFinished(self, job: Any) -> None:
        p = self._parameterNode
        highlight = [p.sampleId] + ([p.blendSampleId] if p.blendEnabled and p.blendSampleId else [])
        chart = self.logic.finishRadiogenomicMap(job, highlight)
        slicer.modules.plots.logic().ShowChartInLayout(chart)


def pythonSlicerExecutable() -> str | None:
    """Slicer's own Python launcher for background runs (None outside the application: this interpreter).

    Inside Slicer, sys.executable is the application itself, never a fallback: a missing launcher is an error.
    """
    if not SLICER_APPLICATION:
        return None
    launcher = shutil.which("PythonSlicer")
    if launcher is None:
        raise RuntimeError("PythonSlicer (Slicer's Python launcher) is not on PATH: cannot run in the background")
    return launcher


#
# RadiogenomicGANLogic
#


@dataclasses.dataclass
class BackgroundJob:
    """A background run of a Lib CLI and what turns its files into nodes (see RadiogenomicGANLogic.start*)."""

    run: Any
    folder: Any
    files: Any = None
    inputVolumeNode: Any = None
    mapPath: str = ""

    @property
    def fraction(self) -> float:
        return float(self.run.fraction)

    @property
    def message(self) -> str:
        return str(self.run.message)

    def poll(self) -> bool:
        return self.run.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.run.wait(timeout)

    def cancel(self) -> None:
        self.run.cancel()
        self.folder.cleanup()


class RadiogenomicGANLogic(ScriptedLoadableModuleLogic):
    """Nodes in, nodes out: the module's computations, usable from the Python console and from tests.

    Every method that touches the scene takes `scene=` (default: the application scene), so the Logic also
    runs on a bare vtkMRMLScene (slicer-core). `insertNodules` runs in this process; `startInsertion` /
    `finishInsertion` run the same request through the CLI in a background process (what Apply does). One
    generator and one gene table stay cached (`releaseResources` frees them, and the GPU memory).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._cache = None

    def getParameterNode(self):
        return RadiogenomicGANParameterNode(super().getParameterNode())

    # --- environment -----------------------------------------------------------------------------------
    @staticmethod
    def installedVersion(distribution: str) -> str | None:
        """Installed version of a distribution without importing it (importing torch takes seconds)."""
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    @staticmethod
    def readRequirements(path: str) -> list:
        with open(path, encoding="utf-8") as handle:
            lines = (line.split("#", 1)[0].strip() for line in handle)
            return [line for line in lines if line]

    @staticmethod
    def missingRequirements(requirements: list) -> list:
        """The requirements (pip syntax) that are not installed, or installed at a version that does not fit."""
        try:
            from packaging.requirements import Requirement
        except ImportError:  # no `packaging`: presence only
            Requirement = None
        missing = []
        for text in requirements:
            if Requirement is not None:
                requirement = Requirement(text)
                name, specifier = requirement.name, requirement.specifier
            else:
                name, specifier = re.split(r"[<>=!~;\[ ]", text, maxsplit=1)[0], None
            version = RadiogenomicGANLogic.installedVersion(name)
            if version is None or (specifier is not None and not specifier.contains(version, prereleases=True)):
                missing.append(text)
        return missing

    @staticmethod
    def bundledWeightsPath() -> str | None:
        """The demo generator: next to the module's resources when installed, in Resources/ in the source tree."""
        here = pathlib.Path(__file__).resolve().parent
        for candidate in (here / "Resources" / BUNDLED_WEIGHTS_FILE, here.parent / "Resources" / BUNDLED_WEIGHTS_FILE):
            if candidate.is_file():
                return str(candidate)
        return None

    @staticmethod
    def modelKind(weightsPath: str | None = None) -> str | None:
        """'proposed', 'mcgan' or 'inpainting' from the weights' JSON (no torch); None if unreadable."""
        path = weightsPath or RadiogenomicGANLogic.bundledWeightsPath()
        if not path:
            return None
        record = pathlib.Path(path).with_suffix(".json")
        try:
            return str(json.loads(record.read_text(encoding="utf-8"))["kind"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def _scene(scene: Any) -> Any:
        if scene is not None:
            return scene
        application_scene = getattr(slicer, "mrmlScene", None)
        if application_scene is None:
            raise ValueError("no application scene here: pass scene= (a vtkMRMLScene)")
        return application_scene

    @staticmethod
    def _requireSupported() -> None:
        reason = unsupportedReason()
        if reason is not None:
            raise RuntimeError(reason)

    # --- cached resources ------------------------------------------------------------------------------
    def _resources(self) -> Any:
        if self._cache is None:
            from RadiogenomicGANLib.request import ResourceCache

            self._cache = ResourceCache()
        return self._cache

    def _weights(self, weightsPath: str | None) -> str:
        from RadiogenomicGANLib.request import RequestError

        path = weightsPath or self.bundledWeightsPath()
        if path is None:
            raise RequestError(
                f"the bundled demo model ({BUNDLED_WEIGHTS_FILE}) is not installed; choose a weights file")
        return str(path)

    def getInserter(self, weightsPath: str | None = None, device: str = "auto") -> Any:
        """A NoduleInserter for the weights (default: the bundled demo model) on the device, cached."""
        self._requireSupported()
        return self._resources().inserter(self._weights(weightsPath), device)

    def readGeneTable(self, path: str) -> Any:
        """The gene table at `path` (linear FPKM, genes × samples), cached until the file changes."""
        return self._resources().gene_table(path)

    def sampleIds(self, geneTablePath: str) -> list:
        return list(self.readGeneTable(geneTablePath).sample_ids)

    def releaseResources(self) -> None:
        """Drop the cached generator and gene table (and the GPU memory the generator held)."""
        if self._cache is not None:
            self._cache.release()

    # --- requests ----------------------------------------------------------------------------------------
    def buildRequest(
        self,
        inputVolumeNode: Any,
        geneTablePath: str | None,
        sampleId: str | None,
        pointListNode: Any = None,
        autoCount: int = 0,
        halfSlices: int | None = None,
        sliceList: Any = None,
        seed: int = 0,
        weightsPath: str | None = None,
        device: str = "auto",
        blendSampleId: str | None = None,
        blendWeight: float = 0.0,
        outputWeightMap: bool = False,
        allowOutsideLung: bool = False,
        imputeMissingGenes: bool = False,
    ) -> Any:
        """The InsertionRequest (RadiogenomicGANLib.request) for these nodes and settings.

        `sliceList`: a slice spec string ("±2", "auto", "40-44", "40-44; 50-52"), a list of indices for every
        centre, or one list per centre.
        """
        self._requireSupported()  # first: on Python 3.9 even the Lib's imports fail
        from RadiogenomicGANLib import mrml_adapter
        from RadiogenomicGANLib.request import InsertionRequest, RequestError, split_slice_specs

        if inputVolumeNode is None or not inputVolumeNode.IsA("vtkMRMLScalarVolumeNode") or inputVolumeNode.IsA(
                "vtkMRMLLabelMapVolumeNode"):
            raise RequestError("choose a CT scalar volume as input (a labelmap or no volume was given)")
        centres = None
        if pointListNode is not None and not autoCount:
            centres = mrml_adapter.control_points_ras(pointListNode, inputVolumeNode)
            if len(centres) == 0:
                raise RequestError(
                    f"the point list '{pointListNode.GetName()}' has no points: click nodule centres in the lung")
        elif pointListNode is None and autoCount <= 0:
            raise RequestError("give nodule centres (a point list) or an automatic count ≥ 1")
        if sliceList is None or (not isinstance(sliceList, str) and not len(sliceList)):
            slices: tuple = ()
        elif isinstance(sliceList, str):
            slices = tuple(split_slice_specs(sliceList))
        elif all(isinstance(value, (int, np.integer)) for value in sliceList):
            slices = ([int(v) for v in sliceList],)
        else:
            slices = tuple([int(v) for v in group] for group in sliceList)
        blend = blendSampleId or None
        return InsertionRequest(
            sample=sampleId or None, gene_table=geneTablePath or None, blend_with=blend,
            blend_weight=float(blendWeight) if blend else 0.0, impute_missing_genes=bool(imputeMissingGenes),
            weights=self._weights(weightsPath), device=str(device), centres_ras=centres,
            auto_count=int(autoCount) if centres is None else 0, slices=slices,
            half_slices=None if halfSlices is None else int(halfSlices),
            seed=int(seed), allow_outside_lung=bool(allowOutsideLung), weight_map=bool(outputWeightMap),
            input_name=inputVolumeNode.GetName())

    def createOutputs(
        self,
        scene: Any,
        inputVolumeNode: Any,
        result: Any,
        outputWeightMap: bool = False,
        outputVolumeNode: Any = None,
        outputSegmentationNode: Any = None,
        outputWeightMapNode: Any = None,
    ) -> tuple:
        """New (or refilled) volume, segmentation and weight-map nodes from an insertion result; all or none."""
        from RadiogenomicGANLib import mrml_adapter, segments
        from RadiogenomicGANLib import request as request_path

        created = []
        try:
            outputVolume = mrml_adapter.create_output_volume(
                scene, inputVolumeNode, result.volume_hu, output_node=outputVolumeNode,
                attributes={mrml_adapter.ATTRIBUTE_ROLE: "syntheticVolume",
                            segments.TAG_PROVENANCE: json.dumps(result.provenance, default=str)})
            created.append(outputVolume)
            segmentation = mrml_adapter.create_nodule_segmentation(
                scene, inputVolumeNode, result.label, result.provenance, num_nodules=len(result.centres_ras),
                output_node=outputSegmentationNode)
            created.append(segmentation)
            weightMap = None
            if outputWeightMap and result.weight_map is not None:
                weightMap = mrml_adapter.create_weight_map_volume(
                    scene, inputVolumeNode, result.weight_map, output_node=outputWeightMapNode)
                created.append(weightMap)
        except Exception:
            for node in created:  # no half-made outputs: remove what this call added
                if node not in (outputVolumeNode, outputSegmentationNode, outputWeightMapNode):
                    scene.RemoveNode(node)
            raise
        note = segments.empty_nodule_note(
            [n for n in range(1, len(result.centres_ras) + 1) if not (result.label == n).any()])
        if note:
            logging.warning(note)
        for note in request_path.training_sample_notes(result.provenance):
            logging.info(note)
        return outputVolume, segmentation, weightMap

    @staticmethod
    def emptyNoduleNote(segmentationNode: Any, referenceVolumeNode: Any) -> str:
        """The line naming the nodules of a synthetic segmentation that came out empty; '' when none did."""
        from RadiogenomicGANLib import mrml_adapter, segments

        return segments.empty_nodule_note(mrml_adapter.empty_nodule_numbers(segmentationNode, referenceVolumeNode))

    @staticmethod
    def _checkOutputs(inputVolumeNode: Any, *outputs: Any) -> None:
        from RadiogenomicGANLib import mrml_adapter

        for output in outputs:
            if output is not None and inputVolumeNode is not None and output.GetID() == inputVolumeNode.GetID():
                raise mrml_adapter.MRMLAdapterError("an output node must not be the input volume: it is never modified")

    # --- the main entry point (in this process) -----------------------------------------------------------
    def insertNodules(
        self,
        inputVolumeNode: Any,
        geneTablePath: str | None,
        sampleId: str | None,
        pointListNode: Any = None,
        autoCount: int = 0,
        halfSlices: int | None = None,
        sliceList: Any = None,
        seed: int = 0,
        weightsPath: str | None = None,
        device: str = "auto",
        blendSampleId: str | None = None,
        blendWeight: float = 0.0,
        outputWeightMap: bool = False,
        allowOutsideLung: bool = False,
        progress: Any = None,
        scene: Any = None,
        imputeMissingGenes: bool = False,
        outputVolumeNode: Any = None,
        outputSegmentationNode: Any = None,
        outputWeightMapNode: Any = None,
    ) -> tuple:
        """Insert synthetic nodules into a copy of `inputVolumeNode`; returns (volume, segmentation, weight map).

        Centres are the control points of `pointListNode` (one nodule each) or, with `autoCount` > 0, that
        many valid lung locations. Each nodule spans `sliceList` (see `buildRequest`) or ±`halfSlices` slices
        around its centre; with neither, the slices its size spans ("auto", the Widget's default). The gene
        profile is `sampleId` of the table, optionally blended with `blendSampleId` at `blendWeight`. Output nodes are
        created (or the given ones refilled) only once the insertion has succeeded; the input is never modified.
        `progress(fraction, message)` returning False cancels (InsertionCancelled). Runs in this process: the
        Widget's Apply uses `startInsertion` instead.
        """
        from RadiogenomicGANLib import mrml_adapter
        from RadiogenomicGANLib.request import run

        scene = self._scene(scene)
        self._checkOutputs(inputVolumeNode, outputVolumeNode, outputSegmentationNode, outputWeightMapNode)
        request = self.buildRequest(
            inputVolumeNode, geneTablePath, sampleId, pointListNode, autoCount, halfSlices, sliceList, seed,
            weightsPath, device, blendSampleId, blendWeight, outputWeightMap, allowOutsideLung, imputeMissingGenes)
        volume, geometry = mrml_adapter.volume_from_node(inputVolumeNode)
        result = run(request, volume, geometry, progress, self._resources())
        return self.createOutputs(scene, inputVolumeNode, result, outputWeightMap, outputVolumeNode,
                                  outputSegmentationNode, outputWeightMapNode)

    # --- the same request in a background process (the Widget's Apply) ------------------------------------
    def startInsertion(
        self, inputVolumeNode: Any, request: Any, python: str | None = None, threads: int | None = None
    ) -> BackgroundJob:
        """Write the input CT to a temporary file and start the insertion CLI on it; poll the job, then finish.

        `python`: the interpreter to run (in Slicer PythonSlicer; default this one). `threads`: torch CPU
        threads of the child (default: torch's choice).
        """
        from RadiogenomicGANLib import background, mrml_adapter

        folder = background.temporary_folder()
        try:
            files = background.insertion_files(folder.name, inputVolumeNode.GetName(), request.weight_map)
            volume, geometry = mrml_adapter.volume_from_node(inputVolumeNode)
            background.write_input_volume(files.ct, volume, geometry)
            run = background.BackgroundRun(background.cli_arguments(request, files, threads), python).start()
        except Exception:
            folder.cleanup()
            raise
        return BackgroundJob(run, folder, files, inputVolumeNode)

    def finishInsertion(
        self,
        job: BackgroundJob,
        scene: Any = None,
        outputVolumeNode: Any = None,
        outputSegmentationNode: Any = None,
        outputWeightMapNode: Any = None,
    ) -> tuple:
        """The nodes of a finished background insertion (as `insertNodules` makes them); its error otherwise."""
        from RadiogenomicGANLib import background

        try:
            job.run.wait()
            if job.run.cancelled:
                raise background.BackgroundCancelled("cancelled: nothing was added to the scene")
            if job.run.returncode != 0:
                raise background.BackgroundError(job.run.error_message())
            result = background.read_results(job.files)
        finally:
            job.folder.cleanup()
        # The child read a temporary copy of the input: record the node's name, as the in-process path does.
        result.provenance["input_volume"] = job.inputVolumeNode.GetName()
        self._checkOutputs(job.inputVolumeNode, outputVolumeNode, outputSegmentationNode, outputWeightMapNode)
        return self.createOutputs(self._scene(scene), job.inputVolumeNode, result, job.files.weight_map is not None,
                                  outputVolumeNode, outputSegmentationNode, outputWeightMapNode)

    # --- the parameter node (the Widget's state) ----------------------------------------------------------
    def requestFromParameterNode(self, parameterNode: Any) -> Any:
        """The InsertionRequest the module's parameters describe."""
        self._requireSupported()  # before the Lib's import, which fails on Python 3.9
        from RadiogenomicGANLib.request import FIT_TO_SIZE

        p = parameterNode
        if not p.useBundledWeights and not p.weightsPath:
            raise ValueError("choose a weights file, or check 'Bundled demo model'")
        byPoints = p.placement == Placement.POINTS
        if p.sliceMode == SliceMode.LIST and not p.sliceList.strip():
            raise ValueError("type the slices, e.g. '40-44' or '±3', or choose ± k slices")
        return self.buildRequest(
            p.inputVolume, p.geneTablePath or None, p.sampleId,
            pointListNode=p.pointList if byPoints else None, autoCount=0 if byPoints else p.autoCount,
            halfSlices=p.halfSlices, sliceList={SliceMode.LIST: p.sliceList, SliceMode.FIT_TO_SIZE: FIT_TO_SIZE}.get(
                p.sliceMode),
            seed=p.seed, weightsPath=None if p.useBundledWeights else p.weightsPath, device=p.device.value,
            blendSampleId=p.blendSampleId if p.blendEnabled else None,
            blendWeight=p.blendWeight if p.blendEnabled else 0.0, outputWeightMap=p.outputWeightMapEnabled,
            allowOutsideLung=p.allowOutsideLung, imputeMissingGenes=p.imputeMissingGenes)

    def _outputsOf(self, p: Any) -> dict:
        return dict(outputVolumeNode=p.outputVolume, outputSegmentationNode=p.outputSegmentation,
                    outputWeightMapNode=p.outputWeightMap if p.outputWeightMapEnabled else None)

    @staticmethod
    def _storeOutputs(p: Any, outputs: tuple) -> tuple:
        volume, segmentation, weightMap = outputs
        p.outputVolume = volume
        p.outputSegmentation = segmentation
        if weightMap is not None:
            p.outputWeightMap = weightMap
        return outputs

    def processParameterNode(self, parameterNode: Any, progress: Any = None, scene: Any = None) -> tuple:
        """Run the module's parameters in this process and store the output nodes back in them."""
        p = parameterNode
        request = self.requestFromParameterNode(p)
        outputs = self._outputsOf(p)
        self._checkOutputs(p.inputVolume, *outputs.values())
        from RadiogenomicGANLib import mrml_adapter
        from RadiogenomicGANLib.request import run

        volume, geometry = mrml_adapter.volume_from_node(p.inputVolume)
        result = run(request, volume, geometry, progress, self._resources())
        return self._storeOutputs(p, self.createOutputs(
            self._scene(scene), p.inputVolume, result, p.outputWeightMapEnabled, **outputs))

    def startParameterNode(self, parameterNode: Any, python: str | None = None) -> BackgroundJob:
        """`startInsertion` for the module's parameters (Apply)."""
        self._checkOutputs(parameterNode.inputVolume, *self._outputsOf(parameterNode).values())
        return self.startInsertion(parameterNode.inputVolume, self.requestFromParameterNode(parameterNode), python)

    def finishParameterNode(self, parameterNode: Any, job: BackgroundJob, scene: Any = None) -> tuple:
        """`finishInsertion` into the parameter node's output nodes, which are stored back."""
        return self._storeOutputs(parameterNode, self.finishInsertion(job, scene, **self._outputsOf(parameterNode)))

    @staticmethod
    def insertedCentres(segmentationNode: Any) -> np.ndarray:
        """The nodule centres (volume RAS) recorded in a synthetic segmentation's provenance; (0, 3) if none."""
        from RadiogenomicGANLib.segments import TAG_PROVENANCE

        try:
            provenance = json.loads(segmentationNode.GetAttribute(TAG_PROVENANCE) or "{}")
            return np.asarray(provenance.get("centres_ras", []), dtype=float).reshape(-1, 3)
        except (ValueError, TypeError):
            return np.zeros((0, 3))

    # --- radiogenomic map ----------------------------------------------------------------------------------
    def computeRadiogenomicMap(
        self,
        geneTablePath: str,
        weightsPath: str | None = None,
        device: str = "auto",
        imputeMissingGenes: bool = False,
        seed: int = 0,
    ) -> tuple:
        """(sample ids, gene codes φ(g) (S, code_dim), t-SNE coordinates (S, 2)) of the table's samples.

        In this process, with RadiogenomicGANLib.radiogenomic_map (the demo's and the evaluation's map too).
        """
        from RadiogenomicGANLib.radiogenomic_map import cohort_map

        result = cohort_map(self.getInserter(weightsPath, device), self.readGeneTable(geneTablePath),
                            imputeMissingGenes, seed)
        return result.sample_ids, result.codes, result.xy

    def _mapChart(self, scene: Any) -> Any:
        """The module's map chart of this scene, if one was made: every new map refills it."""
        from RadiogenomicGANLib import mrml_adapter

        charts = scene.GetNodesByClass("vtkMRMLPlotChartNode")
        for index in range(charts.GetNumberOfItems()):
            chart = charts.GetItemAsObject(index)
            if chart.GetAttribute(mrml_adapter.ATTRIBUTE_ROLE) == MAP_CHART_ROLE:
                return chart
        return None

    def plotRadiogenomicMap(self, ids: list, xy: np.ndarray, highlight: Any = (), scene: Any = None) -> Any:
        """The map as the module's one plot chart (cohort in grey, `highlight` samples in red)."""
        from RadiogenomicGANLib import mrml_adapter

        scene = self._scene(scene)
        chart = mrml_adapter.create_scatter_plot(scene, xy, ids, [h for h in highlight if h],
                                                 chart_node=self._mapChart(scene))
        chart.SetAttribute(mrml_adapter.ATTRIBUTE_ROLE, MAP_CHART_ROLE)
        return chart

    def showRadiogenomicMap(
        self,
        geneTablePath: str,
        highlight: Any = (),
        weightsPath: str | None = None,
        device: str = "auto",
        imputeMissingGenes: bool = False,
        seed: int = 0,
        scene: Any = None,
    ) -> Any:
        """Compute the map in this process and plot it; returns the chart node."""
        ids, _codes, xy = self.computeRadiogenomicMap(geneTablePath, weightsPath, device, imputeMissingGenes, seed)
        return self.plotRadiogenomicMap(ids, xy, highlight, scene)

    def startRadiogenomicMap(
        self,
        geneTablePath: str,
        weightsPath: str | None = None,
        device: str = "auto",
        imputeMissingGenes: bool = False,
        seed: int = 0,
        python: str | None = None,
    ) -> BackgroundJob:
        """The map in a background process (`python -m RadiogenomicGANLib.radiogenomic_map`)."""
        from RadiogenomicGANLib import background

        self._requireSupported()
        folder = background.temporary_folder()
        mapPath = os.path.join(folder.name, "map.csv")
        arguments = ["--genes", str(geneTablePath), "--out", mapPath, "--weights", self._weights(weightsPath),
                     "--device", str(device), "--seed", str(int(seed))]
        if imputeMissingGenes:
            arguments.append("--impute-missing-genes")
        run = background.BackgroundRun(arguments, python, module="radiogenomic_map").start()
        return BackgroundJob(run, folder, mapPath=mapPath)

    def finishRadiogenomicMap(self, job: BackgroundJob, highlight: Any = (), scene: Any = None) -> Any:
        """Plot a finished background map; its error otherwise."""
        from RadiogenomicGANLib import background
        from RadiogenomicGANLib.radiogenomic_map import read_map_csv

        try:
            job.run.wait()
            if job.run.cancelled:
                raise background.BackgroundCancelled("cancelled")
            if job.run.returncode != 0:
                raise background.BackgroundError(job.run.error_message())
            result = read_map_csv(job.mapPath)
        finally:
            job.folder.cleanup()
        return self.plotRadiogenomicMap(result.sample_ids, result.xy, highlight, scene)

    # --- phantom sample data -------------------------------------------------------------------------------
    def createPhantomVolume(
        self,
        scene: Any = None,
        patientIndex: int = 0,
        seed: int = PHANTOM_SEED,
        name: str | None = None,
        **options: Any,
    ) -> Any:
        """A phantom chest CT (RadiogenomicGANLib.phantom, built in memory) as a new scalar volume node."""
        from RadiogenomicGANLib import mrml_adapter
        from RadiogenomicGANLib.phantom import generate_patient

        self._requireSupported()
        scene = self._scene(scene)
        patient = generate_patient(patientIndex, seed, **options)
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or f"Phantom {patient.patient_id}")
        mrml_adapter.set_volume_node_array(node, patient.volume_hu, patient.geometry)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevel(1500.0, -600.0)  # lung window
        node.SetAttribute("RadiogenomicGAN.PhantomPatient", patient.patient_id)
        return node


#
# RadiogenomicGANTest
#


class RadiogenomicGANTest(ScriptedLoadableModuleTest):
    """In-Slicer self test: the phantom CT, the bundled model, the Logic in-process and through the background CLI.

    A factory-built Slicer (the extension index's test machines) has no PyTorch: there the test is skipped
    with the reason (nothing to install without a user to ask). Interactively (Reload and Test) it offers to
    install what is missing and skips only if the user declines.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = unsupportedReason()
        if reason is not None:  # Slicer 5.8: even the Lib's imports would fail
            self.skipTest(reason)
        self.setUp()
        self.test_SliceSyntax()
        self._requireDependencies()
        self.setUp()
        self.test_InsertIntoPhantom()
        self.setUp()
        self.test_BackgroundRunMatchesInProcess()
        self.setUp()
        self.test_RefusesCentreOutsideVolume()

    def _requireDependencies(self) -> None:
        missing = missingDependencies()
        if not missing:
            return
        if slicer.app.testingEnabled():
            self.skipTest(f"RadiogenomicGAN needs {', '.join(missing)}, which this Slicer does not have; "
                          "install them from the module panel to run this test")
        if not ensureDependencies() or missingDependencies():
            self.skipTest(f"not installed: {', '.join(missingDependencies())}")

    def _geneTable(self, logic: RadiogenomicGANLogic, count: int = 4) -> str:
        """A small GEO-style table in the bundled model's genes: sample i sits at z = ±(i+1)/2 from the mean."""
        metadata = logic.getInserter().metadata
        means, stds = np.asarray(metadata.genes.means), np.asarray(metadata.genes.stds)
        rng = np.random.default_rng(0)
        columns = [np.maximum(2.0 ** (means + stds * rng.normal(0.0, 1.0, len(means))) - 1.0, 0.0)
                   for _index in range(count)]
        path = os.path.join(slicer.app.temporaryPath, "RadiogenomicGANSelfTestGenes.txt")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write("\t" + "\t".join(f"S{i + 1}" for i in range(count)) + "\n")
            for g, gene in enumerate(metadata.gene_names):
                handle.write(gene + "\t" + "\t".join(f"{column[g]:.6g}" for column in columns) + "\n")
        return path

    def test_SliceSyntax(self):
        ensureLibImportable()
        from RadiogenomicGANLib.request import RequestError, parse_slice_spec, split_slice_specs

        self.assertEqual(parse_slice_spec("40, 41, 45-47"), [40, 41, 45, 46, 47])
        self.assertEqual(parse_slice_spec("±2"), 2)
        self.assertEqual(split_slice_specs("1-2; 5"), ["1-2", "5"])
        self.assertEqual(split_slice_specs(""), [])
        with self.assertRaises(RequestError):
            parse_slice_spec("4-x")

    def test_InsertIntoPhantom(self):
        self.delayDisplay("Loading the phantom CT")
        registerSampleData()
        inputVolume = loadPhantomSample()
        before = slicer.util.arrayFromVolume(inputVolume).copy()
        logic = RadiogenomicGANLogic()
        self.assertIsNotNone(logic.bundledWeightsPath(), "the bundled demo model is not installed")
        genes = self._geneTable(logic)

        self.delayDisplay("Inserting two nodules")
        volume, segmentation, weightMap = logic.insertNodules(
            inputVolume, genes, "S2", autoCount=2, halfSlices=1, seed=5, outputWeightMap=True,
            blendSampleId="S3", blendWeight=0.25)

        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(inputVolume), before), "input modified")
        after = slicer.util.arrayFromVolume(volume)
        self.assertEqual(after.shape, before.shape)
        self.assertTrue(np.any(after != before), "no voxel changed")
        inputMatrix, outputMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(inputMatrix)
        volume.GetIJKToRASMatrix(outputMatrix)
        self.assertTrue(np.allclose(slicer.util.arrayFromVTKMatrix(inputMatrix),
                                    slicer.util.arrayFromVTKMatrix(outputMatrix)))
        segments = segmentation.GetSegmentation()
        self.assertEqual(segments.GetNumberOfSegments(), 2)
        for index in range(2):
            segment = segments.GetNthSegment(index)
            self.assertEqual(segment.GetName(), f"Synthetic nodule {index + 1}")
            tag = vtk.mutable("")
            self.assertTrue(segment.GetTag("RadiogenomicGAN.Synthetic", tag) and str(tag) == "true")
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segments.GetNthSegmentID(index), volume)
            self.assertTrue(mask.any(), "empty nodule")
            self.assertLessEqual(int(np.count_nonzero(mask.any(axis=(1, 2)))), 3)  # ±1 slice
        weights = slicer.util.arrayFromVolume(weightMap)
        self.assertGreaterEqual(float(weights.min()), 0.0)
        self.assertLessEqual(float(weights.max()), 1.0)
        logic.releaseResources()
        self.delayDisplay("Test passed")

    def test_BackgroundRunMatchesInProcess(self):
        """Apply's path (PythonSlicer running the CLI) gives the voxels of the in-process Logic."""
        registerSampleData()
        inputVolume = loadPhantomSample()
        logic = RadiogenomicGANLogic()
        genes = self._geneTable(logic)
        arguments = dict(autoCount=1, halfSlices=1, seed=9, device="cpu")
        request = logic.buildRequest(inputVolume, genes, "S1", **arguments)
        job = logic.startInsertion(inputVolume, request, python=pythonSlicerExecutable())
        self.assertEqual(job.wait(600), 0, job.run.error_message())
        background, _segmentation, _weightMap = logic.finishInsertion(job)
        inProcess, _segmentation, _weightMap = logic.insertNodules(inputVolume, genes, "S1", **arguments)
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(background),
                                       slicer.util.arrayFromVolume(inProcess)))
        self.delayDisplay("Test passed")

    def test_RefusesCentreOutsideVolume(self):
        from RadiogenomicGANLib.insertion import InsertionError

        logic = RadiogenomicGANLogic()
        inputVolume = loadPhantomSample()
        genes = self._geneTable(logic)
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "outside")
        points.AddControlPoint(1.0e4, 0.0, 0.0)
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(InsertionError):
            logic.insertNodules(inputVolume, genes, "S1", pointListNode=points)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore, "a failed run added nodes")
        self.delayDisplay("Test passed")
