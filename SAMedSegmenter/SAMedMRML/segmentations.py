"""Label maps <-> segmentation nodes.

``labelmap_to_segmentation``: the core's label map (a ``SimpleITK.Image`` on the input
volume's grid) becomes one segment per class, with the class name as segment ID and name,
its colour, a terminology entry with SNOMED CT codes, the input volume as reference
geometry, and the node placed in the input volume's subject-hierarchy study. It is
all-or-nothing: the segments are built in a standalone ``vtkSegmentation`` first and the
scene is touched only once everything is ready (and restored if committing fails).

``segmentation_to_labelmap``: segments -> label map on a volume's voxel grid, for training.
Every segment is resampled (nearest neighbour, in physical space, through any linear
transform between the two nodes) from its *own* internal labelmap geometry onto the
volume grid, so segments drawn on a differently shaped segmentation still land on the
right voxels. **Overlap rule:** a voxel covered by several segments gets the label of the
segment listed first in ``segment_values`` (priority order = class-list order), whatever
the segment order inside the node.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util.numpy_support import numpy_to_vtk, vtk_to_numpy

import slicer
from SAMedLib.classes import SegmentClass
from SAMedLib.segfile import terminology_entry

from .volumes import LPS_TO_RAS, check_parent_transform, check_same_grid, ijk_to_ras, volume_array

__all__ = [
    "BINARY_LABELMAP",
    "CLASS_VALUE_TAG",
    "terminology_entry",
    "parse_terminology",
    "SegmentCodes",
    "build_segmentation",
    "labelmap_to_segmentation",
    "segmentation_to_labelmap",
    "segment_ids_and_names",
    "class_statistics",
]

BINARY_LABELMAP = "Binary labelmap"
CLASS_VALUE_TAG = "SAMed.ClassValue"
# Slicer gives new segments this placeholder type; it says nothing about the class.
_PLACEHOLDER_TYPE_CODES = {"85756007"}  # SCT "Tissue"


# --------------------------------------------------------------------------- terminology
# Writing: SAMedLib.segfile.terminology_entry (the same string the core writes into .seg.nrrd files).


@dataclass(frozen=True)
class SegmentCodes:
    """Type code and optional laterality modifier read from a terminology entry."""

    code: str
    meaning: str
    laterality: tuple[str, str] | None = None


def _parse_coded(part: str) -> tuple[str, str, str] | None:
    fields = part.split("^")
    if len(fields) < 3 or not fields[1]:
        return None
    return fields[0], fields[1], "^".join(fields[2:])


def parse_terminology(entry: str | None) -> SegmentCodes | None:
    """SNOMED CT type (and laterality modifier) of a terminology entry; None if absent/placeholder."""
    if not entry:
        return None
    parts = entry.split("~")
    if len(parts) < 4:
        return None
    coded_type = _parse_coded(parts[2])
    if coded_type is None or coded_type[0] not in ("SCT", "SRT") or coded_type[1] in _PLACEHOLDER_TYPE_CODES:
        return None
    modifier = _parse_coded(parts[3])
    laterality = (modifier[1], modifier[2]) if modifier is not None else None
    return SegmentCodes(coded_type[1], coded_type[2], laterality)


# --------------------------------------------------------------------------- label map -> segments


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def _mask_image(mask: np.ndarray, ijk_to_ras_matrix: vtk.vtkMatrix4x4) -> slicer.vtkOrientedImageData | None:
    """Oriented image holding ``mask`` (k, j, i) cropped to its bounding box, or None if empty."""
    nonzero = [np.flatnonzero(mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))]  # k, j, i
    if any(len(idx) == 0 for idx in nonzero):
        return None
    (k0, k1), (j0, j1), (i0, i1) = [(int(idx[0]), int(idx[-1])) for idx in nonzero]
    block = np.ascontiguousarray(mask[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1], dtype=np.uint8)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(i0, i1, j0, j1, k0, k1)
    image.GetPointData().SetScalars(numpy_to_vtk(block.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    image.SetImageToWorldMatrix(ijk_to_ras_matrix)
    return image


def build_segmentation(labels: np.ndarray, classes: Sequence[SegmentClass],
                       ijk_to_ras_matrix: np.ndarray) -> slicer.vtkSegmentation:
    """A standalone ``vtkSegmentation`` (in no scene) with one segment per class.

    ``labels`` is a ``(k, j, i)`` array of class values on the grid ``ijk_to_ras_matrix``.
    Segment ID = segment name = class name; colour, terminology and the class value (tag
    ``SAMed.ClassValue``) are set; classes absent from ``labels`` get an empty segment.
    All segments share one labelmap layer (they cannot overlap).
    """
    segmentation = slicer.vtkSegmentation()
    segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
    matrix = _vtk_matrix(ijk_to_ras_matrix)
    for segment_class in classes:
        color = tuple(c / 255.0 for c in segment_class.color)
        image = _mask_image(labels == segment_class.value, matrix)
        if image is None:
            segment_id = segmentation.AddEmptySegment(segment_class.name, segment_class.name, color)
            if segment_id != segment_class.name:
                raise RuntimeError(f"could not create segment '{segment_class.name}' "
                                   "(are the segmentation converter rules registered?)")
            segment = segmentation.GetSegment(segment_id)
        else:
            segment = slicer.vtkSegment()
            segment.SetName(segment_class.name)
            segment.SetColor(*color)
            segment.AddRepresentation(BINARY_LABELMAP, image)
            if not segmentation.AddSegment(segment, segment_class.name):
                raise RuntimeError(f"could not add segment '{segment_class.name}'")
        segment.SetTag(CLASS_VALUE_TAG, str(segment_class.value))
        entry = terminology_entry(segment_class)
        if entry:
            segment.SetTerminology(entry)
    segmentation.CollapseBinaryLabelmaps(False)
    _mark_names_and_colors_explicit(segmentation)
    return segmentation


def _segment_items(segmentation):
    for i in range(segmentation.GetNumberOfSegments()):
        yield segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i)


def _mark_names_and_colors_explicit(segmentation) -> None:
    """Names and colours come from the model card: keep Slicer from regenerating them."""
    for _, segment in _segment_items(segmentation):
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)


def _place_in_study(scene, node, volume_node) -> None:
    """Put ``node`` next to ``volume_node`` in the subject hierarchy (same parent item, e.g. its study)."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        return
    volume_item = sh.GetItemByDataNode(volume_node)
    if not volume_item:
        return
    parent = sh.GetItemParent(volume_item)
    item = sh.GetItemByDataNode(node)
    if not item:
        sh.CreateItem(parent, node)
    elif sh.GetItemParent(item) != parent:
        sh.SetItemParent(item, parent)


def labelmap_to_segmentation(labels: sitk.Image, classes: Sequence[SegmentClass], volume_node,
                             segmentation_node=None, name: str | None = None):
    """Write a label map into a segmentation node, one segment per class (see module docstring).

    ``labels`` must lie exactly on ``volume_node``'s grid (ValueError otherwise). With
    ``segmentation_node`` None a new node named ``name`` (default "<volume> SAMed") is added
    to the volume's scene; otherwise all segments of the given node are replaced. The node
    gets the volume as reference geometry, the volume's parent transform (linear only, see
    ``volumes``) and the volume's subject-hierarchy parent. Returns the node.
    """
    scene = volume_node.GetScene()
    if scene is None:
        raise ValueError(f"volume '{volume_node.GetName()}' is not in a scene")
    if segmentation_node is not None and not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise ValueError(f"output node '{segmentation_node.GetName()}' is a {segmentation_node.GetClassName()}, "
                         "not a segmentation")
    if segmentation_node is not None and segmentation_node.GetScene() is not scene:
        raise ValueError(f"output segmentation '{segmentation_node.GetName()}' is not in the volume's scene")
    check_parent_transform(volume_node)
    volume_array(volume_node)  # validates the volume
    check_same_grid(labels, volume_node)
    if not classes:
        raise ValueError("no classes: the model card lists no segment classes")

    # 1. Everything that can fail, away from the scene.
    segmentation = build_segmentation(sitk.GetArrayViewFromImage(labels), classes, ijk_to_ras(volume_node))

    # 2. Commit; undo on failure so the scene is exactly as before.
    created = segmentation_node is None
    added_ids: list[str] = []
    node = segmentation_node
    backup = None
    if not created:
        backup = slicer.vtkSegmentation()
        backup.DeepCopy(node.GetSegmentation())
        backup_flags = {sid: (segment.GetNameAutoGenerated(), segment.GetColorAutoGenerated())
                        for sid, segment in _segment_items(node.GetSegmentation())}
        backup_geometry_ref = node.GetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole())
        backup_transform = node.GetTransformNodeID()
    try:
        if created:
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                           scene.GenerateUniqueName(name or f"{volume_node.GetName()} SAMed"))
            added_ids.append(node.GetID())
        was_modifying = node.StartModify()
        try:
            # Transform first: the reference geometry is computed relative to the node's parent transform.
            node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
            node.GetSegmentation().DeepCopy(segmentation)
            _mark_names_and_colors_explicit(node.GetSegmentation())  # DeepCopy resets these flags
            node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
            node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID())
        finally:
            node.EndModify(was_modifying)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
            if node.GetDisplayNode() is not None:
                added_ids.append(node.GetDisplayNode().GetID())
        _place_in_study(scene, node, volume_node)
    except Exception:
        if backup is not None:
            node.GetSegmentation().DeepCopy(backup)
            for sid, segment in _segment_items(node.GetSegmentation()):
                if sid in backup_flags:
                    segment.SetNameAutoGenerated(backup_flags[sid][0])
                    segment.SetColorAutoGenerated(backup_flags[sid][1])
            node.SetNodeReferenceID(node.GetReferenceImageGeometryReferenceRole(), backup_geometry_ref)
            node.SetAndObserveTransformNodeID(backup_transform)
        for node_id in reversed(added_ids):
            added = scene.GetNodeByID(node_id)
            if added is not None:
                scene.RemoveNode(added)
        raise
    return node


# --------------------------------------------------------------------------- segments -> label map


def segment_ids_and_names(segmentation_node) -> list[tuple[str, str]]:
    """``(segment ID, segment name)`` for every segment, in node order."""
    segmentation = segmentation_node.GetSegmentation()
    return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i).GetName())
            for i in range(segmentation.GetNumberOfSegments())]


def _labelmap_segmentation(segmentation_node) -> slicer.vtkSegmentation:
    """The node's segmentation if it has binary labelmaps, else a converted copy (node untouched)."""
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSourceRepresentationName() == BINARY_LABELMAP or \
            segmentation.ContainsRepresentation(BINARY_LABELMAP):
        return segmentation
    copy = slicer.vtkSegmentation()
    copy.DeepCopy(segmentation)
    if not copy.CreateRepresentation(BINARY_LABELMAP):
        raise ValueError(f"segmentation '{segmentation_node.GetName()}': cannot convert its "
                         f"{segmentation.GetSourceRepresentationName()} segments to a binary labelmap")
    return copy


def _reference_image(volume_node) -> slicer.vtkOrientedImageData:
    dims = volume_node.GetImageData().GetDimensions()
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    reference.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras(volume_node)))
    return reference


def _on_reference_grid(image: slicer.vtkOrientedImageData, reference: slicer.vtkOrientedImageData,
                       transform, shape: tuple[int, int, int]) -> np.ndarray:
    """``image`` resampled (nearest neighbour) onto the reference grid, as a (k, j, i) array."""
    extent = image.GetExtent()
    if extent[1] < extent[0] or extent[3] < extent[2] or extent[5] < extent[4] or image.GetPointData().GetScalars() is None:
        return np.zeros(shape, dtype=np.uint8)
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            image, reference, resampled, False, False, transform, 0):
        raise RuntimeError("resampling a segment onto the volume grid failed")
    e = resampled.GetExtent()
    if e[1] < e[0] or e[3] < e[2] or e[5] < e[4] or resampled.GetPointData().GetScalars() is None:
        return np.zeros(shape, dtype=np.uint8)
    block = vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    full = np.zeros(shape, dtype=block.dtype)
    # Intersect the resampled extent with the reference extent [0, n-1] on each axis.
    lo = [max(e[4], 0), max(e[2], 0), max(e[0], 0)]
    hi = [min(e[5], shape[0] - 1), min(e[3], shape[1] - 1), min(e[1], shape[2] - 1)]
    if any(h < l for l, h in zip(lo, hi)):
        return full
    full[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = block[
        lo[0] - e[4]:hi[0] - e[4] + 1, lo[1] - e[2]:hi[1] - e[2] + 1, lo[2] - e[0]:hi[2] - e[0] + 1]
    return full


def segmentation_to_labelmap(segmentation_node, volume_node,
                             segment_values: Iterable[tuple[str, int]]) -> sitk.Image:
    """Label map on ``volume_node``'s grid (LPS ``SimpleITK.Image``) from the given segments.

    ``segment_values``: ``(segment ID, label value)`` pairs in priority order; where segments
    overlap, the one listed first wins. Segments are resampled from their own geometry,
    through the transform between the two nodes' parents (non-linear parents are refused).
    Pixel type is uint8, or uint16 when a value exceeds 255.
    """
    check_parent_transform(volume_node)
    check_parent_transform(segmentation_node)
    volume_array(volume_node)
    pairs = [(str(sid), int(value)) for sid, value in segment_values]
    for sid, value in pairs:
        if not 0 < value < 65536:
            raise ValueError(f"segment '{sid}': label value must be in 1..65535, got {value}")
    segmentation = _labelmap_segmentation(segmentation_node)
    reference = _reference_image(volume_node)
    dims = volume_node.GetImageData().GetDimensions()
    shape = (dims[2], dims[1], dims[0])

    transform = None
    if segmentation_node.GetParentTransformNode() is not None or volume_node.GetParentTransformNode() is not None:
        transform = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
            segmentation_node.GetParentTransformNode(), volume_node.GetParentTransformNode(), transform)

    dtype = np.uint16 if any(v > 255 for _, v in pairs) else np.uint8
    labels = np.zeros(shape, dtype=dtype)
    layers = []  # (segment, value, layer image, layer key) in priority order
    for sid, value in pairs:
        segment = segmentation.GetSegment(sid)
        if segment is None:
            raise ValueError(f"segmentation '{segmentation_node.GetName()}' has no segment '{sid}'")
        image = segment.GetRepresentation(BINARY_LABELMAP)
        if image is not None:
            layers.append((segment, value, image, image.GetAddressAsString("vtkOrientedImageData")))
    # A shared layer is resampled once and dropped after its last segment (memory: one layer at a time
    # for the usual single-layer segmentation).
    uses: dict[str, int] = {}
    for *_, key in layers:
        uses[key] = uses.get(key, 0) + 1
    resampled_layers: dict[str, np.ndarray] = {}
    for segment, value, image, key in layers:
        if key not in resampled_layers:
            resampled_layers[key] = _on_reference_grid(image, reference, transform, shape)
        mask = resampled_layers[key] == segment.GetLabelValue()
        labels[mask & (labels == 0)] = value
        uses[key] -= 1
        if uses[key] == 0:
            del resampled_layers[key]

    image = sitk.GetImageFromArray(labels)
    directions = np.zeros((3, 3))
    volume_node.GetIJKToRASDirections(directions)
    image.SetSpacing(tuple(float(s) for s in volume_node.GetSpacing()))
    image.SetOrigin(tuple(float(v) for v in LPS_TO_RAS @ np.array(volume_node.GetOrigin())))
    image.SetDirection(tuple(float(v) for v in (LPS_TO_RAS @ directions).ravel()))
    return image


# --------------------------------------------------------------------------- statistics


def class_statistics(labels: sitk.Image, classes: Sequence[SegmentClass]) -> list[dict]:
    """Per class: ``{"value", "name", "voxels", "volume_ml"}`` (mL = voxels x voxel volume in mm^3 / 1000)."""
    array = sitk.GetArrayViewFromImage(labels)
    foreground = array[array > 0]
    counts = np.bincount(foreground.astype(np.int64, copy=False), minlength=1)
    voxel_mm3 = float(np.prod(labels.GetSpacing()))
    rows = []
    for segment_class in classes:
        voxels = int(counts[segment_class.value]) if segment_class.value < len(counts) else 0
        rows.append({"value": segment_class.value, "name": segment_class.name, "voxels": voxels,
                     "volume_ml": voxels * voxel_mm3 / 1000.0})
    return rows
