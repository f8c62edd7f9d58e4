"""MaSaFusion sampling (Li, Yi, Li, Alg. 1 and Eq. 9-10; without adapter App. C Alg. 5 and Eq. 14): the source
branch, the T2I-Adapter intermediate image and the target image denoised in lock-step. No ComfyUI import: the model is
reached through inversion/comfy_model.py, the attention substitution lives in attention/fusion.py.

Streams and rows. The run keeps one latent per *stream* (source x^S, intermediate x^t2i, target x^T). Each DDIM step
evaluates one UNet batch with one row per noise prediction of the paper (attention/fusion.py roles):

    Alg. 1: rows (source, t2i_bar, t2i, target_bar, target) read streams (S, t2i, t2i, T, T)
    Alg. 5: rows (source, target_bar, target)               read streams (S, T, T)

and the two predictions of a stream are joined pixel-wise by the edit region A (Eq. 9, 10, 14):
eps(i) = eps_bar(i) for i not in A, eps_hat(i) for i in A. Rows of a pair see the same latent, so blending the
denoised estimates x0 = x - sigma * eps equals blending the noise predictions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..attention import fusion as attn_fusion
from ..attention.run import CaptureSpec, RunState
from . import comfy_model
from .conditioning import context_of, repeat_tokens, stack_conditioning
from .ddim import ddim_step
from .edit import SourceBranch


@dataclass(frozen=True)
class FusionLayout:
    """Roles of the UNet rows, the stream each row reads, and per stream its (bar row, hat row) pair or None."""

    roles: tuple[str, ...]
    row_stream: tuple[int, ...]
    pairs: tuple[tuple[int, int] | None, ...]
    target_stream: int
    intermediate_stream: int | None

    @property
    def streams(self) -> int:
        return len(self.pairs)


ALG1 = FusionLayout(attn_fusion.ALG1_ROLES, (0, 1, 1, 2, 2), (None, (1, 2), (3, 4)), target_stream=2,
                    intermediate_stream=1)
ALG5 = FusionLayout(attn_fusion.ALG5_ROLES, (0, 1, 1), (None, (1, 2)), target_stream=1, intermediate_stream=None)


# ------------------------------------------------------------------------------------------------ maths
def region_blend(bar: torch.Tensor, hat: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """(1 - 1_A) * bar + 1_A * hat: the pixel-wise choice of Eq. 9, 10 and 14 (region [.., 1, h, w] in {0, 1})."""
    return bar + region.to(bar) * (hat - bar)


def initial_target(source_T: torch.Tensor, noise_T: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """x_T^T = 1_{A^c} x_T^S + 1_A x (Alg. 1 line 7; Sec. 4.3): inverted noise outside A, the intermediate's noise
    inside."""
    return region_blend(source_T, noise_T, region)


def intermediate_start(noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """x_T^t2i = x, a Gaussian latent (Alg. 1 line 4), in ComfyUI's model space at the first sigma: sigma * n, as
    ComfyUI's samplers start from noise."""
    return noise * float(sigma)


def fusion_loop(den, streams: torch.Tensor, sigmas: torch.Tensor, layout: FusionLayout, region: torch.Tensor,
                source: SourceBranch, context: Callable[[int], dict],
                on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Lock-step DDIM over all streams [K, C, h, w] (Alg. 1 lines 5 and 8 in one loop); returns the final streams.

    Per step: one UNet batch over the rows of `layout`, Eq. 9/10/14 blend of each pair by `region`, DDIM step (Eq. 4).
    The source stream follows the inversion (direct-inversion offsets when `source.offsets`); the target stream gets
    the same offsets outside A, where Eq. 10 reproduces the source.

    Differences: the paper does not say how direct inversion treats the target; adding the offsets on A^c keeps the
    unedited region on the source path (with A empty the target is the source reconstruction) and leaves A to
    generate freely.
    """
    rows = torch.tensor(layout.row_stream)
    outside = 1.0 - region
    for i in range(len(sigmas) - 1):
        den.run.step = i
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        with torch.no_grad():
            denoised = den(streams[rows.to(streams.device)], sigma, context=context(i))
        joined = torch.stack([denoised[s] if pair is None else region_blend(denoised[pair[0]], denoised[pair[1]],
                                                                             region[0])
                              for s, pair in enumerate(layout.pairs)])
        x_next = ddim_step(streams, joined, sigma, sigma_next)
        if source.offsets is not None:
            offset = source.offsets[i].to(x_next)
            x_next[0] = x_next[0] + offset
            t = layout.target_stream
            x_next[t] = x_next[t] + outside[0].to(x_next) * offset
        streams = x_next
        if on_step is not None:
            on_step(i, streams, joined)
    return streams


def row_contexts(layout: FusionLayout, source: SourceBranch, negative: torch.Tensor, positive: torch.Tensor
                 ) -> Callable[[int], dict]:
    """Per-step context overrides {label: [R, T, E]}: rows conditioned on C^S (source and the eps_bar rows) use the
    inversion's per-step ∅_t (null-text / negative-prompt inversion) and per-step source tokens when present; the
    t2i and target rows use the plain negative prompt ∅ (Alg. 5: "instead of ∅_t, we should use empty embedding ∅").

    Differences: Eq. 9 writes ∅ for eps_bar while Eq. 14 writes ∅_t for the same eps_bar; ∅_t is used, so that eps_bar
    of a latent equal to the source's is the source branch's own prediction.
    """
    src_rows = [r in attn_fusion.SOURCE_PROMPT_ROLES for r in layout.roles]

    def per_row(step_ctx: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Rows of C^S take `step_ctx` [T, E]; the others their row of `other` [1 or R, T', E]."""
        length = math.lcm(step_ctx.shape[-2], other.shape[-2])
        mine = repeat_tokens(step_ctx.reshape(1, *step_ctx.shape[-2:]), length)[0]
        theirs = repeat_tokens(other, length)
        return torch.stack([mine if s else theirs[min(j, theirs.shape[0] - 1)] for j, s in enumerate(src_rows)])

    def context(step: int) -> dict:
        out = {}
        if source.uncond is not None:
            out[1] = per_row(source.uncond[step], negative)
        if source.cond is not None:
            out[0] = per_row(source.cond[step], positive)
        return out

    return context


# ------------------------------------------------------------------------------------------------ orchestration
def _to(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(like).clone()


def fuse_image(model, trajectory, image: int, target: list, region: torch.Tensor, noise: torch.Tensor | None,
               control=None, control_roles: frozenset[str] | None = None, *, capture: CaptureSpec | None = None,
               progress: Callable[[int, torch.Tensor | None], None] = lambda n, x0: None):
    """MaSaFusion of image `image` of `trajectory` on `model` (already patched with MaskedSelfAttentionFusion).

    region [1, 1, h, w] in {0, 1}: A on the latent grid. noise [C, h, w]: the Gaussian x of Alg. 1 (None: Alg. 5, no
    intermediate image). control: a ComfyUI ControlNet / T2I-Adapter object (from Apply ControlNet) attached to every
    row and every CFG chunk, reaching only rows with `control_roles`. Returns (final streams [K, C, h, w] model space in
    layout order, the layout, the RunState copy with captured maps).
    """
    layout = ALG1 if noise is not None else ALG5
    conds = [trajectory.source if r in attn_fusion.SOURCE_PROMPT_ROLES else target for r in layout.roles]
    positive = stack_conditioning(conds, list(layout.roles))
    if control is not None:
        positive[0][1]["control"] = control
        positive[0][1]["control_apply_to_uncond"] = True  # T2I-Adapter reference: features reach both CFG passes
    sigmas = trajectory.sigmas
    run = RunState(sigmas, layout.roles, capture=capture)
    run.control_roles = control_roles if control is not None else None
    latent = torch.zeros((len(layout.roles), *trajectory.latents.shape[2:]))
    negative = context_of(trajectory.negative, "negative")
    box: dict = {}

    def pick(t):
        return None if t is None else t[:, image]

    def algorithm(den, x):
        branch = SourceBranch(_to(pick(trajectory.latents), x), _to(pick(trajectory.uncond), x),
                              _to(pick(trajectory.cond), x), _to(pick(trajectory.offsets), x))
        x_src = branch.latents[0]
        area = region.to(x)
        if noise is None:
            streams = torch.stack([x_src, x_src])
        else:
            x_t2i = intermediate_start(noise.to(x), float(sigmas[0]))
            streams = torch.stack([x_src, x_t2i, initial_target(x_src, x_t2i, area[0])])
        context = row_contexts(layout, branch, negative.to(x), positive[0][0].to(x))
        t = layout.target_stream
        final = fusion_loop(den, streams, sigmas, layout, area, branch, context,
                            lambda i, s, d: progress(1, d[t:t + 1]))
        box["captured"] = run.captured()
        box["captured"].live = list(run.live)  # live maps (tests, previews) survive run_sampler's clear
        return final

    final = comfy_model.run_sampler(model, positive, trajectory.negative, latent, sigmas, trajectory.cfg, algorithm,
                                    run)
    return final, layout, box["captured"]
