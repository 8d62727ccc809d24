"""Write (and read back) 3D Slicer segmentation files (.seg.nrrd) without VTK or Slicer.

A .seg.nrrd is an ordinary NRRD label map plus Slicer-specific key/value header fields
(ITK's NRRD writer stores string metadata as ``key:=value`` lines, which is exactly
what Slicer's segmentation storage node reads). The file written here holds:

* one shared layer: a 3D uint8 label map on the full input grid (same spacing, origin,
  direction), ``Segmentation_ReferenceImageExtentOffset`` ``0 0 0``;
* label values: the class values themselves when every class value fits in uint8
  (1..255), so the file reads back as the same label map in any NRRD reader; otherwise
  1..N in class order. Voxels whose value is not a listed class become background 0;
* per segment ``SegmentN_*`` fields (ID and name = class name, colour, label value,
  layer 0, extent = the whole layer, because Slicer builds a shared layer from the extent
  of its first segment), ``_Tags`` with a Slicer terminology entry when the class has a
  SNOMED CT code, and ``SAMed.ClassValue`` so the original class value survives a
  1..N remapping;
* ``Segmentation_ConversionParameters`` with the reference image geometry, so Slicer's
  Segment Editor keeps working on the original voxel grid.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .classes import ANATOMICAL_STRUCTURE, SegmentClass
from .volume_io import VolumeError, read_image_header, validate_volume, write_image

__all__ = ["write_seg_nrrd", "read_seg_nrrd", "read_seg_nrrd_classes", "terminology_entry"]

BINARY_LABELMAP = "Binary labelmap"
CLASS_VALUE_TAG = "SAMed.ClassValue"
_SEGMENTATION_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def _clean(text: str) -> str:
    """Strip characters that would break the NRRD header line or Slicer's tag/code syntax."""
    for ch in "\r\n|~^":
        text = text.replace(ch, " ")
    return text.strip()


def terminology_entry(cls: SegmentClass) -> str | None:
    """Slicer terminology string for ``cls`` (None without a SNOMED code).

    Format (as serialised by Slicer's vtkSlicerTerminologiesModuleLogic):
    ``context~category~type~typeModifier~anatomicContext~region~regionModifier``, each code
    ``scheme^value^meaning``; laterality goes into the type modifier.
    """
    if not cls.snomed_code:
        return None
    category = f"SCT^{ANATOMICAL_STRUCTURE[0]}^{ANATOMICAL_STRUCTURE[1]}"
    type_code = f"SCT^{_clean(cls.snomed_code)}^{_clean(cls.snomed_meaning or cls.name)}"
    modifier = f"SCT^{_clean(cls.laterality[0])}^{_clean(cls.laterality[1])}" if cls.laterality else "^^"
    return "~".join([_SEGMENTATION_CONTEXT, category, type_code, modifier, _ANATOMIC_CONTEXT, "^^", "^^"])


def _ras_geometry_string(image: sitk.Image) -> str:
    """Slicer's serialised image geometry: IJK-to-RAS matrix (row-major 4x4) then extent."""
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = lps_to_ras @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = lps_to_ras @ np.array(image.GetOrigin())
    extent = [v for n in image.GetSize() for v in (0, n - 1)]
    return "".join(f"{float(v):.17g};" for v in matrix.ravel()) + "".join(f"{v};" for v in extent)


def write_seg_nrrd(label_image: sitk.Image, classes: Sequence[SegmentClass], path: str | os.PathLike) -> Path:
    """Write ``label_image`` (3D, voxel values = class values) as a Slicer .seg.nrrd.

    One segment per class, in ``classes`` order, also when a class has no voxels.
    Written atomically (temporary file + rename); parent folders are created.
    """
    final = Path(path)
    if not final.name.lower().endswith(".nrrd"):
        raise VolumeError(f"{final}: a segmentation file must end with .seg.nrrd")
    if not classes:
        raise ValueError("write_seg_nrrd needs at least one class")
    if len(classes) > 255:
        raise ValueError(f"at most 255 classes fit in a uint8 segmentation layer, got {len(classes)}")
    validate_volume(label_image, f"label map for {final.name}", allow_constant=True)

    labels = sitk.GetArrayViewFromImage(label_image)
    if np.issubdtype(labels.dtype, np.floating):
        labels = np.rint(labels)
    keep_values = all(c.value <= 255 for c in classes)
    layer_values = [c.value if keep_values else i + 1 for i, c in enumerate(classes)]
    layer = np.zeros(labels.shape, dtype=np.uint8)
    for cls, layer_value in zip(classes, layer_values):
        layer[labels == cls.value] = layer_value

    out = sitk.GetImageFromArray(layer)
    out.CopyInformation(label_image)
    size = label_image.GetSize()
    whole_extent = f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}"

    meta = {
        "Segmentation_MasterRepresentation": BINARY_LABELMAP,
        "Segmentation_SourceRepresentation": BINARY_LABELMAP,
        "Segmentation_ContainedRepresentationNames": f"{BINARY_LABELMAP}|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        # Slicer's format: name|value|description& per parameter.
        "Segmentation_ConversionParameters": (
            f"Reference image geometry|{_ras_geometry_string(label_image)}|Geometry of the source image grid.&"
            "Collapse labelmaps|1|Merge labelmaps into as few shared layers as possible.&"),
    }
    for i, (cls, layer_value) in enumerate(zip(classes, layer_values)):
        name = _clean(cls.name)
        tags = f"{CLASS_VALUE_TAG}:{cls.value}|"
        entry = terminology_entry(cls)
        if entry:
            tags = f"TerminologyEntry:{entry}|" + tags
        meta.update({
            f"Segment{i}_ID": name,
            f"Segment{i}_Name": name,
            f"Segment{i}_Color": " ".join(f"{c / 255.0:.6g}" for c in cls.color),
            f"Segment{i}_ColorAutoGenerated": "0",
            f"Segment{i}_NameAutoGenerated": "0",
            f"Segment{i}_Extent": whole_extent,
            f"Segment{i}_LabelValue": str(layer_value),
            f"Segment{i}_Layer": "0",
            f"Segment{i}_Tags": tags,
        })
    for key, value in meta.items():
        out.SetMetaData(key, value)

    return write_image(out, final)


def _parse_tags(text: str) -> dict[str, str]:
    tags = {}
    for item in text.split("|"):
        key, sep, value = item.partition(":")
        if sep:
            tags[key] = value
    return tags


def _parse_code(text: str) -> tuple[str, str] | None:
    parts = text.split("^")
    return (parts[1], parts[2]) if len(parts) == 3 and parts[1] else None


def read_seg_nrrd_classes(path: str | os.PathLike) -> list[tuple[SegmentClass, int]]:
    """Segments of a .seg.nrrd header as ``(class, label value in the file)``, in file order.

    The class value is ``SAMed.ClassValue`` when present, else the segment's label value.
    Only single-layer files are supported (what ``write_seg_nrrd`` and Slicer write for
    non-overlapping segments).
    """
    reader = read_image_header(path)
    keys = set(reader.GetMetaDataKeys())
    result = []
    i = 0
    while f"Segment{i}_ID" in keys:
        def get(field: str, default: str = "") -> str:
            key = f"Segment{i}_{field}"
            return reader.GetMetaData(key) if key in keys else default

        if get("Layer", "0") != "0":
            raise VolumeError(f"{path}: segment {i} is in layer {get('Layer')}; only single-layer files are supported")
        label_value = int(get("LabelValue", str(i + 1)))
        tags = _parse_tags(get("Tags"))
        rgb = [float(v) for v in get("Color", "0.5 0.5 0.5").split()]
        code = meaning = laterality = None
        fields = tags.get("TerminologyEntry", "").split("~")
        if len(fields) >= 4 and _parse_code(fields[2]):
            code, meaning = _parse_code(fields[2])
            laterality = _parse_code(fields[3])
        cls = SegmentClass(int(tags.get(CLASS_VALUE_TAG, label_value)), get("Name") or get("ID"),
                           tuple(int(round(min(max(c, 0.0), 1.0) * 255)) for c in rgb[:3]),
                           code, meaning, laterality)
        result.append((cls, label_value))
        i += 1
    return result


def read_seg_nrrd(path: str | os.PathLike) -> tuple[sitk.Image, list[SegmentClass]]:
    """Read a single-layer .seg.nrrd as a label map whose voxel values are the class values."""
    entries = read_seg_nrrd_classes(path)
    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{path}: expected one 3D layer, found {image.GetDimension()}D with "
                          f"{image.GetNumberOfComponentsPerPixel()} components")
    layer = sitk.GetArrayViewFromImage(image)
    classes = [cls for cls, _ in entries]
    dtype = np.uint8 if max((c.value for c in classes), default=0) <= 255 else np.uint16
    labels = np.zeros(layer.shape, dtype=dtype)
    for cls, label_value in entries:
        labels[layer == label_value] = cls.value
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    return out, classes
