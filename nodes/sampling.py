"""AttnEditEditSampler (two-branch editing from an inversion) and AttnEditDDIMSampler (SAMPLER for SamplerCustom)."""

from __future__ import annotations

import torch

from ..attention import hooks
from ..attention.run import CaptureSpec
from ..attention.store import merge_stores, store_from_run
from ..inversion import comfy_model, engine
from ..inversion.conditioning import single_entry
from ..inversion.ddim import ddim_step
from .common import AttnEditError, check_bound_inversions, check_inversion_model, wrap_errors
from .dpl import learned_target
from .types import ATTN_STORE, CAT_SAMPLING, INVERSION

SAMPLER = "Attention Edit Sampler"
SOURCE_BRANCH = ("reconstruct", "pin to inversion")


class AttnEditEditSampler:
    DESCRIPTION = (
        "Edits the inverted image: runs the source branch (regenerating the input) and the target branch (the edit) "
        "in lock-step with DDIM on the inversion's schedule and guidance, while the attention hooks on the MODEL "
        "(Prompt-to-Prompt, MAG-Edit, CPAM, ...) transfer attention from source to target. Decode the LATENT with "
        "core VAE Decode.")
    CATEGORY = CAT_SAMPLING
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT", "LATENT", ATTN_STORE)
    RETURN_NAMES = ("latent", "source_latent", "attention")
    OUTPUT_TOOLTIPS = ("The edited image latent (VAE Decode it).",
                       "What the source branch regenerated (should look like the input).",
                       "Averaged cross-attention of both branches (for masks and heat maps).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model patched by Attention Edit nodes (e.g. Prompt-to-Prompt "
                                               "Attention Hook); must be the checkpoint that made the inversion."}),
                "inversion": (INVERSION, {"tooltip": "From Invert Image: fixes schedule, guidance and start noise."}),
            },
            "optional": {
                "target": ("CONDITIONING", {"tooltip": "Target prompt. Optional when an attention hook on the model "
                                                       "already defines it (they must then agree)."}),
                "source_branch": (list(SOURCE_BRANCH), {"default": "reconstruct",
                                                        "tooltip": "reconstruct: the source branch regenerates the "
                                                                   "image as the papers do. pin to inversion: force "
                                                                   "it onto the inversion latents every step (exact "
                                                                   "source, any method)."}),
            },
        }

    def sample(self, model, inversion, target=None, source_branch="reconstruct"):
        return wrap_errors(SAMPLER, self._sample, model, inversion, target, source_branch)

    def _sample(self, model, inversion, target, source_branch):
        comfy_model.require_family(model, SAMPLER)
        check_inversion_model(SAMPLER, inversion, model, comfy_model.model_fingerprint(model))
        check_bound_inversions(SAMPLER, model, inversion)
        controllers = hooks.controllers_of(model)
        step_hooks = hooks.step_hooks_of(model)
        target, target_tokens = _resolve_target(controllers, inversion, target)
        target_steps = learned_target(SAMPLER, inversion, target, target_tokens)  # DPL: learned tokens kept in target
        grad = any(getattr(h, "NEEDS_GRAD", False) for h in step_hooks)
        inner = sum(h.progress_units(inversion.steps) for h in step_hooks if hasattr(h, "progress_units"))
        progress = comfy_model.Progress(model, (inversion.steps + inner) * inversion.batch)
        finals, stores = [], []
        for i in range(inversion.batch):
            final, captured, _state = engine.edit_image(
                model, inversion, i, target, step_hooks, capture=CaptureSpec(),
                pin_source=source_branch == SOURCE_BRANCH[1], grad=grad, progress=progress.update,
                target_steps=target_steps)
            finals.append(final)
            stores.append(store_from_run(captured, (inversion.source_tokens, target_tokens), inversion.latent_hw,
                                         comfy_model.intermediate_device()))
        source = torch.stack([f[0] for f in finals])
        edited = torch.stack([f[1] for f in finals])
        return ({"samples": comfy_model.latent_to_raw(model, edited).to(comfy_model.intermediate_device())},
                {"samples": comfy_model.latent_to_raw(model, source).to(comfy_model.intermediate_device())},
                merge_stores(stores))


def _resolve_target(controllers, inversion, target):
    """The target CONDITIONING (explicit input or the one attention hooks define) and its tokens; checks agreement."""
    defined = [c for c in controllers if c.target_conditioning is not None]
    for ctrl in controllers:
        if ctrl.source_text is not None and ctrl.source_text.strip() != inversion.source_prompt.strip():
            raise AttnEditError(
                SAMPLER, f"the attention hook's source prompt {ctrl.source_text!r} differs from the prompt the "
                         f"inversion was made with ({inversion.source_prompt!r}); use the same source prompt in both.")
    texts = {c.target_text for c in defined}
    if len(texts) > 1:
        raise AttnEditError(SAMPLER, f"the attention hooks on this model disagree on the target prompt: {sorted(texts)}")
    if target is None:
        if not defined:
            raise AttnEditError(SAMPLER, "no target prompt: connect `target` (a CONDITIONING) or patch the model with "
                                         "an attention hook that defines one (e.g. Prompt-to-Prompt Attention Hook)")
        return defined[0].target_conditioning, defined[0].target_tokens
    tensor, _ = single_entry(target, "target")
    if defined:
        expected, _ = single_entry(defined[0].target_conditioning, "hook target")
        if expected.shape != tensor.shape or not torch.allclose(expected.to(tensor), tensor, atol=1e-4):
            raise AttnEditError(SAMPLER, f"`target` is not the attention hook's target prompt "
                                         f"{defined[0].target_text!r}; leave `target` unconnected or encode the same "
                                         "prompt with the same CLIP")
        return target, defined[0].target_tokens
    return target, None


def ddim_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Deterministic DDIM (eta = 0, Song et al. 2021 Eq. 12) as a k-diffusion sampler function."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        comfy_model.check_interrupt()
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = ddim_step(x, denoised, float(sigmas[i]), float(sigmas[i + 1]))
    return x


class AttnEditDDIMSampler:
    DESCRIPTION = ("Deterministic DDIM sampler (eta 0) for core SamplerCustom: with the sigmas and noise latent of "
                   "Invert Image (add_noise off) it regenerates the inverted image exactly as the edit sampler's "
                   "source branch does with DDIM inversion.")
    CATEGORY = CAT_SAMPLING
    FUNCTION = "get"
    RETURN_TYPES = ("SAMPLER",)
    RETURN_NAMES = ("sampler",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustom's sampler input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def get(self):
        import comfy.samplers

        return (comfy.samplers.KSAMPLER(ddim_sampler),)


NODES = {
    "AttnEditEditSampler": (AttnEditEditSampler, "Attention Edit Sampler"),
    "AttnEditDDIMSampler": (AttnEditDDIMSampler, "DDIM Sampler (Attention Edit)"),
}
