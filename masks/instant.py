"""InstDiffEdit's instant attention mask (Zou et al., AAAI 2024, "Instant Attention Mask Generation"). Pure torch.

From the cross-attention maps of ONE prompt (the edit text) the mask of the region to edit is found without being
told which word names the object:
- Eq. 6: the *index* token is the word whose map is most similar (cosine) to the start token's map;
- Eq. 7: every word's similarity S_i to the index token's map;
- Eq. 8: a position vector P_i = +1 (S_i > gamma1), -1 (S_i < gamma2), 0 otherwise, decided ONCE at the first
  denoising step and reused at every later step;
- Eq. 9: the refined map A_ref = P . A_t, Gaussian-filtered, binarised at phi.

Notation: maps [h, w, T] are the head/layer-averaged cross-attention maps at the "16x16" level (A_t in the paper),
word maps [W, H, W'] one per prompt word upsampled to the latent grid, roles = P restricted to words.

Differences (all follow the reference code where the paper is silent, see docs/instdiffedit.md):
- the start token's map is inverted (1 - map) before Eq. 6: in Stable Diffusion the start token soaks up attention
  *outside* the objects, so its complement is what "overlaps the edit region";
- maps are compared after up-sampling to the latent grid with PIL's bicubic filter (Keys a = -0.5, as the reference's
  `Image.resize`) and min-max normalisation; the reference quantises every map to 8 bits before and after resizing
  while the pack keeps floats (similarities then differ by a few 1e-3: a word within that distance of gamma1 or
  gamma2 can still take another role); words made of several tokens use the mean of their tokens' maps;
- Eq. 8 uses >= / <= at the thresholds (reference) and A_ref = relu(minmax(mean of +1 maps) - minmax(mean of -1
  maps)) instead of the plain signed sum, so that the threshold phi applies to a map in [0, 1];
- a prompt with one word uses that word's map; a prompt with no word uses the inverted start-token map;
- the Gaussian filter is OpenCV's `GaussianBlur(5x5, sigma 0)`: for ksize 5 and sigma 0 OpenCV uses its fixed binomial
  table [1, 4, 6, 4, 1] / 16 (separable, reflect-101 borders), not a computed sigma; it is applied twice, then the map
  is min-max normalised before the threshold (reference `post_deal`).

Degenerate maps: a map without spatial contrast (all zero, all one, any constant) carries no location, normalises to
zeros, has cosine 0 with everything, and yields an EMPTY mask (nothing to edit) -- never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

GAMMA1 = 0.9  # Eq. 8 upper threshold (paper "Implementation"; reference InstDiffEdit.py)
GAMMA2 = 0.6  # Eq. 8 lower threshold (paper; the reference's sample_use.py uses 0.3)
PHI = 0.2  # Eq. 9 binarisation threshold (paper; reference run.sh; sample_use.py uses 0.3)
BLUR_TAPS = (1.0, 4.0, 6.0, 4.0, 1.0)  # reference post_deal: cv2.GaussianBlur((5, 5), 0) = OpenCV's fixed 5-tap table / 16
BLUR_PASSES = 2  # reference applies the blur twice
BICUBIC_A = -0.5  # PIL's bicubic kernel parameter (the reference resizes with PIL); torch's bicubic uses -0.75
FEATHER = 16  # px: width of the paste-back's soft edge (not in the paper: the reference has no paste-back)
LATENT_CELL = 8  # px per latent cell (SD VAEs)
INVERT_START_MAP = True  # reference: the start token's map is compared inverted (255 - x)
EPS = 1e-12


@dataclass(frozen=True)
class InstantRoles:
    """The position vector of Eq. 8 over the prompt's words, decided at the first step.

    index: word chosen by Eq. 6 (or forced); similarities [W]: S_i of Eq. 7; roles [W] in {-1, 0, +1}.
    """

    index: int
    similarities: torch.Tensor
    roles: torch.Tensor


def minmax(m: torch.Tensor, dims: tuple[int, ...] = (-2, -1)) -> torch.Tensor:
    """Min-max normalise over `dims` to [0, 1]; a constant map becomes all zeros (never NaN)."""
    m = m.float()
    lo = m.amin(dim=dims, keepdim=True)
    span = m.amax(dim=dims, keepdim=True) - lo
    return torch.where(span > EPS, (m - lo) / span.clamp_min(EPS), torch.zeros_like(m))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of flattened maps: a [K, H, W] vs b [H, W] -> [K]; 0 when either map is all zero."""
    a = a.flatten(1).float()
    b = b.flatten().float()
    den = a.norm(dim=1) * b.norm()
    return torch.where(den > EPS, (a @ b) / den.clamp_min(EPS), torch.zeros_like(den))


def cubic(x: torch.Tensor, a: float = BICUBIC_A) -> torch.Tensor:
    """Keys' cubic convolution kernel with parameter `a` (PIL `bicubic_filter`), support [-2, 2]."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] float64 weights of PIL's bicubic resampling along one axis (Pillow `precompute_coeffs`).

    Output pixel i is centred at (i + 0.5) * n_in / n_out; the kernel is stretched by the scale when shrinking
    (antialias); taps outside the image are dropped and the remaining weights renormalised (no border padding).
    """
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    center = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    lo = torch.floor(center - support + 0.5).clamp_min(0)[:, None]
    hi = torch.floor(center + support + 0.5).clamp_max(n_in)[:, None]
    j = torch.arange(n_in, dtype=torch.float64)[None]
    w = cubic((j - center[:, None] + 0.5) / stretch) * ((j >= lo) & (j < hi))
    total = w.sum(1, keepdim=True)
    return torch.where(total != 0, w / torch.where(total != 0, total, torch.ones_like(total)), w)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[K, h, w] attention-grid maps -> [K, H, W] on the latent grid, bicubic as PIL's `Image.resize` (reference).

    Differences: float maps (the reference resizes 8-bit images and re-quantises them).
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps.float()
    rows = resize_weights(maps.shape[-2], size[0]).to(maps.device)
    cols = resize_weights(maps.shape[-1], size[1]).to(maps.device)
    return torch.einsum("ih,khw,jw->kij", rows, maps.double(), cols).float()


def word_maps(maps: torch.Tensor, words: list[list[int]], start: int, size: tuple[int, int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-word maps and the reference start-token map on the latent grid.

    maps [h, w, T]; words: token positions of each prompt word; start: the start token's position (0).
    Returns (word maps [W, H, W'] each min-max normalised, start map [H, W'] min-max normalised and, with
    INVERT_START_MAP, inverted).
    """
    if words:
        per_word = minmax(upsample(torch.stack([maps[..., pos].float().mean(-1) for pos in words]), size))
    else:
        per_word = maps.new_zeros((0, *size)).float()
    ref = minmax(upsample(maps[..., start][None], size))[0]
    if INVERT_START_MAP:
        ref = minmax(1.0 - ref) if ref.amax() > 0 else ref  # a flat start map stays flat (no location)
    return per_word, ref


def instant_roles(per_word: torch.Tensor, start_map: torch.Tensor, gamma1: float = GAMMA1, gamma2: float = GAMMA2,
                  index: int | list[int] | None = None) -> InstantRoles:
    """Eq. 6-8: index word (argmax cosine with the start map), similarities S [W] and the position vector P [W].

    per_word [W, H, W'], start_map [H, W']. `index` forces the index word (skips Eq. 6); a list of words uses the
    mean of their maps as A_index and gives all of them role +1. The index word has S = 1 and role +1 (a flat
    index map has S = 0 everywhere: no word gets +1 and the mask is empty).
    """
    count = per_word.shape[0]
    if count == 0:
        empty = per_word.new_zeros(0)
        return InstantRoles(-1, empty, empty)
    if index is None:
        index = int(cosine(per_word, start_map).argmax())  # Eq. 6 (ties: the first word)
    forced = [index] if isinstance(index, int) else list(index)
    index_map = per_word[forced[0]] if len(forced) == 1 else minmax(per_word[forced].mean(0))
    sims = cosine(per_word, index_map)  # Eq. 7
    roles = torch.zeros(count, device=sims.device)
    roles[sims >= gamma1] = 1.0  # Eq. 8
    roles[sims <= gamma2] = -1.0
    if float(index_map.amax()) > 0:
        roles[forced] = 1.0  # cos(a, a) == 1 up to round-off; forced words are the object by definition
    return InstantRoles(forced[0], sims, roles)


def refined_map(per_word: torch.Tensor, start_map: torch.Tensor, roles: InstantRoles) -> torch.Tensor:
    """A_ref [H, W'] of Eq. 9's input: relu(minmax(mean of +1 maps) - minmax(mean of -1 maps)).

    One word: that word's map. No word: the (inverted) start map. No +1 word: zeros (empty mask).
    """
    count = per_word.shape[0]
    if count == 0:
        return start_map.float()
    if count == 1:
        return per_word[0].float()
    pos, neg = roles.roles > 0, roles.roles < 0
    if not bool(pos.any()):
        return torch.zeros_like(start_map, dtype=torch.float32)
    obj = minmax(per_word[pos].mean(0))
    if not bool(neg.any()):
        return obj
    return (obj - minmax(per_word[neg].mean(0))).clamp_min(0.0)


def blur_kernel() -> torch.Tensor:
    """OpenCV's 5x5 Gaussian for sigma 0: the outer product of [1, 4, 6, 4, 1] / 16 with itself [5, 5]."""
    taps = torch.tensor(BLUR_TAPS, dtype=torch.float32)
    taps = taps / taps.sum()
    return taps[:, None] * taps[None, :]


def gaussian_blur(m: torch.Tensor, passes: int = BLUR_PASSES) -> torch.Tensor:
    """Gaussian filtering of Eq. 9 on a [H, W] map, `passes` times: cv2.GaussianBlur(m, (5, 5), 0), whose default
    border BORDER_REFLECT_101 is torch's "reflect" padding (maps thinner than 3 cells replicate their edge)."""
    x = m.float()[None, None]
    kernel = blur_kernel().to(x)[None, None]
    pad = len(BLUR_TAPS) // 2
    for _ in range(passes):
        mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
        x = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=mode), kernel)
    return x[0, 0]


def binarize(refined: torch.Tensor, phi: float = PHI, blur_passes: int = BLUR_PASSES) -> torch.Tensor:
    """Eq. 9: M(x, y) = 1 where the Gaussian-filtered, min-max normalised A_ref > phi, else 0. [H, W] float."""
    smooth = minmax(gaussian_blur(refined, blur_passes)) if blur_passes > 0 else minmax(refined)
    return (smooth > phi).float()


def instant_mask(maps: torch.Tensor, words: list[list[int]], size: tuple[int, int], *, start: int = 0,
                 phi: float = PHI, gamma1: float = GAMMA1, gamma2: float = GAMMA2, roles: InstantRoles | None = None,
                 index: int | list[int] | None = None, blur_passes: int = BLUR_PASSES
                 ) -> tuple[torch.Tensor, torch.Tensor, InstantRoles]:
    """The instant mask of one step (Eq. 6-9).

    maps [h, w, T]: cumulative cross-attention of the edit prompt at the semantic level; words: token positions per
    prompt word; size: the latent grid (H, W'). `roles` from the first step are reused (Eq. 8 "only in the first step
    tau"); when None they are computed here (with `index` forcing Eq. 6's choice).
    Returns (mask [H, W'] in {0, 1}, A_ref [H, W'] in [0, 1], roles).
    """
    per_word, ref = word_maps(maps, words, start, size)
    if roles is None:
        roles = instant_roles(per_word, ref, gamma1, gamma2, index)
    refined = refined_map(per_word, ref, roles)
    return binarize(refined, phi, blur_passes), minmax(refined), roles


def feather_weights(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Paste-back weights [B, H, W] of a MASK [B, H, W]: 1 on the mask, falling linearly to 0 over `radius` px around
    it: (radius + 1 - d) / (radius + 1) at Chebyshev distance d, i.e. the mean of the mask dilated by 0..radius px.

    Not in the paper (InstDiffEdit's reference returns the inpainting pipeline's full frame): the pack's finish keeps
    the original outside the mask, and this ramp hides the 8-px latent-cell edge of that mask.
    """
    grown = mask.float()[:, None]
    total = grown.clone()
    for _ in range(max(int(radius), 0)):
        grown = F.max_pool2d(grown, 3, 1, 1)
        total = total + grown
    return (total / (max(int(radius), 0) + 1))[:, 0]


def finish_cells(radius: int, cell: int = LATENT_CELL) -> int:
    """Latent cells by which the finish regenerates beyond the mask so that the feathered band (`radius` px) lies on
    regenerated pixels and the latent-cell edge one cell further out, where the paste-back weight is 0."""
    return -(-int(radius) // cell) + 1 if radius > 0 else 0
