"""The repository's promises to a newcomer: README quick start, CI command, extension layout."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quick_start_lines() -> list[str]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_has_exactly_main_job_and_test_command():
    lines = quick_start_lines()
    assert lines == ["./quickstart demo", "./quickstart test"]


def test_ci_runs_the_readme_test_command():
    ci_commands = [line.strip() for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
                   if line.strip() and not line.lstrip().startswith(("#", "set ", "cd "))]
    assert ci_commands == [quick_start_lines()[1]]


def test_quickstart_installs_the_pinned_torch_pair_itself():
    script = (REPO / "quickstart").read_text(encoding="utf-8")
    assert '"torch==2.14.1" "torchvision==0.29.1"' in script
    assert "-m venv" in script and "pytest Testing" in script


def test_extension_cmake_lists_both_modules_and_depends_on_pytorch():
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for needle in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                   'EXTENSION_DEPENDS "PyTorch"', "add_subdirectory(SAMedSegmenter)", "add_subdirectory(SAMedTrainer)"):
        assert needle in cmake
    for module in ("SAMedSegmenter", "SAMedTrainer"):
        module_cmake = (REPO / module / "CMakeLists.txt").read_text(encoding="utf-8")
        assert "slicerMacroBuildScriptedModule" in module_cmake and "WITH_GENERIC_TESTS" in module_cmake
        ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui")  # well-formed


def test_core_imports_no_slicer_qt_or_vtk():
    core = REPO / "SAMedSegmenter" / "SAMedLib"
    offenders = [f"{path.name}: {line.strip()}" for path in core.glob("*.py") for line in path.read_text(encoding="utf-8").splitlines()
                 if re.match(r"\s*(import|from)\s+(slicer|qt|ctk|vtk)\b", line)]
    assert offenders == []
