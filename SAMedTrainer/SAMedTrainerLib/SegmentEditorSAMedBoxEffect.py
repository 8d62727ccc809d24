"""Segment Editor effect "SAMed box": Markups ROI boxes -> the selected segment, propagated through slices.

Thin Qt glue. Boxes are Markups ROIs (what Slicer users draw boxes with: Crop Volume, MedSAMSlicer) and end
marks are Markups points (a click on a slice the organ is not on), each tagged with the segment it belongs to;
the model runs on SAMed's torch worker (``SAMedMRML.box_annotation.BoxAnnotationLogic``) while the GUI keeps
processing events; the segment is replaced through the Segment Editor's own
``modifySelectedSegmentByLabelmap`` after ``saveStateForUndo``, so masking settings and undo are the editor's.
Registered by SAMedTrainer at start-up (``SAMedTrainer.registerBoxEffect``).
"""
import os

import qt

import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

BOX_SEGMENT_ATTRIBUTE = "SAMed.BoxSegmentID"  # on each ROI: the segment ID the box was drawn for
END_SEGMENT_ATTRIBUTE = "SAMed.EndSegmentID"  # on each end-mark point list: the segment it ends


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
                "replaced by the result of all its boxes. Where it runs on past the organ's end, <b>Mark end</b> "
                "and click on the first slice without the organ: propagation stops there. Masking settings and "
                "Undo work as for other effects.</html>")

    def setupOptionsFrame(self):
        self.addBoxButton = qt.QPushButton("Add box")
        self.addBoxButton.setToolTip("Place a box (Markups ROI) for the selected segment in a slice view")
        self.markEndButton = qt.QPushButton("Mark end")
        self.markEndButton.setToolTip("Click on a slice the selected segment's organ is not on: propagation stops there")
        self.clearBoxesButton = qt.QPushButton("Clear boxes")
        self.clearBoxesButton.setToolTip("Remove the selected segment's boxes and end marks")
        row = qt.QHBoxLayout()
        row.addWidget(self.addBoxButton)
        row.addWidget(self.markEndButton)
        row.addWidget(self.clearBoxesButton)
        self.scriptedEffect.addOptionsWidget(row)
        self.propagateCheckBox = qt.QCheckBox("Propagate through slices")
        self.propagateCheckBox.checked = True
        self.scriptedEffect.addOptionsWidget(self.propagateCheckBox)
        self.openvinoCheckBox = qt.QCheckBox("Faster CPU (OpenVINO)")
        self.openvinoCheckBox.setToolTip("On the CPU, encode slices with OpenVINO: about 2.5x faster per new slice "
                                         "after a few seconds of conversion. Needs the optional 'openvino' package "
                                         "(Python console: slicer.util.pip_install('openvino')). Ignored on a GPU.")
        self.scriptedEffect.addOptionsWidget(self.openvinoCheckBox)
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
        self.markEndButton.connect("clicked()", self.onMarkEnd)
        self.clearBoxesButton.connect("clicked()", self.onClearBoxes)
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton.connect("clicked()", self.onCancel)

    def interactionNodeModified(self, interactionNode):
        pass  # placing a box switches to Place mode; the default would deactivate this effect

    # ------------------------------------------------------------------ boxes

    def _selectedSegmentID(self):
        return self.scriptedEffect.parameterSetNode().GetSelectedSegmentID()

    def _tagged(self, className, attribute):
        segmentID = self._selectedSegmentID()
        return [node for node in slicer.util.getNodesByClass(className)
                if segmentID and node.GetAttribute(attribute) == segmentID]

    def _boxes(self):
        return self._tagged("vtkMRMLMarkupsROINode", BOX_SEGMENT_ATTRIBUTE)

    def _endMarks(self):
        return self._tagged("vtkMRMLMarkupsFiducialNode", END_SEGMENT_ATTRIBUTE)

    def _place(self, className, name, attribute):
        segmentID = self._selectedSegmentID()
        if not segmentID:
            slicer.util.errorDisplay("Select a segment first.")
            return
        node = slicer.mrmlScene.AddNewNodeByClass(className, f"{name} {segmentID}")
        node.SetAttribute(attribute, segmentID)
        node.CreateDefaultDisplayNodes()
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName(className)
        selectionNode.SetActivePlaceNodeID(node.GetID())
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)

    def onAddBox(self):
        self._place("vtkMRMLMarkupsROINode", "SAMed box", BOX_SEGMENT_ATTRIBUTE)

    def onMarkEnd(self):
        self._place("vtkMRMLMarkupsFiducialNode", "SAMed end", END_SEGMENT_ATTRIBUTE)

    def onClearBoxes(self):
        for node in self._boxes() + self._endMarks():
            slicer.mrmlScene.RemoveNode(node)

    # ------------------------------------------------------------------ apply

    def onCancel(self):
        if self.logic is not None:
            self.logic.cancel()

    def onApply(self):
        from SAMedMRML.box_annotation import BoxAnnotationLogic, markup_points_to_ijk, modifier_labelmap, roi_to_ijk
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
            ends = [point for node in self._endMarks() for point in markup_points_to_ijk(volumeNode, node)]
            mask = self.logic.annotate(volumeNode, [roi_to_ijk(volumeNode, roi) for roi in boxes],
                                       propagate=self.propagateCheckBox.checked, progress=self._onProgress,
                                       ends_ijk=ends, openvino=self.openvinoCheckBox.checked)
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
