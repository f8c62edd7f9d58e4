"""InstDiffEdit (Zou et al., AAAI 2024): instant attention masks during an SDEdit-style denoising, then an inpainting
finish driven by the last step's mask. Maths as pure torch functions; the model is reached through comfy_model.

Pipeline of one image (paper "Methodology" and "Implementation"; reference notes in docs/instdiffedit.md):
1. Eq. 1 (SDEdit start): the image latent x_0 is noised to the level of step int(S * (1 - r)) of an S-step schedule,
   with n noises in parallel (n latent rows of one batch);
2. at every later step the n rows are denoised together with CFG; the cross-attention of their conditional pass is
   averaged over the 16x16 layers, heads, the steps so far and the n rows, and the instant mask M_t of
   masks/instant.py (Eq. 6-9, roles fixed at the first step) is computed from it;
3. Eq. 5: x_{t-1} = M_t * (denoised step of x_t) + (1 - M_t) * y_{t-1}, y the original re-noised with the same noise;
4. finish: the last step's mask drives inpainting, with an SD inpainting model (9-channel input, ComfyUI's
   InpaintModelConditioning semantics) when one is connected, else masked denoising (Eq. 4 with a fixed mask) with
   the same model; "inpaint full frame" lets the 9-channel model repaint the whole frame as the reference's
   diffusers inpainting pipeline does.

UNet passes per image (S steps, strength r, finish denoise d, CFG > 1): int(S * r) batched calls of 2n rows (mask
phase) + int(S * d) calls of 2 rows (finish); no other pass. At the defaults (S 50, r 0.5, n 3, d 1): 25 calls of
6 rows + 50 calls of 2 rows.

Differences from the reference code:
- DDIM (eta 0, ComfyUI's ddim_uniform timesteps) instead of the LMS scheduler, in both phases;
- y is re-noised to the level the step arrives at (sigma_{t-1}); the reference re-noises to the level it left, a
  half-step mismatch on an auxiliary trajectory that is never decoded;
- the default finish ("inpaint") starts from x_0 + sigma_max * eps inside the mask (ComfyUI's k-diffusion form) and
  keeps the original outside it at every step, as ComfyUI does for an inpainting latent with a noise mask; the
  reference's diffusers inpainting pipeline runs the 9-channel model without latent blending ("inpaint full frame").
  With the node's feathered paste-back the regenerated region is the mask grown by `finish_cells` latent cells.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..attention.layers import SEMANTIC_LEVEL
from ..attention.run import COND, CaptureSpec, RunState
from ..masks import instant
from . import comfy_model
from .ddim import ddim_step

STRENGTH = 0.5  # r: noise strength of the SDEdit start (paper "Implementation")
STEPS = 50  # sampler steps (paper)
CFG = 7.5  # guidance scale (paper)
SEEDS = 3  # n: parallel denoising rounds whose attention is averaged (paper)
FINISH_DENOISE = 1.0  # the reference's inpainting pipeline runs at its default strength 1.0
FINISHES = ("inpaint", "blend only", "inpaint full frame")  # full frame: the reference's inpainting pipeline
TARGET = "target"

Denoise = Callable[[torch.Tensor, float], torch.Tensor]


class InstantEditError(ValueError):
    """Settings or models that InstDiffEdit cannot run with (message says what to change)."""


@dataclass(frozen=True)
class InstantSettings:
    """Knobs of one InstDiffEdit run, with the paper's defaults."""

    strength: float = STRENGTH
    steps: int = STEPS
    cfg: float = CFG
    seeds: int = SEEDS
    phi: float = instant.PHI
    gamma1: float = instant.GAMMA1
    gamma2: float = instant.GAMMA2
    finish: str = FINISHES[0]
    finish_denoise: float = FINISH_DENOISE


def steps_for(steps: int, strength: float, name: str = "strength") -> int:
    """Number of denoising steps at noise strength r: int(S * r) (diffusers img2img / the reference)."""
    count = min(int(steps * strength), steps)
    if count < 1:
        raise InstantEditError(f"`{name}` {strength:g} with {steps} steps leaves no denoising step; raise `{name}` "
                               f"to at least {1 / steps:.3f} or raise `steps`")
    return count


def blend(edited: torch.Tensor, original: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 4 / Eq. 5: M * edited + (1 - M) * original (mask broadcast over rows and channels)."""
    return mask * edited + (1.0 - mask) * original


def masked_denoise(denoise: Denoise, x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor,
                   mask_at: Callable[[int], torch.Tensor],
                   on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDEdit start (Eq. 1) and the blended DDIM loop (Eq. 5) along the descending `sigmas` [K+1].

    x0 [1 or B, C, h, w] clean latent, noise [B, C, h, w]; the rows start at x0 + sigma_0 * noise (model space).
    After each step's UNet call `mask_at(i)` gives M_t ([1 or B, 1, h, w], may read attention captured by that call),
    and x <- M_t * ddim_step(x) + (1 - M_t) * (x0 + sigma_{i+1} * noise). Returns (x [B, C, h, w], last mask).
    """
    x = x0 + float(sigmas[0]) * noise
    mask = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoise(x, sigma)
        mask = mask_at(i)
        x = blend(ddim_step(x, denoised, sigma, sigma_next), x0 + sigma_next * noise, mask)
        if on_step is not None:
            on_step(i, x, denoised)
    return x, mask


def seed_average(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Running-mean maps [n, N, T] of the n parallel rows -> one map [h, w, T] (mean over the n seeds)."""
    return maps.float().mean(0).view(grid[0], grid[1], maps.shape[-1])


def mask_phase(model, positive: list, negative: list, latent: torch.Tensor, sigmas: torch.Tensor, noise: torch.Tensor,
               words: list[list[int]], settings: InstantSettings,
               progress: Callable[[int, torch.Tensor | None], None] = lambda n, x0: None):
    """Steps 1-3 for ONE image: raw latent [1, C, h, w], full schedule `sigmas` [S+1], noise [n, C, h, w].

    Returns (rows after Eq. 5 [n, C, h, w] model space, last mask [1, 1, h, w], its refined map [h, w], roles).
    """
    count = steps_for(settings.steps, settings.strength)
    sub = sigmas[len(sigmas) - 1 - count:]
    rows = noise.shape[0]
    capture = CaptureSpec(cross_levels=frozenset({SEMANTIC_LEVEL}), labels=frozenset({COND}), accumulate=True)
    run = RunState(sub, (TARGET,) * rows, capture=capture)
    latent_hw = tuple(latent.shape[-2:])
    state: dict = {}

    def mask_at(i: int) -> torch.Tensor:
        maps = run.mean_map("cross", SEMANTIC_LEVEL)  # running mean over layers and steps so far, [n, N, T]
        if maps is None:
            raise InstantEditError("the model produced no cross-attention at the 16x16 level; InstDiffEdit needs an "
                                   "SD1.x / SD2.x / SDXL UNet and a positive prompt")
        amap = seed_average(maps, run.grids[("cross", SEMANTIC_LEVEL)])
        mask, refined, roles = instant.instant_mask(amap, words, latent_hw, phi=settings.phi, gamma1=settings.gamma1,
                                                    gamma2=settings.gamma2, roles=state.get("roles"))
        state.update(roles=roles, refined=refined)  # Eq. 8: the roles of the first step are kept
        return mask[None, None]

    def algorithm(den, x):
        def denoise(z, sigma):
            run.step = run.step_of(sigma)
            return den(z, sigma)

        out, mask = masked_denoise(denoise, x[:1], noise.to(x), sub, lambda i: mask_at(i).to(x),
                                   lambda i, xn, d: progress(1, d[:1]))
        state["mask"] = mask
        return out

    out = comfy_model.run_sampler(model, positive, negative, latent.repeat(rows, 1, 1, 1), sub, settings.cfg,
                                  algorithm, run)
    return out, state["mask"], state["refined"], state["roles"]


def finish_phase(model, positive: list, negative: list, latent: torch.Tensor, sigmas: torch.Tensor,
                 noise: torch.Tensor, mask: torch.Tensor, settings: InstantSettings,
                 progress: Callable[[int, torch.Tensor | None], None] = lambda n, x0: None) -> torch.Tensor:
    """Step 4 for ONE image: masked denoising of the raw latent [1, C, h, w] with the fixed mask [1, 1, h, w].

    `model` is the inpainting model (conditioning already carrying the concat image and mask) or the edit model.
    Returns the final latent [1, C, h, w] in model space; outside the mask it equals the input latent.
    """
    count = steps_for(settings.steps, settings.finish_denoise, "finish_denoise")
    sub = sigmas[len(sigmas) - 1 - count:]
    run = RunState(sub, (TARGET,))

    def algorithm(den, x):
        def denoise(z, sigma):
            run.step = run.step_of(sigma)
            return den(z, sigma)

        m = mask.to(x)
        out, _ = masked_denoise(denoise, x, noise.to(x), sub, lambda i: m, lambda i, xn, d: progress(1, d))
        return out

    return comfy_model.run_sampler(model, positive, negative, latent, sub, settings.cfg, algorithm, run)


# ------------------------------------------------------------------------------------------------ inpainting inputs
def is_inpaint_model(model) -> bool:
    """True for a MODEL whose UNet takes the mask and masked image as extra input channels (SD inpainting)."""
    base = getattr(model, "model", None)
    return bool(getattr(base, "inpaint_model", False)) or "masked_image" in tuple(getattr(base, "concat_keys", ()))


def inpaint_pixels(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ComfyUI InpaintModelConditioning's masked picture: IMAGE [B, H, W, 3] set to grey 0.5 where round(mask) is 1.

    mask [B, H, W] at the image size.
    """
    keep = (1.0 - mask.round())[..., None].to(image)
    return (image[..., :3] - 0.5) * keep + 0.5


def with_inpaint_inputs(conditioning: list, concat_latent: torch.Tensor, mask: torch.Tensor) -> list:
    """A copy of CONDITIONING carrying the inpainting model's extra inputs (InpaintModelConditioning's keys).

    concat_latent: raw latent of `inpaint_pixels`; mask [B, H, W] at the image size.
    """
    return [[t, dict(opts, concat_latent_image=concat_latent, concat_mask=mask)] for t, opts in conditioning]


def make_noise(seed: int, rows: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The n seeded noises [rows, *shape] (float32, CPU; one generator, as ComfyUI's prepare_noise)."""
    generator = torch.Generator().manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
    return torch.randn((rows, *shape), generator=generator, dtype=torch.float32)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the caller's RNG state afterwards.

    Some hosts' VAE encoders sample the latent posterior with the global RNG (ComfyUI 2024-03); encoding under a
    fixed seed makes the whole edit a function of `seed` on every host.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)
        yield
