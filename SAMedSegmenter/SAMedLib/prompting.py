"""Box and point prompts for a backbone's pretrained, frozen promptable decoder.

Two stages use it: self-prompted refinement (a prompt-free head's coarse mask gives each class a box, the
decoder draws the boundary) and box annotation (a user's box, then the box of the previous slice's mask).
Everything here works on the model grid: boxes and points are (x, y) in encoder-input pixels, masks are
the decoder's low-resolution logits (4 x the embedding size, the same grid the prompt-free heads predict on).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["PromptDecoder", "Prompt", "mask_prompt", "mask_prompts", "clean_mask", "native_to_model_xy",
           "mask_pixel_mm"]


@dataclass(frozen=True)
class Prompt:
    """One object's prompt on one slice: a box (x0, y0, x1, y1) and optionally one positive point (x, y)."""

    box: tuple[float, float, float, float]
    point: tuple[float, float] | None = None


class PromptDecoder(nn.Module):
    """The backbone's prompt encoder + mask decoder, frozen: (embedding, prompts) -> mask logits and IoU."""

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        for param in self.parameters():
            param.requires_grad = False
        self.eval()

    @property
    def input_size(self) -> int:
        return int(self.prompt_encoder.input_image_size[0])

    @property
    def mask_size(self) -> int:
        return 4 * int(self.prompt_encoder.image_embedding_size[0])

    def forward(self, embedding: torch.Tensor, prompts: list[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """embedding (1,C,h,w) of one slice, K prompts -> logits (K, 4h, 4w) and predicted IoU (K,)."""
        if not prompts:
            size = self.mask_size
            return embedding.new_zeros((0, size, size)), embedding.new_zeros((0,))
        device = embedding.device
        boxes = torch.tensor([p.box for p in prompts], dtype=torch.float32, device=device)
        points = None
        if all(p.point is not None for p in prompts):
            coords = torch.tensor([[p.point] for p in prompts], dtype=torch.float32, device=device)
            points = (coords, torch.ones(coords.shape[:2], dtype=torch.int64, device=device))
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=None)
        # SAM's decoder repeats a single image embedding once per prompt.
        logits, iou = self.mask_decoder(image_embeddings=embedding[:1].to(sparse.dtype),
                                        image_pe=self.prompt_encoder.get_dense_pe().to(sparse.dtype),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False)
        return logits[:, 0].float(), iou[:, 0].float()


def clean_mask(mask: np.ndarray, min_pixels: int = 8, min_fraction: float = 0.1) -> np.ndarray:
    """Drop 2D islands smaller than ``min_pixels`` or than ``min_fraction`` of the largest one (8-connected)."""
    from scipy import ndimage

    components, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(components.ravel())[1:]
    keep = np.flatnonzero(sizes >= max(min_pixels, min_fraction * sizes.max())) + 1
    return np.isin(components, keep)


def mask_prompt(mask: np.ndarray, scale: float, margin: float = 0.0, with_point: bool = False,
                min_pixels: int = 8) -> Prompt | None:
    """The prompt a mask on the decoder's mask grid gives: the box of its cleaned pixels, grown by ``margin``
    mask pixels on each side and clipped to the grid, optionally with one point at the distance-transform
    maximum of its largest island; ``scale`` = input pixels per mask pixel. None for an empty mask.
    """
    from scipy import ndimage

    kept = clean_mask(np.asarray(mask, bool), min_pixels=min_pixels)
    if not kept.any():
        return None
    ys, xs = np.nonzero(kept)
    high = mask.shape[0] - 1
    box = tuple(float(np.clip(v, 0, high)) * scale for v in
                (xs.min() - margin, ys.min() - margin, xs.max() + margin, ys.max() + margin))
    point = None
    if with_point:
        components, _ = ndimage.label(kept, structure=np.ones((3, 3), bool))
        largest = components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
        distance = ndimage.distance_transform_edt(largest)
        y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
        point = (float(x) * scale, float(y) * scale)
    return Prompt(box, point)


def mask_prompts(mask: np.ndarray, scale: float, margin: float = 0.0, with_point: bool = False,
                 min_pixels: int = 8) -> list[Prompt]:
    """One prompt per island of a mask that ``clean_mask`` keeps: a box around two separate blobs would ask the
    decoder for everything between them (measured: a contrast aorta box spanning the aorta and a second blob
    filled the box, 5x the aorta's area), while each blob's own box keeps an organ in two pieces whole."""
    from scipy import ndimage

    kept = clean_mask(np.asarray(mask, bool), min_pixels=min_pixels)
    components, count = ndimage.label(kept, structure=np.ones((3, 3), bool))
    return [p for p in (mask_prompt(components == i, scale, margin, with_point, min_pixels) for i in range(1, count + 1))
            if p is not None]


def native_to_model_xy(xy: np.ndarray, theta: torch.Tensor, slice_shape: tuple[int, int], size: int) -> np.ndarray:
    """(N,2) pixel positions (x, y) on a native slice -> positions on a ``size`` x ``size`` model grid.

    ``theta`` is ``preprocessing.slice_to_model_theta`` (model -> native, normalised, align_corners=False:
    pixel p of n sits at normalised (2p + 1) / n - 1).
    """
    height, width = slice_shape
    t = theta.detach().cpu().double().numpy()
    native = (2.0 * np.asarray(xy, float) + 1.0) / np.array([width, height]) - 1.0
    model = np.linalg.solve(t[:, :2], (native - t[:, 2]).T).T
    return (model + 1.0) * size / 2.0 - 0.5


def mask_pixel_mm(theta: torch.Tensor, width: int, spacing_x: float, mask_size: int) -> float:
    """Millimetres per pixel of the decoder's mask grid for a slice ``width`` pixels of ``spacing_x`` mm wide:
    the model grid spans theta_x x (slice width in mm)."""
    return float(theta[0, 0]) * width * spacing_x / mask_size
