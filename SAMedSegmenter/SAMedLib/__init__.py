"""SAMedLib: pure-Python core (no Slicer, Qt or VTK)."""
