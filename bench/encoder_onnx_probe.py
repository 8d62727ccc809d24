"""ONNX Runtime and OpenVINO vs torch for the prepared LiteMedSAM encoder alone, one 256x256 input, in one process.

Issue 13 allows an ONNX Runtime export path only if it is measured faster here (and as an optional extra,
``pip install samed-slicer[onnx]``). This probe exports the prepared encoder (fp32, dynamic batch axis; the
dynamo exporter first, the TorchScript exporter where that fails) to a temporary directory, runs it with the
CPUExecutionProvider (all graph optimisations, torch's thread count) and times, in one process:
torch eager fp32, torch eager bf16 autocast (SAMedLib's path on CPUs with native bf16), ORT fp32 and, where
installed, OpenVINO (converted from the torch module; bf16 where native, and f32), with the largest output
difference of each against eager fp32. OpenVINO won and is wired into inference as ``samed segment --openvino``
(``SAMedLib.acceleration.use_openvino``); ORT is not.

Run: ``PYTHONPATH=SAMedSegmenter nice -n 10 python bench/encoder_onnx_probe.py [--json PATH]``
(needs ``pip install onnxruntime onnx``; default output bench/results/encoder_onnx_probe.json).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from SAMedLib.acceleration import cpu_has_native_bf16, precision_name, prepare_encoder
from SAMedLib.backbones import build_backbone

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "encoder_onnx_probe.json"


def seconds_per_call(function, images, calls: int) -> tuple[float, object]:
    function(images)  # warm-up (first-call allocations, oneDNN / ORT kernel selection)
    start = time.perf_counter()
    for _ in range(calls):
        output = function(images)
    return (time.perf_counter() - start) / calls, output


def export(encoder: torch.nn.Module, images: torch.Tensor, path: Path) -> tuple[str, str | None]:
    """Export with the dynamo exporter, else the TorchScript one; returns (exporter used, dynamo's error)."""
    try:
        torch.onnx.export(encoder, (images,), str(path), input_names=["images"], output_names=["embeddings"],
                          dynamo=True, dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                          external_data=False)
        return "dynamo", None
    except Exception as exc:  # e.g. onnxscript missing, or an op the dynamo exporter cannot translate
        error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    torch.onnx.export(encoder, (images,), str(path), input_names=["images"], output_names=["embeddings"],
                      dynamo=False, dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                      opset_version=17)
    return "torchscript", error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the result (JSON)")
    parser.add_argument("--calls", type=int, default=6, help="timed calls per variant after one warm-up")
    args = parser.parse_args()
    import onnxruntime as ort

    load_start = os.getloadavg()
    backbone = build_backbone("litemedsam")
    encoder = prepare_encoder(backbone.image_encoder.eval())
    size = backbone.input_size
    torch.manual_seed(0)
    images = torch.rand(1, 3, size, size)
    threads = torch.get_num_threads()
    result = {"probe": "encoder_onnx_probe", "backbone": "litemedsam", "input": [1, 3, size, size],
              "threads": threads, "torch": torch.__version__, "onnxruntime": ort.__version__,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "cpu_has_native_bf16": cpu_has_native_bf16(), "samed_cpu_precision": precision_name("cpu"),
              "calls": args.calls, "loadavg_start": [round(v, 2) for v in load_start]}
    print("threads", threads, flush=True)

    with torch.inference_mode():
        eager, reference = seconds_per_call(encoder, images, args.calls)
    result["eager_fp32_s"] = round(eager, 4)
    print("eager fp32 s/call", round(eager, 3), flush=True)
    # bf16 autocast directly (not SAMedLib.acceleration.autocast, which gives fp32 on CPUs without native bf16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        bf16, bf16_output = seconds_per_call(encoder, images, args.calls)
    result["eager_bf16_autocast_s"] = round(bf16, 4)
    result["bf16_max_abs_diff"] = (bf16_output.float() - reference).abs().max().item()
    print("eager bf16 autocast s/call", round(bf16, 3), flush=True)

    with tempfile.TemporaryDirectory(prefix="samed-onnx-") as folder:
        path = Path(folder) / "litemedsam_encoder.onnx"
        start = time.perf_counter()
        exporter, dynamo_error = export(encoder, images, path)
        result.update(exporter=exporter, dynamo_error=dynamo_error, export_s=round(time.perf_counter() - start, 2),
                      onnx_mb=round(sum(f.stat().st_size for f in Path(folder).iterdir()) / 2**20, 1))
        print("exported with", exporter, "in", result["export_s"], "s", flush=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        start = time.perf_counter()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        result["ort_session_s"] = round(time.perf_counter() - start, 2)
    feed = {"images": images.numpy()}
    ort_s, ort_output = seconds_per_call(lambda x: session.run(None, x)[0], feed, args.calls)
    result["ort_fp32_s"] = round(ort_s, 4)
    result["ort_max_abs_diff"] = float(abs(torch.from_numpy(ort_output) - reference).max())
    print("ORT fp32 s/call", round(ort_s, 3), flush=True)
    try:  # the dynamic batch axis works end to end: batch 2 gives two copies of the batch-1 embedding
        pair = session.run(None, {"images": images.repeat(2, 1, 1, 1).numpy()})[0]
        result["ort_batch2_max_abs_diff"] = float(abs(torch.from_numpy(pair) - reference).max())
    except Exception as exc:
        result["ort_batch2_error"] = f"{exc.__class__.__name__}: {str(exc)[:300]}"
    try:  # OpenVINO, converted from the torch module (no ONNX file), in bf16 where the CPU has it and in f32
        import openvino

        result["openvino"] = openvino.__version__
        with torch.no_grad():
            converted = openvino.convert_model(encoder, example_input=images)
        for hint in (["bf16"] if cpu_has_native_bf16() else []) + ["f32"]:
            compiled = openvino.Core().compile_model(converted, "CPU", {
                "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
            request = compiled.create_infer_request()
            ov_s, ov_output = seconds_per_call(lambda x: request.infer({0: x})[compiled.output(0)].copy(),
                                               images.numpy(), args.calls)
            result[f"openvino_{hint}_s"] = round(ov_s, 4)
            result[f"openvino_{hint}_max_abs_diff"] = float(abs(torch.from_numpy(ov_output) - reference).max())
            result[f"openvino_{hint}_over_eager_bf16"] = round(ov_s / bf16, 3)
            print(f"OpenVINO {hint} s/call", round(ov_s, 3), flush=True)
    except ImportError:
        result["openvino"] = None
    with torch.inference_mode():
        again, _ = seconds_per_call(encoder, images, args.calls)
    result["eager_fp32_again_s"] = round(again, 4)  # drift of machine load during the run
    result["ort_over_eager_fp32"] = round(ort_s / eager, 3)
    result["ort_over_eager_bf16"] = round(ort_s / bf16, 3)
    result["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    line = json.dumps(result)
    print(line, flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    partial = args.json.with_name(args.json.name + ".partial")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(partial, args.json)  # never a half-written result


if __name__ == "__main__":
    main()
