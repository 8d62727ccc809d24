"""Self-describing safetensors checkpoints, `samed info`, refusal of mismatches and pickles, SAMed import (issue 2).

Round trips use the real LiteMedSAM base (a card naming random base weights cannot be rebuilt, by design).
The SAMed-layout import uses a small random ViT-B-shaped base (``encoder_config``) and compares against
an independent re-implementation of SAMed's network (its ``_LoRA_qkv`` and segment_anything's decoder).
"""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import SAMedLib.checkpoint as checkpoint_module
from SAMedLib import cli
from SAMedLib.backbones import BackboneError, build_backbone, file_sha256
from SAMedLib.checkpoint import (METADATA_KEY, CheckpointError, import_samed_checkpoint, load_model, read_model_card,
                                 save_checkpoint, save_tensors)
from SAMedLib.classes import parse_class_list
from SAMedLib.lora import lora_layers, merge_lora
from SAMedLib.model import build_model, trainable_state_dict
from SAMedLib.model_card import ModelCard, Preprocessing

CLASSES = parse_class_list("1:spleen,5:liver,6:stomach")
SMALL_VIT_B = dict(embed_dim=96, depth=2, num_heads=2, global_attn_indexes=(1,))
SMALL_INPUT = 128
MERGE_ATOL, MERGE_RTOL = 1e-4, 1e-3  # as in test_models.py


@pytest.fixture(scope="module")
def image():
    """A smooth synthetic slice (1,3,256,256) in [0,1]: a bright disc on a darker body."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 256), indexing="ij")
    body = ((xx / 0.8) ** 2 + (yy / 0.6) ** 2 < 1).float() * 0.4
    organ = ((xx - 0.2) ** 2 + (yy + 0.1) ** 2 < 0.08).float() * 0.5
    return (body + organ).expand(1, 3, 256, 256).contiguous()


@pytest.fixture
def fast_base(lite, monkeypatch):
    """load_model() rebuilds LiteMedSAM from a cached copy (same weights, same SHA-256) to save seconds."""
    real = checkpoint_module.build_backbone

    def cached(name, *args, **kwargs):
        return copy.deepcopy(lite) if name == "litemedsam" else real(name, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "build_backbone", cached)


def _card(backbone, head: str, mode: str, classes=CLASSES, **extra) -> ModelCard:
    return ModelCard(base_name=backbone.name, base_sha256=backbone.weights_sha256, input_size=backbone.input_size,
                     head=head, mode=mode, classes=list(classes), lora_rank=4 if mode == "lora" else None,
                     lora_alpha=4.0 if mode == "lora" else None,
                     preprocessing=Preprocessing(input_size=backbone.input_size), **extra)


def _trained_like(model, seed: int = 0) -> None:
    """Perturb everything a checkpoint stores, so that loading the wrong values cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model.image_encoder):
            layer.linear.lora_B.copy_(0.05 * torch.randn(layer.linear.lora_B.shape, generator=generator))
        for param in model.head.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))


def _lite_model(lite, head: str, mode: str, num_classes: int = len(CLASSES)):
    model = build_model(copy.deepcopy(lite), head, num_classes, mode, 4 if mode == "lora" else None)
    _trained_like(model)
    return model.eval()


# --------------------------------------------------------------------------- round trips


def test_round_trip_lora_samed_is_bit_exact(lite, image, tmp_path):
    model = _lite_model(lite, "samed", "lora")
    with torch.no_grad():
        expected = model(image)
    path = save_checkpoint(model, _card(lite, "samed", "lora"), tmp_path / "lora_samed.safetensors")

    stored = load_file(str(path))
    assert set(stored) == set(trainable_state_dict(model))
    assert all(k.startswith("head.") or ".lora_" in k for k in stored)  # no base weights in the file
    assert not list(tmp_path.glob("*.tmp"))

    loaded = load_model(path, merge=False)  # real rebuild from the packaged weights
    assert not loaded.model.training and loaded.card.head == "samed" and loaded.card.lora_rank == 4
    assert not any(layer.linear.merged for layer in lora_layers(loaded.model.image_encoder))
    with torch.no_grad():
        assert torch.equal(loaded.model(image), expected)
        merge_lora(loaded.model)  # what load_model(merge=True) does
        assert all(layer.linear.merged for layer in lora_layers(loaded.model.image_encoder))
        merged = loaded.model(image)
    torch.testing.assert_close(merged, expected, atol=MERGE_ATOL, rtol=MERGE_RTOL)
    assert merged.argmax(1).eq(expected.argmax(1)).float().mean() > 0.999


def test_round_trip_frozen_cnn_is_bit_exact(lite, image, tmp_path):
    model = _lite_model(lite, "cnn", "frozen")
    with torch.no_grad():
        embedding = model.image_encoder(image)
        expected = model.head(embedding)
    path = save_checkpoint(model, _card(lite, "cnn", "frozen"), tmp_path / "frozen_cnn.safetensors")
    assert not any(k.startswith("image_encoder.") for k in load_file(str(path)))
    loaded = load_model(path)  # merge=True is a no-op without LoRA
    with torch.no_grad():
        assert torch.equal(loaded.model(image), expected)
    # A fresh (untrained) head gives something else: the file really carried the head.
    fresh = build_model(copy.deepcopy(lite), "cnn", len(CLASSES), "frozen", None).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh.head(embedding), expected)


def test_samed_info_prints_the_model_card(lite, tmp_path, capsys):
    card = _card(lite, "linear", "frozen", training={"iterations": 7, "note": "round trip"})
    path = save_checkpoint(_lite_model(lite, "linear", "frozen"), card, tmp_path / "m.safetensors")
    assert cli.main(["info", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(card.to_json())
    assert printed["base_sha256"] == lite.weights_sha256 and printed["format_version"] == 1
    assert [c["name"] for c in printed["classes"]] == ["spleen", "liver", "stomach"]
    assert printed["classes"][1]["value"] == 5 and printed["classes"][1]["snomed_code"] == "10200004"
    assert printed["preprocessing"]["window"] == [-125.0, 275.0]
    assert printed["training"] == {"iterations": 7, "note": "round trip"}
    assert read_model_card(path) == card

    assert cli.main(["info", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("samed: error:") and "missing.safetensors" in err[0]


# --------------------------------------------------------------------------- refusals


def _resave(path: Path, target: Path, tensors=None, **card_changes) -> Path:
    """Re-save a checkpoint with edited tensors and/or card fields (the card lives in the file's metadata)."""
    card = read_model_card(path)
    for key, value in card_changes.items():
        setattr(card, key, value)
    return save_tensors(load_file(str(path)) if tensors is None else tensors, card, target)


@pytest.fixture
def good_checkpoint(lite, tmp_path):
    return save_checkpoint(_lite_model(lite, "linear", "lora"), _card(lite, "linear", "lora"),
                           tmp_path / "good.safetensors")


def test_mismatched_base_sha_is_rejected(good_checkpoint, tmp_path, fast_base):
    bad = _resave(good_checkpoint, tmp_path / "other_base.safetensors", base_sha256="ab" * 32)
    with pytest.raises(CheckpointError, match="SHA-256") as info:
        load_model(bad)
    assert "abababab" in str(info.value) and "litemedsam" in str(info.value)
    load_model(good_checkpoint)  # the unedited file loads


def test_wrong_class_count_is_rejected(good_checkpoint, tmp_path, fast_base):
    four = parse_class_list("1:spleen,5:liver,6:stomach,52:aorta")
    bad = _resave(good_checkpoint, tmp_path / "four.safetensors", classes=four)  # tensors are for 3 classes
    with pytest.raises(CheckpointError, match="shape") as info:
        load_model(bad)
    assert "head.classifier" in str(info.value) and "the model needs (5" in str(info.value)


def test_extra_and_missing_tensors_are_rejected(good_checkpoint, tmp_path, fast_base):
    tensors = load_file(str(good_checkpoint))
    extra = _resave(good_checkpoint, tmp_path / "extra.safetensors", {**tensors, "head.sneaky": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="1 unexpected") as info:
        load_model(extra)
    assert "head.sneaky" in str(info.value)

    dropped = sorted(k for k in tensors if "lora_B" in k)[0]
    missing = _resave(good_checkpoint, tmp_path / "missing.safetensors",
                      {k: v for k, v in tensors.items() if k != dropped})
    with pytest.raises(CheckpointError, match="1 missing") as info:
        load_model(missing)
    assert dropped in str(info.value)

    # LoRA tensors in a checkpoint whose card says "frozen" (no LoRA): unexpected.
    frozen = _resave(good_checkpoint, tmp_path / "frozen.safetensors", mode="frozen", lora_rank=None, lora_alpha=None)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(frozen)

    wrong_shape = dict(tensors)
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    wrong_shape[key] = torch.zeros(wrong_shape[key].shape[0] + 2, wrong_shape[key].shape[1])
    reshaped = _resave(good_checkpoint, tmp_path / "reshaped.safetensors", wrong_shape)
    with pytest.raises(CheckpointError, match="shape") as info:
        load_model(reshaped)
    assert key in str(info.value)


def test_unreadable_files_are_rejected(tmp_path, lite):
    with pytest.raises(CheckpointError, match="not found"):
        read_model_card(tmp_path / "nope.safetensors")

    pickled = tmp_path / "pickled.safetensors"
    torch.save({"head.classifier.weight": torch.zeros(2)}, pickled)  # a pickle, named like safetensors
    with pytest.raises(CheckpointError, match="is not a SAMed checkpoint"):
        load_model(pickled)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 definitely not safetensors")
    with pytest.raises(CheckpointError, match="is not a SAMed checkpoint"):
        read_model_card(garbage)

    no_card = tmp_path / "no_card.safetensors"
    save_file({"head.classifier.weight": torch.zeros(2)}, str(no_card))
    with pytest.raises(CheckpointError, match="no SAMed model card"):
        load_model(no_card)
    bad_json = tmp_path / "bad_json.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad_json), metadata={METADATA_KEY: "{not json"})
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_model_card(bad_json)
    future = tmp_path / "future.safetensors"
    card = json.loads(_card(lite, "linear", "frozen").to_json())
    card["format_version"] = 99
    save_file({"x": torch.zeros(1)}, str(future), metadata={METADATA_KEY: json.dumps(card)})
    with pytest.raises(CheckpointError, match="format version 99"):
        read_model_card(future)
    card["format_version"], card["head"] = 1, "mystery"
    save_file({"x": torch.zeros(1)}, str(future), metadata={METADATA_KEY: json.dumps(card)})
    with pytest.raises(CheckpointError, match="unknown head 'mystery'"):
        read_model_card(future)

    with pytest.raises(CheckpointError, match=r"\.safetensors"):
        save_tensors({}, _card(lite, "linear", "frozen"), tmp_path / "model.pth")


def test_cards_that_cannot_be_rebuilt_say_why(lite, tmp_path):
    random_base = tmp_path / "random.safetensors"
    save_tensors({}, ModelCard(base_name="litemedsam", base_sha256="random", input_size=256, head="linear",
                               mode="frozen", classes=CLASSES, preprocessing=Preprocessing()), random_base)
    with pytest.raises(CheckpointError, match="randomly initialised"):
        load_model(random_base)
    vit = tmp_path / "vit.safetensors"
    save_tensors({}, ModelCard(base_name="sam_vit_b", base_sha256="0" * 64, input_size=512, head="samed",
                               mode="frozen", classes=CLASSES, preprocessing=Preprocessing(input_size=512)), vit)
    with pytest.raises(CheckpointError, match="sam_vit_b_01ec64.pth"):
        load_model(vit)


# --------------------------------------------------------------------------- pickles that run code


class _Payload:
    """Unpickling this object opens (creates) the marker file: a harmless stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _malicious_file(path: Path, marker: Path, samed_layout: bool) -> Path:
    state = {"w_a_000": torch.zeros(4, 96), "w_b_000": torch.zeros(96, 4)} if samed_layout else {
        "image_encoder.pos_embed": torch.zeros(1, 8, 8, 96)}
    state["payload"] = _Payload(marker)
    torch.save(state, path)
    return path


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, capsys):
    # The payload is real: plain unpickling creates its marker file.
    proof_marker = tmp_path / "proof_marker"
    pickle.loads(pickle.dumps(_Payload(proof_marker)))
    assert proof_marker.exists()

    marker = tmp_path / "pwned"
    evil = _malicious_file(tmp_path / "samed_epoch_159.pth", marker, samed_layout=True)
    with pytest.raises(CheckpointError, match="refusing to load") as info:
        import_samed_checkpoint(evil, tmp_path / "base.pth", CLASSES)
    assert str(evil) in str(info.value)
    assert not marker.exists()

    evil_base = _malicious_file(tmp_path / "sam_vit_b_01ec64.pth", marker, samed_layout=False)
    with pytest.raises(BackboneError, match="cannot read") as info:
        build_backbone("sam_vit_b", checkpoint=evil_base, input_size=SMALL_INPUT, encoder_config=SMALL_VIT_B)
    assert str(evil_base) in str(info.value)
    assert not marker.exists()

    # And through the CLI: a one-line error, exit 2, nothing executed, nothing written.
    out = tmp_path / "imported.safetensors"
    code = cli.main(["import-samed", str(evil), "--base-checkpoint", str(evil_base), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("samed: error:")
    assert not marker.exists() and not out.exists()


# --------------------------------------------------------------------------- SAMed layout import


class _SamedLoRAQKV(nn.Module):
    """SAMed's _LoRA_qkv (sam_lora_image_encoder.py), re-implemented as the independent reference."""

    def __init__(self, qkv: nn.Linear, a_q, b_q, a_v, b_v):
        super().__init__()
        self.qkv, self.dim = qkv, qkv.in_features
        self.a_q, self.b_q, self.a_v, self.b_v = a_q, b_q, a_v, b_v

    def forward(self, x):
        qkv = self.qkv(x)
        qkv[:, :, :, :self.dim] += self.b_q(self.a_q(x))
        qkv[:, :, :, -self.dim:] += self.b_v(self.a_v(x))
        return qkv


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight.data.copy_(weight)
    return layer


@pytest.fixture(scope="module")
def samed_files(tmp_path_factory):
    """A small random sam_vit_b base in the official layout, and a SAMed checkpoint for it in SAMed's layout."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    folder = tmp_path_factory.mktemp("samed")
    torch.manual_seed(11)
    base = build_backbone("sam_vit_b", input_size=SMALL_INPUT, encoder_config=SMALL_VIT_B, pretrained=False)
    container = nn.Module()
    container.image_encoder, container.prompt_encoder, container.mask_decoder = (
        base.image_encoder, base.prompt_encoder, base.mask_decoder)
    base_path = folder / "sam_vit_b_small.pth"
    torch.save(container.state_dict(), base_path)

    # SAMed's save_lora_parameters(): w_a/w_b alternate q, v per block, then the whole prompt encoder and the
    # mask decoder with num_classes + 1 mask tokens, all from a model initialised independently of the base.
    torch.manual_seed(12)
    rank, dim, depth = 4, SMALL_VIT_B["embed_dim"], SMALL_VIT_B["depth"]
    state = {}
    for i in range(2 * depth):
        state[f"w_a_{i:03d}"] = 0.1 * torch.randn(rank, dim)
    for i in range(2 * depth):
        state[f"w_b_{i:03d}"] = 0.1 * torch.randn(dim, rank)
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(SMALL_INPUT // 16,) * 2,
                           input_image_size=(SMALL_INPUT, SMALL_INPUT), mask_in_chans=16)
    with torch.no_grad():
        prompt.no_mask_embed.weight.normal_()
    decoder = MaskDecoder(num_multimask_outputs=len(CLASSES),
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                          transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    state.update({f"prompt_encoder.{k}": v for k, v in prompt.state_dict().items()})
    state.update({f"mask_decoder.{k}": v for k, v in decoder.state_dict().items()})
    samed_path = folder / "epoch_159.pth"
    torch.save(state, samed_path)
    return base_path, samed_path, state


def _samed_reference(base_path: Path, state: dict, images: torch.Tensor) -> torch.Tensor:
    """SAMed's network built directly from segment_anything modules and the two files (no SAMedLib code)."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    base = torch.load(base_path, weights_only=True)
    encoder = ImageEncoderViT(depth=SMALL_VIT_B["depth"], embed_dim=SMALL_VIT_B["embed_dim"], img_size=SMALL_INPUT,
                              mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                              num_heads=SMALL_VIT_B["num_heads"], patch_size=16, qkv_bias=True, use_rel_pos=True,
                              global_attn_indexes=SMALL_VIT_B["global_attn_indexes"], window_size=14, out_chans=256)
    encoder.load_state_dict({k[len("image_encoder."):]: v for k, v in base.items() if k.startswith("image_encoder.")})
    for i, block in enumerate(encoder.blocks):
        block.attn.qkv = _SamedLoRAQKV(block.attn.qkv, _linear(state[f"w_a_{2 * i:03d}"]),
                                       _linear(state[f"w_b_{2 * i:03d}"]), _linear(state[f"w_a_{2 * i + 1:03d}"]),
                                       _linear(state[f"w_b_{2 * i + 1:03d}"]))
    prompt = PromptEncoder(embed_dim=256, image_embedding_size=(SMALL_INPUT // 16,) * 2,
                           input_image_size=(SMALL_INPUT, SMALL_INPUT), mask_in_chans=16)
    prompt.load_state_dict({k[len("prompt_encoder."):]: v for k, v in state.items() if k.startswith("prompt_encoder.")})
    decoder = MaskDecoder(num_multimask_outputs=len(CLASSES),
                          transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                          transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    decoder.load_state_dict({k[len("mask_decoder."):]: v for k, v in state.items() if k.startswith("mask_decoder.")})
    outputs = []
    with torch.no_grad():
        for x in images:  # SAMed's forward_train with no prompts; every mask token is a class (background first)
            embedding = encoder(x[None])
            sparse, dense = prompt(points=None, boxes=None, masks=None)
            masks, _ = decoder.predict_masks(embedding, prompt.get_dense_pe(), sparse, dense)
            outputs.append(masks)
    return torch.cat(outputs)


def test_samed_layout_import_matches_samed_network(samed_files, tmp_path, capsys):
    base_path, samed_path, state = samed_files
    model, card = import_samed_checkpoint(samed_path, base_path, CLASSES, input_size=SMALL_INPUT,
                                          encoder_config=SMALL_VIT_B)
    model.eval()
    assert card.base_name == "sam_vit_b" and card.base_sha256 == file_sha256(base_path)
    assert card.lora_rank == 4 and card.lora_alpha == 4.0 and card.head == "samed" and card.mode == "lora"
    assert card.encoder_config["embed_dim"] == 96 and card.training["imported_from"] == "epoch_159.pth"
    images = torch.rand(2, 3, SMALL_INPUT, SMALL_INPUT, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(images)
    reference = _samed_reference(base_path, state, images)
    assert ours.shape == reference.shape == (2, len(CLASSES) + 1, 32, 32)
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
    # LoRA matters in this comparison: without it the output is different.
    with torch.no_grad():
        for layer in lora_layers(model.image_encoder):
            layer.linear.lora_B.zero_()
        assert not torch.allclose(model(images), reference, atol=1e-3)

    # Save as a SAMedLib checkpoint and load it back on the same base (card records the small ViT shape).
    model, card = import_samed_checkpoint(samed_path, base_path, CLASSES, input_size=SMALL_INPUT,
                                          encoder_config=SMALL_VIT_B)
    path = save_checkpoint(model.eval(), card, tmp_path / "imported.safetensors")
    loaded = load_model(path, base_checkpoint=base_path, merge=False)
    with torch.no_grad():
        assert torch.equal(loaded.model(images), ours)
    merged = load_model(path, base_checkpoint=base_path)
    with torch.no_grad():
        torch.testing.assert_close(merged.model(images), ours, atol=MERGE_ATOL, rtol=MERGE_RTOL)
    assert cli.main(["info", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["encoder_config"]["depth"] == 2


def test_samed_layout_import_refuses_mismatches(samed_files, tmp_path):
    base_path, samed_path, state = samed_files
    with pytest.raises(CheckpointError, match="predicts 3 classes but 2 were given"):
        import_samed_checkpoint(samed_path, base_path, CLASSES[:2], input_size=SMALL_INPUT, encoder_config=SMALL_VIT_B)
    one_block = tmp_path / "one_block.pth"
    torch.save({k: v for k, v in state.items() if k not in ("w_a_002", "w_a_003", "w_b_002", "w_b_003")}, one_block)
    with pytest.raises(CheckpointError, match="has LoRA for 1 blocks, sam_vit_b has 2"):
        import_samed_checkpoint(one_block, base_path, CLASSES, input_size=SMALL_INPUT, encoder_config=SMALL_VIT_B)
    not_samed = tmp_path / "not_samed.pth"
    torch.save({"model": {"a": torch.zeros(1)}}, not_samed)
    with pytest.raises(CheckpointError, match="not in SAMed's layout"):
        import_samed_checkpoint(not_samed, base_path, CLASSES)
    partial_file = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if k != "w_b_003"}, partial_file)
    with pytest.raises(CheckpointError, match="w_b_003"):
        import_samed_checkpoint(partial_file, base_path, CLASSES, input_size=SMALL_INPUT, encoder_config=SMALL_VIT_B)
    wider = {k: (torch.zeros(v.shape[0], 128) if k.startswith("w_a_") else v) for k, v in state.items()}
    wider_file = tmp_path / "wider.pth"
    torch.save(wider, wider_file)
    with pytest.raises(CheckpointError, match="do not fit sam_vit_b"):
        import_samed_checkpoint(wider_file, base_path, CLASSES, input_size=SMALL_INPUT, encoder_config=SMALL_VIT_B)
    with pytest.raises(CheckpointError, match="not found"):
        import_samed_checkpoint(tmp_path / "absent.pth", base_path, CLASSES)
