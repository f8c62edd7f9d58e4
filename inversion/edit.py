"""Two-branch editing loop shared by every technique (Prompt-to-Prompt, Hertz et al. 2023, Sec. 3; applied to real
images through an inversion as in Mokady et al. 2023, Sec. 4). Pure torch; the model is reached through a Denoiser.

The latent batch holds one row per *role*: the source branch regenerates the inverted image (following ∅_t or the
direct-inversion offsets), the target branch is generated from the same starting noise with the target prompt while
attention controllers on the model copy the source branch's attention into it. Step hooks (local blend, MAG-Edit
guidance, mask refinement) run before and after every DDIM step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .conditioning import repeat_tokens
from .ddim import ddim_step
from .flow import Solver, denoised_from_velocity


class Denoiser(Protocol):
    """CFG-combined x0 prediction for all rows, with optional per-call knobs (see attention/hooks.py wrapper)."""

    run: Any

    def __call__(self, x: torch.Tensor, sigma: float, *, context: dict | None = None,
                 labels: frozenset | None = None, fill: dict | None = None, velocity: bool = False
                 ) -> torch.Tensor: ...


@dataclass
class StepContext:
    """What a step hook sees. Hooks may replace `x` (before the step) or `x_next` (after it)."""

    step: int
    sigmas: torch.Tensor
    roles: tuple[str, ...]
    x: torch.Tensor
    denoiser: Denoiser
    context: dict[int, torch.Tensor]
    source_latents: torch.Tensor  # [S+1, C, h, w] inversion latents of this image
    x_next: torch.Tensor | None = None
    denoised: torch.Tensor | None = None
    state: dict = field(default_factory=dict)
    image: int = 0  # index of this image in the inversion batch (per-image masks)
    progress: Callable[[int], None] | None = None  # reports units of inner work; also checks for Cancel

    def report(self, units: int = 1) -> None:
        """Advance the progress bar by `units` (hooks' inner iterations) and raise if the user cancelled."""
        if self.progress is not None:
            self.progress(units)

    @property
    def sigma(self) -> float:
        return float(self.sigmas[self.step])

    @property
    def sigma_next(self) -> float:
        return float(self.sigmas[self.step + 1])

    @property
    def total_steps(self) -> int:
        return len(self.sigmas) - 1

    def rows(self, role: str) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == role]


class StepHook:
    """Base of per-step hooks installed by patch nodes (frozen subclasses; per-run state goes in ctx.state)."""

    def __deepcopy__(self, memo):
        return self

    def before_step(self, ctx: StepContext) -> None:
        pass

    def after_step(self, ctx: StepContext) -> None:
        pass

    def progress_units(self, steps: int) -> int:
        """Inner units this hook reports through `ctx.report` over a run of `steps` steps (for the progress bar)."""
        return 0


@dataclass
class SourceBranch:
    """How the source rows follow the inversion: per-step contexts and offsets of ONE image."""

    latents: torch.Tensor  # [S+1, C, h, w]
    uncond: torch.Tensor | None = None  # [S, T, E]
    cond: torch.Tensor | None = None  # [S, T, E]
    offsets: torch.Tensor | None = None  # [S, C, h, w]
    pin: bool = False  # teacher-force the source rows onto the inversion latents after every step
    target_cond: torch.Tensor | None = None  # [S, T, E] per-step target context (DPL: learned tokens of kept nouns)


def step_context(source: SourceBranch, step: int, roles: Sequence[str], target_context: torch.Tensor | None
                 ) -> dict[int, torch.Tensor]:
    """Context overrides {label: [B, T, E]} for one step: ∅_t for every row, learned source tokens for source rows
    and, when given, the per-step target context for the other rows."""
    context: dict[int, torch.Tensor] = {}
    if source.uncond is not None:
        context[1] = source.uncond[step].unsqueeze(0)
    if source.cond is not None:
        if target_context is None:
            raise ValueError("per-step source tokens need the target context of the other rows")
        learned = repeat_tokens(source.cond[step].unsqueeze(0), target_context.shape[1])[0]  # lcm-padded batch
        target = None if source.target_cond is None else \
            repeat_tokens(source.target_cond[step].unsqueeze(0), target_context.shape[1])[0]
        rows = [learned if r == "source" else target_context[i] if target is None else target
                for i, r in enumerate(roles)]
        context[0] = torch.stack(rows)
    return context


def edit(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, roles: Sequence[str], source: SourceBranch,
         hooks: Sequence[StepHook] = (), target_context: torch.Tensor | None = None,
         on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None, *, image: int = 0,
         on_units: Callable[[int], None] | None = None, solver: Solver | None = None) -> tuple[torch.Tensor, dict]:
    """Run the lock-step DDIM loop over all rows of `x` [B, C, h, w]; returns (final latents [B, C, h, w], the
    hooks' shared state dict).

    `solver` (flow models): a flow.py step that integrates the flow ODE on the model's velocity instead of DDIM; the
    hooks then see the x0 estimate x - sigma * v at the step's start as `denoised`.

    `target_context` [B, T, E] is the conditional context of every row (needed only with per-step source tokens).
    `image` is the index of this image in its batch and `on_units` the progress callback, both handed to hooks.
    """
    roles = tuple(roles)
    src_rows = [i for i, r in enumerate(roles) if r == "source"]
    state: dict = {}
    for i in range(len(sigmas) - 1):
        denoiser.run.step = i
        ctx = StepContext(i, sigmas, roles, x, denoiser, step_context(source, i, roles, target_context),
                          source.latents, state=state, image=image, progress=on_units)
        for hook in hooks:
            hook.before_step(ctx)
        if solver is None:
            with torch.no_grad():  # hooks that need gradients (MAG-Edit) enable them themselves
                denoised = denoiser(ctx.x, ctx.sigma, context=ctx.context)
            x_next = ddim_step(ctx.x, denoised, ctx.sigma, ctx.sigma_next)
        else:
            with torch.no_grad():
                x_next, v = solver(lambda z, s, c=ctx.context: denoiser(z, s, context=c, velocity=True), ctx.x,
                                   ctx.sigma, ctx.sigma_next)
            denoised = denoised_from_velocity(ctx.x, v, ctx.sigma)
        if src_rows and source.pin:
            x_next[src_rows] = source.latents[i + 1].to(x_next)
        elif src_rows and source.offsets is not None:
            x_next[src_rows] = x_next[src_rows] + source.offsets[i].to(x_next)
        ctx.x_next, ctx.denoised = x_next, denoised
        for hook in hooks:
            hook.after_step(ctx)
        x = ctx.x_next
        if on_step is not None:
            on_step(i, x, denoised)
    return x, state
