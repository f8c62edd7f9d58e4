"""CONDITIONING plumbing for multi-row runs (pure; a CONDITIONING is a list of [tensor [1, T, E], dict] entries).

The edit sampler runs the source and target branches as one latent batch; ComfyUI keeps a conditioning tensor whose
batch equals the latent batch as-is, so stacking the source and target prompts row-wise gives every row its prompt
with all of ComfyUI's per-model handling (SDXL pooled/size conditioning, ControlNet hints) intact.
"""

from __future__ import annotations

import logging
import math

import torch

log = logging.getLogger(__name__)

# SDXL's size conditioning (ComfyUI CLIPTextEncodeSDXL options; absent = the image size, no crop)
SIZE_KEYS = ("width", "height", "crop_w", "crop_h", "target_width", "target_height")
# Flux's guidance embedding value (core FluxGuidance): like the size conditioning, one value for the whole batch
GUIDANCE_KEY = "guidance"


class ConditioningError(ValueError):
    """A CONDITIONING that cannot be used as asked."""


def single_entry(cond: list, name: str) -> tuple[torch.Tensor, dict]:
    """The tensor and options of a one-entry CONDITIONING, or a clear error."""
    if not isinstance(cond, list) or not cond:
        raise ConditioningError(f"`{name}` is empty: connect a CONDITIONING from CLIPTextEncode (or this pack's nodes)")
    if len(cond) != 1:
        raise ConditioningError(
            f"`{name}` has {len(cond)} entries (combined, area or timestep-ranged prompts); attention editing needs "
            "one prompt per branch. Connect the output of a single CLIPTextEncode.")
    tensor, options = cond[0][0], cond[0][1]
    if tensor.shape[0] != 1:
        raise ConditioningError(f"`{name}` has a batch of {tensor.shape[0]} prompts; connect a single prompt")
    return tensor, options


def repeat_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat a [B, T, E] context along T to `length` (ComfyUI's rule for mixing prompts of 77*k tokens)."""
    if t.shape[1] == length:
        return t
    return t.repeat(1, length // t.shape[1], 1)


def size_conditioning(options: dict, image_hw: tuple[int, int]) -> dict:
    """The SDXL size conditioning an entry gives the UNet for an image of `image_hw` px (ComfyUI's defaults filled)."""
    width, height = options.get("width", image_hw[1]), options.get("height", image_hw[0])
    return {"width": width, "height": height, "crop_w": options.get("crop_w", 0), "crop_h": options.get("crop_h", 0),
            "target_width": options.get("target_width", width), "target_height": options.get("target_height", height)}


def stack_conditioning(conds: list[list], names: list[str], image_hw: tuple[int, int] | None = None) -> list:
    """One CONDITIONING whose batch row i is conds[i] (each one entry). Options come from the last (target) entry;
    pooled outputs are stacked row-wise; token lengths are padded to their lcm by repetition.

    SDXL's size conditioning (SIZE_KEYS) is one value for the whole batch, so it is the FIRST entry's (the inversion's
    source prompt: its branch must see what the inversion saw). When `image_hw` (px) is given and another entry asks
    for different sizes (CLIPTextEncodeSDXL), that is logged: those sizes are not applied.
    """
    entries = [single_entry(c, n) for c, n in zip(conds, names)]
    length = math.lcm(*(t.shape[1] for t, _ in entries))
    tensor = torch.cat([repeat_tokens(t, length) for t, _ in entries])
    options = dict(entries[-1][1])
    first = entries[0][1]
    for key in SIZE_KEYS:
        options.pop(key, None)
        if key in first:
            options[key] = first[key]
    _first_guidance(options, [o for _, o in entries], names)
    if image_hw is not None:
        used = size_conditioning(first, image_hw)
        for (_, opts), name in zip(entries[1:], names[1:]):
            asked = size_conditioning(opts, image_hw)
            if asked != used:
                log.warning("Attention Edit: `%s` asks for SDXL size conditioning %s; every branch is sampled in one "
                            "batch with the source's %s (the image size), so it is not applied. Use CLIPTextEncode "
                            "or the image's size in CLIPTextEncodeSDXL.", name, asked, used)
    pooled = [o.get("pooled_output") for _, o in entries]
    if all(p is not None for p in pooled):
        options["pooled_output"] = torch.cat(pooled)
    return [[tensor, options]]


def _first_guidance(options: dict, entries: list[dict], names: list[str]) -> None:
    """Give `options` the first entry's guidance value (the inversion's: its branch must see what the inversion saw);
    log when a later entry asked for another value, which cannot apply to one batch."""
    options.pop(GUIDANCE_KEY, None)
    if GUIDANCE_KEY not in entries[0]:
        return
    options[GUIDANCE_KEY] = entries[0][GUIDANCE_KEY]
    for opts, name in zip(entries[1:], names[1:]):
        if GUIDANCE_KEY in opts and opts[GUIDANCE_KEY] != entries[0][GUIDANCE_KEY]:
            log.warning("Attention Edit: `%s` asks for Flux guidance %s; every branch is sampled in one batch with the "
                        "inversion's guidance %s, so it is not applied. Set the same value on Invert Image's "
                        "`guidance`.", name, opts[GUIDANCE_KEY], entries[0][GUIDANCE_KEY])


def context_of(cond: list, name: str) -> torch.Tensor:
    """The [1, T, E] cross-attention context of a one-entry CONDITIONING."""
    return single_entry(cond, name)[0]
