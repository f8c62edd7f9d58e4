"""AttnEditInstantEdit: InstDiffEdit, edit a picture from the edit text alone (schema and plumbing only)."""

from __future__ import annotations

import logging

import torch

from ..attention.tokens import tokenize_prompt
from ..inversion import comfy_model
from ..inversion import instant as engine
from ..inversion.instant import InstantSettings
from ..inversion.schedule import ddim_sigmas
from ..masks import instant as instant_mask
from ..masks import ops
from .common import AttnEditError, crop_to_multiple, warn, wrap_errors
from .types import CAT_TECHNIQUES

log = logging.getLogger("attention_edit")
NODE = "InstDiffEdit"


class AttnEditInstantEdit:
    DESCRIPTION = (
        "InstDiffEdit (Zou et al., AAAI 2024): edits a photo from the edit text alone, no source prompt and no "
        "painted mask. The photo is partly noised (strength) and denoised with n seeds in parallel; at every step "
        "the model's own cross-attention gives an instant mask of the region the text is about, and only that region "
        "is regenerated. The last mask then drives an inpainting pass: with an SD inpainting checkpoint when one is "
        "connected, otherwise masked denoising with the same model; the original pixels are pasted back outside the "
        "mask through a soft edge (`feather`), or the inpainting checkpoint repaints the full frame as in the "
        "paper's code. Outputs the edited image, the mask and the latent.")
    CATEGORY = CAT_TECHNIQUES
    FUNCTION = "edit"
    RETURN_TYPES = ("IMAGE", "MASK", "LATENT")
    RETURN_NAMES = ("image", "mask", "latent")
    OUTPUT_TOOLTIPS = ("The edited image(s).",
                       "The final instant mask at image size (1 = regenerated region).",
                       "The edited latent (outside the mask it is the input's latent).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The photo(s) to edit; sizes are cropped to multiples of 8 px."}),
                "model": ("MODEL", {"tooltip": "SD1.x / SD2.x / SDXL model whose attention finds the mask."}),
                "clip": ("CLIP", {"tooltip": "Text encoder of the same checkpoint."}),
                "vae": ("VAE", {"tooltip": "VAE of the same checkpoint (encodes the photo, decodes the edit)."}),
                "edit_text": ("STRING", {"multiline": True, "default": "a photo of a dog",
                                         "tooltip": "What the picture should show, e.g. 'a photo of a dog' to turn "
                                                    "the cat into a dog. The mask is found from this text."}),
            },
            "optional": {
                "inpaint_model": ("MODEL", {"tooltip": "An SD inpainting checkpoint of the same family (e.g. "
                                                       "sd-v1-5-inpainting) for the finish, as in the paper. Without "
                                                       "it the finish is masked denoising with `model`."}),
                "strength": ("FLOAT", {"default": engine.STRENGTH, "min": 0.02, "max": 1.0, "step": 0.01,
                                       "tooltip": "Noise strength r of the mask phase (paper 0.5): higher = larger "
                                                  "masks, less of the photo kept."}),
                "steps": ("INT", {"default": engine.STEPS, "min": 2, "max": 200,
                                  "tooltip": "Schedule steps (paper 50); the mask phase runs steps * strength."}),
                "cfg": ("FLOAT", {"default": engine.CFG, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Guidance scale of both phases (paper 7.5)."}),
                "seeds": ("INT", {"default": engine.SEEDS, "min": 1, "max": 16,
                                  "tooltip": "n noises denoised in parallel whose attention is averaged (paper 3; "
                                             "more = steadier mask, more memory)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the noises (mask phase and finish)."}),
                "phi": ("FLOAT", {"default": instant_mask.PHI, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Mask binarisation threshold (paper 0.2): higher = tighter mask."}),
                "gamma1": ("FLOAT", {"default": instant_mask.GAMMA1, "min": -1.0, "max": 1.0, "step": 0.01,
                                     "tooltip": "Words at least this similar to the object word join the object "
                                                "(paper 0.9)."}),
                "gamma2": ("FLOAT", {"default": instant_mask.GAMMA2, "min": -1.0, "max": 1.0, "step": 0.01,
                                     "tooltip": "Words less similar than this are subtracted as background (paper "
                                                "0.6)."}),
                "finish": (list(engine.FINISHES), {"default": engine.FINISHES[0],
                                                   "tooltip": "inpaint: regenerate the final mask's region, keep the "
                                                              "rest. blend only: keep the mask phase's own result "
                                                              "(Eq. 5, faster, may show seams). inpaint full frame: "
                                                              "the inpainting checkpoint repaints the whole picture "
                                                              "from the mask, as the paper's code (needs "
                                                              "`inpaint_model`)."}),
                "finish_denoise": ("FLOAT", {"default": engine.FINISH_DENOISE, "min": 0.02, "max": 1.0,
                                             "step": 0.01, "tooltip": "Noise strength of the inpainting finish "
                                                                      "(1.0 = regenerate the region from noise)."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Negative prompt of both phases (empty in the paper)."}),
                "paste_back": ("BOOLEAN", {"default": True,
                                           "tooltip": "Copy the original pixels outside the mask into the result "
                                                      "through a soft edge of `feather` px (removes VAE round-trip "
                                                      "drift outside the edit and the 8-px block edge of the mask)."}),
                "feather": ("INT", {"default": instant_mask.FEATHER, "min": 0, "max": 256, "step": 1,
                                    "tooltip": "Width in px of the paste-back's soft edge (with paste_back on): "
                                               "the original fades in linearly over this distance outside the "
                                               "mask, and the inpaint finish regenerates that band too. 0 = hard "
                                               "8-px block edge."}),
            },
        }

    def edit(self, image, model, clip, vae, edit_text, inpaint_model=None, strength=engine.STRENGTH,
             steps=engine.STEPS, cfg=engine.CFG, seeds=engine.SEEDS, seed=0, phi=instant_mask.PHI,
             gamma1=instant_mask.GAMMA1, gamma2=instant_mask.GAMMA2, finish=engine.FINISHES[0],
             finish_denoise=engine.FINISH_DENOISE, negative_prompt="", paste_back=True,
             feather=instant_mask.FEATHER):
        settings = InstantSettings(float(strength), int(steps), float(cfg), int(seeds), float(phi), float(gamma1),
                                   float(gamma2), finish, float(finish_denoise))
        return wrap_errors(NODE, _edit, image, model, clip, vae, edit_text, inpaint_model, settings, int(seed),
                           negative_prompt, bool(paste_back), int(feather))


def _finish_model(model, inpaint_model, settings):
    """(model of the finish or None for 'blend only', whether it takes the inpainting inputs, whether it repaints the
    full frame)."""
    if settings.finish not in engine.FINISHES:
        raise AttnEditError(NODE, f"`finish` {settings.finish!r} is unknown; choose {' or '.join(engine.FINISHES)}")
    if settings.finish == "blend only":
        return None, False, False
    nine_channels = False
    if inpaint_model is not None:
        family, inpaint_family = comfy_model.model_family(model), comfy_model.model_family(inpaint_model)
        if family != inpaint_family:
            raise AttnEditError(NODE, f"`inpaint_model` is {inpaint_family} but `model` is {family}; connect an "
                                      "inpainting checkpoint of the same family (its text encoder must match `clip`)")
        nine_channels = engine.is_inpaint_model(inpaint_model)
        if not nine_channels:
            log.warning("%s: `inpaint_model` is not an inpainting checkpoint (no mask input channels); it is used "
                        "for masked denoising", NODE)
    full_frame = settings.finish == "inpaint full frame"
    if full_frame and not nine_channels:
        warn(NODE, "`finish` 'inpaint full frame' needs an SD inpainting checkpoint (9-channel UNet) on "
                   "`inpaint_model`; without one the finish is 'inpaint' (masked denoising). Connect an inpainting "
                   "checkpoint or choose 'inpaint'.")
        full_frame = False
    return (model if inpaint_model is None else inpaint_model), nine_channels, full_frame


def _edit(image, model, clip, vae, text, inpaint_model, settings, seed, negative_prompt, paste_back, feather):
    comfy_model.require_family(model, NODE)
    if not text.strip():
        raise AttnEditError(NODE, "`edit_text` is empty; describe the edited picture, e.g. 'a photo of a dog'")
    if feather < 0:
        raise AttnEditError(NODE, f"`feather` {feather} is negative; use 0 (hard edge) or a width in pixels")
    finish_model, takes_inpaint_inputs, full_frame = _finish_model(model, inpaint_model, settings)
    image = crop_to_multiple(image, 8, NODE)[..., :3]
    with engine.seeded(seed):
        latents = comfy_model.vae_encode(vae, image).float()
    positive, negative = comfy_model.encode_text(clip, text), comfy_model.encode_text(clip, negative_prompt)
    words = [pos for pos, _ in tokenize_prompt(clip, text).word_groups()]
    sigmas = ddim_sigmas(comfy_model.sigma_table(model), settings.steps)
    units = engine.steps_for(settings.steps, settings.strength)
    if finish_model is not None:
        units += engine.steps_for(settings.steps, settings.finish_denoise, "finish_denoise")
    progress = comfy_model.Progress(model, units * image.shape[0])
    image_hw = (int(image.shape[1]), int(image.shape[2]))
    results, masks, finals = [], [], []
    for b in range(image.shape[0]):
        noise = engine.make_noise(seed, settings.seeds, tuple(latents.shape[1:]))
        rows, mask, _, roles = engine.mask_phase(model, positive, negative, latents[b:b + 1], sigmas, noise, words,
                                                 settings, progress.update)
        _log_roles(text, roles, clip, mask)
        mask = mask.float().cpu()
        mask_img = ops.grid_to_image(mask, image_hw)  # [1, H, W]: each latent cell -> its 8x8 block
        if finish_model is None:
            final = comfy_model.latent_to_raw(model, rows[:1])
        else:
            # the region the finish regenerates: the whole frame, or the mask grown under the feathered band
            if full_frame:
                region, region_img = torch.ones_like(mask), mask_img
            else:
                region = ops.dilate(mask, instant_mask.finish_cells(feather) if paste_back else 0)
                region_img = ops.grid_to_image(region, image_hw)
            pos, neg = positive, negative
            if takes_inpaint_inputs:
                with engine.seeded(seed):
                    concat = comfy_model.vae_encode(vae, engine.inpaint_pixels(image[b:b + 1], region_img))
                pos, neg = (engine.with_inpaint_inputs(c, concat, region_img) for c in (positive, negative))
            f_sigmas = ddim_sigmas(comfy_model.sigma_table(finish_model), settings.steps)
            final = engine.finish_phase(finish_model, pos, neg, latents[b:b + 1], f_sigmas, noise[:1], region,
                                        settings, progress.update)
            final = comfy_model.latent_to_raw(finish_model, final)
        final = final.to(comfy_model.intermediate_device()).float()
        decoded = comfy_model.vae_decode(vae, final)[..., :3].float().to(image.device)
        if paste_back:
            weights = instant_mask.feather_weights(mask_img, feather)[..., None].to(decoded)
            decoded = engine.blend(decoded, image[b:b + 1].float(), weights)
        results.append(decoded)
        masks.append(mask_img)
        finals.append(final)
    return (torch.cat(results), torch.cat(masks).to(comfy_model.intermediate_device()),
            {"samples": torch.cat(finals)})


def _log_roles(text, roles, clip, mask) -> None:
    if float(mask.amax()) == 0:
        log.warning("%s: the instant mask for %r is empty (no region found); the picture is left unchanged. Lower "
                    "`phi` or raise `strength`.", NODE, text)
    if roles is None or roles.index < 0:
        return
    prompt = tokenize_prompt(clip, text)
    names = [name for _, name in prompt.word_groups()]
    keep = [names[i] for i, r in enumerate(roles.roles.tolist()) if r > 0]
    drop = [names[i] for i, r in enumerate(roles.roles.tolist()) if r < 0]
    log.info("%s: object word %r; object words %s; background words %s", NODE, names[roles.index], keep, drop)


NODES = {"AttnEditInstantEdit": (AttnEditInstantEdit, "InstDiffEdit (Instant Attention Mask Edit)")}
