"""Error types with messages that name the problem (shown to users as one line)."""
from __future__ import annotations


class SAMedError(Exception):
    """Base class: anything the user can fix (bad file, bad option, mismatched checkpoint)."""


class BackboneError(SAMedError, ValueError):
    """The base model weights are missing, corrupt or of the wrong kind."""


class CheckpointError(SAMedError, ValueError):
    """A fine-tuned checkpoint is missing, unreadable, unsafe or does not match its base model."""
