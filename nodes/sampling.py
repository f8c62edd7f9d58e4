"""AttnEditEditSampler (two-branch editing from an inversion) and AttnEditDDIMSampler (SAMPLER for SamplerCustom)."""

from __future__ import annotations

import torch

from ..attention import hooks, p2p
from ..attention.run import CaptureSpec
from ..attention.store import merge_stores, store_from_run
from ..inversion import comfy_model, engine
from ..inversion.conditioning import single_entry
from ..inversion.ddim import ddim_step
from .common import AttnEditError, check_bound_inversions, check_inversion_model, check_text_encoder, warn, wrap_errors
from .dpl import learned_target
from .types import ATTN_STORE, CAT_SAMPLING, INVERSION

SAMPLER = "Attention Edit Sampler"
SOURCE_BRANCH = ("reconstruct", "pin to inversion")


class AttnEditEditSampler:
    DESCRIPTION = (
        "Edits the inverted image: runs the source branch (regenerating the input) and the target branch (the edit) "
        "in lock-step with DDIM (Flux: the inversion's flow solver) on the inversion's schedule and guidance, while "
        "the attention hooks on the MODEL "
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
                                                                   "source, any method). A CPAM patch on the model "
                                                                   "always pins (its keys/values come from the "
                                                                   "inversion latents)."}),
            },
        }

    def sample(self, model, inversion, target=None, source_branch="reconstruct"):
        return wrap_errors(SAMPLER, self._sample, model, inversion, target, source_branch)

    def _sample(self, model, inversion, target, source_branch):
        comfy_model.require_family(model, SAMPLER, comfy_model.INVERTIBLE_FAMILIES)
        controllers = hooks.controllers_of(model)
        pin = _pin_source(controllers, source_branch)
        check_inversion_model(SAMPLER, inversion, model, comfy_model.model_fingerprint(model), source_pinned=pin)
        check_bound_inversions(SAMPLER, model, inversion)
        step_hooks = hooks.step_hooks_of(model)
        if target is not None:
            check_text_encoder(SAMPLER, model, target, "`target`")
        for ctrl in controllers:
            if ctrl.target_conditioning is not None:
                check_text_encoder(SAMPLER, model, ctrl.target_conditioning, "the attention hook's target prompt")
        target, target_tokens = _resolve_target(controllers, inversion, target)
        for sentence in knobs_without_effect(controllers, step_hooks, inversion.steps):
            warn(SAMPLER, sentence)
        target_steps = learned_target(SAMPLER, inversion, target, target_tokens)  # DPL: learned tokens kept in target
        grad = any(getattr(h, "NEEDS_GRAD", False) for h in step_hooks)
        inner = sum(h.progress_units(inversion.steps) for h in step_hooks if hasattr(h, "progress_units"))
        progress = comfy_model.Progress(model, (inversion.steps + inner) * inversion.batch)
        finals, stores = [], []
        level = comfy_model.semantic_level(model)
        capture = CaptureSpec(cross_levels=frozenset({level}))
        for i in range(inversion.batch):
            final, captured, _state = engine.edit_image(
                model, inversion, i, target, step_hooks, capture=capture,
                pin_source=pin, grad=grad, progress=progress.update, target_steps=target_steps)
            finals.append(final)
            stores.append(store_from_run(captured, (inversion.source_tokens, target_tokens), inversion.latent_hw,
                                         comfy_model.intermediate_device(), semantic_level=level))
        source = torch.stack([f[0] for f in finals])
        edited = torch.stack([f[1] for f in finals])
        return ({"samples": comfy_model.latent_to_raw(model, edited).to(comfy_model.intermediate_device())},
                {"samples": comfy_model.latent_to_raw(model, source).to(comfy_model.intermediate_device())},
                merge_stores(stores))


def _pin_source(controllers, source_branch: str) -> bool:
    """Whether the source rows are pinned to the inversion latents: `source_branch`, or forced (with a warning) by a
    controller that reads the inversion's own latents there (CPAM, Alg. 1 l.3)."""
    pin = source_branch == SOURCE_BRANCH[1]
    pinning = sorted({type(c).__name__ for c in controllers if c.PINS_SOURCE})
    if pinning and not pin:
        warn(SAMPLER, f"`source_branch` {source_branch!r} cannot take effect with {', '.join(pinning)} on the model: "
                      "its source keys/values must come from the inversion latents z_i themselves (CPAM Alg. 1 l.3), "
                      f"so the source branch is pinned to the inversion. Set `source_branch` to {SOURCE_BRANCH[1]!r} "
                      "to silence this.")
    return pin or bool(pinning)


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


def knobs_without_effect(controllers, step_hooks, steps: int) -> list[str]:
    """One sentence per Prompt-to-Prompt / local blend setting that cannot take effect in a run of `steps` steps
    (a window that rounds to zero steps, a start past the last step), naming the knob, its value and the fix.

    The windows are P2P's own step rounding (p2p.window_steps, p2p.self_window_steps; LocalBlend starts at
    int(start * S)); a knob set to exactly 0 is "off" on purpose and is not reported."""
    sentences = []
    for ctrl in controllers:
        if not isinstance(ctrl, p2p.PromptToPrompt):
            continue
        windows = [(float(a), float(b)) for a, b in ctrl.cross_windows.tolist()]
        empty = sorted({b for a, b in windows if b > a and _span(p2p.window_steps((a, b), steps)) == 0})
        for end in empty:
            sentences.append(
                f"the cross-attention window {end:g} (`cross_replace` or a `cross_replace_words` value) covers 0 of "
                f"the {steps} steps (int({end:g} x {steps + 1}) = 0), so that attention is never replaced; raise it "
                f"to at least {_at_least(1, steps + 1)} or set it to 0 to turn it off on purpose.")
        if ctrl.equalizer is not None:
            scaled = [i for i, c in enumerate(ctrl.equalizer.tolist()) if c != 1.0]
            if scaled and all(_span(p2p.window_steps(windows[i], steps)) == 0 for i in scaled):
                sentences.append(
                    f"`reweight` is applied inside the cross-attention window only, and the re-weighted words' window "
                    f"({', '.join(sorted({f'{windows[i][1]:g}' for i in scaled}))}) covers 0 of the {steps} steps: "
                    f"the re-weighting never applies; raise `cross_replace` (or the word's `cross_replace_words` "
                    f"value) to at least {_at_least(1, steps + 1)}.")
        start, end = ctrl.self_window
        if end > start and _span(p2p.self_window_steps(ctrl.self_window, steps)) == 0:
            sentences.append(
                f"`self_replace` {end:g} covers 0 of the {steps} steps (int({steps} x {end:g}) = 0), so no "
                f"self-attention is injected; raise it to at least {_at_least(1, steps)} or set it to 0 to turn it "
                "off on purpose.")
    for hook in step_hooks:
        if isinstance(hook, p2p.LocalBlend) and int(hook.start * steps) >= steps:
            sentences.append(
                f"local blend's `blend_start` {hook.start:g} starts at step {int(hook.start * steps)} of a "
                f"{steps}-step run (steps 0 to {steps - 1}), so local blend never runs; lower `blend_start` below "
                "1.0 (the paper: 0.2).")
    return sentences


def _span(window: tuple[int, int]) -> int:
    return max(window[1] - window[0], 0)


def _at_least(steps_needed: int, per: int) -> str:
    """The smallest fraction f with int(f * per) >= steps_needed, rounded up to 3 decimals (a value a widget takes)."""
    return f"{-(-steps_needed * 1000 // per) / 1000:g}"


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
