"""AttnEditFusionWithAdapter (MaSaFusion, Alg. 1 / Alg. 5) and AttnEditEmbCtrl (Alg. 4, Eq. 12): schema and plumbing."""

from __future__ import annotations

import logging

import torch

from ..attention import embctrl, hooks
from ..attention import fusion as attn_fusion
from ..attention.tokens import tokenize_prompt
from ..inversion import comfy_model
from ..inversion import fusion as inv_fusion
from ..inversion.conditioning import single_entry
from ..masks.ops import as_mask_batch, aspect_mismatch, mask_to_grid
from .common import AttnEditError, check_inversion_model, warn, wrap_errors
from .types import CAT_TECHNIQUES, INVERSION

log = logging.getLogger("attention_edit")
FUSION = "MaSaFusion (Fusion with Adapter)"
EMBCTRL = "EmbCtrl (Embedding Control)"


class AttnEditFusionWithAdapter:
    DESCRIPTION = (
        "MaSaFusion (Li, Yi, Li): shape-changing edits of a real image inside a region you mark. With an adapter "
        "connected (a T2I-Adapter or ControlNet applied by core Apply ControlNet, e.g. a sketch or Canny edges of "
        "the wanted shape) an intermediate image is generated from fresh noise: it follows the adapter and the target "
        "prompt inside the mask and the source image outside it (Eq. 9). The edited image starts from the inverted "
        "noise outside the mask and the intermediate's noise inside; inside the mask it borrows the intermediate's "
        "self-attention map, outside it the source's self-attention (Eq. 10); the adapter reaches its passes too "
        "(Alg. 1 line 8; `adapter_on_target`). Without an adapter it runs the "
        "paper's adapter-free variant (App. C, Alg. 5). Use a direct inversion (fast) or null-text inversion.")
    CATEGORY = CAT_TECHNIQUES
    FUNCTION = "edit"
    RETURN_TYPES = ("LATENT", "LATENT", "LATENT")
    RETURN_NAMES = ("latent", "intermediate_latent", "source_latent")
    OUTPUT_TOOLTIPS = (
        "The edited image latent (VAE Decode it).",
        "The adapter-driven intermediate image whose self-attention shapes the edit (without an adapter there is no "
        "intermediate image and this repeats source_latent).",
        "What the source branch regenerated (should look like the input).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The checkpoint that made the inversion (unpatched: this node installs "
                                               "its own attention fusion on a copy)."}),
                "clip": ("CLIP", {"tooltip": "Text encoder of the same checkpoint (encodes the target prompt)."}),
                "inversion": (INVERSION, {"tooltip": "From Invert Image (method direct recommended; null_text works "
                                                     "too). Fixes schedule, guidance and the source noise."}),
                "target_prompt": ("STRING", {"multiline": True, "default": "a photo of a cat standing on a sofa",
                                             "tooltip": "The edited caption."}),
                "mask": ("MASK", {"tooltip": "Edit region A: white where the shape may change (any size; stretched "
                                             "to the image, a latent pixel is inside when >= 50% covered). Paint it "
                                             "in Load Image's mask editor or build it with mask nodes."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seed of the Gaussian noise x the intermediate image starts from (also "
                                            "the target's noise inside the mask). The result depends on it."}),
                "start_step": ("INT", {"default": 0, "min": 0, "max": 1000,
                                       "tooltip": "Self-attention fusion starts at this step of a 50-step schedule, "
                                                  "scaled to the inversion's steps (rounded up: 4 = step 1 of 10, 2 "
                                                  "of 20, 4 of 50). 0 = all steps, the paper's masked setting; "
                                                  "MasaCtrl uses 4."}),
                "layers": (list(attn_fusion.LAYERS), {"default": "all",
                                                      "tooltip": "Self-attention layers that fuse: all (paper) or "
                                                                 "decoder (MasaCtrl's up-block layers at the two "
                                                                 "finest resolutions)."}),
            },
            "optional": {
                "adapter": ("CONDITIONING", {"tooltip": "Output of core Apply ControlNet (Advanced) carrying a "
                                                        "T2I-Adapter (Load ControlNet Model; an SDXL adapter for "
                                                        "SDXL) and its hint image. "
                                                        "Only the adapter is used (the prompt comes from "
                                                        "target_prompt). Unconnected: adapter-free variant."}),
                "source_prompt": ("STRING", {"multiline": True, "default": "",
                                             "tooltip": "Empty = the inversion's source prompt. If given, it must "
                                                        "equal the Invert node's prompt."}),
                "adapter_on_target": ("BOOLEAN", {"default": True,
                                                  "tooltip": "Feed the adapter to the edited image's passes too "
                                                             "(paper: Alg. 1 line 8, Eq. 10 carry C^t2i). Off: only "
                                                             "the intermediate image sees it, so an empty mask "
                                                             "returns the source exactly."}),
            },
        }

    def edit(self, model, clip, inversion, target_prompt, mask, seed, start_step, layers, adapter=None,
             source_prompt="", adapter_on_target=True):
        return wrap_errors(FUSION, self._edit, model, clip, inversion, target_prompt, mask, seed, start_step, layers,
                           adapter, source_prompt, adapter_on_target)

    def _edit(self, model, clip, inversion, target_prompt, mask, seed, start_step, layers, adapter, source_prompt,
              adapter_on_target):
        comfy_model.require_family(model, FUSION)
        check_inversion_model(FUSION, inversion, model, comfy_model.model_fingerprint(model))
        if hooks.controllers_of(model) or hooks.step_hooks_of(model):
            raise AttnEditError(FUSION, "the connected MODEL is already patched by Attention Edit nodes (e.g. "
                                        "Prompt-to-Prompt Attention Hook); this node runs its own attention fusion. "
                                        "Connect the checkpoint's MODEL directly.")
        if source_prompt.strip() and source_prompt.strip() != inversion.source_prompt.strip():
            raise AttnEditError(FUSION, f"`source_prompt` {source_prompt!r} differs from the prompt the inversion was "
                                        f"made with ({inversion.source_prompt!r}); leave it empty or use the same text.")
        if layers not in attn_fusion.LAYERS:
            raise AttnEditError(FUSION, f"`layers` {layers!r} is unknown; choose one of {', '.join(attn_fusion.LAYERS)}")
        batch, (h, w) = inversion.batch, inversion.latent_hw
        regions = _regions(mask, batch, (h, w))
        control = _adapter_control(adapter)
        _check_adapter_family(control, comfy_model.model_family(model))
        target = comfy_model.encode_text(clip, target_prompt)
        sources = attn_fusion.ALG1_SOURCES if control is not None else attn_fusion.ALG5_SOURCES
        patched = hooks.add_controller(model, fusion_controller(sources, int(start_step), layers, inversion.steps))
        roles = {attn_fusion.T2I_BAR, attn_fusion.T2I}
        if adapter_on_target:
            roles |= {attn_fusion.TARGET_BAR, attn_fusion.TARGET}
        channels = inversion.latents.shape[2]
        noise = torch.randn((batch, channels, h, w), generator=torch.Generator().manual_seed(int(seed)))
        progress = comfy_model.Progress(model, inversion.steps * batch)
        targets, intermediates, sources_out = [], [], []
        for i in range(batch):
            final, layout, _ = inv_fusion.fuse_image(
                patched, inversion, i, target, regions[i:i + 1], noise[i] if control is not None else None,
                _control_for_image(control, i, batch), frozenset(roles), progress=progress.update)
            targets.append(final[layout.target_stream])
            sources_out.append(final[0])
            intermediates.append(final[layout.intermediate_stream] if layout.intermediate_stream is not None
                                 else final[0])
        device = comfy_model.intermediate_device()
        raw = lambda xs: {"samples": comfy_model.latent_to_raw(model, torch.stack(xs)).to(device)}  # noqa: E731
        return (raw(targets), raw(intermediates), raw(sources_out))


def fusion_controller(sources, start_step: int, layers: str, steps: int) -> attn_fusion.MaskedSelfAttentionFusion:
    """The node's controller: `start_step` (50-step schedule) scaled to the run; warns when it is past the end."""
    first = attn_fusion.scaled_start_step(start_step, steps)
    if first >= steps:
        warn(FUSION, f"`start_step` {start_step} is step {first} of this {steps}-step run, past its last step "
                     f"({steps - 1}): the self-attention fusion never runs and the edit is plain prompt-split "
                     f"sampling. Lower `start_step` below {attn_fusion.PAPER_STEPS} (0 = the paper's setting).")
    return attn_fusion.MaskedSelfAttentionFusion(sources, first, layers)


def _regions(mask, batch: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Edit region A per image on the latent grid, [B, 1, h, w] in {0, 1} (masks/ops.py alignment)."""
    masks = as_mask_batch(mask, batch, "mask")
    image_hw = (latent_hw[0] * 8, latent_hw[1] * 8)
    if aspect_mismatch(tuple(masks.shape[-2:]), image_hw):
        log.warning("%s: mask %dx%d has another aspect ratio than the image %dx%d; it is stretched", FUSION,
                    masks.shape[-1], masks.shape[-2], image_hw[1], image_hw[0])
    regions = mask_to_grid(masks, latent_hw, binary=True)
    if not bool(regions.any()):
        log.warning("%s: the mask covers no latent pixel (>= 50%% of 8x8 px); the edit returns the source image",
                    FUSION)
    return regions


def _adapter_control(adapter):
    """The ControlNet / T2I-Adapter object that Apply ControlNet attached to `adapter`, or None (unconnected, or a
    conditioning without one: Apply ControlNet at strength 0 passes the prompt through unchanged)."""
    if adapter is None:
        return None
    entry = single_entry(adapter, "adapter")
    control = entry[1].get("control")
    if control is None:
        log.warning("%s: `adapter` carries no T2I-Adapter/ControlNet (Apply ControlNet at strength 0, or a plain "
                    "prompt connected); running the adapter-free variant (Alg. 5). Connect Apply ControlNet's output "
                    "with an adapter from Load ControlNet Model to use one.", FUSION)
    return control


FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


def _check_adapter_family(control, family: str) -> None:
    """A T2I-Adapter made for another UNet family is an error (ComfyUI would add its features to the wrong layers,
    or to matching shapes with the wrong meaning: SD1.x adapters fit SDXL's input blocks shape for shape)."""
    while control is not None:
        net = getattr(control, "t2i_model", None)
        if net is not None:
            made_for_xl = bool(getattr(net, "xl", False))
            if made_for_xl != (family == "sdxl"):
                kind = "an SDXL" if made_for_xl else "an SD1.x/SD2.x"
                wanted, example = (("SDXL", "t2i-adapter-canny-sdxl-1.0") if family == "sdxl"
                                   else ("SD1.x/SD2.x", "t2iadapter_canny_sd15v2"))
                raise AttnEditError(FUSION, f"`adapter` carries {kind} T2I-Adapter but the MODEL is "
                                            f"{FAMILY_NAMES.get(family, family)}; load a T2I-Adapter made for "
                                            f"{wanted} in Load ControlNet Model (e.g. {example}).")
        control = getattr(control, "previous_controlnet", None)


def _control_for_image(control, index: int, batch: int):
    """The control for image `index`: a hint batch of one serves every image; a hint per image is split."""
    if control is None:
        return None
    hint = getattr(control, "cond_hint_original", None)
    if hint is None or hint.shape[0] == 1:
        return control
    if hint.shape[0] != batch:
        raise AttnEditError(FUSION, f"the adapter's hint image batch is {hint.shape[0]} for {batch} image(s); connect "
                                    "one hint, or one per image")
    single = control.copy()
    single.set_cond_hint(hint[index:index + 1], control.strength, control.timestep_percent_range)
    if getattr(control, "previous_controlnet", None) is not None:
        single.set_previous_controlnet(control.previous_controlnet)
    return single


class AttnEditEmbCtrl:
    DESCRIPTION = (
        "EmbCtrl (MaSaFusion paper, App. B, Eq. 12): a target prompt CONDITIONING that keeps the source prompt's "
        "token embeddings everywhere except at the changed words. CLIP is causal, so editing 'brown' to 'pink' in "
        "'a woman with brown hair' normally changes the embedding of every later token ('hair', end of text, "
        "padding) and with it unrelated details such as the face; EmbCtrl keeps them. For colour, material or "
        "background edits that keep shapes. Connect to Attention Edit Sampler's `target` on a MODEL without a "
        "Prompt-to-Prompt or CPAM hook (those hooks carry their own target prompt and the sampler accepts only that "
        "one), or to any sampler's positive input.")
    CATEGORY = CAT_TECHNIQUES
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING", "STRING")
    RETURN_NAMES = ("target", "changed_tokens")
    OUTPUT_TOOLTIPS = ("Target CONDITIONING: source embeddings except at the changed tokens.",
                       "The target tokens that take the target prompt's embedding (to check the edit).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("CLIP", {"tooltip": "Text encoder of the checkpoint you sample with."}),
                "source_prompt": ("STRING", {"multiline": True, "default": "a woman with brown hair",
                                             "tooltip": "The caption of the source image (the Invert node's prompt)."}),
                "target_prompt": ("STRING", {"multiline": True, "default": "a woman with pink hair",
                                             "tooltip": "The source caption with the words to change replaced."}),
                "alignment": (list(embctrl.ALIGNMENTS), {"default": embctrl.ALIGNMENTS[0],
                                                         "tooltip": "align tokens: words of another token length "
                                                                    "are aligned so the text after them still keeps "
                                                                    "the source embeddings. same token count only: "
                                                                    "Eq. 12 literally, other lengths are an error."}),
            },
            "optional": {
                "pooled": (list(embctrl.POOLED), {"default": embctrl.POOLED[0],
                                                  "tooltip": "SDXL only (SD1.x/SD2.x UNets do not read it): the "
                                                             "pooled text vector, a global input made from the "
                                                             "end-of-text token. source: the source prompt's, as "
                                                             "Eq. 12 keeps the source's end-of-text embedding "
                                                             "(the change stays at the changed words). target: the "
                                                             "target prompt's (a stronger, more global edit)."}),
            },
        }

    def encode(self, clip, source_prompt, target_prompt, alignment, pooled=embctrl.POOLED[0]):
        return wrap_errors(EMBCTRL, self._encode, clip, source_prompt, target_prompt, alignment, pooled)

    def _encode(self, clip, source_prompt, target_prompt, alignment, pooled):
        if pooled not in embctrl.POOLED:
            raise AttnEditError(EMBCTRL, f"`pooled` {pooled!r} is unknown; choose {' or '.join(embctrl.POOLED)}")
        src_tok, tgt_tok = tokenize_prompt(clip, source_prompt), tokenize_prompt(clip, target_prompt)
        index = embctrl.source_index(src_tok, tgt_tok, alignment)
        src, src_options = single_entry(comfy_model.encode_text(clip, source_prompt), "source_prompt")
        tgt, options = single_entry(comfy_model.encode_text(clip, target_prompt), "target_prompt")
        embedding = embctrl.control_embedding(src, tgt, index)
        options = embctrl.control_options(src_options, options, pooled)
        changed = embctrl.describe(tgt_tok, index)
        log.info("%s: target tokens from the target prompt: %s", EMBCTRL, changed)
        return ([[embedding, options]], changed)


NODES = {
    "AttnEditFusionWithAdapter": (AttnEditFusionWithAdapter, "MaSaFusion: Fusion with Adapter (Attention Edit)"),
    "AttnEditEmbCtrl": (AttnEditEmbCtrl, "EmbCtrl: Embedding Control (Attention Edit)"),
}
