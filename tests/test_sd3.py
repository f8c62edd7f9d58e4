"""SD3 / SD3.5 (the second MMDiT family of "Beyond UNets"): the tiny SD3 from ComfyUI 0.3.x's own classes (MMDiT
with RMS QK-norm, tiny clip_l + clip_g, no T5), flow inversion, the edit sampler, Prompt-to-Prompt on its joint
attention (CLIP word positions, self injection in every joint block), local blend, CPAM's background preservation,
and the invariants of the UNet and Flux families. Everything here needs ComfyUI 0.3.x (newer_host)."""

import pytest
import tiny_families
import torch
from conftest import HOST, call_node, pkg
from joint_checks import (
    SRC,
    TGT,
    assert_interrupt_leaves_the_next_run_clean,
    assert_local_blend_keeps_the_source_outside_the_mask,
    assert_no_leakage,
    controller_calls,
    edit,
    error_of,
    hook,
)

NEWER = "SD3 exists only in ComfyUI 0.3.x"
FLOW_METHODS = ("flow_euler", "rf_solver")
BLEND = 0.97  # local-blend threshold for the tiny model's flat maps (as for the tiny Flux)


def sd3_latent(seed: int = 3, size: int = 16):
    return {"samples": torch.randn(1, 16, size, size, generator=torch.Generator().manual_seed(seed))}




@pytest.fixture(scope="module")
def sd3():
    return tiny_families.make_sd3(0)


def invert(model, clip, method="flow_euler", steps=4, prompt=SRC, cfg=1.0, **inputs):
    inputs.setdefault("latent", sd3_latent())
    return call_node("AttnEditInvert", model=model, clip=clip, source_prompt=prompt, method=method, steps=steps,
                     cfg=cfg, **inputs)






# ----------------------------------------------------------------------------------------------- the tiny SD3
@pytest.mark.newer_host(NEWER)
def test_tiny_sd3_is_comfyuis_sd3(sd3):
    import comfy.model_base
    import comfy.supported_models
    import tiny_models
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    model, clip = sd3
    cm, hooks = pkg("inversion.comfy_model"), pkg("attention.hooks")
    assert isinstance(model.model, comfy.model_base.SD3)
    assert isinstance(model.model.model_config, comfy.supported_models.SD3)
    assert isinstance(model.model.diffusion_model, OpenAISignatureMMDITWrapper)
    assert cm.model_family(model) == "sd3" and cm.sampler_maths(model) == "flow"
    assert not cm.guidance_embedded(model) and cm.context_width(model) == 4096
    assert [s.key for s in hooks.joint_sites(model)] == [("double", 0, 0), ("double", 1, 0)]
    assert hooks.is_joint(model) and not hooks.flux_sites(model)
    cond = cm.encode_text(clip, SRC)
    assert cond[0][0].shape == (1, 77, 4096)  # clip_l + clip_g padded to 4096 (no T5 part)
    assert cond[0][1]["pooled_output"].shape == (1, tiny_families.L_DIM + tiny_families.G_DIM)
    loaded = tiny_models.AttnEditTestTinyCheckpoint().load("tiny-sd3")
    assert cm.model_family(loaded[0]) == "sd3" and loaded[2].latent_channels == 16


def test_tiny_sd3_checkpoint_needs_the_newer_host():
    """On ComfyUI 2024-03 an "sd3" placeholder is refused by name; on 0.3.x it loads."""
    import tiny_models

    if HOST.is_new:
        assert pkg("inversion.comfy_model").is_flow(tiny_models.AttnEditTestTinyCheckpoint().load("sd3")[0])
    else:
        with pytest.raises(RuntimeError, match="no SD3 classes: the tiny SD3 needs ComfyUI 0.3.x"):
            tiny_models.AttnEditTestTinyCheckpoint().load("sd3")


# ----------------------------------------------------------------------------------------------- exact flow maths
@pytest.mark.newer_host(NEWER)
@pytest.mark.parametrize("method", FLOW_METHODS)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_roundtrip_is_exact_with_a_constant_velocity(sd3, method, cfg):
    """x_sigma = x0 + sigma v solves the flow ODE for a constant v, so inversion and reconstruction are exact, also
    with real CFG (cond and uncond chunks give the same v: the CFG mix is v); the velocity at sigma 0 is read through
    the MMDiT forward tap (MMDiT runs no DIFFUSION_MODEL wrappers)."""
    model, clip = sd3
    v = torch.randn(1, 16, 1, 1, generator=torch.Generator().manual_seed(1))
    const = tiny_families.sd3_constant_velocity_patch(model, v)
    latent = sd3_latent()
    inv, _noise, sigmas, recon, _psnr, _store = invert(const, clip, method, steps=5, latent=latent, cfg=cfg)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0 and len(sigmas) == 6
    assert torch.allclose(recon["samples"], latent["samples"], atol=1e-5), float(
        (recon["samples"] - latent["samples"]).abs().max())
    x0 = model.model.process_latent_in(latent["samples"])
    for i, sigma in enumerate(sigmas.tolist()):
        assert torch.allclose(inv.latents[i, 0], x0[0] + sigma * v[0], atol=1e-5), i
    _edited, source, _ = edit(const, inv, target=inv.source)
    assert torch.allclose(source, latent["samples"], atol=1e-5)


# ----------------------------------------------------------------------------------------------- joint attention
@pytest.mark.newer_host(NEWER)
def test_routing_is_exact_without_controllers_and_captures_clip_positions(sd3):
    """The override and the dit patches on a plain run change nothing (host kernel, bit for bit), the input MODEL
    gets none, and the captured maps are the image queries' joint softmax over the 77 CLIP tokens at the 8x8 grid."""
    model, clip = sd3
    before = repr(model.model_options)
    first = invert(model, clip, steps=3)
    assert repr(model.model_options) == before and "optimized_attention_override" not in before
    hooks = pkg("attention.hooks")
    clone = model.clone()
    hooks.install_dispatch(clone)
    options = clone.model_options["transformer_options"]
    assert options["optimized_attention_override"] is hooks.joint_attention_override
    assert sorted(options["patches_replace"]["dit"]) == [("double_block", 0), ("double_block", 1)]
    second = invert(model, clip, steps=3)
    assert torch.equal(first[0].latents, second[0].latents)
    inv, store = first[0], first[5]
    assert store.semantic_level == 2 and store.cross_map().shape == (1, 8, 8, 77)
    tokens = inv.source_tokens
    assert tokens.encoder == "clip" and tokens.length == 77
    assert [g[1] for g in tokens.word_groups()] == ["a", "photo", "of", "a", "cat"]
    assert tokens.find_text("cat") == [5]  # CLIP positions: start token at 0
    maps = store.cross_map()[0]
    assert torch.isfinite(maps).all() and float(maps.sum(-1).max()) < 1.0 + 1e-5 and float(maps[..., 5].sum()) > 0


@pytest.mark.newer_host(NEWER)
def test_capturing_maps_leaves_the_sd3_output_bit_identical(sd3):
    model, clip = sd3
    cm, run_mod = pkg("inversion.comfy_model"), pkg("attention.run")
    cond = cm.encode_text(clip, SRC)
    sigmas = torch.tensor([1.0, 0.0])
    x = sd3_latent()["samples"]

    def algorithm(den, x):
        return den(x, 0.6, velocity=True), den.run.mean_map("cross", 2)

    spec = run_mod.CaptureSpec(cross_levels=frozenset({2}), self_levels=frozenset({2}))
    with torch.inference_mode():
        plain, none = cm.run_sampler(model, cond, cond, x, sigmas, 1.0, algorithm,
                                     run_mod.RunState(sigmas, ("source",)))
        captured, maps = cm.run_sampler(model, cond, cond, x, sigmas, 1.0, algorithm,
                                        run_mod.RunState(sigmas, ("source",), capture=spec))
    assert none is None and maps.shape == (1, 64, 77) and torch.equal(plain, captured)


@pytest.fixture(scope="module")
def sd3_inv(sd3):
    model, clip = sd3
    return invert(model, clip, steps=4)[0]


@pytest.mark.newer_host(NEWER)
@pytest.mark.parametrize("mode", ["replace", "refine"])
def test_same_prompt_edit_reproduces_the_source(sd3, sd3_inv, mode):
    model, clip = sd3
    patched, _target = hook(model, clip, target=SRC, mode=mode)
    edited, source, _store = edit(patched, sd3_inv)
    assert torch.allclose(edited, source, atol=1e-5), float((edited - source).abs().max())
    recon = edit(model, sd3_inv, target=sd3_inv.source)[1]
    assert torch.allclose(source, recon, atol=1e-4)


@pytest.mark.newer_host(NEWER)
def test_word_swap_acts_on_sd3(sd3, sd3_inv):
    model, clip = sd3
    plain = edit(model, sd3_inv, target=pkg("inversion.comfy_model").encode_text(clip, TGT))[0]
    patched, _t = hook(model, clip)
    edited, _source, store = edit(patched, sd3_inv)
    assert torch.isfinite(edited).all() and float((edited - plain).abs().max()) > 1e-3
    assert store.cross_map().shape == (2, 8, 8, 77) and store.roles == ("source", "target")


@pytest.mark.newer_host(NEWER)
def test_local_blend_keeps_the_source_outside_the_mask(sd3, sd3_inv):
    assert_local_blend_keeps_the_source_outside_the_mask(*sd3, sd3_inv, BLEND)


@pytest.mark.newer_host(NEWER)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_batch_layout_and_sites_seen_by_controllers(sd3, cfg):
    """cfg 1: one cond chunk; cfg > 1 (SD3's real CFG): two chunks. Every joint block reaches the controllers as one
    cross (77 CLIP tokens) and one self call, with its site, the step and the 8x8 grid."""
    model, clip = sd3
    seen = controller_calls(model, invert(model, clip, steps=2, cfg=cfg)[0])
    labels = {s[3] for s in seen}
    assert labels == {(0,)} if cfg == 1.0 else labels in ({(1, 0)}, {(0, 1)})
    rows = 2 * len(next(iter(labels)))
    assert {(s[0], s[1], s[2]) for s in seen} == {(k, "double", i) for k in ("cross", "self") for i in (0, 1)}
    assert {s[4] for s in seen} == {(8, 8)} and {s[6] for s in seen} == {0, 1}
    assert {s[5] for s in seen} == {(rows, 2, 64, 77), (rows, 2, 64, 64)}


@pytest.mark.newer_host(NEWER)
def test_no_leakage_into_the_next_run(sd3, sd3_inv):
    assert_no_leakage(*sd3, sd3_inv)


@pytest.mark.newer_host(NEWER)
def test_interrupted_sd3_edit_leaves_the_next_run_clean(sd3, sd3_inv, monkeypatch):
    assert_interrupt_leaves_the_next_run_clean(*sd3, sd3_inv, monkeypatch)


@pytest.mark.newer_host(NEWER)
def test_words_map_to_clip_positions_and_prompt_errors(sd3):
    """SD3 prompts are tokenised with CLIP (the context's first 77 tokens), not T5 (whose positions would have no start
    token and "sunflower," as one word): CLIP positions count the start token; a missing word is a clear PromptError; an overlong prompt is refused."""
    model, clip = sd3
    tokens_mod = pkg("attention.tokens")
    tokens = tokens_mod.tokenize_prompt(clip, "a sunflower, in Paris")
    assert tokens.encoder == "clip" and tokens.length == 77
    assert [g[1] for g in tokens.word_groups()][:2] == ["a", "sunflower"]
    ids = tokens_mod.word_token_ids(clip, "sunflower")
    assert tokens.find(ids, "sunflower") == [2] and tokens.find_text("paris") == [5]  # start token at 0, "," at 3
    with pytest.raises(tokens_mod.PromptError, match="the word 'tiger' is not in the prompt"):
        tokens.find(tokens_mod.word_token_ids(clip, "tiger"), "tiger")
    message = error_of("AttnEditAttentionHook", model=model, clip=clip, source_prompt=SRC, target_prompt=TGT,
                       mode="replace", cross_replace=0.8, self_replace=0.4, local_blend="tiger")
    assert "tiger" in message and "neither prompt" in message, message
    long = " ".join(["cat"] * 100)
    message = error_of("AttnEditAttentionHook", model=model, clip=clip, source_prompt=SRC, target_prompt=long,
                       mode="refine", cross_replace=0.8, self_replace=0.4)
    assert "`target_prompt` has" in message and "one 77-token CLIP chunk" in message and "Shorten" in message


@pytest.mark.newer_host(NEWER)
def test_a_t5_part_in_the_sd3_context_is_refused(sd3):
    """With T5 the SD3 context is 77 CLIP tokens followed by T5's: P2P maps words in the CLIP part only, so such a
    context is refused by name (a 154-token conditioning stands in for clip_l + clip_g + T5)."""
    _model, clip = sd3
    tokens = pkg("attention.tokens").tokenize_prompt(clip, SRC)
    check = pkg("nodes.attention")._check_sd3_context
    check(tokens, tokens, [[torch.zeros(1, 77, 4096), {}]])
    with pytest.raises(ValueError) as info:
        check(tokens, tokens, [[torch.zeros(1, 154, 4096), {}]])
    message = str(info.value)
    assert "154-token context" in message and "clip_l / clip_g tokens only" in message
    assert "DualCLIPLoader" in message


# ----------------------------------------------------------------------------------------------- CPAM (KV-Edit form)
@pytest.mark.newer_host(NEWER)
def test_cpam_on_sd3_preserves_the_background_bit_for_bit(sd3, sd3_inv):
    """CPAM 'replace object' runs the Flux background-preservation path (attention/kvedit.py) unchanged on SD3's
    joint blocks: outside the mask the edit equals the pinned source exactly; inside it differs."""
    model, clip = sd3
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 40:88] = 1.0
    patched, _target = call_node("AttnEditCPAMSelfAttn", model=model, inversion=sd3_inv, clip=clip, source_mask=mask,
                                 target_prompt=TGT, strategy="replace object", mask_expand=0.0)
    edited, source, _store = edit(patched, sd3_inv, source_branch="pin to inversion")
    cm = pkg("inversion.comfy_model")
    assert torch.equal(source, cm.latent_to_raw(model, sd3_inv.latents[-1]))
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:12, 5:11] = True
    assert torch.equal(edited[0][:, ~inside], source[0][:, ~inside])
    assert float((edited[0][:, inside] - source[0][:, inside]).abs().max()) > 1e-3
    blend_only = pkg("attention.hooks").add_step_hook(model, pkg("attention.kvedit").BackgroundLatentBlend(
        patched.model_options["transformer_options"]["attnedit_controllers"][0].masks))
    other = edit(blend_only, sd3_inv, target=cm.encode_text(clip, TGT), source_branch="pin to inversion")[0]
    assert float((edited[0][:, inside] - other[0][:, inside]).abs().max()) > 1e-3  # the source's keys / values act


@pytest.mark.newer_host(NEWER)
def test_p2p_self_injection_runs_in_every_sd3_joint_block(sd3):
    """No published vital layers for SD3: the hook injects self-attention in every joint block (flux_self_sites
    None), while on Flux it keeps Stable Flow's vital layers unless self_replace_all_layers is set."""
    model, clip = sd3
    patched, _t = hook(model, clip)
    controller = patched.model_options["transformer_options"]["attnedit_controllers"][-1]
    assert controller.flux_self_sites is None


@pytest.mark.newer_host(NEWER)
def test_cpam_strategies_without_a_joint_form_and_unet_only_nodes_are_refused_on_sd3(sd3, sd3_inv):
    model, clip = sd3
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 40:88] = 1.0
    message = error_of("AttnEditCPAMSelfAttn", model=model, inversion=sd3_inv, clip=clip, source_mask=mask,
                       target_prompt=TGT, strategy="remove object")
    assert "`strategy` 'remove object' does not run on SD3 / SD3.5" in message
    assert "'replace object' or 'change background'" in message
    with pytest.raises(ValueError, match="the connected MODEL is SD3 / SD3.5.*on SD3 / SD3.5 the pack does"):
        pkg("inversion.comfy_model").require_family(model, "MAG-Edit")
    message = error_of("AttnEditInvert", model=model, clip=clip, source_prompt=SRC, method="ddim", steps=2, cfg=1.0,
                       latent=sd3_latent())
    assert "SD3" in message and "flow_euler" in message, message


@pytest.mark.newer_host(NEWER)
def test_odd_latent_sides_give_the_padded_token_grid(sd3):
    """MMDiT pads the latent to the patch size (PatchEmbed dynamic_img_pad), as Flux does: a 15x9 latent gives an 8x5
    token grid, and the joint layout matches it (otherwise the calls would fall back to the host kernel uncaptured)."""
    model, clip = sd3
    latent = {"samples": torch.randn(1, 16, 15, 9, generator=torch.Generator().manual_seed(5))}
    inv, _n, _s, recon, _p, store = invert(model, clip, steps=2, latent=latent)
    assert store.cross_map().shape == (1, 8, 5, 77) and recon["samples"].shape == (1, 16, 15, 9)


@pytest.mark.newer_host(NEWER)
def test_heat_maps_and_mask_from_attention_on_sd3(sd3):
    """Attention Heat Maps labels the SD3 maps with CLIP words; Mask from Attention (local blend) equals P2P's
    local-blend maths on the 8x8 token grid."""
    model, clip = sd3
    _inv, _n, _s, _r, _p, store = invert(model, clip)
    image = torch.rand(1, 128, 128, 3)
    (heat,) = call_node("AttnEditAttentionPreview", attention=store, image=image, branch="source", words="cat, photo")
    assert heat.shape[0] == 2 and torch.isfinite(heat).all()
    full, grid, _preview = call_node("AttnEditMaskFromAttention", attention=store, mode="local blend", words="cat",
                                     image=image)
    maps = store.cross_map()[0]
    expect = pkg("attention.p2p").local_blend_mask(maps.reshape(1, 64, 77), [[5]], (16, 16), (8, 8), 0.3, 1)[0, 0]
    assert torch.equal(grid[0], expect) and full.shape == (1, 128, 128) and 0 < float(expect.mean()) <= 1
    with pytest.raises(ValueError, match="the word 'tiger' is not in the source prompt"):
        call_node("AttnEditMaskFromAttention", attention=store, mode="local blend", words="tiger")
