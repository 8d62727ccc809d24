"""A prompt-free SAM segmenter: image encoder (optionally with LoRA) + one head.

Training modes decide what learns:
- ``lora`` (SAMed): LoRA matrices in the encoder + the whole head; every other encoder weight frozen.
- ``frozen`` (AutoSAM): the encoder is frozen completely; only the head learns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .backbones import Backbone
from .heads import build_head
from .lora import add_lora, lora_layers

__all__ = ["SAMedModel", "MODES", "build_model", "trainable_state_dict", "count_parameters"]

MODES = ("lora", "frozen")


class SAMedModel(nn.Module):
    """images (B,3,S,S) in [0,1] -> class logits (B,num_classes+1,S',S') with S' = 4 x embedding size."""

    def __init__(self, image_encoder: nn.Module, head: nn.Module, mode: str, input_size: int):
        super().__init__()
        self.image_encoder = image_encoder
        self.head = head
        self.mode = mode
        self.input_size = input_size
        self.set_mode(mode)
        self.train()

    def train(self, mode: bool = True) -> "SAMedModel":
        # The encoder's own layers always run as at inference: TinyViT's BatchNorm in training mode would use
        # batch statistics, so embeddings seen while training would differ from those seen when segmenting
        # (measured: 117% relative difference). LoRA (no dropout) behaves the same in both modes.
        super().train(mode)
        self.image_encoder.eval()
        return self

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown training mode '{mode}': expected one of {', '.join(MODES)}")
        self.mode = mode
        for name, param in self.image_encoder.named_parameters():
            param.requires_grad = mode == "lora" and ".lora_" in f".{name}"
        for param in self.head.parameters():
            param.requires_grad = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.image_encoder(images))


def build_model(backbone: Backbone, head: str, num_classes: int, mode: str, lora_rank: int | None = 4,
                lora_alpha: float | None = None, seed: int = 0) -> SAMedModel:
    """Assemble encoder + head. LoRA is added when ``lora_rank`` is set (always for mode ``lora``)."""
    if mode == "lora" and not lora_rank:
        raise ValueError("mode 'lora' needs a LoRA rank >= 1")
    torch.manual_seed(seed)  # LoRA A matrices
    if lora_rank:
        add_lora(backbone.image_encoder, lora_rank, lora_alpha)
    return SAMedModel(backbone.image_encoder, build_head(head, backbone, num_classes, seed=seed), mode,
                      backbone.input_size)


def trainable_state_dict(model: SAMedModel) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: LoRA matrices of the encoder and the whole head (never the base weights)."""
    state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    for name, tensor in model.image_encoder.state_dict().items():
        if ".lora_" in f".{name}":
            state[f"image_encoder.{name}"] = tensor
    return state


@dataclass
class ParameterCount:
    total: int
    trainable: int
    lora: int
    head: int


def count_parameters(model: SAMedModel) -> ParameterCount:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for layer in lora_layers(model.image_encoder) for n, p in layer.named_parameters()
               if "lora_" in n)
    head = sum(p.numel() for p in model.head.parameters())
    return ParameterCount(total, trainable, lora, head)
