"""Noise schedules in ComfyUI's (k-diffusion, "VE") parameterisation. Pure torch.

ComfyUI samples `x = x0 + sigma * eps` in model space; the UNet sees the DDPM ("VP") latent `z = x / sqrt(1 + sigma^2)`
and `alpha_bar = 1 / (1 + sigma^2)`. A DDIM schedule of S steps uses the "leading" timesteps with offset 1 of the
Prompt-to-Prompt / null-text reference setting, t_i = 1 + i * (1000 // S), which is exactly ComfyUI's `ddim_uniform`
scheduler whenever 1000 // S * S >= 1000 - (1000 // S) (50, 25, 20, 10 steps, ...).

Differences from the diffusers reference: the last step ends at sigma = 0 (the clean estimate) rather than at
alpha_bar_0 (sigma ~ 0.029), as every ComfyUI schedule does.
"""

from __future__ import annotations

import torch


def ddim_timesteps(steps: int, train_steps: int = 1000) -> list[int]:
    """DDIM timesteps, ascending: 1, 1 + k, ..., with k = train_steps // steps (Song et al. 2021, Sec. 4.2)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    stride = max(train_steps // steps, 1)
    return [t for t in (1 + i * stride for i in range(steps)) if t < train_steps]


def ddim_sigmas(sigma_table: torch.Tensor, steps: int) -> torch.Tensor:
    """Descending sigmas [S+1] for a DDIM run of `steps`, ending in 0. `sigma_table` is model_sampling.sigmas [1000]."""
    ts = ddim_timesteps(steps, len(sigma_table))
    sig = sigma_table.detach().float().cpu()[torch.tensor(ts[::-1])]
    return torch.cat([sig, sig.new_zeros(1)])


def alpha_bar(sigma: torch.Tensor | float) -> torch.Tensor:
    """alpha_bar_t = 1 / (1 + sigma_t^2)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    return 1.0 / (1.0 + sigma**2)


def to_vp(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Model-space latent at level sigma -> the DDPM latent z_t the UNet sees: x / sqrt(1 + sigma^2)."""
    return x / (1.0 + float(sigma) ** 2) ** 0.5


def flow_sigmas(sigma_table: torch.Tensor, steps: int) -> torch.Tensor:
    """Descending sigmas [S+1] for a flow model (Flux): ComfyUI's "simple" scheduler over model_sampling.sigmas
    (comfy/samplers.py simple_scheduler, the scheduler of the Flux example workflows), ending in 0.

    sigma_i = table[-(1 + int(i * len(table) / S))] for i < S; for Flux the first entry is 1 (pure noise)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    table = sigma_table.detach().float().cpu()
    stride = len(table) / steps
    sig = torch.stack([table[-(1 + int(i * stride))] for i in range(steps)])
    return torch.cat([sig, sig.new_zeros(1)])
