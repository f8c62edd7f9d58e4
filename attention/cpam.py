"""CPAM: Context-Preserving Adaptive Manipulation (Vo et al., "Rethinking attentions in zero-shot real image
editing"). Pure torch: the attention maths of Sec. 3.3-3.4 (Eq. 1-4), the mask-guidance strategies and the
controller / step hook that apply them inside the edit sampler.

Notation (paper -> code): Q, K, V the target row's query/key/value at one self-attention layer; K_i, V_i those of the
intermediate (inversion) latent z_i at the same step = the *source* row of the same chunk of the same UNet call (the
edit sampler pins that row to the inversion latents z_i while a CPAM patch is on the model, `PINS_SOURCE`); M_s the
source mask (the object), M_t the target mask; S (paper "T" = 3) the first step and L (= 8) the first layer of object
preservation; T_m the step from which M_t replaces M_s; P_t the target prompt, Null the null text (the step's
unconditional context ∅_t).

Steps: S and T_m are given on the paper's 50-step schedule and moved to the run's step count by `run_step` (same
fraction of the run).

Layers: the paper's layer l is the index of the transformer block (SpatialTransformer) in the UNet's forward order,
as in MasaCtrl and the author's code: SD1.x/SD2.x input 1, 2, 4, 5, 7, 8 -> 0-5, middle -> 6, output 3-11 -> 7-15, so
L = 8 means output blocks 4-11. SDXL's 11 blocks get 0-10 the same way (all transformer depths of a block share its
index); the paper's position (the decoder from its second block at the semantic level) is L = 6 there, see
`paper_start_layer`. Steps and layers are 0-based and the gates are "step >= S and layer >= L", which equals the paper's
"t > T and l > L" read 1-based (and the author's code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..inversion.edit import StepContext, StepHook
from ..masks.cpam import binarize, mask_from_attention
from ..masks.ops import mask_to_grid
from .core import apply_probs, attention_probs, masked_attention
from .layers import SEMANTIC_LEVEL
from .run import COND, SOURCE, TARGET, UNCOND, AttnCall, Controller

START_STEP = 3  # Eq. 2: object preservation after step T = 3 (paper Sec. 3.3), on the paper's 50-step schedule
START_LAYER = 8  # Eq. 2: ... and layer L = 8 (paper Sec. 3.3)
FREE_LAYER_RATIO = 0.1  # Sec. 3.3: "randomly apply normal self-attention in 10% of the layers"
PAPER_STEPS = 50  # Sec. 4.1: 50 DDIM steps; S and T_m are given on this schedule and moved to the run's (run_step)
SCRATCH = "cpam"  # RunState.scratch key prefix of this technique
REFINED_MASK = (SCRATCH, "target_mask")


# ------------------------------------------------------------------------------------------------ strategies
@dataclass(frozen=True)
class Strategy:
    """A mask-guidance strategy (Sec. 3.2 / 3.4, App. A.1): how M_s and M_t are set and which equations apply.

    invert_mask: the region to edit is 1 - mask (background change: the connected mask is the object to keep).
    retain_object: Eq. 2 first case allowed (the object keeps its identity; pose/view may change).
    preserve_background: Eq. 1 outside M_t (else normal self-attention there).
    target_mask: "expand" (M_s dilated), "same" (M_t = M_s) or "empty" (M_t = 0).
    refine: M_t follows the object words' cross-attention after T_m steps (when words are given).
    outside: what pixels outside M_t attend in cross-attention: "null" (Eq. 4) or "region" (a prompt of their own).
    background_only: every query attends background keys only, in every layer (object removal, App. A.1).
    """

    name: str
    invert_mask: bool
    retain_object: bool
    preserve_background: bool
    target_mask: str
    refine: bool
    outside: str
    background_only: bool = False


STRATEGIES = {s.name: s for s in (
    Strategy("edit object (keep identity)", False, True, True, "expand", True, "null"),
    Strategy("replace object", False, False, True, "expand", True, "null"),
    Strategy("remove object", False, False, True, "empty", False, "null", background_only=True),
    Strategy("change background", True, False, True, "same", False, "null"),
    Strategy("regional prompts", False, False, False, "same", False, "region"),
)}


# ------------------------------------------------------------------------------------------------ steps
def run_step(value: int, steps: int, paper_steps: int = PAPER_STEPS) -> int:
    """A step index given on the paper's 50-step schedule (S of Eq. 2, T_m of Sec. 3.4), moved to a run of `steps`.

    The stage keeps the same fraction of the run: round(value * steps / 50), halves up. A value that acts at 50 steps
    (value < 50) stays inside the run (at most steps - 1, so it still acts on the last step); a value >= 50 never
    acts at 50 steps and returns `steps` (never, at any step count: the node warns). 0-based with the gate
    "step >= run_step(...)". Examples: S = 3 -> 1 at 10 and 20 steps, 3 at 50, 6 at 100; T_m = 5 -> 1, 2, 5, 10.

    Differences: the paper gives S and T_m for 50 steps only (Sec. 4.1); keeping their fraction of the run is the
    pack's choice (P2P's windows are fractions too).
    """
    if value >= paper_steps:
        return steps
    return min((2 * value * steps + paper_steps) // (2 * paper_steps), steps - 1) if value > 0 else 0


# ------------------------------------------------------------------------------------------------ layers
def layer_numbering(blocks: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """Layer index l of every transformer block (block, index), in forward order (duplicates = deeper transformers
    of the same block share its index). See the module docstring for the mapping to the paper's layers."""
    numbering: dict[tuple[str, int], int] = {}
    for key in blocks:
        numbering.setdefault(key, len(numbering))
    return numbering


def paper_start_layer(sites: list[tuple[str, int, int]]) -> int:
    """The paper's L for any UNet: the layer index of the decoder's second transformer block at the semantic level.

    sites: (block, index, level) of every attention site in forward order. SD1.x / SD2.x: output block 4 -> 8 (the
    paper's L = 8, Sec. 3.3); SDXL (no attention at the latent resolution, three 32x32 decoder blocks at 1024 px):
    output block 1 -> 6. Falls back to START_LAYER when the decoder has fewer than two blocks at that level.

    Differences: the paper gives L = 8 for SD1.5 only; the same architectural position is used for other families.
    """
    numbering = layer_numbering([(b, i) for b, i, _ in sites])
    decoder = list(dict.fromkeys((b, i) for b, i, level in sites if b == "output" and level == SEMANTIC_LEVEL))
    return numbering[decoder[1]] if len(decoder) >= 2 else START_LAYER


def attention_layers(sites: list[tuple[str, int, int]]) -> dict[tuple[str, int, int], int]:
    """Column of every self-attention layer (block, index, depth) in the free-layer table, in forward order.

    Unlike `layer_numbering` (the paper's l, one per transformer block), every transformer depth is its own layer
    here: SD1.x/SD2.x have 16 (one per block, so both numberings agree), SDXL 70 (2 or 10 per block)."""
    return {key: n for n, key in enumerate(dict.fromkeys(sites))}


def free_layer_count(layers: int, ratio: float = FREE_LAYER_RATIO) -> int:
    """How many attention layers run normal self-attention per step: the whole count nearest to ratio * layers
    (halves up). Not exactly 10% where the layer count is no multiple of 10: SD1.x/SD2.x 16 layers -> 2 (12.5%),
    SDXL 70 -> 7 (10%)."""
    return min(layers, int(math.floor(ratio * layers + 0.5)))


def free_layer_table(seed: int, steps: int, layers: int, ratio: float = FREE_LAYER_RATIO) -> torch.Tensor:
    """Which layers use normal self-attention at each step (Sec. 3.3, "randomly ... in 10% of the layers").

    layers: the number of self-attention layers (`attention_layers`). Returns bool [S, layers] with exactly
    `free_layer_count` True entries per step, drawn without replacement by a CPU generator seeded with `seed`: the
    same seed always gives the same table, on every device.

    Differences: the paper does not say whether the random layers are drawn once or per step; a fresh draw every
    step lets every layer exchange information between regions at some steps.
    """
    gen = torch.Generator().manual_seed(int(seed))
    count = free_layer_count(layers, ratio)
    table = torch.zeros(steps, layers, dtype=torch.bool)
    for step in range(steps):
        table[step, torch.randperm(layers, generator=gen)[:count]] = True
    return table


# ------------------------------------------------------------------------------------------------ Eq. 1-3
@dataclass(frozen=True)
class QueryGroup:
    """Queries [N] (bool) that attend the same keys: the source's K_i, V_i (from_source) or the row's own K, V,
    restricted to `keys` [N] (bool; None = all keys)."""

    queries: torch.Tensor
    from_source: bool
    keys: torch.Tensor | None = None
    index: torch.Tensor | None = None  # queries.nonzero() when precomputed (indexed_groups)

    @property
    def normal(self) -> bool:
        return not self.from_source and self.keys is None


def adaptation_groups(fg_queries: torch.Tensor, ms_keys: torch.Tensor, mt_keys: torch.Tensor, *, object_from_source:
                      bool, background_from_source: bool, free: bool = False, background_only: bool = False
                      ) -> list[QueryGroup]:
    """Route every query of one self-attention layer (Eq. 1-3, App. A.1, the 10% rule of Sec. 3.3).

    fg_queries [N]: queries inside M_t; ms_keys [N]: keys inside M_s; mt_keys [N]: keys inside M_t (bool).
    - Eq. 3: queries in M_t take SC_fg, the others SC_bg;
    - Eq. 1: SC_bg = Att(Q, K_i, V_i; 1 - M_s) when `background_from_source`, else normal Att(Q, K, V);
    - Eq. 2: SC_fg = Att(Q, K_i, V_i; M_t) when `object_from_source` (the caller folds in "step >= S, layer >= L
      and the object is retained"), else Att(Q, K, V);
    - free (a random 10% layer): normal self-attention for every query;
    - background_only (object removal, App. A.1): every query attends background keys only, in free layers too
      (their own K, V restricted to 1 - M_s).

    Differences: a group whose key set is empty at this layer's grid (a mask covering everything, or a small region
    vanishing at a coarse layer) falls back to normal self-attention instead of producing zeros.
    """
    bg_keys = ~ms_keys
    if free:
        groups = [QueryGroup(torch.ones_like(fg_queries), False, bg_keys if background_only else None)]
    else:
        groups = [QueryGroup(fg_queries, object_from_source, mt_keys if object_from_source else None),
                  QueryGroup(~fg_queries, background_from_source, bg_keys if background_from_source else None)]
    out = []
    for g in groups:
        if g.keys is not None and not bool(g.keys.any()):
            g = QueryGroup(g.queries, False, None)
        if bool(g.queries.any()):
            out.append(g)
    return out


def indexed_groups(groups: list[QueryGroup]) -> list[QueryGroup]:
    """`groups` with their query indices precomputed (each nonzero() reads the mask back from the GPU)."""
    return [g if g.normal else QueryGroup(g.queries, g.from_source, g.keys, g.queries.nonzero().squeeze(-1))
            for g in groups]


def adapt_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor,
                         heads: int, normal: torch.Tensor, groups: list[QueryGroup]) -> torch.Tensor:
    """Self-attention output of target rows under the preservation adaptation (Eq. 1-3), [R, N, H*D].

    q, k, v [R, N, H*D]: the target rows; k_src, v_src: K_i, V_i of the paired source rows; normal: Att(Q, K, V)
    as the host computed it. Each group's queries are gathered and attend their keys with SDPA key masks
    (core.masked_attention), so no N x N probability matrix is materialised.
    """
    out = normal.clone()
    for g in groups:
        if g.normal:
            continue
        idx = g.index if g.index is not None else g.queries.nonzero().squeeze(-1)
        keys, values = (k_src, v_src) if g.from_source else (k, v)
        mask = None if g.keys is None else g.keys.view(1, 1, 1, -1)
        out[:, idx] = masked_attention(q[:, idx], keys, values, heads, mask).to(out.dtype)
    return out


def dense_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_src: torch.Tensor, v_src: torch.Tensor,
                         heads: int, groups: list[QueryGroup]) -> tuple[torch.Tensor, torch.Tensor]:
    """The same maths with explicit probabilities (for checks and small inputs): (probs [R, H, N, 2N], out).

    Keys are [own K | source K_i]; each query's allowed keys follow its group. Every query belongs to one group.
    """
    n = q.shape[1]
    allowed = torch.zeros(n, 2 * n, dtype=torch.bool, device=q.device)
    for g in groups:
        keys = torch.ones(n, dtype=torch.bool, device=q.device) if g.keys is None else g.keys
        block = slice(n, 2 * n) if g.from_source else slice(0, n)
        allowed[g.queries.nonzero().squeeze(-1), block] = keys
    probs = attention_probs(q, torch.cat([k, k_src], 1), heads, allowed[None, None])
    return probs, apply_probs(probs, torch.cat([v, v_src], 1), heads)


# ------------------------------------------------------------------------------------------------ Eq. 4
def localized_extraction(prompt_out: torch.Tensor, q: torch.Tensor, k_other: torch.Tensor, v_other: torch.Tensor,
                         heads: int, inside: torch.Tensor) -> torch.Tensor:
    """Cross-attention with localized extraction (Eq. 4): queries inside M_t keep their attention to the target
    prompt (`prompt_out` = Att(Q, K_t, V_t)), all others attend the null prompt (k_other, v_other), [R, N, H*D].

    inside [N] bool. With a region prompt in place of the null prompt this is the regional conditioning of Fig. 2.
    """
    other = masked_attention(q, k_other, v_other, heads).to(prompt_out.dtype)
    return torch.where(inside.view(1, -1, 1), prompt_out, other)


# ------------------------------------------------------------------------------------------------ controller
@dataclass(frozen=True, eq=False)
class CPAMController(Controller):
    """Preservation adaptation (self-attention) + localized extraction (cross-attention) on the target rows.

    source_masks [B, h, w]: M_s per image at latent resolution (float coverage; already inverted for a background
    change); target_masks [B, h, w]: the static M_t (cloned, expanded or empty). layers: the paper's layer index l
    of each (block, index) (Eq. 2's gate). free_layers [S, A]: the seeded 10% table over the A self-attention layers
    numbered by `attention_layers` (block, index, depth) -> column (None: the column is l, as on SD1.x). start_step
    and refine_step are steps of this run (moved from the paper's 50-step schedule by `run_step`). null_context
    [1, T, E]: the inversion's negative prompt, used as Null when the step has no ∅_t. region_context [1, T, E] or
    None: the background prompt of the regional strategy.
    """

    strategy: Strategy
    source_masks: torch.Tensor
    target_masks: torch.Tensor
    layers: dict
    free_layers: torch.Tensor
    null_context: torch.Tensor = field(repr=False)
    region_context: torch.Tensor | None = field(default=None, repr=False)
    start_step: int = START_STEP
    start_layer: int = START_LAYER
    refine_step: int = 0
    localized: bool = True
    source_text: str | None = None
    target_text: str | None = None
    target_tokens: object = None
    target_conditioning: list | None = field(default=None, repr=False)
    attention_layers: dict | None = None

    EDITS_OUTPUT = True
    PINS_SOURCE = True  # Alg. 1 l.3: K_i, V_i come from the inversion latent z_i itself, not a regenerated one

    # ------------------------------------------------------------------ which calls
    @property
    def adapts_self(self) -> bool:
        s = self.strategy
        return s.retain_object or s.preserve_background or s.background_only

    @property
    def extra_name(self) -> str | None:
        if self.strategy.outside == "region":
            return "region"
        return "null" if self.localized else None

    def active(self, call: AttnCall) -> bool:
        if call.run is None or TARGET not in call.run.roles or SOURCE not in call.run.roles:
            return False
        if call.kind == "cross":
            return self.extra_name in call.extra and bool(call.role_rows(COND, TARGET))
        return self.adapts_self and (call.site.block, call.site.index) in self.layers

    def extra_context(self, run) -> list[tuple[str, torch.Tensor]]:
        """Context patcher: the tokens Eq. 4 needs next to the prompt (the step's null text, or the region prompt)."""
        if TARGET not in run.roles or self.extra_name is None:
            return []
        if self.extra_name == "region":
            return [("region", self.region_context)]
        null = run.context_override.get(UNCOND)
        return [("null", (self.null_context if null is None else null)[:1])]

    # ------------------------------------------------------------------ masks at a layer grid
    def _grid_mask(self, call: AttnCall, name: str, mask: torch.Tensor, step: int | None) -> torch.Tensor:
        return call.run.memo((self, "grid", name, call.grid, step, call.q.device),
                             lambda: mask_to_grid(mask.to(call.q.device).float(), call.grid, binary=True)
                             .flatten().bool())

    def source_mask(self, call: AttnCall) -> torch.Tensor:
        """M_s at this layer's grid, [N] bool."""
        return self._grid_mask(call, "source", self.source_masks[call.run.image][None], None)

    def target_mask(self, call: AttnCall, step: int) -> torch.Tensor:
        """M_t at this layer's grid, [N] bool: M_s for the first T_m steps (Sec. 3.4), then the refined mask of the
        run (when the strategy refines and a refinement exists) or the static clone."""
        if self.strategy.target_mask == "empty":  # run-cached like every grid mask: `_self` memoises by identity
            return call.run.memo((self, "empty", call.q.shape[1], call.q.device),
                                 lambda: torch.zeros(call.q.shape[1], dtype=torch.bool, device=call.q.device))
        if step < self.refine_step:
            return self.source_mask(call)
        refined = call.run.scratch.get(REFINED_MASK) if self.strategy.refine else None
        if refined is not None:
            return self._grid_mask(call, "refined", refined, step)
        return self._grid_mask(call, "target", self.target_masks[call.run.image][None], None)

    # ------------------------------------------------------------------ edits
    def edit_output(self, call: AttnCall, out: torch.Tensor) -> torch.Tensor:
        step = call.step
        if call.kind == "cross":
            return self._cross(call, out, step)
        return self._self(call, out, step)

    def _pairs(self, call: AttnCall, labels) -> tuple[list[int], list[int]]:
        src, tgt = [], []
        for label in dict.fromkeys(labels):
            s, t = call.role_rows(label, SOURCE), call.role_rows(label, TARGET)
            src += s[:len(t)]
            tgt += t[:len(s)]
        return src, tgt

    def _self(self, call: AttnCall, out: torch.Tensor, step: int) -> torch.Tensor:
        src, tgt = self._pairs(call, call.layout.labels)
        if not tgt:
            return out
        layer = self.layers[(call.site.block, call.site.index)]
        s = self.strategy
        column = layer if self.attention_layers is None else self.attention_layers[
            (call.site.block, call.site.index, call.site.depth)]
        free = call.run.memo((self, "free", step, column),
                             lambda: bool(self.free_layers[min(step, self.free_layers.shape[0] - 1), column]))
        retained = s.retain_object and step >= self.start_step and layer >= self.start_layer
        m_t, m_s = self.target_mask(call, step), self.source_mask(call)
        # The groups depend only on these (run-memoised, hence run-lived) grid masks and the flags: built once per run,
        # not per layer call, since their emptiness tests and indices read the masks back from the GPU.
        groups = call.run.memo(
            (self, "groups", id(m_t), id(m_s), free, retained),
            lambda: indexed_groups(adaptation_groups(m_t, m_s, m_t, object_from_source=retained,
                                                     background_from_source=s.preserve_background, free=free,
                                                     background_only=s.background_only)))
        if all(g.normal for g in groups):
            return out
        out = out.clone()
        out[tgt] = adapt_self_attention(call.q[tgt], call.k[tgt], call.v[tgt], call.k[src], call.v[src], call.heads,
                                        out[tgt], groups)
        return out

    def _cross(self, call: AttnCall, out: torch.Tensor, step: int) -> torch.Tensor:
        tgt = call.role_rows(COND, TARGET)
        k_other, v_other = call.extra[self.extra_name]
        out = out.clone()
        out[tgt] = localized_extraction(out[tgt], call.q[tgt], k_other[tgt], v_other[tgt], call.heads,
                                        self.target_mask(call, step))
        return out


@dataclass(frozen=True, eq=False)
class CPAMMaskRefine(StepHook):
    """Mask refinement (Sec. 3.4): after each step from T_m - 1 on, M_t = the object tokens' aggregated
    cross-attention in the target row (normalised, thresholded), for the next steps, so step T_m is the first to use
    it. `start` is T_m of this run (`run_step`). An empty result keeps the previous M_t."""

    tokens: tuple[int, ...]
    start: int
    threshold: float

    def after_step(self, ctx: StepContext) -> None:
        if ctx.step + 1 < self.start:
            return
        run = ctx.denoiser.run
        maps = run.mean_map("cross", SEMANTIC_LEVEL)
        if maps is None or not ctx.rows(TARGET):
            return
        grid = run.grids[("cross", SEMANTIC_LEVEL)]
        mask = mask_from_attention(maps[ctx.rows(TARGET)[0]], list(self.tokens), grid, tuple(ctx.x.shape[-2:]),
                                   self.threshold)
        if bool(mask.any()):
            run.scratch[REFINED_MASK] = binarize(mask)[:, 0]
            ctx.state["cpam_target_mask"] = mask
