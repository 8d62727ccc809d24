"""Error types with messages that name the problem (shown to users as one line)."""
from __future__ import annotations

__all__ = ["SAMedError", "BackboneError", "CheckpointError", "one_line"]


class SAMedError(Exception):
    """Base class: anything the user can fix (bad file, bad option, mismatched checkpoint)."""


class BackboneError(SAMedError, ValueError):
    """The base model weights are missing, corrupt or of the wrong kind."""


class CheckpointError(SAMedError, ValueError):
    """A fine-tuned checkpoint is missing, unreadable, unsafe or does not match its base model."""


def one_line(exc: BaseException) -> str:
    """The first line of an error's message (its type when it has none): what the CLI and failure lists show."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else exc.__class__.__name__
