"""The fast encoder path: BatchNorm folding and channels-last keep outputs; reduced precision is chosen sensibly."""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from SAMedLib.acceleration import (OpenVINOModule, autocast, cpu_has_native_bf16, precision_name, prepare_encoder,
                                   use_openvino)
from SAMedLib.model import build_model


def test_prepared_encoder_gives_the_same_embeddings_without_batchnorm(lite, ct_slice):
    image, _ = ct_slice
    encoder = copy.deepcopy(lite.image_encoder)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    assert batchnorms > 20  # TinyViT: every Conv2d_BN
    with torch.no_grad():
        reference = encoder(image)
        prepare_encoder(encoder)
        prepare_encoder(encoder)  # idempotent: one hook, folded once
        fast = encoder(image)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
    assert len(encoder._forward_pre_hooks) == 1
    assert (fast - reference).abs().max() < 1e-4 * reference.abs().max()


def test_prepared_frozen_encoder_has_nothing_trainable(lite):
    model = build_model(copy.deepcopy(lite), "linear", 2, "frozen")
    prepare_encoder(model.image_encoder)
    assert not any(p.requires_grad for p in model.image_encoder.parameters())


def test_prepared_lora_encoder_still_trains_only_lora(lite, ct_slice):
    image, _ = ct_slice
    model = build_model(copy.deepcopy(lite), "linear", 2, "lora")
    prepare_encoder(model.image_encoder)
    trainable = {n for n, p in model.image_encoder.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in f".{n}" for n in trainable)
    model.train()
    model(image).sum().backward()
    assert all(p.grad is not None for n, p in model.image_encoder.named_parameters() if n in trainable)


def test_precision_choice():
    assert precision_name("cuda", "auto") == "fp16"
    assert precision_name("cuda:1", "fp32") == "fp32"
    assert precision_name("mps", "auto") == "fp32"
    assert precision_name("cpu", "auto") == ("bf16" if cpu_has_native_bf16() else "fp32")
    with pytest.raises(ValueError, match="unknown precision 'half'"):
        precision_name("cpu", "half")


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16: auto runs fp32")
def test_bf16_embeddings_stay_close_to_fp32(lite, ct_slice):
    image, _ = ct_slice
    encoder = prepare_encoder(copy.deepcopy(lite.image_encoder))
    with torch.inference_mode():
        exact = encoder(image)
        with autocast("cpu"):
            fast = encoder(image).float()
    relative = ((fast - exact).norm() / exact.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(fast.flatten(), exact.flatten(), dim=0).item()
    assert relative < 0.08 and cosine > 0.995, (relative, cosine)


# --------------------------------------------------------------------------- OpenVINO (optional runtime)

openvino_installed = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                        reason="OpenVINO not installed (pip install openvino; part of [test])")


@openvino_installed
@pytest.mark.parametrize("head", ["samed", "cnn"])
def test_openvino_encoder_and_head_give_torch_outputs(lite, ct_slice, head):
    image, _ = ct_slice
    model = build_model(copy.deepcopy(lite), head, 2, "frozen").eval()
    with torch.inference_mode():
        embeddings = prepare_encoder(model.image_encoder)(image)
        logits = model.head(embeddings)
    use_openvino(model, "fp32")
    assert isinstance(model.image_encoder, OpenVINOModule) and isinstance(model.head, OpenVINOModule)
    assert use_openvino(model, "fp32") is model  # converting again is a no-op
    with torch.inference_mode():
        fast_embeddings = model.image_encoder(torch.cat([image, image]))  # a batch goes through image by image
        fast_logits = model(image)
    assert fast_embeddings.shape == (2,) + embeddings.shape[1:]
    assert (fast_embeddings - embeddings.repeat(2, 1, 1, 1)).abs().max() < 1e-4 * embeddings.abs().max()
    assert (fast_logits - logits).abs().max() < 1e-3 * logits.abs().max()


@openvino_installed
@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16: auto runs fp32")
def test_openvino_bf16_embeddings_stay_close_to_fp32(lite, ct_slice):
    image, _ = ct_slice
    model = build_model(copy.deepcopy(lite), "linear", 2, "frozen").eval()
    with torch.inference_mode():
        exact = prepare_encoder(model.image_encoder)(image)
        fast = use_openvino(model).image_encoder(image)
    assert model.image_encoder.precision == "bf16"
    relative = ((fast - exact).norm() / exact.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(fast.flatten(), exact.flatten(), dim=0).item()
    assert relative < 0.08 and cosine > 0.995, (relative, cosine)


def test_openvino_missing_is_a_clear_error(lite, monkeypatch):
    import sys

    from SAMedLib.errors import SAMedError

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    model = build_model(copy.deepcopy(lite), "linear", 2, "frozen")
    with pytest.raises(SAMedError, match="pip install openvino"):
        use_openvino(model)


@openvino_installed
def test_signals_still_reach_python_after_an_openvino_model_is_freed(tmp_path):
    """With a Core per model, freeing the last one unloaded OpenVINO's CPU plugin and the next Ctrl-C/SIGTERM killed
    the process with a segmentation fault (exit 139; a stop would never be handled). Run apart: it would kill pytest."""
    script = tmp_path / "freed.py"
    script.write_text(textwrap.dedent("""
        import gc, os, signal, time, torch
        from SAMedLib.acceleration import use_openvino
        from SAMedLib.backbones import build_backbone
        from SAMedLib.model import build_model
        model = use_openvino(build_model(build_backbone("litemedsam"), "linear", 2, "frozen"))
        with torch.inference_mode():
            model(torch.zeros(1, 3, 256, 256))
        del model
        gc.collect()
        handled = []
        signal.signal(signal.SIGINT, lambda *args: handled.append(True))
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        print("handled" if handled else "lost")
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "handled", (result.returncode, result.stderr[-500:])
