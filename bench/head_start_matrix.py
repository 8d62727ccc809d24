"""Head start, symmetric against probe, on every case and precision measured: the switch decision of issue 10.

`samed train --head-start probe` (SAMedLib.probe_start) was measured piecemeal: bf16 on forward and the phase
shifts (stop 21, ``transfer_probe_start.json``), fp32 on the same seeds (stop 22,
``transfer_selection_stop22.json``). This script runs what was missing - the OpenVINO forward runs and the
reverse and sparse cases (matrix seeds 1234 / 7 / 42; sparse-5 / sparse-20 seed 1234, as the matrix), with
``transfer_benchmark``'s training and scoring - and puts every number side by side with the symmetric start's (``transfer_variance.json``: the nine forward
models; ``transfer.json``: reverse and sparse-10).

The switch rule was written down before the first of these runs finished (``SWITCH_RULE``). Stop 23 ran on an AMD
EPYC without native bf16, where the CPU default (job precision ``default``: no option) and OpenVINO compute in fp32;
each run records its machine and encoder precision, and the table labels rows by what actually ran.

Usage: ``python bench/head_start_matrix.py --run forward:1234:ov reverse:7:default ...`` (trains into
out/head_start, scores, appends to ``bench/results/head_start_runs.json``; runs already there are skipped), then
``python bench/head_start_matrix.py`` writes ``bench/results/head_start.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import numpy as np

import transfer_benchmark as tb

RUNS = tb.RESULTS / "head_start_runs.json"
PRECISION_OPTIONS = {"default": [], "fp32": ["--precision", "fp32"], "ov": ["--openvino"]}  # job codes
# Earlier sources ran on the 2-core Xeon (AVX512-BF16 + AMX); stop 23's on a 2-core AMD EPYC without native bf16.
XEON = {"bf16": "bf16 (Xeon)", "fp32": "fp32 (Xeon)", "OpenVINO": "OpenVINO bf16 (Xeon)"}
LABEL_ORDER = (*XEON.values(), "fp32 (EPYC)", "OpenVINO fp32 (EPYC)")
PHASE_TESTS = ("forward", "phase-aorta+150", "phase-liver-spleen-60")
OTHER_TESTS = ("reverse", "sparse-10", "sparse-5", "sparse-20")  # the CPU default only; sparse-5/20: seed 1234
SEEDS = (1234, 7, 42)
SWITCH_RULE = (
    "Switch the default to `probe` if (a) over the nine forward runs (3 seeds x bf16 / fp32 / OpenVINO) its worst "
    "is >= 0.80 and its mean >= the symmetric start's 0.823 with a smaller std; (b) reverse (bf16, 3 seeds) mean "
    ">= 0.548 (the symmetric 0.578 - 0.03) and worst >= 0.455 (the symmetric worst); (c) sparse-10 (bf16, 3 seeds) "
    "mean >= 0.772 (0.802 - 0.03).")


def run(jobs: list[str], out: Path) -> None:
    """Train and score each ``case:seed:precision`` job not yet in RUNS (post-processing on and off)."""
    results = json.loads(RUNS.read_text()) if RUNS.exists() else {}
    classes = tb.parse_class_list(tb.CLASSES)
    scans = {name: tb.load_scan(name) for name in tb.SCANS}
    out.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        case, seed, precision = job.split(":")
        if job in results:
            continue
        model, seconds = tb.train(out, case, int(seed), ["--head-start", "probe", *PRECISION_OPTIONS[precision]],
                                  reuse=True)
        # What the precision option meant here: without native bf16 the CPU default is fp32, and OpenVINO's too.
        entry: dict = {"train_seconds": round(seconds, 1) if seconds else None, "machine": machine_line(),
                       "encoder_precision": tb.load_model(model).card.training.get("encoder_precision")}
        for test in PHASE_TESTS if case == "forward" else (case,):
            _, _, scan, shifts = tb.CASES[test]
            image, reference = scans[scan]
            if shifts:
                image = tb.phase_shift(image, reference, shifts)
            for post in ("on", "off"):
                scores, infer_seconds = tb.segment_and_score(model, image, reference, classes, post)
                dice = {o: round(scores["classes"][o]["dice"], 4) for o in tb.ORGANS}
                entry[f"{test}:{post}"] = {"mean": round(float(np.mean(list(dice.values()))), 4), "dice": dice,
                                           "fp_outside": {o: scores["classes"][o]["fp_outside"] for o in tb.ORGANS},
                                           "seconds": round(infer_seconds, 1)}
            print(job, test, entry[f"{test}:on"], flush=True)
        results[job] = entry
        RUNS.write_text(json.dumps(results, indent=1))


def machine_line() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""
    return f"{cpu}, {os.cpu_count()} cores, native bf16: {tb.cpu_has_native_bf16()}"


def run_label(job_precision: str, entry: dict) -> str:
    """The precision a stop-23 run really had, and its CPU (earlier sources are the Xeon's)."""
    machine = entry["machine"]
    cpu = next((name for name in ("EPYC", "Xeon") if name in machine), machine.split(",")[0] or "Xeon")
    return f"{'OpenVINO ' if job_precision == 'ov' else ''}{entry['encoder_precision']} ({cpu})"


def collect() -> dict[tuple[str, str, str], dict]:
    """(start, test, precision) -> {seed: (mean Dice, per-organ Dice)} from every results file that has them."""
    table: dict = {}

    def put(start, test, precision, seed, mean, dice):
        table.setdefault((start, test, precision), {})[seed] = (mean, dice)

    variance = json.loads((tb.RESULTS / "transfer_variance.json").read_text())["members"]
    for name, tests in variance.items():
        precision, seed = name.split(", seed ")
        for test in PHASE_TESTS:
            put("symmetric", test, XEON[precision], int(seed), tests[test]["mean_dice"], tests[test]["dice"])
    matrix = json.loads((tb.RESULTS / "transfer.json").read_text())["cases"]
    for test in OTHER_TESTS:
        for r in matrix[test]["runs"]:
            put("symmetric", test, XEON["bf16"], r["seed"], r["on"]["mean_dice"],
                {o: round(r["on"]["scores"]["classes"][o]["dice"], 4) for o in tb.ORGANS})
    probe_bf16 = json.loads((tb.RESULTS / "transfer_probe_start.json").read_text())["cases"]
    for test in PHASE_TESTS:
        for r in probe_bf16[test]["runs"]:
            put("probe", test, XEON["bf16"], r["seed"], r["on"]["mean_dice"],
                {o: round(r["on"]["scores"]["classes"][o]["dice"], 4) for o in tb.ORGANS})
    stop22 = json.loads((tb.RESULTS / "transfer_selection_stop22.json").read_text())
    for name, r in stop22["probe_start_fp32_matrix_seeds"]["runs"].items():
        seed = int(name.split("_")[0].removeprefix("forward"))
        for test in PHASE_TESTS:
            put("probe", test, XEON["fp32"], seed, r[test]["mean"], {o: r[test][o] for o in tb.ORGANS})
    for job, entry in (json.loads(RUNS.read_text()) if RUNS.exists() else {}).items():
        case, seed, precision = job.split(":")
        for test in PHASE_TESTS if case == "forward" else (case,):
            put("probe", test, run_label(precision, entry), int(seed), entry[f"{test}:on"]["mean"],
                entry[f"{test}:on"]["dice"])
    return table


def render(table: dict) -> str:
    lines = ["# Head start: symmetric (the default until stop 22) against probe (the default since stop 23)", "",
             "Generated by `bench/head_start_matrix.py` (sources in its docstring); mean Dice over spleen, liver, "
             "stomach, aorta with the card's post-processing, training seeds 1234 / 7 / 42. Two 2-core VMs, no GPU, "
             "torch 2.14.1: the Xeon (AVX512-BF16 + AMX; every earlier source, where the CPU default is bf16) and "
             "an AMD EPYC without AVX512 or native bf16 (stop 23's runs: there the CPU default and OpenVINO both "
             "compute in fp32). A row is one precision on one machine.", "", f"Switch rule, written before the first stop-23 run finished: {SWITCH_RULE}",
             "", "| test | precision | symmetric: per seed | symmetric mean ± std (worst) | probe: per seed | "
             "probe mean ± std (worst) |", "|---|---|---|---|---|---|"]
    tests = (*PHASE_TESTS, *OTHER_TESTS)
    for test in tests:
        labels = {key[2] for key in table if key[1] == test}
        precisions = [p for p in (*LABEL_ORDER, *sorted(labels - set(LABEL_ORDER))) if (("symmetric", test, p) in table
                                                                or ("probe", test, p) in table)]
        pooled = {"symmetric": [], "probe": []}
        for precision in precisions:
            cells = []
            for start in ("symmetric", "probe"):
                runs = table.get((start, test, precision), {})
                means = [runs[s][0] for s in SEEDS if s in runs]
                pooled[start] += means
                cells.append(" / ".join(f"{m:.3f}" for m in means) or "–")
                cells.append(f"{np.mean(means):.3f} ± {np.std(means):.3f} ({min(means):.3f})" if means else "–")
            lines.append(f"| {test} | {precision} | " + " | ".join(cells) + " |")
        if len(precisions) > 1:
            cells = [f"**{np.mean(v):.3f} ± {np.std(v):.3f} ({min(v):.3f})**, {len(v)} runs" if v else "–"
                     for v in pooled.values()]
            lines.append(f"| {test} | all | | {cells[0]} | | {cells[1]} |")
    lines += ["", "Per organ (mean over the runs of each row):", "",
              "| test | precision | start | " + " | ".join(tb.ORGANS) + " |", "|---|---|---|" + "---|" * len(tb.ORGANS)]
    for (start, test, precision), runs in sorted(table.items(), key=lambda kv: (tests.index(kv[0][1]), kv[0][2],
                                                                                 kv[0][0])):
        organs = [np.mean([dice[o] for _, dice in runs.values()]) for o in tb.ORGANS]
        lines.append(f"| {test} | {precision} | {start} | " + " | ".join(f"{v:.3f}" for v in organs) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="*", default=[], help="jobs case:seed:precision (precision default|fp32|ov)")
    parser.add_argument("--out", type=Path, default=tb.REPO / "out" / "head_start")
    args = parser.parse_args()
    if args.run:
        run(args.run, args.out)
    text = render(collect())
    (tb.RESULTS / "head_start.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
