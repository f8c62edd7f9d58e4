"""MAG-Edit: mask-based attention-adjusted guidance of the target latent (Mao et al., ACM MM 2024). Pure torch.

Sec. 3 and Alg. 1 of the paper, on top of Prompt-to-Prompt refinement: before each of the first tau denoising steps,
the edit branch's latent z*_t is updated MAX_IT times by a gradient step, inside the edit mask only, that raises the
cross-attention of the new target word(s) inside the mask (Eq. 1 token ratio or Eq. 2 spatial ratio, Eq. 3 negative
words, Eq. 5 several weighted words, Eq. 4 update). The cross-attention maps are those of the semantic level (16x16
for SD1.5 at 512 px) AFTER the P2P injection, from a conditional-only pass of both branches (Alg. 1 lines 2-4).

Notation: A* the injected target-branch map [H, N, T] of one layer, M the edit mask on its N = h*w query grid, w a
word (token positions), sigma the k-diffusion sigma of the step, abar = 1 / (1 + sigma^2) the DDPM alpha-bar.

Differences (see docs/mag_edit.md):
- Eq. 2 uses the injected target map A* in both terms (the paper's in-mask term reads (A_t)_i, which for a word new
  in the target prompt has no source column; with the source map it would be a constant that does not move the
  gradient). The reference code's unused `compute_ca_SR` is 3 - 4s instead of lambda (1 - 2s) = 3 - 6s.
- Eq. 4 is applied to our latent x = z / sqrt(abar) (ComfyUI's model space); the reference's step on z becomes
  x <- x - M * delta * (1 + sigma^2) * grad_x L, the same update written in x.
- Masks are aligned by area coverage (masks/ops.py), not nearest sampling as in the reference.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..inversion.edit import StepContext, StepHook
from .layers import SEMANTIC_LEVEL
from .p2p import PromptToPrompt, token_alpha
from .run import COND, SOURCE, TARGET, CaptureComplete, CaptureSpec, LiveMap
from .tokens import CHUNK, clean_word

log = logging.getLogger(__name__)

MAX_IT = 15  # Sec. 4.1 "MAX_IT = 15" (reference network.py: fixed count, no convergence test)
TAU = 25  # Sec. 4.1: guidance during the first tau = 25 of 50 DDIM steps (reference: steps 0-24)
SCALE = 2.5  # reference update_latent_TR: delta_t = 2.5 * sqrt((1 - abar_t) / abar_t)
SR_LAMBDA = 3.0  # Eq. 2: "we set lambda = 3 empirically"
LAMBDA_P = 1.0  # Eq. 3: positive weight (values are in the unreleased SM; 1 keeps L unscaled)
LAMBDA_NG = 1.0  # Eq. 3: negative weight (reference's dead `loss3_ngscale` is 5.5; unverified, not used)
BLEND_STEPS = 15  # reference edit.py: latent blend with the dilated mask for the last 15 of 50 steps
BLEND_DILATION = 1  # reference: 3x3 max-pool of the latent-resolution mask
WEIGHT_TOLERANCE = 1e-3  # Eq. 5 weights must sum to 1 up to this
CONSTRAINTS = ("token_ratio", "spatial_ratio")
EPS = 1e-12
STATE_KEY = "mag_edit"  # ctx.state entry: per-step traces of the loss and the in-mask ratios


class WordWeightError(ValueError):
    """Target words whose weights cannot be used (message names the input and the fix)."""


# ------------------------------------------------------------------------------------------------ constraints
def fold_repeats(maps: torch.Tensor, width: int) -> torch.Tensor:
    """[..., T] -> [..., width]: sum the copies of a prompt that ComfyUI repeated to the batch's token length.

    A context shorter than the batch's is repeated whole (lcm rule), so its columns appear T / width times with equal
    attention; summing them keeps every ratio of Eq. 1-2 as if the prompt were not repeated.
    """
    tokens = maps.shape[-1]
    if tokens == width:
        return maps
    if width <= 0 or tokens % width:
        raise ValueError(f"cross-attention over {tokens} tokens does not hold whole copies of a {width}-token prompt")
    return maps.unflatten(-1, (tokens // width, width)).sum(-2)


def token_ratio(maps: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """Per-query share of a word in the attention row: (A*)_w / sum_T A* -> [..., N] (inner term of Eq. 1).

    maps [..., N, T]. A multi-token word takes the mean of its token columns (reference compute_ca_TR); the
    denominator is the full row of the injected map, whose aligned columns come from the source branch.
    """
    word = maps[..., list(tokens)].mean(-1)
    return word / maps.sum(-1).clamp_min(EPS)


def in_mask_token_ratio(maps: torch.Tensor, mask: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """(1/|M|) sum_{p in M} token_ratio(p) per head: maps [H, N, T], mask [N] in {0, 1} -> [H] (Eq. 1)."""
    return (token_ratio(maps, tokens) * mask).sum(-1) / mask.sum().clamp_min(1.0)


def token_ratio_loss(maps: torch.Tensor, mask: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """Token-ratio constraint L_TR of one layer, Eq. 1 of Mao et al.: mean_h (1 - in-mask ratio_h)^2.

    Notation: maps = A* [H, N, T] after P2P injection, mask = M [N], tokens = the positions of the word s*_i.
    Differences: the square is taken per head and then averaged over heads, as the reference code does.
    """
    return ((1.0 - in_mask_token_ratio(maps, mask, tokens)) ** 2).mean()


def spatial_ratio(maps: torch.Tensor, mask: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """Share of a word's attention mass that lies inside the mask, per head: sum M*A*_w / sum A*_w -> [H] (Eq. 2)."""
    column = maps[..., list(tokens)].sum(-1)  # [H, N]
    return (column * mask).sum(-1) / column.sum(-1).clamp_min(EPS)


def spatial_ratio_loss(maps: torch.Tensor, mask: torch.Tensor, tokens: Sequence[int],
                       lam: float = SR_LAMBDA) -> torch.Tensor:
    """Spatial-ratio constraint L_SR of one layer, Eq. 2 of Mao et al.: mean_h lambda ((1 - s_h) - s_h).

    (1 - s) is the out-mask share and s the in-mask share of the word's attention (s = spatial_ratio).
    Differences: both terms use the injected target map (see the module docstring); per head, then head mean.
    """
    share = spatial_ratio(maps, mask, tokens)
    return (lam * ((1.0 - share) - share)).mean()


def word_loss(maps: Sequence[torch.Tensor], mask: torch.Tensor, tokens: Sequence[int], constraint: str,
              lam: float = SR_LAMBDA) -> torch.Tensor:
    """L_TR (Eq. 1) or L_SR (Eq. 2) of one word, averaged over the layers' maps (each [H, N, T])."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"`constraint` {constraint!r} is unknown; choose one of {', '.join(CONSTRAINTS)}")
    if not maps:
        raise ValueError("no semantic-level cross-attention maps were captured for the MAG-Edit constraint")
    if constraint == "token_ratio":
        losses = [token_ratio_loss(m, mask, tokens) for m in maps]
    else:
        losses = [spatial_ratio_loss(m, mask, tokens, lam) for m in maps]
    return torch.stack(losses).mean()


def total_loss(maps: Sequence[torch.Tensor], mask: torch.Tensor, targets: Sequence[tuple[Sequence[int], float]],
               negatives: Sequence[Sequence[int]] = (), constraint: str = "token_ratio", lam: float = SR_LAMBDA,
               lambda_p: float = LAMBDA_P, lambda_ng: float = LAMBDA_NG) -> torch.Tensor:
    """The guidance objective, Eq. 3 and Eq. 5 of Mao et al.: lambda_p sum_i lambda_i L^i - lambda_ng L_ng.

    targets: (token positions, lambda_i) per target word, weights summing to 1 (Eq. 5). negatives: token positions of
    the negative words; L_ng is the same constraint evaluated on them, averaged over the negative words (Eq. 3).
    Minimising it raises the targets' attention inside the mask and lowers the negatives'.
    """
    positive = sum(weight * word_loss(maps, mask, tokens, constraint, lam) for tokens, weight in targets)
    loss = lambda_p * positive
    if negatives:
        negative = torch.stack([word_loss(maps, mask, tokens, constraint, lam) for tokens in negatives]).mean()
        loss = loss - lambda_ng * negative
    return loss


# ------------------------------------------------------------------------------------------------ update
def step_size(sigma: float, scale: float = SCALE) -> float:
    """delta_t of Eq. 4 (reference update_latent_TR): scale * sqrt((1 - abar_t) / abar_t) = scale * sigma_t.

    With k-diffusion sigma, abar = 1 / (1 + sigma^2), so sqrt((1 - abar) / abar) is exactly sigma.
    """
    return float(scale) * float(sigma)


def guided_latent(x: torch.Tensor, grad: torch.Tensor, mask: torch.Tensor, sigma: float,
                  scale: float = SCALE) -> torch.Tensor:
    """Eq. 4 of Mao et al., z* <- z* - M * delta * grad_z L, applied to our latent x = z / sqrt(abar).

    x, grad [.., C, h, w] (grad = dL/dx), mask broadcastable, binary. Since x = z sqrt(1 + sigma^2), the reference's
    step on z is x <- x - M * delta * (1 + sigma^2) * dL/dx. Outside the mask x is returned bit-for-bit.
    """
    delta = step_size(sigma, scale) * (1.0 + float(sigma) ** 2)
    return torch.where(mask > 0, x - delta * grad, x)


def blend_outside(target: torch.Tensor, source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Latent blend of the last steps (reference edit.py): the target inside the (dilated) mask, the source outside."""
    return torch.where(mask > 0, target, source)


# ------------------------------------------------------------------------------------------------ words
def parse_weighted_words(spec: str, name: str = "target_words") -> list[tuple[str, float | None]]:
    """"yellow" or "yellow=0.6, striped=0.4" -> [(word, weight or None)], with a clear error for bad items."""
    out: list[tuple[str, float | None]] = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        word, sep, value = item.rpartition("=")
        if not sep:
            word, value = item, None
        word = clean_word(word)
        try:
            weight = None if value is None else float(value)
        except ValueError:
            weight = float("nan")
        if not word or (weight is not None and not weight == weight):
            raise WordWeightError(f"`{name}` item {item!r} is not a word or word=weight (e.g. \"yellow=0.6, "
                                  "striped=0.4\")")
        out.append((word, weight))
    return out


def resolve_weights(items: Sequence[tuple[str, float | None]], name: str = "target_words") -> list[tuple[str, float]]:
    """Eq. 5 weights lambda_i: all given and summing to 1, or none given (then equal, 1/I each)."""
    if not items:
        raise WordWeightError(f"`{name}` is empty; name the new word(s) of the target prompt to guide, e.g. \"yellow\"")
    given = [w for _, w in items if w is not None]
    if not given:
        return [(word, 1.0 / len(items)) for word, _ in items]
    if len(given) != len(items):
        raise WordWeightError(f"`{name}` gives weights for some words only ({', '.join(_show(items))}); give every "
                              "word a weight (summing to 1) or none (equal weights)")
    if any(w < 0 for w in given) or abs(sum(given) - 1.0) > WEIGHT_TOLERANCE:
        raise WordWeightError(f"`{name}` weights {', '.join(_show(items))} sum to {sum(given):g}; MAG-Edit's word "
                              "weights (Eq. 5) must be >= 0 and sum to 1, e.g. \"yellow=0.6, striped=0.4\"")
    return [(word, float(w)) for word, w in items]


def _show(items) -> list[str]:
    return [word if w is None else f"{word}={w:g}" for word, w in items]


# ------------------------------------------------------------------------------------------------ step hook
@dataclass(frozen=True, eq=False)
class MAGGuidance(StepHook):
    """Alg. 1 of Mao et al. as a step hook of the edit sampler: MAX_IT guided updates of the target latent before each
    of the first `guidance_steps` steps, and the source blended in outside the dilated mask in the last `blend_steps`.

    targets: ((token positions, weight), ...) of the target words; negatives: token positions of negative words
    (all in the target prompt, `token_width` = its token count). masks [B, 1, h, w] and blend_masks (dilated)
    [B, 1, h, w] on the latent grid, semantic_masks [B, N] on the `semantic_grid`, all binary, one per image.
    stop_after: number of semantic-level cross-attention sites; a guidance pass stops after the last one.
    """

    targets: tuple[tuple[tuple[int, ...], float], ...]
    negatives: tuple[tuple[int, ...], ...]
    masks: torch.Tensor
    blend_masks: torch.Tensor
    semantic_masks: torch.Tensor
    semantic_grid: tuple[int, int]
    token_width: int
    constraint: str = "token_ratio"
    scale: float = SCALE
    max_iterations: int = MAX_IT
    guidance_steps: int = TAU
    blend_steps: int = BLEND_STEPS
    sr_lambda: float = SR_LAMBDA
    lambda_p: float = LAMBDA_P
    lambda_ng: float = LAMBDA_NG
    stop_after: int | None = None

    NEEDS_GRAD = True

    def progress_units(self, steps: int) -> int:
        return min(self.guidance_steps, steps) * max(self.max_iterations, 0)

    def before_step(self, ctx: StepContext) -> None:
        if ctx.step >= self.guidance_steps or self.max_iterations <= 0:
            return
        run = ctx.denoiser.run
        saved = run.capture
        run.capture = CaptureSpec(cross_levels=frozenset({SEMANTIC_LEVEL}), self_levels=frozenset(),
                                  labels=frozenset({COND}), live=True, accumulate=False, stop_after=self.stop_after)
        trace = ctx.state.setdefault(STATE_KEY, {"loss": {}, "target_ratio": {}, "negative_ratio": {}})
        x = ctx.x.detach()
        try:
            for _ in range(self.max_iterations):
                ctx.report(1)  # progress bar + Cancel check, once per iteration
                x = self._iterate(ctx, x, trace)
        finally:
            run.capture = saved
            run.live.clear()
        ctx.x = x

    def after_step(self, ctx: StepContext) -> None:
        if self.blend_steps <= 0 or ctx.step < ctx.total_steps - self.blend_steps:
            return
        mask = self.blend_masks[ctx.image].to(ctx.x_next)
        x_next = ctx.x_next.clone()
        for s, t in zip(ctx.rows(SOURCE), ctx.rows(TARGET)):
            x_next[t] = blend_outside(x_next[t], x_next[s], mask)
        ctx.x_next = x_next

    def _iterate(self, ctx: StepContext, x: torch.Tensor, trace: dict) -> torch.Tensor:
        """One iteration of Alg. 1 lines 2-4: cond-only pass of both rows, constraint, masked gradient step."""
        run = ctx.denoiser.run
        tgt_rows = ctx.rows(TARGET)
        leaf = x[tgt_rows].clone().requires_grad_(True)  # a fresh leaf per iteration: no graph survives it
        with torch.enable_grad():
            x_in = x.clone()
            x_in[tgt_rows] = leaf
            run.live.clear()
            # CaptureComplete: every map the constraint needs is held, the rest of the UNet is skipped
            with contextlib.suppress(CaptureComplete):
                ctx.denoiser(x_in, ctx.sigma, context=ctx.context, labels=frozenset({COND}))
            maps = self.target_maps(run.live, ctx.roles)
            run.live.clear()
            # a copy: the node made the mask under inference mode, which autograd may not save
            mask = self.semantic_masks[ctx.image].to(maps[0][0].device, torch.float32, copy=True)
            losses = [total_loss(m, mask, self.targets, self.negatives, self.constraint, self.sr_lambda,
                                 self.lambda_p, self.lambda_ng) for m in maps]
            loss = torch.stack(losses).sum()
            self._record(trace, ctx.step, loss, maps, mask)
            if not loss.requires_grad:  # the injected maps do not depend on the latent (nothing to guide)
                return x
            (grad,) = torch.autograd.grad(loss, leaf)
        out = x.clone()
        out[tgt_rows] = guided_latent(leaf.detach(), grad, self.masks[ctx.image].to(x), ctx.sigma, self.scale)
        return out

    def target_maps(self, live: Sequence[LiveMap], roles: Sequence[str]) -> list[list[torch.Tensor]]:
        """Per target row, the fp32 maps [H, N, T'] of every captured semantic-level cross layer (T' = token_width)."""
        layers = [m for m in live if m.kind == "cross" and COND in m.labels]
        if not layers:
            raise ValueError("MAG-Edit captured no semantic-level cross-attention maps in its guidance pass; the "
                             "model's attention layers are not dispatched by Attention Edit (another node patches "
                             "them?) or the model has no such layers")
        out = []
        for branch in (i for i, r in enumerate(roles) if r == TARGET):
            rows = []
            for layer in layers:
                if tuple(layer.grid) != tuple(self.semantic_grid):
                    raise ValueError(f"MAG-Edit's mask was aligned to a {self.semantic_grid} attention grid but the "
                                     f"model's maps are {layer.grid}; use the inversion this node was given")
                row = layer.labels.index(COND) * len(roles) + branch
                rows.append(fold_repeats(layer.probs[row].float(), self.token_width))
            out.append(rows)
        return out

    def _record(self, trace: dict, step: int, loss: torch.Tensor, maps, mask: torch.Tensor) -> None:
        """Keep the loss and the in-mask token ratios of this iteration (floats) for logs and tests."""
        words = [t for t, _ in self.targets] + list(self.negatives)
        with torch.no_grad():  # per word: mean over target rows, layers and heads
            ratios = [torch.stack([in_mask_token_ratio(m, mask, tokens).mean() for rows in maps for m in rows]).mean()
                      for tokens in words]
            values = torch.stack([loss.detach().float()] + ratios).tolist()
        n_t = len(self.targets)
        trace["loss"].setdefault(step, []).append(values[0])
        trace["target_ratio"].setdefault(step, []).append(values[1:1 + n_t])
        trace["negative_ratio"].setdefault(step, []).append(values[1 + n_t:])


def source_copied_positions(controller, total_steps: int, guided_steps: int) -> set[int]:
    """Target token positions whose cross-attention Prompt-to-Prompt copies from the source at EVERY guided step.

    The constraint cannot raise such a word's own attention (its column does not depend on the target latent). Empty
    for controllers other than Prompt-to-Prompt.
    """
    if not isinstance(controller, PromptToPrompt) or guided_steps <= 0:
        return set()
    copied: set[int] | None = None
    for step in range(min(guided_steps, total_steps)):
        alpha = token_alpha(step, total_steps, controller.cross_windows)
        if controller.mode == "refine":
            alpha = alpha * controller.alphas.to(alpha)
        now = set((alpha[:CHUNK] > 0).nonzero().flatten().tolist())
        copied = now if copied is None else copied & now
    return copied or set()
