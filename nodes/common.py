"""Shared node plumbing: clear errors, input checks, image/latent helpers. No maths here."""

from __future__ import annotations

import logging
import os
import traceback

import torch

from ..attention import hooks
from ..inversion import comfy_model

log = logging.getLogger("attention_edit")


class AttnEditError(ValueError):
    """An input problem, reported to the user as one sentence that names the input, the value and the fix."""

    def __init__(self, node: str, message: str):
        super().__init__(f"[Attention Edit] {node}: {message}")


class AttnEditInternalError(RuntimeError):
    """A ValueError raised inside torch or ComfyUI (not by the pack's own input checks) while a node ran: reported as
    an internal failure with what the pack was doing, never as if the user's input had been validated."""

    def __init__(self, node: str, doing: str, err: BaseException):
        super().__init__(f"[Attention Edit] {node}: internal failure while {doing}: {type(err).__name__}: {err}. "
                         "This is not one of the pack's input checks; please report it with the workflow.")


PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_PACKAGES = tuple(os.path.join(PACK_ROOT, name) + os.sep for name in ("attention", "inversion", "masks", "nodes"))


def _pack_frames(err: BaseException) -> list:
    """The traceback frames of `err` below wrap_errors that run the pack's own code (attention/, inversion/, masks/,
    nodes/)."""
    return [f for f in traceback.extract_tb(err.__traceback__)[1:]
            if os.path.abspath(f.filename).startswith(PACK_PACKAGES)]


def raised_by_pack(err: BaseException) -> bool:
    """True when the pack's own code raised `err` (its innermost frame is in the pack), i.e. one of its input checks;
    False for an error raised inside torch or ComfyUI and merely passing through the pack."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(PACK_PACKAGES)


def wrap_errors(node: str, fn, *args, **kwargs):
    """Run fn; turn the pack's own input errors (ValueErrors raised by the pack's code) into AttnEditError.

    A ValueError raised inside torch or ComfyUI (e.g. GroupNorm's "Expected more than 1 value per channel") is not an
    input check of the pack: it becomes an AttnEditInternalError (a RuntimeError) that says it is an internal failure
    and which pack function was running, chained to the original so the log keeps torch's traceback."""
    try:
        return fn(*args, **kwargs)
    except AttnEditError:
        raise
    except ValueError as err:
        if raised_by_pack(err):
            raise AttnEditError(node, str(err)) from err
        frames = _pack_frames(err)
        doing = f"running {frames[-1].name} ({os.path.relpath(frames[-1].filename, PACK_ROOT)})" if frames \
            else f"running {getattr(fn, '__name__', 'the node')}"
        raise AttnEditInternalError(node, doing, err) from err


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


def check_image_size(node: str, model, image: torch.Tensor, vae=None, what: str = "`image`") -> None:
    """Refuse, by size and before encoding, an IMAGE [B, H, W, C] smaller than the MODEL can denoise (one latent cell
    per UNet level: 64 px for SD1.x / SD2.x, 32 px for SDXL, after cropping to the VAE's multiple)."""
    if image is None:
        return
    scale = comfy_model.vae_scale(vae) if vae is not None else 8
    try:
        comfy_model.check_latent_size(model, image.shape[1] // scale, image.shape[2] // scale, what, scale)
    except comfy_model.InputSizeError as err:
        raise AttnEditError(node, f"{err} (got {image.shape[2]}x{image.shape[1]} px)") from err


def check_text_encoder(node: str, model, conditioning, what: str) -> None:
    """Every node that takes a CLIP or CONDITIONING checks it against its MODEL with this one function: the text
    embedding width must be the model's context width (an SDXL CLIP into an SD1.5 UNet is refused with the fix)."""
    try:
        comfy_model.check_text_width(model, conditioning, what)
    except comfy_model.TextEncoderMismatchError as err:
        raise AttnEditError(node, str(err)) from err


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


def check_inversion_model(node: str, inversion, model, fingerprint, *, source_pinned: bool = False) -> None:
    """The inversion must come from the same diffusion model that edits with it (refused otherwise); the same model
    with other weight patches (a LoRA applied after inverting) is warned about: the source branch drifts from the
    inversion unless the inversion is redone with the patched MODEL or the sampler pins the source branch
    (`source_pinned`: then the patch only acts on the target branch, as intended, and nothing is said)."""
    check_inversion_base_model(node, inversion, fingerprint)
    made, now = _patches_of(inversion.fingerprint), _patches_of(fingerprint)
    if made != now and not source_pinned:
        warn(node, f"the MODEL's weight patches ({now or 'none'}) differ from those of the MODEL `inversion` was "
                   f"made with ({made or 'none'}), e.g. a LoRA applied after inverting: the source branch will not "
                   "regenerate the input. Invert with the same patched MODEL you edit with, or set the sampler's "
                   "`source_branch` to 'pin to inversion'.")


def check_inversion_base_model(node: str, inversion, fingerprint) -> None:
    """The inversion must come from the same base diffusion model. Patch nodes (MAG-Edit, CPAM) check only this: weight
    patches matter where the source branch runs, so the edit sampler alone judges them (check_inversion_model)."""
    if tuple(inversion.fingerprint[:4]) != tuple(fingerprint[:4]):
        raise AttnEditError(
            node, f"`inversion` was made with another model ({inversion.fingerprint[0]}, {inversion.fingerprint[1]}) "
                  "than the MODEL connected here; connect the same checkpoint to the Invert node and to this node.")


def _patches_of(fingerprint) -> str:
    return fingerprint[4] if len(fingerprint) > 4 else ""
