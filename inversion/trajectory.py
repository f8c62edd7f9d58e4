"""The value an inversion node hands to the edit nodes (custom type ATTNEDIT_INVERSION). Pure data.

Frozen: ComfyUI caches node outputs and several nodes may read the same inversion, so nothing may mutate it. Tensors
live on ComfyUI's intermediate device (CPU by default) and are moved to the compute device by whoever samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

UNET_METHODS = ("ddim", "null_text", "direct", "negative_prompt", "ddim_null_prompt")  # eps / v UNets (DDIM maths)
FLOW_METHODS = ("flow_euler", "rf_solver")  # rectified-flow models (Flux): inversion/flow.py
METHODS = UNET_METHODS + FLOW_METHODS
# DDIM inversion guided by the null text alone (no source prompt; CPAM Sec. 4.1 and its author's code): the inversion and
# the edit's source rows hear the negative prompt (empty = the null text) in both CFG halves.
NULL_PROMPT_DDIM = "ddim_null_prompt"


@dataclass(frozen=True, eq=False)
class InversionTrajectory:
    """An inverted image batch.

    Shapes (house alphabet): S steps, B images, C latent channels, h x w latent grid, T tokens, E embedding width.
    - sigmas [S+1]: descending schedule, sigmas[S] == 0.
    - latents [S+1, B, C, h, w]: DDIM-inversion latents z*_t in model space (x = x0 + sigma * eps form), aligned with
      sigmas: latents[0] is the starting noise latent, latents[S] the clean latent.
    - uncond [S, B, T, E] or None: per-step unconditional context ∅_t (null-text, negative-prompt inversion).
    - cond [S, B, T, E] or None: per-step source context (Dynamic Prompt Learning's learned tokens).
    - offsets [S, B, C, h, w] or None: direct-inversion offsets added to the source branch after step i.
    - source / negative: the CONDITIONING lists the inversion was made with (batch 1 each).
    """

    method: str
    sigmas: torch.Tensor
    latents: torch.Tensor
    source: list
    negative: list
    source_prompt: str
    negative_prompt: str
    cfg: float
    fingerprint: tuple
    uncond: torch.Tensor | None = None
    cond: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    psnr: tuple[float, ...] = ()
    source_tokens: Any = None
    extras: dict = field(default_factory=dict)

    def __deepcopy__(self, memo):
        return self

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def batch(self) -> int:
        return self.latents.shape[1]

    @property
    def latent_hw(self) -> tuple[int, int]:
        return (self.latents.shape[-2], self.latents.shape[-1])

    def describe(self) -> str:
        psnr = ", ".join(f"{p:.2f}" for p in self.psnr) or "n/a"
        return (f"{self.method} inversion, {self.steps} steps, cfg {self.cfg:g}, {self.batch} image(s) of latent "
                f"{self.latent_hw[0]}x{self.latent_hw[1]}, reconstruction PSNR {psnr} dB")
