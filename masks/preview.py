"""Preview pictures of masks (pure torch): a heat map of the map a mask came from and the mask over the image."""

from __future__ import annotations

import torch

from ..attention.visualize import heatmap_overlay

MASK_COLOR = (1.0, 0.15, 0.1)  # red tint inside the mask
MASK_ALPHA = 0.5
CANVAS_GREY = 0.5  # background of previews when no image is connected


def canvas(image_hw: tuple[int, int]) -> torch.Tensor:
    """A plain grey IMAGE frame [H, W, 3] to draw on when no picture is connected."""
    return torch.full((*image_hw, 3), CANVAS_GREY)


def mask_overlay(image: torch.Tensor, mask: torch.Tensor, alpha: float = MASK_ALPHA) -> torch.Tensor:
    """IMAGE [H, W, 3] with the mask [H, W] (same size, values 0..1) tinted red."""
    tint = torch.tensor(MASK_COLOR, dtype=torch.float32, device=image.device)
    weight = (mask.float().to(image.device) * alpha)[..., None]
    return image[..., :3].float() * (1 - weight) + tint * weight


def mask_preview(image: torch.Tensor, heat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Two preview frames [2, H, W, 3]: the heat map over the image, and the mask over the image."""
    return torch.stack([heatmap_overlay(image, heat), mask_overlay(image, mask)])
