"""Inversion and editing orchestration: which passes run, in which order, with which knobs. No ComfyUI import: the
model is reached through inversion/comfy_model.py, the maths lives in ddim.py, null_text.py, direct.py and edit.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..attention.run import CaptureSpec, RunState
from . import comfy_model, ddim, direct, edit, flow, null_text
from .conditioning import context_of, stack_conditioning
from .trajectory import FLOW_METHODS

DDIM_CFG = 1.0  # the inversion pass itself is conditional-only (guidance 1), as in every reference implementation


@dataclass
class ImageInversion:
    """Inversion of one image. latents [S+1, C, h, w] model space, aligned with the descending sigmas."""

    latents: torch.Tensor
    reconstruction: torch.Tensor  # [C, h, w] model space: what the source branch regenerates
    uncond: torch.Tensor | None = None  # [S, T, E]
    offsets: torch.Tensor | None = None  # [S, C, h, w]
    run: RunState | None = None  # the DDIM pass's RunState (captured maps), already cleared of per-call knobs
    iterations: int = 0  # null-text Adam iterations used


def _ddim_pass(model, source, negative, latent, sigmas, capture, progress) -> tuple[torch.Tensor, RunState]:
    run = RunState(sigmas, ("source",), capture=capture)
    box: dict = {}

    def algorithm(den, x):
        latents = ddim.invert(lambda z, s: den(z, s), x, sigmas, on_step=lambda i: progress(1, None))
        box["captured"] = run.captured()  # run_sampler clears the run when it returns
        return latents

    latents = comfy_model.run_sampler(model, source, negative, latent, sigmas, DDIM_CFG, algorithm, run)
    return latents[:, 0], box["captured"]


def ddim_inversion(model, source: list, negative: list, latent: torch.Tensor, sigmas: torch.Tensor,
                   capture: CaptureSpec | None = None,
                   progress: Callable[[int, torch.Tensor | None], None] = lambda n, x0: None
                   ) -> tuple[torch.Tensor, RunState]:
    """DDIM inversion of ONE image only (conditional, guidance 1): latents [S+1, C, h, w] (model space) and a
    RunState copy holding the maps `capture` asked for. For techniques that run their own second pass (DPL)."""
    return _ddim_pass(model, source, negative, latent, sigmas, capture or CaptureSpec(), progress)


def _sample_back(model, source, negative, latent, sigmas, cfg, x_T, progress, context=None) -> torch.Tensor:
    """Reconstruct by plain CFG DDIM sampling from x_T (optionally with a fixed context override)."""
    run = RunState(sigmas, ("source",))

    def algorithm(den, x):
        step = lambda z, s: den(z, s, context=context)  # noqa: E731
        return ddim.sample(step, x_T.to(x).unsqueeze(0), sigmas, on_step=lambda i, xn, d: progress(1, d))

    return comfy_model.run_sampler(model, source, negative, latent, sigmas, cfg, algorithm, run)[0]


def _flow_velocity(den, context=None) -> flow.Velocity:
    """The CFG-combined velocity of a flow model through the denoiser."""
    return lambda z, s: den(z, s, context=context, velocity=True)


def _flow_inversion_pass(model, source, negative, latent, sigmas, method, capture, progress
                         ) -> tuple[torch.Tensor, RunState]:
    """Flow-ODE inversion of ONE image with `method`'s solver (conditional, guidance 1, as the DDIM pass)."""
    run = RunState(sigmas, ("source",), capture=capture)
    solver = flow.solver_of(method)
    box: dict = {}

    def algorithm(den, x):
        latents = flow.invert(_flow_velocity(den), x, sigmas, solver, on_step=lambda i: progress(1, None))
        box["captured"] = run.captured()
        return latents

    latents = comfy_model.run_sampler(model, source, negative, latent, sigmas, DDIM_CFG, algorithm, run)
    return latents[:, 0], box["captured"]


def _flow_sample_back(model, source, negative, latent, sigmas, cfg, method, x_T, progress) -> torch.Tensor:
    """Reconstruct by integrating the flow ODE down from x_T with the inversion's solver."""
    run = RunState(sigmas, ("source",))
    solver = flow.solver_of(method)

    def algorithm(den, x):
        return flow.sample(_flow_velocity(den), x_T.to(x).unsqueeze(0), sigmas, solver,
                           on_step=lambda i, xn, d: progress(1, d))

    return comfy_model.run_sampler(model, source, negative, latent, sigmas, cfg, algorithm, run)[0]


def _null_text_pass(model, source, negative, latent, sigmas, cfg, latents, inner_steps, progress):
    run = RunState(sigmas, ("source",))
    uncond0 = context_of(negative, "negative")

    def algorithm(den, x):
        steps = len(sigmas) - 1
        lat = latents.to(x).clone()  # normal (non-inference) tensors: autograd saves the targets
        x_bar = lat[0].unsqueeze(0)
        emb = uncond0.to(x.device).float()
        embeddings, total_iters = [], 0
        for i in range(steps):
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            run.step = i
            with torch.no_grad():
                den(x_bar, sigma, labels=frozenset({0}))
                cond_out = den.outputs(0).detach()

            def predict(u, x_bar=x_bar, sigma=sigma, cond_out=cond_out):
                return den(x_bar, sigma, context={1: u}, labels=frozenset({1}), fill={0: cond_out})

            result = null_text.optimize_step(predict, x_bar, lat[i + 1].unsqueeze(0), emb, sigma,
                                             sigma_next, i, inner_steps, on_iteration=lambda it: progress(1, None))
            progress(inner_steps - result.iterations, None)
            emb, x_bar = result.uncond, result.x_next
            embeddings.append(emb[0])
            total_iters += result.iterations
        return torch.stack(embeddings), x_bar[0], total_iters

    return comfy_model.run_sampler(model, source, negative, latent, sigmas, cfg, algorithm, run, grad=True)


def _direct_pass(model, source, negative, latent, sigmas, cfg, latents, progress) -> torch.Tensor:
    run = RunState(sigmas, ("source",))

    def algorithm(den, x):
        return direct.direct_offsets(lambda z, s: den(z.unsqueeze(0), s)[0], latents.to(x), sigmas,
                                     on_step=lambda i: progress(1, None))

    return comfy_model.run_sampler(model, source, negative, latent, sigmas, cfg, algorithm, run)


def method_units(method: str, steps: int, inner_steps: int) -> int:
    """Progress units of the second pass of `method` (the DDIM pass is `steps` units)."""
    return steps * inner_steps if method == "null_text" else steps


def invert_image(model, source: list, negative: list, latent: torch.Tensor, sigmas: torch.Tensor, method: str,
                 cfg: float, *, inner_steps: int = null_text.NULL_TEXT_INNER_STEPS, capture: CaptureSpec | None = None,
                 progress: Callable[[int, torch.Tensor | None], None] = lambda n, x0: None) -> ImageInversion:
    """Invert ONE image (raw latent [1, C, h, w]) with `method` (trajectory.METHODS)."""
    if method in FLOW_METHODS:
        latents, run = _flow_inversion_pass(model, source, negative, latent, sigmas, method,
                                            capture or CaptureSpec(), progress)
        recon = _flow_sample_back(model, source, negative, latent, sigmas, cfg, method, latents[0], progress)
        return ImageInversion(latents, recon, run=run)
    latents, run = _ddim_pass(model, source, negative, latent, sigmas, capture or CaptureSpec(), progress)
    steps = len(sigmas) - 1
    if method == "null_text":
        uncond, recon, iters = _null_text_pass(model, source, negative, latent, sigmas, cfg, latents, inner_steps,
                                               progress)
        return ImageInversion(latents, recon, uncond=uncond, run=run, iterations=iters)
    if method == "direct":
        offsets = _direct_pass(model, source, negative, latent, sigmas, cfg, latents, progress)
        return ImageInversion(latents, latents[-1], offsets=offsets, run=run)
    if method == "negative_prompt":
        src = context_of(source, "source")
        uncond = direct.negative_prompt_uncond(src[0], steps)
        recon = _sample_back(model, source, negative, latent, sigmas, cfg, latents[0], progress, context={1: src})
        return ImageInversion(latents, recon, uncond=uncond, run=run)
    recon = _sample_back(model, source, negative, latent, sigmas, cfg, latents[0], progress)
    return ImageInversion(latents, recon, run=run)


def _to(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(like).clone()


def edit_image(model, trajectory, image: int, target: list, hooks: Sequence[edit.StepHook] = (), *,
               capture: CaptureSpec | None = None, pin_source: bool = False, grad: bool = False,
               progress: Callable[[int, torch.Tensor | None], None] = lambda n, x0: None,
               target_steps: torch.Tensor | None = None):
    """Run the source and target branches of image `image` of `trajectory` in lock-step.

    target_steps: [S, B, T, E] per-step target context (DPL's learned tokens in the target prompt) or None.

    Returns (final latents [2, C, h, w] model space (source, target), RunState copy with the captured maps, the
    hooks' state dict).
    """
    roles = ("source", "target")
    image_hw = (trajectory.latent_hw[0] * 8, trajectory.latent_hw[1] * 8)
    positive = stack_conditioning([trajectory.source, target], ["inversion source", "target"], image_hw)
    sigmas = trajectory.sigmas
    run = RunState(sigmas, roles, capture=capture or CaptureSpec(), image=image)
    latent = torch.zeros((2, *trajectory.latents.shape[2:]))
    # flow inversions: the branches integrate the flow ODE with the inversion's solver; UNets: DDIM (solver None)
    solver = flow.solver_of(trajectory.method) if trajectory.method in FLOW_METHODS else None
    box: dict = {}

    def pick(t):
        return None if t is None else t[:, image]

    def algorithm(den, x):
        branch = edit.SourceBranch(_to(pick(trajectory.latents), x), _to(pick(trajectory.uncond), x),
                                   _to(pick(trajectory.cond), x), _to(pick(trajectory.offsets), x), pin=pin_source,
                                   target_cond=_to(pick(target_steps), x))
        x_T = branch.latents[0]
        out, state = edit.edit(den, torch.stack([x_T, x_T]), sigmas, roles, branch, hooks,
                               positive[0][0].to(x).clone(), lambda i, x_next, d: progress(1, d[1:]), image=image,
                               on_units=lambda n: progress(n, None), solver=solver)
        box["captured"], box["state"] = run.captured(), state
        return out

    final = comfy_model.run_sampler(model, positive, trajectory.negative, latent, sigmas, trajectory.cfg, algorithm,
                                    run, grad=grad)
    return final, box["captured"], box["state"]
