"""The trained model's file: where it goes, and its model card's class colours and codes."""
from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from SAMedLib.classes import SegmentClass
from SAMedLib.model_registry import models_dir

from .command import TrainingOptions
from .validation import TrainingInputError

__all__ = ["output_path", "unique_model_path", "update_card_classes"]


def output_path(options: TrainingOptions) -> Path:
    """The model file to write: ``options.output_path`` (never an existing file unless ``overwrite``), else
    a new name in the models folder; its folder is created."""
    if options.output_path:
        output = Path(options.output_path).expanduser()
        if output.suffix != ".safetensors":
            raise TrainingInputError([f"output model file must end in .safetensors: {output}"])
        if output.exists() and not options.overwrite:
            raise TrainingInputError([f"output model already exists: {output} (choose another name)"])
    else:
        output = unique_model_path(models_dir(), options.model_name)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingInputError([f"cannot create the output folder {output.parent}: {exc}"]) from exc
    return output.resolve()


def unique_model_path(folder: str | os.PathLike, name: str) -> Path:
    """``<folder>/<name>.safetensors``, with `` (2)``, `` (3)``... appended if that file exists."""
    safe = re.sub(r"[^\w\-. ()]+", "_", name).strip(" .") or "SAMed model"
    folder = Path(folder)
    path = folder / f"{safe}.safetensors"
    n = 2
    while path.exists():
        path = folder / f"{safe} ({n}).safetensors"
        n += 1
    return path


def update_card_classes(path: str | os.PathLike, classes: Sequence[SegmentClass]) -> bool:
    """Write the classes' colours and SNOMED codes into a checkpoint's model card.

    ``samed train --classes VALUE:NAME,...`` only carries values and names (colours and codes then
    come from the known-organ table), so after training the user's colours and the codes read from
    segment terminology are put back here. Values and names must match the card exactly; tensors
    are copied unchanged; the file is replaced atomically. Returns True if the card changed.
    Needs only ``safetensors`` and numpy (no torch).
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    path = Path(path)
    with safe_open(str(path), framework="numpy") as handle:
        metadata = dict(handle.metadata() or {})
    key = "samed_model_card"
    card = json.loads(metadata[key])
    by_value = {c.value: c for c in classes}
    changed = False
    for entry in card.get("classes", []):
        wanted = by_value.get(int(entry["value"]))
        if wanted is None or wanted.name != entry["name"]:
            raise ValueError(f"{path.name}: class {entry['value']}:{entry['name']} is not in the training class list")
        update = wanted.to_dict()
        if any(entry.get(k) != update[k] for k in ("color", "snomed_code", "snomed_meaning", "laterality")):
            entry.update({k: update[k] for k in ("color", "snomed_code", "snomed_meaning", "laterality")})
            changed = True
    if not changed:
        return False
    metadata[key] = json.dumps(card, indent=1, sort_keys=True)
    tensors = load_file(str(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".safetensors.tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True
