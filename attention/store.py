"""The attention store handed between nodes (custom type ATTNEDIT_ATTN_STORE). Pure torch.

Bounded by construction: only maps averaged over heads, layers of one level and steps are kept, on ComfyUI's
intermediate device (CPU by default). Cross-attention maps are [B, h, w, T] per level; self-attention maps (only when a
technique asked for them, e.g. DPL's 32x32 clustering) are [B, N, N].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layers import SEMANTIC_LEVEL
from .run import RunState
from .tokens import PromptTokens


@dataclass(frozen=True, eq=False)
class AttentionStore:
    """Averaged attention maps of one sampling call, one row per latent row (role)."""

    cross: dict[int, torch.Tensor]
    roles: tuple[str, ...]
    prompts: tuple[PromptTokens | None, ...]
    latent_hw: tuple[int, int]
    steps: int
    self_maps: dict[int, torch.Tensor] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)
    semantic_level: int = SEMANTIC_LEVEL  # the level masks and heat maps read (Flux: layers.FLUX_LEVEL)

    def __deepcopy__(self, memo):
        return self

    @property
    def rows(self) -> int:
        return len(self.roles)

    def cross_map(self, level: int | None = None) -> torch.Tensor:
        """Cross-attention maps [B, h, w, T] at `level` (default: the store's semantic level)."""
        level = self.semantic_level if level is None else level
        if level not in self.cross:
            raise ValueError(f"this attention store has no cross-attention maps at level {level} "
                             f"(has {sorted(self.cross)}); capture them in the node that made the store")
        return self.cross[level]

    def row_of(self, role: str, image: int = 0) -> int:
        rows = [i for i, r in enumerate(self.roles) if r == role]
        if not rows:
            raise ValueError(f"this attention store has no {role!r} row (rows: {self.roles})")
        return rows[min(image, len(rows) - 1)]


def store_from_run(run: RunState, prompts: tuple[PromptTokens | None, ...], latent_hw: tuple[int, int],
                   device: torch.device | str = "cpu", extras: dict | None = None,
                   semantic_level: int = SEMANTIC_LEVEL) -> AttentionStore:
    """Freeze the running means of a RunState into an AttentionStore on `device`."""
    cross, self_maps = {}, {}
    for (kind, level), grid in run.grids.items():
        mean = run.mean_map(kind, level).to(device)
        if kind == "cross":
            cross[level] = mean.view(mean.shape[0], grid[0], grid[1], mean.shape[-1])
        else:
            self_maps[level] = mean
    return AttentionStore(cross, tuple(run.roles), tuple(prompts), latent_hw, run.total_steps, self_maps,
                          dict(extras or {}), semantic_level)


def merge_stores(stores: list[AttentionStore]) -> AttentionStore:
    """Concatenate the rows of several stores (one per image of a batch) into one store."""
    first = stores[0]
    if len(stores) == 1:
        return first
    cross = {lv: torch.cat([s.cross[lv] for s in stores]) for lv in first.cross}
    self_maps = {lv: torch.cat([s.self_maps[lv] for s in stores]) for lv in first.self_maps}
    return AttentionStore(cross, sum((s.roles for s in stores), ()), sum((s.prompts for s in stores), ()),
                          first.latent_hw, first.steps, self_maps, dict(first.extras), first.semantic_level)
