"""Attention sites of a UNet: where they are (block keys) and at which spatial level they run.

A site is identified the way ComfyUI's replace patches are keyed, `(block, index, depth)`, and carries its spatial
level: the down-sampling factor between the latent and the site's query grid (1 = full latent resolution). Techniques
select sites by level, never by counting calls, so the same code works for SD1.x, SD2.x and SDXL:

| family | image px | latent | level 1 | level 2 | level 4 ("semantic") | level 8 |
|---|---|---|---|---|---|---|
| SD1.x / SD2.x | 512 | 64x64 | 64x64 | 32x32 | 16x16 | 8x8 (middle) |
| SDXL | 1024 | 128x128 | (no attention) | 64x64 | 32x32 | -- |

Prompt-to-Prompt's "16x16 maps" of SD1.5 at 512 px are level 4; at SDXL's 1024 px the same level is 32x32.

Flux (ComfyUI 0.3.x comfy/ldm/flux/model.py): every attention layer is a *joint* attention over the T5 text tokens
followed by the 2x2-patchified image tokens (an h/2 x w/2 grid, row-major, odd sides padded up), so every Flux site is
at level 2 (FLUX_LEVEL). Sites are keyed like the host's `patches_replace["dit"]`: block "double" (double-stream
blocks, `("double_block", i)`) or "single" (single-stream blocks, `("single_block", j)`), index i / j, depth 0.
"""

from __future__ import annotations

from dataclasses import dataclass

SEMANTIC_LEVEL = 4  # P2P / MAG-Edit / DPL / InstDiffEdit cross-attention maps: 16x16 for a 64x64 latent
SELF_LEVEL_DPL = 2  # DPL clusters 32x32 self-attention rows of a 64x64 latent
FLUX_PATCH = 2  # Flux's patch size (comfy/ldm/flux/model.py process_img): one image token per 2x2 latent cells
FLUX_LEVEL = FLUX_PATCH  # level of every Flux joint-attention site (and of its maps)
FLUX_DOUBLE, FLUX_SINGLE = "double", "single"
FLUX_BLOCKS = (FLUX_DOUBLE, FLUX_SINGLE)


@dataclass(frozen=True)
class AttnSite:
    """One attention layer: ComfyUI block key plus spatial level.

    Notation: `block` is "input" | "middle" | "output" (ComfyUI `extra_options["block"][0]`), `index` the block id,
    `depth` the transformer index inside its SpatialTransformer (`extra_options["block_index"]`).
    """

    block: str
    index: int
    depth: int
    level: int

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.block, self.index, self.depth)


def query_grid(n_queries: int, latent_hw: tuple[int, int]) -> tuple[int, int, int]:
    """(h, w, level) of an attention layer with `n_queries` queries for a latent of size `latent_hw`.

    Each UNet down-sampling halves the grid rounding up (stride-2 conv with padding 1), so the grid at level 2^k is
    ceil-halved k times. Raises ValueError when no level matches (not a UNet attention layer).
    """
    h, w = latent_hw
    level = 1
    while h * w > n_queries and (h > 1 or w > 1):
        h, w, level = (h + 1) // 2, (w + 1) // 2, level * 2
    if h * w != n_queries:
        raise ValueError(f"{n_queries} queries match no level of a {latent_hw[0]}x{latent_hw[1]} latent")
    return h, w, level


def semantic_grid(latent_hw: tuple[int, int], level: int = SEMANTIC_LEVEL) -> tuple[int, int]:
    """The (h, w) grid of the maps at `level` for a latent of size `latent_hw`."""
    h, w = latent_hw
    while level > 1:
        h, w, level = (h + 1) // 2, (w + 1) // 2, level // 2
    return h, w


def flux_grid(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of Flux's image-token grid for a latent of size `latent_hw`: ((h + 1) // 2, (w + 1) // 2), as
    comfy/ldm/flux/model.py `_forward` computes h_len / w_len (the latent is padded to a multiple of the patch)."""
    h, w = latent_hw
    return (h + FLUX_PATCH // 2) // FLUX_PATCH, (w + FLUX_PATCH // 2) // FLUX_PATCH


def flux_layer_index(block: str, index: int, doubles: int) -> int:
    """Position of a Flux site in the 0-based enumeration of all its transformer blocks, double-stream blocks first
    (Stable Flow's numbering, Avrahami et al. 2024, Sec. 3.1: layers 0-18 double, 19-56 single on FLUX.1-dev)."""
    return index if block == FLUX_DOUBLE else doubles + index


# Stable Flow (Avrahami et al. 2024, "Stable Flow: Vital Layers for Training-Free Image Editing", Sec. 3.1-3.2): the
# FLUX.1-dev layers whose removal changes the image most, numbered as flux_layer_index (0-18 double, 19-56 single).
# Stable Flow injects the source's image keys/values there; the pack injects the source's image->image attention.
FLUX_VITAL_LAYERS = (0, 1, 17, 18, 25, 28, 53, 54, 56)


def flux_vital_sites(doubles: int, singles: int, layers: tuple[int, ...] = FLUX_VITAL_LAYERS
                     ) -> frozenset[tuple[str, int]]:
    """(block, index) of the `layers` (flux_layer_index numbering) that exist in a Flux with `doubles` double- and
    `singles` single-stream blocks (a smaller model keeps the numbers that fit)."""
    sites = set()
    for layer in layers:
        if layer < doubles:
            sites.add((FLUX_DOUBLE, layer))
        elif layer < doubles + singles:
            sites.add((FLUX_SINGLE, layer - doubles))
    return frozenset(sites)
