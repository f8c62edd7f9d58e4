"""AttnEditMAGGuidance: MAG-Edit latent guidance as a step hook of the edit sampler (schema and plumbing only)."""

from __future__ import annotations

import logging

import torch

from ..attention import hooks, mag
from ..attention.layers import SEMANTIC_LEVEL, semantic_grid
from ..attention.tokens import CHUNK, split_words, tokenize_prompt
from ..inversion import comfy_model
from ..inversion.conditioning import context_of
from ..masks.ops import as_mask_batch, aspect_mismatch, dilate, mask_to_grid
from .common import AttnEditError, bind_inversion, check_inversion_base_model, require, warn, wrap_errors
from .types import CAT_TECHNIQUES, INVERSION

log = logging.getLogger("attention_edit")
NODE = "MAG-Edit Guidance"


class AttnEditMAGGuidance:
    DESCRIPTION = (
        "MAG-Edit (Mao et al., ACM MM 2024): localized editing inside a mask on top of Prompt-to-Prompt. Before each "
        "of the first guidance_steps steps, the edit branch's latent is nudged (inside the mask only, "
        "max_iterations gradient steps) so that the target word's cross-attention concentrates in the mask; in the "
        "last blend_steps steps everything outside the mask is taken from the source image. Step knobs count steps "
        "of the paper's 50-step run and scale to the inversion's steps. Chain: Invert Image (null_text) -> "
        "Prompt-to-Prompt Attention Hook (mode refine, cross 0.8, self 0.5) -> this node -> Attention Edit Sampler. "
        "Slow: each guided step costs max_iterations extra forward+backward passes.")
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
                                             "and batch (one mask, or one per image). Only the latent inside it (and "
                                             "inside word_masks, if connected) is guided; outside it the source is "
                                             "blended in at the end."}),
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
                "guidance_steps": ("INT", {"default": mag.TAU, "min": 0, "max": mag.PAPER_STEPS,
                                           "tooltip": "How many of the first denoising steps are guided, counted at "
                                                      "the paper's 50 steps (paper: 25 = the first half) and scaled "
                                                      "to the inversion's steps (25 guides 10 of 20 steps). Colour "
                                                      "edits need ~10, texture and shape ~25. 0 = no guidance."}),
                "scale": ("FLOAT", {"default": mag.SCALE, "min": 0.0, "max": 100.0, "step": 0.1,
                                    "tooltip": "Step size: delta = scale * sqrt((1 - abar_t) / abar_t) (paper "
                                               "code: 2.5). Higher = stronger edit, more artefacts."}),
            },
            "optional": {
                "negative_words": ("STRING", {"default": "", "tooltip": "Word(s) whose attention inside the mask "
                                                                        "should DROP (Eq. 3), e.g. the old colour. "
                                                                        "Looked up in negative_words_prompt when "
                                                                        "given, else in the target prompt."}),
                "blend_steps": ("INT", {"default": mag.BLEND_STEPS, "min": 0, "max": mag.PAPER_STEPS,
                                        "tooltip": "For the last this many steps, everything outside the mask (grown "
                                                   "by one latent pixel) is copied from the source branch; counted "
                                                   "at 50 steps (paper code: 15 of 50) and scaled to the "
                                                   "inversion's steps (15 blends 6 of 20). 0 = off."}),
                "sr_lambda": ("FLOAT", {"default": mag.SR_LAMBDA, "min": 0.0, "max": 100.0, "step": 0.1,
                                        "tooltip": "lambda of the spatial_ratio constraint (Eq. 2; paper: 3)."}),
                "lambda_p": ("FLOAT", {"default": mag.LAMBDA_P, "min": 0.0, "max": 100.0, "step": 0.1,
                                       "tooltip": "Weight of the target words' constraint (Eq. 3)."}),
                "lambda_ng": ("FLOAT", {"default": mag.LAMBDA_NG, "min": 0.0, "max": 100.0, "step": 0.1,
                                        "tooltip": "Weight of the negative words' constraint (Eq. 3)."}),
                "negative_words_prompt": ("STRING", {"default": "", "tooltip": "A separate prompt holding the "
                                                                               "negative words (Eq. 3, the authors' "
                                                                               "third prompt), e.g. \"a photo of a "
                                                                               "red pillow\": their attention is "
                                                                               "read from a pass of the edited "
                                                                               "latent with this prompt. Needs clip. "
                                                                               "Empty = negative words come from the "
                                                                               "target prompt."}),
                "clip": ("CLIP", {"tooltip": "The CLIP of the checkpoint, to encode negative_words_prompt (only "
                                             "needed with it)."}),
                "word_masks": ("MASK", {"tooltip": "One mask per target word, in the order of target_words (Eq. 5 / "
                                                   "Fig. 9b): each word's constraint reads its own mask. The latent "
                                                   "is guided and kept inside mask + these masks. Batch: one per word "
                                                   "(every image), or words x images (image 0's words first)."}),
                "token_ratio_denominator": (list(mag.DENOMINATORS), {
                    "default": mag.DENOMINATORS[0],
                    "tooltip": "Eq. 1's denominator: word_and_common = the word + the tokens common to both prompts "
                               "(paper); all_tokens = the whole attention row (authors' code). They differ only "
                               "when the target prompt has other new words."}),
            },
        }

    def patch(self, model, inversion, mask, target_words, constraint, max_iterations, guidance_steps, scale,
              negative_words="", blend_steps=mag.BLEND_STEPS, sr_lambda=mag.SR_LAMBDA, lambda_p=mag.LAMBDA_P,
              lambda_ng=mag.LAMBDA_NG, negative_words_prompt="", clip=None, word_masks=None,
              token_ratio_denominator=mag.DENOMINATORS[0]):
        return wrap_errors(NODE, self._patch, model, inversion, mask, target_words, constraint, max_iterations,
                           guidance_steps, scale, negative_words, blend_steps, sr_lambda, lambda_p, lambda_ng,
                           negative_words_prompt, clip, word_masks, token_ratio_denominator)

    def _patch(self, model, inversion, mask, target_words, constraint, max_iterations, guidance_steps, scale,
               negative_words, blend_steps, sr_lambda, lambda_p, lambda_ng, negative_words_prompt, clip, word_masks,
               token_ratio_denominator):
        comfy_model.require_family(model, NODE)
        check_inversion_base_model(NODE, inversion, comfy_model.model_fingerprint(model))
        require(constraint in mag.CONSTRAINTS, NODE,
                f"`constraint` {constraint!r} is unknown; choose one of {', '.join(mag.CONSTRAINTS)}")
        require(token_ratio_denominator in mag.DENOMINATORS, NODE,
                f"`token_ratio_denominator` {token_ratio_denominator!r} is unknown; choose one of "
                f"{', '.join(mag.DENOMINATORS)}")
        for name, value in (("guidance_steps", guidance_steps), ("blend_steps", blend_steps)):
            require(0 <= value <= mag.PAPER_STEPS, NODE,
                    f"`{name}` is {value}; it counts steps of the paper's {mag.PAPER_STEPS}-step run (scaled to the "
                    f"inversion's {inversion.steps}), so use 0-{mag.PAPER_STEPS} (paper: guidance 25, blend 15)")
        controller = _target_controller(model)
        words = _resolve_words(controller, target_words, negative_words, negative_words_prompt, clip)
        targets, negatives = words["targets"], words["negatives"]
        steps = inversion.steps
        guided = mag.steps_at(guidance_steps, steps) if max_iterations > 0 else 0
        _check_guidable(controller, words, steps, guided)
        if negatives and lambda_ng == 0:
            warn(NODE, f"`negative_words` {negative_words!r} has no effect with `lambda_ng` 0; raise lambda_ng "
                       "(e.g. 1) or clear negative_words")
        if negative_words_prompt.strip() and not negatives:
            warn(NODE, f"`negative_words_prompt` {negative_words_prompt!r} is not used without `negative_words`; "
                       "name the words of it whose attention should drop")
        masks, blend_masks, semantic, grid = _align_masks(mask, word_masks, words["target_names"], inversion)
        others = _denominators(controller, words, token_ratio_denominator)
        sites = sum(1 for s in hooks.unet_sites(model) if s.level == SEMANTIC_LEVEL)
        hook = mag.MAGGuidance(
            targets=targets, negatives=negatives, masks=masks, blend_masks=blend_masks, semantic_masks=semantic,
            semantic_grid=grid, token_width=len(controller.target_tokens.ids), constraint=constraint,
            scale=float(scale), max_iterations=int(max_iterations), guidance_steps=int(guidance_steps),
            blend_steps=int(blend_steps), sr_lambda=float(sr_lambda), lambda_p=float(lambda_p),
            lambda_ng=float(lambda_ng), stop_after=sites or None, target_others=others[0], negative_others=others[1],
            negative_context=words["negative_context"], negative_width=words["negative_width"])
        return (bind_inversion(NODE, hooks.add_step_hook(model, hook), inversion),)


def _target_controller(model):
    """The attention hook that defines the target prompt (Prompt-to-Prompt Attention Hook)."""
    defined = [c for c in hooks.controllers_of(model) if c.target_tokens is not None]
    if not defined:
        raise AttnEditError(NODE, "`model` carries no attention hook with a target prompt; connect the MODEL output of "
                                  "Prompt-to-Prompt Attention Hook (mode refine) to this node")
    return defined[0]


def _resolve_words(controller, target_words: str, negative_words: str, negative_prompt: str, clip) -> dict:
    """Target words (positions, weight) in the target prompt; negative words (positions) in the negative-words prompt
    (with its context) or, without one, in the target prompt."""
    prompt = controller.target_tokens
    weighted = mag.resolve_weights(mag.parse_weighted_words(target_words, "target_words"), "target_words")
    targets = tuple((tuple(prompt.find_text(w, "target prompt")), weight) for w, weight in weighted)
    names = split_words(negative_words)
    context, width, label = None, None, "target prompt"
    if negative_prompt.strip() and names:
        if clip is None:
            raise AttnEditError(NODE, f"`negative_words_prompt` {negative_prompt!r} needs `clip` to be encoded; "
                                      "connect the checkpoint's CLIP to this node's clip input")
        tokens = tokenize_prompt(clip, negative_prompt)
        context = context_of(comfy_model.encode_text(clip, negative_prompt), "negative_words_prompt")
        negatives = tuple(tuple(tokens.find_text(w, "negative_words_prompt")) for w in names)
        width, label = len(tokens.ids), "negative_words_prompt"
    else:
        negatives = tuple(tuple(prompt.find_text(w, "target prompt")) for w in names)
        shared = {p for t, _ in targets for p in t} & {p for n in negatives for p in n}
        if shared:
            raise AttnEditError(NODE, f"`negative_words` {negative_words!r} repeats a target word of "
                                      f"{target_words!r}; a word cannot be both raised and lowered")
    return {"targets": targets, "negatives": negatives, "target_names": [w for w, _ in weighted],
            "negative_names": names, "negative_context": context, "negative_width": width, "negative_in": label}


def _denominators(controller, words: dict, choice: str):
    """Eq. 1 denominator columns [I, T] of the target words and [K, T] of the negative words (None: all tokens)."""
    if choice == "all_tokens":
        return None, None
    width = len(controller.target_tokens.ids)
    new = [p for t, _ in words["targets"] for p in t]
    alphas = controller.alphas if getattr(controller, "mode", None) == "refine" else None
    common = mag.common_columns(width, alphas, new)
    targets = torch.stack([mag.denominator_columns(common, t) for t, _ in words["targets"]])
    if not words["negatives"]:
        return targets, None
    if words["negative_context"] is not None:  # a prompt of its own: no common tokens, the whole row
        return targets, None
    return targets, torch.stack([mag.denominator_columns(common, n) for n in words["negatives"]])


def _steps_text(steps: list[int]) -> str:
    return f"{steps[0]}" if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"


def _check_guidable(controller, words: dict, steps: int, guided: int) -> None:
    """Words whose cross-attention column P2P copies from the source in guided steps: an error when every target word
    is copied in every guided step (the guidance would be a no-op), a warning naming the word and the steps otherwise.
    """
    if guided <= 0:
        return
    copied = mag.copied_steps(controller, steps, range(guided))
    mode = getattr(controller, "mode", "?")

    def word_steps(positions):  # the guided steps in which every token of the word is copied
        sets = [set(copied.get(p % CHUNK, ())) for p in positions]
        return sorted(set.intersection(*sets)) if sets else []

    per_target = [(name, word_steps(pos)) for name, (pos, _) in zip(words["target_names"], words["targets"])]
    if per_target and all(len(s) == guided for _, s in per_target):
        raise AttnEditError(
            NODE, f"with Prompt-to-Prompt mode {mode!r} the target words' cross-attention is copied from the source "
                  "during every guided step, so MAG-Edit cannot change it. Use mode 'refine' on the attention hook "
                  f"and target words that are NEW in the target prompt {controller.target_text!r} (not in the "
                  "source prompt), or lower cross_replace.")
    for name, hit in per_target:
        if hit:
            warn(NODE, f"`target_words` {name!r}: Prompt-to-Prompt (mode {mode!r}) copies its attention from the "
                       f"source in guided steps {_steps_text(hit)} of {guided}, where MAG-Edit cannot raise it (those "
                       "iterations do nothing for this word); use a word that is new in the target prompt, or lower "
                       "cross_replace (or this word's cross_replace_words window)")
    if words["negative_context"] is None:
        for name, pos in zip(words["negative_names"], words["negatives"]):
            hit = word_steps(pos)
            if hit:
                warn(NODE, f"`negative_words` {name!r} is in the source prompt too: Prompt-to-Prompt (mode {mode!r}) "
                           f"copies its attention from the source in guided steps {_steps_text(hit)} of {guided}, so "
                           "lowering it there only moves the normalisation; put the word in `negative_words_prompt` "
                           "(e.g. the source prompt) and connect `clip`")


def _word_masks(word_masks, words: int, batch: int) -> torch.Tensor:
    """`word_masks` as [batch, words, H, W]: one mask per word for every image, or words x images (image-major)."""
    m = as_mask_batch(word_masks, word_masks.shape[0] if word_masks.ndim >= 3 else 1, "word_masks")
    if m.shape[0] == words:
        return m.unsqueeze(0).expand(batch, -1, -1, -1)
    if m.shape[0] == words * batch:
        return m.unflatten(0, (batch, words))
    raise AttnEditError(NODE, f"`word_masks` has a batch of {m.shape[0]} masks for {words} target word(s) and {batch} "
                              f"image(s); connect one mask per target word ({words}), in the order of target_words, "
                              f"or {words * batch} (each image's words in turn)")


def _align_masks(mask, word_masks, names: list[str], inversion):
    """Binary masks on the latent grid (the update region), dilated for the final blend, and on the semantic attention
    grid: [B, N] for one mask, [B, I, N] with one mask per target word."""
    batch, latent_hw = inversion.batch, inversion.latent_hw
    image_hw = (latent_hw[0] * 8, latent_hw[1] * 8)
    masks = as_mask_batch(mask, batch, "mask")
    per_word = None if word_masks is None else _word_masks(word_masks, len(names), batch)
    for name, m in (("mask", masks), ("word_masks", per_word)):
        if m is not None and aspect_mismatch(tuple(m.shape[-2:]), image_hw):
            log.warning("%s: `%s` (%dx%d) has another aspect ratio than the image (%dx%d); it is stretched",
                        NODE, name, m.shape[-1], m.shape[-2], image_hw[1], image_hw[0])
    grid = semantic_grid(latent_hw)
    cell = 8 * latent_hw[0] // grid[0]
    latent = mask_to_grid(masks, latent_hw, binary=True)
    if per_word is None:
        semantic = mask_to_grid(masks, grid, binary=True).flatten(1)
        for i in range(batch):
            if not semantic[i].any():
                raise AttnEditError(NODE, f"`mask` of image {i} covers no cell of the {grid[0]}x{grid[1]} attention "
                                          f"grid (a cell is {cell}x{cell} px and counts when half covered); draw a "
                                          "larger mask or grow it (core GrowMask)")
    else:
        flat = per_word.flatten(0, 1)
        semantic = mask_to_grid(flat, grid, binary=True).flatten(1).unflatten(0, (batch, len(names)))
        for i in range(batch):
            for k, name in enumerate(names):
                if not semantic[i, k].any():
                    raise AttnEditError(NODE, f"`word_masks` for word {name!r} of image {i} covers no cell of the "
                                              f"{grid[0]}x{grid[1]} attention grid (a cell is {cell}x{cell} px and "
                                              "counts when half covered); draw a larger mask or grow it")
        latent = torch.maximum(latent, mask_to_grid(flat, latent_hw, binary=True).unflatten(0, (batch, len(names)))
                               .amax(1))
    device = comfy_model.intermediate_device()
    return (latent.to(device), dilate(latent, mag.BLEND_DILATION).to(device), semantic.contiguous().to(device),
            grid)


NODES = {"AttnEditMAGGuidance": (AttnEditMAGGuidance, "MAG-Edit Guidance")}
