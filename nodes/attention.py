"""AttnEditAttentionHook (Prompt-to-Prompt) and AttnEditAttentionPreview (schema and plumbing only)."""

from __future__ import annotations

import torch

from ..attention import hooks, p2p
from ..attention.layers import FLUX_DOUBLE, flux_vital_sites
from ..attention.tokens import parse_word_values, split_words, tokenize_prompt, word_token_ids
from ..attention.visualize import heatmap_grid
from ..inversion import comfy_model
from .common import AttnEditError, check_text_encoder, wrap_errors
from .types import ATTN_STORE, CAT_ATTENTION

HOOK = "Prompt-to-Prompt Attention Hook"
PREVIEW = "Attention Heat Maps"


class AttnEditAttentionHook:
    DESCRIPTION = (
        "Prompt-to-Prompt (Hertz et al. 2023) for real images: patches a copy of the MODEL so that, in Attention Edit "
        "Sampler, the target branch reuses the source branch's attention. replace = swap words (same word count), "
        "refine = add/remove words, reweight = strengthen/weaken words. Local blend keeps everything outside the "
        "named words' attention identical to the source image.")
    CATEGORY = CAT_ATTENTION
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "target")
    OUTPUT_TOOLTIPS = ("Patched copy of the model: connect to Attention Edit Sampler (the input MODEL is unchanged).",
                       "The target prompt's conditioning (the sampler takes it from the model automatically).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch (a copy is patched, the input stays untouched)."}),
                "clip": ("CLIP", {"tooltip": "Text encoder of the same checkpoint."}),
                "source_prompt": ("STRING", {"multiline": True, "default": "a photo of a cat",
                                             "tooltip": "Must equal the Invert node's source prompt."}),
                "target_prompt": ("STRING", {"multiline": True, "default": "a photo of a tiger",
                                             "tooltip": "The edited caption."}),
                "mode": (list(p2p.MODES), {"default": "replace",
                                           "tooltip": "replace: swap words (same number of words). refine: add or "
                                                      "remove words. reweight: same prompt, change word strength."}),
                "cross_replace": ("FLOAT", {"default": p2p.CROSS_REPLACE_DEFAULT, "min": 0.0, "max": 1.0,
                                            "step": 0.01, "tooltip": "Fraction of steps whose cross-attention comes "
                                                                     "from the source (higher = closer layout)."}),
                "self_replace": ("FLOAT", {"default": p2p.SELF_REPLACE_DEFAULT, "min": 0.0, "max": 1.0, "step": 0.01,
                                           "tooltip": "Fraction of steps whose self-attention (<=32x32 layers; Flux: "
                                                      "the image-to-image attention in Stable Flow's vital layers) "
                                                      "comes from the source (higher = closer structure)."}),
            },
            "optional": {
                "reweight": ("STRING", {"default": "", "tooltip": "word=scale pairs of the target prompt, e.g. "
                                                                  "\"tiger=2.0, fluffy=0.5\"."}),
                "local_blend": ("STRING", {"default": "", "tooltip": "Comma-separated words (of either prompt) whose "
                                                                     "attention defines the editable region, e.g. "
                                                                     "\"cat, tiger\". Empty = no local blend."}),
                "blend_threshold": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0, "step": 0.01,
                                              "tooltip": "Local blend: attention (normalised to 1) above which a "
                                                         "pixel is editable."}),
                "blend_start": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Local blend starts after this fraction of the steps."}),
                "cross_replace_words": ("STRING", {"default": "", "tooltip": "Per-word cross_replace overrides of "
                                                                             "target words, e.g. \"tiger=0.4\"."}),
                "self_replace_all_layers": ("BOOLEAN", {"default": False,
                                                        "tooltip": "Also inject self-attention at full latent "
                                                                   "resolution (64x64 at 512px; costly). Flux: in "
                                                                   "every block instead of Stable Flow's vital "
                                                                   "layers."}),
            },
        }

    def patch(self, model, clip, source_prompt, target_prompt, mode, cross_replace, self_replace, reweight="",
              local_blend="", blend_threshold=0.3, blend_start=0.2, cross_replace_words="",
              self_replace_all_layers=False):
        return wrap_errors(HOOK, self._patch, model, clip, source_prompt, target_prompt, mode, cross_replace,
                           self_replace, reweight, local_blend, blend_threshold, blend_start, cross_replace_words,
                           self_replace_all_layers)

    def _patch(self, model, clip, source_prompt, target_prompt, mode, cross_replace, self_replace, reweight,
               local_blend, blend_threshold, blend_start, cross_replace_words, all_layers):
        family = comfy_model.require_family(model, HOOK, comfy_model.INVERTIBLE_FAMILIES)
        src, tgt = tokenize_prompt(clip, source_prompt), tokenize_prompt(clip, target_prompt)
        extra = {}
        if family == "flux":
            _check_t5_prompts(src, tgt)
            extra["flux_self_sites"] = None if all_layers else _flux_vital_sites(model)
        elif family == "sd3":  # no published vital layers for SD3: self injection in every joint block (docs/flux.md)
            extra["flux_self_sites"] = None
        lookup = lambda word: word_token_ids(clip, word)  # noqa: E731
        target = comfy_model.encode_text(clip, target_prompt)
        check_text_encoder(HOOK, model, target, "`clip`")
        if family == "sd3":
            _check_sd3_context(src, tgt, target)
        controller = p2p.build_controller(
            src, tgt, lookup, mode, cross_replace, self_replace, parse_word_values(reweight, "reweight"),
            parse_word_values(cross_replace_words, "cross_replace_words"), 1 if all_layers else p2p.SELF_MIN_LEVEL,
            source_text=source_prompt, target_text=target_prompt, target_tokens=tgt, target_conditioning=target,
            **extra)
        patched = hooks.add_controller(model, controller)
        words = split_words(local_blend)
        if words:
            src_tok, tgt_tok = p2p.blend_tokens(src, tgt, lookup, words)
            blend = p2p.LocalBlend(src_tok, tgt_tok, blend_threshold, 1, blend_start, comfy_model.semantic_level(model))
            patched = hooks.add_step_hook(patched, blend)
        return (patched, target)


def _check_t5_prompts(src, tgt) -> None:
    """Flux: both prompts must fit T5's sequence (the attention's text tokens), or the maps have no fixed columns."""
    for name, tokens in (("source_prompt", src), ("target_prompt", tgt)):
        if tokens.overlong:
            raise AttnEditError(HOOK, f"`{name}` has {tokens.last_word_position() + 2} T5 tokens (with the end token); "
                                      f"Flux's T5 sequence holds {tokens.length}. Shorten the prompt to at most "
                                      f"{tokens.length - 1} T5 tokens.")


def _check_sd3_context(src, tgt, target) -> None:
    """SD3: the words are mapped in the 77 clip_l / clip_g tokens, which must be the whole text context (no T5 part
    after them, one CLIP chunk), or the maps' columns would not be the prompt's tokens."""
    for name, tokens in (("source_prompt", src), ("target_prompt", tgt)):
        if tokens.overlong:
            raise AttnEditError(HOOK, f"`{name}` has {tokens.last_word_position() + 2} CLIP tokens (with start and "
                                      f"end); on SD3 both prompts must fit one {tokens.length}-token CLIP chunk. "
                                      f"Shorten the prompt to at most {tokens.length - 2} CLIP tokens.")
    length = int(target[0][0].shape[1])
    if length != tgt.length:
        raise AttnEditError(HOOK, f"the SD3 text encoder gives a {length}-token context; Prompt-to-Prompt on SD3 maps "
                                  f"words in the {tgt.length} clip_l / clip_g tokens only (a T5 part after them is "
                                  "not supported yet). Load the text encoders without T5 (DualCLIPLoader, type "
                                  "'sd3': clip_l + clip_g) for this node.")


def _flux_vital_sites(model):
    sites = hooks.flux_sites(model)
    doubles = sum(1 for s in sites if s.block == FLUX_DOUBLE)
    return flux_vital_sites(doubles, len(sites) - doubles)


class AttnEditAttentionPreview:
    DESCRIPTION = ("Renders cross-attention heat maps of an attention store over an image: one picture per word "
                   "(or per token of the prompt when no word is given).")
    CATEGORY = CAT_ATTENTION
    FUNCTION = "render"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("heat_maps",)
    OUTPUT_TOOLTIPS = ("One image per word/token with its attention overlaid.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "attention": (ATTN_STORE, {"tooltip": "From Invert Image or Attention Edit Sampler."}),
                "image": ("IMAGE", {"tooltip": "The picture to draw the maps over (e.g. the input or decoded edit)."}),
                "branch": (["target", "source"], {"default": "target",
                                                  "tooltip": "Which branch's maps (stores from Invert only have "
                                                             "'source')."}),
            },
            "optional": {
                "words": ("STRING", {"default": "", "tooltip": "Comma-separated words; empty = every prompt token."}),
                "image_index": ("INT", {"default": 0, "min": 0, "max": 4096,
                                        "tooltip": "Which image of a batch."}),
            },
        }

    def render(self, attention, image, branch, words="", image_index=0):
        images = wrap_errors(PREVIEW, _render, attention, image, branch, words, image_index)
        import nodes as comfy_nodes

        return {"ui": comfy_nodes.PreviewImage().save_images(images)["ui"], "result": (images,)}


def _render(store, image, branch, words, image_index) -> torch.Tensor:
    role = branch if branch in store.roles else store.roles[0]
    row = store.row_of(role, image_index)
    prompt = store.prompts[row]
    maps = store.cross_map()[row]  # [h, w, T] at the store's semantic level
    if prompt is None:
        raise AttnEditError(PREVIEW, f"the {role} row of this store has no prompt tokens to label maps with")
    wanted = split_words(words)
    if wanted:
        positions = [prompt.find_text(w, f"{role} prompt") for w in wanted]
    else:
        positions = [[i] for i, w in enumerate(prompt.word_ids) if w > 0]
    amaps = [maps[..., pos].mean(-1) for pos in positions]
    picture = image[min(image_index, image.shape[0] - 1)].float()
    return heatmap_grid(picture, amaps)


NODES = {
    "AttnEditAttentionHook": (AttnEditAttentionHook, "Prompt-to-Prompt Attention Hook"),
    "AttnEditAttentionPreview": (AttnEditAttentionPreview, "Attention Heat Maps"),
}
