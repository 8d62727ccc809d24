"""Helpers for the MRML glue tests: volume nodes with hand-built geometry (no SAMed code involved)."""
from __future__ import annotations

import math

import numpy as np
import vtk

import slicer


def rotation(z_deg: float = 0.0, x_deg: float = 0.0) -> np.ndarray:
    """3x3 rotation: ``z_deg`` about z, then ``x_deg`` about x."""
    cz, sz = math.cos(math.radians(z_deg)), math.sin(math.radians(z_deg))
    cx, sx = math.cos(math.radians(x_deg)), math.sin(math.radians(x_deg))
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rx @ rz


# name -> (RAS directions (columns i, j, k), spacing, origin RAS)
GEOMETRIES = {
    "identity": (np.eye(3), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
    "lps_anisotropic": (np.diag([-1.0, -1.0, 1.0]), (0.8, 0.7, 2.5), (120.4, 95.2, -310.0)),
    "flipped": (np.diag([1.0, -1.0, -1.0]), (1.3, 0.9, 3.1), (-20.0, 40.0, 15.0)),
    "oblique": (rotation(20, 10) @ np.diag([-1.0, -1.0, 1.0]), (0.9, 1.1, 2.0), (33.3, -12.5, 7.75)),
    "permuted": (np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]]), (2.0, 1.5, 0.75), (5.0, 6.0, -7.0)),
}


def make_volume(scene, array: np.ndarray, directions: np.ndarray, spacing, origin, name: str = "CT"):
    """Scalar volume node with ``array`` (k, j, i) and the given RAS geometry, built with plain MRML calls."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    node.SetIJKToRASDirections(np.asarray(directions, dtype=float))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.CreateDefaultDisplayNodes()
    return node


def ijk_to_ras_numpy(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def ras_to_lps(point) -> tuple[float, float, float]:
    return (-float(point[0]), -float(point[1]), float(point[2]))


def scene_snapshot(scene) -> list[tuple[str, str, str]]:
    """(ID, class, name) of every node, to check that a failed call left the scene unchanged."""
    nodes = []
    for i in range(scene.GetNumberOfNodes()):
        n = scene.GetNthNode(i)
        nodes.append((n.GetID(), n.GetClassName(), n.GetName() or ""))
    return sorted(nodes)


def segmentation_state(node) -> list[tuple]:
    """Segment IDs, names and label-map checksums of a segmentation node (to detect any change)."""
    import hashlib

    from vtk.util.numpy_support import vtk_to_numpy

    state = []
    seg = node.GetSegmentation()
    for i in range(seg.GetNumberOfSegments()):
        segment = seg.GetNthSegment(i)
        image = segment.GetRepresentation("Binary labelmap")
        digest = ""
        if image is not None and image.GetPointData().GetScalars() is not None:
            digest = hashlib.sha1(vtk_to_numpy(image.GetPointData().GetScalars()).tobytes()).hexdigest()
        state.append((seg.GetNthSegmentID(i), segment.GetName(), tuple(round(c, 4) for c in segment.GetColor()),
                      image.GetExtent() if image is not None else None, digest))
    return state
