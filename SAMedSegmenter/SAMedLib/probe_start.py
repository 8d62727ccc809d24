"""Linear-probe start: fit the head's class outputs on its frozen features before the head is fine-tuned.

SAMed's head (and AutoSAM's ViT head) starts every class from the same pretrained mask token and the same
hypernetwork MLP, told apart by a little noise. At iteration 0 all classes predict the same mask, and training
sits at validation Dice 0 until the noise has grown into a difference (50-100 of the 200 CPU iterations). Where a
run ends then depends on tiny numerical differences: the same forward training (seed 1234) reached 0.908 mean
Dice on the next scan with bf16 embeddings, 0.765 with fp32 ones and 0.675 with OpenVINO's bf16.

LP-FT (Kumar et al. 2022, "Fine-tuning can distort pretrained features and underperform out-of-distribution")
fits a linear head on the frozen features first and then fine-tunes everything from there. Here the "linear
head" is an offset per class added to the bias of that class's hypernetwork output layer: the class logits are
the dot product of the (B,K,C') hypernetwork weights with the (B,C',H,W) upscaled features, so with everything
else fixed the fit is a multinomial linear classifier on C' = 32 features per pixel, trained with the training
loss on features computed once. Cheap (seconds on 2 CPU cores) and deterministic up to the features.

Measured (stop 21-23, bench/results/head_start.md): over three seeds x three precisions of the training
embeddings (torch bf16 and fp32 on a Xeon, OpenVINO fp32 on an AMD EPYC; the symmetric start's third: OpenVINO
bf16 on the Xeon) it is the steadier start - forward 0.887 +- 0.029 (worst 0.835)
against the symmetric start's 0.823 +- 0.096 (worst 0.672), reverse 0.626 against 0.578 - though it loses on
torch bf16 alone (forward 0.861 against 0.911). The default head start since stop 23 (``samed train
--head-start symmetric`` keeps the previous behaviour).
"""
from __future__ import annotations

import torch
from torch import nn

from .heads import class_logits
from .losses import segmentation_loss

__all__ = ["probe_start", "supports_probe_start", "PROBE_VIEWS", "PROBE_STEPS", "PROBE_LR"]

PROBE_VIEWS = 32  # views the classifier is fitted on, spread over the training pool
PROBE_STEPS = 300
PROBE_LR = 0.3
# One pixel in 16, the same random ones on every view: the fit costs 16x less. (Not a regular grid: the upscaling's
# 2x2-stride transposed convolutions give the pixels of each 4x4 phase their own features.)
PIXEL_SHARE = 16


def supports_probe_start(head: nn.Module) -> bool:
    """Heads whose class logits are hypernetwork weights dotted with upscaled features."""
    return hasattr(head, "class_weights_and_features") and hasattr(head, "hypernetworks")


def probe_start(head: nn.Module, embeddings: torch.Tensor, targets: torch.Tensor, dice_weight: float,
                steps: int = PROBE_STEPS, lr: float = PROBE_LR, batch_size: int = 8) -> dict[str, float]:
    """Fit a per-class offset of the hypernetwork outputs on ``embeddings`` (N,256,h,w) / ``targets`` (N,4h,4w)
    and add it to the head's output biases in place. Returns the training loss before and after the fit."""
    if not supports_probe_start(head):
        raise ValueError(f"{type(head).__name__} has no hypernetwork outputs to fit")
    was_training = head.training
    head.eval()
    device = next(head.parameters()).device
    weights, features = [], []
    area = targets.shape[-2] * targets.shape[-1]
    pixels = torch.randperm(area, generator=torch.Generator().manual_seed(0))[:area // PIXEL_SHARE].to(device)
    with torch.no_grad():
        for start in range(0, len(embeddings), batch_size):
            w, f = head.class_weights_and_features(embeddings[start:start + batch_size].to(device).float())
            weights.append(w.float())
            features.append(f.flatten(2)[:, :, pixels].float())
    head.train(was_training)
    weights, features = torch.cat(weights), torch.cat(features)[..., None]  # (N,C',P,1): class_logits' layout
    targets = targets.flatten(1)[:, pixels, None].to(device)
    offset = torch.zeros(weights.shape[1:], device=device, requires_grad=True)  # (K, C')
    optimizer = torch.optim.Adam([offset], lr=lr)

    def loss() -> torch.Tensor:
        return segmentation_loss(class_logits(weights + offset, features), targets, dice_weight)

    with torch.no_grad():
        before = float(loss())
    for _ in range(steps):
        value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(loss())
        for mlp, delta in zip(head.hypernetworks, offset.detach()):
            mlp.layers[-1].bias += delta.to(mlp.layers[-1].bias.dtype)
    return {"loss_before": round(before, 4), "loss_after": round(after, 4)}
