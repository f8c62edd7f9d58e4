"""Attention-based background estimation (Wang et al., "Dynamic Prompt Learning", NeurIPS 2023, Sec. 3.3). Pure torch.

The rows of the self-attention matrix at the 32x32 level (averaged over the DDIM-inversion steps, heads and layers)
are clustered into V segments with k-means; a segment is background when its agreement score with every noun's
cross-attention map stays at or under a threshold. Used by Dynamic Prompt Learning (its background leakage loss) and
by MaskFromAttention's background mode.

Constants are the paper's (Sec. 3.3: self-attention 32, cross-attention 16, TH = 0.2, V = 5) and the official code's
(`_2_DDIM_inv.py`, `sd_study_utils.py`: KMeans n_init 10, seed 1, noun-map normalisation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BACKGROUND_CLUSTERS = 5  # V (Sec. 3.3; supplement)
BACKGROUND_THRESHOLD = 0.2  # TH on the agreement score (Sec. 3.3; supplement)
KMEANS_SEED = 1  # official code: np.random.seed(1) before sklearn KMeans
KMEANS_INITS = 10  # official code: KMeans(n_init=10), the best inertia wins
KMEANS_MAX_ITER = 300  # sklearn KMeans default
KMEANS_TOL = 1e-4  # sklearn KMeans default, relative to the mean per-feature variance of the data
# Closed-class words of a caption, never scored against the segments (the official code scores the nltk nouns of the
# caption; ComfyUI ships no part-of-speech tagger, so every other word of the prompt is scored, see `scoring_words`).
FUNCTION_WORDS = frozenset(" ".join((
    "a an the this that these those some any each every another no its his her their my your our",
    "of on in at with by for from to into onto near under over behind beside besides next between above below across",
    "through around against along inside outside upon off up down out about beneath among atop toward towards",
    "and or but nor while as than so",
    "it he she they we i you him them us me itself",
    "is are was were be been being has have had do does did there here",
    "one two three four five six seven eight nine ten",
)).split())


def scoring_words(words: list[tuple[list[int], str]], nouns: list[list[int]]) -> list[list[int]]:
    """Token positions of the words whose maps the background estimate scores against (Sec. 3.3: "all nouns").

    words: (positions, lower-cased text) of every word of the source prompt (`PromptTokens.word_groups`); nouns:
    the positions of the nouns the user listed. Returns the listed nouns first (as given), then every other word of
    the prompt that is not a function word (`FUNCTION_WORDS`), punctuation or a number and shares no position with
    a listed noun.
    Differences from the official code (`cluster2noun_` on nltk's NN* tags): without a part-of-speech tagger,
    adjectives and verbs of the caption are scored too. A scored word can only keep a segment out of the background,
    so the estimate is at most the nltk-nouns one (it may come out smaller, e.g. empty when a word attends
    everywhere: the caller then warns and switches the background loss off).
    """
    taken = {p for pos in nouns for p in pos}
    out = [list(pos) for pos in nouns]
    for positions, text in words:
        if not text or text in FUNCTION_WORDS or not any(c.isalpha() for c in text) or taken & set(positions):
            continue
        out.append(list(positions))
        taken |= set(positions)
    return out


def _sq_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances [N, k]."""
    d = (x * x).sum(-1, keepdim=True) - 2 * x @ centers.T + (centers * centers).sum(-1)[None]
    return d.clamp_min(0)


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): each next centre drawn with probability ~ D(x)^2."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centers = [x[first]]
    closest = _sq_distances(x, x[first][None])[:, 0]
    for _ in range(1, k):
        total = float(closest.sum())
        if total > 0 and math.isfinite(total):
            probs = (closest / total).double().cpu()
            idx = int(torch.multinomial(probs, 1, generator=gen))
        else:  # every point coincides with a centre: any point will do
            idx = int(torch.randint(n, (1,), generator=gen))
        centers.append(x[idx])
        closest = torch.minimum(closest, _sq_distances(x, x[idx][None])[:, 0])
    return torch.stack(centers)


def _lloyd(x: torch.Tensor, centers: torch.Tensor, max_iter: int, tol: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      float]:
    """Lloyd iterations from `centers`; an emptied cluster keeps its centre. Returns (labels, centres, inertia)."""
    k = centers.shape[0]
    for _ in range(max_iter):
        labels = _sq_distances(x, centers).argmin(-1)
        onehot = F.one_hot(labels, k).to(x.dtype)
        counts = onehot.sum(0)
        sums = onehot.T @ x
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= tol:
            break
    dist = _sq_distances(x, centers)
    labels = dist.argmin(-1)
    return labels, centers, float(dist.gather(1, labels[:, None]).sum())


def kmeans(x: torch.Tensor, k: int, seed: int = KMEANS_SEED, inits: int = KMEANS_INITS,
           max_iter: int = KMEANS_MAX_ITER, tol: float = KMEANS_TOL) -> torch.Tensor:
    """Cluster labels [N] of the rows of x [N, D] (Lloyd's k-means, k-means++ seeding, best inertia of `inits` runs).

    Deterministic for a given seed (a CPU generator draws the seeds on any device). k is lowered to N when N < k.
    Differences from sklearn's KMeans used by the official code: plain (not greedy) k-means++ seeding, and an
    emptied cluster keeps its centre instead of being moved to a far point; labels are numbered as found.
    """
    x = x.float()
    k = max(1, min(int(k), x.shape[0]))
    gen = torch.Generator().manual_seed(int(seed))
    tol_abs = tol * float(x.var(0, unbiased=False).mean())  # 0 for a single row
    best, best_inertia = None, math.inf
    for _ in range(max(1, int(inits))):
        labels, _, inertia = _lloyd(x, _kmeans_pp(x, k, gen), max_iter, tol_abs)
        if inertia < best_inertia or best is None:
            best, best_inertia = labels, inertia
    return best


def normalise_noun_maps(maps: torch.Tensor) -> torch.Tensor:
    """(m - |min m|) / max m per noun map [K, h, w] (official `cluster2noun_`); an all-zero map stays 0 (no NaN)."""
    flat = maps.flatten(1)
    low = flat.amin(-1).abs()[:, None, None]
    high = flat.amax(-1)[:, None, None]
    safe = torch.where(high > 0, high, torch.ones_like(high))
    return torch.where(high > 0, (maps - low) / safe, torch.zeros_like(maps))


def agreement_scores(labels: torch.Tensor, maps: torch.Tensor, clusters: int) -> torch.Tensor:
    """sigma_nv = sum(A^n * M_v) / sum(M_v) for every noun n and cluster v, [K, V] (Sec. 3.3, after Patashnik et al.).

    labels [N] cluster of every grid cell; maps [K, N] normalised noun maps on the same grid. Empty clusters score 0.
    """
    onehot = F.one_hot(labels, clusters).to(maps.dtype)  # [N, V]
    size = onehot.sum(0)
    return (maps @ onehot) / size.clamp_min(1)[None]


def estimate_background(self_attention: torch.Tensor, noun_maps: torch.Tensor, clusters: int = BACKGROUND_CLUSTERS,
                        threshold: float = BACKGROUND_THRESHOLD, seed: int = KMEANS_SEED,
                        grid: tuple[int, int] | None = None, inits: int = KMEANS_INITS) -> torch.Tensor:
    """Background mask of an image from its self- and cross-attention (DPL Sec. 3.3; "1 = background").

    Args:
        self_attention: [N, N] (or [1, N, N]) self-attention probabilities of the 32x32 level at 512 px (level 2,
            `AttentionStore.self_maps[2][row]`), averaged over heads, layers and inversion steps. Row i is the
            feature of grid cell i (row-major over `grid`).
        noun_maps: [K, h', w'] cross-attention maps of the K nouns (16x16 at 512 px: level 4, averaged over heads,
            layers and steps; for a multi-token noun, the mean of its token columns). Any grid: they are brought to
            `grid` by nearest-neighbour upsampling (x2 repetition in the paper's setting). K = 0 is allowed.
        clusters: V, number of k-means segments (5).
        threshold: TH; a segment is background when its agreement score is <= TH for every noun (0.2).
        seed: k-means seed (1); `inits` k-means restarts (10), the lowest inertia wins.
        grid: (h, w) of the self-attention queries; default square (sqrt(N) x sqrt(N)). From an AttentionStore:
            `attention.layers.semantic_grid(store.latent_hw, 2)`; the noun maps from it:
            `attention.dpl.noun_maps(store.cross[4][row], token_positions_per_noun)`.

    Returns:
        float [h, w] mask with values in {0, 1} on the self-attention grid, 1 = background, on the input's device.

    Semantics of the degenerate cases (never NaN):
        - no nouns (K = 0): every segment is background (no noun claims it) -> all ones;
        - all rows equal: k-means finds one segment; a constant or all-zero noun map normalises to 0, so the
          segment scores 0 -> all ones unless a noun map has structure that lifts its score above TH;
        - empty segments are ignored.

    Differences from the official code: pure-torch k-means instead of sklearn (see `kmeans`); the reference labels a
    segment background when max_n sigma_nv is not above TH, the paper says "< TH": the code's "<=" is used.
    """
    sa = self_attention.float()
    if sa.ndim == 3:
        sa = sa[0]
    n = sa.shape[0]
    if sa.ndim != 2 or sa.shape[1] != n:
        raise ValueError(f"self_attention must be [N, N] (one image); got {tuple(self_attention.shape)}")
    if grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"self_attention has {n} queries, not a square grid; pass grid=(h, w)")
        grid = (side, side)
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {h}x{w} does not match the {n} self-attention queries")
    labels = kmeans(torch.nan_to_num(sa), clusters, seed, inits)
    if noun_maps.shape[0] == 0:
        return torch.ones(h, w, device=sa.device)
    maps = F.interpolate(noun_maps.float()[:, None].to(sa.device), size=(h, w), mode="nearest")[:, 0]
    scores = agreement_scores(labels, normalise_noun_maps(torch.nan_to_num(maps)).flatten(1), max(1, int(clusters)))
    background_cluster = (scores <= threshold).all(0)  # [V]
    return background_cluster[labels].float().view(h, w)
