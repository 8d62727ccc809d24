"""SAMedMRML: glue between Slicer's MRML scene and the pure-Python SAMedLib core.

Imports slicer (MRML), vtk, numpy and SimpleITK but never Qt, so everything here runs
both inside Slicer and headless under pytest with PyPI ``slicer-core``.

Modules:

* ``volumes``: volume node <-> ``SimpleITK.Image`` with full geometry; parent-transform policy.
* ``segmentations``: label map -> segmentation node (names, colours, terminology,
  reference geometry, subject hierarchy), segmentation node -> label map on a volume's grid.
* ``segmenter_logic``: ``SegmenterLogic.segment(...)``, inference on one persistent worker thread.
* ``dependencies``: installing the Python packages on explicit user request inside Slicer.
"""
