"""Installing SAMed's Python dependencies inside 3D Slicer, on explicit user request only.

Nothing here runs at import time or when a module/widget is constructed: the widgets call
``ensure_dependencies()`` from an "Install dependencies" button. It

1. installs PyTorch through the PyTorch Utils extension (``PyTorchUtils``) when torch is missing,
   which picks the right CUDA/CPU build for the machine;
2. installs the packages of ``Resources/requirements.txt`` that are missing or too old, with a
   pip *constraints* file that pins the installed versions of Slicer's own SimpleITK, numpy
   and vtk (and of torch), so pip can never replace them (it fails with a message instead);
3. does nothing at all in Slicer's testing mode (``slicer.app.testingEnabled()``).

The pure helpers (``read_requirements``, ``missing_requirements``, ``protection_constraints``)
need no Slicer and are unit-tested.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["REQUIREMENTS_FILE", "PROTECTED_PACKAGES", "TORCH_REQUIREMENT", "read_requirements",
           "missing_requirements", "missing_dependencies", "protection_constraints", "dependency_report",
           "ensure_dependencies"]

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
PROTECTED_PACKAGES = ("SimpleITK", "numpy", "vtk")
TORCH_REQUIREMENT = ">=2.1"
OPTIONAL_PACKAGES = {"openvino": "the 'Faster CPU (OpenVINO)' options"}


def read_requirements(path: str | os.PathLike = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_requirements(requirements: Iterable[str],
                         installed_version: Callable[[str], str | None] = _installed_version) -> list[str]:
    """The requirements that are not installed or whose installed version is outside the specifier."""
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version

    missing = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = installed_version(requirement.name)
        if version is None:
            missing.append(text)
            continue
        try:
            ok = Version(version) in requirement.specifier if requirement.specifier else True
        except InvalidVersion:
            ok = True  # a local/odd version string: do not try to "fix" it
        if not ok:
            missing.append(text)
    return missing


def protection_constraints(packages: Iterable[str] = (*PROTECTED_PACKAGES, "torch", "torchvision"),
                           installed_version: Callable[[str], str | None] = _installed_version) -> list[str]:
    """``name==version`` pins for the installed protected packages (pip constraints lines)."""
    pins = []
    for name in packages:
        version = installed_version(name)
        if version is not None:
            pins.append(f"{name}=={version}")
    return pins


def missing_dependencies(requirements_file: str | os.PathLike = REQUIREMENTS_FILE,
                         installed_version: Callable[[str], str | None] = _installed_version) -> list[str]:
    """Torch and the requirements file's packages that are not installed or too old."""
    return missing_requirements([f"torch{TORCH_REQUIREMENT}", *read_requirements(requirements_file)], installed_version)


def dependency_report(requirements_file: str | os.PathLike = REQUIREMENTS_FILE,
                      installed_version: Callable[[str], str | None] = _installed_version) -> str:
    """One line for the GUI: what is missing, or that everything is installed; then any optional package that is
    not installed, with how to get it (optional packages are never installed by the button)."""
    missing = missing_dependencies(requirements_file, installed_version)
    report = ("All Python dependencies are installed." if not missing else
              "Missing: " + ", ".join(missing) + ". Click 'Install dependencies' to install them.")
    for name, use in OPTIONAL_PACKAGES.items():
        if installed_version(name) is None:
            report += f" Optional: {name} for {use} (Python console: slicer.util.pip_install('{name}'))."
    return report


def _slicer_packaging():
    """``slicer.packaging`` (Slicer >= 5.11, where it is imported only on demand), or None (Slicer 5.10)."""
    try:
        return importlib.import_module("slicer.packaging")
    except ImportError:
        return None


def _ensure_torch(slicer, ask_confirmation: bool) -> None:
    if not missing_requirements([f"torch{TORCH_REQUIREMENT}"]):
        return
    try:
        import PyTorchUtils
    except ImportError as exc:
        raise RuntimeError("SAMed needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, "
                           "restart Slicer, then click 'Install dependencies' again.") from exc
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if not torch_logic.torchInstalled():
        # installTorch returns the torch module, or None when the user cancels its confirmation.
        torch = torch_logic.installTorch(askConfirmation=ask_confirmation, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise RuntimeError("PyTorch installation was cancelled: SAMed cannot run without PyTorch.")
    if missing_requirements([f"torch{TORCH_REQUIREMENT}"]):
        raise RuntimeError(f"PyTorch{TORCH_REQUIREMENT} is required but an older version is installed. "
                           "Use the 'PyTorch Utils' module to update it, then restart Slicer.")


def ensure_dependencies(requester: str = "SAMed", ask_confirmation: bool = True,
                        requirements_file: str | os.PathLike = REQUIREMENTS_FILE) -> bool:
    """Install missing dependencies inside Slicer (explicit user action only).

    Returns True if something was installed (a Slicer restart may then be needed if the
    packages were already imported), False if nothing was needed or Slicer runs in testing
    mode. Raises RuntimeError with an actionable message when installation is impossible or
    the user declines.
    """
    import slicer

    if slicer.app.testingEnabled():
        return False
    _ensure_torch(slicer, ask_confirmation)
    requirements = read_requirements(requirements_file)
    missing = missing_requirements(requirements)
    if not missing:
        return False
    constraints = protection_constraints()
    fd, constraints_path = tempfile.mkstemp(prefix="samed-constraints-", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(constraints) + "\n")
        packaging_module = _slicer_packaging()
        if packaging_module is not None and hasattr(packaging_module, "pip_ensure"):  # Slicer >= 5.11
            from packaging.requirements import Requirement

            # The constraints file pins Slicer's own packages and torch: pip cannot replace them.
            packaging_module.pip_ensure([Requirement(r) for r in missing], constraints=constraints_path,
                                        prompt_install=ask_confirmation, requester=requester)
        else:  # Slicer 5.10: ask ourselves, then pip_install
            if ask_confirmation and not slicer.util.confirmOkCancelDisplay(
                    "SAMed needs these Python packages:\n\n" + "\n".join(missing) + "\n\nInstall them now?",
                    windowTitle=requester):
                raise RuntimeError("Installation of the Python dependencies was cancelled.")
            quoted = " ".join(f'"{r}"' for r in missing)
            slicer.util.pip_install(f'{quoted} -c "{constraints_path}"')
    finally:
        os.unlink(constraints_path)
    still_missing = missing_requirements(requirements)
    if still_missing:
        raise RuntimeError("Installing SAMed's Python dependencies failed for: " + ", ".join(still_missing)
                           + ". See the Python console for pip's messages.")
    return True
