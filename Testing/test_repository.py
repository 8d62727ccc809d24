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


# --------------------------------------------------------------------------- the extension package


def _cmake_value(name: str) -> str:
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    return re.search(rf'set\({name} "([^"]*)"\)', cmake).group(1)


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_icon_and_screenshot_urls_name_files_in_this_repository():
    homepage = _cmake_value("EXTENSION_HOMEPAGE")
    owner_repo = re.fullmatch(r"https://github\.com/([^/]+/[^/]+)", homepage).group(1)
    raw = rf"https://raw\.githubusercontent\.com/{re.escape(owner_repo)}/main/(.+)"
    icon = REPO / re.fullmatch(raw, _cmake_value("EXTENSION_ICONURL")).group(1)
    assert icon.relative_to(REPO).as_posix() == "Resources/Icons/SAMed.png"
    assert _png_size(icon) == (128, 128)
    screenshots = [REPO / re.fullmatch(raw, url).group(1) for url in _cmake_value("EXTENSION_SCREENSHOTURLS").split()]
    assert screenshots
    for shot in screenshots:
        assert shot.relative_to(REPO).parts[:2] == ("Resources", "Screenshots")
        width, height = _png_size(shot)
        assert width >= 600 and height >= 200


def test_license_is_apache_2_and_the_package_ships_it():
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert re.search(r'^license = "Apache-2.0"$', (REPO / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    # Without these Slicer's extension packaging uses Slicer's own LICENSE and README.
    assert _cmake_value("EXTENSION_LICENSE_FILE") == "${CMAKE_CURRENT_SOURCE_DIR}/LICENSE"
    assert _cmake_value("EXTENSION_README_FILE") == "${CMAKE_CURRENT_SOURCE_DIR}/README.md"


def test_cmake_minimum_version_range_is_at_least_the_extension_templates():
    cmake = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    low, high = re.search(r"cmake_minimum_required\(VERSION ([\d.]+)\.\.\.([\d.]+) FATAL_ERROR\)", cmake).groups()
    version = [int(v) for v in low.split(".")]
    assert version >= [3, 20, 6] and [int(v) for v in high.split(".")] >= version


def test_readme_shows_the_demo_picture():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    pictures = re.findall(r"!\[[^\]]+\]\(([^)\s]+\.png)\)", text)
    assert pictures, "README shows no picture"
    for picture in pictures:
        _png_size(REPO / picture)
    assert "Resources/Screenshots/one_volume_demo.png" in pictures


# --------------------------------------------------------------------------- human output of the CLI


def _no_python_reprs(text: str) -> None:
    assert "\r" not in text  # not a terminal: plain lines, no bar redraws
    reprs = [line for line in text.splitlines() if re.search(r"[{}]|\[['\"\d]|': |\"\w+\": ", line)]
    assert reprs == []


def test_samed_train_human_output_is_sentences(shared_data, tmp_path, capsys, lite, monkeypatch):
    """A tiny real run (2 labeled slices, 4 iterations, 2 validation slices) without --progress-json."""
    import copy

    import SimpleITK as sitk

    import SAMedLib.trainer as trainer_module
    from SAMedLib import cli

    monkeypatch.setattr(trainer_module, "build_backbone", lambda name, *a, **k: copy.deepcopy(lite))
    validation = tmp_path / "two_slices.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(shared_data / "ct_3mm.nii.gz"))[:, :, 95:97], str(validation))
    out = tmp_path / "tiny.safetensors"
    code = cli.main(["train", "--image", str(shared_data / "ct_3mm.nii.gz"), "--labels",
                     str(shared_data / "ct_3mm_labels.nii.gz"), "--classes", "1:spleen,5:liver", "--mode", "frozen",
                     "--head", "linear", "--views-per-slice", "1", "--max-labeled-slices", "2", "--iterations", "4",
                     "--batch-size", "2", "--validate-every", "2", "--val-image", str(validation), "--val-labels",
                     str(shared_data / "ct_3mm_labels.nii.gz"), "--device", "cpu", "--output", str(out)])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout is for --progress-json only
    err = captured.err
    _no_python_reprs(err)
    number = r"(\d\.\d{3}|n/a)"
    assert re.search(rf"^iteration 2: mean Dice \d\.\d{{3}} \(spleen {number}, liver {number}\)", err, re.M), err
    assert re.search(rf"^iteration 4: mean Dice \d\.\d{{3}} \(spleen {number}, liver {number}\)", err, re.M), err
    assert re.search(rf"^checkpoint saved: {re.escape(str(out))} \(iteration [24]\)$", err, re.M), err
    assert re.search(r"^training: 100% 4/4, loss \d+\.\d{4} \(", err, re.M), err
    assert re.search(r"^training finished after 4 iterations in (\d+m)?\d+s, best validation mean Dice \d\.\d{3}: ", err, re.M)
    assert err.splitlines()[-1] == f"wrote {out}"


def test_samed_segment_and_evaluate_human_output_and_previews(shared_data, tiny_checkpoint, tmp_path, capsys):
    import SimpleITK as sitk

    from SAMedLib import cli
    from SAMedLib.volume_io import read_volume

    scan = tmp_path / "two_slices.nrrd"
    sitk.WriteImage(read_volume(shared_data / "ct_dicom")[:, :, 9:11], str(scan))
    labels, segment_png, evaluate_png = tmp_path / "labels.nii.gz", tmp_path / "segment.png", tmp_path / "evaluate.png"
    assert cli.main(["segment", str(scan), "--model", str(tiny_checkpoint), "--output", str(labels), "--device", "cpu",
                     "--batch-size", "1", "--preview", str(segment_png)]) == 0
    err = capsys.readouterr().err
    _no_python_reprs(err)
    assert re.search(r"^segmenting 2 of 2 slices on cpu \((fp32|bf16)\)$", err, re.M), err
    assert re.search(r"^segment: 100% slice 2/2, \d+\.\d\d s/slice \(", err, re.M), err
    assert err.splitlines()[-1] == f"wrote preview {segment_png}"
    assert _png_size(segment_png)[0] > 600

    classes = "1:spleen,5:liver,6:stomach"
    evaluate = ["evaluate", "--prediction", str(labels), "--reference", str(shared_data / "ct_dicom_labels.nii.gz"),
                "--classes", classes]
    assert cli.main([*evaluate, "--image", str(scan), "--preview", str(evaluate_png)]) == 0
    captured = capsys.readouterr()
    _no_python_reprs(captured.out)
    assert re.search(r"^liver\s+\d\.\d{4}", captured.out, re.M) and captured.err == f"wrote preview {evaluate_png}\n"
    assert _png_size(evaluate_png)[0] > 600
    # --preview needs the scan to draw on: said before any work, nothing written.
    assert cli.main([*evaluate, "--preview", str(tmp_path / "no_image.png")]) == 2
    assert capsys.readouterr().err.startswith("samed: error: --preview needs --image")
    assert not (tmp_path / "no_image.png").exists()
