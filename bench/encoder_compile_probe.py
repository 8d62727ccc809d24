"""torch.compile (inductor) of the prepared LiteMedSAM encoder alone, fp32, one 256x256 input: eager vs compiled
timed in one process (eager, compile, compiled, eager again), plus the largest output difference.

Run: ``PYTHONPATH=SAMedSegmenter nice -n 10 python bench/encoder_compile_probe.py`` (results: bench/results/cohort.md).
"""
from __future__ import annotations

import time

import torch

from SAMedLib.acceleration import prepare_encoder
from SAMedLib.backbones import build_backbone


def seconds_per_call(function, images: torch.Tensor, calls: int = 6) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        function(images)  # warm-up (for the compiled encoder: the compile itself was timed before)
        start = time.perf_counter()
        for _ in range(calls):
            output = function(images)
    return (time.perf_counter() - start) / calls, output


def main() -> None:
    backbone = build_backbone("litemedsam")
    encoder = prepare_encoder(backbone.image_encoder.eval())
    images = torch.rand(1, 3, backbone.input_size, backbone.input_size)
    print("threads", torch.get_num_threads(), flush=True)
    eager, eager_output = seconds_per_call(encoder, images)
    print("eager s/call", round(eager, 3), flush=True)
    start = time.perf_counter()
    compiled = torch.compile(encoder)
    with torch.inference_mode():
        compiled(images)
    print("compile + first call s", round(time.perf_counter() - start, 1), flush=True)
    fast, compiled_output = seconds_per_call(compiled, images)
    print("compiled s/call", round(fast, 3), flush=True)
    again, _ = seconds_per_call(encoder, images)
    print("eager again s/call", round(again, 3), flush=True)
    print("max abs difference", (eager_output - compiled_output).abs().max().item())


if __name__ == "__main__":
    main()
