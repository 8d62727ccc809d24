"""Running a frozen image encoder fast: BatchNorm folded into convolutions, channels-last, reduced precision.

Measured on the 2-core benchmark CPU (``bench/results/encoder_throughput.md``): the LiteMedSAM encoder is
bound by its convolutions, GELU and BatchNorm rather than by matmuls, so folding BatchNorm and running
convolutions channels-last pays off in fp32, and bf16 autocast (native on CPUs with AVX512-BF16 / AMX)
roughly halves the time again. Precision ``auto`` uses the fast type a device supports natively (fp16 on
CUDA, bf16 on such CPUs); ``fp32`` turns reduced precision off everywhere. ``compile_encoder`` adds
torch.compile (inductor) for long cohort runs, with the eager encoder as the fallback where compiling fails.
``use_openvino`` runs the encoder and head through OpenVINO's CPU runtime instead (optional: ``pip install
openvino``), for inference only.
"""
from __future__ import annotations

import functools
import logging
import warnings
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["PRECISIONS", "autocast", "cpu_has_native_bf16", "prepare_encoder", "precision_name", "compile_encoder",
           "use_openvino", "openvino_encoder", "OpenVINOModule"]

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "fp32")


def cpu_has_native_bf16() -> bool:
    """True where bf16 matmuls/convolutions are faster than fp32 (AVX512-BF16 or AMX); elsewhere they are slower."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def precision_name(device: str, precision: str = "auto") -> str:
    """The compute type ``autocast`` gives on ``device``: ``fp16``, ``bf16`` or ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision '{precision}': expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return "fp32"
    if device.startswith("cuda"):
        return "fp16"
    if device == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast(device: str, precision: str = "auto"):
    """Autocast context for forward passes (inference and frozen-encoder embedding)."""
    name = precision_name(device, precision)
    if name == "fp16":
        return torch.autocast("cuda", dtype=torch.float16)
    if name == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])


def prepare_encoder(encoder: nn.Module) -> nn.Module:
    """Fold every Conv2d+BatchNorm2d pair into one convolution and switch to channels-last, in place.

    Only valid while the encoder's BatchNorm is frozen, which it always is (see ``SAMedModel.train``):
    outputs are unchanged to float rounding (max difference ~4e-6 measured on LiteMedSAM). Idempotent.
    """
    if getattr(encoder, "_samed_prepared", False):
        return encoder
    _fold_batchnorm(encoder)
    encoder.to(memory_format=torch.channels_last)
    encoder.register_forward_pre_hook(_channels_last_input)
    encoder._samed_prepared = True
    return encoder


def _fold_batchnorm(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential):
            parts = list(child)
            if len(parts) == 2 and isinstance(parts[0], nn.Conv2d) and isinstance(parts[1], nn.BatchNorm2d):
                fused = fuse_conv_bn_eval(parts[0].eval(), parts[1].eval())
                fused.requires_grad_(False)  # base weights stay frozen in every training mode
                setattr(module, name, fused)
                continue
        _fold_batchnorm(child)


class _CompiledOrEager(nn.Module):
    """The compiled encoder while compiling works; the eager one from the first failure on (no C++ compiler, e.g.
    Slicer on Windows, or an operation inductor cannot handle). torch.compile only compiles at the first call."""

    _samed_prepared = True  # wraps a prepared encoder: prepare_encoder leaves it alone

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.eager = encoder
        self.compiled = torch.compile(encoder, dynamic=False)
        self.failed = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.failed:
            try:
                return self.compiled(images)
            except Exception as exc:  # any compiler failure: the eager encoder gives the same result
                from .errors import one_line

                log.warning("torch.compile failed (%s): running the encoder uncompiled", one_line(exc))
                self.failed = True
        return self.eager(images)


def compile_encoder(encoder: nn.Module) -> nn.Module:
    """Prepare ``encoder`` and wrap it in torch.compile (inductor), falling back to eager if compiling fails.

    Worth it for long runs only: compiling takes minutes on a small CPU (``bench/results/cohort.md``).
    """
    prepare_encoder(encoder)
    if not hasattr(torch, "compile"):
        return encoder
    return _CompiledOrEager(encoder)


class OpenVINOModule(nn.Module):
    """A frozen module converted to OpenVINO and compiled for the CPU; one tensor in, one tensor out (fp32).

    The converted graph has its example's batch size baked into its reshapes, so inputs go through one at a
    time (batching gains nothing on a small CPU either). The torch module is kept for other devices.
    """

    _samed_prepared = True  # wraps a prepared encoder: prepare_encoder leaves it alone

    def __init__(self, module: nn.Module, example: torch.Tensor, precision: str = "auto"):
        super().__init__()
        try:
            import openvino
        except ImportError as exc:
            from .errors import SAMedError

            raise SAMedError("OpenVINO is not installed: pip install openvino (or leave the OpenVINO option off)") from exc
        self.eager = module
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shapes it freezes: that is the point here
            converted = openvino.convert_model(module, example_input=example)
        # bf16 only where the CPU computes it natively, as for torch (precision_name); f32 elsewhere.
        self.precision = "bf16" if precision_name("cpu", precision) == "bf16" else "f32"
        compiled = _openvino_core().compile_model(converted, "CPU", {
            "INFERENCE_PRECISION_HINT": self.precision, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY"})
        self._request = compiled.create_infer_request()
        self._output = compiled.output(0)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.device.type != "cpu":
            return self.eager.to(inputs.device)(inputs)
        outputs = []
        for item in inputs.detach().float():
            result = self._request.infer({0: item[None].contiguous().numpy()})[self._output]
            outputs.append(torch.from_numpy(result.copy()))
        return torch.cat(outputs)


@functools.cache
def _openvino_core():
    """One OpenVINO Core for the whole process, never released.

    With a Core per model, the CPU plugin is unloaded once the last model is freed, and from then on any signal
    that reaches a Python handler (Ctrl-C, SIGTERM) kills the process with a segmentation fault (OpenVINO
    2026.4 on Linux, reproduced).
    """
    import openvino

    return openvino.Core()


def use_openvino(model: nn.Module, precision: str = "auto") -> nn.Module:
    """Convert a frozen ``SAMedModel``'s encoder and head to OpenVINO, in place (a few seconds per model).

    Measured on the benchmark CPU: the encoder 2.8x faster than torch's bf16 path and 2.0x than its fp32 path
    (``bench/results/encoder_onnx_probe.json``), whole slices with refinement 1.7x (``bench/results/cohort.md``),
    the same embeddings to bf16 rounding. Inference only: the converted parts cannot be trained.
    """
    if isinstance(model.image_encoder, OpenVINOModule):
        return model
    model.to("cpu").eval()
    model.image_encoder = openvino_encoder(model.image_encoder, model.input_size, precision)
    with torch.no_grad():
        embedding = model.image_encoder(torch.zeros(1, 3, model.input_size, model.input_size))
    model.head = OpenVINOModule(model.head, torch.zeros_like(embedding), precision)
    return model


def openvino_encoder(encoder: nn.Module, input_size: int, precision: str = "auto") -> OpenVINOModule:
    """A frozen image encoder (prepared here) converted to OpenVINO for ``input_size`` x ``input_size`` images."""
    if isinstance(encoder, OpenVINOModule):
        return encoder
    prepared = prepare_encoder(encoder.to("cpu").eval())
    return OpenVINOModule(prepared, torch.zeros(1, 3, input_size, input_size), precision)
