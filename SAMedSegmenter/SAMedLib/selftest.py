"""A real but untrained checkpoint, for plumbing checks (the module's self-test and the test suite).

LiteMedSAM with its packaged weights + an untrained linear head in frozen mode: its labels are arbitrary
but deterministic, so every path through the code must give the same label map. Useless for accuracy.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["untrained_checkpoint"]


def untrained_checkpoint(path: str | Path, classes: str = "1:spleen,5:liver") -> Path:
    from .backbones import build_backbone
    from .checkpoint import save_checkpoint
    from .classes import parse_class_list
    from .model import build_model
    from .model_card import ModelCard, Preprocessing

    backbone = build_backbone("litemedsam")
    class_list = parse_class_list(classes)
    model = build_model(backbone, "linear", len(class_list), "frozen", None, seed=0)
    card = ModelCard(base_name="litemedsam", base_sha256=backbone.weights_sha256, input_size=backbone.input_size,
                     head="linear", mode="frozen", classes=class_list,
                     preprocessing=Preprocessing(input_size=backbone.input_size))
    return save_checkpoint(model, card, path)
