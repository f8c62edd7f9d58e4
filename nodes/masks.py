"""AttnEditMaskFromAttention: a MASK from an attention store (schema and plumbing only)."""

from __future__ import annotations

import logging

import torch

from ..attention.tokens import split_words
from ..masks import background, from_attention, instant, local_blend, ops, preview
from ..masks.from_attention import MaskSettings
from .common import AttnEditError, warn, wrap_errors
from .types import ATTN_STORE, CAT_MASKS

log = logging.getLogger("attention_edit")
NODE = "Mask from Attention"
LATENT_SCALE = 8  # pixels per latent cell of SD VAEs


def available_modes() -> tuple[str, ...]:
    """The mask modes of the node."""
    return from_attention.MODES


class AttnEditMaskFromAttention:
    DESCRIPTION = (
        "Turns the cross-attention captured by Invert Image or Attention Edit Sampler into a MASK of the region to "
        "edit. instant (InstDiffEdit, Zou et al. 2024): finds the edited object by itself from the attention of "
        "every word, no word needed. local blend (Prompt-to-Prompt): the attention of the words you name, "
        "thresholded and dilated. background (Dynamic Prompt Learning): the region no noun claims. Outputs the mask at image size, the same mask on the latent grid, and previews. "
        "Feed it to core inpainting (VAE Encode for Inpainting, InpaintModelConditioning) or any node taking a MASK.")
    CATEGORY = CAT_MASKS
    FUNCTION = "make"
    RETURN_TYPES = ("MASK", "MASK", "IMAGE")
    RETURN_NAMES = ("mask", "latent_mask", "preview")
    OUTPUT_TOOLTIPS = (
        "Binary mask at image resolution (one per image), 1 = region to edit.",
        "The same mask on the latent grid (1/8 of the image size) for nodes that work on latents.",
        "Two pictures per image: the attention heat map the mask came from, and the mask in red.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "attention": (ATTN_STORE, {"tooltip": "Attention store from Invert Image or Attention Edit Sampler."}),
                "mode": (list(available_modes()), {
                    "default": from_attention.INSTANT,
                    "tooltip": "instant: InstDiffEdit's automatic mask (finds the object without a word). "
                               "local blend: the named words' attention (Prompt-to-Prompt). background: Dynamic "
                               "Prompt Learning's background estimate (needs `words` = the nouns, and a store "
                               "with self-attention); 1 = background."}),
            },
            "optional": {
                "words": ("STRING", {"default": "", "tooltip": "Comma-separated words of the prompt. local blend: "
                                                               "required. instant: optional, forces the object word "
                                                               "instead of finding it. background: the nouns "
                                                               "(required; every other content word of the prompt "
                                                               "is scored too, as DPL does)."}),
                "branch": (["target", "source"], {"default": "target",
                                                  "tooltip": "Which branch's attention (stores from Invert Image "
                                                             "only have the source)."}),
                "image_index": ("INT", {"default": -1, "min": -1, "max": 4096,
                                        "tooltip": "-1: one mask per image of the batch; otherwise only that image."}),
                "threshold": ("FLOAT", {"default": local_blend.THRESHOLD, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "local blend: attention (normalised to max 1) above which a cell "
                                                   "is inside (P2P: 0.3; lower = larger mask)."}),
                "dilation": ("INT", {"default": local_blend.DILATION, "min": 0, "max": 8,
                                     "tooltip": "local blend: max-pool radius on the attention grid before "
                                                "thresholding (P2P: 1, a 3x3 window)."}),
                "phi": ("FLOAT", {"default": instant.PHI, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "instant: binarisation threshold of the smoothed refined map (paper "
                                             "0.2; higher = tighter mask)."}),
                "gamma1": ("FLOAT", {"default": instant.GAMMA1, "min": -1.0, "max": 1.0, "step": 0.01,
                                     "tooltip": "instant: words whose map is this similar to the object word's "
                                                "count as the object (paper 0.9)."}),
                "gamma2": ("FLOAT", {"default": instant.GAMMA2, "min": -1.0, "max": 1.0, "step": 0.01,
                                     "tooltip": "instant: words less similar than this are subtracted as "
                                                "background (paper 0.6)."}),
                "clusters": ("INT", {"default": background.BACKGROUND_CLUSTERS, "min": 2, "max": 16,
                                     "tooltip": "background: k-means segments of the self-attention (DPL: 5)."}),
                "background_threshold": ("FLOAT", {"default": background.BACKGROUND_THRESHOLD, "min": 0.0,
                                                   "max": 1.0, "step": 0.01,
                                                   "tooltip": "background: a segment whose agreement with every noun "
                                                              "is at most this is background (DPL: 0.2)."}),
                "image": ("IMAGE", {"tooltip": "Sets the mask size and is drawn under the previews (optional)."}),
                "latent": ("LATENT", {"tooltip": "Sets the mask size (8 px per latent cell) when no image is "
                                                 "connected, and the latent_mask size."}),
                "scale": ("INT", {"default": LATENT_SCALE, "min": 1, "max": 64,
                                  "tooltip": "Pixels per latent cell when neither image nor latent is connected "
                                             "(8 for SD VAEs)."}),
            },
        }

    def make(self, attention, mode, words="", branch="target", image_index=-1, threshold=local_blend.THRESHOLD,
             dilation=local_blend.DILATION, phi=instant.PHI, gamma1=instant.GAMMA1, gamma2=instant.GAMMA2,
             clusters=background.BACKGROUND_CLUSTERS, background_threshold=background.BACKGROUND_THRESHOLD,
             image=None, latent=None, scale=LATENT_SCALE):
        settings = MaskSettings(mode, tuple(split_words(words)), float(threshold), int(dilation), float(phi),
                                float(gamma1), float(gamma2), int(clusters), float(background_threshold))
        for sentence in knobs_without_effect(settings, image is not None or latent is not None, int(scale)):
            warn(NODE, sentence)
        return wrap_errors(NODE, _make, attention, settings, branch, image_index, image, latent, scale)


# the knobs each mode reads, with their defaults: a knob changed from its default for another mode does nothing
MODE_KNOBS = {
    from_attention.LOCAL_BLEND: {"threshold": local_blend.THRESHOLD, "dilation": local_blend.DILATION},
    from_attention.INSTANT: {"phi": instant.PHI, "gamma1": instant.GAMMA1, "gamma2": instant.GAMMA2},
    from_attention.BACKGROUND: {"clusters": background.BACKGROUND_CLUSTERS,
                                "background_threshold": background.BACKGROUND_THRESHOLD},
}


def knobs_without_effect(settings: MaskSettings, sized: bool, scale: int) -> list[str]:
    """One sentence per knob set away from its default that the chosen mode does not read (e.g. `threshold` in mode
    'instant'), and for `scale` when an image or latent sets the size, naming the knob, its value and the fix."""
    sentences = []
    for mode, knobs in MODE_KNOBS.items():
        if mode == settings.mode:
            continue
        for name, default in knobs.items():
            value = getattr(settings, name)
            if value != default:
                sentences.append(f"`{name}` {value:g} only applies to mode '{mode}'; the mode is '{settings.mode}', "
                                 f"so it has no effect. Set `mode` to '{mode}' or leave `{name}` at {default:g}.")
    if sized and scale != LATENT_SCALE:
        sentences.append(f"`scale` {scale} is only used when neither `image` nor `latent` is connected; the mask "
                         "takes its size from the connected input. Disconnect it or leave `scale` at 8.")
    return sentences


def _sizes(store, image, latent, scale) -> tuple[tuple[int, int], tuple[int, int]]:
    """(image size, latent-grid size) of the outputs."""
    latent_hw = tuple(store.latent_hw)
    if latent is not None:
        latent_hw = tuple(int(s) for s in latent["samples"].shape[-2:])
    if image is not None:
        return (int(image.shape[1]), int(image.shape[2])), latent_hw
    factor = LATENT_SCALE if latent is not None else int(scale)
    return (latent_hw[0] * factor, latent_hw[1] * factor), latent_hw


def _make(store, settings, branch, image_index, image, latent, scale):
    if settings.mode not in available_modes():
        raise AttnEditError(NODE, f"`mode` {settings.mode!r} is unknown; choose one of {', '.join(available_modes())}")
    rows = from_attention.store_rows(store, branch, image_index)
    image_hw, latent_hw = _sizes(store, image, latent, scale)
    if image is not None and image.shape[0] not in (1, len(rows)):
        raise AttnEditError(NODE, f"`image` has {image.shape[0]} pictures for {len(rows)} mask(s); connect the "
                                  "images the attention was made from (or one picture)")
    if image is not None and ops.aspect_mismatch(tuple(store.latent_hw), image_hw):
        log.warning("%s: the image (%dx%d) and the attention (latent %dx%d) differ in aspect ratio; the mask is "
                    "stretched", NODE, image_hw[1], image_hw[0], store.latent_hw[1], store.latent_hw[0])
    grids, heats = [], []
    for row in rows:
        mask, heat = from_attention.mask_of_row(store, row, settings)
        grids.append(mask)
        heats.append(heat)
    grid = torch.stack(grids)[:, None]  # [B, 1, h, w] on the store's latent grid
    if tuple(grid.shape[-2:]) != latent_hw:
        grid = torch.nn.functional.interpolate(grid, size=latent_hw, mode="nearest")
    full = ops.grid_to_image(grid, image_hw)  # nearest: a latent cell becomes its 8x8 pixel block
    if float(full.amax()) == 0:
        log.warning("%s: the %s mask is empty (the attention shows no region); nothing would be edited", NODE,
                    settings.mode)
    frames = []
    for i, heat in enumerate(heats):
        picture = image[min(i, image.shape[0] - 1)].float().cpu() if image is not None else preview.canvas(image_hw)
        frames.append(preview.mask_preview(picture, heat.cpu(), full[i].cpu()))
    return full, grid[:, 0], torch.cat(frames)


NODES = {"AttnEditMaskFromAttention": (AttnEditMaskFromAttention, "Mask from Attention")}
