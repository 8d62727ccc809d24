"""Per-user model registry: location, registration order, atomic JSON, damaged files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from SAMedLib import model_registry
from SAMedLib.model_registry import list_models, models_dir, register_model, registry_path, unregister_model


@pytest.fixture
def models_home(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "models"
    monkeypatch.setenv("SAMED_MODELS_DIR", str(folder))
    return folder


def _checkpoint(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not really safetensors")
    return path


def test_env_override_and_platform_default(tmp_path, monkeypatch):
    monkeypatch.setenv("SAMED_MODELS_DIR", str(tmp_path / "x"))
    assert models_dir() == tmp_path / "x"
    monkeypatch.delenv("SAMED_MODELS_DIR")
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
        assert models_dir() == tmp_path / "data" / "SAMed" / "models"
        monkeypatch.delenv("XDG_DATA_HOME")
        assert models_dir() == Path.home() / ".local" / "share" / "SAMed" / "models"


def test_register_lists_most_recent_first_and_folder_files(models_home, tmp_path):
    assert list_models() == []
    a = _checkpoint(tmp_path / "elsewhere" / "a.safetensors")
    b = _checkpoint(tmp_path / "elsewhere" / "b.safetensors")
    in_folder = _checkpoint(models_home / "c.safetensors")
    _checkpoint(models_home / ".c.1234.safetensors")  # a writer's temporary file is not a model
    assert register_model(a) == a.resolve()
    register_model(b)
    assert list_models() == [b.resolve(), a.resolve(), in_folder.resolve()]
    register_model(a)  # again: moves to the top, no duplicate
    assert list_models() == [a.resolve(), b.resolve(), in_folder.resolve()]
    data = json.loads(registry_path().read_text())
    assert [Path(e["path"]).name for e in data["models"]] == ["a.safetensors", "b.safetensors"]
    b.unlink()  # deleted files disappear from the list
    assert list_models() == [a.resolve(), in_folder.resolve()]
    assert unregister_model(a) and not unregister_model(a)
    assert list_models() == [in_folder.resolve()]
    assert a.exists()


def test_register_rejects_missing_and_wrong_files(models_home, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        register_model(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        register_model(_checkpoint(tmp_path / "model.pt"))
    assert not registry_path().exists()


def test_damaged_registry_is_tolerated_and_rewritten(models_home, tmp_path):
    models_home.mkdir(parents=True)
    registry_path().write_text("{ not json")
    assert list_models() == []
    a = register_model(_checkpoint(tmp_path / "a.safetensors"))
    assert list_models() == [a]
    assert json.loads(registry_path().read_text())["format_version"] == 1


def test_failed_write_keeps_previous_registry(models_home, tmp_path, monkeypatch):
    a = register_model(_checkpoint(tmp_path / "a.safetensors"))
    before = registry_path().read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_registry.json, "dump", fail)
    with pytest.raises(OSError, match="disk full"):
        register_model(_checkpoint(tmp_path / "b.safetensors"))
    assert registry_path().read_text() == before
    assert [p.name for p in models_home.iterdir()] == ["registry.json"]
    assert list_models() == [a]
