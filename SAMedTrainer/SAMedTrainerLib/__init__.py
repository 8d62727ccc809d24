"""SAMedTrainerLib: the SAMedTrainer module's logic, without Qt (runs headless with slicer-core)."""
