"""AttnEditDynamicPromptLearn: Dynamic Prompt Learning inversion (schema and plumbing only)."""

from __future__ import annotations

import logging

import torch

from ..attention import dpl as dpl_losses
from ..attention.layers import semantic_grid
from ..attention.store import AttentionStore, merge_stores, store_from_run
from ..attention.tokens import PromptError, split_words, tokenize_prompt, word_positions, word_token_ids
from ..inversion import comfy_model, dpl
from ..inversion.dpl_text import RowEncoder, load
from ..inversion.schedule import ddim_sigmas
from ..inversion.trajectory import InversionTrajectory
from ..masks.background import BACKGROUND_THRESHOLD, scoring_words
from ..masks.ops import as_mask_batch, aspect_mismatch, grid_to_image, mask_to_grid
from .common import AttnEditError, check_image_size, check_text_encoder, crop_to_multiple, warn, wrap_errors
from .inversion import _measure
from .types import ATTN_STORE, CAT_INVERSION, INVERSION

log = logging.getLogger("attention_edit")
NODE = "Dynamic Prompt Learning"


class AttnEditDynamicPromptLearn:
    DESCRIPTION = (
        "Dynamic Prompt Learning (Wang et al., NeurIPS 2023): inverts a real image like null-text inversion, and at "
        "every step also learns the token embeddings of the listed nouns so that each noun's cross-attention stays "
        "on its own object (not on the other objects, not on the background). Use it for photos with several "
        "objects where a Prompt-to-Prompt edit of one object leaks into another. Connect the inversion to Attention "
        "Edit Sampler (with the Prompt-to-Prompt Attention Hook as usual). Slower than null-text: up to "
        "token_iterations + null_text_iterations UNet forward+backward passes per step.")
    CATEGORY = CAT_INVERSION
    FUNCTION = "invert"
    RETURN_TYPES = (INVERSION, ATTN_STORE, "MASK", "LATENT", "FLOAT")
    RETURN_NAMES = ("inversion", "attention", "background", "reconstruction", "psnr")
    OUTPUT_TOOLTIPS = (
        "The inversion with the per-step learned noun tokens and null-text embeddings: connect to Attention Edit "
        "Sampler.",
        "Source cross-attention with the learned tokens (what the losses saw, averaged over steps), plus the 32x32 "
        "self-attention when the background was estimated. View it with Attention Heat Maps.",
        "The background mask used by the background-leakage loss (1 = background), at image size.",
        "What the source branch regenerates (decode it to judge the inversion).",
        "Reconstruction PSNR in dB of the decoded reconstruction vs the input (mean over the batch); -1 without VAE.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        weights = dpl_losses.Weights()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The SD1.x / SD2.x / SDXL model you will edit with (same checkpoint)."}),
                "clip": ("CLIP", {"tooltip": "Text encoder of the same checkpoint (the noun tokens are learned "
                                             "through it)."}),
                "source_prompt": ("STRING", {"multiline": True, "default": "a cat and a dog",
                                             "tooltip": "A caption of the input image naming its objects. Words you "
                                                        "will edit must appear in it."}),
                "nouns": ("STRING", {"default": "cat, dog",
                                     "tooltip": "Comma-separated words of the source prompt whose tokens are learned "
                                                "(the objects, e.g. \"cat, dog\"). Words of several tokens are "
                                                "learned as a whole."}),
                "steps": ("INT", {"default": 50, "min": 2, "max": 500,
                                  "tooltip": "DDIM steps of inversion and editing (50 in the paper). The "
                                             "threshold schedule is defined at 50 steps and scales to this count."}),
                "cfg": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Guidance scale used when editing; null-text optimises for it."}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The image to edit (needs `vae`). Sizes are cropped to multiples of 8."}),
                "vae": ("VAE", {"tooltip": "Encodes `image` and decodes the reconstruction for the PSNR."}),
                "latent": ("LATENT", {"tooltip": "Alternatively, an already encoded image (instead of `image`)."}),
                "background": ("MASK", {"tooltip": "Optional background mask (1 = background). Unconnected: "
                                                   "estimated from the inversion's self-attention (paper Sec. 3.3)."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": "",
                                               "tooltip": "Unconditional prompt (the null text). Keep empty for the "
                                                          "paper's setting."}),
                "token_iterations": ("INT", {"default": dpl.TOKEN_ITERATIONS, "min": 0, "max": 200,
                                             "tooltip": "Max token updates per step (21 in the official code, "
                                                        "DPL.sh); each step stops earlier once every loss is under "
                                                        "its threshold. 0 = plain null-text inversion."}),
                "null_text_iterations": ("INT", {"default": dpl.NULL_TEXT_ITERATIONS, "min": 1, "max": 100,
                                                 "tooltip": "Max null-text Adam iterations per step (early stop at "
                                                            "loss < 1e-5 + i*2e-5)."}),
                "learning_rate": ("FLOAT", {"default": dpl.TOKEN_LR, "min": 1e-5, "max": 1.0, "step": 1e-4,
                                            "tooltip": "AdamW learning rate of the noun tokens (1e-3 in the "
                                                       "official code: the torch default)."}),
                "lambda_attention": ("FLOAT", {"default": weights.at, "min": 0.0, "max": 10.0, "step": 0.01,
                                               "tooltip": "Weight of the attention balancing loss (each noun gets a "
                                                          "strong peak). 1.0 in the official code (DPL.sh)."}),
                "lambda_disjoint": ("FLOAT", {"default": weights.dj, "min": 0.0, "max": 10.0, "step": 0.01,
                                              "tooltip": "Weight of the disjoint loss (nouns' maps must not "
                                                         "overlap; needs two nouns). 0.05 in the official code."}),
                "lambda_background": ("FLOAT", {"default": weights.bg, "min": 0.0, "max": 10.0, "step": 0.01,
                                                "tooltip": "Weight of the background leakage loss (nouns must not "
                                                           "attend to the background). 0.05 in the official code."}),
                "background_threshold": ("FLOAT", {"default": BACKGROUND_THRESHOLD, "min": 0.0, "max": 1.0,
                                                   "step": 0.01,
                                                   "tooltip": "Background estimate: a self-attention segment is "
                                                              "background when no noun scores above this (0.2, paper "
                                                              "Sec. 3.3)."}),
                "learned_tokens_in_target": ("BOOLEAN", {
                    "default": True,
                    "tooltip": "When editing with this inversion, every noun that the target prompt keeps gets its "
                               "learned token at each step, as the official DPL edit does (so target = source "
                               "regenerates the reconstruction). Off: the target prompt is encoded plainly."}),
            },
        }

    def invert(self, model, clip, source_prompt, nouns, steps, cfg, image=None, vae=None, latent=None,
               background=None, negative_prompt="", token_iterations=dpl.TOKEN_ITERATIONS,
               null_text_iterations=dpl.NULL_TEXT_ITERATIONS, learning_rate=dpl.TOKEN_LR,
               lambda_attention=dpl_losses.LAMBDA_AT, lambda_disjoint=dpl_losses.LAMBDA_DJ,
               lambda_background=dpl_losses.LAMBDA_BG, background_threshold=BACKGROUND_THRESHOLD,
               learned_tokens_in_target=True):
        settings = dpl.DPLSettings(
            weights=dpl_losses.Weights(float(lambda_attention), float(lambda_disjoint), float(lambda_background)),
            token_iterations=int(token_iterations), learning_rate=float(learning_rate),
            null_text_iterations=int(null_text_iterations), background_threshold=float(background_threshold))
        return wrap_errors(NODE, self._invert, model, clip, source_prompt, nouns, steps, cfg, image, vae, latent,
                           background, negative_prompt, settings, bool(learned_tokens_in_target))

    def _invert(self, model, clip, source_prompt, nouns, steps, cfg, image, vae, latent, background, negative_prompt,
                settings, in_target=True):
        comfy_model.require_family(model, NODE)
        check_image_size(NODE, model, image, vae)
        samples, reference = _input_latent(image, vae, latent)
        tokens = tokenize_prompt(clip, source_prompt)
        words = split_words(nouns)
        if not words:
            raise AttnEditError(NODE, f"`nouns` {nouns!r} names no word; list the objects of the source prompt to "
                                      "learn, e.g. \"cat, dog\"")
        positions = word_positions(clip, tokens, words, "source prompt")
        masks = _background_masks(background, samples, settings.level)
        _warn_idle_knobs(words, settings, masks is not None)
        source = comfy_model.encode_text(clip, source_prompt)
        check_text_encoder(NODE, model, source, "`clip`")
        negative = comfy_model.encode_text(clip, negative_prompt)
        sigmas = ddim_sigmas(comfy_model.sigma_table(model), steps)
        steps = len(sigmas) - 1
        encoder = RowEncoder(clip, tokens, [p for w in words for p in positions[w]])
        scored = scoring_words(tokens.word_groups(), [positions[w] for w in words])
        load(clip)
        progress = comfy_model.Progress(model, samples.shape[0] * steps * (1 + settings.units_per_step()))
        results = [dpl.dpl_invert(model, encoder, source, negative, samples[i:i + 1], sigmas, cfg,
                                  [positions[w] for w in words], None if masks is None else masks[i], settings,
                                  progress.update, scored) for i in range(samples.shape[0])]
        for i, r in enumerate(results):
            _warn_degenerate(r.degenerate_estimate, i, len(results), settings)
        edit = {"clip": clip, "noun_ids": [word_token_ids(clip, w) for w in words],
                "noun_positions": [positions[w] for w in words]} if in_target else None
        return _package(model, vae, results, reference, sigmas, cfg, source, negative, source_prompt,
                        negative_prompt, tokens, words, settings, edit)


def _input_latent(image, vae, latent) -> tuple[torch.Tensor, torch.Tensor | None]:
    if image is not None and latent is not None:
        raise AttnEditError(NODE, "both `image` and `latent` are connected; connect only one of them")
    if image is not None:
        if vae is None:
            raise AttnEditError(NODE, "`image` needs a `vae` to be encoded; connect the checkpoint's VAE")
        image = crop_to_multiple(image, 8, NODE)
        return comfy_model.vae_encode(vae, image).float(), image
    if latent is not None:
        return latent["samples"].float(), None
    raise AttnEditError(NODE, "nothing to invert: connect `image` (with `vae`) or `latent`")


def _background_masks(mask, samples, level: int) -> torch.Tensor | None:
    """The `background` MASK as [B, H, W] (one per image), or None to estimate it."""
    if mask is None:
        return None
    masks = as_mask_batch(mask, samples.shape[0], "background")
    frame = (samples.shape[-2] * 8, samples.shape[-1] * 8)
    if aspect_mismatch(tuple(masks.shape[-2:]), frame):
        log.warning("%s: `background` is %dx%d, the image %dx%d; the mask is stretched to the image", NODE,
                    masks.shape[-1], masks.shape[-2], frame[1], frame[0])
    if float(masks.max()) <= 0:
        warn(NODE, "`background` is empty (no pixel is 1), so the background leakage loss is off; paint the "
                   "background white (1) or disconnect `background` to estimate it")
    grid = semantic_grid(tuple(samples.shape[-2:]), level)
    on_grid = mask_to_grid(masks, grid, binary=True).flatten(1)
    for i in range(on_grid.shape[0]):
        if bool(on_grid[i].all()):
            raise AttnEditError(NODE, f"`background` covers the whole image {i} (every cell of the {grid[0]}x{grid[1]} "
                                      "attention grid is at least half background), so the nouns would have nowhere "
                                      "to attend; 1 = background only: leave the objects unmasked, or disconnect "
                                      "`background` to estimate it")
    return masks


def _warn_idle_knobs(words, settings, mask_given: bool) -> None:
    """Say when a knob cannot act at these settings (instead of silently doing nothing)."""
    w = settings.weights
    if mask_given and settings.background_threshold != BACKGROUND_THRESHOLD:
        warn(NODE, f"background_threshold={settings.background_threshold:g} has no effect: a `background` MASK is "
                   "connected and used as is (the threshold only shapes the estimate); disconnect `background` to "
                   "estimate it")
    if settings.token_iterations > 0 and not (w.at or w.dj or w.bg):
        warn(NODE, f"token_iterations={settings.token_iterations} with lambda_attention, lambda_disjoint and "
                   "lambda_background all 0: there is nothing to optimise and the tokens stay as they are; raise a "
                   "lambda or set token_iterations to 0 (plain null-text inversion)")
    elif w.dj and len(words) < 2:
        warn(NODE, f"lambda_disjoint={w.dj:g} has no effect with one noun ({words[0]!r}): the disjoint loss needs two "
                   "nouns; list a second object of the source prompt in `nouns`, or set lambda_disjoint to 0")


def _warn_degenerate(issue: str, image: int, batch: int, settings) -> None:
    """Say that the background estimate of `image` was unusable and the background leakage loss is off."""
    if not issue:
        return
    which = f" of image {image}" if batch > 1 else ""
    th = settings.background_threshold
    if issue == "empty":
        warn(NODE, f"the estimated background{which} is empty: every self-attention segment scores above "
                   f"background_threshold={th:g} for some word of the source prompt, so the background leakage "
                   "loss is off; raise `background_threshold` or connect a `background` MASK")
    else:
        warn(NODE, f"the estimated background{which} covers the whole image: no word of the source prompt scores "
                   f"above background_threshold={th:g} on any self-attention segment, so the background leakage "
                   "loss is off (it would push every noun off the image); lower `background_threshold` or connect a "
                   "`background` MASK")


def _package(model, vae, results, reference, sigmas, cfg, source, negative, source_prompt, negative_prompt, tokens,
             words, settings, edit=None):
    device = comfy_model.intermediate_device()
    stack = lambda name: torch.stack([getattr(r, name).to(device) for r in results], 1)  # noqa: E731
    recon = torch.stack([r.reconstruction for r in results]).to(device)
    recon_raw = comfy_model.latent_to_raw(model, recon)
    psnrs, _ = _measure(vae, recon_raw, reference)
    extras = {"dpl": {"nouns": tuple(words), "settings": settings,
                      "token_iterations": [[s.iterations for s in r.logs] for r in results],
                      "losses": [[(s.first, s.last) for s in r.logs] for r in results],
                      "thresholds": [[(s.thresholds.at, s.thresholds.dj, s.thresholds.bg) for s in r.logs]
                                     for r in results],
                      "null_text_iterations": [r.null_text_iterations for r in results],
                      "rows": [{k: v.to(device) for k, v in r.rows.items()} for r in results],
                      "background": torch.stack([r.background for r in results]).to(device),
                      "estimated_background": [None if r.estimated_background is None else
                                               r.estimated_background.to(device) for r in results],
                      "edit": edit}}
    trajectory = InversionTrajectory(
        method="dpl", sigmas=sigmas, latents=stack("latents"), source=source, negative=negative,
        source_prompt=source_prompt, negative_prompt=negative_prompt, cfg=float(cfg),
        fingerprint=comfy_model.model_fingerprint(model), uncond=stack("uncond"), cond=stack("cond"),
        psnr=tuple(psnrs), source_tokens=tokens, extras=extras)
    log.info("Attention Edit: %s; token updates per step %s", trajectory.describe(),
             extras["dpl"]["token_iterations"])
    store = merge_stores([_store(r, tokens, trajectory.latent_hw, device, settings.level) for r in results])
    frame = (trajectory.latent_hw[0] * 8, trajectory.latent_hw[1] * 8)
    mask = torch.cat([grid_to_image(r.background[None, None], frame) for r in results]).to(device)
    mean_psnr = float(sum(psnrs) / len(psnrs)) if psnrs else -1.0
    return (trajectory, store, mask, {"samples": recon_raw}, mean_psnr)


def _store(result: dpl.DPLInversion, tokens, latent_hw, device, level: int) -> AttentionStore:
    """Store of one image: the DPL source maps (semantic level) and the inversion's self-attention if captured."""
    base = store_from_run(result.ddim_run, (tokens,), latent_hw, device)
    cross = {**base.cross, level: result.cross[None].to(device)}
    return AttentionStore(cross, ("source",), (tokens,), latent_hw, base.steps, base.self_maps)


def learned_target(node: str, inversion, target: list, target_tokens) -> torch.Tensor | None:
    """[S, B, T, E] per-step target context with DPL's learned tokens for every noun the target prompt keeps (as the
    official DPL edit), or None: not a DPL inversion, `learned_tokens_in_target` off, or no listed noun kept.

    target_tokens: the target prompt's tokens (from the attention hook); None when only a CONDITIONING is known,
    which is taken as the source prompt when it equals the inversion's source conditioning, else a warning.
    """
    edit = (inversion.extras.get("dpl") or {}).get("edit") if inversion.method == "dpl" else None
    if edit is None:
        return None
    if target_tokens is None:
        tensor, src = target[0][0], inversion.source[0][0]
        if tensor.shape == src.shape and torch.equal(tensor.to(src), src):
            target_tokens = inversion.source_tokens
        else:
            warn(node, "the DPL inversion's learned_tokens_in_target is on but the target is a CONDITIONING whose "
                       "prompt text is unknown, so the target prompt gets no learned tokens; give the target prompt "
                       "through an attention hook (e.g. Prompt-to-Prompt Attention Hook) or turn "
                       "learned_tokens_in_target off on the Dynamic Prompt Learning node")
            return None
    found = []
    for ids in edit["noun_ids"]:
        try:
            found.append(target_tokens.find(list(ids), "noun"))
        except PromptError:  # the target drops this noun (e.g. the swapped word): plain tokens there
            found.append([])
    sizes = [len(ids) for ids in edit["noun_ids"]]
    positions, index = dpl.target_row_map(edit["noun_positions"], found, sizes)
    if not positions:
        return None
    load(edit["clip"])
    device = comfy_model.intermediate_device()
    return torch.stack([dpl.target_contexts(edit["clip"], target_tokens, rows, positions, index).to(device)
                        for rows in inversion.extras["dpl"]["rows"]], 1)


NODES = {"AttnEditDynamicPromptLearn": (AttnEditDynamicPromptLearn, "Dynamic Prompt Learning (Attention Edit)")}
