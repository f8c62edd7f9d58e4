"""AttnEditCPAMSelfAttn: CPAM (Vo et al.) as a MODEL patch for the Attention Edit Sampler (schema and plumbing only;
the maths is in attention/cpam.py and masks/cpam.py)."""

from __future__ import annotations

import logging

import torch

from ..attention import cpam, hooks, kvedit
from ..attention.tokens import split_words, tokenize_prompt, word_token_ids
from ..inversion import comfy_model
from ..inversion.conditioning import context_of
from ..masks import cpam as cpam_masks
from ..masks.ops import as_mask_batch, aspect_mismatch, mask_to_grid
from .common import AttnEditError, bind_inversion, check_inversion_base_model, check_text_encoder, warn, wrap_errors
from .types import CAT_TECHNIQUES, INVERSION

log = logging.getLogger("attention_edit")
NODE = "CPAM Self-Attention"
AUTO_LAYER = -1  # start_layer: the paper's position for the connected model (attention/cpam.py paper_start_layer)
STRATEGY_HELP = (
    "edit object (keep identity): change pose/view, the object keeps its look (Eq. 2 after start_step/layer). "
    "replace object: new object in the masked area, background kept. remove object: every pixel attends the "
    "background only (target_prompt is ignored). change background: the mask is the object to KEEP; the rest "
    "follows target_prompt. regional prompts: inside the mask target_prompt, outside background_prompt. Flux: "
    "replace object and change background only (KV-Edit-style background preservation).")


class AttnEditCPAMSelfAttn:
    DESCRIPTION = (
        "CPAM (Vo et al., Context-Preserving Adaptive Manipulation) for real images: patches a copy of the MODEL so "
        "that, in Attention Edit Sampler, the edited branch takes background (and, when kept, object) content from "
        "the inversion through masked self-attention, while only the masked region listens to the target prompt "
        "(the rest attends the null text). Connect an Invert Image made with ddim_null_prompt (the paper's setting: "
        "DDIM guided by the null text, no source prompt), a mask of the object and a target prompt; pick a "
        "strategy. The sampler pins its source branch to the inversion latents while this patch is on the model. On "
        "Flux (ComfyUI 0.3.x) it preserves the background as KV-Edit does: outside the mask the target takes the "
        "source's image keys/values in every block and the source latent after every step.")
    CATEGORY = CAT_TECHNIQUES
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL", "CONDITIONING")
    RETURN_NAMES = ("model", "target")
    OUTPUT_TOOLTIPS = ("Patched copy of the model: connect to Attention Edit Sampler (the input MODEL is unchanged).",
                       "The target prompt's conditioning (the sampler takes it from the model automatically).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch (a copy is patched); the checkpoint that made the "
                                               "inversion."}),
                "inversion": (INVERSION, {"tooltip": "From Invert Image (ddim_null_prompt as in the paper). Its "
                                                     "latents are the intermediate latents z_i whose keys/values are "
                                                     "kept."}),
                "clip": ("CLIP", {"tooltip": "Text encoder of the same checkpoint."}),
                "source_mask": ("MASK", {"tooltip": "The object (white = object), any size; one mask, or one per "
                                                    "image. For 'change background' the object to keep."}),
                "target_prompt": ("STRING", {"multiline": True, "default": "a photo of a cat standing on a sofa",
                                             "tooltip": "The edited caption (what the masked region should show)."}),
                "strategy": (list(cpam.STRATEGIES), {"default": "edit object (keep identity)",
                                                     "tooltip": STRATEGY_HELP}),
            },
            "optional": {
                "object_words": ("STRING", {"default": "", "tooltip": "Words of target_prompt naming the object, "
                                                                      "e.g. \"cat\": after refine_step the target "
                                                                      "mask follows their attention (edit/replace). "
                                                                      "Empty = the mask is cloned from source_mask."}),
                "background_prompt": ("STRING", {"multiline": True, "default": "",
                                                 "tooltip": "regional prompts only: what the region outside the "
                                                            "mask attends instead of the null text."}),
                "start_step": ("INT", {"default": cpam.START_STEP, "min": 0, "max": 1000,
                                       "tooltip": "S: object keys/values come from the inversion from this step on "
                                                  "(edit object only; paper 3), counted on the paper's 50 steps: "
                                                  "other step counts use the same fraction of the run (3 -> step 1 "
                                                  "at 10 or 20 steps); 50 or more = never. Lower = closer to the "
                                                  "original object, higher = freer pose."}),
                "start_layer": ("INT", {"default": AUTO_LAYER, "min": AUTO_LAYER, "max": 100,
                                        "tooltip": "L: ... and from this transformer block on, in forward order "
                                                   "(SD1.x/SD2.x 0-15, SDXL 0-10). -1 = the paper's position for "
                                                   "the connected model: the decoder from its 2nd block at the "
                                                   "semantic level (SD1.5/SD2: 8 as in the paper, SDXL: 6). Lower "
                                                   "= more blocks keep the object's look."}),
                "refine_step": ("INT", {"default": cpam_masks.REFINE_START_STEP, "min": 0, "max": 1000,
                                        "tooltip": "T_m: the first steps use source_mask itself; from this step on "
                                                   "the target mask (expanded clone or refined from object_words). "
                                                   "Counted on the paper's 50 steps: other step counts use the same "
                                                   "fraction of the run (5 -> step 1 at 10 steps, 2 at 20)."}),
                "refine_threshold": ("FLOAT", {"default": cpam_masks.REFINE_THRESHOLD, "min": 0.0, "max": 1.0,
                                               "step": 0.01, "tooltip": "Refinement: normalised attention above "
                                                                        "which a pixel belongs to the object."}),
                "mask_expand": ("FLOAT", {"default": cpam_masks.MASK_EXPAND_SCALE, "min": 0.0, "max": 1.0,
                                          "step": 0.01, "tooltip": "Cloned target mask = source mask dilated by "
                                                                   "about this fraction of its size, at least one "
                                                                   "latent cell (8 px) per side (0 = exact clone)."}),
                "free_layers": ("FLOAT", {"default": cpam.FREE_LAYER_RATIO, "min": 0.0, "max": 1.0, "step": 0.01,
                                          "tooltip": "Fraction of the self-attention layers that use normal "
                                                     "self-attention at each step (picked at random from `seed`) for "
                                                     "a coherent result; the nearest whole count (0.1: 2 of 16 on "
                                                     "SD1.5, 7 of 70 on SDXL)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                                 "tooltip": "Seed of the random choice of free_layers (same seed = same result)."}),
                "localized_extraction": ("BOOLEAN", {"default": True,
                                                     "tooltip": "Outside the mask, cross-attention sees only the "
                                                                "null text (Eq. 4). Off = the whole image hears "
                                                                "target_prompt (the paper's ablation)."}),
            },
        }

    def patch(self, model, inversion, clip, source_mask, target_prompt, strategy, object_words="",
              background_prompt="", start_step=cpam.START_STEP, start_layer=AUTO_LAYER,
              refine_step=cpam_masks.REFINE_START_STEP, refine_threshold=cpam_masks.REFINE_THRESHOLD,
              mask_expand=cpam_masks.MASK_EXPAND_SCALE, free_layers=cpam.FREE_LAYER_RATIO, seed=0,
              localized_extraction=True):
        knobs = dict(object_words=object_words, background_prompt=background_prompt, start_step=start_step,
                     start_layer=start_layer, refine_step=refine_step, refine_threshold=refine_threshold,
                     mask_expand=mask_expand, free_layers=free_layers, seed=seed,
                     localized_extraction=localized_extraction)
        return wrap_errors(NODE, _patch, model, inversion, clip, source_mask, target_prompt, strategy, **knobs)


def _patch(model, inversion, clip, source_mask, target_prompt, strategy, **knobs):
    family = comfy_model.require_family(model, NODE, comfy_model.INVERTIBLE_FAMILIES)
    check_inversion_base_model(NODE, inversion, comfy_model.model_fingerprint(model))
    check_text_encoder(NODE, model, comfy_model.encode_text(clip, target_prompt), "`clip`")
    if strategy not in cpam.STRATEGIES:
        raise AttnEditError(NODE, f"`strategy` {strategy!r} is unknown; choose one of {', '.join(cpam.STRATEGIES)}")
    spec = cpam.STRATEGIES[strategy]
    if family in comfy_model.FLOW_FAMILIES:
        return _patch_flux(model, inversion, clip, source_mask, target_prompt, spec, knobs)
    source, target_static = _masks(source_mask, inversion, spec, knobs["mask_expand"])
    target_tokens = tokenize_prompt(clip, target_prompt)
    words = _object_tokens(clip, target_tokens, knobs["object_words"], spec)
    region = None
    if spec.outside == "region":
        if not knobs["background_prompt"].strip():
            raise AttnEditError(NODE, "strategy 'regional prompts' needs `background_prompt` (what the region "
                                      "outside the mask should show), e.g. \"a snowy forest\"")
        region = context_of(comfy_model.encode_text(clip, knobs["background_prompt"]), "background_prompt")
    sites = hooks.unet_sites(model)
    layers = cpam.layer_numbering([(s.block, s.index) for s in sites])
    attention = cpam.attention_layers([(s.block, s.index, s.depth) for s in sites])
    unread = _unread_knobs(spec, knobs)
    if unread:
        warn(NODE, f"{', '.join(f'`{n}`' for n in unread)} {'is' if len(unread) == 1 else 'are'} not used by strategy "
                   f"{spec.name!r} (start_step / start_layer: 'edit object' only; refine_step: the edit and replace "
                   "strategies; object_words / refine_threshold: their mask refinement; background_prompt: 'regional "
                   "prompts'); leave them at their defaults.")
    start_layer = _start_layer(int(knobs["start_layer"]), [(s.block, s.index, s.level) for s in sites], len(layers),
                               spec)
    start_step, refine_step = _run_steps(int(knobs["start_step"]), int(knobs["refine_step"]), inversion.steps, spec,
                                         bool(words))
    device = comfy_model.intermediate_device()
    controller = cpam.CPAMController(
        strategy=spec, source_masks=source.to(device), target_masks=target_static.to(device), layers=layers,
        free_layers=cpam.free_layer_table(knobs["seed"], inversion.steps, len(attention), knobs["free_layers"]),
        null_context=context_of(inversion.negative, "inversion negative prompt").to(device),
        region_context=None if region is None else region.to(device), start_step=start_step,
        start_layer=start_layer, refine_step=refine_step,
        localized=bool(knobs["localized_extraction"]), source_text=inversion.source_prompt,
        target_text=target_prompt, target_tokens=target_tokens,
        target_conditioning=comfy_model.encode_text(clip, target_prompt), attention_layers=attention)
    patched = hooks.add_controller(model, controller)
    if controller.extra_name is not None:
        patched = hooks.add_context_patch(patched, controller)
    if words:
        patched = hooks.add_step_hook(patched, cpam.CPAMMaskRefine(words, refine_step,
                                                                   float(knobs["refine_threshold"])))
    return (bind_inversion(NODE, patched, inversion), controller.target_conditioning)


FLUX_STRATEGIES = ("replace object", "change background")  # background preservation (KV-Edit style) on Flux
FLUX_UNUSED = ("object_words", "background_prompt", "start_step", "start_layer", "refine_step", "refine_threshold",
               "free_layers", "seed", "localized_extraction")


def _patch_flux(model, inversion, clip, source_mask, target_prompt, spec: cpam.Strategy, knobs: dict):
    """Flux and SD3 (joint attention): CPAM's background preservation only, as KV-Edit does it on joint attention (attention/kvedit.py): the
    target's image keys / values and latents outside the editable mask come from the pinned source."""
    family = comfy_model.FAMILY_NAMES.get(comfy_model.model_family(model), "Flux")  # Flux or SD3 / SD3.5
    if spec.name not in FLUX_STRATEGIES:
        raise AttnEditError(NODE, f"`strategy` {spec.name!r} does not run on {family}; on {family} this node "
                                  "preserves the "
                                  f"background outside the mask (KV-Edit style): choose "
                                  f"{' or '.join(repr(s) for s in FLUX_STRATEGIES)}, or use the Prompt-to-Prompt "
                                  "Attention Hook (word swap with local blend) for other edits.")
    defaults = _defaults()
    changed = [name for name in FLUX_UNUSED if knobs[name] != defaults[name]]
    if changed:
        warn(NODE, f"{', '.join(f'`{n}`' for n in changed)} are not used on {family} (only the mask, `mask_expand` and "
                   "the strategy are: KV-Edit-style background preservation); leave them at their defaults.")
    _source, editable = _masks(source_mask, inversion, spec, knobs["mask_expand"])
    device = comfy_model.intermediate_device()
    target = comfy_model.encode_text(clip, target_prompt)
    controller = kvedit.JointBackgroundKV(masks=editable.to(device), source_text=inversion.source_prompt,
                                          target_text=target_prompt, target_tokens=tokenize_prompt(clip, target_prompt),
                                          target_conditioning=target)
    patched = hooks.add_controller(model, controller)
    patched = hooks.add_step_hook(patched, kvedit.BackgroundLatentBlend(editable.to(device)))
    return (bind_inversion(NODE, patched, inversion), target)


def _unread_knobs(spec: cpam.Strategy, knobs: dict) -> list[str]:
    """The knobs set away from their defaults that `spec` never reads (UNet path)."""
    read = {"start_step": spec.retain_object, "start_layer": spec.retain_object,
            "refine_step": spec.target_mask == "expand", "object_words": spec.refine,
            "refine_threshold": spec.refine and bool(split_words(knobs["object_words"])),
            "background_prompt": spec.outside == "region"}
    defaults = _defaults()
    return [name for name, used in read.items() if not used and knobs[name] != defaults[name]]


def _defaults() -> dict:
    optional = AttnEditCPAMSelfAttn.INPUT_TYPES()["optional"]
    return {name: spec[1].get("default") for name, spec in optional.items()}


def _run_steps(start_step: int, refine_step: int, steps: int, spec: cpam.Strategy, refined: bool) -> tuple[int, int]:
    """S and T_m of this run: the node's values are on the paper's 50-step schedule (attention/cpam.py run_step);
    a value that can never act (>= 50) is warned about where the strategy uses it."""
    paper = cpam.PAPER_STEPS
    if spec.retain_object and start_step >= paper:
        warn(NODE, f"`start_step` {start_step} is past the last of the paper's {paper} steps, so the object's "
                   f"keys/values are never kept (Eq. 2) at any step count; use a value below {paper} (the paper: 3).")
    if spec.target_mask == "expand" and refine_step >= paper:
        what = "the refined mask of `object_words`" if refined else "the expanded target mask"
        warn(NODE, f"`refine_step` {refine_step} is past the last of the paper's {paper} steps, so {what} never "
                   f"replaces source_mask (Sec. 3.4); use a value below {paper} (default "
                   f"{cpam_masks.REFINE_START_STEP}).")
    return cpam.run_step(start_step, steps), cpam.run_step(refine_step, steps)


def _start_layer(value: int, sites: list[tuple[str, int, int]], count: int, spec: cpam.Strategy) -> int:
    """The layer L of Eq. 2: `value`, or the paper's position for this model when it is AUTO_LAYER (-1)."""
    if value < 0:
        return cpam.paper_start_layer(sites)
    if spec.retain_object and value >= count:
        warn(NODE, f"start_layer {value} is past the model's last transformer block ({count} blocks, 0-{count - 1}); "
                   "the object's look is never kept. Use -1 for the paper's position.")
    return value


def _masks(source_mask, inversion, spec: cpam.Strategy, expand: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_s, static M_t), float [B, h, w] at latent resolution, with the documented checks."""
    masks = as_mask_batch(source_mask, inversion.batch, "source_mask")
    latent_hw = inversion.latent_hw
    if aspect_mismatch(tuple(masks.shape[-2:]), latent_hw):
        log.warning("%s: source_mask is %dx%d but the image is %dx%d; the mask is stretched to the image", NODE,
                    masks.shape[-1], masks.shape[-2], latent_hw[1] * 8, latent_hw[0] * 8)
    source = mask_to_grid(masks, latent_hw)[:, 0]
    if spec.invert_mask:
        source = 1.0 - source
    inside = cpam_masks.binarize(source).flatten(1).sum(1)
    cells = latent_hw[0] * latent_hw[1]
    for i, count in enumerate(inside.tolist()):
        if count == 0:
            what = "covers the whole image (nothing left to change)" if spec.invert_mask else "is empty"
            raise AttnEditError(NODE, f"`source_mask` {what} for image {i}: no latent cell (8x8 px) is at least half "
                                      "inside the region to edit. Paint the object in the mask editor (Load Image -> "
                                      "Open in MaskEditor) or connect a segmentation mask; white = object.")
        if spec.background_only and count == cells:
            raise AttnEditError(NODE, f"`source_mask` covers the whole image {i}: 'remove object' fills the object "
                                      "from the background, so some background must stay unmasked.")
    if spec.target_mask == "expand":
        target = cpam_masks.expand_mask(source[:, None], expand)[:, 0]
    elif spec.target_mask == "empty":
        target = torch.zeros_like(source)
    else:
        target = source
    return source, target


def _object_tokens(clip, target_tokens, object_words: str, spec: cpam.Strategy) -> tuple[int, ...]:
    words = split_words(object_words)
    if not words:
        return ()
    if not spec.refine:  # warned by _unread_knobs
        return ()
    positions: set[int] = set()
    for word in words:
        positions.update(target_tokens.find(word_token_ids(clip, word), word, "target prompt"))
    return tuple(sorted(positions))


NODES = {"AttnEditCPAMSelfAttn": (AttnEditCPAMSelfAttn, "CPAM Self-Attention (Attention Edit)")}
