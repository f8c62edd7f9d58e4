"""MAG-Edit: mask-based attention-adjusted guidance of the target latent (Mao et al., ACM MM 2024). Pure torch.

Sec. 3 and Alg. 1 of the paper, on top of Prompt-to-Prompt refinement: before each of the first tau denoising steps,
the edit branch's latent z*_t is updated MAX_IT times by a gradient step, inside the edit mask only, that raises the
cross-attention of the new target word(s) inside the mask (Eq. 1 token ratio or Eq. 2 spatial ratio, Eq. 3 negative
words, Eq. 5 several weighted words, Eq. 4 update). The cross-attention maps are those of the semantic level (16x16
for SD1.5 at 512 px) AFTER the P2P injection, from a conditional-only pass of both branches (Alg. 1 lines 2-4).

Notation: A* the injected target-branch map [H, N, T] of one layer, M the edit mask on its N = h*w query grid, w a
word (token positions), sigma the k-diffusion sigma of the step, abar = 1 / (1 + sigma^2) the DDPM alpha-bar.

Differences (see docs/mag_edit.md):
- Step windows: tau = 25 guided and 15 blended steps are the paper's counts at 50 steps; other step counts get the
  same fractions of the run (steps_at), which at 50 steps are the reference's steps 0-24 and 35-49.
- Eq. 1's denominator is the word plus the common tokens as the paper writes it (default); the reference code's full
  row is the `all_tokens` choice. They differ when the target prompt has other new tokens or the word has several.
- Eq. 2 uses the injected target map A* in both terms (the paper's in-mask term reads (A_t)_i, which for a word new
  in the target prompt has no source column; with the source map it would be a constant that does not move the
  gradient). The reference code's unused `compute_ca_SR` is 3 - 4s instead of lambda (1 - 2s) = 3 - 6s.
- Eq. 3: L_ng is the positive constraint evaluated on the negative words, inside the union of the masks (the paper
  defers it to its supplementary material; the reference's negative term is dead code).
- Eq. 4 is applied to our latent x = z / sqrt(abar) (ComfyUI's model space); the reference's step on z becomes
  x <- x - M * delta * (1 + sigma^2) * grad_x L, the same update written in x.
- Masks are aligned by area coverage (masks/ops.py), not nearest sampling as in the reference; with one mask per word
  the update region is their union (the reference adds the distinct masks, so an overlap would take a double step).
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
PAPER_STEPS = 50  # Sec. 4.1: the paper's (and the reference's) DDIM step count; step knobs are counted at it
TAU = 25  # Sec. 4.1: guidance during the first tau = 25 of 50 DDIM steps (reference: steps 0-24), the first half
SCALE = 2.5  # reference update_latent_TR: delta_t = 2.5 * sqrt((1 - abar_t) / abar_t)
SR_LAMBDA = 3.0  # Eq. 2: "we set lambda = 3 empirically"
LAMBDA_P = 1.0  # Eq. 3: positive weight (values are in the unreleased SM; 1 keeps L unscaled)
LAMBDA_NG = 1.0  # Eq. 3: negative weight (reference's dead `loss3_ngscale` is 5.5; unverified, not used)
BLEND_STEPS = 15  # reference edit.py: latent blend with the dilated mask for the last 15 of 50 steps (30%)
BLEND_DILATION = 1  # reference: 3x3 max-pool of the latent-resolution mask
WEIGHT_TOLERANCE = 1e-3  # Eq. 5 weights must sum to 1 up to this
CONSTRAINTS = ("token_ratio", "spatial_ratio")
# Eq. 1's denominator: the word + the common tokens (paper), or the whole row (reference compute_ca_TR)
DENOMINATORS = ("word_and_common", "all_tokens")
NEGATIVE_ROLE = "mag_negative"  # row role during the negative-prompt pass: no controller treats it as a target
EPS = 1e-12
STATE_KEY = "mag_edit"  # ctx.state entry: per-step traces of the loss and the in-mask ratios


class WordWeightError(ValueError):
    """Target words whose weights cannot be used (message names the input and the fix)."""


# ------------------------------------------------------------------------------------------------ step windows
def steps_at(count: int, total_steps: int, paper_steps: int = PAPER_STEPS) -> int:
    """A step count given at the paper's 50 steps, scaled to a run of `total_steps`: round(count * total / 50).

    Sec. 4.1 guides the first tau = 25 of 50 steps (the first half) and the reference blends the last 15 of 50; the
    same fractions hold at any step count. Rounds half up; a non-zero count keeps at least one step, and the result
    never exceeds the run. E.g. tau = 25 gives 5, 10, 25 guided steps at 10, 20, 50 steps; 15 blend steps give 3, 6, 15.
    """
    if count <= 0 or total_steps <= 0:
        return 0
    return min(total_steps, max(1, (2 * count * total_steps + paper_steps) // (2 * paper_steps)))


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


def common_columns(width: int, alphas: torch.Tensor | None, new_positions: Sequence[int] = ()) -> torch.Tensor:
    """[width] in {0, 1}: the target prompt's common tokens S of Eq. 1 (tokens that are also in the source prompt).

    alphas [77]: Prompt-to-Prompt refine's alignment flags (1 = aligned with a source token: SOT, EOT, padding and
    every unchanged word), repeated over the prompt's 77-token chunks. Without them (other modes and controllers),
    every column except `new_positions` (the target words) is taken as common.
    """
    if alphas is not None:
        if width % alphas.shape[0]:
            raise ValueError(f"a {width}-token prompt is not a whole number of {alphas.shape[0]}-token chunks")
        return (alphas.float() > 0).float().repeat(width // alphas.shape[0])
    common = torch.ones(width)
    common[[p for p in new_positions if p < width]] = 0.0
    return common


def denominator_columns(common: torch.Tensor, tokens: Sequence[int]) -> torch.Tensor:
    """[T]: the columns that Eq. 1's denominator adds to the word's own, (A*)_i + sum_{j in S} (A_t)_j: the common
    tokens without the word itself (a negative word that is common would otherwise count twice)."""
    out = common.float().clone()
    out[list(tokens)] = 0.0
    return out


def token_ratio(maps: torch.Tensor, tokens: Sequence[int], others: torch.Tensor | None = None) -> torch.Tensor:
    """Per-query share of a word in the attention row, the inner term of Eq. 1 -> [..., N].

    maps [..., N, T]. A multi-token word takes the mean of its token columns (reference compute_ca_TR).
    others [T] (denominator_columns): Eq. 1's denominator (A*)_i + sum_{j in S} (A_t)_j, the word plus the common
    tokens, whose injected columns come from the source branch. others None: the full row sum_T A*, as the reference
    code does; the two differ only by the other new tokens of the target prompt.
    """
    word = maps[..., list(tokens)].mean(-1)
    if others is None:
        return word / maps.sum(-1).clamp_min(EPS)
    return word / (word + (maps * others.to(maps)).sum(-1)).clamp_min(EPS)


def in_mask_token_ratio(maps: torch.Tensor, mask: torch.Tensor, tokens: Sequence[int],
                        others: torch.Tensor | None = None) -> torch.Tensor:
    """(1/|M|) sum_{p in M} token_ratio(p) per head: maps [H, N, T], mask [N] in {0, 1} -> [H] (Eq. 1)."""
    return (token_ratio(maps, tokens, others) * mask).sum(-1) / mask.sum().clamp_min(1.0)


def token_ratio_loss(maps: torch.Tensor, mask: torch.Tensor, tokens: Sequence[int],
                     others: torch.Tensor | None = None) -> torch.Tensor:
    """Token-ratio constraint L_TR of one layer, Eq. 1 of Mao et al.: mean_h (1 - in-mask ratio_h)^2.

    Notation: maps = A* [H, N, T] after P2P injection, mask = M [N], tokens = the positions of the word s*_i,
    others = the denominator's common-token columns (None: all tokens, as the reference code).
    Differences: the square is taken per head and then averaged over heads, as the reference code does.
    """
    return ((1.0 - in_mask_token_ratio(maps, mask, tokens, others)) ** 2).mean()


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
              lam: float = SR_LAMBDA, others: torch.Tensor | None = None) -> torch.Tensor:
    """L_TR (Eq. 1) or L_SR (Eq. 2) of one word, averaged over the layers' maps (each [H, N, T])."""
    if constraint not in CONSTRAINTS:
        raise ValueError(f"`constraint` {constraint!r} is unknown; choose one of {', '.join(CONSTRAINTS)}")
    if not maps:
        raise ValueError("no semantic-level cross-attention maps were captured for the MAG-Edit constraint")
    if constraint == "token_ratio":
        losses = [token_ratio_loss(m, mask, tokens, others) for m in maps]
    else:
        losses = [spatial_ratio_loss(m, mask, tokens, lam) for m in maps]
    return torch.stack(losses).mean()


def total_loss(maps: Sequence[torch.Tensor], mask: torch.Tensor, targets: Sequence[tuple[Sequence[int], float]],
               negatives: Sequence[Sequence[int]] = (), constraint: str = "token_ratio", lam: float = SR_LAMBDA,
               lambda_p: float = LAMBDA_P, lambda_ng: float = LAMBDA_NG, *,
               negative_maps: Sequence[torch.Tensor] | None = None, target_others: torch.Tensor | None = None,
               negative_others: torch.Tensor | None = None) -> torch.Tensor:
    """The guidance objective, Eq. 3 and Eq. 5 of Mao et al.: lambda_p sum_i lambda_i L^i - lambda_ng L_ng.

    targets: (token positions, lambda_i) per target word, weights summing to 1 (Eq. 5). mask [N] (one mask for every
    word) or [I, N] (one per target word, Fig. 9b and the reference's per-word masks). negatives: token positions of
    the negative words; L_ng is the same constraint evaluated on them inside the union of the masks, averaged over the
    negative words (Eq. 3), on `negative_maps` (the maps of the negative-words prompt; default: `maps`).
    target_others [I, T] / negative_others [K, T]: Eq. 1 denominators (denominator_columns; None = all tokens).
    Minimising it raises the targets' attention inside their masks and lowers the negatives'.
    """
    masks = mask if mask.ndim == 2 else mask.unsqueeze(0).expand(len(targets), -1)
    if masks.shape[0] != len(targets):
        raise ValueError(f"{masks.shape[0]} masks for {len(targets)} target words; give one mask, or one per word")

    def row(table, i):
        return None if table is None else table[i]

    positive = sum(weight * word_loss(maps, masks[i], tokens, constraint, lam, row(target_others, i))
                   for i, (tokens, weight) in enumerate(targets))
    loss = lambda_p * positive
    if negatives:
        union = masks.amax(0)
        neg_maps = maps if negative_maps is None else negative_maps
        negative = torch.stack([word_loss(neg_maps, union, tokens, constraint, lam, row(negative_others, k))
                                for k, tokens in enumerate(negatives)]).mean()
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
    of the first steps_at(guidance_steps) steps, and the source blended in outside the dilated mask in the last
    steps_at(blend_steps) steps (both counted at the paper's 50 steps and scaled to the run, see steps_at).

    targets: ((token positions, weight), ...) of the target words in the target prompt (`token_width` = its token
    count); negatives: token positions of the negative words, in the target prompt or, with `negative_context`
    [1, T, E], in that separate prompt (`negative_width` tokens), whose maps come from a cond-only pass of the target
    latent with that prompt and no controller edit (the authors' third prompt). masks [B, 1, h, w] and blend_masks
    (dilated) [B, 1, h, w] on the latent grid, semantic_masks [B, N] (or [B, I, N], one per target word) on the
    `semantic_grid`, all binary. target_others [I, T] / negative_others [K, T]: Eq. 1 denominators (None = all tokens).
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
    target_others: torch.Tensor | None = None
    negative_others: torch.Tensor | None = None
    negative_context: torch.Tensor | None = None
    negative_width: int | None = None

    NEEDS_GRAD = True

    def guided_steps(self, total_steps: int) -> int:
        """How many of the first steps of a `total_steps` run are guided (0 with no iterations)."""
        return steps_at(self.guidance_steps, total_steps) if self.max_iterations > 0 else 0

    def blend_start(self, total_steps: int) -> int:
        """The first step after which the source is blended in outside the mask (total_steps: no blend)."""
        return total_steps - steps_at(self.blend_steps, total_steps)

    def progress_units(self, steps: int) -> int:
        return self.guided_steps(steps) * max(self.max_iterations, 0)

    def before_step(self, ctx: StepContext) -> None:
        if ctx.step >= self.guided_steps(ctx.total_steps):
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
        if ctx.step < self.blend_start(ctx.total_steps):
            return
        trace = ctx.state.setdefault(STATE_KEY, {"loss": {}, "target_ratio": {}, "negative_ratio": {}})
        trace.setdefault("blended", []).append(ctx.step)
        mask = self.blend_masks[ctx.image].to(ctx.x_next)
        x_next = ctx.x_next.clone()
        for s, t in zip(ctx.rows(SOURCE), ctx.rows(TARGET)):
            x_next[t] = blend_outside(x_next[t], x_next[s], mask)
        ctx.x_next = x_next

    def _pass(self, ctx: StepContext, x_in: torch.Tensor, context: dict, width: int) -> list[list[torch.Tensor]]:
        """One cond-only forward (stopped after the last semantic-level layer); the target rows' maps."""
        run = ctx.denoiser.run
        run.live.clear()
        # CaptureComplete: every map the constraint needs is held, the rest of the UNet is skipped
        with contextlib.suppress(CaptureComplete):
            ctx.denoiser(x_in, ctx.sigma, context=context, labels=frozenset({COND}))
        maps = self.target_maps(run.live, ctx.roles, width)
        run.live.clear()
        return maps

    def _negative_maps(self, ctx: StepContext, x_in: torch.Tensor) -> list[list[torch.Tensor]]:
        """Eq. 3 with a separate negative-words prompt: the target latent's maps over that prompt, without P2P.

        The rows take a role no controller edits, so the attention of the target latent over the negative prompt is
        its own (the reference declares this third prompt; its use is not released)."""
        run = ctx.denoiser.run
        roles = run.roles
        run.roles = tuple(NEGATIVE_ROLE if r == TARGET else r for r in roles)
        try:
            context = dict(ctx.context)
            context[COND] = run.on_device((self, "negative_context"), lambda: self.negative_context, x_in.device)
            return self._pass(ctx, x_in, context, int(self.negative_width))
        finally:
            run.roles = roles

    def _iterate(self, ctx: StepContext, x: torch.Tensor, trace: dict) -> torch.Tensor:
        """One iteration of Alg. 1 lines 2-4: cond-only pass of both rows, constraint, masked gradient step."""
        tgt_rows = ctx.rows(TARGET)
        leaf = x[tgt_rows].clone().requires_grad_(True)  # a fresh leaf per iteration: no graph survives it
        with torch.enable_grad():
            x_in = x.clone()
            x_in[tgt_rows] = leaf
            maps = self._pass(ctx, x_in, ctx.context, self.token_width)
            negative_maps = maps
            if self.negatives and self.negative_context is not None:
                negative_maps = self._negative_maps(ctx, x_in)
            device, run = maps[0][0].device, ctx.denoiser.run
            # per-run copies: the node made these under inference mode, which autograd may not save
            masks = run.on_device((self, "semantic_masks", ctx.image), lambda: self.semantic_masks[ctx.image], device,
                                  torch.float32)
            if masks.ndim == 1:  # one mask for every target word
                masks = masks.unsqueeze(0).expand(len(self.targets), -1)
            t_others, n_others = (None if t is None else run.on_device((self, name), lambda t=t: t, device,
                                                                         torch.float32)
                                  for name, t in (("target_others", self.target_others),
                                                  ("negative_others", self.negative_others)))
            losses = [total_loss(m, masks, self.targets, self.negatives, self.constraint, self.sr_lambda,
                                 self.lambda_p, self.lambda_ng, negative_maps=nm, target_others=t_others,
                                 negative_others=n_others) for m, nm in zip(maps, negative_maps)]
            loss = torch.stack(losses).sum()
            self._record(trace, ctx.step, loss, maps, negative_maps, masks, t_others, n_others)
            if not loss.requires_grad:  # the injected maps do not depend on the latent (nothing to guide)
                return x
            (grad,) = torch.autograd.grad(loss, leaf)
        out = x.clone()
        out[tgt_rows] = guided_latent(leaf.detach(), grad, self.masks[ctx.image].to(x), ctx.sigma, self.scale)
        return out

    def target_maps(self, live: Sequence[LiveMap], roles: Sequence[str], width: int | None = None
                    ) -> list[list[torch.Tensor]]:
        """Per target row, the fp32 maps [H, N, T'] of every captured semantic-level cross layer (T' = width, default
        token_width)."""
        width = self.token_width if width is None else width
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
                rows.append(fold_repeats(layer.probs[row].float(), width))
            out.append(rows)
        return out

    def _record(self, trace: dict, step: int, loss: torch.Tensor, maps, negative_maps, masks: torch.Tensor,
                t_others, n_others) -> None:
        """Keep the loss and the in-mask token ratios of this iteration (floats) for logs and tests."""
        def ratio(layers, mask, tokens, others):  # mean over target rows, layers and heads
            return torch.stack([in_mask_token_ratio(m, mask, tokens, others).mean() for rows in layers for m in rows]
                               ).mean()

        with torch.no_grad():
            union = masks.amax(0)
            ratios = [ratio(maps, masks[i], tokens, None if t_others is None else t_others[i])
                      for i, (tokens, _) in enumerate(self.targets)]
            ratios += [ratio(negative_maps, union, tokens, None if n_others is None else n_others[k])
                       for k, tokens in enumerate(self.negatives)]
            values = torch.stack([loss.detach().float()] + ratios).tolist()
        n_t = len(self.targets)
        trace["loss"].setdefault(step, []).append(values[0])
        trace["target_ratio"].setdefault(step, []).append(values[1:1 + n_t])
        trace["negative_ratio"].setdefault(step, []).append(values[1 + n_t:])


def copied_steps(controller, total_steps: int, steps: Sequence[int]) -> dict[int, list[int]]:
    """For each target token position (mod 77) that Prompt-to-Prompt copies from the source in some of `steps`, those
    steps. In them the constraint cannot raise or lower that word's own attention (its column does not depend on the
    target latent). Empty for controllers other than Prompt-to-Prompt."""
    if not isinstance(controller, PromptToPrompt):
        return {}
    out: dict[int, list[int]] = {}
    for step in steps:
        alpha = token_alpha(step, total_steps, controller.cross_windows)
        if controller.mode == "refine":
            alpha = alpha * controller.alphas.to(alpha)
        for p in (alpha[:CHUNK] > 0).nonzero().flatten().tolist():
            out.setdefault(p, []).append(step)
    return out
