"""Self-describing, pickle-free checkpoints (safetensors + JSON model card).

A checkpoint holds only what was trained (encoder LoRA matrices + the head). Loading rebuilds the base
model named in the card, checks the base weights' SHA-256, the class count and every tensor's name and
shape, and refuses anything that does not match with a message that says what differs.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .backbones import SAM_VIT_CONFIGS, build_backbone
from .classes import SegmentClass
from .errors import CheckpointError
from .lora import merge_lora
from .model import SAMedModel, build_model, trainable_state_dict
from .model_card import ModelCard, Preprocessing
from .prompting import PromptDecoder

__all__ = ["LoadedModel", "save_checkpoint", "save_tensors", "build_from_card", "load_trainable_tensors", "read_model_card", "load_model", "import_samed_checkpoint",
           "CheckpointError", "METADATA_KEY"]

METADATA_KEY = "samed_model_card"


@dataclass
class LoadedModel:
    model: SAMedModel
    card: ModelCard
    path: Path | None = None
    # The base model's own prompt encoder + mask decoder (pretrained, frozen) for self-prompted refinement.
    prompt_decoder: PromptDecoder | None = None


def save_checkpoint(model: SAMedModel, card: ModelCard, path: str | Path) -> Path:
    """Write the model's trainable tensors and the card atomically (a crash never leaves a half-written file)."""
    return save_tensors(trainable_state_dict(model), card, path)


def save_tensors(tensors: dict[str, torch.Tensor], card: ModelCard, path: str | Path) -> Path:
    """Write trainable tensors (as from ``trainable_state_dict``) with the card, atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint file name must end in .safetensors, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".safetensors.tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: card.to_json()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_model_card(path: str | Path) -> ModelCard:
    """Read just the model card (cheap: no tensors are loaded)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"{path} is not a SAMed checkpoint (.safetensors): {str(exc)[:200]}") from exc
    if METADATA_KEY not in metadata:
        raise CheckpointError(f"{path} has no SAMed model card: it is not a SAMed checkpoint")
    try:
        return ModelCard.from_dict(json.loads(metadata[METADATA_KEY]))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: model card is not valid JSON ({exc})") from exc


def build_from_card(card: ModelCard, base_checkpoint: str | Path | None = None) -> SAMedModel:
    """The untrained model a card describes, on the verified base weights."""
    return _build_from_card(card, base_checkpoint)[0]


def _build_from_card(card: ModelCard, base_checkpoint: str | Path | None) -> tuple[SAMedModel, PromptDecoder]:
    if card.base_sha256 == "random":
        raise CheckpointError("this checkpoint was trained on randomly initialised base weights and cannot be rebuilt")
    if card.base_name in SAM_VIT_CONFIGS and base_checkpoint is None:
        expected = card.base_file_name or SAM_VIT_CONFIGS[card.base_name]["official_file"]
        raise CheckpointError(f"this model was fine-tuned from {card.base_name}: pass its base checkpoint "
                              f"(--base-checkpoint /path/to/{expected})")
    backbone = build_backbone(card.base_name, base_checkpoint, card.input_size, card.encoder_config or None)
    if backbone.weights_sha256 != card.base_sha256:
        raise CheckpointError(f"base weights differ from the ones this model was trained on: SHA-256 "
                              f"{backbone.weights_sha256[:16]}… != {card.base_sha256[:16]}… ({card.base_name})")
    model = build_model(backbone, card.head, card.num_classes, card.mode, card.lora_rank, card.lora_alpha)
    return model, PromptDecoder(backbone.prompt_encoder, backbone.mask_decoder)


def load_model(path: str | Path, device: str = "cpu", base_checkpoint: str | Path | None = None,
               merge: bool = True) -> LoadedModel:
    """Load a checkpoint for inference (eval mode; LoRA merged into the weights unless ``merge=False``)."""
    path = Path(path)
    card = read_model_card(path)
    model, prompt_decoder = _build_from_card(card, base_checkpoint)
    load_trainable_tensors(model, load_file(str(path)), str(path))
    model.eval()
    if merge:
        merge_lora(model)
    return LoadedModel(model.to(device), card, path, prompt_decoder.to(device))


def load_trainable_tensors(model: SAMedModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy checkpoint tensors into ``model`` after checking names and shapes exactly."""
    expected = trainable_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the model its card describes: "
                              f"{len(missing)} missing tensors (e.g. {missing[:2]}), "
                              f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{source}: tensor '{key}' has shape {tuple(tensor.shape)}, "
                                  f"the model needs {tuple(expected[key].shape)}")
    state = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    model.head.load_state_dict(state, strict=True)
    encoder_state = {k[len("image_encoder."):]: v for k, v in tensors.items() if k.startswith("image_encoder.")}
    model.image_encoder.load_state_dict(encoder_state, strict=False)


# SAMed's class order on Synapse (preprocess_data.py), used when importing its published checkpoint.
SYNAPSE_CLASSES = "1:spleen,2:kidney_right,3:kidney_left,4:gallbladder,5:liver,6:stomach,7:aorta,8:pancreas"


def import_samed_checkpoint(samed_path: str | Path, base_checkpoint: str | Path, classes: list[SegmentClass],
                            input_size: int = 512, encoder_config: dict | None = None) -> tuple[SAMedModel, ModelCard]:
    """Convert SAMed's published ``torch.save`` layout (w_a_NNN / w_b_NNN, prompt_encoder.*, mask_decoder.*).

    Read with ``weights_only=True``: a pickle that tries to run code is refused, not executed.
    ``encoder_config`` (a non-official ViT shape, for tests) is passed to the backbone and recorded in the card.
    """
    samed_path = Path(samed_path)
    if not samed_path.is_file():
        raise CheckpointError(f"SAMed checkpoint not found: {samed_path}")
    try:
        state = torch.load(samed_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"refusing to load {samed_path}: not a plain tensor file "
                              f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})") from exc
    if not isinstance(state, dict) or not any(k.startswith("w_a_") for k in state):
        raise CheckpointError(f"{samed_path} is not in SAMed's layout (no w_a_NNN LoRA tensors)")
    for key in ("w_a_000", "w_b_000", "mask_decoder.mask_tokens.weight", "prompt_encoder.no_mask_embed.weight",
                "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"):
        if key not in state:
            raise CheckpointError(f"{samed_path} is not in SAMed's layout: tensor '{key}' is missing")
    num_classes = state["mask_decoder.mask_tokens.weight"].shape[0] - 1
    if num_classes != len(classes):
        raise CheckpointError(f"{samed_path} predicts {num_classes} classes but {len(classes)} were given")
    rank = state["w_a_000"].shape[0]
    backbone = build_backbone("sam_vit_b", base_checkpoint, input_size, encoder_config)
    model = build_model(backbone, "samed", num_classes, "lora", lora_rank=rank, lora_alpha=rank)  # SAMed: no scaling
    from .lora import lora_layers

    layers = lora_layers(model.image_encoder)
    if len([k for k in state if k.startswith("w_a_")]) != 2 * len(layers):
        raise CheckpointError(f"{samed_path} has LoRA for {len([k for k in state if k.startswith('w_a_')]) // 2} "
                              f"blocks, sam_vit_b has {len(layers)}")
    with torch.no_grad():
        for i, layer in enumerate(layers):  # SAMed saves q then v for each block
            try:
                layer.linear.lora_A.copy_(torch.cat([state[f"w_a_{2 * i:03d}"], state[f"w_a_{2 * i + 1:03d}"]], 0))
                layer.linear.lora_B.copy_(torch.cat([state[f"w_b_{2 * i:03d}"], state[f"w_b_{2 * i + 1:03d}"]], 0))
            except (KeyError, RuntimeError) as exc:  # a missing w_b_NNN, or LoRA of another ViT size
                raise CheckpointError(f"{samed_path}: LoRA tensors of block {i} do not fit sam_vit_b: "
                                      f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}") from exc
        head = model.head
        head.no_mask_embed.weight.copy_(state["prompt_encoder.no_mask_embed.weight"])
        head.pe_layer.positional_encoding_gaussian_matrix.copy_(
            state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"])
        decoder_state = {k[len("mask_decoder."):]: v for k, v in state.items() if k.startswith("mask_decoder.")}
        try:
            head.mask_decoder.load_state_dict(decoder_state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{samed_path}: mask decoder does not match: {str(exc)[:200]}") from exc
    card = ModelCard(base_name="sam_vit_b", base_sha256=backbone.weights_sha256, input_size=input_size, head="samed",
                     mode="lora", classes=list(classes), lora_rank=rank, lora_alpha=float(rank),
                     base_file_name=Path(base_checkpoint).name, encoder_config=backbone.encoder_config,
                     preprocessing=Preprocessing(inplane="stretch", input_size=input_size),
                     training={"imported_from": samed_path.name, "source": "SAMed (Zhang & Liu 2023) layout"})
    return model, card
