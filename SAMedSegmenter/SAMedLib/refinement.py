"""Self-prompted refinement (Wu et al. 2023, "Self-prompting large vision models for few-shot medical image
segmentation"): the prompt-free head only has to localise each class; its coarse mask gives a box (and
optionally a point) that prompts the base model's pretrained, frozen decoder, which draws the boundary.

It reuses the slice's image embedding (no second encoder pass). Multi-class: one prompt per class present
on the slice, all decoded together; overlaps go to the larger decoder logit, pixels where every decoder
logit is negative are background.
"""
from __future__ import annotations

import torch

from .prompting import PromptDecoder, mask_prompt

__all__ = ["refine_logits", "ABSENT_LOGIT"]

ABSENT_LOGIT = -1.0e4  # a class with no prompt on a slice is absent from it


def refine_logits(head_logits: torch.Tensor, embeddings: torch.Tensor, decoder: PromptDecoder, refinement: str,
                  margin_px: float) -> torch.Tensor:
    """(B,C+1,s,s) head logits + (B,E,h,w) embeddings -> (B,C+1,s,s) logits from the prompted decoder.

    Background is 0, so after the usual argmax a pixel belongs to the class whose decoder logit is largest
    and positive. ``margin_px`` grows each box on the mask grid (s x s).
    """
    batch, channels, size, _ = head_logits.shape
    if decoder.mask_size != size:
        raise ValueError(f"decoder masks are {decoder.mask_size}px, head logits {size}px: not the same model grid")
    coarse = head_logits.argmax(dim=1).cpu().numpy()
    scale = decoder.input_size / size
    refined = torch.full((batch, channels, size, size), ABSENT_LOGIT, device=head_logits.device)
    refined[:, 0] = 0.0
    for b in range(batch):
        classes, prompts = [], []
        for c in range(1, channels):
            prompt = mask_prompt(coarse[b] == c, scale, margin=margin_px, with_point=refinement == "box+point")
            if prompt is not None:
                classes.append(c)
                prompts.append(prompt)
        if prompts:
            logits, _ = decoder(embeddings[b:b + 1], prompts)
            refined[b, classes] = logits.to(refined.dtype)
    return refined
