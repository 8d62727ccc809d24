"""Self-prompted refinement (Wu et al. 2023, "Self-prompting large vision models for few-shot medical image
segmentation"): the prompt-free head only has to localise each class; its coarse mask gives a box (and
optionally a point) that prompts the base model's pretrained, frozen decoder, which draws the boundary.

It reuses the slice's image embedding (no second encoder pass). Multi-class: one box per island of each
class's mask on the slice, each decoded on its window of the embedding (``PromptDecoder.window``), a class's
islands united; overlaps go to the larger decoder logit; a refined mask that balloons past MAX_GROWTH x the
head's area is replaced by the head's own; pixels where every decoder logit is negative are background.
"""
from __future__ import annotations

import torch

from .prompting import PromptDecoder, mask_prompts

__all__ = ["refine_logits", "ABSENT_LOGIT", "KEPT_LOGIT"]

# A class that is not refined keeps the head's pixels (KEPT, above any decoder logit); a class with no prompt on a
# slice is absent (ABSENT). Symmetric, so that resampling to the slice puts a kept mask's edge half-way, as the
# head's own logits would.
KEPT_LOGIT = 1.0e3
ABSENT_LOGIT = -KEPT_LOGIT
MAX_GROWTH = 2.5  # a refined mask more than this times the head's area is a decoder runaway, not a correction


def refine_logits(head_logits: torch.Tensor, embeddings: torch.Tensor, decoder: PromptDecoder,
                  refinements: list[str], margin_px: float) -> torch.Tensor:
    """(B,C+1,s,s) head logits + (B,E,h,w) embeddings -> (B,C+1,s,s) logits after refinement.

    ``refinements`` holds each foreground class's choice (``none``, ``box`` or ``box+point``). Refined classes
    get the prompted decoder's logits; a class left as ``none`` keeps the head's own pixels, which win over
    any decoder mask there (the head is trusted for it). Background is 0, so after the usual argmax a pixel
    belongs to the class whose logit is largest and positive. ``margin_px`` grows each box on the mask grid.
    """
    batch, channels, size, _ = head_logits.shape
    if len(refinements) != channels - 1:
        raise ValueError(f"need one refinement per class: got {len(refinements)} for {channels - 1} classes")
    if decoder.mask_size != size:
        raise ValueError(f"decoder masks are {decoder.mask_size}px, head logits {size}px: not the same model grid")
    coarse_index = head_logits.argmax(dim=1)
    coarse = coarse_index.cpu().numpy()
    scale = decoder.input_size / size
    refined = torch.full((batch, channels, size, size), ABSENT_LOGIT, device=head_logits.device)
    refined[:, 0] = 0.0
    for c, choice in enumerate(refinements, start=1):
        if choice == "none":
            refined[:, c][coarse_index == c] = KEPT_LOGIT
    for b in range(batch):
        owners, prompts = [], []
        for c, choice in enumerate(refinements, start=1):
            if choice == "none":
                continue
            for prompt in mask_prompts(coarse[b] == c, scale, margin=margin_px, with_point=choice == "box+point"):
                owners.append(c)
                prompts.append(prompt)
        if not prompts:
            continue
        logits, _ = decoder(embeddings[b:b + 1], prompts)
        for c in sorted(set(owners)):
            mine = logits[[i for i, owner in enumerate(owners) if owner == c]].amax(dim=0)
            head_area = int((coarse_index[b] == c).sum())
            if int((mine > 0).sum()) > MAX_GROWTH * head_area:
                # The decoder took the box for something much larger than what the head saw: keep the head's.
                refined[b, c] = torch.where(coarse_index[b] == c, KEPT_LOGIT, ABSENT_LOGIT)
            else:
                refined[b, c] = mine.to(refined.dtype)
    return refined
