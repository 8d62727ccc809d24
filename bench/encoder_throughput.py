"""Encoder throughput on CPU: seconds per slice, GFLOPs per slice and utilisation of measured matmul GFLOPS.

For each backbone at its input size, three ways of running the encoder, all under ``torch.inference_mode``:
- ``eager fp32``: the module as built;
- ``prepared fp32``: ``SAMedLib.acceleration.prepare_encoder`` (BatchNorm folded, channels-last);
- ``prepared + autocast``: the product's inference path (``precision=auto``: bf16 on CPUs with native bf16).
Batch 1 and larger batches where affordable. The machine's fp32 and bf16 matmul GFLOPS are measured in the
same run; utilisation = model GFLOPs / time / the matmul peak of the precision used.
Weights are random (timing does not depend on them; official SAM files are not shipped).
Writes bench/results/encoder_throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from SAMedLib.acceleration import autocast, precision_name, prepare_encoder
from SAMedLib.backbones import build_backbone

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("litemedsam", 256, (1, 2, 8)), ("sam_vit_b", 512, (1, 2)), ("sam_vit_b", 1024, (1,)),
           ("sam_vit_l", 1024, (1,)), ("sam_vit_h", 1024, (1,))]


def matmul_gflops(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def seconds_per_slice(encoder, batch: int, size: int, repeats: int, reduced: bool) -> float:
    x = torch.rand(batch, 3, size, size)
    with torch.inference_mode(), autocast("cpu", "auto" if reduced else "fp32"):
        encoder(x)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            encoder(x)
    return (time.perf_counter() - start) / repeats / batch


def gflops_per_slice(encoder, size: int) -> float:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        encoder(torch.rand(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="litemedsam only")
    args = parser.parse_args()
    reduced_name = precision_name("cpu", "auto")
    peaks = {"fp32": matmul_gflops(torch.float32)}
    if reduced_name == "bf16":
        peaks["bf16"] = matmul_gflops(torch.bfloat16)
    rows = []
    for name, size, batches in CONFIGS[:1] if args.quick else CONFIGS:
        eager = build_backbone(name, input_size=size, pretrained=False).image_encoder.eval()
        gflops = gflops_per_slice(eager, size)
        repeats = 3 if gflops < 200 else 1
        prepared = prepare_encoder(copy.deepcopy(eager))
        variants = {"eager fp32": (eager, False, "fp32"), "prepared fp32": (prepared, False, "fp32"),
                    f"prepared + autocast ({reduced_name})": (prepared, True, reduced_name)}
        if name != "litemedsam":  # SAM's ViT has no BatchNorm to fold: "prepared fp32" would time eager again
            del variants["prepared fp32"]
        for variant, (encoder, reduced, dtype) in variants.items():
            timings = {b: seconds_per_slice(encoder, b, size, repeats, reduced) for b in batches}
            best = min(timings, key=timings.get)
            row = {"backbone": name, "input_size": size, "variant": variant, "gflops_per_slice": round(gflops, 1),
                   "s_per_slice": {str(b): round(t, 3) for b, t in timings.items()}, "best_batch": best,
                   "s_per_slice_best": round(timings[best], 3), "achieved_gflops": round(gflops / timings[best], 1),
                   "utilisation_of_fp32_matmul": round(gflops / timings[best] / peaks["fp32"], 3),
                   "utilisation_of_own_precision_matmul": round(gflops / timings[best] / peaks[dtype], 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del eager, prepared
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "threads": torch.get_num_threads(), "torch": torch.__version__,
               "matmul_gflops": {k: round(v, 1) for k, v in peaks.items()},
               "note": "2-core x86_64 VM (AVX-512, AVX512-BF16 and AMX), no GPU; idle while measuring"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "encoder_throughput.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    (RESULTS / "encoder_throughput.md").write_text(render(machine, rows))
    print(render(machine, rows))


def render(machine: dict, rows: list[dict]) -> str:
    peaks = ", ".join(f"{k} {v} GFLOPS" for k, v in machine["matmul_gflops"].items())
    lines = [f"# Encoder throughput (CPU)\n\nMachine: {machine['note']}; torch {machine['torch']}, "
             f"{machine['threads']} threads; matmul measured in the same run: {peaks}. "
             "Written by `bench/encoder_throughput.py`.\n",
             "| backbone | input | GFLOPs/slice | variant | s/slice batch 1 | best batch | s/slice best | "
             "GFLOPS achieved | % of fp32 matmul | % of same-precision matmul |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['input_size']} | {r['gflops_per_slice']} | {r['variant']} | "
                     f"{r['s_per_slice']['1']} | {r['best_batch']} | {r['s_per_slice_best']} | {r['achieved_gflops']} | "
                     f"{100 * r['utilisation_of_fp32_matmul']:.0f}% | {100 * r['utilisation_of_own_precision_matmul']:.0f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
