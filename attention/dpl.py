"""Dynamic Prompt Learning losses (Wang et al., "Dynamic Prompt Learning: Addressing Cross-Attention Leakage for
Text-Based Image Editing", NeurIPS 2023, Sec. 3.2, Eq. 6-10). Pure torch.

Notation: A [h, w, T] = this step's cross-attention probabilities of the source prompt, averaged over the heads and
the layers of the semantic level (16x16 at 512 px, `layers.SEMANTIC_LEVEL`), from a conditional-only UNet pass.
A noun k owns one or more token positions; its map A_k [h, w] is the mean of its tokens' columns (one column in the
paper). B [h, w] = the {0, 1} background mask on the same grid.

Hyper-parameters are the official code's (`DPL.sh`), which its supplement (Sec. D) repeats; the main paper gives
no values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LAMBDA_AT = 1.0  # weight of the attention balancing loss (Eq. 9; official code DPL.sh, supplement Sec. D)
LAMBDA_DJ = 0.05  # weight of the disjoint object attention loss (ibid.)
LAMBDA_BG = 0.05  # weight of the background leakage loss (ibid.)
ALPHA_AT, BETA_AT = 25.0, 0.3  # Eq. 10 threshold schedule of L_at (ibid.)
ALPHA_DJ, BETA_DJ = 25.0, 0.9  # Eq. 10 threshold schedule of L_dj (ibid.)
ALPHA_BG, BETA_BG = 50.0, 0.7  # Eq. 10 threshold schedule of L_bg (ibid.)
REFERENCE_STEPS = 50  # the schedule's step index is counted in units of a 50-step run (Alg. 1 line 3: T = 50)
SOFTMAX_SCALE = 100.0  # Attend-and-Excite token distribution softmax(100 * A[..., 1:-1]) (A&E / DPL code)
SMOOTH_KERNEL = 3  # Gaussian filter F of Eq. 8: A&E GaussianSmoothing(kernel_size=3, sigma=0.5) (A&E / DPL code)
SMOOTH_SIGMA = 0.5  # nominal sigma; the A&E formula exp(-((x - mu) / (2 sigma))^2) makes it act as sigma * sqrt(2)


def ae_gaussian_kernel(size: int = SMOOTH_KERNEL, sigma: float = SMOOTH_SIGMA) -> torch.Tensor:
    """The Gaussian filter F of Eq. 8 exactly as Attend-and-Excite builds it, [size, size], summing to 1.

    Differences: A&E's kernel is exp(-((x - mu) / (2 sigma))^2), i.e. an effective sigma of sigma * sqrt(2) (0.71 for
    0.5); reproduced on purpose so the thresholds of Eq. 10 keep their meaning (3x3 weights: corner 0.045, edge
    0.122, centre 0.332).
    """
    x = torch.arange(size, dtype=torch.float32)
    g = torch.exp(-(((x - (size - 1) / 2) / (2 * sigma)) ** 2)) / (sigma * math.sqrt(2 * math.pi))
    kernel = g[:, None] * g[None, :]
    return kernel / kernel.sum()


def smooth(maps: torch.Tensor, kernel: torch.Tensor | None = None) -> torch.Tensor:
    """F(maps): [..., h, w] filtered with the A&E kernel after reflect padding (replicate on grids under 2 cells)."""
    kernel = ae_gaussian_kernel() if kernel is None else kernel
    pad = kernel.shape[-1] // 2
    shape = maps.shape
    x = maps.reshape(-1, 1, *shape[-2:])
    mode = "reflect" if min(shape[-2:]) > pad else "replicate"
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    return F.conv2d(x, kernel.to(x)[None, None]).reshape(shape)


def token_distribution(maps: torch.Tensor, scale: float = SOFTMAX_SCALE) -> torch.Tensor:
    """Attend-and-Excite's per-pixel token distribution softmax(scale * A[..., 1:-1]) over tokens, [h, w, T].

    The start token and the last slot are dropped before the softmax and given 0, so token positions keep their
    meaning (A&E shifts the indices instead).
    """
    inner = torch.softmax(maps[..., 1:-1] * scale, dim=-1)
    return F.pad(inner, (1, 1))


def noun_maps(maps: torch.Tensor, nouns: Sequence[Sequence[int]]) -> torch.Tensor:
    """A_k for every noun: the mean of its token columns of `maps` [h, w, T] -> [K, h, w]."""
    if not nouns:
        return maps.new_zeros((0, *maps.shape[:2]))
    return torch.stack([maps[..., list(pos)].mean(-1) for pos in nouns])


def attention_balancing_loss(maps: torch.Tensor, nouns: Sequence[Sequence[int]]) -> torch.Tensor:
    """L_at = max_k (1 - max F(A_k)) over the nouns, on the softmaxed token distribution (Eq. 8).

    Differences: as in the A&E/DPL code, A_k here is the noun's column of softmax(100 * A[..., 1:-1]) (see
    `token_distribution`), and each term is clamped at 0 (max(0, 1 - max)).
    """
    if not nouns:
        return maps.new_zeros(())
    peaks = smooth(noun_maps(token_distribution(maps), nouns)).flatten(1).amax(-1)
    return (1.0 - peaks).clamp_min(0).amax()


def disjoint_loss(maps: torch.Tensor, nouns: Sequence[Sequence[int]]) -> torch.Tensor:
    """L_dj: cosine similarity between the maps of different nouns (Eq. 6), 0 with fewer than two nouns.

    Differences: Eq. 6 sums cos over ordered pairs i != j; the official code (whose thresholds Eq. 10 uses) takes the
    mean over unordered pairs, which is what this returns. Raw (not softmaxed) maps, as in the code.
    """
    if len(nouns) < 2:
        return maps.new_zeros(())
    flat = noun_maps(maps, nouns).flatten(1)
    cos = F.cosine_similarity(flat[:, None], flat[None, :], dim=-1)
    pairs = torch.tril(torch.ones_like(cos, dtype=torch.bool), diagonal=-1)
    return cos[pairs].mean()


def background_loss(maps: torch.Tensor, nouns: Sequence[Sequence[int]], background: torch.Tensor) -> torch.Tensor:
    """L_bg: cosine similarity of every noun map with the background mask B (Eq. 7); 0 for an empty mask.

    Differences: Eq. 7 sums over the nouns; the official code takes the mean. Raw maps, as in the code.
    """
    if not nouns:
        return maps.new_zeros(())
    flat = noun_maps(maps, nouns).flatten(1)
    bg = background.to(flat).flatten()[None]
    return F.cosine_similarity(flat, bg, dim=-1).mean()


@dataclass(frozen=True)
class Thresholds:
    """TH_t of Eq. 10 for the three losses."""

    at: float
    dj: float
    bg: float


def schedule_threshold(beta: float, alpha: float, step: int, steps: int = REFERENCE_STEPS) -> float:
    """TH = beta * exp(-t / alpha) (Eq. 10) at denoising step `step` (0 = the noisiest) of a `steps`-step run.

    Differences (not the paper's notation): t is the denoising loop index of the official code (0 at the first,
    noisiest step), so the thresholds start at beta and tighten towards the clean end. In the paper's notation
    (Alg. 1, t = T..1) exp(-t / alpha) would run the other way (tightest at the noisiest step); the code's direction
    is used. The schedule is defined at 50 steps: a run of `steps` steps evaluates it at t = step * 50 / steps, so
    step i covers the same stretch of the trajectory as step i * 50 / steps of a 50-step run (10 steps: t = 0, 5,
    ..., 45; 20 steps: t = 0, 2.5, ..., 47.5).
    """
    t = step * REFERENCE_STEPS / max(steps, 1)
    return beta * math.exp(-t / alpha)


def thresholds(step: int, steps: int = REFERENCE_STEPS) -> Thresholds:
    """The three thresholds of Eq. 10 at denoising step `step` of `steps` with the official (alpha, beta)."""
    return Thresholds(schedule_threshold(BETA_AT, ALPHA_AT, step, steps),
                      schedule_threshold(BETA_DJ, ALPHA_DJ, step, steps),
                      schedule_threshold(BETA_BG, ALPHA_BG, step, steps))


@dataclass(frozen=True)
class Weights:
    """lambda_at, lambda_dj, lambda_bg of Eq. 9."""

    at: float = LAMBDA_AT
    dj: float = LAMBDA_DJ
    bg: float = LAMBDA_BG


@dataclass
class Losses:
    """The three losses of one evaluation and their weighted sum L (Eq. 9). Unused losses are 0."""

    at: torch.Tensor
    dj: torch.Tensor
    bg: torch.Tensor
    total: torch.Tensor

    def below(self, th: Thresholds) -> bool:
        """The gradual-optimisation stop test: every loss strictly under its threshold (Alg. 1, lines 10-11: the
        loop goes on while any loss is >= its threshold)."""
        at, dj, bg = self.values()
        return at < th.at and dj < th.dj and bg < th.bg

    def values(self) -> tuple[float, float, float]:
        at, dj, bg = torch.stack([self.at, self.dj, self.bg]).detach().float().tolist()  # one GPU read, not three
        return at, dj, bg


def dpl_losses(maps: torch.Tensor, nouns: Sequence[Sequence[int]], background: torch.Tensor | None,
               weights: Weights = Weights()) -> Losses:
    """L = lambda_at L_at + lambda_dj L_dj + lambda_bg L_bg (Eq. 9) for maps [h, w, T].

    A loss whose weight is 0 is not evaluated (0), as in the code; L_dj needs two nouns and L_bg a background.
    Differences: the paper applies only L_bg when there is a single noun; the official code (and this) keeps L_at.
    """
    zero = maps.new_zeros(())
    at = attention_balancing_loss(maps, nouns) if weights.at else zero
    dj = disjoint_loss(maps, nouns) if weights.dj and len(nouns) >= 2 else zero
    bg = background_loss(maps, nouns, background) if weights.bg and background is not None else zero
    return Losses(at, dj, bg, weights.at * at + weights.dj * dj + weights.bg * bg)


def mean_cross_map(probs: Sequence[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """A [h, w, T]: per-head probabilities [1, H, N, T] of several layers averaged over layers and heads."""
    if not probs:
        raise ValueError("no cross-attention maps were captured at the semantic level; the model has no attention "
                         "layers at that resolution for this latent size")
    mean = torch.stack([p[0].float().mean(0) for p in probs]).mean(0)
    return mean.view(grid[0], grid[1], mean.shape[-1])


def overlap_and_leakage(maps: torch.Tensor, nouns: Sequence[Sequence[int]], background: torch.Tensor
                        ) -> tuple[float, float]:
    """Diagnostics of Fig. 5: mean pairwise cosine overlap of the noun maps, and the share of their mass on B."""
    a = noun_maps(maps, nouns).float()
    overlap = float(disjoint_loss(maps, nouns)) if len(nouns) >= 2 else 0.0
    mass = a.flatten(1).sum(-1).clamp_min(1e-12)
    on_bg = (a * background.to(a)).flatten(1).sum(-1)
    return overlap, float((on_bg / mass).mean()) if len(nouns) else 0.0
