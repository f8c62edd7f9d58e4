"""Attention heat maps over an image (pure torch), for preview nodes."""

from __future__ import annotations

import torch

# Piece-wise linear "turbo"-like colour ramp: value 0 -> dark blue, 0.5 -> green/yellow, 1 -> red.
_RAMP = torch.tensor([[0.19, 0.07, 0.23], [0.11, 0.50, 0.95], [0.18, 0.90, 0.55], [0.98, 0.80, 0.15],
                      [0.80, 0.10, 0.05]])


def colorize(values: torch.Tensor) -> torch.Tensor:
    """[H, W] values in [0, 1] -> [H, W, 3] RGB."""
    v = values.clamp(0, 1) * (len(_RAMP) - 1)
    lo = v.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (v - lo).unsqueeze(-1)
    ramp = _RAMP.to(values.device)
    return ramp[lo] * (1 - frac) + ramp[lo + 1] * frac


def normalize_map(m: torch.Tensor) -> torch.Tensor:
    """Min-max normalise to [0, 1]; a constant map becomes all zeros (never NaN)."""
    m = m.float()
    span = m.max() - m.min()
    return torch.zeros_like(m) if span <= 0 else (m - m.min()) / span


def heatmap_overlay(image: torch.Tensor, amap: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """Blend the colourised, upsampled map [h, w] over IMAGE [H, W, 3] (values in [0, 1])."""
    h, w = image.shape[0], image.shape[1]
    up = torch.nn.functional.interpolate(amap[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)
    heat = colorize(normalize_map(up[0, 0]))
    return image[..., :3].float() * (1 - alpha) + heat * alpha


def heatmap_grid(image: torch.Tensor, maps: list[torch.Tensor], alpha: float = 0.55) -> torch.Tensor:
    """One IMAGE batch [K, H, W, 3]: the image with each map of `maps` overlaid."""
    return torch.stack([heatmap_overlay(image, m, alpha) for m in maps])
