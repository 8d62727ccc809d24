"""Encoder throughput on CPU: seconds per slice, GFLOPs per slice and utilisation of measured matmul GFLOPS.

For each backbone at its input size: batch 1 and the best batch, eager fp32 under ``torch.inference_mode``
(the inference path), plus variants (channels-last, bf16 autocast) measured rather than assumed.
Weights are random (timing does not depend on them; official SAM files are not shipped).
Writes bench/results/encoder_throughput.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from SAMedLib.backbones import build_backbone

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = [("litemedsam", 256, (1, 2, 4, 8)), ("sam_vit_b", 512, (1, 2, 4)), ("sam_vit_b", 1024, (1, 2)),
           ("sam_vit_l", 1024, (1,)), ("sam_vit_h", 1024, (1,))]


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def seconds_per_slice(encoder, batch: int, size: int, repeats: int, channels_last=False, bf16=False) -> float:
    x = torch.rand(batch, 3, size, size)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with torch.inference_mode(), autocast:
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
    torch.set_num_threads(torch.get_num_threads())
    peak = matmul_gflops()
    rows = []
    for name, size, batches in CONFIGS[:1] if args.quick else CONFIGS:
        encoder = build_backbone(name, input_size=size, pretrained=False).image_encoder.eval()
        gflops = gflops_per_slice(encoder, size)
        repeats = 3 if gflops < 200 else 1
        timings = {b: seconds_per_slice(encoder, b, size, repeats) for b in batches}
        best_batch = min(timings, key=timings.get)
        row = {"backbone": name, "input_size": size, "gflops_per_slice": round(gflops, 1),
               "s_per_slice_batch1": round(timings[1], 3), "best_batch": best_batch,
               "s_per_slice_best": round(timings[best_batch], 3),
               "utilisation_best": round(gflops / timings[best_batch] / peak, 3)}
        if name == "litemedsam":
            encoder_cl = encoder.to(memory_format=torch.channels_last)
            row["s_per_slice_channels_last"] = round(seconds_per_slice(encoder_cl, best_batch, size, repeats, True), 3)
            row["s_per_slice_bf16_autocast"] = round(seconds_per_slice(encoder, best_batch, size, repeats, bf16=True), 3)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del encoder
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "matmul_gflops_fp32": round(peak, 1),
               "note": "2-core shared x86_64 VM, AVX-512 without native bf16; numbers are medians of few repeats"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "encoder_throughput.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    lines = [f"# Encoder throughput (CPU)\n\nMachine: {machine['note']}; torch {machine['torch']}, "
             f"{machine['threads']} threads; measured fp32 matmul: {machine['matmul_gflops_fp32']} GFLOPS.\n",
             "| backbone | input | GFLOPs/slice | s/slice (batch 1) | best batch | s/slice (best) | utilisation |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['backbone']} | {r['input_size']} | {r['gflops_per_slice']} | {r['s_per_slice_batch1']} | "
              f"{r['best_batch']} | {r['s_per_slice_best']} | {100 * r['utilisation_best']:.0f}% |" for r in rows]
    lite = rows[0]
    if "s_per_slice_channels_last" in lite:
        lines.append(f"\nLiteMedSAM variants at batch {lite['best_batch']}: channels-last "
                     f"{lite['s_per_slice_channels_last']} s/slice, bf16 autocast {lite['s_per_slice_bf16_autocast']} "
                     f"s/slice (fp32 eager {lite['s_per_slice_best']}).")
    (RESULTS / "encoder_throughput.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
