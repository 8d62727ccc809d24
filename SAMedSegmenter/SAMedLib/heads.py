"""Prompt-free segmentation heads on a SAM image embedding.

Every head maps an image embedding ``(B, 256, h, w)`` to class logits ``(B, num_classes + 1, 4h, 4w)``
(background first) in one forward pass:

- ``samed``: SAMed's head. The prompt encoder is reduced to its learned no-prompt dense embedding and the
  SAM mask decoder has ``num_classes + 1`` mask tokens, all returned.
- ``autosam_vit``: AutoSAM's ViT head. The mask decoder's two-way transformer with prompt tokens removed
  (no IoU token, no dense prompt), all class tokens decoded together.
- ``cnn``: a light convolutional decoder (two 2x transposed-conv stages).
- ``linear``: a 1x1 convolution on the embedding, bilinearly upsampled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone

__all__ = ["HEAD_NAMES", "build_head", "SamedHead", "AutoSamVitHead", "CnnHead", "LinearHead"]

HEAD_NAMES = ("samed", "autosam_vit", "cnn", "linear")


def _new_token_table(pretrained: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` tokens started from the pretrained mask token with a little noise to tell classes apart."""
    base = pretrained[0:1].expand(count, -1)
    return base + 0.02 * pretrained.std() * torch.randn(base.shape, generator=generator)


class SamedHead(nn.Module):
    """SAM mask decoder with num_classes+1 mask tokens and only the no-prompt dense embedding (SAMed)."""

    def __init__(self, backbone: Backbone, num_classes: int, seed: int = 0):
        super().__init__()
        from segment_anything.modeling import MaskDecoder, TwoWayTransformer

        source = backbone.mask_decoder
        self.no_mask_embed = nn.Embedding(1, source.transformer_dim)
        self.no_mask_embed.load_state_dict(backbone.prompt_encoder.no_mask_embed.state_dict())
        self.pe_layer = backbone.prompt_encoder.pe_layer  # fixed random Fourier features (a buffer)
        self.embedding_size = tuple(backbone.prompt_encoder.image_embedding_size)
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=num_classes,  # num_mask_tokens = num_classes + 1, as SAMed
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=source.transformer_dim, iou_head_depth=3, iou_head_hidden_dim=256)
        _load_matching(self.mask_decoder, source.state_dict())
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.mask_decoder.mask_tokens.weight.copy_(_new_token_table(source.mask_tokens.weight, num_classes + 1, gen))
            for mlp in self.mask_decoder.output_hypernetworks_mlps:
                mlp.load_state_dict(source.output_hypernetworks_mlps[0].state_dict())

    @property
    def hypernetworks(self) -> nn.ModuleList:
        return self.mask_decoder.output_hypernetworks_mlps

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings (B,256,h,w) -> logits (B,num_classes+1,4h,4w)."""
        return class_logits(*self.class_weights_and_features(embeddings))

    def class_weights_and_features(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each class's hypernetwork weights (B,K,C') and the upscaled features (B,C',4h,4w) they are dotted with."""
        decoder = self.mask_decoder
        b, c, h, w = embeddings.shape
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = tokens.unsqueeze(0).expand(b, -1, -1)
        src = embeddings + self.no_mask_embed.weight.reshape(1, -1, 1, 1)
        pos = self.pe_layer((h, w)).unsqueeze(0).expand(b, -1, -1, -1)
        hs, src = decoder.transformer(src, pos, tokens)
        mask_tokens_out = hs[:, 1:1 + decoder.num_mask_tokens, :]
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        return _hypernetwork_weights(self.hypernetworks, mask_tokens_out), upscaled


class AutoSamVitHead(nn.Module):
    """The mask decoder's transformer with prompt tokens removed (AutoSAM's ViT head), one pass for all classes."""

    def __init__(self, backbone: Backbone, num_classes: int, seed: int = 0):
        super().__init__()
        from segment_anything.modeling import TwoWayTransformer
        from segment_anything.modeling.common import LayerNorm2d
        from segment_anything.modeling.mask_decoder import MLP

        source = backbone.mask_decoder
        dim = source.transformer_dim
        self.pe_layer = backbone.prompt_encoder.pe_layer
        self.transformer = TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8)
        self.transformer.load_state_dict(source.transformer.state_dict())
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2), LayerNorm2d(dim // 4), nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2), nn.GELU())
        self.output_upscaling.load_state_dict(source.output_upscaling.state_dict())
        gen = torch.Generator().manual_seed(seed)
        self.class_tokens = nn.Parameter(_new_token_table(source.mask_tokens.weight.detach(), num_classes + 1, gen))
        self.hypernetworks = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(num_classes + 1))
        for mlp in self.hypernetworks:
            mlp.load_state_dict(source.output_hypernetworks_mlps[0].state_dict())

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings (B,256,h,w) -> logits (B,num_classes+1,4h,4w)."""
        return class_logits(*self.class_weights_and_features(embeddings))

    def class_weights_and_features(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each class's hypernetwork weights (B,K,C') and the upscaled features (B,C',4h,4w) they are dotted with."""
        b, c, h, w = embeddings.shape
        tokens = self.class_tokens.unsqueeze(0).expand(b, -1, -1)
        pos = self.pe_layer((h, w)).unsqueeze(0).expand(b, -1, -1, -1)
        hs, src = self.transformer(embeddings, pos, tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        return _hypernetwork_weights(self.hypernetworks, hs), upscaled


class CnnHead(nn.Module):
    """Light convolutional decoder: 3x3 conv blocks and two 2x transposed-conv upsamplings."""

    def __init__(self, backbone: Backbone, num_classes: int, width: int = 128, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        dim = backbone.mask_decoder.transformer_dim

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(8, cout), nn.GELU())

        self.layers = nn.Sequential(
            block(dim, width), block(width, width),
            nn.ConvTranspose2d(width, width // 2, 2, stride=2), block(width // 2, width // 2),
            nn.ConvTranspose2d(width // 2, width // 4, 2, stride=2), block(width // 4, width // 4),
            nn.Conv2d(width // 4, num_classes + 1, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings (B,256,h,w) -> logits (B,num_classes+1,4h,4w)."""
        return self.layers(embeddings)


class LinearHead(nn.Module):
    """A 1x1 convolution per embedding cell, upsampled 4x bilinearly."""

    def __init__(self, backbone: Backbone, num_classes: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.classifier = nn.Conv2d(backbone.mask_decoder.transformer_dim, num_classes + 1, 1)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """embeddings (B,256,h,w) -> logits (B,num_classes+1,4h,4w)."""
        return F.interpolate(self.classifier(embeddings), scale_factor=4, mode="bilinear", align_corners=False)


def _hypernetwork_weights(mlps: nn.ModuleList, tokens: torch.Tensor) -> torch.Tensor:
    """Each class token through its hypernetwork MLP: (B,K,256) -> (B,K,C')."""
    return torch.stack([mlp(tokens[:, i, :]) for i, mlp in enumerate(mlps)], dim=1)


def class_logits(weights: torch.Tensor, upscaled: torch.Tensor) -> torch.Tensor:
    """Dot product of each class's weights (B,K,C') with the upscaled features (B,C',H,W) (SAM's mask prediction)."""
    b, c, h, w = upscaled.shape
    return (weights @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)


def _load_matching(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy every pretrained tensor whose name and shape match (class-count-sized tensors are skipped)."""
    own = module.state_dict()
    module.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape}, strict=False)


def build_head(name: str, backbone: Backbone, num_classes: int, seed: int = 0) -> nn.Module:
    """Build a prompt-free head by name (HEAD_NAMES) for ``num_classes`` foreground classes."""
    heads = {"samed": SamedHead, "autosam_vit": AutoSamVitHead, "cnn": CnnHead, "linear": LinearHead}
    if name not in heads:
        raise ValueError(f"unknown head '{name}': expected one of {', '.join(HEAD_NAMES)}")
    if num_classes < 1:
        raise ValueError(f"need at least one foreground class, got {num_classes}")
    return heads[name](backbone, num_classes, seed=seed)
