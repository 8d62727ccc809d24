import os
from typing import Annotated

import ctk
import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin

# SAMedSegmenter's folder (SAMedLib, SAMedMRML) is on sys.path as well: it is a module dependency.
from SAMedLib import model_registry
from SAMedSegmenter import APPLICATION_QUIT_SIGNALS
from SAMedTrainerLib.trainer_logic import (BASE_MODELS, METHODS, TrainerLogic, TrainingClass, TrainingCurves,
                                           TrainingOptions, TrainingPair, TrainingStopped)

DEVICES = ("auto", "cuda", "cpu", "mps")
PAIR_VOLUME_COLUMN, PAIR_SEGMENTATION_COLUMN = 0, 1
CLASS_USE_COLUMN, CLASS_NAME_COLUMN, CLASS_COLOR_COLUMN, CLASS_CODE_COLUMN, CLASS_SEGMENT_COLUMN = range(5)


#
# SAMedTrainer
#


class SAMedTrainer(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SAMed Trainer")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["SAMedSegmenter"]
        self.parent.contributors = ["SAMed for 3D Slicer developers"]
        self.parent.helpText = _("""
Fine-tune a Segment Anything model on volumes you annotated in Slicer, then segment new scans
with SAMed Segmenter. Add (volume, segmentation) pairs — segments with the same name in
different pairs are the same class — choose the classes, the base model and the method, and
click <b>Train</b>. Training runs in a separate process: Slicer stays responsive and
<b>Stop</b> keeps the last good checkpoint. The finished model is listed in SAMed Segmenter
immediately ("Segment now").
<p>Methods: SAMed (LoRA adapters in the SAM image encoder + SAM's mask decoder as a
multi-class head; best with a GPU) or a frozen encoder with a light head (SAMed decoder,
AutoSAM ViT, CNN or linear; fast on a CPU).</p>
<p>Limits: a model learns only what the annotated volumes show; a few annotated volumes
of the same kind of scan give a usable model for that kind of scan only.</p>
""")
        self.parent.acknowledgementText = _("""
Builds on SAMed (K. Zhang and D. Liu, arXiv:2304.13785, 2023), AutoSAM (X. Hu, X. Xu and Y. Shi,
arXiv:2306.13731, 2023), Segment Anything (A. Kirillov et al., ICCV 2023) and LiteMedSAM/MedSAM
(J. Ma et al., Nature Communications 2024).
""")
        # The training volume is annotated here: the "SAMed box" Segment Editor effect comes with this module.
        slicer.app.connect("startupCompleted()", registerBoxEffect)


def registerBoxEffect() -> None:
    """Register the "SAMed box" Segment Editor effect (as Slicer's scripted effects are registered)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    source = os.path.join(os.path.dirname(__file__), "SAMedTrainerLib", "SegmentEditorSAMedBoxEffect.py")
    instance.setPythonSource(source.replace("\\", "/"))
    instance.self().register()


#
# SAMedTrainerParameterNode
#


@parameterNodeWrapper
class SAMedTrainerParameterNode:
    """
    The parameters needed by the module (saved with the scene).

    pairVolumes, pairSegmentations - the training pairs (same length, row by row).
    validationVolume, validationSegmentation - optional validation pair.
    """

    pairVolumes: list[vtkMRMLScalarVolumeNode]
    pairSegmentations: list[vtkMRMLSegmentationNode]
    validationVolume: vtkMRMLScalarVolumeNode
    validationSegmentation: vtkMRMLSegmentationNode
    baseModel: Annotated[str, Choice(list(BASE_MODELS))] = "litemedsam"
    method: Annotated[str, Choice(list(METHODS))] = next(iter(METHODS))  # automatic
    loraRank: Annotated[int, WithinRange(1, 64)] = 4
    iterations: Annotated[int, WithinRange(1, 100000)] = 200  # samed train's CPU default
    learningRate: Annotated[float, WithinRange(0.0, 1.0)] = 0.001
    batchSize: Annotated[int, WithinRange(0, 256)] = 0
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    modelName: str = "SAMed model"


#
# SAMedTrainerWidget
#


class SAMedTrainerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingPairs = False
        self._curves = None
        self._lastModel = None
        self._derivedClasses = {}  # segment-name key -> TrainingClass (SNOMED codes are not editable)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SAMedTrainer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SAMedTrainerLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        # Quitting while training runs (Train's own loop pumps the events): no trainer may outlive Slicer.
        for signal in APPLICATION_QUIT_SIGNALS:
            slicer.app.connect(signal, self.onApplicationQuit)

        self.ui.addPairButton.connect("clicked(bool)", self.onAddPair)
        self.ui.removePairButton.connect("clicked(bool)", self.onRemovePair)
        self.ui.fillPairsFromSceneButton.connect("clicked(bool)", self.fillPairsFromScene)
        self.ui.refreshClassesButton.connect("clicked(bool)", self.refreshClasses)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.segmentNowButton.connect("clicked(bool)", self.onSegmentNow)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.baseModelSelector.connect("currentIndexChanged(int)", self._updateOptionWidgets)
        self.ui.methodSelector.connect("currentIndexChanged(int)", self._updateOptionWidgets)
        self.ui.outputFolderButton.directory = str(model_registry.models_dir())

        self.ui.segmentNowButton.enabled = False
        self.ui.progressBar.setValue(0)
        self._updateDependencyStatus()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.onApplicationQuit()
        for signal in APPLICATION_QUIT_SIGNALS:
            slicer.app.disconnect(signal, self.onApplicationQuit)
        self.removeObservers()

    def onApplicationQuit(self) -> None:
        """Kill a running trainer's process tree now: a clean stop can take a minute, Slicer is going away."""
        if self.logic is not None and self.logic.isRunning:
            self.logic.abort()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._curves = None  # the scene removes its nodes; a running training's next point draws new ones

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._rebuildPairsTable()
            if not self._pairs():
                self.fillPairsFromScene()  # also refreshes the classes
            else:
                self.refreshClasses()
        self._updateOptionWidgets()
        self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.logic is not None and self.logic.isRunning:
            self.ui.trainButton.enabled = True  # it is the Stop button now
            return
        ready = bool(self._pairs())
        self.ui.trainButton.enabled = ready
        self.ui.trainButton.toolTip = _("Fine-tune on the training pairs") if ready else \
            _("Add at least one (volume, segmentation) pair")

    def _updateOptionWidgets(self, *args) -> None:
        isSam = self.ui.baseModelSelector.currentText.startswith("sam_vit")
        self.ui.baseCheckpointLabel.visible = isSam
        self.ui.baseCheckpointPathLineEdit.visible = isSam
        mode, _head = METHODS.get(self.ui.methodSelector.currentText, (None, "samed"))
        self.ui.loraRankSpinBox.enabled = mode in (None, "lora")

    # ------------------------------------------------------------------ training pairs

    def _pairs(self) -> list:
        if not self._parameterNode:
            return []
        return [TrainingPair(v, s) for v, s in zip(self._parameterNode.pairVolumes,
                                                   self._parameterNode.pairSegmentations) if v and s]

    def _newNodeSelector(self, nodeType: str, node):
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = [nodeType]
        selector.showChildNodeTypes = False
        selector.noneEnabled = True
        selector.addEnabled = False
        selector.removeEnabled = False
        selector.setMRMLScene(slicer.mrmlScene)
        selector.setCurrentNode(node)
        selector.connect("currentNodeChanged(vtkMRMLNode*)", self._storePairs)
        return selector

    def _addPairRow(self, volume, segmentation, store: bool) -> None:
        table = self.ui.pairsTable
        row = table.rowCount
        table.insertRow(row)
        table.setCellWidget(row, PAIR_VOLUME_COLUMN, self._newNodeSelector("vtkMRMLScalarVolumeNode", volume))
        table.setCellWidget(row, PAIR_SEGMENTATION_COLUMN,
                            self._newNodeSelector("vtkMRMLSegmentationNode", segmentation))
        if store:
            self._storePairs()

    def _rebuildPairsTable(self) -> None:
        self._updatingPairs = True
        try:
            self.ui.pairsTable.setRowCount(0)
            for volume, segmentation in zip(self._parameterNode.pairVolumes, self._parameterNode.pairSegmentations):
                self._addPairRow(volume, segmentation, store=False)
        finally:
            self._updatingPairs = False

    def onAddPair(self) -> None:
        self._addPairRow(None, None, store=True)

    def _storePairs(self, *args) -> None:
        """Table -> parameter node (complete rows only: a half-filled row is not saved with the scene)."""
        if self._updatingPairs or not self._parameterNode:
            return
        table = self.ui.pairsTable
        volumes, segmentations = [], []
        for row in range(table.rowCount):
            volume = table.cellWidget(row, PAIR_VOLUME_COLUMN).currentNode()
            segmentation = table.cellWidget(row, PAIR_SEGMENTATION_COLUMN).currentNode()
            if volume is not None and segmentation is not None:
                volumes.append(volume)
                segmentations.append(segmentation)
        self._parameterNode.pairVolumes = volumes
        self._parameterNode.pairSegmentations = segmentations
        self.refreshClasses()

    def onRemovePair(self) -> None:
        row = self.ui.pairsTable.currentRow()
        if row < 0:
            row = self.ui.pairsTable.rowCount - 1
        if row >= 0:
            self.ui.pairsTable.removeRow(row)
            self._storePairs()

    def fillPairsFromScene(self) -> None:
        """One row per segmentation whose reference geometry is a scalar volume of the scene."""
        self._updatingPairs = True
        try:
            self.ui.pairsTable.setRowCount(0)
            for segmentation in slicer.util.getNodesByClass("vtkMRMLSegmentationNode"):
                volume = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
                if volume is not None and volume.IsA("vtkMRMLScalarVolumeNode") \
                        and not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                    self._addPairRow(volume, segmentation, store=False)
        finally:
            self._updatingPairs = False
        self._storePairs()

    # ------------------------------------------------------------------ classes

    def refreshClasses(self) -> None:
        """Derive classes from the segment names of all pairs, keeping the user's edits by segment name."""
        previous = {c.key: c for c in self._classesFromTable()}
        classes = self.logic.deriveClasses(self._pairs())
        self._derivedClasses = {c.key: c for c in classes}
        table = self.ui.classesTable
        table.setRowCount(0)
        for c in classes:
            kept = previous.get(c.key)
            if kept is not None:
                c.enabled, c.name, c.color = kept.enabled, kept.name, kept.color
            row = table.rowCount
            table.insertRow(row)
            use = qt.QTableWidgetItem()
            use.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            use.setCheckState(qt.Qt.Checked if c.enabled else qt.Qt.Unchecked)
            table.setItem(row, CLASS_USE_COLUMN, use)
            table.setItem(row, CLASS_NAME_COLUMN, qt.QTableWidgetItem(c.name))
            colorButton = ctk.ctkColorPickerButton()
            colorButton.displayColorName = False
            colorButton.color = qt.QColor(*c.color)
            table.setCellWidget(row, CLASS_COLOR_COLUMN, colorButton)
            code = f"{c.codes.code} ({c.codes.meaning})" if c.codes else ""
            if c.codes and c.codes.laterality:
                code += f", {c.codes.laterality[1]}"
            for column, text in ((CLASS_CODE_COLUMN, code), (CLASS_SEGMENT_COLUMN, c.segment_name)):
                item = qt.QTableWidgetItem(text)
                item.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
                table.setItem(row, column, item)

    def _classesFromTable(self) -> list:
        table = self.ui.classesTable
        classes = []
        for row in range(table.rowCount):
            segmentName = table.item(row, CLASS_SEGMENT_COLUMN).text()
            derived = self._derivedClasses.get(TrainingClass(segmentName, segmentName, (0, 0, 0)).key)
            color = table.cellWidget(row, CLASS_COLOR_COLUMN).color
            classes.append(TrainingClass(
                segment_name=segmentName,
                name=table.item(row, CLASS_NAME_COLUMN).text().strip(),
                color=(color.red(), color.green(), color.blue()),
                codes=getattr(derived, "codes", None),
                enabled=table.item(row, CLASS_USE_COLUMN).checkState() == qt.Qt.Checked))
        return classes

    # ------------------------------------------------------------------ training

    def _options(self) -> TrainingOptions:
        p = self._parameterNode
        mode, head = METHODS[p.method]
        validation = None
        if p.validationVolume and p.validationSegmentation:
            validation = TrainingPair(p.validationVolume, p.validationSegmentation)
        from SAMedTrainerLib.trainer_logic import unique_model_path

        output = unique_model_path(self.ui.outputFolderButton.directory, p.modelName or "SAMed model")
        baseCheckpoint = self.ui.baseCheckpointPathLineEdit.currentPath if p.baseModel.startswith("sam_vit") else ""
        return TrainingOptions(model_name=p.modelName, output_path=output, base=p.baseModel,
                               base_checkpoint=baseCheckpoint or None,
                               mode=mode, head=head, lora_rank=p.loraRank, iterations=p.iterations,
                               learning_rate=p.learningRate or None, batch_size=p.batchSize or None,
                               device=p.device, validation=validation)

    def _log(self, message: str) -> None:
        self.ui.logTextEdit.appendPlainText(message)

    def onProgress(self, event: dict) -> None:
        kind = event.get("event")
        if kind in ("iteration", "validation"):
            if self._curves is None:  # created on the first point, so bad input leaves no empty plot behind
                self._showCurves()
            self._curves.update(event)
        if kind == "iteration":
            total = max(1, int(event.get("iterations") or 1))
            self.ui.progressBar.setValue(int(100 * int(event["iteration"]) / total))
            eta = event.get("eta_s")
            eta_text = _(", about {minutes:.0f} min left").format(minutes=eta / 60) if eta else ""
            self.ui.statusLabel.text = _("Iteration {i}/{n}, loss {loss:.4f}{eta}").format(
                i=event["iteration"], n=total, loss=event.get("loss") or 0.0, eta=eta_text)
        elif kind == "encoding":
            self.ui.statusLabel.text = event.get("message") or _("Encoding training views…")
        elif kind == "validation":
            dice = ", ".join(f"{k} {v:.3f}" for k, v in (event.get("dice") or {}).items())
            self._log(_("Validation at iteration {i}: mean Dice {d:.3f} ({per})").format(
                i=event["iteration"], d=event["mean_dice"], per=dice))
        elif kind == "checkpoint":
            self._log(_("Checkpoint written: {path}").format(path=event["path"]))
        elif kind == "error":
            self._log(_("Error: {message}").format(message=event["message"]))
        elif kind == "warning":
            self._log(_("Warning: {message}").format(message=event["message"]))
        elif kind == "log":
            self._log(event.get("message", ""))
        elif kind in ("done", "stopped", "registered"):
            self._log(f"{kind}: {event.get('path', '')}")

    def _showCurves(self) -> None:
        if self._curves is not None:
            self._curves.remove()
        self._curves = TrainingCurves(slicer.mrmlScene)
        slicer.modules.plots.logic().ShowChartInLayout(self._curves.chartNode)

    def _clearCurves(self) -> None:
        """Remove the previous run's curve nodes; the new run's appear with its first point."""
        if self._curves is not None:
            self._curves.remove()
            self._curves = None

    def onTrainButton(self) -> None:
        """Train, or stop the running training (the button doubles as Stop)."""
        if self.logic.isRunning:
            self.logic.stop()
            self.ui.statusLabel.text = _("Stopping: the trainer saves its last good checkpoint…")
            self.ui.trainButton.enabled = False
            return
        self.ui.logTextEdit.clear()
        self.ui.segmentNowButton.enabled = False
        self.ui.progressBar.setValue(0)
        self.ui.trainButton.text = _("Stop")
        try:
            with slicer.util.tryWithErrorDisplay(_("Training failed."), waitCursor=False):
                if not self.ui.classesTable.rowCount:
                    self.refreshClasses()
                options = self._options()
                self._clearCurves()
                try:
                    path = self.logic.train(self._pairs(), self._classesFromTable(), options, progress=self.onProgress)
                except TrainingStopped as stopped:
                    self._onStopped(stopped)
                    return
                self._lastModel = path
                self.ui.progressBar.setValue(100)
                self.ui.statusLabel.text = _("Model saved and listed in SAMed Segmenter: {path}").format(path=path)
                self.ui.segmentNowButton.enabled = True
        finally:
            self.ui.trainButton.text = _("Train")
            self._checkCanApply()

    def _onStopped(self, stopped: TrainingStopped) -> None:
        self.ui.statusLabel.text = str(stopped)
        if stopped.checkpoint is None:
            return
        if slicer.util.confirmYesNoDisplay(
                _("Training was stopped. Keep the last good checkpoint and list it in SAMed Segmenter?\n\n{path}")
                .format(path=stopped.checkpoint), windowTitle=_("SAMed Trainer")):
            self._lastModel = model_registry.register_model(stopped.checkpoint)
            self.ui.segmentNowButton.enabled = True

    def onSegmentNow(self) -> None:
        """Open SAMed Segmenter with the new model selected."""
        if not self._lastModel:
            return
        slicer.util.selectModule("SAMedSegmenter")
        segmenterWidget = slicer.modules.samedsegmenter.widgetRepresentation().self()
        segmenterWidget.selectModel(str(self._lastModel))

    # ------------------------------------------------------------------ dependencies

    def _updateDependencyStatus(self) -> None:
        from SAMedMRML.dependencies import dependency_report

        try:
            self.ui.dependenciesLabel.text = dependency_report()
        except Exception as exc:  # a broken metadata entry must not break the module GUI
            self.ui.dependenciesLabel.text = str(exc)

    def onInstallDependencies(self) -> None:
        from SAMedMRML.dependencies import ensure_dependencies

        with slicer.util.tryWithErrorDisplay(_("Installing the Python dependencies failed."), waitCursor=True):
            if ensure_dependencies(requester="SAMed Trainer"):
                slicer.util.infoDisplay(_("SAMed's Python dependencies are installed. If Slicer asks for a "
                                          "restart, restart before training."))
        self._updateDependencyStatus()


#
# SAMedTrainerLogic
#


class SAMedTrainerLogic(ScriptedLoadableModuleLogic, TrainerLogic):
    """Slicer wrapper of ``SAMedTrainerLib.trainer_logic.TrainerLogic`` (see there for the API).

    Usable from the Python console::

        from SAMedTrainerLib.trainer_logic import TrainingOptions
        logic = SAMedTrainer.SAMedTrainerLogic()
        path = logic.train([(getNode("CT"), getNode("Segmentation"))], None, TrainingOptions(iterations=200))
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        TrainerLogic.__init__(self, processEvents=slicer.app.processEvents)

    def getParameterNode(self):
        return SAMedTrainerParameterNode(super().getParameterNode())


#
# SAMedTrainerTest
#


class SAMedTrainerTest(ScriptedLoadableModuleTest):
    """
    Self-test inside Slicer. Input checks and label-map export always run; a real (very short)
    training runs only when SAMED_TRAINER_TEST_TRAIN=1, since it needs PyTorch and minutes of CPU.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_BadInputIsRefused()
        self.setUp()
        self.test_ShortTraining()

    def _pair(self):
        import numpy as np
        import SimpleITK as sitk

        from SAMedLib.classes import SegmentClass
        from SAMedMRML.segmentations import labelmap_to_segmentation
        from SAMedMRML.volumes import volume_to_sitk

        rng = np.random.default_rng(0)
        array = rng.normal(40, 20, (8, 64, 64)).astype(np.int16)
        array[:, 16:40, 10:40] += 60  # a brighter "organ"
        volume = slicer.util.addVolumeFromArray(array, name="SAMed trainer test CT")
        labels = np.zeros(array.shape, np.uint8)
        labels[:, 16:40, 10:40] = 1
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(volume_to_sitk(volume))
        segmentation = labelmap_to_segmentation(image, [SegmentClass.named(1, "liver")], volume)
        return volume, segmentation

    def test_BadInputIsRefused(self):
        from SAMedTrainerLib.trainer_logic import TrainingInputError

        self.delayDisplay("Bad input is refused before anything starts")
        volume, segmentation = self._pair()
        logic = SAMedTrainerLogic()
        with self.assertRaises(TrainingInputError):
            logic.train([], None, TrainingOptions(iterations=1))
        empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
        with self.assertRaises(TrainingInputError):
            logic.train([(volume, empty)], None, TrainingOptions(iterations=1))
        classes = logic.deriveClasses([(volume, segmentation)])
        self.assertEqual([c.name for c in classes], ["liver"])
        self.assertEqual(classes[0].codes.code, "10200004")
        self.delayDisplay("Test passed")

    def test_ShortTraining(self):
        if os.environ.get("SAMED_TRAINER_TEST_TRAIN") != "1":
            self.delayDisplay("Skipping the real training (set SAMED_TRAINER_TEST_TRAIN=1 to run it)")
            return
        import tempfile

        volume, segmentation = self._pair()
        logic = SAMedTrainerLogic()
        output = os.path.join(tempfile.mkdtemp(), "selftest.safetensors")
        path = logic.train([(volume, segmentation)], None,
                           TrainingOptions(output_path=output, mode="frozen", head="linear", iterations=2,
                                           device="cpu", register=False))
        self.assertTrue(os.path.isfile(path))
        card = model_registry.read_card(path)
        self.assertEqual([c["name"] for c in card["classes"]], ["liver"])
        self.delayDisplay("Test passed")
