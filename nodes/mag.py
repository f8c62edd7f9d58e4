"""AttnEditMAGGuidance: MAG-Edit latent guidance as a step hook of the edit sampler (schema and plumbing only)."""

from __future__ import annotations

import logging

from ..attention import hooks, mag
from ..attention.layers import SEMANTIC_LEVEL, semantic_grid
from ..attention.tokens import CHUNK, split_words
from ..inversion import comfy_model
from ..masks.ops import as_mask_batch, aspect_mismatch, dilate, mask_to_grid
from .common import AttnEditError, bind_inversion, check_inversion_model, require, wrap_errors
from .types import CAT_TECHNIQUES, INVERSION

log = logging.getLogger("attention_edit")
NODE = "MAG-Edit Guidance"


class AttnEditMAGGuidance:
    DESCRIPTION = (
        "MAG-Edit (Mao et al., ACM MM 2024): localized editing inside a mask on top of Prompt-to-Prompt. Before each "
        "of the first guidance_steps steps, the edit branch's latent is nudged (inside the mask only, "
        "max_iterations gradient steps) so that the target word's cross-attention concentrates in the mask; in the "
        "last blend_steps steps everything outside the mask is taken from the source image. Chain: Invert Image "
        "(null_text) -> Prompt-to-Prompt Attention Hook (mode refine, cross 0.8, self 0.5) -> this node -> Attention "
        "Edit Sampler. Slow: each guided step costs max_iterations extra forward+backward passes.")
    CATEGORY = CAT_TECHNIQUES
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("Copy of the model carrying the MAG-Edit guidance: connect to Attention Edit Sampler (the "
                       "input MODEL is unchanged).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The MODEL output of Prompt-to-Prompt Attention Hook (mode refine, "
                                               "cross_replace 0.8, self_replace 0.5 as in the paper); its target "
                                               "prompt holds the target words."}),
                "inversion": (INVERSION, {"tooltip": "The inversion the sampler will edit (Invert Image, null_text "
                                                     "in the paper); fixes the image size, batch and steps."}),
                "mask": ("MASK", {"tooltip": "Where the edit goes (white = edit): painted, SAM, Solid Mask, any size "
                                             "and batch (one mask, or one per image). Only the latent inside it is "
                                             "guided; outside it the source is blended in at the end."}),
                "target_words": ("STRING", {"default": "", "tooltip": "Word(s) of the target prompt whose attention "
                                                                      "should fill the mask, normally the new ones, "
                                                                      "e.g. \"yellow\". Several: \"yellow=0.6, "
                                                                      "striped=0.4\" (weights sum to 1) or "
                                                                      "\"yellow, striped\" (equal weights)."}),
                "constraint": (list(mag.CONSTRAINTS), {"default": "token_ratio",
                                                       "tooltip": "token_ratio (Eq. 1): the word's share of the "
                                                                  "attention inside the mask, for colour/texture. "
                                                                  "spatial_ratio (Eq. 2): the share of the word's "
                                                                  "attention that lies inside the mask, stronger, "
                                                                  "for object/shape edits."}),
                "max_iterations": ("INT", {"default": mag.MAX_IT, "min": 0, "max": 100,
                                           "tooltip": "Gradient steps per guided denoising step (paper: 15). 0 = "
                                                      "plain Prompt-to-Prompt (+ the final blend). Cost grows "
                                                      "linearly."}),
                "guidance_steps": ("INT", {"default": mag.TAU, "min": 0, "max": 1000,
                                           "tooltip": "How many of the first denoising steps are guided (paper: 25 "
                                                      "of 50). Colour edits need ~10, texture and shape ~25."}),
                "scale": ("FLOAT", {"default": mag.SCALE, "min": 0.0, "max": 100.0, "step": 0.1,
                                    "tooltip": "Step size: delta = scale * sqrt((1 - abar_t) / abar_t) (paper "
                                               "code: 2.5). Higher = stronger edit, more artefacts."}),
            },
            "optional": {
                "negative_words": ("STRING", {"default": "", "tooltip": "Word(s) of the target prompt whose attention "
                                                                        "inside the mask should DROP (Eq. 3), e.g. "
                                                                        "an old texture named in the prompt."}),
                "blend_steps": ("INT", {"default": mag.BLEND_STEPS, "min": 0, "max": 1000,
                                        "tooltip": "For the last this many steps, everything outside the mask (grown "
                                                   "by one latent pixel) is copied from the source branch (paper "
                                                   "code: 15 of 50). 0 = off."}),
                "sr_lambda": ("FLOAT", {"default": mag.SR_LAMBDA, "min": 0.0, "max": 100.0, "step": 0.1,
                                        "tooltip": "lambda of the spatial_ratio constraint (Eq. 2; paper: 3)."}),
                "lambda_p": ("FLOAT", {"default": mag.LAMBDA_P, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Weight of the target words' constraint (Eq. 3)."}),
                "lambda_ng": ("FLOAT", {"default": mag.LAMBDA_NG, "min": 0.0, "max": 100.0, "step": 0.1,
                                        "tooltip": "Weight of the negative words' constraint (Eq. 3)."}),
            },
        }

    def patch(self, model, inversion, mask, target_words, constraint, max_iterations, guidance_steps, scale,
              negative_words="", blend_steps=mag.BLEND_STEPS, sr_lambda=mag.SR_LAMBDA, lambda_p=mag.LAMBDA_P,
              lambda_ng=mag.LAMBDA_NG):
        return wrap_errors(NODE, self._patch, model, inversion, mask, target_words, constraint, max_iterations,
                           guidance_steps, scale, negative_words, blend_steps, sr_lambda, lambda_p, lambda_ng)

    def _patch(self, model, inversion, mask, target_words, constraint, max_iterations, guidance_steps, scale,
               negative_words, blend_steps, sr_lambda, lambda_p, lambda_ng):
        comfy_model.require_family(model, NODE)
        check_inversion_model(NODE, inversion, model, comfy_model.model_fingerprint(model))
        require(constraint in mag.CONSTRAINTS, NODE,
                f"`constraint` {constraint!r} is unknown; choose one of {', '.join(mag.CONSTRAINTS)}")
        for name, value in (("guidance_steps", guidance_steps), ("blend_steps", blend_steps)):
            require(0 <= value <= inversion.steps, NODE,
                    f"`{name}` is {value} but the inversion has {inversion.steps} steps; use at most {inversion.steps} "
                    f"(the paper guides the first 25 and blends the last 15 of 50)")
        controller = _target_controller(model)
        targets, negatives = _resolve_words(controller, target_words, negative_words)
        _check_guidable(controller, targets, inversion.steps, guidance_steps if max_iterations > 0 else 0)
        masks, blend_masks, semantic, grid = _align_masks(mask, inversion)
        sites = sum(1 for s in hooks.unet_sites(model) if s.level == SEMANTIC_LEVEL)
        hook = mag.MAGGuidance(
            targets=targets, negatives=negatives, masks=masks, blend_masks=blend_masks, semantic_masks=semantic,
            semantic_grid=grid, token_width=len(controller.target_tokens.ids), constraint=constraint,
            scale=float(scale), max_iterations=int(max_iterations), guidance_steps=int(guidance_steps),
            blend_steps=int(blend_steps), sr_lambda=float(sr_lambda), lambda_p=float(lambda_p),
            lambda_ng=float(lambda_ng), stop_after=sites or None)
        return (bind_inversion(NODE, hooks.add_step_hook(model, hook), inversion),)


def _target_controller(model):
    """The attention hook that defines the target prompt (Prompt-to-Prompt Attention Hook)."""
    defined = [c for c in hooks.controllers_of(model) if c.target_tokens is not None]
    if not defined:
        raise AttnEditError(NODE, "`model` carries no attention hook with a target prompt; connect the MODEL output of "
                                  "Prompt-to-Prompt Attention Hook (mode refine) to this node")
    return defined[0]


def _resolve_words(controller, target_words: str, negative_words: str):
    """((positions, weight), ...) of the target words and (positions, ...) of the negative words, in the target
    prompt."""
    prompt = controller.target_tokens
    weighted = mag.resolve_weights(mag.parse_weighted_words(target_words, "target_words"), "target_words")
    targets = tuple((tuple(prompt.find_text(w, "target prompt")), weight) for w, weight in weighted)
    negatives = tuple(tuple(prompt.find_text(w, "target prompt")) for w in split_words(negative_words))
    shared = {p for t, _ in targets for p in t} & {p for n in negatives for p in n}
    if shared:
        raise AttnEditError(NODE, f"`negative_words` {negative_words!r} repeats a target word of {target_words!r}; a "
                                  "word cannot be both raised and lowered")
    return targets, negatives


def _check_guidable(controller, targets, steps: int, guided: int) -> None:
    """Every target word copied from the source during all guided steps would make the guidance a silent no-op."""
    copied = mag.source_copied_positions(controller, steps, guided)
    if copied and all(p % CHUNK in copied for positions, _ in targets for p in positions):
        mode = getattr(controller, "mode", "?")
        raise AttnEditError(
            NODE, f"with Prompt-to-Prompt mode {mode!r} the target words' cross-attention is copied from the source "
                  "during every guided step, so MAG-Edit cannot change it. Use mode 'refine' on the attention hook "
                  f"and target words that are NEW in the target prompt {controller.target_text!r} (not in the "
                  "source prompt), or lower cross_replace.")


def _align_masks(mask, inversion):
    """Binary masks on the latent grid, dilated for the final blend, and on the semantic attention grid."""
    batch, latent_hw = inversion.batch, inversion.latent_hw
    masks = as_mask_batch(mask, batch, "mask")
    if aspect_mismatch(tuple(masks.shape[-2:]), (latent_hw[0] * 8, latent_hw[1] * 8)):
        log.warning("%s: the mask (%dx%d) has another aspect ratio than the image (%dx%d); it is stretched",
                    NODE, masks.shape[-1], masks.shape[-2], latent_hw[1] * 8, latent_hw[0] * 8)
    latent = mask_to_grid(masks, latent_hw, binary=True)
    grid = semantic_grid(latent_hw)
    semantic = mask_to_grid(masks, grid, binary=True).flatten(1)
    for i in range(batch):
        if not semantic[i].any():
            cell = 8 * latent_hw[0] // grid[0]
            raise AttnEditError(NODE, f"`mask` of image {i} covers no cell of the {grid[0]}x{grid[1]} attention grid "
                                      f"(a cell is {cell}x{cell} px and counts when half covered); draw a larger "
                                      "mask or grow it (core GrowMask)")
    device = comfy_model.intermediate_device()
    return latent.to(device), dilate(latent, mag.BLEND_DILATION).to(device), semantic.to(device), grid


NODES = {"AttnEditMAGGuidance": (AttnEditMAGGuidance, "MAG-Edit Guidance")}
