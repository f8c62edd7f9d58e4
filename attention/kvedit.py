"""Background preservation on joint attention (Flux): KV-Edit (Zhu et al. 2025, "KV-Edit: Training-Free Image Editing
for Precise Background Preservation", Sec. 3.2-3.3), as the CPAM node's mask strategies run on Flux. Pure torch.

Notation: M the editable region (CPAM's target mask M_t, 1 = edit) on the latent grid, M' its image-token grid
(area coverage >= 0.5, masks/ops.py); the source row is pinned to the inversion latents z_i (PINS_SOURCE), so its
keys / values at step i are those of z_i, which KV-Edit caches during inversion.
- Attention (Sec. 3.2): in every joint-attention block, the target row's keys and values of the image tokens outside
  M' are replaced by the source row's, for every query (text and image): the background the target attends is the
  source's (CPAM's background preservation, Eq. 1, does the same on a UNet's self-attention).
- Latents (Sec. 3.3, Eq. 8): after every step the target latent outside M takes the source latent:
  x*_next <- x_next + M * (x*_next - x_next), so the result's background equals the inversion's source bit for bit.

Differences: KV-Edit regenerates only the foreground tokens (the background is never recomputed); here the target row
is a full image whose background tokens are computed and then overridden (same attention inputs, more compute).
KV-Edit's optional re-inversion and attention-mask tricks are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..inversion.edit import StepContext, StepHook
from ..masks.ops import mask_to_grid
from .joint import copy_keys
from .run import SOURCE, TARGET, AttnCall, Controller


@dataclass(frozen=True, eq=False)
class JointBackgroundKV(Controller):
    """Target keys / values of the image tokens outside the mask come from the source row (KV-Edit Sec. 3.2).

    masks [B, h, w] float on the latent grid (1 = editable), one per image of the inversion batch.
    """

    masks: torch.Tensor
    source_text: str | None = None
    target_text: str | None = None
    target_tokens: object = None
    target_conditioning: list | None = field(default=None, repr=False)

    EDITS_JOINT_KV = True
    PINS_SOURCE = True

    def active(self, call: AttnCall) -> bool:
        return call.run is not None and SOURCE in call.run.roles and TARGET in call.run.roles

    def background_positions(self, call: AttnCall, text: int, device: torch.device) -> torch.Tensor:
        """Positions in the joint sequence (text first) of the image tokens outside M' (run-memoised)."""
        def make():
            grid = mask_to_grid(self.masks[call.run.image][None].float(), call.grid, binary=True).flatten()
            return (torch.nonzero(grid == 0).flatten() + text).to(device)

        return call.run.memo((self, "background", call.run.image, call.grid, text, device), make)

    def edit_joint_kv(self, call: AttnCall, k: torch.Tensor, v: torch.Tensor, text: int):
        pairs = [(s, t) for label in dict.fromkeys(call.layout.labels)
                 for s, t in zip(call.role_rows(label, SOURCE), call.role_rows(label, TARGET))]
        positions = self.background_positions(call, text, k.device)
        if not pairs or positions.numel() == 0:
            return k, v
        return copy_keys(k, v, pairs, positions)


@dataclass(frozen=True, eq=False)
class BackgroundLatentBlend(StepHook):
    """After each step the target latent outside the mask is the source's (KV-Edit Sec. 3.3, Eq. 8; P2P's local blend
    with a fixed mask). masks [B, h, w] float on the latent grid (1 = editable); binarised at coverage 0.5."""

    masks: torch.Tensor

    def after_step(self, ctx: StepContext) -> None:
        mask = mask_to_grid(self.masks[ctx.image][None].float(), tuple(ctx.x_next.shape[-2:]), binary=True)[0]
        x_next = ctx.x_next.clone()
        mask = mask.to(x_next)
        for s, t in zip(ctx.rows(SOURCE), ctx.rows(TARGET)):
            x_next[t] = x_next[s] + mask * (x_next[t] - x_next[s])
        ctx.x_next = x_next
