"""CPAM target masks (Vo et al., "Rethinking attentions in zero-shot real image editing", Sec. 3.4 "Mask
refinement", Alg. 1 line 2). Pure torch.

Notation: M_s the source (object) mask, M_t the target mask, T_m the number of steps that use M_s before M_t takes
over. Masks here are float [B, 1, h, w] at latent resolution (masks/ops.py: `mask_to_grid` area-averages a MASK of any
size onto the latent grid); binary means values in {0, 1}.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops import BINARY_COVERAGE

# The paper only says M_t "can be cloned from M_s or derived from the generation process" and that objects should not
# be segmented closely; the numbers below are those of the author's earlier code (reference_implementations.md §11).
MASK_EXPAND_SCALE = 0.1  # expand_mask: square dilation of side floor(sqrt(area(M_s)) * 0.1) (rounded up to odd >= 3)
REFINE_THRESHOLD = 0.25  # refined M_t = min-max normalised object-token attention >= 0.25
REFINE_START_STEP = 5  # T_m: the class default STEP_CHANGE_MASK of the author's code (the paper gives no value)


def binarize(mask: torch.Tensor) -> torch.Tensor:
    """Float mask -> {0, 1} with the pack's coverage rule (>= 0.5 inside)."""
    return (mask >= BINARY_COVERAGE).to(mask.dtype)


def expand_mask(mask: torch.Tensor, scale: float = MASK_EXPAND_SCALE) -> torch.Tensor:
    """M_t cloned from M_s and dilated so the object is not segmented closely (Sec. 3.4, last sentence).

    mask [B, 1, h, w] (binarised first). Each non-empty image is max-pool dilated by a centred square of side
    `dilation_side(area, scale)` latent cells, area = its number of inside cells: every non-empty mask grows by at
    least one cell on every side when scale > 0. scale = 0 (or an empty mask) clones M_s as is.

    Differences: the author's code dilates with a square kernel of side floor(sqrt(area) * scale) exactly, which
    grows nothing while that side is below 2 (objects under about 10% of a 512 px image at scale 0.1) and grows an
    even side unevenly; here the side is rounded UP to an odd number of at least 3, so the dilation is centred and
    always acts: at most one cell more than the author's kernel on each side.
    """
    binary = binarize(mask)
    out = []
    for m in binary:
        radius = dilation_side(float(m.sum()), scale) // 2
        out.append(F.max_pool2d(m[None], 2 * radius + 1, 1, radius)[0] if radius > 0 else m)
    return torch.stack(out)


def dilation_side(area: float, scale: float = MASK_EXPAND_SCALE) -> int:
    """Side (odd, in latent cells) of the centred square that `expand_mask` dilates a mask of `area` cells with.

    floor(sqrt(area) * scale) as in the author's `expand_mask`, rounded up to the next odd number, at least 3 when
    scale > 0 and the mask is non-empty; 1 (no growth) when scale = 0 or area = 0. Examples: the shipped workflows'
    cat box (21 x 35 = 735 cells at 512 px, side floor(2.71) = 2) -> 3, i.e. one cell on every side; area 2500,
    scale 0.1 -> side 5 -> 5; area 3600 -> side 6 -> 7.
    """
    if scale <= 0.0 or area <= 0.0:
        return 1
    side = int(math.floor(math.sqrt(area) * scale))
    return max(3, side + 1 - side % 2)


def mask_from_attention(maps: torch.Tensor, tokens: list[int], grid: tuple[int, int], latent_hw: tuple[int, int],
                        threshold: float = REFINE_THRESHOLD) -> torch.Tensor:
    """Refined target mask M_t from the object tokens' cross-attention (Sec. 3.4 "Mask refinement").

    maps [N, T]: the target row's cross-attention averaged over heads, layers and the steps so far (N = grid cells).
    The object tokens' columns are averaged, nearest-resized to the latent, min-max normalised and thresholded.
    Returns [1, 1, h, w] in {0, 1}; all zeros when the map is flat (nothing to threshold).

    Differences: the paper says only "aggregating cross-attention maps". As in the author's code the aggregate is
    the running mean over steps, min-max normalised, threshold 0.25; the author's code also normalises every layer by
    its own maximum and uses all 16 layers, here the pack's semantic level (the 16x16 maps at 512 px) is used.
    """
    m = maps[:, tokens].float().mean(-1).view(1, 1, *grid)
    m = F.interpolate(m, size=latent_hw, mode="nearest")
    low, high = m.min(), m.max()
    if float(high - low) <= 0.0:
        return torch.zeros_like(m)
    return ((m - low) / (high - low) >= threshold).float()
