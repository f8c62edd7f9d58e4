"""Dynamic Prompt Learning inversion (Wang et al., "Dynamic Prompt Learning: Addressing Cross-Attention Leakage for
Text-Based Image Editing", NeurIPS 2023, Alg. 1). Orchestration only: the losses live in attention/dpl.py, the
background estimate in masks/background.py, the learnable text rows in inversion/dpl_text.py, null-text in
inversion/null_text.py; the model is reached through inversion/comfy_model.py.

Alg. 1 per image: DDIM inversion with the source prompt (guidance 1) gives z*_0..z*_T and, unless a mask is given,
the background B (Sec. 3.3). Then for t = T..1 on the reconstructed latent z_bar_t: optimise the noun token rows V_t
with L (Eq. 9) until every loss is under its threshold (Eq. 10) or the iteration budget is spent (lines 9-14), encode
C_t (line 15), optimise the null text for this step (lines 16-17, Mokady et al. 2023), and warm-start V_{t-1}, ∅_{t-1}
from V_t, ∅_t (line 18).

Differences from the paper / official code (all documented in docs/dpl.md):
- null-text part: at most `NULL_TEXT_ITERATIONS` (10) Adam iterations with the null-text paper's early stop, warm
  started from the previous step (Alg. 1, line 18). The official DPL code runs 51 iterations without early stop and
  re-initialises ∅ from the empty prompt at every step; 10 + early stop is the null-text reference setting and keeps a
  512 px image within about a minute on one GPU.
- The optimiser (AdamW, lr 1e-3, weight decay 0.01) is re-created at every step as in the code, over the noun rows only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..attention import dpl as losses_mod
from ..attention.layers import SELF_LEVEL_DPL, SEMANTIC_LEVEL, semantic_grid
from ..attention.run import COND, UNCOND, CaptureComplete, CaptureSpec, RunState
from ..attention.tokens import PromptTokens
from ..masks.background import BACKGROUND_CLUSTERS, BACKGROUND_THRESHOLD, estimate_background
from ..masks.ops import mask_to_grid
from . import comfy_model, engine, null_text
from .conditioning import context_of
from .dpl_text import RowEncoder

TOKEN_ITERATIONS = 21  # at most 21 token updates per step (official DPL.sh: ATTN_STEP=21)
TOKEN_LR = 1e-3  # AdamW learning rate (official code: torch default)
TOKEN_WEIGHT_DECAY = 1e-2  # AdamW weight decay (official code: torch default)
NULL_TEXT_ITERATIONS = null_text.NULL_TEXT_INNER_STEPS  # see the module docstring (official DPL code: 51, no stop)

Progress = Callable[[int, torch.Tensor | None], None]


@dataclass(frozen=True)
class DPLSettings:
    """Knobs of one DPL inversion (defaults = paper / official code, see the constants)."""

    weights: losses_mod.Weights = losses_mod.Weights()
    token_iterations: int = TOKEN_ITERATIONS
    learning_rate: float = TOKEN_LR
    weight_decay: float = TOKEN_WEIGHT_DECAY
    null_text_iterations: int = NULL_TEXT_ITERATIONS
    background_clusters: int = BACKGROUND_CLUSTERS
    background_threshold: float = BACKGROUND_THRESHOLD
    level: int = SEMANTIC_LEVEL

    def units_per_step(self) -> int:
        return self.token_iterations + self.null_text_iterations


@dataclass
class StepLog:
    """What the token optimisation did at one step: updates made, losses (at, dj, bg) first and last seen."""

    step: int
    iterations: int
    first: tuple[float, float, float]
    last: tuple[float, float, float]
    thresholds: losses_mod.Thresholds


@dataclass
class DPLInversion:
    """DPL inversion of one image. latents [S+1, C, h, w] model space; cond / uncond [S, T, E] per-step contexts."""

    latents: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    reconstruction: torch.Tensor  # [C, h, w] what the source branch regenerates
    background: torch.Tensor  # [h4, w4] {0, 1} mask used by L_bg (semantic grid)
    estimated_background: torch.Tensor | None  # [h2, w2] Sec. 3.3 estimate when no mask was given
    cross: torch.Tensor  # [h4, w4, T] source maps the losses saw (last evaluation of each step), mean over steps
    ddim_run: RunState  # captured maps of the DDIM inversion pass
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # {token key: [S, P, E]} learned rows per step
    logs: list[StepLog] = field(default_factory=list)
    null_text_iterations: int = 0
    degenerate_estimate: str = ""  # "empty" / "full" when the estimate was unusable and L_bg was switched off


def check_nouns(nouns: Sequence[Sequence[int]]) -> list[list[int]]:
    """Token positions of each noun; at least one noun, no position shared by two nouns."""
    nouns = [sorted(set(int(p) for p in pos)) for pos in nouns]
    if not nouns or not all(nouns):
        raise ValueError("`nouns` is empty: give at least one word of the source prompt to learn (e.g. \"cat, dog\")")
    flat = [p for pos in nouns for p in pos]
    if len(flat) != len(set(flat)):
        raise ValueError("two of the `nouns` share tokens of the prompt; list every word once")
    return nouns


def background_on_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A [H, W] mask (any size, 1 = background) as the {0, 1} mask B [h, w] of Eq. 7 (>= 0.5 cell coverage)."""
    return mask_to_grid(mask.float()[None], grid, binary=True)[0, 0]


def degenerate(background: torch.Tensor) -> str:
    """"empty" when no cell of the {0, 1} loss-grid mask B is background, "full" when every cell is, else ""."""
    if not bool(background.any()):
        return "empty"
    return "full" if bool(background.all()) else ""


def estimate_from_run(run: RunState, nouns: Sequence[Sequence[int]], settings: DPLSettings) -> torch.Tensor:
    """Sec. 3.3 background [h2, w2] from a DDIM pass that captured level-2 self- and semantic-level cross-attention.

    nouns: token positions of every word the segments are scored against (`masks.background.scoring_words`)."""
    self_map = run.mean_map("self", SELF_LEVEL_DPL)
    cross = run.mean_map("cross", settings.level)
    if self_map is None or cross is None:
        raise ValueError("the image is too small for the background estimate (no 2x / 4x down-sampled attention "
                         "layers); connect a `background` MASK instead")
    h, w = run.grids[("cross", settings.level)]
    maps = losses_mod.noun_maps(cross[0].view(h, w, -1), nouns)
    return estimate_background(self_map[0], maps, settings.background_clusters, settings.background_threshold,
                               grid=run.grids[("self", SELF_LEVEL_DPL)])


def _evaluate(den, run: RunState, encoder: RowEncoder, rows: dict, x_bar: torch.Tensor, sigma: float,
              nouns: list[list[int]], background: torch.Tensor | None, settings: DPLSettings,
              stop_after: int | None = None):
    """One conditional-only forward with the current rows; returns (losses (Eq. 9), maps A [h, w, T] detached).

    stop_after: the number of cross-attention sites at the loss level; the forward then ends after the last of them
    (the losses read only those maps, so the rest of the UNet would be computed, and kept for backward, in vain).
    """
    cond = encoder.encode(rows)
    run.capture = CaptureSpec(cross_levels=frozenset({settings.level}), labels=frozenset({COND}), live=True,
                              accumulate=False, stop_after=stop_after)
    try:
        with contextlib.suppress(CaptureComplete):
            den(x_bar, sigma, context={COND: cond}, labels=frozenset({COND}))
        live = [m for m in run.live if m.kind == "cross" and m.site.level == settings.level]
        probs, grid = [m.probs for m in live], (live[0].grid if live else (0, 0))
    finally:
        run.capture = None
        run.live.clear()
    maps = losses_mod.mean_cross_map(probs, grid)
    return losses_mod.dpl_losses(maps, nouns, background, settings.weights), maps.detach()


def token_loop(evaluate: Callable[[dict], tuple], rows: dict, th: losses_mod.Thresholds, settings: DPLSettings,
               on_iteration: Callable[[], None] = lambda: None):
    """Alg. 1 lines 9-14: evaluate L (Eq. 9) with the current rows, stop when every loss is strictly under its
    threshold (Eq. 10), else one AdamW step on the rows; at most `token_iterations` evaluations (as the code:
    evaluate, test, then update, so the last update of a spent budget is not evaluated at this step).

    evaluate(params) -> (Losses, maps). Returns (rows, updates, first (at, dj, bg), last (at, dj, bg), maps).
    """
    params = {k: v.detach().clone().float().requires_grad_(True) for k, v in rows.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    first = last = (0.0, 0.0, 0.0)
    updates, maps = 0, None
    for j in range(settings.token_iterations):
        losses, maps = evaluate(params)
        last = losses.values()
        first = last if j == 0 else first
        if losses.below(th) or not losses.total.requires_grad:
            break
        opt.zero_grad(set_to_none=True)
        losses.total.backward()
        opt.step()
        updates += 1
        on_iteration()
    return {k: v.detach() for k, v in params.items()}, updates, first, last, maps


def optimise_tokens(den, run: RunState, encoder: RowEncoder, rows: dict, x_bar: torch.Tensor, sigma: float,
                    step: int, steps: int, nouns: list[list[int]], background: torch.Tensor | None,
                    settings: DPLSettings, on_iteration: Callable[[], None], stop_after: int | None = None):
    """`token_loop` at denoising step `step` of `steps` with the thresholds of Eq. 10 for that step and the losses of
    one conditional-only forward per evaluation.

    Returns (rows, StepLog, maps A [h, w, T] of the last evaluation).
    """
    th = losses_mod.thresholds(step, steps)

    def evaluate(params):
        return _evaluate(den, run, encoder, params, x_bar, sigma, nouns, background, settings, stop_after)

    rows, updates, first, last, maps = token_loop(evaluate, rows, th, settings, on_iteration)
    return rows, StepLog(step, updates, first, last, th), maps


def _dpl_pass(model, encoder: RowEncoder, source, negative, latent, sigmas, cfg, latents, nouns, background,
              settings: DPLSettings, progress: Progress):
    run = RunState(sigmas, ("source",))
    uncond0 = context_of(negative, "negative")
    steps = len(sigmas) - 1
    stop_after = comfy_model.count_sites(model, "cross", settings.level) or None

    def algorithm(den, x):
        comfy_model.make_autograd_safe(encoder.clip.cond_stage_model)
        lat = latents.to(x).clone()  # normal (non-inference) tensors: autograd saves the targets
        x_bar, uncond = lat[0].unsqueeze(0), uncond0.to(x.device).float()
        rows = encoder.initial_rows(x.device)
        bg = None if background is None else background.to(x.device)
        conds, unconds, logs, maps_sum, nt_iters, history = [], [], [], None, 0, []
        for i in range(steps):
            run.step = i
            sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
            if settings.token_iterations > 0:
                rows, log, maps = optimise_tokens(den, run, encoder, rows, x_bar, sigma, i, steps, nouns, bg,
                                                  settings, lambda: progress(1, None), stop_after)
                progress(settings.token_iterations - log.iterations, None)
                logs.append(log)
                maps_sum = maps if maps_sum is None else maps_sum + maps
            with torch.no_grad():  # Alg. 1 line 15: C_t with the learned rows; its prediction is fixed for the step
                cond = encoder.encode(rows).to(x)
                den(x_bar, sigma, context={COND: cond}, labels=frozenset({COND}))
                cond_out = den.outputs(COND).detach()

            def predict(u, x_bar=x_bar, sigma=sigma, cond_out=cond_out):
                return den(x_bar, sigma, context={UNCOND: u}, labels=frozenset({UNCOND}), fill={COND: cond_out})

            result = null_text.optimize_step(predict, x_bar, lat[i + 1].unsqueeze(0), uncond, sigma, sigma_next, i,
                                             settings.null_text_iterations, on_iteration=lambda it: progress(1, None))
            progress(settings.null_text_iterations - result.iterations, None)
            uncond, x_bar = result.uncond, result.x_next
            conds.append(cond[0].detach())
            history.append(rows)
            unconds.append(uncond[0])
            nt_iters += result.iterations
        cross = None if maps_sum is None else maps_sum / len(logs)
        learned = {k: torch.stack([r[k] for r in history]) for k in rows}
        return torch.stack(conds), torch.stack(unconds), x_bar[0], cross, logs, nt_iters, learned

    return comfy_model.run_sampler(model, source, negative, latent, sigmas, cfg, algorithm, run, grad=True)


def dpl_invert(model, encoder: RowEncoder, source: list, negative: list, latent: torch.Tensor, sigmas: torch.Tensor,
               cfg: float, nouns: Sequence[Sequence[int]], background: torch.Tensor | None = None,
               settings: DPLSettings = DPLSettings(), progress: Progress = lambda n, x0: None,
               scored: Sequence[Sequence[int]] | None = None) -> DPLInversion:
    """Invert ONE image (raw latent [1, C, h, w]) with Dynamic Prompt Learning (Alg. 1).

    nouns: token positions of each noun of the source prompt (all tokens of a multi-token word). background: a
    [H, W] mask in the image frame (1 = background) or None to estimate it (Sec. 3.3) from the DDIM pass, scoring
    the segments against the words at `scored` (default: the nouns). An estimate that is empty or covers every cell
    of the loss grid is not used: L_bg is off (B = 0) and `degenerate_estimate` says which ("empty" / "full"), for
    the caller to warn, as with an empty user mask (a full user mask is refused by the node).
    """
    nouns = check_nouns(nouns)
    self_levels = frozenset({SELF_LEVEL_DPL}) if background is None else frozenset()
    capture = CaptureSpec(cross_levels=frozenset({settings.level}), self_levels=self_levels)
    latents, ddim_run = engine.ddim_inversion(model, source, negative, latent, sigmas, capture, progress)
    grid = semantic_grid(tuple(latent.shape[-2:]), settings.level)
    estimated, issue = None, ""
    if background is None:
        estimated = estimate_from_run(ddim_run, nouns if scored is None else scored, settings)
        background = estimated
    bg = background_on_grid(background, grid)
    if estimated is not None and settings.weights.bg:
        issue = degenerate(bg)
        bg = torch.zeros_like(bg) if issue else bg  # all-background would push every noun off the image; empty: 0
    comfy_model.check_interrupt()
    cond, uncond, recon, cross, logs, iters, rows = _dpl_pass(model, encoder, source, negative, latent, sigmas, cfg,
                                                        latents, nouns, None if issue else bg, settings, progress)
    if cross is None:  # no token optimisation: report the inversion's maps
        cross = ddim_run.mean_map("cross", settings.level)[0].view(*grid, -1)
    return DPLInversion(latents, cond, uncond, recon, bg, estimated, cross, ddim_run, rows, logs, iters, issue)


def target_row_map(source_positions: Sequence[Sequence[int]], target_positions: Sequence[Sequence[int]],
                   sizes: Sequence[int]) -> tuple[list[int], list[int]]:
    """Where each learned noun row goes in the target prompt: (target token positions, indices into the rows).

    Per noun: its source positions (every occurrence, `sizes[k]` tokens each; the learned rows follow this order,
    noun after noun), its positions in the target prompt (empty when the target drops it). The j-th occurrence in
    the target takes the rows of the j-th occurrence in the source (the last one when the target has more).
    As the official edit (`_4_image_edit.py`), which writes the placeholder token of every noun the target keeps.
    """
    positions, index, offset = [], [], 0
    for src, tgt, n in zip(source_positions, target_positions, sizes):
        occurrences = max(1, len(src) // n)
        for j in range(len(tgt) // n):
            occ = min(j, occurrences - 1)
            positions += list(tgt[j * n:(j + 1) * n])
            index += [offset + occ * n + m for m in range(n)]
        offset += len(src)
    return positions, index


def target_contexts(clip, target: PromptTokens, rows: dict[str, torch.Tensor], positions: Sequence[int],
                    index: Sequence[int]) -> torch.Tensor:
    """[S, T, E] the target prompt encoded at every step with the learned rows of the kept nouns at `positions`.

    rows: {token key: [S, P, E]} of one image (`DPLInversion.rows`); `positions`, `index` from `target_row_map`.
    """
    encoder = RowEncoder(clip, target, positions)
    steps = next(iter(rows.values())).shape[0]
    pick = torch.tensor(list(index))
    with torch.no_grad():
        return torch.stack([encoder.encode({k: v[s][pick] for k, v in rows.items()})[0] for s in range(steps)])
