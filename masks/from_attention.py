"""Masks from an attention store (ATTNEDIT_ATTN_STORE): row selection and the mask modes. Pure torch.

Modes (each on the store's "16x16" semantic-level cross-attention maps, one mask per selected store row):
- "instant": InstDiffEdit's instant mask (masks/instant.py, Zou et al. 2024 Eq. 6-9), no word needed;
- "local blend": Prompt-to-Prompt's local-blend mask of the given words (masks/local_blend.py);
- "background": Dynamic Prompt Learning's background estimate (masks/background.py, Wang et al. 2023 Sec. 3.3) from
  the 32x32 self-attention (store.self_maps[2]) and the cross-attention of the given nouns and of every other content
  word of the prompt (`background.scoring_words`: the paper scores all nouns); 1 = background.
Masks are made on the latent grid of the store; nodes resize them to the picture with masks/ops.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention.dpl import noun_maps
from ..attention.layers import SELF_LEVEL_DPL, semantic_grid
from ..attention.store import AttentionStore
from ..attention.tokens import PromptError, PromptTokens
from . import background, instant, local_blend

INSTANT, LOCAL_BLEND, BACKGROUND = "instant", "local blend", "background"
MODES = (INSTANT, LOCAL_BLEND, BACKGROUND)


class StoreMaskError(ValueError):
    """An attention store that cannot give the asked mask (message says what to connect or change)."""


@dataclass(frozen=True)
class MaskSettings:
    """Knobs of the mask modes with the papers' defaults."""

    mode: str = INSTANT
    words: tuple[str, ...] = ()
    threshold: float = local_blend.THRESHOLD
    dilation: int = local_blend.DILATION
    phi: float = instant.PHI
    gamma1: float = instant.GAMMA1
    gamma2: float = instant.GAMMA2
    clusters: int = background.BACKGROUND_CLUSTERS
    background_threshold: float = background.BACKGROUND_THRESHOLD


def store_rows(store: AttentionStore, branch: str, image_index: int = -1) -> list[int]:
    """Store rows of `branch` ("target" / "source"), one per image; `image_index` >= 0 picks one image.

    A store with a single role (Invert Image: "source") serves any branch.
    """
    roles = sorted(set(store.roles))
    role = branch if branch in roles else roles[0] if len(roles) == 1 else None
    if role is None:
        raise StoreMaskError(f"`branch` {branch!r} is not in this attention store (rows: {', '.join(roles)})")
    rows = [i for i, r in enumerate(store.roles) if r == role]
    if image_index < 0:
        return rows
    if image_index >= len(rows):
        raise StoreMaskError(f"`image_index` {image_index} is out of range: the store holds {len(rows)} image(s); "
                             f"use 0..{len(rows) - 1}, or -1 for all images")
    return [rows[image_index]]


def _prompt(store: AttentionStore, row: int) -> PromptTokens:
    prompt = store.prompts[row]
    if prompt is None:
        raise StoreMaskError(f"the {store.roles[row]} row of this attention store has no prompt tokens (the edit "
                             "sampler got a bare `target` CONDITIONING); use a store from Invert Image or from a "
                             "sampler patched by a prompt-defining hook")
    return prompt


def word_positions(prompt: PromptTokens, words: tuple[str, ...], label: str) -> list[int]:
    """Token positions of all `words` (PromptError naming a missing word and the prompt's words)."""
    return sorted({p for w in words for p in prompt.find_text(w, label)})


def mask_of_row(store: AttentionStore, row: int, settings: MaskSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [h, w] on the store's latent grid in {0, 1}, heat map [h', w'] in [0, 1] it came from) for one row."""
    maps = store.cross_map()[row].float()  # [h', w', T] at the store's semantic level (Flux: the token grid)
    prompt = _prompt(store, row)
    label = f"{store.roles[row]} prompt"
    if settings.mode == LOCAL_BLEND:
        if not settings.words:
            raise PromptError(f"mode 'local blend' needs `words` of the prompt (its words: "
                              f"{', '.join(g[1] for g in prompt.word_groups()) or '(none)'}); or use mode 'instant'")
        tokens = word_positions(prompt, settings.words, label)
        return local_blend.local_blend(maps, tokens, store.latent_hw, settings.threshold, settings.dilation)
    if settings.mode == INSTANT:
        groups = [pos for pos, _ in prompt.word_groups()]
        index = None
        if settings.words:
            wanted = set(word_positions(prompt, settings.words, label))
            index = [i for i, pos in enumerate(groups) if set(pos) <= wanted]
        mask, heat, _ = instant.instant_mask(maps, groups, store.latent_hw, phi=settings.phi,
                                             gamma1=settings.gamma1, gamma2=settings.gamma2, index=index)
        return mask, heat
    if settings.mode == BACKGROUND:
        return _background(store, row, maps, prompt, label, settings)
    raise StoreMaskError(f"`mode` {settings.mode!r} is unknown; choose one of {', '.join(MODES)}")


def _background(store, row, maps, prompt, label, settings) -> tuple[torch.Tensor, torch.Tensor]:
    """DPL background: k-means of the self-attention rows vs the nouns' maps, upsampled (nearest) to the latent."""
    self_maps = store.self_maps.get(SELF_LEVEL_DPL)
    if self_maps is None:
        raise StoreMaskError("mode 'background' needs the 32x32 self-attention: turn on `capture_self_attention` in "
                             "Invert Image (the store of Dynamic Prompt Learn has it too)")
    if not settings.words:
        raise PromptError(f"mode 'background' needs `words`: the nouns of the objects (of the {label}: "
                          f"{', '.join(g[1] for g in prompt.word_groups()) or '(none)'}), e.g. \"cat, sofa\"")
    nouns = [prompt.find_text(w, label) for w in settings.words]
    scored = background.scoring_words(prompt.word_groups(), nouns)  # every content word of the prompt, as DPL does
    grid = semantic_grid(store.latent_hw, SELF_LEVEL_DPL)
    bg = background.estimate_background(self_maps[row], noun_maps(maps, scored), settings.clusters,
                                        settings.background_threshold, grid=grid)
    mask = torch.nn.functional.interpolate(bg[None, None], size=store.latent_hw, mode="nearest")[0, 0]
    return mask, bg
