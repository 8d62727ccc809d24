"""SAMed's loss: ce_weight * cross-entropy + dice_weight * soft Dice over all num_classes+1 channels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["soft_dice_loss", "segmentation_loss"]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean over channels (background included, as SAMed) of 1 - soft Dice, computed over the whole batch.

    logits (B,K,H,W), target (B,H,W) int64 in 0..K-1.
    """
    probs = logits.softmax(dim=1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    intersection = (probs * onehot).sum(dims)
    union = probs.sum(dims) + onehot.sum(dims)
    return (1 - (2 * intersection + eps) / (union + eps)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 0.8) -> torch.Tensor:
    """(1 - dice_weight) * CE + dice_weight * Dice; SAMed uses dice_weight = 0.8."""
    if not 0.0 <= dice_weight <= 1.0:
        raise ValueError(f"dice_weight must be in [0, 1], got {dice_weight}")
    return (1 - dice_weight) * F.cross_entropy(logits, target) + dice_weight * soft_dice_loss(logits, target)
