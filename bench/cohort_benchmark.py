"""Cohort throughput on the CPU: seconds per slice of each pipeline step, cases per hour, peak memory.

Steps (on the 20-slice 512x512 DICOM sample, one process, the trained model):
  baseline        today's pipeline: prepared encoder, ``--precision auto``, batch 1, all cores' threads
  one_thread      the same with one thread (what each of two torchrun processes gets on 2 cores)
  air_skip        the series padded with air-only slices (-1000 HU + noise): those skip the encoder;
                  the same air slices through the model show whether skipping them changes any label
  torch_compile   the prepared encoder through ``torch.compile`` (inductor), first call timed separately
  openvino        encoder and head converted to OpenVINO (``samed segment --openvino``), conversion timed apart
Cohort: ``samed segment FOLDER --output-dir`` in a child process over ct_3mm, ct_dicom and synthetic
512x512x300 volumes (the DICOM slices repeated), once with torch and once with ``--openvino``; wall time,
cases/hour and the child's peak RSS, plus how long reading each case takes (what overlapping reading with the
model work can save at most).

The machine may be shared: the load average is recorded at the start and the end; compare steps only
within one run. Writes bench/results/cohort.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "abdomen-ct"
RESULTS = Path(__file__).resolve().parent / "results"


def dice_scores(pred: sitk.Image, classes) -> dict:
    from SAMedLib.metrics import score_label_maps
    from SAMedLib.volume_io import read_volume, resample_to_reference

    reference = resample_to_reference(read_volume(DATA / "ct_dicom_labels.nii.gz", allow_constant=True), pred)
    scores = score_label_maps(sitk.GetArrayFromImage(pred), sitk.GetArrayFromImage(reference), classes,
                              tuple(reversed(pred.GetSpacing())))
    return {name: round(c["dice"], 4) for name, c in scores["classes"].items()}


def timed_segment(image, loaded, **kwargs):
    from SAMedLib.inference import segment_image

    start = time.perf_counter()
    labels = segment_image(image, loaded, device="cpu", **kwargs)
    return labels, time.perf_counter() - start


def pad_with_air(image: sitk.Image, air_slices: int) -> sitk.Image:
    array = sitk.GetArrayFromImage(image)
    rng = np.random.default_rng(0)
    air = (-1000 + rng.normal(0, 20, (air_slices,) + array.shape[1:])).astype(array.dtype)
    half = air_slices // 2
    padded = sitk.GetImageFromArray(np.concatenate([air[:half], array, air[half:]]))
    padded.SetSpacing(image.GetSpacing())
    padded.SetDirection(image.GetDirection())
    padded.SetOrigin(image.TransformIndexToPhysicalPoint((0, 0, -half)))
    return padded


def steps(model_path: Path, air_slices: int, compile_encoder: bool) -> dict:
    import SAMedLib.inference as inference
    from SAMedLib.checkpoint import load_model
    from SAMedLib.volume_io import read_volume

    loaded = load_model(model_path)
    image = read_volume(DATA / "ct_dicom")
    slices = image.GetSize()[2]
    results = {}
    timed_segment(image[:, :, :2], loaded)  # warm-up: first-call allocations and kernel choices
    threads = torch.get_num_threads()

    baseline, seconds = timed_segment(image, loaded)
    base_array = sitk.GetArrayFromImage(baseline)
    results["baseline"] = {"s_per_slice": round(seconds / slices, 3), "threads": threads,
                           "dice": dice_scores(baseline, loaded.card.classes)}

    torch.set_num_threads(1)
    labels, seconds = timed_segment(image, loaded)
    torch.set_num_threads(threads)
    results["one_thread"] = {"s_per_slice": round(seconds / slices, 3), "threads": 1,
                             "same_labels_as_baseline": bool((sitk.GetArrayFromImage(labels) == base_array).all())}

    padded = pad_with_air(image, air_slices)
    labels, seconds = timed_segment(padded, loaded)
    array = sitk.GetArrayFromImage(labels)
    half = air_slices // 2
    body = array[half:half + slices]
    # The air slices alone, forced through the model: does skipping them change any label?
    air_only = sitk.GetImageFromArray(np.concatenate([sitk.GetArrayFromImage(padded)[:half],
                                                      sitk.GetArrayFromImage(padded)[half + slices:]]))
    real_indices = inference.body_slice_indices
    inference.body_slice_indices = lambda volume, *a: np.arange(volume.shape[0])
    try:
        forced, forced_seconds = timed_segment(air_only, loaded)
    finally:
        inference.body_slice_indices = real_indices
    results["air_skip"] = {
        "slices": slices + air_slices, "air_slices": air_slices, "s_per_slice": round(seconds / (slices + air_slices), 3),
        "air_s_per_slice_through_model": round(forced_seconds / air_slices, 3),
        "body_labels_same_as_baseline": bool((body == base_array).all()),
        "air_voxels_labelled_when_forced_through_model": int((sitk.GetArrayFromImage(forced) != 0).sum())}

    if compile_encoder:
        results["torch_compile"] = compile_step(loaded, image, base_array)
    results["openvino"] = openvino_step(model_path, image, base_array)
    return results


def openvino_step(model_path: Path, image: sitk.Image, base_array: np.ndarray) -> dict:
    """A fresh copy of the model with its encoder and head converted by ``acceleration.use_openvino``."""
    from SAMedLib.acceleration import use_openvino
    from SAMedLib.checkpoint import load_model

    loaded = load_model(model_path)
    slices = image.GetSize()[2]
    start = time.perf_counter()
    use_openvino(loaded.model)
    convert_seconds = time.perf_counter() - start
    timed_segment(image[:, :, :2], loaded)  # warm-up, as for the baseline
    labels, seconds = timed_segment(image, loaded)
    array = sitk.GetArrayFromImage(labels)
    return {"s_per_slice": round(seconds / slices, 3), "convert_s": round(convert_seconds, 1),
            "precision": loaded.model.image_encoder.precision,
            "voxels_differing_from_baseline": int((array != base_array).sum()),
            "dice": dice_scores(labels, loaded.card.classes)}


def compile_step(loaded, image: sitk.Image, base_array: np.ndarray) -> dict:
    """The prepared encoder through ``acceleration.compile_encoder`` (torch.compile, inductor), in the pipeline."""
    from SAMedLib.acceleration import compile_encoder

    net = loaded.model
    eager = net.image_encoder
    slices = image.GetSize()[2]
    try:
        start = time.perf_counter()
        net.image_encoder = compile_encoder(eager)
        timed_segment(image[:, :, :2], loaded)  # compiles at the first call
        compile_seconds = time.perf_counter() - start
        if net.image_encoder.failed:
            return {"error": "compiling failed; the encoder ran uncompiled"}
        labels, seconds = timed_segment(image, loaded)
        return {"s_per_slice": round(seconds / slices, 3), "compile_and_first_2_slices_s": round(compile_seconds, 1),
                "same_labels_as_baseline": bool((sitk.GetArrayFromImage(labels) == base_array).all()),
                "dice": dice_scores(labels, loaded.card.classes)}
    finally:
        net.image_encoder = eager


def compile_only(model_path: Path, threads: int) -> dict:
    """A second run for torch.compile alone, with its own baseline measured just before (same process)."""
    from SAMedLib.checkpoint import load_model
    from SAMedLib.volume_io import read_volume

    torch.set_num_threads(threads)
    loaded = load_model(model_path)
    image = read_volume(DATA / "ct_dicom")
    timed_segment(image[:, :, :2], loaded)
    load_start = [round(v, 2) for v in os.getloadavg()]
    baseline, seconds = timed_segment(image, loaded)
    result = compile_step(loaded, image, sitk.GetArrayFromImage(baseline))
    result.update({"threads": threads, "baseline_s_per_slice": round(seconds / image.GetSize()[2], 3),
                   "load_start": load_start,
                   "load_end": [round(v, 2) for v in os.getloadavg()]})
    return result


def synthetic_volume(path: Path, slices: int) -> Path:
    from SAMedLib.volume_io import read_volume

    dicom = sitk.GetArrayFromImage(read_volume(DATA / "ct_dicom"))
    array = np.concatenate([dicom] * (slices // len(dicom) + 1))[:slices]
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing((0.977, 0.977, 1.0))
    sitk.WriteImage(image, str(path))
    return path


def cohort(model_path: Path, synthetic: int, slices: int, work: Path, processes: int, runtime: str = "torch") -> dict:
    from SAMedLib.volume_io import read_volume

    folder = work / "cases"
    folder.mkdir()
    (folder / "ct_3mm.nii.gz").symlink_to(DATA / "ct_3mm.nii.gz")
    (folder / "ct_dicom").symlink_to(DATA / "ct_dicom")
    for i in range(synthetic):
        synthetic_volume(folder / f"synthetic_{i}_512x512x{slices}.nii.gz", slices)
    cases = sorted(folder.iterdir())
    read_seconds, total_slices = {}, 0
    for case in cases:
        start = time.perf_counter()
        image = read_volume(case)
        read_seconds[case.name] = round(time.perf_counter() - start, 2)
        total_slices += image.GetSize()[2]
    out = work / "out"
    launcher = [sys.executable] if processes == 1 else [
        str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(processes)]
    command = launcher + ["-m", "SAMedLib.cli", "segment", str(folder), "--model", str(model_path),
                          "--output-dir", str(out), "--statistics", str(out / "statistics.csv"), "--device", "cpu",
                          "--quiet"] + (["--openvino"] if runtime == "openvino" else [])
    env = {**os.environ, "PYTHONPATH": str(REPO / "SAMedSegmenter")}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        peak = peak_rss_mb(child)
        wall = time.perf_counter() - start
        if child.returncode != 0:
            stderr.seek(0)
            raise SystemExit(f"cohort run failed ({child.returncode}): {stderr.read()[-2000:]}")
    return {"runtime": runtime, "processes": processes, "cases": [c.name for c in cases], "slices": total_slices, "wall_s": round(wall, 1),
            "s_per_slice": round(wall / total_slices, 3), "cases_per_hour": round(len(cases) * 3600 / wall, 1),
            "peak_rss_mb_per_process": round(peak), "read_s": read_seconds,
            "read_share": round(sum(read_seconds.values()) / wall, 3)}


def peak_rss_mb(child: subprocess.Popen) -> float:
    """Wait for ``child``; the largest resident set of any one process in its tree, sampled every 0.2 s."""
    import psutil

    root, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            processes = [root] + root.children(recursive=True)
            peak = max([peak] + [p.memory_info().rss for p in processes])
        except psutil.Error:  # a process ended between listing and reading
            pass
        time.sleep(0.2)
    return peak / 2**20


def write_markdown(report: dict, path: Path) -> None:
    s = report["steps"]
    base = s["baseline"]["s_per_slice"]
    lines = ["# Cohort throughput (CPU)", "",
             f"Machine: {report['machine']}. Load average {report['load_start']} at the start, "
             f"{report['load_end']} at the end (2 cores; the benchmark's own processes count). Absolute times move "
             "~20 % between days on this VM: compare rows within one run. Model: " + report["model"] + ".", "",
             *([f"Steps measured in an earlier run of this script (started {s['_run']['started_utc']} UTC, load "
                f"{s['_run']['load_start']} at its start, {s['_run']['load_after']} after), ratios within that run.", ""]
               if "_run" in s else []),
             "| step | s/slice | vs baseline | labels | notes |", "|---|---|---|---|---|",
             f"| baseline (prepared encoder, {report['precision']}, batch 1, {s['baseline']['threads']} threads) | "
             f"{base} | 1.00x | - | Dice {s['baseline']['dice']} |"]
    one = s["one_thread"]
    lines.append(f"| one thread per process | {one['s_per_slice']} | {base / one['s_per_slice']:.2f}x | "
                 f"{'identical' if one['same_labels_as_baseline'] else 'differ'} | two such processes (torchrun) on 2 cores "
                 f"would give {one['s_per_slice'] / 2:.3f} s/slice of throughput if they scaled perfectly (estimate) |")
    air = s["air_skip"]
    lines.append(f"| air-only slices skip the encoder ({air['air_slices']} of {air['slices']}) | {air['s_per_slice']} | "
                 f"{base / air['s_per_slice']:.2f}x | body slices "
                 f"{'identical' if air['body_labels_same_as_baseline'] else 'differ'}; forced through the model the "
                 f"air slices get {air['air_voxels_labelled_when_forced_through_model']} labelled voxels | "
                 "real CT slices all hold body: 1.00x on the sample scans |")
    tc = s.get("torch_compile")
    if tc and "error" not in tc:
        own = tc.get("baseline_s_per_slice", base)  # a separate run measures its own baseline
        lines.append(f"| torch.compile (inductor), separate run, {tc.get('threads')} thread(s): own baseline {own} "
                     "s/slice, load "
                     f"{tc.get('load_start')} -> {tc.get('load_end')} | {tc['s_per_slice']} | {own / tc['s_per_slice']:.2f}x "
                     f"(vs own baseline) | {'identical' if tc['same_labels_as_baseline'] else 'differ'} | compile + "
                     f"first 2 slices {tc['compile_and_first_2_slices_s']} s; Dice {tc['dice']} |")
    elif tc:
        lines.append(f"| torch.compile (inductor) | - | - | - | {tc['error']} |")
    ov = s.get("openvino")
    if ov:
        lines.append(f"| OpenVINO encoder + head (`--openvino`, {ov['precision']}) | {ov['s_per_slice']} | "
                     f"{base / ov['s_per_slice']:.2f}x | {ov['voxels_differing_from_baseline']} voxels differ | "
                     f"converting once per process {ov['convert_s']} s; Dice {ov['dice']} |")
    probe = report.get("torch_compile_encoder_probe")
    if probe:
        lines.append(f"| torch.compile, encoder alone (fp32, `bench/encoder_compile_probe.py`, separate run, load "
                     f"{probe['load']}) | eager {probe['eager_s']} s, compiled {probe['compiled_s']} s per 256x256 "
                     f"image | {probe['eager_s'] / probe['compiled_s']:.2f}x | max difference "
                     f"{probe['max_abs_difference']:.1e} | compile + first call {probe['compile_s']} s; eager again "
                     f"{probe['eager_again_s']} s |")
    cohorts = report["cohorts"]
    first = cohorts[0]
    lines += ["", f"Cohort ({', '.join(first['cases'])}; {first['slices']} slices) through `samed segment "
              "--output-dir --statistics`, each run in a fresh child process, one after another:", "",
              "| runtime | processes | wall s | s/slice | cases/hour | vs first row | peak RSS (largest process) |",
              "|---|---|---|---|---|---|---|"]
    for c in cohorts:
        how = "1 (all cores' threads)" if c["processes"] == 1 else f"{c['processes']} (torchrun, threads split)"
        runtime = "torch" if c.get("runtime", "torch") == "torch" else "`--openvino`"
        lines.append(f"| {runtime} | {how} | {c['wall_s']} | {c['s_per_slice']} | **{c['cases_per_hour']}** | "
                     f"{first['wall_s'] / c['wall_s']:.2f}x | {c['peak_rss_mb_per_process']} MB |")
    lines += ["", f"Reading the cases takes {first['read_s']} s ({100 * first['read_share']:.1f}% of the first run's "
              "wall time): that is all that overlapping reading with the model work (done, a one-case read-ahead "
              "thread) can save."]
    lines += ["",
              "GPU: none on this machine; not measured."]
    if report.get("reading"):
        lines += ["", "Reading (written after the runs): " + report["reading"]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/cohort_model.safetensors")
    parser.add_argument("--air-slices", type=int, default=10)
    parser.add_argument("--synthetic", type=int, default=1, help="synthetic 512x512xN volumes in the cohort")
    parser.add_argument("--synthetic-slices", type=int, default=300)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--cohort-runs", default="torch:2,openvino:2,torch:1,openvino:1",
                        help="cohort runs, RUNTIME:PROCESSES each (1 = one process with every core's threads, "
                             "N = torchrun with N CPU processes, threads split)")
    parser.add_argument("--threads", type=int, default=1, help="--compile-only: threads (1: as each of 2 processes)")
    parser.add_argument("--steps-from", help="reuse the per-step results of an earlier run (JSON) and run the cohort")
    parser.add_argument("--compile-only", action="store_true",
                        help="measure torch.compile against a fresh baseline and add it to an existing cohort.json")
    args = parser.parse_args()
    from SAMedLib.acceleration import precision_name

    model_path = Path(args.model)
    if not model_path.exists():
        raise SystemExit(f"{model_path}: train one first (see bench/results/cohort.md) ")
    if args.compile_only:
        report = json.loads((RESULTS / "cohort.json").read_text())
        report["steps"]["torch_compile"] = compile_only(model_path, args.threads)
        (RESULTS / "cohort.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        write_markdown(report, RESULTS / "cohort.md")
        print((RESULTS / "cohort.md").read_text())
        return
    load_start = [round(v, 2) for v in os.getloadavg()]
    report = {"machine": f"{platform.machine()} {os.cpu_count()}-core CPU, torch {torch.__version__}, no GPU",
              "model": model_path.name, "precision": precision_name("cpu", "auto"), "load_start": load_start}
    if args.steps_from:
        report["steps"] = json.loads(Path(args.steps_from).read_text())
    else:
        report["steps"] = steps(model_path, args.air_slices, not args.no_compile)
    print(json.dumps(report["steps"], indent=1), flush=True)
    report["cohorts"] = []
    for run in args.cohort_runs.split(","):
        runtime, processes = run.split(":")
        with tempfile.TemporaryDirectory() as work:
            report["cohorts"].append(cohort(model_path, args.synthetic, args.synthetic_slices, Path(work),
                                            int(processes), runtime))
    report["load_end"] = [round(v, 2) for v in os.getloadavg()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cohort.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    write_markdown(report, RESULTS / "cohort.md")
    print((RESULTS / "cohort.md").read_text())


if __name__ == "__main__":
    main()
