"""Prompt-to-Prompt local-blend masks from a stored attention map (Hertz et al. 2023, Sec. 3.2). Pure torch.

The maths is the edit sampler's own (`attention.p2p.local_blend_mask`: the words' maps summed, max-pooled over a
(2k+1)x(2k+1) window on the attention grid, nearest-resized to the latent, divided by its maximum, thresholded), so a
mask made here from a store equals the one LocalBlend computes from the same maps.

Degenerate maps: an all-zero map gives an empty mask; an all-one (any constant positive) map gives a full mask (every
cell equals the maximum) -- never NaN.
"""

from __future__ import annotations

import torch

from ..attention.p2p import local_blend_mask

THRESHOLD = 0.3  # P2P notebooks' LocalBlend threshold
DILATION = 1  # P2P LocalBlend k = 1: 3x3 max-pool


def local_blend(maps: torch.Tensor, tokens: list[int], latent_hw: tuple[int, int], threshold: float = THRESHOLD,
                dilation: int = DILATION) -> tuple[torch.Tensor, torch.Tensor]:
    """P2P local-blend mask of one row. maps [h, w, T]; tokens: positions of the blend words.

    Returns (mask [H, W] in {0, 1} on the latent grid, heat [h, w]: the summed words' map normalised to max 1).
    """
    h, w, t = maps.shape
    mask = local_blend_mask(maps.reshape(1, h * w, t).float(), [list(tokens)], latent_hw, (h, w), threshold,
                            dilation)[0, 0]
    heat = maps[..., list(tokens)].float().sum(-1) if tokens else maps.new_zeros((h, w)).float()
    return mask, heat / heat.max().clamp_min(1e-12)
