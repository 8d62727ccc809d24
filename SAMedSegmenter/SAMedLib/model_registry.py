"""Per-user list of fine-tuned models, shared by SAMedTrainer (writes) and SAMedSegmenter (reads).

The models folder is ``$SAMED_MODELS_DIR`` when set, else the platform's per-user data folder:

* Linux: ``$XDG_DATA_HOME/SAMed/models`` (default ``~/.local/share/SAMed/models``)
* macOS: ``~/Library/Application Support/SAMed/models``
* Windows: ``%LOCALAPPDATA%\\SAMed\\models``

``registry.json`` in that folder lists registered checkpoints (which may live anywhere); it
is rewritten atomically (temporary file + ``os.replace``), so a reader never sees half a
file. Checkpoints saved directly in the folder are listed even when not registered.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["models_dir", "registry_path", "register_model", "unregister_model", "list_models", "read_card",
           "describe_card", "MODEL_SUFFIX"]

MODEL_SUFFIX = ".safetensors"
CARD_METADATA_KEY = "samed_model_card"  # same key as SAMedLib.checkpoint.METADATA_KEY
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_REGISTRY_NAME = "registry.json"
_FORMAT_VERSION = 1


def models_dir() -> Path:
    """The per-user models folder (not created here)."""
    override = os.environ.get("SAMED_MODELS_DIR")
    if override:
        return Path(override).expanduser()
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "SAMed" / "models"


def registry_path() -> Path:
    return models_dir() / _REGISTRY_NAME


def _read_entries() -> list[dict]:
    path = registry_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError):
        # A damaged registry must not hide the models folder; it is rewritten on the next register.
        return []
    entries = data.get("models", []) if isinstance(data, dict) else []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("path"), str)]


def _write_entries(entries: list[dict]) -> None:
    folder = models_dir()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".registry.", suffix=".json.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"format_version": _FORMAT_VERSION, "models": entries}, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, registry_path())
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _key(path: Path) -> str:
    return os.path.normcase(str(path))


def register_model(path: str | os.PathLike) -> Path:
    """Add an existing checkpoint file to the registry (most recent first); returns its absolute path.

    Registering the same file again moves it to the top. Raises FileNotFoundError for a
    missing file and ValueError for a file that is not a ``.safetensors`` checkpoint.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"cannot register model: file not found: {resolved}")
    if resolved.suffix != MODEL_SUFFIX:
        raise ValueError(f"cannot register model {resolved.name}: expected a {MODEL_SUFFIX} checkpoint")
    entries = [e for e in _read_entries() if _key(Path(e["path"])) != _key(resolved)]
    entries.insert(0, {"path": str(resolved), "name": resolved.stem, "registered": time.time()})
    _write_entries(entries)
    return resolved


def unregister_model(path: str | os.PathLike) -> bool:
    """Remove a checkpoint from the registry (the file is kept). True if it was registered."""
    resolved = Path(path).expanduser().resolve()
    entries = _read_entries()
    kept = [e for e in entries if _key(Path(e["path"])) != _key(resolved)]
    if len(kept) == len(entries):
        return False
    _write_entries(kept)
    return True


def list_models() -> list[Path]:
    """Registered checkpoints that still exist (most recently registered first), then unregistered
    ``*.safetensors`` files in the models folder (by name)."""
    seen: set[str] = set()
    models: list[Path] = []
    for entry in _read_entries():
        p = Path(entry["path"])
        if p.is_file() and _key(p) not in seen:
            seen.add(_key(p))
            models.append(p)
    folder = models_dir()
    if folder.is_dir():
        for p in sorted(folder.glob(f"*{MODEL_SUFFIX}")):
            if p.name.startswith("."):  # a writer's temporary file
                continue
            p = p.resolve()
            if p.is_file() and _key(p) not in seen:
                seen.add(_key(p))
                models.append(p)
    return models


def read_card(path: str | os.PathLike) -> dict:
    """The model card (as a dict) of a SAMed checkpoint, read from the safetensors header.

    Needs neither torch nor safetensors, so the GUI can show a model's classes without importing
    torch on the main thread. Raises ValueError (one line naming the file) for anything else.
    """
    p = Path(path)
    try:
        with open(p, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            if not 2 <= size <= _MAX_HEADER_BYTES:
                raise ValueError(f"{p.name} is not a safetensors file")
            header = json.loads(handle.read(size).decode("utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {p}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p.name} is not a safetensors file") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or CARD_METADATA_KEY not in metadata:
        raise ValueError(f"{p.name} has no SAMed model card: it is not a SAMed checkpoint")
    try:
        card = json.loads(metadata[CARD_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p.name}: the model card is not valid JSON") from exc
    if not isinstance(card, dict) or not isinstance(card.get("classes"), list):
        raise ValueError(f"{p.name}: the model card lists no classes")
    return card


def describe_card(card: dict) -> str:
    """Short plain-text summary of a model card for the GUI."""
    classes = ", ".join(f"{c.get('value')}: {c.get('name')}" for c in card.get("classes", []))
    method = "SAMed LoRA" if card.get("mode") == "lora" else "frozen encoder"
    lines = [f"Classes: {classes}",
             f"Base model: {card.get('base_name')} (input {card.get('input_size')}x{card.get('input_size')})",
             f"Method: {method} + {card.get('head')} head"
             + (f", LoRA rank {card.get('lora_rank')}" if card.get("lora_rank") else "")]
    training = card.get("training") or {}
    if isinstance(training, dict) and training.get("validation_mean_dice") is not None:
        lines.append(f"Trained {training.get('iterations', '?')} iterations; "
                     f"validation mean Dice {training['validation_mean_dice']}")
    return "\n".join(lines)
