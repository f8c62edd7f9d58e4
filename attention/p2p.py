"""Prompt-to-Prompt attention control (Hertz et al., ICLR 2023). Pure torch.

Sec. 3.2 of the paper: with M_t the source branch's attention and M*_t the target's at step t,
    Edit(M_t, M*_t, t) = M_tilde_t if t is inside the cross-attention window, else M*_t,
where M_tilde is the word-swap map (source columns mapped by M), the refinement map (aligned columns from the
source, new tokens from the target) or the re-weighted map (columns scaled by c). Self-attention maps are copied from
the source for the first fraction of steps (the reference code's `self_replace_steps`), only at layers of level >= 2
(<= 32x32 queries at 512 px, as the reference restricts to 32^2 queries).

Rows: only the conditional chunk is edited; the unconditional half is left untouched (reference behaviour).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..inversion.edit import StepContext, StepHook
from .layers import FLUX_BLOCKS, SEMANTIC_LEVEL
from .run import COND, SOURCE, TARGET, AttnCall, Controller
from .seq_align import refinement_mapper, replacement_mapper
from .tokens import CHUNK, PromptError, PromptTokens

CROSS_REPLACE_DEFAULT = 0.8  # P2P notebooks; MAG-Edit's refine uses 0.8 too
SELF_REPLACE_DEFAULT = 0.4  # P2P stable notebook (null-text examples use 0.5-0.7)
SELF_MIN_LEVEL = 2  # reference: self-attention replaced only where queries <= 32^2 (64x64 latent)
MODES = ("replace", "refine", "reweight")


def window_steps(bounds: tuple[float, float], total_steps: int) -> tuple[int, int]:
    """Cross-attention window in steps: [int(s * (S + 1)), int(e * (S + 1))) (reference get_time_words_attention_alpha)."""
    return int(bounds[0] * (total_steps + 1)), int(bounds[1] * (total_steps + 1))


def self_window_steps(bounds: tuple[float, float], total_steps: int) -> tuple[int, int]:
    """Self-attention window in steps: [int(S * s), int(S * e)) (reference num_self_replace)."""
    return int(total_steps * bounds[0]), int(total_steps * bounds[1])


def token_alpha(step: int, total_steps: int, windows: torch.Tensor) -> torch.Tensor:
    """alpha [T] in {0, 1}: which target tokens take the edited attention at `step`. windows [T, 2] in fractions."""
    start = (windows[:, 0] * (total_steps + 1)).long()
    end = (windows[:, 1] * (total_steps + 1)).long()
    return ((start <= step) & (step < end)).float()


def replace_attention(src: torch.Tensor, mapper: torch.Tensor) -> torch.Tensor:
    """Word swap: target map [H, N, T] = source map [H, N, T] @ M [T, T]."""
    return torch.einsum("hnw,wt->hnt", src, mapper.to(src))


def refine_attention(src: torch.Tensor, tgt: torch.Tensor, mapper: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Refinement: aligned target tokens read their source token, new tokens keep the target's own attention."""
    alphas = alphas.to(src)
    return src[..., mapper.to(src.device)] * alphas + tgt * (1.0 - alphas)


def blockwise(fn, *maps: torch.Tensor, length: int = CHUNK) -> torch.Tensor:
    """Apply a `length`-token edit to each `length`-column block (ComfyUI repeats a short context to the batch's token
    length; 77 for CLIP, 256 for Flux's T5 sequence, which is one block)."""
    width = maps[0].shape[-1]
    if width == length:
        return fn(*maps)
    if width % length:
        raise ValueError(f"cross-attention over {width} tokens is not a whole number of {length}-token blocks")
    blocks = [fn(*(m[..., b * length:(b + 1) * length] for m in maps)) for b in range(width // length)]
    return torch.cat(blocks, -1)


@dataclass(frozen=True, eq=False)
class PromptToPrompt(Controller):
    """P2P controller. mode: "replace" (mapper [T, T]), "refine" (index [T] + alphas [T]) or "reweight" (identity).

    cross_windows [T, 2]: per target token, the fraction window where its attention is edited (per-word overrides of
    cross_replace_steps). equalizer [T] or None: per-token scale c (re-weighting, applied inside the window).
    """

    mode: str
    mapper: torch.Tensor | None
    alphas: torch.Tensor | None
    cross_windows: torch.Tensor
    self_window: tuple[float, float]
    equalizer: torch.Tensor | None = None
    self_min_level: int = SELF_MIN_LEVEL
    source_text: str | None = None
    target_text: str | None = None
    target_tokens: PromptTokens | None = None
    target_conditioning: list | None = field(default=None, repr=False)
    length: int = CHUNK  # tokens of one context block: 77 (CLIP) or 256 (Flux's T5)
    flux_self_sites: frozenset | None = None  # Flux: (block, index) sites with self-attention injection (None: all)

    EDITS_PROBS = True

    def active(self, call: AttnCall) -> bool:
        if call.run is None or not call.role_rows(COND, TARGET):
            return False
        step, total = call.step, call.run.total_steps
        if call.kind == "cross":  # the same answer for every call of a step: computed once per run and step
            return call.run.memo((self, "active", step),
                                 lambda: bool(token_alpha(step, total, self.cross_windows).any()))
        start, end = self_window_steps(self.self_window, total)
        if call.site.block in FLUX_BLOCKS:  # Flux: sites chosen by block type and index, not by level
            where = self.flux_self_sites is None or (call.site.block, call.site.index) in self.flux_self_sites
        else:
            where = call.site.level >= self.self_min_level
        return where and start <= step < end

    def _edited_cross(self, src: torch.Tensor, tgt: torch.Tensor, run) -> torch.Tensor:
        # The controller's tensors reach the kernels as per-run device copies (RunState.on_device): they are made
        # under the executor's inference mode and may not enter autograd themselves (MAG-Edit), and a host->device
        # copy per call would synchronise the GPU.
        if self.mode == "replace":
            edited = replace_attention(src, run.on_device((self, "mapper"), lambda: self.mapper, src.device, src.dtype))
        elif self.mode == "refine":
            mapper = run.on_device((self, "mapper"), lambda: self.mapper, src.device)
            alphas = run.on_device((self, "alphas"), lambda: self.alphas, src.device, src.dtype)
            edited = refine_attention(src, tgt, mapper, alphas)
        else:
            edited = src
        if self.equalizer is not None:
            edited = edited * run.on_device((self, "equalizer"), lambda: self.equalizer, src.device, src.dtype)
        return edited

    def edit_probs(self, call: AttnCall, probs: torch.Tensor) -> torch.Tensor:
        src_rows, tgt_rows = call.role_rows(COND, SOURCE), call.role_rows(COND, TARGET)
        probs = probs.clone()
        if call.kind == "self":
            for s, t in zip(src_rows, tgt_rows):  # int rows: a list index would be copied to the GPU on every call
                probs[t] = probs[s]
            return probs
        run, step, total = call.run, call.step, call.run.total_steps
        blocks = probs.shape[-1] // self.length
        alpha = run.on_device((self, "alpha", step, blocks),
                              lambda: token_alpha(step, total, self.cross_windows).repeat(blocks), probs.device,
                              probs.dtype)
        edit = lambda src, tgt: self._edited_cross(src, tgt, run)  # noqa: E731
        for s, t in zip(src_rows, tgt_rows):
            edited = blockwise(edit, probs[s], probs[t], length=self.length)
            probs[t] = edited * alpha + probs[t] * (1.0 - alpha)
        return probs


def local_blend_mask(maps: torch.Tensor, token_sets: list[list[int]], latent_hw: tuple[int, int], grid: tuple[int, int],
                     threshold: float = 0.3, dilation: int = 1) -> torch.Tensor:
    """P2P LocalBlend mask (Sec. 3.2, "local editing"; reference LocalBlend.get_mask) for each row.

    maps [B, N, T]: cumulative cross-attention of each row at the semantic level (mean over heads and layers).
    token_sets: per row, the token positions of its blend words. Per row: sum the words' maps, max-pool
    (2k+1)x(2k+1) at the map grid, nearest-resize to the latent, divide by the max, threshold.
    Returns a float mask [B, 1, h, w] in {0, 1}; a row with no words gets an all-zero mask.
    """
    rows = []
    for b, tokens in enumerate(token_sets):
        if not tokens:
            rows.append(torch.zeros(1, 1, *latent_hw, device=maps.device))
            continue
        m = maps[b][:, tokens].sum(-1).view(1, 1, *grid).float()
        m = torch.nn.functional.max_pool2d(m, 2 * dilation + 1, 1, dilation) if dilation > 0 else m
        m = torch.nn.functional.interpolate(m, size=latent_hw)
        m = m / m.max().clamp_min(1e-12)
        rows.append((m > threshold).float())
    return torch.cat(rows)


@dataclass(frozen=True, eq=False)
class LocalBlend(StepHook):
    """After each step, keep the target latent equal to the source latent outside the blend mask (P2P Sec. 3.2).

    x*_t <- x_t + mask * (x*_t - x_t) with mask = the union of the source words' and the target words' masks, from
    step int(start * S) on (the null-text notebook's start_blend = 0.2).
    """

    source_tokens: tuple[int, ...]
    target_tokens: tuple[int, ...]
    threshold: float = 0.3
    dilation: int = 1
    start: float = 0.2
    level: int = SEMANTIC_LEVEL  # level of the maps: the "16x16" UNet level, or Flux's joint-attention grid

    def after_step(self, ctx: StepContext) -> None:
        if ctx.step < int(self.start * ctx.total_steps):
            return
        run = ctx.denoiser.run
        maps = run.mean_map("cross", self.level)
        if maps is None:
            return
        grid = run.grids[("cross", self.level)]
        src_rows, tgt_rows = ctx.rows(SOURCE), ctx.rows(TARGET)
        tokens = [list(self.source_tokens) if r == SOURCE else list(self.target_tokens) for r in ctx.roles]
        masks = local_blend_mask(maps, tokens, tuple(ctx.x_next.shape[-2:]), grid, self.threshold, self.dilation)
        x_next = ctx.x_next.clone()
        for s, t in zip(src_rows, tgt_rows):
            mask = torch.maximum(masks[s], masks[t]).to(x_next)
            x_next[t] = x_next[s] + mask * (x_next[t] - x_next[s])
            ctx.state["local_blend_mask"] = mask
        ctx.x_next = x_next


def build_controller(source: PromptTokens, target: PromptTokens, lookup: Callable[[str], list[int]], mode: str,
                     cross_replace: float, self_replace: float, reweight: list[tuple[str, float]] = (),
                     cross_words: list[tuple[str, float]] = (), self_min_level: int = SELF_MIN_LEVEL,
                     **extra) -> PromptToPrompt:
    """A PromptToPrompt controller from two tokenised prompts (lookup(word) -> the word's token ids).

    mode "replace": word swap (same word count); "refine": aligned tokens; "reweight": the prompts must tokenise
    identically and `reweight` must name at least one word. `reweight` [(word, c)] scales the target word's attention
    columns by c (Sec. 3.2, "Attention Re-weighting"); `cross_words` [(word, f)] sets that target word's
    cross-attention window to (0, f) instead of (0, cross_replace).
    """
    if mode not in MODES:
        raise PromptError(f"`mode` {mode!r} is unknown; choose one of {', '.join(MODES)}")
    mapper, alphas = None, None
    if mode == "replace":
        mapper = replacement_mapper(source, target)
    elif mode == "refine":
        mapper, alphas = refinement_mapper(source, target)
    elif source.ids != target.ids:
        raise PromptError(f"mode 'reweight' keeps the prompt: source {source.text!r} and target {target.text!r} differ. "
                          "Use 'replace' or 'refine' (re-weighting can be combined with both).")
    elif not reweight:
        raise PromptError("mode 'reweight' needs words to re-weight, e.g. `reweight` = \"fluffy=2.0\"")
    length = target.length
    if source.length != length:
        raise PromptError(f"the source prompt was tokenised for a {source.length}-token context and the target for "
                          f"{length}; tokenise both with the same CLIP.")
    windows = torch.tensor([[0.0, float(cross_replace)]], dtype=torch.float64).repeat(length, 1)
    for word, frac in cross_words:
        windows[target.find(lookup(word), word, "target prompt")] = torch.tensor([0.0, float(frac)], dtype=torch.float64)
    equalizer = None
    if reweight:
        equalizer = torch.ones(length)
        for word, scale in reweight:
            equalizer[target.find(lookup(word), word, "target prompt")] = float(scale)
    return PromptToPrompt(mode, mapper, alphas, windows, (0.0, float(self_replace)), equalizer, self_min_level,
                          length=length, **extra)


def blend_tokens(source: PromptTokens, target: PromptTokens, lookup: Callable[[str], list[int]],
                 words: list[str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Token positions of the local-blend words in the source and in the target prompt (a word may be in only one)."""
    src, tgt = [], []
    for word in words:
        ids = lookup(word)
        found = False
        for prompt, acc, label in ((source, src, "source prompt"), (target, tgt, "target prompt")):
            try:
                acc += prompt.find(ids, word, label)
                found = True
            except PromptError:
                pass
        if not found:
            hint = (" T5 (Flux) splits a word by its exact spelling: write it with the prompt's case and without glued "
                    "punctuation." if source.encoder == "t5" else "")
            raise PromptError(f"local blend word {word!r} is in neither prompt (source: {source.readable}; "
                              f"target: {target.readable}). Use words of the prompts.{hint}")
    return tuple(sorted(set(src))), tuple(sorted(set(tgt)))
