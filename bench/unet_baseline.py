"""What a user would otherwise train: a from-scratch 2D U-Net (no pretrained weights) on the one labeled volume.

Same preprocessing (CT window, 1.6 mm model grid, resolution matching), the same augmented views
(``SAMedLib.augmentation`` defaults, drawn fresh every iteration since there is no encoder to cache), the same
loss (0.2 CE + 0.8 Dice), AdamW with warm-up + poly decay, and the same wall-clock budget as the SAM-based
default's training. Inference goes through ``SAMedLib.inference.segment_image`` like any model.
"""
from __future__ import annotations

import time

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from SAMedLib.augmentation import AugmentationConfig, ViewAugmentation, sample_view
from SAMedLib.checkpoint import LoadedModel
from SAMedLib.inference import segment_image
from SAMedLib.losses import segmentation_loss
from SAMedLib.model_card import ModelCard, Preprocessing
from SAMedLib.schedule import learning_rate
from SAMedLib.trainer import _make_views
from SAMedLib.training_data import prepare_training_pair, select_slices

SIZE = 256


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.InstanceNorm2d(cout, affine=True),
                         nn.LeakyReLU(0.01), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.InstanceNorm2d(cout, affine=True), nn.LeakyReLU(0.01))


class UNet2D(nn.Module):
    """Four resolution levels (16-32-64-128 channels), skip connections, one logit map per class."""

    def __init__(self, num_classes: int, widths=(16, 32, 64, 128)):
        super().__init__()
        self.image_encoder = nn.Identity()  # segment_image's hook for encoder preparation: nothing to prepare
        self.down = nn.ModuleList()
        cin = 1
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(len(widths) - 1))
        self.merge = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in range(len(widths) - 1))
        self.out = nn.Conv2d(widths[0], num_classes + 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, skips = images[:, :1], []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else nn.functional.max_pool2d(x, 2))
            skips.append(x)
        for i in reversed(range(len(self.up))):
            x = self.merge[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.out(x)


def train_and_segment(train_scan: tuple[sitk.Image, sitk.Image], classes, test_image: sitk.Image,
                      budget_seconds: float, seed: int = 1234, batch_size: int = 8,
                      peak_lr: float = 1e-3) -> tuple[sitk.Image, float]:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    prep = Preprocessing()
    volume = prepare_training_pair(*train_scan, classes, prep)
    prep.resolution_mm = max(volume.spacing_yx)
    slices = select_slices(volume, None, 0.15, np.random.default_rng(seed))
    aug = AugmentationConfig()
    net = UNet2D(len(classes))
    optimizer = torch.optim.AdamW(net.parameters(), lr=peak_lr, weight_decay=0.1)
    start = time.perf_counter()
    # The schedule needs a length: estimate it from the first iterations' speed.
    planned, iteration = None, 0
    net.train()
    while time.perf_counter() - start < budget_seconds:
        chosen = rng.choice(slices, size=batch_size)
        plan = [[ViewAugmentation.identity() if rng.random() < 1 / 3 else sample_view(rng, aug, len(classes))]
                for _ in chosen]
        views = _make_views(volume, chosen, plan, prep, SIZE, aug.noise_std)
        if planned is None and iteration == 5:
            per_iteration = (time.perf_counter() - start) / 5
            planned = max(10, int(budget_seconds / per_iteration))
        lr = learning_rate(iteration, peak_lr, planned or 10**6, 5 if planned is None else int(0.1 * planned), 0.9)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = segmentation_loss(net(views.inputs), views.targets, 0.8)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        iteration += 1
    seconds = time.perf_counter() - start
    net.eval()
    card = ModelCard(base_name="litemedsam", base_sha256="none", input_size=SIZE, head="cnn", mode="frozen",
                     classes=list(classes), preprocessing=prep, training={"iterations": iteration})
    pred = segment_image(test_image, LoadedModel(net, card, None), device="cpu", precision="fp32",
                         refinement="none", cleanup="none")
    return pred, seconds
