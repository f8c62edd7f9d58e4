"""Direct inversion ("PnP inversion", Ju et al., ICLR 2024, Alg. 1) and negative-prompt inversion (Miyake et al.
2023). Pure torch.

Direct inversion keeps the source branch on the DDIM-inversion path by adding, after each denoising step, the offset
d_t = z*_{t-1} - DDIM(z*_t, eps_cfg(z*_t, ∅, C)) computed once from the inversion latents with the plain
unconditional context. Negative-prompt inversion uses the source prompt's embedding as ∅_t at every step, which makes
the CFG prediction of the source branch equal to its conditional prediction.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .ddim import ddim_step


def direct_offsets(denoise: Callable[[torch.Tensor, float], torch.Tensor], latents: torch.Tensor,
                   sigmas: torch.Tensor, on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Offsets [S, *latent] with latents[i+1] == ddim_step(latents[i], denoise(latents[i])) + offsets[i] (Ju et al.
    2024, Alg. 1 lines 4-6). `latents` [S+1, ...] are aligned with the descending `sigmas`."""
    offsets = []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        z = latents[i]
        stepped = ddim_step(z, denoise(z, sigma), sigma, sigma_next)
        offsets.append(latents[i + 1] - stepped)
        if on_step is not None:
            on_step(i)
    return torch.stack(offsets)


def negative_prompt_uncond(source_context: torch.Tensor, steps: int) -> torch.Tensor:
    """∅_t := C_source for every step (Miyake et al. 2023, Eq. 8): [S, B, T, C]."""
    return source_context.detach().unsqueeze(0).expand(steps, *source_context.shape).clone()
