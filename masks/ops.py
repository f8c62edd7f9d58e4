"""MASK arithmetic shared by every node that takes or makes a mask (pure torch).

The contract of every node of the pack: a MASK from anywhere (core nodes, SAM, other packs, the mask editor) of any
size and batch is accepted and aligned to a grid the same way everywhere:
- batch: a single mask applies to every image; otherwise there must be one mask per image;
- size: the mask is stretched to the image's frame (a different aspect ratio is allowed and logged by the node);
- grid: a grid cell (latent pixel, or attention-map cell) takes the *area average* of the mask pixels it covers, and
  for binary use it is inside when that coverage is >= 0.5. A mask drawn on the 8x8-pixel blocks of the latent grid
  therefore maps exactly onto the latent.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class MaskError(ValueError):
    """A mask that cannot be used as given (message names the input and the fix)."""


BINARY_COVERAGE = 0.5  # a grid cell is inside a binary mask when at least half of its pixels are


def as_mask_batch(mask: torch.Tensor, batch: int, name: str = "mask") -> torch.Tensor:
    """Normalise a MASK to float [batch, H, W] in [0, 1]: [H, W], [B, H, W] or [B, 1, H, W]; batch 1 broadcasts."""
    if not isinstance(mask, torch.Tensor):
        raise MaskError(f"`{name}` is not a MASK tensor (got {type(mask).__name__})")
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    elif m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    elif m.ndim != 3:
        raise MaskError(f"`{name}` has shape {tuple(mask.shape)}; a MASK is [batch, height, width]")
    if m.shape[0] == 0 or m.shape[-1] == 0 or m.shape[-2] == 0:
        raise MaskError(f"`{name}` has shape {tuple(mask.shape)}: no pixels; connect a MASK with at least one pixel "
                        "(e.g. from Load Image, Solid Mask or a mask node)")
    if m.shape[0] not in (1, batch):
        raise MaskError(f"`{name}` has a batch of {m.shape[0]} masks for {batch} image(s); connect one mask, or one "
                        "per image")
    if torch.isnan(m).any():
        raise MaskError(f"`{name}` contains NaN values")
    return m.clamp(0, 1).expand(batch, -1, -1)


def _coverage(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in]: the share of output cell i covered by input pixel j when both span the same frame (rows sum
    to 1). Exact area weights for any ratio, up or down."""
    edges = torch.arange(n_out + 1, dtype=torch.float64) * (n_in / n_out)
    pixels = torch.arange(n_in + 1, dtype=torch.float64)
    lo = torch.maximum(edges[:-1, None], pixels[None, :-1])
    hi = torch.minimum(edges[1:, None], pixels[None, 1:])
    return ((hi - lo).clamp_min(0) * (n_out / n_in)).float()


def mask_to_grid(mask: torch.Tensor, grid_hw: tuple[int, int], binary: bool = False) -> torch.Tensor:
    """[B, H, W] mask -> [B, 1, h, w] on a grid by exact area averaging: each cell is the share of its area that the
    mask covers, for any ratio of sizes (whole-pixel pooling when the sides divide)."""
    m = mask[:, None].float()
    h, w = grid_hw
    if m.shape[-2] % h == 0 and m.shape[-1] % w == 0:
        grid = F.avg_pool2d(m, (m.shape[-2] // h, m.shape[-1] // w))
    else:  # each cell takes the mask pixels it overlaps, weighted by the overlap's area (torch's "area" resize is
        # adaptive pooling over whole-pixel bins, not this, when the ratio is not an integer)
        rows, cols = _coverage(m.shape[-2], h).to(m), _coverage(m.shape[-1], w).to(m)
        grid = torch.einsum("ip,bcpq,jq->bcij", rows, m, cols)
    return (grid >= BINARY_COVERAGE).float() if binary else grid.clamp(0, 1)


def dilate(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Max-pool dilation of a [B, 1, h, w] mask by `radius` cells ((2r+1)x(2r+1) square)."""
    if radius <= 0:
        return mask
    return F.max_pool2d(mask, 2 * radius + 1, 1, radius)


def grid_to_image(mask: torch.Tensor, image_hw: tuple[int, int], smooth: bool = False) -> torch.Tensor:
    """[B, 1, h, w] grid mask -> MASK [B, H, W] at image resolution (nearest, or bilinear when `smooth`)."""
    mode = {"mode": "bilinear", "align_corners": False} if smooth else {"mode": "nearest"}
    return F.interpolate(mask.float(), size=image_hw, **mode)[:, 0].clamp(0, 1)


def aspect_mismatch(mask_hw: tuple[int, int], image_hw: tuple[int, int], tolerance: float = 0.01) -> bool:
    """True when the mask's aspect ratio differs from the image's by more than `tolerance` (relative)."""
    a = mask_hw[1] / max(mask_hw[0], 1)
    b = image_hw[1] / max(image_hw[0], 1)
    return abs(a - b) > tolerance * b
