"""Bad and edge inputs end in a clear error (naming the input, the value, what was expected, what to connect) or a
correct result that is asserted; and no run leaks into the next one (issue 11: bad input and isolation).

Issue bullet -> tests (here unless a module is named; the technique modules keep their own input tables too):
- a word not in its prompt:
    test_prompt_errors_name_the_word_and_the_fix (local blend, reweight, per-word windows), test_preview_word_missing;
    test_mag_integration::test_bad_inputs_are_clear_errors, test_dpl::test_bad_inputs_are_clear_errors,
    test_cpam_integration::test_bad_inputs_give_clear_errors, test_masks::test_node_errors_are_actionable.
- source and target prompts that cannot be aligned for replace:
    test_prompt_errors_name_the_word_and_the_fix (word counts; mode 'refine' is the fix);
    test_embctrl::test_other_token_count_is_rejected_in_strict_mode.
- empty prompt; prompts over 77 tokens:
    test_prompt_errors_name_the_word_and_the_fix (pairs that cannot work), test_empty_and_long_prompts_invert_and_edit
    (both invert and edit exactly); test_embctrl::test_long_prompts_are_rejected,
    test_dpl::test_a_target_prompt_longer_than_one_chunk_works_with_learned_tokens.
- a MASK of another size or batch than the image; empty and full masks; for every node with a MASK input: MAG-Edit
  `mask`, CPAM `source_mask`, MaSaFusion `mask`, DPL `background`, SAM `mask_hint` (Attention Edit Sampler and the
  local blend take no MASK):
    test_mask_of_another_size_is_stretched_by_area_coverage, test_mask_batch_or_pixels_that_cannot_work_are_errors,
    test_empty_mask, test_full_mask;
    test_cpam_integration::test_a_mask_of_another_size_or_aspect_is_aligned_and_logged,
    test_fusion::test_empty_region_returns_the_source_reconstruction,
    test_masks::test_mask_batches_broadcast_and_mismatches_are_clear.
- an IMAGE batch of 3: test_image_batch_of_three; test_masks::test_node_errors_are_actionable (3 pictures, 1 mask).
- sizes not multiples of 64 (and of 8): test_sizes_not_multiple_of_64_or_8_work, test_invert_input_errors (4x4 px);
    test_instdiffedit::test_sizes_that_are_not_multiples_of_64_work.
- an inversion made with other steps or another model than the one used for editing:
    test_sampler_wiring_errors (another model), test_patch_made_for_another_inversion_is_refused (MAG-Edit and CPAM
    patched for one inversion, sampled with one of other steps, batch or size);
    test_mag_integration::test_bad_inputs_are_clear_errors (guidance / blend steps beyond the inversion's).
- cfg = 1 (one uncond-free chunk) and cond / uncond in separate calls (low-VRAM path), for the techniques:
    test_cfg_one_runs_cond_only (MAG-Edit, CPAM, MaSaFusion, DPL, InstDiffEdit),
    test_cond_and_uncond_in_separate_calls_match_batched (MAG-Edit, CPAM, DPL, InstDiffEdit);
    core: test_edit_integration::test_cfg_one_single_chunk_layout,
    test_edit_integration::test_cond_and_uncond_in_separate_calls_match_batched;
    test_cpam_integration::test_cfg_one_ddim_uses_the_negative_prompt_as_null,
    test_fusion::test_cond_and_uncond_in_separate_calls_match_batched.
- an SDXL- or Flux-shaped model given to a node that supports only SD1.x: every node that takes a MODEL supports
  SD1.x, SD2.x and SDXL (test_families), so the unsupported case is a Flux/SD3-shaped model:
    test_unsupported_model_family_is_named (all 8 MODEL-taking nodes).
- fp16 model weights: test_fp16_model_weights.
- interrupt in the middle of the null-text / MAG-Edit / DPL loops (and CPAM, InstDiffEdit), next run clean:
    test_interrupted_null_text_leaves_the_next_run_clean,
    test_interrupt_mid_run_then_the_next_run_equals_a_fresh_run (DPL token loop, CPAM, InstDiffEdit);
    test_mag_integration::test_interrupt_mid_optimisation_leaves_the_next_run_clean.
- the same node run twice in one prompt; two different edits queued back to back (ComfyUI's executor, headless):
    test_same_nodes_twice_in_one_prompt_equal_each_alone, test_two_edits_queued_back_to_back_equal_each_alone.
- (also) another pack's attention patch on the MODEL: test_foreign_attention_patch_is_left_alone.
Issue 18 bad input (tests/test_input_checks.py, tests/test_step_windows.py):
- an image / latent below the model's minimum (one latent cell per UNet level; SD1.x and SDXL):
    test_input_checks::test_image_below_the_model_minimum_is_refused_by_size (Invert, DPL, InstDiffEdit),
    test_input_checks::test_latent_below_the_model_minimum_is_refused,
    test_input_checks::test_smallest_allowed_image_works_and_the_next_run_is_unaffected;
  torch's own ValueErrors are internal failures, not input checks:
    test_input_checks::test_torch_value_errors_are_not_presented_as_input_checks,
    test_input_checks::test_a_torch_value_error_inside_a_node_names_what_was_running.
- a CLIP of another family: test_input_checks::test_a_clip_of_another_family_is_refused_at_every_node,
    test_input_checks::test_after_a_refused_clip_the_next_run_is_unaffected.
- an inversion reused with a weight-patched MODEL: test_input_checks::test_inversion_reused_with_a_weight_patched_model_warns.
- knobs that cannot take effect: test_step_windows::test_knobs_that_cannot_take_effect_warn,
    test_step_windows::test_knobs_set_to_zero_on_purpose_are_not_reported,
    test_step_windows::test_mask_knobs_of_another_mode_warn.
Isolation:
- no module-level assignment into comfy.* / torch.*:
    test_packaging::test_no_module_level_assignment_into_comfy_or_torch.
- the input MODEL's patches and options unchanged after every patching node (Attention Hook, MAG-Edit, CPAM, DPL,
  EmbCtrl, MaSaFusion, InstDiffEdit; the CLIP too): test_patch_nodes_leave_the_input_model_untouched.
- after any run (edits, a rejected run, an interrupted MAG-Edit run, a DPL run failing mid-loop) a plain KSampler on
  the original MODEL equals a fresh process bit for bit: test_plain_ksampler_after_our_runs_matches_a_fresh_process.
- no network access at run time: test_no_network_access_at_run_time, test_weights_and_network_static_rules.
- weights only through safetensors or torch.load(weights_only=True): test_weights_and_network_static_rules;
    test_packaging::test_package_code_logs_instead_of_printing_and_loads_weights_safely,
    test_sam::test_unsafe_or_foreign_files_are_refused.
"""

import ast
import copy
import glob
import os
import re
import socket
import subprocess
import sys
import types

import pytest
import torch
from conftest import HOST, call_node, make_image, make_latent, pkg

SRC = "a photo of a cat"
LONG = " ".join(["a photo of a cat on a sofa"] * 12)  # > 75 tokens
YELLOW = "a photo of a yellow cat"
DOG = "a photo of a dog"
PAIR = "a cat and a dog"  # DPL's source prompt: two nouns
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_of(node_id, **inputs):
    with pytest.raises(ValueError) as info:
        call_node(node_id, **inputs)
    message = str(info.value)
    assert message.startswith("[Attention Edit] "), message
    assert "\n" not in message.strip(), message
    return message


@pytest.fixture(scope="module")
def inv(tiny):
    return call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct", steps=4,
                     cfg=7.5, latent=make_latent(seed=8))[0]


def hook(tiny, target, **kw):
    args = dict(model=kw.pop("model", tiny.model), clip=tiny.clip, source_prompt=kw.pop("source", SRC),
                target_prompt=target, mode=kw.pop("mode", "replace"), cross_replace=0.8,
                self_replace=kw.pop("self_replace", 0.4))
    return call_node("AttnEditAttentionHook", **args, **kw)


# ----------------------------------------------------------------------------------------------- words and prompts
@pytest.mark.parametrize("kwargs, pattern", [
    (dict(target="a photo of a dog", local_blend="horse"),
     r"local blend word 'horse' is in neither prompt \(source: a, photo, of, a, cat; target: a, photo, of, a, dog\)"),
    (dict(target="a photo of a dog", reweight="horse=2"),
     r"the word 'horse' is not in the target prompt 'a photo of a dog'; its tokens are: a, photo, of, a, dog"),
    (dict(target="a photo of a dog", cross_replace_words="cat=0.3"),
     r"the word 'cat' is not in the target prompt"),
    (dict(target="a photo of a big dog"), r"same number of words: source 'a photo of a cat' has 5, target .* has 6. "
                                          r"Use edit mode 'refine'"),
    (dict(target="a cat", source=""), r"same number of words: source '' has 0"),
    (dict(target=LONG, mode="refine"), r"target prompt .* is longer than 75 tokens"),
    (dict(target=LONG, source=LONG, mode="replace"), r"source prompt .* is longer than 75 tokens"),
    (dict(target="a photo of a dog", mode="reweight", reweight="dog=2"), r"mode 'reweight' keeps the prompt"),
    (dict(target=SRC, mode="reweight"), r"mode 'reweight' needs words to re-weight"),
    (dict(target="a photo of a dog", reweight="dog:2"), r"`reweight` item 'dog:2' is not of the form word=number"),
    (dict(target="a photo of a dog", mode="swap"), r"`mode` 'swap' is unknown; choose one of replace, refine, reweight"),
])
def test_prompt_errors_name_the_word_and_the_fix(tiny, kwargs, pattern):
    message = error_of("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip,
                       source_prompt=kwargs.pop("source", SRC), target_prompt=kwargs.pop("target"),
                       mode=kwargs.pop("mode", "replace"), cross_replace=0.8, self_replace=0.4, **kwargs)
    assert re.search(pattern, message), message


def test_empty_and_long_prompts_invert_and_edit(tiny):
    for prompt in ("", LONG):
        inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=prompt, method="ddim",
                        steps=3, cfg=7.5, latent=make_latent(seed=9))[0]
        target = pkg("inversion.comfy_model").encode_text(tiny.clip, prompt)
        edited, source, _ = call_node("AttnEditEditSampler", model=tiny.model, inversion=inv, target=target)
        assert torch.equal(edited["samples"], source["samples"])  # same prompt, no controller: identical branches


def test_preview_word_missing(tiny, inv):
    model, _ = hook(tiny, "a photo of a dog")
    _, _, store = call_node("AttnEditEditSampler", model=model, inversion=inv)
    message = error_of("AttnEditAttentionPreview", attention=store, image=make_image(128), branch="target",
                       words="horse")
    assert "'horse' is not in the target prompt 'a photo of a dog'; its words are: a, photo, of, a, dog" in message


# ----------------------------------------------------------------------------------------------- images, latents
@pytest.mark.parametrize("inputs, pattern", [
    ({}, r"nothing to invert: connect `image` \(with `vae`\) or `latent`"),
    ({"image": "img"}, r"`image` needs a `vae` to be encoded; connect the checkpoint's VAE"),
    ({"image": "img", "vae": "vae", "latent": "lat"}, r"both `image` and `latent` are connected"),
    ({"latent": "lat", "method": "euler"}, r"`method` 'euler' is unknown; choose one of ddim, null_text"),
    ({"image": "tiny_img", "vae": "vae"}, r"`image` is 4x4 px; at least 8x8 px is needed"),
])
def test_invert_input_errors(tiny, inputs, pattern):
    values = {"img": make_image(64), "vae": tiny.vae, "lat": make_latent(), "tiny_img": make_image(4)}
    args = {k: values.get(v, v) for k, v in inputs.items()}
    args.setdefault("method", "ddim")
    message = error_of("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, steps=3, cfg=7.5,
                       **args)
    assert re.search(pattern, message), message


@pytest.mark.parametrize("size", [(72, 88), (130, 127)])
def test_sizes_not_multiple_of_64_or_8_work(tiny, size):
    image = make_image(max(size))[:, : size[0], : size[1]]
    inv, noise, _, recon, psnr, store = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip,
                                                  source_prompt=SRC, method="ddim", steps=3, cfg=1.0, image=image,
                                                  vae=tiny.vae)
    h, w = size[0] // 8, size[1] // 8
    assert noise["samples"].shape[-2:] == (h, w) and recon["samples"].shape[-2:] == (h, w)
    model, _ = hook(tiny, "a photo of a dog", local_blend="cat, dog")
    edited, _, _ = call_node("AttnEditEditSampler", model=model, inversion=inv)
    assert edited["samples"].shape[-2:] == (h, w) and torch.isfinite(edited["samples"]).all()
    assert psnr > 0


def test_image_batch_of_three(tiny):
    inv, noise, *_ = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                               steps=3, cfg=7.5, image=make_image(64, batch=3), vae=tiny.vae)
    assert inv.batch == 3 and noise["samples"].shape[0] == 3 and len(inv.psnr) == 3
    edited, source, store = call_node("AttnEditEditSampler", model=hook(tiny, "a photo of a dog")[0], inversion=inv)
    assert edited["samples"].shape[0] == 3 and store.rows == 6


# ----------------------------------------------------------------------------------------------- sampler wiring
def test_sampler_wiring_errors(tiny, inv):
    other = pkg("inversion.trajectory").InversionTrajectory(**{**inv.__dict__, "fingerprint": ("SDXL", "sdxl", "", 1)})
    dog = pkg("inversion.comfy_model").encode_text(tiny.clip, "a photo of a dog")
    bird = pkg("inversion.comfy_model").encode_text(tiny.clip, "a photo of a bird")
    cases = [
        (dict(model=tiny.model, inversion=other, target=dog), r"`inversion` was made with another model"),
        (dict(model=tiny.model, inversion=inv), r"no target prompt: connect `target`"),
        (dict(model=hook(tiny, "a dog", source="a cat")[0], inversion=inv),
         r"the attention hook's source prompt 'a cat' differs from the prompt the inversion was made with"),
        (dict(model=hook(tiny, "a photo of a dog")[0], inversion=inv, target=bird),
         r"`target` is not the attention hook's target prompt 'a photo of a dog'"),
        (dict(model=tiny.model, inversion=inv, target=dog + bird), r"`target` has 2 entries"),
        (dict(model=tiny.model, inversion=inv, target=[]), r"`target` is empty"),
    ]
    for inputs, pattern in cases:
        message = error_of("AttnEditEditSampler", **inputs)
        assert re.search(pattern, message), message


@pytest.fixture(scope="module")
def refine(tiny):
    """Prompt-to-Prompt refine hook with a new word ('yellow'): the MODEL MAG-Edit Guidance expects."""
    return hook(tiny, YELLOW, mode="refine", self_replace=0.5)[0]


def box(size=128, top=32, left=40, height=64, width=64, batch=1):
    mask = torch.zeros(batch, size, size)
    mask[:, top:top + height, left:left + width] = 1.0
    return mask


def mag(model, inversion, mask=None, **kw):
    args = dict(mask=box() if mask is None else mask, target_words="yellow", constraint="token_ratio",
                max_iterations=1, guidance_steps=1, scale=2.5, blend_steps=1)
    args.update(kw)
    return call_node("AttnEditMAGGuidance", model=model, inversion=inversion, **args)[0]


def cpam(tiny, inversion, mask=None, strategy="replace object", target=DOG, model=None, **kw):
    return call_node("AttnEditCPAMSelfAttn", model=model or tiny.model, inversion=inversion, clip=tiny.clip,
                     source_mask=box() if mask is None else mask, target_prompt=target, strategy=strategy, **kw)[0]


def sample(model, inversion, **kw):
    edited, source, _ = call_node("AttnEditEditSampler", model=model, inversion=inversion, **kw)
    return edited["samples"], source["samples"]


@pytest.fixture(scope="module")
def other_inversions(tiny):
    """DDIM inversions of the same model that differ from `inv` in steps, batch or size."""
    args = dict(model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="ddim", steps=4, cfg=7.5,
                latent=make_latent(seed=8))
    changes = {"steps": dict(steps=2), "batch": dict(latent=make_latent(seed=8, batch=2)),
               "size": dict(latent=make_latent(size=24, seed=8))}
    return {name: call_node("AttnEditInvert", **{**args, **change})[0] for name, change in changes.items()}


@pytest.mark.parametrize("node", ["MAG-Edit Guidance", "CPAM Self-Attention"])
@pytest.mark.parametrize("other", ["steps", "batch", "size"])
def test_patch_made_for_another_inversion_is_refused(tiny, inv, refine, other_inversions, node, other):
    """MAG-Edit and CPAM align masks and schedules to the inversion they are given; the sampler must get that one
    (unchecked, another batch was an IndexError and another number of steps a silently clamped CPAM schedule)."""
    second = other_inversions[other]
    model = mag(refine, inv) if node.startswith("MAG") else cpam(tiny, inv)
    message = error_of("AttnEditEditSampler", model=model, inversion=second)
    assert f"`inversion` is not the one {node} was given (direct inversion, 4 steps" in message, message
    assert f"this node got a ddim inversion, {second.steps} steps, cfg 7.5, {second.batch} image(s) of latent " \
           f"{second.latent_hw[0]}x{second.latent_hw[1]}" in message and "Connect the same Invert" in message


# ----------------------------------------------------------------------------------------------- model families
class Flux:  # a config class of a model family this pack does not handle (Flux, SD3, ...)
    pass


FLUX_INPUTS = {
    "AttnEditInvert": dict(source_prompt=SRC, method="ddim", steps=3, cfg=7.5),
    "AttnEditAttentionHook": dict(source_prompt=SRC, target_prompt=SRC, mode="replace", cross_replace=0.8,
                                  self_replace=0.4),
    "AttnEditEditSampler": dict(),
    "AttnEditMAGGuidance": dict(mask=box(), target_words="yellow", constraint="token_ratio", max_iterations=1,
                                guidance_steps=1, scale=2.5),
    "AttnEditCPAMSelfAttn": dict(source_mask=box(), target_prompt=DOG, strategy="replace object"),
    "AttnEditFusionWithAdapter": dict(target_prompt=DOG, mask=box(), seed=0, start_step=0, layers="all"),
    "AttnEditDynamicPromptLearn": dict(source_prompt=PAIR, nouns="cat, dog", steps=3, cfg=7.5),
    "AttnEditInstantEdit": dict(edit_text=DOG),
}


class AuraFlow:  # a config class of a non-UNet family no node of this pack handles (SD3 is handled since sd3)
    pass


# the nodes that also take Flux and SD3 (tests/test_flux.py, tests/test_flux_attention.py, tests/test_sd3.py)
FLUX_NODES = ("AttnEditAttentionHook", "AttnEditCPAMSelfAttn", "AttnEditInvert", "AttnEditEditSampler")


def _family_inputs(tiny, inv, node_id):
    import nodes

    wanted = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    available = {"clip": tiny.clip, "vae": tiny.vae, "inversion": inv, "latent": make_latent(),
                 "image": make_image(64)}
    inputs = {k: v for k, v in available.items() if k in wanted["required"]}
    if "image" not in inputs and "latent" in wanted.get("optional", {}):
        inputs["latent"] = available["latent"]
    return {**inputs, **FLUX_INPUTS[node_id]}


@pytest.mark.parametrize("node_id", sorted(FLUX_INPUTS))
def test_unsupported_model_family_is_named(tiny, inv, node_id):
    """A config class the pack does not know (named Flux, or AuraFlow for the nodes that take the real Flux and SD3)."""
    config = AuraFlow() if node_id in FLUX_NODES else Flux()
    fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=config, diffusion_model=torch.nn.Linear(1, 1)))
    message = error_of(node_id, model=fake, **_family_inputs(tiny, inv, node_id))
    if node_id in FLUX_NODES:
        assert ("supports SD1.x, SD2.x, SDXL UNet models and Flux, SD3 / SD3.5 (ComfyUI 0.3.x); the connected MODEL "
                "is AuraFlow") in message, message
    else:
        assert "supports SD1.x, SD2.x, SDXL UNet models; the connected MODEL is Flux" in message, message


@pytest.mark.newer_host("Flux exists only in ComfyUI 0.3.x")
@pytest.mark.parametrize("node_id", sorted(set(FLUX_INPUTS) - set(FLUX_NODES)))
def test_technique_nodes_refuse_the_real_flux(tiny, inv, node_id):
    """Every technique node other than Invert and the edit sampler refuses a real (tiny) ComfyUI Flux by name and
    says where Flux stands."""
    import tiny_families

    flux_model, _flux_clip = tiny_families.make_flux(0)
    message = error_of(node_id, model=flux_model, **_family_inputs(tiny, inv, node_id))
    assert "supports SD1.x, SD2.x, SDXL UNet models; the connected MODEL is Flux" in message, message
    assert "on Flux the pack does inversion, the edit sampler, Prompt-to-Prompt, attention maps and CPAM's " \
           "background preservation so far, see docs/flux.md" in message


def test_fp16_model_weights(tiny):
    import tiny_models

    with torch.inference_mode():
        half = tiny_models.make_model(0, dtype=torch.float16)
    inv, _, _, recon, _, _ = call_node("AttnEditInvert", model=half, clip=tiny.clip, source_prompt=SRC,
                                       method="null_text", steps=2, cfg=7.5, latent=make_latent(), inner_steps=1)
    assert torch.isfinite(recon["samples"]).all() and inv.uncond.dtype == torch.float32
    patched, target = call_node("AttnEditAttentionHook", model=half, clip=tiny.clip, source_prompt=SRC,
                                target_prompt="a photo of a dog", mode="replace", cross_replace=0.8, self_replace=0.4)
    edited, _, _ = call_node("AttnEditEditSampler", model=patched, inversion=inv)
    assert torch.isfinite(edited["samples"]).all()


def test_foreign_attention_patch_is_left_alone(tiny, inv, caplog):
    foreign = tiny.model.clone()
    calls = []

    def other_pack(q, k, v, extra_options):
        calls.append(1)
        from comfy.ldm.modules.attention import optimized_attention

        return optimized_attention(q, k, v, extra_options["n_heads"])

    foreign.set_model_attn2_replace(other_pack, "input", 7)
    model, _ = call_node("AttnEditAttentionHook", model=foreign, clip=tiny.clip, source_prompt=SRC,
                         target_prompt="a photo of a dog", mode="replace", cross_replace=0.8, self_replace=0.4)
    edited, _, _ = call_node("AttnEditEditSampler", model=model, inversion=inv)
    assert calls and torch.isfinite(edited["samples"]).all()
    assert "already patched by another node" in caplog.text


# ----------------------------------------------------------------------------------------------- masks
# Every node with a MASK input, with its mask (or None: a default that works), through the node itself.
MASK_NODES = ("mag", "cpam", "fusion", "dpl", "sam")
SAM_IMAGE = (48, 40)  # H, W: not square, so SAM pads it and a hint of another aspect would land off the picture


def quadrant(h, w):
    """The top-left quarter of an h x w grid: where the 2x2 mask [[1, 0], [0, 0]] lands, by hand."""
    grid = torch.zeros(h, w)
    grid[: h // 2, : w // 2] = 1.0
    return grid


QUAD = quadrant(2, 2)[None]  # a 2x2 px MASK: area coverage stretches it onto any grid exactly


def fusion(tiny, inversion, mask, **kw):
    args = dict(model=tiny.model, clip=tiny.clip, inversion=inversion, target_prompt=DOG, mask=mask, seed=7,
                start_step=0, layers="all")
    args.update(kw)
    return [o["samples"] for o in call_node("AttnEditFusionWithAdapter", **args)]


def dpl(tiny, background=None, **kw):
    args = dict(model=tiny.model, clip=tiny.clip, source_prompt=PAIR, nouns="cat, dog", steps=2, cfg=7.5,
                latent=make_latent(seed=4), token_iterations=2, null_text_iterations=1)
    if background is not None:
        args["background"] = background
    args.update(kw)
    return call_node("AttnEditDynamicPromptLearn", **args)


@pytest.fixture(scope="module")
def dpl_runs(tiny):
    """Shared DPL runs: an empty background (no leakage loss), a quarter background with its loss weighted 0."""
    return {"empty": dpl(tiny, torch.zeros(1, 128, 128)),
            "quad_off": dpl(tiny, QUAD, lambda_background=0.0)}


@pytest.fixture(scope="module")
def tiny_sam():
    import tiny_models

    return tiny_models.register_tiny_sam()


def segment(tiny_sam, hint=None, **kw):
    image = make_image(size=SAM_IMAGE[0], seed=5)[:, :, : SAM_IMAGE[1]]
    if hint is not None:
        kw["mask_hint"] = hint
    return call_node("AttnEditSAMMask", image=image, sam_model=tiny_sam, multimask=False, **kw)


@pytest.fixture(scope="module")
def adapter(tiny):
    import tiny_models

    import nodes

    cond = pkg("inversion.comfy_model").encode_text(tiny.clip, DOG)
    with torch.inference_mode():
        net = tiny_models.make_t2i_adapter()
        return nodes.ControlNetApply().apply_controlnet(cond, net, make_image(128, seed=1), 1.0)[0]


@pytest.mark.parametrize("node", MASK_NODES)
def test_mask_of_another_size_is_stretched_by_area_coverage(tiny, inv, refine, dpl_runs, tiny_sam, node, caplog):
    """A 2x2 px mask [[1, 0], [0, 0]] is the top-left quarter of the image on every grid (masks/ops.py contract)."""
    hooks = pkg("attention.hooks")
    if node == "mag":
        step_hook = hooks.step_hooks_of(mag(refine, inv, QUAD))[-1]
        assert torch.equal(step_hook.masks[0, 0], quadrant(16, 16))
        assert torch.equal(step_hook.semantic_masks[0], quadrant(4, 4).flatten())
    elif node == "cpam":
        controller = hooks.controllers_of(cpam(tiny, inv, QUAD))[-1]
        assert torch.equal(controller.source_masks[0], quadrant(16, 16))
        assert bool((controller.target_masks[0] >= quadrant(16, 16)).all())  # its expanded clone holds the quarter
    elif node == "fusion":
        small = fusion(tiny, inv, QUAD)
        full_size = fusion(tiny, inv, quadrant(128, 128)[None])
        assert all(torch.equal(a, b) for a, b in zip(small, full_size))
        assert not torch.allclose(small[0], small[2], atol=1e-2), "the quarter is edited"
    elif node == "dpl":
        _, _, out_mask, _, _ = dpl_runs["quad_off"]
        used = dpl_runs["quad_off"][0].extras["dpl"]["background"][0]
        assert torch.equal(used, quadrant(4, 4)) and torch.equal(out_mask[0], quadrant(128, 128))
    else:  # SAM: a hint of another size or aspect is stretched onto the picture before SAM sees it
        h, w = SAM_IMAGE
        left = torch.zeros(1, h, w)
        left[:, :, : w // 2] = 1.0
        at_size, _ = segment(tiny_sam, left)
        square_left = torch.zeros(1, 64, 64)
        square_left[:, :, :32] = 1.0
        with caplog.at_level("WARNING"):
            square, _ = segment(tiny_sam, square_left)
        assert "stretched" in caplog.text
        double, _ = segment(tiny_sam, left.repeat_interleave(2, 1).repeat_interleave(2, 2))
        assert torch.equal(square, at_size) and torch.equal(double, at_size) and at_size.shape == (1, h, w)


def mask_node_call(tiny, inv, refine, tiny_sam, node, mask):
    if node == "mag":
        return mag(refine, inv, mask)
    if node == "cpam":
        return cpam(tiny, inv, mask)
    if node == "fusion":
        return fusion(tiny, inv, mask)
    if node == "dpl":
        return dpl(tiny, mask, token_iterations=1)
    return segment(tiny_sam, mask, points="10,10")


@pytest.mark.parametrize("node", MASK_NODES)
@pytest.mark.parametrize("case", ["batch of 3", "no pixels"])
def test_mask_batch_or_pixels_that_cannot_work_are_errors(tiny, inv, refine, tiny_sam, node, case):
    name = {"mag": "mask", "cpam": "source_mask", "fusion": "mask", "dpl": "background", "sam": "mask_hint"}[node]
    mask = torch.zeros(3, 64, 64) if case == "batch of 3" else torch.zeros(1, 0, 64)
    with pytest.raises(ValueError) as info:
        mask_node_call(tiny, inv, refine, tiny_sam, node, mask)
    message = str(info.value)
    assert message.startswith("[Attention Edit] ") and "\n" not in message
    expected = f"`{name}` has a batch of 3 masks for 1 image(s); connect one mask, or one per image" \
        if case == "batch of 3" else f"`{name}` has shape (1, 0, 64): no pixels; connect a MASK"
    assert expected in message, message


@pytest.mark.parametrize("node", MASK_NODES)
def test_empty_mask(tiny, inv, refine, dpl_runs, tiny_sam, node):
    empty = torch.zeros(1, 128, 128)
    if node == "mag":  # nothing to guide: an error, not a silent plain P2P run
        message = error_of("AttnEditMAGGuidance", model=refine, inversion=inv, mask=empty, target_words="yellow",
                           constraint="token_ratio", max_iterations=1, guidance_steps=1, scale=2.5, blend_steps=1)
        assert "`mask` of image 0 covers no cell of the 4x4 attention grid" in message
    elif node == "cpam":  # the object to edit is empty: an error; as the object to KEEP (change background): the
        # whole picture is the new background, i.e. the plain edit to the target prompt, bit for bit
        message = error_of("AttnEditCPAMSelfAttn", model=tiny.model, inversion=inv, clip=tiny.clip, source_mask=empty,
                           target_prompt=DOG, strategy="replace object")
        assert "`source_mask` is empty for image 0" in message and "Paint the object" in message
        target = pkg("inversion.comfy_model").encode_text(tiny.clip, DOG)
        edited = sample(cpam(tiny, inv, empty, "change background"), inv)
        assert torch.equal(edited[0], sample(tiny.model, inv, target=target)[0])
    elif node == "fusion":  # nothing may change: the target is the source reconstruction
        target, _, source = fusion(tiny, inv, empty)
        assert torch.allclose(target, source, atol=5e-2, rtol=0)  # batch float noise only (see test_fusion)
    elif node == "dpl":  # no background: no leakage loss, bit for bit the run with the loss weighted 0
        a, b = dpl_runs["empty"][0], dpl_runs["quad_off"][0]
        assert torch.equal(a.cond, b.cond) and torch.equal(a.uncond, b.uncond) and torch.equal(a.latents, b.latents)
        assert torch.equal(dpl_runs["empty"][2], empty)
    else:  # an empty hint and no point or box: nothing to segment
        message = error_of("AttnEditSAMMask", image=make_image(64), sam_model=tiny_sam, mask_hint=empty)
        assert "`mask_hint` of image 0 is empty and no `points` or `box` are given: nothing to segment" in message


@pytest.mark.parametrize("node", MASK_NODES)
def test_full_mask(tiny, inv, refine, adapter, tiny_sam, node):
    full = torch.ones(1, 128, 128)
    if node == "mag":  # the whole image is the edit region: the final blend keeps nothing of the source
        plain = sample(refine, inv)
        blended = sample(mag(refine, inv, full, max_iterations=0, blend_steps=inv.steps), inv)
        assert torch.equal(blended[0], plain[0]) and torch.equal(blended[1], plain[1])
    elif node == "cpam":  # no background to preserve: the plain edit to the target prompt, bit for bit
        target = pkg("inversion.comfy_model").encode_text(tiny.clip, DOG)
        plain = sample(tiny.model, inv, target=target)
        for strategy in ("replace object", "regional prompts"):
            edited = sample(cpam(tiny, inv, full, strategy, background_prompt="a snowy forest"), inv)
            assert torch.equal(edited[0], plain[0]), strategy
        message = error_of("AttnEditCPAMSelfAttn", model=tiny.model, inversion=inv, clip=tiny.clip, source_mask=full,
                           target_prompt="", strategy="remove object")
        assert "`source_mask` covers the whole image 0" in message
    elif node == "fusion":  # A = everything, adapter on both: the target IS the intermediate image (same noise,
        # prompt, adapter, and it borrows the intermediate's attention everywhere)
        target, intermediate, source = fusion(tiny, inv, full, adapter=adapter, adapter_on_target=True)
        scale = float(intermediate.abs().max())
        assert float((target - intermediate).abs().max()) <= 1e-4 * scale  # batch float noise only
        assert float((target - source).abs().max()) > 0.1 * scale
    elif node == "dpl":  # every cell background: the nouns would have nowhere to go
        message = error_of("AttnEditDynamicPromptLearn", model=tiny.model, clip=tiny.clip, source_prompt=PAIR,
                           nouns="cat, dog", steps=2, cfg=7.5, latent=make_latent(), background=full)
        assert "`background` covers the whole image 0 (every cell of the 4x4 attention grid" in message
    else:  # a full hint is a full hint at any size
        small, score = segment(tiny_sam, torch.ones(1, 3, 3))
        assert torch.equal(small, segment(tiny_sam, torch.ones(1, *SAM_IMAGE))[0])
        assert set(small.unique().tolist()) <= {0.0, 1.0} and 0.0 <= score <= 1.5


# ----------------------------------------------------------------------------------------------- batch layouts
def chunk_log(model):
    """A clone of `model` whose UNet calls append their CFG chunks (0 = cond, 1 = uncond) to the returned list."""
    log = []
    clone = model.clone()

    def spy(apply_model, args):
        log.append(tuple(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(spy)
    return clone, log


def instant(tiny, model=None, **kw):
    args = dict(image=make_image(128, seed=3), model=model or tiny.model, clip=tiny.clip, vae=tiny.vae,
                edit_text=DOG, steps=4, seeds=2, phi=0.5)
    args.update(kw)
    return call_node("AttnEditInstantEdit", **args)


def in_latent_space(tiny, image):
    with torch.inference_mode(), pkg("inversion.instant").seeded(0):
        return pkg("inversion.comfy_model").vae_encode(tiny.vae, image).float()


@pytest.mark.parametrize("technique", ["mag", "cpam", "fusion", "dpl", "instant"])
def test_cfg_one_runs_cond_only(tiny, technique):
    """cfg = 1: ComfyUI skips the uncond pass, so every UNet call is one cond chunk; each technique still holds."""
    model, chunks = chunk_log(tiny.model)
    inv1 = call_node("AttnEditInvert", model=model, clip=tiny.clip, source_prompt=SRC, method="ddim", steps=3,
                     cfg=1.0, latent=make_latent(seed=7))[0]
    if technique == "mag":  # blend over every step: outside the grown mask the edit is the source, bit for bit
        patched = mag(hook(tiny, YELLOW, model=model, mode="refine", self_replace=0.5)[0], inv1, blend_steps=3)
        edited, source = sample(patched, inv1)
        outside = (pkg("attention.hooks").step_hooks_of(patched)[-1].blend_masks[0] == 0).expand_as(edited[0])
        assert 0 < float(outside.float().mean()) < 1
        assert torch.equal(edited[0][outside], source[0][outside])
        assert not torch.equal(edited[0][~outside], source[0][~outside])
    elif technique == "cpam":  # a full mask is the plain edit, also with one chunk
        target = pkg("inversion.comfy_model").encode_text(tiny.clip, DOG)
        assert torch.equal(sample(cpam(tiny, inv1, torch.ones(1, 8, 8), model=model), inv1)[0],
                           sample(model, inv1, target=target)[0])
    elif technique == "fusion":
        target, _, source = fusion(tiny, inv1, torch.zeros(1, 8, 8), model=model)
        assert torch.allclose(target, source, atol=5e-2, rtol=0)
    elif technique == "dpl":  # no uncond pass: null-text has nothing to optimise, the noun tokens still learn
        out = dpl(tiny, QUAD, model=model, cfg=1.0)[0]
        negative = pkg("inversion.conditioning").context_of(out.negative, "negative")
        assert torch.equal(out.uncond, negative.expand_as(out.uncond).to(out.uncond))
        plain = pkg("inversion.conditioning").context_of(out.source, "source")
        assert not torch.equal(out.cond[:, 0], plain.expand_as(out.cond[:, 0]).to(out.cond))
    else:
        image, mask, latent = instant(tiny, model, cfg=1.0, finish="blend only")
        x0 = in_latent_space(tiny, make_image(128, seed=3))
        outside = pkg("masks.ops").mask_to_grid(1 - mask, (16, 16), binary=True).bool().expand(-1, 4, -1, -1)
        assert 0 < float(mask.mean()) < 1
        assert torch.allclose(latent["samples"][outside], x0[outside], atol=1e-5)
    assert chunks and all(c == (0,) for c in chunks), set(chunks)


@pytest.fixture
def low_vram(monkeypatch):
    """Make ComfyUI's samplers see no free memory for batching (its low-VRAM path: cond and uncond in separate UNet
    calls); everything else (VAE, attention kernels) sees the real free memory."""
    import comfy.model_management

    real = comfy.model_management.get_free_memory

    def no_room_for_batching(dev=None, torch_free_too=False):
        if sys._getframe(1).f_globals.get("__name__") == "comfy.samplers":
            return 0
        return real(dev, torch_free_too)

    return lambda: monkeypatch.setattr(comfy.model_management, "get_free_memory", no_room_for_batching)


@pytest.mark.parametrize("technique", ["mag", "cpam", "dpl", "instant"])
def test_cond_and_uncond_in_separate_calls_match_batched(tiny, refine, low_vram, technique):
    # DDIM inversion: a direct inversion's source branch (x0 + offsets) amplifies batch float noise ~30x by itself
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="ddim", steps=4,
                    cfg=7.5, latent=make_latent(seed=8))[0]

    def run(model):
        if technique == "mag":
            return sample(mag(refine, inv), inv)
        if technique == "cpam":  # static masks (a refined mask is a threshold: float noise may flip a cell)
            return sample(cpam(tiny, inv, strategy="edit object (keep identity)", start_step=1, model=model), inv)
        if technique == "dpl":
            out = dpl(tiny, model=model)[0]
            return out.latents, out.cond, out.uncond
        image, mask, latent = instant(tiny, model)
        return latent["samples"], mask

    batched = run(tiny.model)
    low_vram()
    model, chunks = chunk_log(tiny.model)
    if technique == "mag":
        refine_split = hook(tiny, YELLOW, model=model, mode="refine", self_replace=0.5)[0]
        split = sample(mag(refine_split, inv), inv)
    else:
        split = run(model)
    assert chunks and all(len(c) == 1 for c in chunks) and {0, 1} <= {c[0] for c in chunks}, set(chunks)
    for a, b in zip(batched, split):  # float noise of batching only (~1e-5 relative here; a wrong layout is ~1)
        scale = float(a.abs().max())
        assert float((a - b).abs().max()) <= 1e-4 * max(scale, 1.0), technique


# ----------------------------------------------------------------------------------------------- interrupts
def interrupt_after(monkeypatch, calls: int, run, error: Exception | None = None):
    """Run `run` with ComfyUI's interrupt (or `error`) raised at the `calls`-th progress update; returns how many
    updates were made. The progress bar checks the interrupt, as Cancel in the UI does."""
    import comfy.model_management as mm

    progress = pkg("inversion.comfy_model").Progress
    original = progress.update
    seen = []

    def stop(self, units=1, x0=None):
        seen.append(units)
        if len(seen) == calls:
            if error is not None:
                raise error
            mm.interrupt_current_processing(True)
        return original(self, units, x0)

    monkeypatch.setattr(progress, "update", stop)
    try:
        with pytest.raises(type(error) if error is not None else mm.InterruptProcessingException):
            run()
    finally:
        mm.interrupt_current_processing(False)
        monkeypatch.setattr(progress, "update", original)
    return len(seen)


def test_interrupted_null_text_leaves_the_next_run_clean(tiny, monkeypatch):
    args = dict(model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="null_text", steps=3, cfg=7.5,
                latent=make_latent(seed=10), inner_steps=2)
    fresh = call_node("AttnEditInvert", **args)[3]["samples"]
    interrupt_after(monkeypatch, 5, lambda: call_node("AttnEditInvert", **args))
    assert torch.equal(call_node("AttnEditInvert", **args)[3]["samples"], fresh)
    assert not any(k.startswith("attnedit") for k in tiny.model.model_options.get("transformer_options", {}))


@pytest.mark.parametrize("technique", ["dpl", "cpam", "instant"])
def test_interrupt_mid_run_then_the_next_run_equals_a_fresh_run(tiny, inv, dpl_runs, technique, monkeypatch):
    encode = pkg("inversion.comfy_model").encode_text
    if technique == "dpl":  # update 3 = the first noun-token update of step 0 (after the 2-step DDIM pass)
        def run():
            return dpl(tiny, torch.zeros(1, 128, 128))[0].cond

        fresh = dpl_runs["empty"][0].cond
    elif technique == "cpam":  # update 2 = the second denoising step, after the mask refinement started
        model = cpam(tiny, inv, strategy="edit object (keep identity)", start_step=1, object_words="dog",
                     refine_step=1)

        def run():
            return sample(model, inv)[0]

        fresh = run()
    else:  # update 2 = the second step of the mask phase
        def run():
            return instant(tiny)[2]["samples"]

        fresh = run()
    text = encode(tiny.clip, PAIR)[0][0].clone()
    assert interrupt_after(monkeypatch, 3 if technique == "dpl" else 2, run) == (3 if technique == "dpl" else 2)
    assert torch.equal(run(), fresh)
    assert torch.equal(encode(tiny.clip, PAIR)[0][0], text), "the text encoder is left as it was"
    assert not any(k.startswith("attnedit") for k in tiny.model.model_options.get("transformer_options", {}))


# ----------------------------------------------------------------------------------------------- executor
CAPTURED = {}


class AttnEditTestLatent:
    """Test-only source node: a seeded LATENT (VAE Encode samples from the posterior with the global RNG)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2**31})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "Attention Edit/testing"

    def make(self, seed):
        return (make_latent(seed=seed),)


class AttnEditTestCapture:
    """Test-only output node: keeps a copy of the LATENT it receives under `key`."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",), "key": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "capture"
    CATEGORY = "Attention Edit/testing"

    def capture(self, latent, key):
        CAPTURED[key] = latent["samples"].clone()
        return {}


HOST.register({"AttnEditTestCapture": AttnEditTestCapture, "AttnEditTestLatent": AttnEditTestLatent})


def edit_chain(first: int, seed: int, target: str, technique: str = "p2p") -> dict:
    """API-format nodes of one edit (ids first..first+7) on checkpoint node "1": a seeded latent is inverted and
    edited with Prompt-to-Prompt, or with Prompt-to-Prompt refine + MAG-Edit inside a full SolidMask."""
    i = [str(first + n) for n in range(8)]
    nodes = {
        i[1]: {"class_type": "AttnEditTestLatent", "inputs": {"seed": seed}},
        i[2]: {"class_type": "AttnEditInvert", "inputs": {"model": ["1", 0], "clip": ["1", 1], "source_prompt": SRC,
                                                          "method": "direct", "steps": 3, "cfg": 7.5,
                                                          "latent": [i[1], 0]}},
        i[3]: {"class_type": "AttnEditAttentionHook",
               "inputs": {"model": ["1", 0], "clip": ["1", 1], "source_prompt": SRC, "target_prompt": target,
                          "mode": "refine" if technique == "mag" else "replace", "cross_replace": 0.8,
                          "self_replace": 0.4}},
        i[5]: {"class_type": "AttnEditEditSampler", "inputs": {"model": [i[4] if technique == "mag" else i[3], 0],
                                                               "inversion": [i[2], 0]}},
        i[6]: {"class_type": "AttnEditTestCapture", "inputs": {"latent": [i[5], 0], "key": f"chain{first}"}},
    }
    if technique == "mag":
        nodes[i[7]] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 128, "height": 128}}
        nodes[i[4]] = {"class_type": "AttnEditMAGGuidance",
                       "inputs": {"model": [i[3], 0], "inversion": [i[2], 0], "mask": [i[7], 0],
                                  "target_words": "yellow", "constraint": "token_ratio", "max_iterations": 1,
                                  "guidance_steps": 1, "scale": 2.5, "blend_steps": 1}}
    return nodes


def prompt_of(*chains) -> dict:
    prompt = {"1": {"class_type": "AttnEditTestTinyCheckpoint", "inputs": {"ckpt_name": "tiny"}}}
    for chain in chains:
        prompt.update(chain)
    return prompt


CHAIN_A = dict(first=10, seed=1, target=DOG)
CHAIN_B = dict(first=20, seed=2, target=YELLOW, technique="mag")


def run_prompt(prompt, executor=None) -> dict:
    CAPTURED.clear()
    result = HOST.run(prompt, executor)
    assert result.success, result.error_message
    return dict(CAPTURED)


@pytest.fixture(scope="module")
def alone():
    """Each edit alone, each in a fresh executor (fresh checkpoint load)."""
    return {**run_prompt(prompt_of(edit_chain(**CHAIN_A))), **run_prompt(prompt_of(edit_chain(**CHAIN_B)))}


def test_same_nodes_twice_in_one_prompt_equal_each_alone(alone):
    """Two Invert, two Attention Hook and two Edit Sampler nodes (one chain with MAG-Edit) on one MODEL."""
    both = run_prompt(prompt_of(edit_chain(**CHAIN_A), edit_chain(**CHAIN_B)))
    assert both.keys() == alone.keys() == {"chain10", "chain20"}
    assert all(torch.equal(both[k], alone[k]) for k in both)
    assert not torch.equal(both["chain10"], both["chain20"])


def test_two_edits_queued_back_to_back_equal_each_alone(alone):
    """One executor: the checkpoint stays cached, so the MAG-Edit edit runs on the MODEL object the P2P edit used."""
    executor = HOST.new_executor()
    first = run_prompt(prompt_of(edit_chain(**CHAIN_A)), executor)
    second = run_prompt(prompt_of(edit_chain(**CHAIN_B)), executor)
    assert torch.equal(first["chain10"], alone["chain10"]) and torch.equal(second["chain20"], alone["chain20"])


# ----------------------------------------------------------------------------------------------- isolation
def patcher_state(patcher):
    return (copy.deepcopy(patcher.model_options), dict(patcher.object_patches),
            {k: list(v) for k, v in patcher.patches.items()})


def test_patch_nodes_leave_the_input_model_untouched(tiny, inv, refine, adapter):
    encode = pkg("inversion.comfy_model").encode_text
    models = {"model": tiny.model, "p2p": refine}
    before = {name: patcher_state(m) for name, m in models.items()}
    clip_before = patcher_state(tiny.clip.patcher)
    texts = {t: encode(tiny.clip, t)[0][0].clone() for t in (SRC, PAIR)}
    hook(tiny, "a photo of a dog", local_blend="cat, dog", reweight="dog=2")
    hook(tiny, "a photo of a fluffy cat", mode="refine")
    guided = mag(refine, inv)
    patched = cpam(tiny, inv, object_words="dog")
    sample(guided, inv)
    sample(patched, inv)
    call_node("AttnEditEmbCtrl", clip=tiny.clip, source_prompt=SRC, target_prompt=DOG, alignment="align tokens")
    dpl(tiny, steps=2, token_iterations=1)
    fusion(tiny, inv, box(), adapter=adapter)
    instant(tiny, steps=2, finish="blend only")
    assert {name: patcher_state(m) for name, m in models.items()} == before
    assert patcher_state(tiny.clip.patcher) == clip_before
    assert all(torch.equal(encode(tiny.clip, t)[0][0], v) for t, v in texts.items())


KSAMPLER_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import comfy_host
comfy_host.boot()
import tiny_models, nodes
b = tiny_models.make_bundle(0)
pos = b.clip.encode_from_tokens(b.clip.tokenize("a photo of a dog"), return_pooled=True)
neg = b.clip.encode_from_tokens(b.clip.tokenize(""), return_pooled=True)
latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11))}
with torch.inference_mode():
    out = nodes.KSampler().sample(b.model, 5, 3, 6.0, "euler", "normal", [[pos[0], {"pooled_output": pos[1]}]],
                                  [[neg[0], {"pooled_output": neg[1]}]], latent, 1.0)[0]["samples"]
torch.save(out, sys.argv[2])
"""


def test_plain_ksampler_after_our_runs_matches_a_fresh_process(tiny, inv, refine, tmp_path, monkeypatch):
    """After edits, a rejected run, an interrupted MAG-Edit run (gradients on) and a DPL run failing inside its
    token loop (text encoder patched for gradients), core KSampler on the original MODEL with prompts encoded by the
    original CLIP is bit-identical to a fresh process (no global patch, no state left on the model or the CLIP)."""
    import tiny_models

    import nodes

    model, _ = hook(tiny, "a photo of a dog", local_blend="cat, dog")
    call_node("AttnEditEditSampler", model=model, inversion=inv)
    with pytest.raises(ValueError):
        call_node("AttnEditEditSampler", model=tiny.model, inversion=inv)
    guided = mag(refine, inv, max_iterations=3)
    interrupt_after(monkeypatch, 2, lambda: sample(guided, inv))  # inside the guidance iterations of step 0
    interrupt_after(monkeypatch, 3, lambda: dpl(tiny), RuntimeError("out of memory (simulated)"))
    script = tmp_path / "ksampler.py"
    script.write_text(KSAMPLER_SCRIPT)
    tools_dir = os.path.dirname(tiny_models.__file__)
    subprocess.run([sys.executable, str(script), tools_dir, str(tmp_path / "fresh.pt")], check=True,
                   capture_output=True, env={**os.environ, "COMFYUI_PATH": HOST.comfy_path})
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    pos = pkg("inversion.comfy_model").encode_text(tiny.clip, "a photo of a dog")
    neg = pkg("inversion.comfy_model").encode_text(tiny.clip, "")
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(11))}
    with torch.inference_mode():
        here = nodes.KSampler().sample(tiny.model, 5, 3, 6.0, "euler", "normal", pos, neg, latent, 1.0)[0]["samples"]
    assert torch.equal(here, fresh)


def test_no_network_access_at_run_time(tiny, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="null_text",
                    steps=3, cfg=7.5, image=make_image(64), vae=tiny.vae, inner_steps=2)[0]
    model, _ = hook(tiny, "a photo of a dog", local_blend="cat, dog")
    call_node("AttnEditEditSampler", model=model, inversion=inv)


NETWORK_MODULES = {"socket", "urllib", "http", "requests", "httpx", "aiohttp", "huggingface_hub", "ftplib"}


def test_weights_and_network_static_rules():
    """Package code (AST): files are read as weights only through safetensors or torch.load(..., weights_only=True)
    (no pickle, torch.jit.load, numpy allow_pickle, torch.hub), and nothing imports a network client."""
    offenders = []
    files = glob.glob(os.path.join(ROOT, "*.py")) + [p for d in ("attention", "inversion", "masks", "nodes")
                                                     for p in glob.glob(os.path.join(ROOT, d, "**", "*.py"),
                                                                        recursive=True)]
    for path in sorted(files):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        where = os.path.relpath(path, ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad = {n.split(".")[0] for n in names} & (NETWORK_MODULES | {"pickle", "dill", "joblib"})
                if bad or (isinstance(node, ast.ImportFrom) and node.module == "torch" and
                           any(a.name in ("load", "hub") for a in node.names)):
                    offenders.append(f"{where}:{node.lineno} imports {sorted(bad) or 'torch.load/hub'}")
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if func == "torch.load":
                safe = keywords.get("weights_only")
                if not (isinstance(safe, ast.Constant) and safe.value is True):
                    offenders.append(f"{where}:{node.lineno} torch.load without weights_only=True")
            elif func in ("torch.jit.load", "torch.hub.load", "torch.hub.load_state_dict_from_url") or \
                    func.endswith("download_url_to_file"):
                offenders.append(f"{where}:{node.lineno} {func}")
            elif func.endswith(".load") and "allow_pickle" in keywords:
                offenders.append(f"{where}:{node.lineno} {func}(allow_pickle=...)")
    assert not offenders, offenders
