"""Null-text inversion (Mokady et al., CVPR 2023, Alg. 1): per-step unconditional embeddings that make CFG sampling
retrace the DDIM-inversion trajectory. Pure torch; the model is reached through callables.

Notation: x_bar_t = the reconstructed latent being followed, z*_t = the DDIM inversion latent, ∅_t = the optimised
unconditional context, w = guidance scale. Loss (Alg. 1, line 9): || z*_{t-1} - z_{t-1}(x_bar_t, ∅_t, C) ||^2,
evaluated in the DDPM latent space (our model space divided by sqrt(1 + sigma^2)) so the early-stop thresholds of the
reference code apply unchanged.

Differences from the paper: hyper-parameters are those of the official code (learning-rate decay, early stop with a
threshold that grows with the step), as listed below.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .ddim import ddim_step
from .schedule import to_vp

NULL_TEXT_LR0 = 1e-2  # Adam learning rate at step 0 (official code: 1e-2 * (1 - i / 100))
NULL_TEXT_LR_DECAY_STEPS = 100  # the learning rate decays linearly to 0 over 100 steps (reaches 0.51e-2 at i = 49)
NULL_TEXT_INNER_STEPS = 10  # at most 10 Adam iterations per step (official code num_inner_steps)
NULL_TEXT_EARLY_STOP = 1e-5  # stop when loss < 1e-5 + i * 2e-5 (official code early_stop_epsilon)
NULL_TEXT_EARLY_STOP_GROWTH = 2e-5


def null_text_lr(step: int) -> float:
    """Adam learning rate of step i: 1e-2 * (1 - i / 100)."""
    return NULL_TEXT_LR0 * (1.0 - step / NULL_TEXT_LR_DECAY_STEPS)


def null_text_threshold(step: int) -> float:
    """Early-stop threshold of step i: 1e-5 + i * 2e-5."""
    return NULL_TEXT_EARLY_STOP + step * NULL_TEXT_EARLY_STOP_GROWTH


@dataclass
class NullTextStep:
    """Result of optimising one step: the embedding, the next reconstructed latent, iterations and final loss."""

    uncond: torch.Tensor
    x_next: torch.Tensor
    iterations: int
    loss: float


def optimize_step(
    predict: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    target_next: torch.Tensor,
    uncond: torch.Tensor,
    sigma: float,
    sigma_next: float,
    step: int,
    inner_steps: int = NULL_TEXT_INNER_STEPS,
    on_iteration: Callable[[int], None] | None = None,
) -> NullTextStep:
    """Optimise ∅_t for one step (Alg. 1, lines 6-10) and advance x_bar (line 11).

    predict(uncond) -> CFG-combined x0_hat for latent `x` at `sigma` with unconditional context `uncond` (the
    conditional prediction is constant within the step and may be cached by the caller).
    uncond: the warm start (∅_{t+1} of the previous step) [B, T, C]; optimised in float32.
    """
    emb = uncond.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([emb], lr=null_text_lr(step))
    target_vp = to_vp(target_next.detach().float(), sigma_next)
    threshold = null_text_threshold(step)
    loss_value, iterations = float("inf"), 0
    for it in range(inner_steps):
        x_next = ddim_step(x, predict(emb), sigma, sigma_next)
        loss = torch.nn.functional.mse_loss(to_vp(x_next.float(), sigma_next), target_vp)
        loss_value, iterations = float(loss.detach()), it + 1
        if not loss.requires_grad:  # the prediction does not depend on ∅ (e.g. an analytic test model): nothing to fit
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_iteration is not None:
            on_iteration(it)
        if loss_value < threshold:
            break
    emb = emb.detach()
    with torch.no_grad():
        x_next = ddim_step(x, predict(emb), sigma, sigma_next)
    return NullTextStep(emb, x_next.detach(), iterations, loss_value)
