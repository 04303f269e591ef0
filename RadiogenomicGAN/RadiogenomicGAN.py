"""RadiogenomicGAN: insert gene-controlled synthetic lung nodules into a CT (Xu et al., MIDL 2019).

Slicer's ExtensionWizard layout: Module (metadata), a parameter-node dataclass (the state, saved with the
scene), Widget (wires the .ui to the Logic), Logic (nodes in, nodes out; usable from the Python console)
and Test (the in-Slicer self test). The heavy work lives in RadiogenomicGANLib: NoduleInserter does the
insertion, genes.profile_for_model aligns a gene profile with the model, and mrml_adapter converts nodes.

Headless use: Slicer's Qt layer (qt, ctk, ScriptedLoadableModule, parameterNodeWrapper) only exists inside
the application. Outside it (slicer-core, the test suite) the guarded import below substitutes plain base
classes and a dataclass for the parameter node, so the *same* Logic code runs on a bare vtkMRMLScene —
the Widget and the Test class are then inert. Torch and the other heavy packages are imported lazily, so
the module loads in a Slicer without PyTorch and can offer to install it.
"""

import dataclasses
import enum
import importlib.metadata
import json
import logging
import os
import pathlib
import re
import typing
import unittest
from typing import Annotated, Any

import numpy as np
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.util import VTKObservationMixin

try:  # inside the Slicer application (these modules need Qt)
    from slicer.i18n import tr as _
    from slicer.i18n import translate
    from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
    from slicer.ScriptedLoadableModule import *

    SLICER_APPLICATION = True
except ImportError:  # slicer-core without Qt: only the Logic is usable (see the module docstring)
    if hasattr(slicer, "app"):  # inside the application a failed import is a real error, never hidden
        raise
    SLICER_APPLICATION = False

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
            self.moduleName = type(self).__name__.removesuffix("Logic")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message: str, msec: int | None = None) -> None:
            logging.info(message)


#: PyTorch requirement passed to the PyTorch extension's installer (matches pyproject.toml).
TORCH_REQUIREMENT = ">=2.2"
#: The bundled demo generator (installed next to the module's resources; see the top-level CMakeLists.txt).
BUNDLED_WEIGHTS_FILE = "demo_model.safetensors"
#: The phantom CT registered as Sample Data: patient 0 of this cohort seed.
PHANTOM_SAMPLE_NAME = "RadiogenomicGANPhantom"
PHANTOM_SEED = 2019
PROJECT_URL = "https://github.com/radiogenomicgan/SlicerRadiogenomicGAN"
PAPER_URL = "https://arxiv.org/abs/1907.03728"


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
        self.parent.contributors = ["RadiogenomicGAN contributors"]
        self.parent.helpText = _("""
Insert synthetic lung nodules whose appearance is driven by a patient's gene-expression profile into a
chest CT, as in <a href="{paper}">Xu et al., "Correlation via synthesis", MIDL 2019</a>.
Pick a CT, a gene table (GEO text or CSV) and a sample (or a blend of two samples), click nodule centres
in the lung (or let the module choose them), choose the slices, and press Apply: the result is a
<b>new</b> volume, a <b>new</b> segmentation ("Synthetic nodule N", tagged as synthetic with the model,
sample and seed) and, on request, the generator's fusion weight map. "Show radiogenomic map" plots the
t-SNE of the learned gene codes of every sample in the table.
From the Python console: <code>slicer.util.getModuleLogic("RadiogenomicGAN").insertNodules(volumeNode,
"genes.txt", "R01-001", autoCount=2)</code>.
Needs Slicer 5.10 or later (Python 3.10+) and the PyTorch extension.
See the <a href="{project}">project documentation</a>.
""").format(paper=PAPER_URL, project=PROJECT_URL)
        self.parent.acknowledgementText = _("""
A re-implementation of Z. Xu, X. Wang, H.-C. Shin, D. Yang, H. Roth, F. Milletari, L. Zhang and D. Xu,
"Correlation via synthesis: end-to-end nodule image generation and radiogenomic map learning based on
generative adversarial network", Medical Imaging with Deep Learning (MIDL) 2019. Data formats follow the
NSCLC-Radiogenomics collection (TCIA) and GEO GSE103584. The bundled demo model was trained on a synthetic
phantom cohort and is for demonstration only: synthetic nodules are not real findings.
""")
        if SLICER_APPLICATION:
            slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data: a phantom chest CT, generated on demand and cached
#


def phantomCachePath() -> pathlib.Path:
    """Where the generated phantom CT is kept between sessions (Slicer's cache folder)."""
    return pathlib.Path(slicer.app.cachePath) / "RadiogenomicGAN" / f"{PHANTOM_SAMPLE_NAME}-{PHANTOM_SEED}.nrrd"


def loadPhantomSample() -> Any:
    """Load the phantom CT into the application scene, generating and caching it the first time."""
    path = phantomCachePath()
    if path.is_file():
        return slicer.util.loadVolume(str(path), {"name": PHANTOM_SAMPLE_NAME})
    with slicer.util.WaitCursor():
        node = RadiogenomicGANLogic().createPhantomVolume(slicer.mrmlScene, name=PHANTOM_SAMPLE_NAME)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not slicer.util.saveNode(node, str(path)):
        logging.warning(f"Could not cache the phantom CT at {path}; it will be generated again next time")
    return node


def registerSampleData():
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

    AROUND_CENTRE = "aroundCentre"
    LIST = "list"

    def label(self) -> str:
        return {"aroundCentre": _("± k slices around the centre"), "list": _("Explicit slice list")}[self.value]


#: Parameters the Widget syncs by hand (their combo boxes are filled from the gene table at run time, which
#: the parameter node's Choice annotation cannot express); every other field has a SlicerParameterName widget.
PARAMETERS_WITHOUT_WIDGET = ("sampleId", "blendSampleId")


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
    weightsPath: pathlib.Path
    device: Device = Device.AUTO
    geneTablePath: pathlib.Path
    sampleId: str = ""
    blendEnabled: bool = False
    blendSampleId: str = ""
    blendWeight: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    imputeMissingGenes: bool = False
    placement: Placement = Placement.POINTS
    pointList: vtkMRMLMarkupsFiducialNode
    autoCount: Annotated[int, WithinRange(1, 20)] = 1
    allowOutsideLung: bool = False
    sliceMode: SliceMode = SliceMode.AROUND_CENTRE
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
    """Wires the .ui to the Logic; see https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py"""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._fillingSampleLists = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RadiogenomicGAN.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = RadiogenomicGANLogic()

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
        self.ui.sampleComboBox.connect("currentTextChanged(QString)", self.onSampleChanged)
        self.ui.blendSampleComboBox.connect("currentTextChanged(QString)", self.onBlendSampleChanged)
        self.ui.pointListSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.ui.pointPlaceWidget, "setCurrentNode(vtkMRMLNode*)")

        self.initializeParameterNode()
        self.updateTorchStatus()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

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
        """Enable what applies to the current choices, and Apply when the inputs are complete."""
        p = self._parameterNode
        if not p:
            return
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
        if not _optionalPath(p.geneTablePath):
            missing.append(_("a gene table"))
        if not p.sampleId:
            missing.append(_("a sample"))
        if byPoints and not p.pointList:
            missing.append(_("a point list with nodule centres"))
        self.ui.applyButton.enabled = not missing
        self.ui.applyButton.toolTip = (
            _("Insert the synthetic nodules") if not missing else _("Select {what}").format(what=", ".join(missing))
        )
        self.ui.radiogenomicMapButton.enabled = bool(_optionalPath(p.geneTablePath))

    # --- gene table → sample lists (synced by hand, see PARAMETERS_WITHOUT_WIDGET) -----------------------
    def onGeneTableChanged(self, path: str) -> None:
        # Use the signal's path: this slot may run before the parameter node has taken the new value.
        self._fillSampleLists(path)

    def _fillSampleLists(self, path: str | None = None) -> None:
        p = self._parameterNode
        sampleIds: list[str] = []
        path = _optionalPath(path if path is not None else (p.geneTablePath if p else None))
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
        missing = RadiogenomicGANLogic.missingRequirements([f"torch{TORCH_REQUIREMENT}"])
        if version and not missing:
            self.ui.torchStatusLabel.text = _("PyTorch {version}").format(version=version)
        elif version:
            self.ui.torchStatusLabel.text = _("PyTorch {version} is too old (needs {req})").format(
                version=version, req=TORCH_REQUIREMENT)
        else:
            self.ui.torchStatusLabel.text = _("PyTorch is not installed")
        self.ui.installTorchButton.visible = bool(missing)

    def onInstallTorchButton(self) -> bool:
        """Install PyTorch through the PyTorch extension; explain what to do when the extension is missing."""
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
            askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT)
        self.updateTorchStatus()
        return torch is not None

    def _ensureDependencies(self) -> bool:
        """PyTorch (via the PyTorch extension), then the pure-Python packages of Resources/requirements.txt."""
        if RadiogenomicGANLogic.missingRequirements([f"torch{TORCH_REQUIREMENT}"]) and not self.onInstallTorchButton():
            return False
        requirements = RadiogenomicGANLogic.readRequirements(self.resourcePath("requirements.txt"))
        if not RadiogenomicGANLogic.missingRequirements(requirements):
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
        missing = RadiogenomicGANLogic.missingRequirements(requirements)
        if not slicer.util.confirmOkCancelDisplay(
            _("RadiogenomicGAN needs these Python packages: {packages}. Install them now?").format(
                packages=", ".join(missing))):
            return False
        slicer.util.pip_install(" ".join(f'"{r}"' for r in missing))
        return True

    # --- actions ------------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        """Insert nodules: one Logic call, with a cancellable progress dialog and Slicer's error display."""
        if not self._ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to insert synthetic nodules."), waitCursor=True):
            from RadiogenomicGANLib.insertion import InsertionCancelled

            dialog = slicer.util.createProgressDialog(
                windowTitle=_("RadiogenomicGAN"), labelText=_("Inserting synthetic nodules…"), maximum=100)

            def progress(fraction: float, message: str) -> bool:
                dialog.labelText = message
                dialog.value = round(100 * fraction)
                slicer.app.processEvents()
                return not dialog.wasCanceled

            try:
                volume, segmentation, _weightMap = self.logic.processParameterNode(self._parameterNode, progress)
            except InsertionCancelled:
                self.ui.statusLabel.text = _("Cancelled: nothing was added to the scene.")
                return
            finally:
                dialog.close()
            self._showResult(volume, segmentation)

    def _showResult(self, volume, segmentation) -> None:
        slicer.util.setSliceViewerLayers(background=volume, fit=True)
        if segmentation.GetDisplayNode():
            segmentation.GetDisplayNode().SetVisibility(True)
        centres = RadiogenomicGANLogic.insertedCentres(segmentation)
        if len(centres):
            slicer.modules.markups.logic().JumpSlicesToLocation(*centres[0], True)
        self.ui.statusLabel.text = _("Inserted {count} synthetic nodule(s) into '{name}'.").format(
            count=segmentation.GetSegmentation().GetNumberOfSegments(), name=volume.GetName())

    def onRadiogenomicMapButton(self) -> None:
        """t-SNE of the cohort's gene codes as a Slicer plot, the chosen sample(s) highlighted."""
        if not self._ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the radiogenomic map."), waitCursor=True):
            p = self._parameterNode
            highlight = [p.sampleId] + ([p.blendSampleId] if p.blendEnabled and p.blendSampleId else [])
            chart = self.logic.showRadiogenomicMap(
                _optionalPath(p.geneTablePath), highlight=highlight,
                weightsPath=None if p.useBundledWeights else _optionalPath(p.weightsPath),
                device=p.device.value, imputeMissingGenes=p.imputeMissingGenes, seed=p.seed)
            slicer.modules.plots.logic().ShowChartInLayout(chart)


def _optionalPath(path: Any) -> str | None:
    """A path parameter as a string, or None when empty (an empty ctkPathLineEdit reads as Path('.'))."""
    text = str(path) if path is not None else ""
    return None if text in ("", ".") else text


#
# RadiogenomicGANLogic
#


class RadiogenomicGANLogic(ScriptedLoadableModuleLogic):
    """Nodes in, nodes out: the module's computations, usable from the Python console and from tests.

    Every method that touches the scene takes `scene=` (default: the application scene), so the Logic also
    runs on a bare vtkMRMLScene (slicer-core). Loaded generators and gene tables are cached per file, and
    the NoduleInserter caches the lung mask per volume, so repeated insertions into one CT are quick.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._inserters: dict[tuple, Any] = {}
        self._geneTables: dict[tuple, Any] = {}

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
    def readRequirements(path: str) -> list[str]:
        with open(path, encoding="utf-8") as handle:
            lines = (line.split("#", 1)[0].strip() for line in handle)
            return [line for line in lines if line]

    @staticmethod
    def missingRequirements(requirements: list[str]) -> list[str]:
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
    def _scene(scene: Any) -> Any:
        if scene is not None:
            return scene
        application_scene = getattr(slicer, "mrmlScene", None)
        if application_scene is None:
            raise ValueError("no application scene here: pass scene= (a vtkMRMLScene)")
        return application_scene

    # --- cached resources ------------------------------------------------------------------------------
    def getInserter(self, weightsPath: str | None = None, device: str = "auto") -> Any:
        """A NoduleInserter for the weights (default: the bundled demo model) on the device, cached."""
        from RadiogenomicGANLib.insertion import InsertionError, NoduleInserter

        path = weightsPath or self.bundledWeightsPath()
        if path is None:
            raise InsertionError(
                f"the bundled demo model ({BUNDLED_WEIGHTS_FILE}) is not installed; choose a weights file")
        path = str(pathlib.Path(path).resolve())
        stamp = os.path.getmtime(path) if os.path.exists(path) else None
        key = (path, stamp, str(device))
        if key not in self._inserters:
            self._inserters = {k: v for k, v in self._inserters.items() if k[0] != path or k[1] == stamp}
            self._inserters[key] = NoduleInserter.from_weights(path, device=device)
        return self._inserters[key]

    def readGeneTable(self, path: str) -> Any:
        """The gene table at `path` (linear FPKM, genes × samples), cached until the file changes."""
        from RadiogenomicGANLib.genes import read_gene_table

        resolved = str(pathlib.Path(path).resolve())
        stamp = os.path.getmtime(resolved) if os.path.exists(resolved) else None
        key = (resolved, stamp)
        if key not in self._geneTables:
            self._geneTables = {key: read_gene_table(resolved)}
        return self._geneTables[key]

    def sampleIds(self, geneTablePath: str) -> list[str]:
        return list(self.readGeneTable(geneTablePath).sample_ids)

    # --- slices --------------------------------------------------------------------------------------------
    @staticmethod
    def parseSliceList(text: str) -> list[int] | list[list[int]] | None:
        """'40, 41, 45-48' → [40, 41, 45, 46, 47, 48]; 'a; b' → one list per centre; '' → None."""
        groups = [group.strip() for group in str(text).split(";")]
        if not any(groups):
            return None
        parsed: list[list[int]] = []
        for group in groups:
            values: list[int] = []
            for token in (t.strip() for t in group.replace(" ", ",").split(",")):
                if not token:
                    continue
                try:
                    if "-" in token[1:]:
                        start, stop = (int(v) for v in token.split("-", 1) if v.strip())
                        if stop < start:
                            raise ValueError
                        values.extend(range(start, stop + 1))
                    else:
                        values.append(int(token))
                except ValueError:
                    raise ValueError(f"cannot read slice '{token}' in '{text}': use e.g. '40, 41, 45-48'") from None
            if not values:
                raise ValueError(f"empty slice list in '{text}'")
            parsed.append(values)
        return parsed[0] if len(parsed) == 1 else parsed

    # --- the main entry point --------------------------------------------------------------------------
    def insertNodules(
        self,
        inputVolumeNode: Any,
        geneTablePath: str,
        sampleId: str,
        pointListNode: Any = None,
        autoCount: int = 0,
        halfSlices: int = 2,
        sliceList: list[int] | list[list[int]] | None = None,
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
    ) -> tuple[Any, Any, Any]:
        """Insert synthetic nodules into a copy of `inputVolumeNode`; returns (volume, segmentation, weight map).

        Centres are the control points of `pointListNode` (one nodule each) or, with `autoCount` > 0, that
        many valid lung locations. Each nodule spans ±`halfSlices` slices around its centre, or the slice
        indices of `sliceList` (one list for every centre, or one list per centre). The gene profile is
        `sampleId` of the table, optionally blended with `blendSampleId` at `blendWeight`. Output nodes are
        created (or the given ones refilled) only once the insertion has succeeded; the input is never
        modified. `progress(fraction, message)` returning False cancels (InsertionCancelled).
        """
        from RadiogenomicGANLib import mrml_adapter, segments
        from RadiogenomicGANLib.genes import profile_for_model
        from RadiogenomicGANLib.insertion import InsertionError

        scene = self._scene(scene)
        if inputVolumeNode is None or not inputVolumeNode.IsA("vtkMRMLScalarVolumeNode") or inputVolumeNode.IsA(
                "vtkMRMLLabelMapVolumeNode"):
            raise InsertionError("choose a CT scalar volume as input (a labelmap or no volume was given)")
        if not geneTablePath:
            raise InsertionError("choose a gene table (GEO text or CSV)")
        if not sampleId:
            raise InsertionError("choose a sample of the gene table")

        for output in (outputVolumeNode, outputSegmentationNode, outputWeightMapNode):
            if output is not None and output.GetID() == inputVolumeNode.GetID():
                raise mrml_adapter.MRMLAdapterError("an output node must not be the input volume: it is never modified")

        volume, geometry = mrml_adapter.volume_from_node(inputVolumeNode)
        centres = None
        if pointListNode is not None and not autoCount:
            centres = mrml_adapter.control_points_ras(pointListNode, inputVolumeNode)
            if len(centres) == 0:
                raise InsertionError(
                    f"the point list '{pointListNode.GetName()}' has no points: click nodule centres in the lung")
        elif pointListNode is None and autoCount <= 0:
            raise InsertionError("give nodule centres (a point list) or an automatic count ≥ 1")
        slices = None
        if sliceList is not None and len(sliceList):
            if all(isinstance(value, (int, np.integer)) for value in sliceList):
                count = len(centres) if centres is not None else 1
                slices = [list(sliceList)] * count
            else:
                slices = [list(group) for group in sliceList]

        inserter = self.getInserter(weightsPath, device)
        metadata = inserter.metadata
        table = self.readGeneTable(geneTablePath)
        blend = blendSampleId if blendSampleId else None
        profile = profile_for_model(
            table, sampleId, metadata.genes,
            impute=imputeMissingGenes, blend_with=blend, blend_weight=blendWeight if blend else 0.0)
        geneSample = sampleId if blend is None else f"{sampleId}×{1 - blendWeight:.2f} + {blend}×{blendWeight:.2f}"

        arguments = dict(
            centres_ras=centres, auto_count=0 if centres is not None else int(autoCount), slices=slices,
            half_slices=int(halfSlices), seed=int(seed), allow_outside_lung=bool(allowOutsideLung),
            return_weight_map=bool(outputWeightMap), progress=progress, gene_sample=geneSample)
        try:
            result = inserter.insert(volume, geometry, profile, **arguments)
        except RuntimeError as error:  # CUDA out of memory with device "auto": fall back to the CPU once
            if str(device) != "auto" or inserter.device.type != "cuda" or "out of memory" not in str(error).lower():
                raise
            logging.warning("RadiogenomicGAN: the GPU ran out of memory; running on the CPU instead")
            inserter = self.getInserter(weightsPath, "cpu")
            result = inserter.insert(volume, geometry, profile, **arguments)

        provenance = dict(result.provenance, gene_table=os.path.basename(str(geneTablePath)),
                          impute_missing_genes=bool(imputeMissingGenes), input_volume=inputVolumeNode.GetName())
        created = []
        try:
            outputVolume = mrml_adapter.create_output_volume(
                scene, inputVolumeNode, result.volume_hu, output_node=outputVolumeNode,
                attributes={mrml_adapter.ATTRIBUTE_ROLE: "syntheticVolume",
                            segments.TAG_PROVENANCE: json.dumps(provenance, default=str)})
            created.append(outputVolume)
            segmentation = mrml_adapter.create_nodule_segmentation(
                scene, inputVolumeNode, result.label, provenance, num_nodules=len(result.centres_ras),
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
        return outputVolume, segmentation, weightMap

    def processParameterNode(self, parameterNode: Any, progress: Any = None, scene: Any = None) -> tuple:
        """Run `insertNodules` with the module's parameters and store the output nodes back in them."""
        p = parameterNode
        weightsPath = None
        if not p.useBundledWeights:
            weightsPath = _optionalPath(p.weightsPath)
            if weightsPath is None:
                raise ValueError("choose a weights file, or check 'Bundled demo model'")
        byPoints = p.placement == Placement.POINTS
        sliceList = self.parseSliceList(p.sliceList) if p.sliceMode == SliceMode.LIST else None
        if p.sliceMode == SliceMode.LIST and sliceList is None:
            raise ValueError("type the slice indices, e.g. '40-44', or choose ± k slices")
        outputs = self.insertNodules(
            p.inputVolume, _optionalPath(p.geneTablePath), p.sampleId,
            pointListNode=p.pointList if byPoints else None,
            autoCount=0 if byPoints else p.autoCount,
            halfSlices=p.halfSlices, sliceList=sliceList, seed=p.seed, weightsPath=weightsPath,
            device=p.device.value, blendSampleId=p.blendSampleId if p.blendEnabled else None,
            blendWeight=p.blendWeight if p.blendEnabled else 0.0, outputWeightMap=p.outputWeightMapEnabled,
            allowOutsideLung=p.allowOutsideLung, progress=progress, scene=scene,
            imputeMissingGenes=p.imputeMissingGenes, outputVolumeNode=p.outputVolume,
            outputSegmentationNode=p.outputSegmentation,
            outputWeightMapNode=p.outputWeightMap if p.outputWeightMapEnabled else None)
        volume, segmentation, weightMap = outputs
        p.outputVolume = volume
        p.outputSegmentation = segmentation
        if weightMap is not None:
            p.outputWeightMap = weightMap
        return outputs

    @staticmethod
    def insertedCentres(segmentationNode: Any) -> np.ndarray:
        """The nodule centres (RAS) recorded in a synthetic segmentation's provenance; (0, 3) if none."""
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
    ) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(sample ids, gene codes φ(g) (S, code_dim), t-SNE coordinates (S, 2)) of the table's samples.

        Samples whose profile cannot be formed (missing genes without imputation) are left out; at least
        three are needed for a map.
        """
        import torch

        from RadiogenomicGANLib.genes import GeneTableError, profile_for_model

        inserter = self.getInserter(weightsPath, device)
        generator = inserter.generator
        if not hasattr(generator, "encode_genes"):
            raise ValueError(f"the {inserter.kind} model has no gene code; the map needs the proposed or MC-GAN model")
        metadata = inserter.metadata
        table = self.readGeneTable(geneTablePath)
        ids, profiles, skipped = [], [], []
        for sampleId in table.sample_ids:
            try:
                profiles.append(profile_for_model(table, sampleId, metadata.genes, impute=imputeMissingGenes))
                ids.append(sampleId)
            except GeneTableError:
                skipped.append(sampleId)
        if skipped:
            logging.warning(f"RadiogenomicGAN map: {len(skipped)} samples lack model genes and are left out")
        if len(ids) < 3:
            raise ValueError(f"the radiogenomic map needs at least 3 usable samples, the table has {len(ids)}"
                             + (" (try 'Impute missing genes')" if skipped else ""))
        with torch.no_grad():
            codes = generator.encode_genes(torch.from_numpy(np.stack(profiles)).to(inserter.device))
        codes = codes.float().cpu().numpy()
        return ids, codes, self.embed2d(codes, seed)

    @staticmethod
    def embed2d(codes: np.ndarray, seed: int = 0) -> np.ndarray:
        """t-SNE to 2D with a perplexity that suits small cohorts (it must stay below the sample count).

        Cohorts are small (NSCLC-Radiogenomics has 130 RNA-seq samples): the exact method is quick there,
        while Barnes-Hut spends seconds on set-up for a handful of points.
        """
        from sklearn.manifold import TSNE

        count = len(codes)
        perplexity = float(min(30.0, max(1.0, (count - 1) / 3.0)))
        method = "exact" if count <= 1000 else "barnes_hut"
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", method=method, random_state=int(seed))
        return tsne.fit_transform(np.asarray(codes, dtype=np.float64))

    def showRadiogenomicMap(
        self,
        geneTablePath: str,
        highlight: list[str] | tuple[str, ...] = (),
        weightsPath: str | None = None,
        device: str = "auto",
        imputeMissingGenes: bool = False,
        seed: int = 0,
        scene: Any = None,
    ) -> Any:
        """The map as a plot chart node (cohort in grey, `highlight` samples in red); returns the chart."""
        from RadiogenomicGANLib import mrml_adapter

        ids, _codes, xy = self.computeRadiogenomicMap(geneTablePath, weightsPath, device, imputeMissingGenes, seed)
        return mrml_adapter.create_scatter_plot(self._scene(scene), xy, ids, [h for h in highlight if h])

    # --- phantom sample data -------------------------------------------------------------------------------
    def createPhantomVolume(
        self,
        scene: Any = None,
        patientIndex: int = 0,
        seed: int = PHANTOM_SEED,
        name: str | None = None,
        **options: Any,
    ) -> Any:
        """A phantom chest CT (RadiogenomicGANLib.phantom) as a new scalar volume node; options go to the phantom."""
        from RadiogenomicGANLib import mrml_adapter
        from RadiogenomicGANLib.phantom import generate_patient

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
    """In-Slicer self test: the phantom CT, the bundled model, the whole Logic path into the application scene."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SliceListParsing()
        self.setUp()
        self.test_InsertIntoPhantom()
        self.setUp()
        self.test_RefusesCentreOutsideVolume()

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

    def test_SliceListParsing(self):
        self.assertEqual(RadiogenomicGANLogic.parseSliceList("40, 41, 45-47"), [40, 41, 45, 46, 47])
        self.assertEqual(RadiogenomicGANLogic.parseSliceList("1-2; 5"), [[1, 2], [5]])
        self.assertIsNone(RadiogenomicGANLogic.parseSliceList(""))
        with self.assertRaises(ValueError):
            RadiogenomicGANLogic.parseSliceList("4-x")

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
