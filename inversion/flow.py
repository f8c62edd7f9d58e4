"""Rectified-flow inversion and sampling (Flux-class models) in ComfyUI's CONST parameterisation. Pure torch.

ComfyUI's CONST model sampling (comfy/model_sampling.py) writes a latent at level sigma in [0, 1] as
x_sigma = (1 - sigma) * x0 + sigma * noise and has the model predict the velocity v = dx/dsigma = noise - x0
(denoised = x - sigma * v). The probability-flow ODE is dx/dsigma = v(x, sigma) (rectified flow, Liu et al. 2023,
Eq. 1); sampling integrates it from sigma = 1 down to 0, inversion integrates the same ODE upwards from the clean
latent at sigma = 0. `velocity(x, sigma) -> v` is any velocity field in model space (ComfyUI's CFG-combined raw model
output, see comfy_model.ComfyDenoiser(velocity=True)).

Two solvers, both usable in either direction (sigma_next > sigma inverts, sigma_next < sigma samples):
- Euler: x_next = x + (sigma_next - sigma) * v(x, sigma).
- RF-Solver (Wang et al. 2024, "Taming Rectified Flow for Inversion and Editing", Eq. 8 / Alg. 1 with a
  second-order Taylor expansion): the derivative of v along the trajectory is estimated from a half Euler step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
Solver = Callable[[Velocity, torch.Tensor, float, float], tuple[torch.Tensor, torch.Tensor]]

EULER = "flow_euler"
RF_SOLVER = "rf_solver"


def euler_step(velocity: Velocity, x: torch.Tensor, sigma: float, sigma_next: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step of dx/dsigma = v(x, sigma) from sigma to sigma_next; returns (x_next, v used).

    x_{sigma_next} = x_sigma + (sigma_next - sigma) * v(x_sigma, sigma)  (rectified flow, Liu et al. 2023, Eq. 1
    discretised; in inversion this is the "Euler inversion" of Wang et al. 2024, Eq. 5).
    """
    v = velocity(x, sigma)
    return x + (sigma_next - sigma) * v, v


def rf_solver_step(velocity: Velocity, x: torch.Tensor, sigma: float, sigma_next: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One RF-Solver step (Wang et al. 2024, Eq. 8 and Alg. 1, second order); returns (x_next, v at the start).

    x_{t_{i+1}} = x_{t_i} + h * v(x_{t_i}, t_i) + 1/2 * h^2 * v'(x_{t_i}, t_i), with h = t_{i+1} - t_i and the
    derivative estimated from a half Euler step: x_mid = x + h/2 * v, v' = (v(x_mid, t_i + h/2) - v) / (h/2).
    Notation: t = ComfyUI's sigma, h = sigma_next - sigma.
    Differences: none; algebraically this equals the explicit midpoint method x + h * v(x_mid, t + h/2), but it is
    evaluated in the paper's Taylor form.
    """
    h = sigma_next - sigma
    v = velocity(x, sigma)
    x_mid = x + (h / 2) * v
    v_mid = velocity(x_mid, sigma + h / 2)
    dv = (v_mid - v) / (h / 2)
    return x + h * v + 0.5 * h**2 * dv, v


SOLVERS: dict[str, Solver] = {EULER: euler_step, RF_SOLVER: rf_solver_step}


def solver_of(method: str) -> Solver:
    """The step function of flow method `method` (EULER or RF_SOLVER)."""
    if method not in SOLVERS:
        raise ValueError(f"flow method {method!r} is unknown; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[method]


def denoised_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """x0 estimate of a CONST latent: x - sigma * v (ComfyUI CONST.calculate_denoised)."""
    return x - sigma * v


def invert(velocity: Velocity, x0: torch.Tensor, sigmas: torch.Tensor, solver: Solver = euler_step,
           on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Invert a clean latent along the descending schedule `sigmas` [S+1] (last entry 0) by integrating the flow
    ODE upwards with `solver`. Returns latents [S+1, *x0.shape] aligned with `sigmas`: latents[S] = x0, latents[0] the
    inverted noise latent at sigmas[0]."""
    steps = len(sigmas) - 1
    latents = [x0]
    x = x0
    for j in range(steps):  # ascending: from sigmas[S - j] to sigmas[S - j - 1]
        x, _v = solver(velocity, x, float(sigmas[steps - j]), float(sigmas[steps - j - 1]))
        latents.append(x)
        if on_step is not None:
            on_step(j)
    return torch.stack(latents[::-1])


def sample(velocity: Velocity, x: torch.Tensor, sigmas: torch.Tensor, solver: Solver = euler_step,
           on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate the flow ODE down the descending schedule `sigmas` from x at sigmas[0];
    on_step(i, x_next, denoised estimate at step i)."""
    for i in range(len(sigmas) - 1):
        sigma = float(sigmas[i])
        x_next, v = solver(velocity, x, sigma, float(sigmas[i + 1]))
        if on_step is not None:
            on_step(i, x_next, denoised_from_velocity(x, v, sigma))
        x = x_next
    return x
