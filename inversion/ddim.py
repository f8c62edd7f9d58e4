"""Deterministic DDIM sampling and inversion (Song et al., ICLR 2021) in ComfyUI's sigma parameterisation. Pure torch.

Inversion starts from alpha_bar = 1 (ComfyUI sigma = 0) rather than alpha_bar_0, as the reference code does (see
`invert`).

`denoise(x, sigma) -> x0_hat` is any denoiser in model space (ComfyUI's CFG-combined denoised output). Working from
the denoised estimate keeps the maths the same for eps- and v-prediction models: the implied noise is always
eps = (x - x0_hat) / sigma.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


def ddim_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """One deterministic DDIM step from sigma to sigma_next (Song et al. 2021, Eq. 12 with sigma_t = 0 (eta = 0)).

    In the VE form x = x0 + sigma * eps, Eq. 12 reads x_next = x0_hat + sigma_next * eps_hat.
    Notation: x = sqrt(1 + sigma^2) * x_t, x0_hat = "predicted x_0", eps_hat = eps_theta(x_t).
    """
    if sigma == 0:
        return denoised
    eps = (x - denoised) / sigma
    return denoised + eps * sigma_next


def ddim_inverse_step(x: torch.Tensor, denoise: Denoise, sigma: float, sigma_next: float) -> torch.Tensor:
    """One DDIM inversion step from sigma up to sigma_next (Eq. 12 run backwards; Mokady et al. 2023, Sec. 3).

    Reference convention (P2P / null-text code): the noise is predicted from the *current* latent z_t but the UNet is
    told the *next* timestep, then x0 = x - sigma * eps and x_next = x0 + sigma_next * eps. In ComfyUI terms the same
    DDPM latent z_t is presented at level sigma_next, i.e. scaled by sqrt((1 + sigma_next^2) / (1 + sigma^2)).
    """
    scale = ((1.0 + sigma_next**2) / (1.0 + sigma**2)) ** 0.5
    x_in = x * scale
    eps = (x_in - denoise(x_in, sigma_next)) / sigma_next
    return x + (sigma_next - sigma) * eps


def invert(denoise: Denoise, x0: torch.Tensor, sigmas: torch.Tensor,
           on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """DDIM inversion of a clean latent along the descending schedule `sigmas` [S+1] (last entry 0).

    Returns latents [S+1, *x0.shape] aligned with `sigmas`: latents[S] = x0, latents[0] = x_T.

    Differences: the first inversion step starts from the clean latent at alpha_bar = 1 (ComfyUI's sigma = 0, the
    schedule's last entry), as the P2P / null-text reference code does (its x_0 is the VAE latent, with no noise), not
    from alpha_bar_0 = 1 - beta_0 (sigma ~ 0.029 for SD's table) that Song et al.'s discrete chain x_0 -> x_1 starts
    from. The difference is the first step's size only; the rest of the chain is Eq. 12 run backwards.
    """
    steps = len(sigmas) - 1
    latents = [x0]
    x = x0
    for j in range(steps):  # ascending: from sigmas[S - j] to sigmas[S - j - 1]
        sigma, sigma_next = float(sigmas[steps - j]), float(sigmas[steps - j - 1])
        x = ddim_inverse_step(x, denoise, sigma, sigma_next)
        latents.append(x)
        if on_step is not None:
            on_step(j)
    return torch.stack(latents[::-1])


def sample(denoise: Denoise, x: torch.Tensor, sigmas: torch.Tensor,
           on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Deterministic DDIM sampling along the descending schedule `sigmas`; on_step(i, x_next, denoised)."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        x = ddim_step(x, denoised, sigma, sigma_next)
        if on_step is not None:
            on_step(i, x, denoised)
    return x
