"""Shared node plumbing: clear errors, input checks, image/latent helpers. No maths here."""

from __future__ import annotations

import logging

import torch

from ..attention import hooks

log = logging.getLogger("attention_edit")


class AttnEditError(ValueError):
    """An input problem, reported to the user as one sentence that names the input, the value and the fix."""

    def __init__(self, node: str, message: str):
        super().__init__(f"[Attention Edit] {node}: {message}")


def wrap_errors(node: str, fn, *args, **kwargs):
    """Run fn; turn the pack's own input errors (ValueError subclasses with a message) into AttnEditError."""
    try:
        return fn(*args, **kwargs)
    except AttnEditError:
        raise
    except ValueError as err:
        raise AttnEditError(node, str(err)) from err


def crop_to_multiple(image: torch.Tensor, multiple: int = 8, node: str = "") -> torch.Tensor:
    """Centre-crop IMAGE [B, H, W, C] to a multiple of `multiple` pixels (what VAEEncode does), logging when it crops."""
    h, w = image.shape[1], image.shape[2]
    nh, nw = h // multiple * multiple, w // multiple * multiple
    if nh == 0 or nw == 0:
        raise AttnEditError(node, f"`image` is {w}x{h} px; at least {multiple}x{multiple} px is needed")
    if (nh, nw) == (h, w):
        return image
    top, left = (h - nh) // 2, (w - nw) // 2
    log.warning("%s: image %dx%d is not a multiple of %d px; centre-cropped to %dx%d", node, w, h, multiple, nw, nh)
    return image[:, top:top + nh, left:left + nw, :]


def warn(node: str, message: str) -> None:
    """Tell the user that a setting cannot take effect as given (a knob past the run's end, an empty estimate...).

    Every such notice goes through here, so that the log and the frontend say the same sentence."""
    log.warning("[Attention Edit] %s: %s", node, message)


def require(condition: bool, node: str, message: str) -> None:
    if not condition:
        raise AttnEditError(node, message)


def inversion_key(inversion) -> tuple:
    """What a patch made for `inversion` depends on: model, method, schedule, guidance, prompts, batch, size and the
    pictures (a checksum of the clean latents, so an identical re-run of the Invert node gives the same key)."""
    return (inversion.fingerprint, inversion.method, tuple(inversion.sigmas.tolist()), float(inversion.cfg),
            inversion.source_prompt, inversion.negative_prompt, inversion.batch, tuple(inversion.latent_hw),
            float(inversion.latents[-1].double().sum()))


def bind_inversion(node: str, model, inversion):
    """A clone of the patched `model` that remembers the inversion the patch of `node` was made for."""
    return hooks.bind_inversion(model, node, inversion_key(inversion), inversion.describe())


def check_bound_inversions(node: str, model, inversion) -> None:
    """Patches made for one inversion (MAG-Edit masks, CPAM masks and schedules) must be sampled with that one."""
    key = inversion_key(inversion)
    for patch, bound, description in hooks.bound_inversions(model):
        if bound != key:
            raise AttnEditError(
                node, f"`inversion` is not the one {patch} was given ({description}); this node got a "
                      f"{inversion.describe()}. Connect the same Invert Image output to {patch} and to this node.")


def check_inversion_model(node: str, inversion, model, fingerprint) -> None:
    """The inversion must come from the same diffusion model that edits with it."""
    if inversion.fingerprint != fingerprint:
        raise AttnEditError(
            node, f"`inversion` was made with another model ({inversion.fingerprint[0]}, {inversion.fingerprint[1]}) "
                  "than the MODEL connected here; connect the same checkpoint to the Invert node and to this node.")
