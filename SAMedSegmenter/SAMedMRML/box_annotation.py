"""Box annotation in the scene: a box drawn in RAS -> voxel corners on the volume; a mask -> the selected segment.

The core (``SAMedLib.annotation``) works on the volume's own voxel grid. This module converts a box in world
RAS (a Markups ROI's bounds, or any two corners) into continuous voxel indices of the volume, through the
volume's linear parent transform, and turns the core's mask (a label map on the volume grid) into a modifier
labelmap in the segmentation's coordinates. The segment itself is changed by the Segment Editor's own C++
logic (``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap``), which applies the editor's masking settings
(editable area, editable intensity range, overwrite of other segments); ``saveStateForUndo`` first makes it
one undoable step. The Segment Editor effect reaches the same logic through ``scriptedEffect``.
"""
from __future__ import annotations

import itertools

import numpy as np
import SimpleITK as sitk
import vtk

import slicer

from .segmentations import _mask_image, _vtk_matrix
from .segmenter_logic import SegmentationCancelled, SegmenterLogic, _missing_dependency
from .volumes import check_parent_transform, check_same_grid, ijk_to_ras, volume_to_sitk

__all__ = ["ras_bounds_to_ijk", "roi_to_ijk", "markup_points_to_ijk", "modifier_labelmap", "apply_mask_to_segment",
           "BoxAnnotationLogic"]


def _world_to_local(node) -> np.ndarray:
    """4x4 world RAS -> the node's local RAS (inverse of its linear parent transforms)."""
    check_parent_transform(node)
    m = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(None, node.GetParentTransformNode(), m)
    return slicer.util.arrayFromVTKMatrix(m)


def ras_bounds_to_ijk(volume_node, ras_bounds) -> tuple[np.ndarray, np.ndarray]:
    """World RAS bounds (xmin, xmax, ymin, ymax, zmin, zmax) -> (lowest, highest) continuous voxel index (i, j, k).

    All eight corners are mapped, so a box on an oblique or flipped volume gives the voxel box that contains it.
    """
    bounds = np.asarray(ras_bounds, float).reshape(3, 2)
    ras_to_ijk = np.linalg.inv(ijk_to_ras(volume_node)) @ _world_to_local(volume_node)
    corners = np.array([[*corner, 1.0] for corner in itertools.product(*bounds)])
    ijk = (ras_to_ijk @ corners.T).T[:, :3]
    return ijk.min(axis=0), ijk.max(axis=0)


def roi_to_ijk(volume_node, roi_node) -> tuple[np.ndarray, np.ndarray]:
    """A Markups ROI's world bounds -> (lowest, highest) continuous voxel index of ``volume_node``."""
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)  # world coordinates, the ROI's own transforms applied
    return ras_bounds_to_ijk(volume_node, bounds)


def markup_points_to_ijk(volume_node, markups_node) -> list[np.ndarray]:
    """Every control point of a Markups node (world RAS) -> continuous voxel index (i, j, k) of ``volume_node``:
    end marks, each a point on a slice the object is not on."""
    points = []
    for n in range(markups_node.GetNumberOfControlPoints()):
        ras = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(n, ras)
        points.append(ras_bounds_to_ijk(volume_node, [ras[0], ras[0], ras[1], ras[1], ras[2], ras[2]])[0])
    return points


def modifier_labelmap(mask: sitk.Image, volume_node, segmentation_node) -> slicer.vtkOrientedImageData:
    """A label map on ``volume_node``'s grid -> a binary modifier labelmap in ``segmentation_node``'s coordinates.

    Raises ValueError if the mask is not on the volume's grid or is empty (nothing to apply).
    """
    check_same_grid(mask, volume_node, "annotation mask")
    check_parent_transform(segmentation_node)
    array = sitk.GetArrayViewFromImage(mask) > 0
    # volume IJK -> volume local RAS -> world -> segmentation local RAS
    between = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
        volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode(), between)
    image = _mask_image(array, _vtk_matrix(slicer.util.arrayFromVTKMatrix(between) @ ijk_to_ras(volume_node)))
    if image is None:
        raise ValueError("the box gave an empty mask: nothing to add (draw the box tightly around the organ)")
    return image


def apply_mask_to_segment(editor_logic, segment_id: str, mask: sitk.Image, volume_node) -> None:
    """Replace segment ``segment_id`` with ``mask`` through the Segment Editor's logic, as one undoable step.

    ``editor_logic``: a ``vtkSlicerSegmentEditorLogic`` with its segment editor node set (segmentation, source
    volume, masking settings). The editor's mask mode, intensity range and overwrite mode are respected.
    """
    segmentation_node = editor_logic.GetSegmentationNode()
    if segmentation_node is None or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise ValueError(f"segment '{segment_id}' is not in the edited segmentation")
    modifier = modifier_labelmap(mask, volume_node, segmentation_node)
    editor_logic.SaveStateForUndo()
    editor_logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier,
                                         slicer.vtkSlicerSegmentEditorLogic.ModificationModeSet,
                                         True,  # per segment: the masking settings apply
                                         False)  # no bypass of masking


class BoxAnnotationLogic(SegmenterLogic):
    """Boxes on a volume node -> the mask, computed on SAMed's torch worker thread (see ``SegmenterLogic``).

    The ``SAMedLib.annotation.Annotator`` (model + per-slice embedding cache) lives on the worker and is kept
    while the volume's voxels, geometry, model and device stay the same, so a new box costs only the slices it
    touches for the first time. Cancel leaves everything as it was.
    """

    def __init__(self, processEvents=None, pollInterval: float = 0.03, worker=None):
        super().__init__(processEvents, pollInterval, worker)
        self._annotator = None  # (key, Annotator); touched on the worker only

    def annotate(self, volume_node, boxes_ijk, propagate: bool = True, model=None, device: str = "auto",
                 progress=None, ends_ijk=(), openvino: bool = False) -> sitk.Image:
        """``boxes_ijk``: (low, high) continuous voxel corners (``roi_to_ijk``) -> label map (1 inside) on the volume grid.

        ``ends_ijk``: end marks, continuous voxel indices (``markup_points_to_ijk``) on slices without the object.

        ``model``: None for pretrained LiteMedSAM, or a fine-tuned checkpoint whose encoder to use.
        ``openvino``: on the CPU, encode slices with OpenVINO (optional package; ignored on a GPU).
        """
        if self._running:
            raise RuntimeError("SAMed is already running; wait for it or cancel it first")
        image = volume_to_sitk(volume_node)  # main thread: the only MRML read
        key = (volume_node.GetID(), volume_node.GetImageData().GetMTime(), tuple(ijk_to_ras(volume_node).ravel()),
               str(model or ""), device, openvino)
        self._running = True
        self._cancel.clear()
        self._progress_state = None
        try:
            future = self.worker.submit(self._annotate_job, key, image, list(boxes_ijk), propagate, model, device,
                                        list(ends_ijk), openvino)
            return self._wait(future, progress)
        finally:
            self._running = False

    def _annotate_job(self, key, image, boxes_ijk, propagate, model, device, ends_ijk, openvino=False):
        try:
            from SAMedLib import annotation, inference
        except ImportError as exc:
            raise _missing_dependency(exc) from exc
        if self._annotator is None or self._annotator[0] != key:
            self._annotator = None  # free the previous volume's cache first
            self._annotator = (key, annotation.Annotator.from_model(image, model, device=inference.resolve_device(device),
                                                                    openvino=openvino))
        annotator = self._annotator[1]
        boxes = [annotation.box_from_ijk(annotator.restore, low, high) for low, high in boxes_ijk]
        ends = [annotation.slice_from_ijk(annotator.restore, point) for point in ends_ijk]
        try:
            mask = annotator.annotate(boxes, propagate=propagate, progress=self._set_progress,
                                      should_cancel=self._cancel.is_set, ends=ends)
        except inference.Cancelled as exc:
            raise SegmentationCancelled(str(exc)) from exc
        return annotator.to_image(mask)
