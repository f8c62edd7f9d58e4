"""AttnEditInvert: invert a real image into an ATTNEDIT_INVERSION (schema and plumbing only)."""

from __future__ import annotations

import logging

import torch

from ..attention.layers import SELF_LEVEL_DPL
from ..attention.run import CaptureSpec
from ..attention.store import merge_stores, store_from_run
from ..attention.tokens import tokenize_prompt
from ..inversion import comfy_model, engine, null_text
from ..inversion.quality import psnr
from ..inversion.schedule import ddim_sigmas, flow_sigmas
from ..inversion.trajectory import FLOW_METHODS, METHODS, NULL_PROMPT_DDIM, UNET_METHODS, InversionTrajectory
from .common import AttnEditError, check_image_size, check_text_encoder, crop_to_multiple, warn, wrap_errors
from .types import ATTN_STORE, CAT_INVERSION, INVERSION

log = logging.getLogger("attention_edit")
NODE = "Invert Image"


class AttnEditInvert:
    DESCRIPTION = (
        "Inverts a real image into the noise trajectory that regenerates it, so the image can then be edited with "
        "attention control (connect the inversion to Attention Edit Sampler). Methods: null_text (Mokady et al. "
        "2023, best reconstruction at high CFG, slowest), ddim (plain DDIM inversion, fast, drifts at CFG > 1), "
        "direct (PnP/direct inversion, exact source branch, fast), negative_prompt (source prompt as negative, "
        "fast), ddim_null_prompt (DDIM guided by the null text only, no source prompt: CPAM's setting). Flux "
        "(early, see docs/flux.md): flow_euler (Euler inversion of the rectified-flow ODE) or rf_solver (RF-Solver, "
        "second order), with the `guidance` embedding. The reconstruction PSNR tells how faithfully the source "
        "branch regenerates the input "
        "(above ~25 dB is good for SD1.5). Cached by ComfyUI: changing only the edit never re-inverts.")
    CATEGORY = CAT_INVERSION
    FUNCTION = "invert"
    RETURN_TYPES = (INVERSION, "LATENT", "SIGMAS", "LATENT", "FLOAT", ATTN_STORE)
    RETURN_NAMES = ("inversion", "noise_latent", "sigmas", "reconstruction", "psnr", "attention")
    OUTPUT_TOOLTIPS = (
        "The inversion: connect to Attention Edit Sampler and the technique nodes.",
        "The inverted noise latent x_T (for core SamplerCustom with add_noise off and the sigmas output).",
        "The schedule of the inversion (DDIM: ddim_uniform timesteps; Flux: the simple scheduler), ends at 0.",
        "What the source branch regenerates (decode it to judge the inversion).",
        "Reconstruction PSNR in dB of the decoded reconstruction vs the input (mean over the batch); -1 without VAE.",
        "Cross-attention maps of the source prompt captured during inversion (for masks and heat maps).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.x / SD2.x / SDXL (or, early, Flux) model you will edit with "
                                               "(same checkpoint)."}),
                "clip": ("CLIP", {"tooltip": "Text encoder of the same checkpoint."}),
                "source_prompt": ("STRING", {"multiline": True, "default": "a photo of a cat",
                                             "tooltip": "A caption of the input image. Words you will edit must "
                                                        "appear in it."}),
                "method": (list(METHODS), {"default": "null_text",
                                           "tooltip": "null_text: best fidelity, ~10 optimisation iterations per "
                                                      "step. ddim: fastest, reconstruction drifts at CFG > 1. direct: "
                                                      "exact source branch via per-step offsets. negative_prompt: "
                                                      "source prompt used as negative, no optimisation. "
                                                      "ddim_null_prompt: DDIM inversion and source branch hear only "
                                                      "the null text (negative_prompt, empty = the papers' null "
                                                      "text), source_prompt unused: CPAM's setting, no CFG drift. "
                                                      "Flux only: flow_euler (Euler inversion of the flow ODE, one "
                                                      "model call per step) or rf_solver (RF-Solver, second order, "
                                                      "two calls per step, closer reconstruction)."}),
                "steps": ("INT", {"default": 50, "min": 2, "max": 500,
                                  "tooltip": "DDIM steps of inversion and editing (50 in the papers)."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Guidance scale used when editing; null-text optimises for this value."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The image to edit (needs `vae`). Sizes are cropped to multiples of 8."}),
                "vae": ("VAE", {"tooltip": "Encodes `image` and decodes the reconstruction for the PSNR."}),
                "latent": ("LATENT", {"tooltip": "Alternatively, an already encoded image (instead of `image`)."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Unconditional prompt (the null text). Keep empty for the "
                                                          "papers' setting."}),
                "inner_steps": ("INT", {"default": null_text.NULL_TEXT_INNER_STEPS, "min": 1, "max": 100,
                                        "tooltip": "null_text only: max Adam iterations per step (early stop at "
                                                   "loss < 1e-5 + i*2e-5)."}),
                "capture_self_attention": ("BOOLEAN", {"default": False,
                                                       "tooltip": "Also keep 32x32 self-attention (for DPL background "
                                                                  "masks). Uses ~4 MB per image."}),
                "guidance": ("FLOAT", {"default": comfy_model.FLUX_DEFAULT_GUIDANCE, "min": 0.0, "max": 100.0,
                                       "step": 0.1,
                                       "tooltip": "Flux-dev only: the guidance embedding value (what core "
                                                  "FluxGuidance sets; 3.5 is Flux-dev's default) used by inversion "
                                                  "and editing. Ignored by SD models and Flux Schnell."}),
            },
        }

    def invert(self, model, clip, source_prompt, method, steps, cfg, image=None, vae=None, latent=None,
               negative_prompt="", inner_steps=null_text.NULL_TEXT_INNER_STEPS, capture_self_attention=False,
               guidance=comfy_model.FLUX_DEFAULT_GUIDANCE):
        return wrap_errors(NODE, self._invert, model, clip, source_prompt, method, steps, cfg, image, vae, latent,
                           negative_prompt, inner_steps, capture_self_attention, guidance)

    def _invert(self, model, clip, source_prompt, method, steps, cfg, image, vae, latent, negative_prompt,
                inner_steps, capture_self, guidance=comfy_model.FLUX_DEFAULT_GUIDANCE):
        comfy_model.require_family(model, NODE, comfy_model.INVERTIBLE_FAMILIES)
        flow_model = comfy_model.is_flow(model)
        _check_method(model, method, flow_model)
        if flow_model and comfy_model.guidance_embedded(model) and cfg != 1.0:
            warn(NODE, f"`cfg` {cfg:g} on a guidance-distilled Flux MODEL runs a negative pass per step and the "
                       "reconstruction drifts from the inversion (which runs at cfg 1); Flux-dev is used with cfg 1.0 "
                       "and its `guidance` embedding instead.")
        unread = _unread_knobs(method, inner_steps, capture_self, guidance, flow_model,
                               comfy_model.guidance_embedded(model))
        if unread:
            warn(NODE, f"{', '.join(unread)}; leave {'it' if len(unread) == 1 else 'them'} at the default.")
        source_prompt = _source_prompt(method, source_prompt, negative_prompt)
        source = comfy_model.with_guidance(model, comfy_model.encode_text(clip, source_prompt), guidance)
        check_text_encoder(NODE, model, source, "`clip`")
        negative = comfy_model.with_guidance(model, comfy_model.encode_text(clip, negative_prompt), guidance)
        samples, reference = _input_latent(model, image, vae, latent)
        if reference is None and vae is not None:
            reference = comfy_model.vae_decode(vae, samples)
        schedule = flow_sigmas if flow_model else ddim_sigmas
        sigmas = schedule(comfy_model.sigma_table(model), steps)
        steps = len(sigmas) - 1
        capture = CaptureSpec(cross_levels=frozenset({comfy_model.semantic_level(model)}),
                              self_levels=frozenset({SELF_LEVEL_DPL}) if capture_self else frozenset())
        units = steps + engine.method_units(method, steps, inner_steps)
        progress = comfy_model.Progress(model, units * samples.shape[0])
        images = [engine.invert_image(model, source, negative, samples[i:i + 1], sigmas, method, cfg,
                                      inner_steps=inner_steps, capture=capture,
                                      progress=progress.update) for i in range(samples.shape[0])]
        return _package(model, vae, clip, images, reference, sigmas, method, cfg, source, negative, source_prompt,
                        negative_prompt)


def _check_method(model, method: str, flow_model: bool) -> None:
    """`method` must exist and fit the model's sampler maths: DDIM-based methods (null text, negative prompt, direct
    offsets) are defined for eps / v UNets, the flow solvers for rectified-flow models (Flux)."""
    if method not in METHODS:
        raise AttnEditError(NODE, f"`method` {method!r} is unknown; choose one of {', '.join(METHODS)}")
    family = comfy_model.FAMILY_NAMES.get(comfy_model.model_family(model), comfy_model.model_family(model))
    if flow_model and method not in FLOW_METHODS:
        raise AttnEditError(
            NODE, f"`method` {method!r} does not apply to this {family} MODEL: it is a rectified-flow model (velocity "
                  "prediction, no DDIM schedule or null text), and the DDIM-based methods "
                  f"({', '.join(UNET_METHODS)}) need an SD1.x / SD2.x / SDXL UNet. Choose {FLOW_METHODS[0]!r} (Euler "
                  f"inversion) or {FLOW_METHODS[1]!r} (RF-Solver, second order).")
    if not flow_model and method in FLOW_METHODS:
        raise AttnEditError(
            NODE, f"`method` {method!r} inverts rectified-flow models (Flux); this {family} MODEL is a "
                  f"DDIM model. Choose one of {', '.join(UNET_METHODS)} (ddim is the plain inversion).")


def _unread_knobs(method: str, inner_steps: int, capture_self: bool, guidance: float, flow_model: bool,
                  guidance_model: bool) -> list[str]:
    """What a knob set away from its default does not do with this method / model (each a clause for the warning)."""
    unread = []
    if method != "null_text" and inner_steps != null_text.NULL_TEXT_INNER_STEPS:
        unread.append(f"`inner_steps` {inner_steps} is only used by method null_text (this is {method})")
    if capture_self and flow_model:
        unread.append("`capture_self_attention` keeps UNet self-attention maps (DPL's background masks); a flow "
                      "model has none to keep")
    if not guidance_model and guidance != comfy_model.FLUX_DEFAULT_GUIDANCE:
        unread.append(f"`guidance` {guidance:g} is only used by models with a guidance embedding (Flux-dev)")
    return unread


def _source_prompt(method: str, source_prompt: str, negative_prompt: str) -> str:
    """The prompt the inversion and the source branch hear: `source_prompt`, or the null text itself for
    ddim_null_prompt (DDIM guided by the null text with no source prompt, CPAM Sec. 4.1)."""
    if method != NULL_PROMPT_DDIM:
        return source_prompt
    if source_prompt.strip() and source_prompt.strip() != negative_prompt.strip():
        warn(NODE, f"`source_prompt` {source_prompt!r} is not used by method {NULL_PROMPT_DDIM!r}: the inversion and "
                   "the source branch hear only the null text (`negative_prompt`). Clear source_prompt, or pick "
                   "another method to invert with it.")
    return negative_prompt


def _input_latent(model, image, vae, latent) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw latent samples to invert and the reference image for the PSNR (None when given a latent)."""
    if image is not None and latent is not None:
        raise AttnEditError(NODE, "both `image` and `latent` are connected; connect only one of them")
    if image is not None:
        if vae is None:
            raise AttnEditError(NODE, "`image` needs a `vae` to be encoded; connect the checkpoint's VAE")
        image = crop_to_multiple(image, 8, NODE)
        check_image_size(NODE, model, image, vae)
        return comfy_model.vae_encode(vae, image).float(), image
    if latent is not None:
        samples = latent["samples"].float()
        comfy_model.check_latent_size(model, samples.shape[-2], samples.shape[-1], "`latent`")
        return samples, None
    raise AttnEditError(NODE, "nothing to invert: connect `image` (with `vae`) or `latent`")


def _package(model, vae, clip, images, reference, sigmas, method, cfg, source, negative, source_prompt,
             negative_prompt):
    device = comfy_model.intermediate_device()
    stack = lambda name: None if getattr(images[0], name) is None else torch.stack(  # noqa: E731
        [getattr(im, name).to(device) for im in images], 1)
    recon = torch.stack([im.reconstruction for im in images]).to(device)
    recon_raw = comfy_model.latent_to_raw(model, recon)
    psnrs, preview = _measure(vae, recon_raw, reference)
    tokens = tokenize_prompt(clip, source_prompt)
    trajectory = InversionTrajectory(
        method=method, sigmas=sigmas, latents=stack("latents"), source=source, negative=negative,
        source_prompt=source_prompt, negative_prompt=negative_prompt, cfg=float(cfg),
        fingerprint=comfy_model.model_fingerprint(model), uncond=stack("uncond"), offsets=stack("offsets"),
        psnr=tuple(psnrs), source_tokens=tokens,
        extras={"null_text_iterations": [im.iterations for im in images]})
    log.info("Attention Edit: %s", trajectory.describe())
    level = comfy_model.semantic_level(model)
    store = merge_stores([store_from_run(im.run, (tokens,), trajectory.latent_hw, device, semantic_level=level)
                          for im in images])
    noise = {"samples": comfy_model.latent_to_raw(model, trajectory.latents[0])}
    mean_psnr = float(sum(psnrs) / len(psnrs)) if psnrs else -1.0
    result = (trajectory, noise, sigmas, {"samples": recon_raw}, mean_psnr, store)
    if preview is None:
        return result
    import nodes as comfy_nodes

    ui = comfy_nodes.PreviewImage().save_images(preview)["ui"]
    return {"ui": ui, "result": result}


def _measure(vae, recon_raw, reference):
    """PSNR per image of decode(reconstruction) vs the input image (or vs decode(input latent))."""
    if vae is None:
        return [], None
    decoded = comfy_model.vae_decode(vae, recon_raw).float()
    if reference is None:
        return [], decoded
    ref = reference[..., :3].to(decoded)
    if ref.shape != decoded.shape:
        return [], decoded
    return [psnr(decoded[i], ref[i]) for i in range(decoded.shape[0])], decoded


NODES = {"AttnEditInvert": (AttnEditInvert, "Invert Image (Attention Edit)")}
