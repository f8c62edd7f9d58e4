"""Attention sites of a UNet: where they are (block keys) and at which spatial level they run.

A site is identified the way ComfyUI's replace patches are keyed, `(block, index, depth)`, and carries its spatial
level: the down-sampling factor between the latent and the site's query grid (1 = full latent resolution). Techniques
select sites by level, never by counting calls, so the same code works for SD1.x, SD2.x and SDXL:

| family | image px | latent | level 1 | level 2 | level 4 ("semantic") | level 8 |
|---|---|---|---|---|---|---|
| SD1.x / SD2.x | 512 | 64x64 | 64x64 | 32x32 | 16x16 | 8x8 (middle) |
| SDXL | 1024 | 128x128 | (no attention) | 64x64 | 32x32 | -- |

Prompt-to-Prompt's "16x16 maps" of SD1.5 at 512 px are level 4; at SDXL's 1024 px the same level is 32x32.
"""

from __future__ import annotations

from dataclasses import dataclass

SEMANTIC_LEVEL = 4  # P2P / MAG-Edit / DPL / InstDiffEdit cross-attention maps: 16x16 for a 64x64 latent
SELF_LEVEL_DPL = 2  # DPL clusters 32x32 self-attention rows of a 64x64 latent


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
