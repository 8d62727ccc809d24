"""Segment Editor effect "SAMed box": Markups ROI boxes -> the selected segment, propagated through slices.

Thin Qt glue. Boxes are Markups ROIs (what Slicer users draw boxes with: Crop Volume, MedSAMSlicer), tagged with
the segment they belong to; the model runs on SAMed's torch worker (``SAMedMRML.box_annotation.BoxAnnotationLogic``)
while the GUI keeps processing events; the segment is replaced through the Segment Editor's own
``modifySelectedSegmentByLabelmap`` after ``saveStateForUndo``, so masking settings and undo are the editor's.
Registered by SAMedTrainer at start-up (``SAMedTrainer.registerBoxEffect``).
"""
import os

import qt

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

BOX_SEGMENT_ATTRIBUTE = "SAMed.BoxSegmentID"  # on each ROI: the segment ID the box was drawn for


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Box prompts for pretrained LiteMedSAM, propagated to neighbouring slices."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "SAMed box"
        scriptedEffect.perSegment = True  # the masking settings apply, as for Paint
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "..", "Resources", "Icons", "SAMedTrainer.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return ("<html>Draw a box around an organ on an axial slice (<b>Add box</b>, then click-drag in a slice view), "
                "click <b>Apply</b>: SAM (pretrained LiteMedSAM) segments it and follows it to the neighbouring "
                "slices. Add a box on a slice where the result is wrong and Apply again: the selected segment is "
                "replaced by the result of all its boxes. Masking settings and Undo work as for other effects.</html>")

    def setupOptionsFrame(self):
        self.addBoxButton = qt.QPushButton("Add box")
        self.addBoxButton.setToolTip("Place a box (Markups ROI) for the selected segment in a slice view")
        self.clearBoxesButton = qt.QPushButton("Clear boxes")
        self.clearBoxesButton.setToolTip("Remove the selected segment's boxes")
        row = qt.QHBoxLayout()
        row.addWidget(self.addBoxButton)
        row.addWidget(self.clearBoxesButton)
        self.scriptedEffect.addOptionsWidget(row)
        self.propagateCheckBox = qt.QCheckBox("Propagate through slices")
        self.propagateCheckBox.checked = True
        self.scriptedEffect.addOptionsWidget(self.propagateCheckBox)
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.objectName = self.__class__.__name__ + "Apply"
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        row = qt.QHBoxLayout()
        row.addWidget(self.applyButton)
        row.addWidget(self.cancelButton)
        self.scriptedEffect.addOptionsWidget(row)
        self.progressBar = qt.QProgressBar()
        self.progressBar.visible = False
        self.scriptedEffect.addOptionsWidget(self.progressBar)
        self.addBoxButton.connect("clicked()", self.onAddBox)
        self.clearBoxesButton.connect("clicked()", self.onClearBoxes)
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)

    def interactionNodeModified(self, interactionNode):
        pass  # placing a box switches to Place mode; the default would deactivate this effect

    # ------------------------------------------------------------------ boxes

    def _selectedSegmentID(self):
        return self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()

    def _boxes(self):
        segmentID = self._selectedSegmentID()
        return [node for node in slicer.util.getNodesByClass("vtkMRMLMarkupsROINode")
                if segmentID and node.GetAttribute(BOX_SEGMENT_ATTRIBUTE) == segmentID]

    def onAddBox(self):
        segmentID = self._selectedSegmentID()
        if not segmentID:
            slicer.util.errorDisplay("Select a segment first.")
            return
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"SAMed box {segmentID}")
        roi.SetAttribute(BOX_SEGMENT_ATTRIBUTE, segmentID)
        roi.CreateDefaultDisplayNodes()
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsROINode")
        selectionNode.SetActivePlaceNodeID(roi.GetID())
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)

    def onClearBoxes(self):
        for roi in self._boxes():
            slicer.mrmlScene.RemoveNode(roi)

    # ------------------------------------------------------------------ apply

    def onCancel(self):
        if self.logic is not None:
            self.logic.cancel()

    def onApply(self):
        from SAMedMRML.box_annotation import BoxAnnotationLogic, modifier_labelmap, roi_to_ijk
        from SAMedMRML.segmenter_logic import SegmentationCancelled

        parameterSetNode = self.scriptedEffect.parameterSetNode()
        volumeNode = parameterSetNode.GetSourceVolumeNode()
        segmentationNode = parameterSetNode.GetSegmentationNode()
        boxes = self._boxes()  # a box still being placed is empty: the core refuses it with a clear message
        if volumeNode is None or not boxes:
            slicer.util.errorDisplay("Add a box around the organ for the selected segment first.")
            return
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return
        if self.logic is None:
            self.logic = BoxAnnotationLogic(processEvents=slicer.app.processEvents)
        self.applyButton.enabled, self.cancelButton.enabled, self.progressBar.visible = False, True, True
        try:
            mask = self.logic.annotate(volumeNode, [roi_to_ijk(volumeNode, roi) for roi in boxes],
                                       propagate=self.propagateCheckBox.checked, progress=self._onProgress)
            modifier = modifier_labelmap(mask, volumeNode, segmentationNode)
            self.scriptedEffect.saveStateForUndo()
            self.scriptedEffect.modifySelectedSegmentByLabelmap(modifier,
                                                                slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet)
        except SegmentationCancelled:
            pass  # nothing was changed
        except Exception as exc:  # one clear message, the segment unchanged
            slicer.util.errorDisplay(f"SAMed box failed: {exc}")
        finally:
            self.applyButton.enabled, self.cancelButton.enabled, self.progressBar.visible = True, False, False

    def _onProgress(self, fraction, message):
        self.progressBar.value = int(100 * fraction)
        self.progressBar.format = f"{message} (%p%)"
