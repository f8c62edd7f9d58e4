"""CONDITIONING plumbing for multi-row runs (pure; a CONDITIONING is a list of [tensor [1, T, E], dict] entries).

The edit sampler runs the source and target branches as one latent batch; ComfyUI keeps a conditioning tensor whose
batch equals the latent batch as-is, so stacking the source and target prompts row-wise gives every row its prompt
with all of ComfyUI's per-model handling (SDXL pooled/size conditioning, ControlNet hints) intact.
"""

from __future__ import annotations

import math

import torch


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


def stack_conditioning(conds: list[list], names: list[str]) -> list:
    """One CONDITIONING whose batch row i is conds[i] (each one entry). Options come from the last (target) entry;
    pooled outputs are stacked row-wise; token lengths are padded to their lcm by repetition."""
    entries = [single_entry(c, n) for c, n in zip(conds, names)]
    length = math.lcm(*(t.shape[1] for t, _ in entries))
    tensor = torch.cat([repeat_tokens(t, length) for t, _ in entries])
    options = dict(entries[-1][1])
    pooled = [o.get("pooled_output") for _, o in entries]
    if all(p is not None for p in pooled):
        options["pooled_output"] = torch.cat(pooled)
    return [[tensor, options]]


def context_of(cond: list, name: str) -> torch.Tensor:
    """The [1, T, E] cross-attention context of a one-entry CONDITIONING."""
    return single_entry(cond, name)[0]
