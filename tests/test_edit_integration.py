"""Edit sampler + Prompt-to-Prompt on real ComfyUI machinery: parity, isolation, layouts (tiny model, CPU)."""

import copy

import pytest
import torch
from conftest import call_node, make_latent, pkg

SRC = "a photo of a cat"
STEPS = 6


@pytest.fixture(scope="module")
def inversion(tiny):
    return call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="null_text",
                     steps=STEPS, cfg=7.5, latent=make_latent(seed=4), inner_steps=2)[0]


def hook(tiny, target, mode="replace", **kw):
    return call_node("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip, source_prompt=SRC,
                     target_prompt=target, mode=mode, cross_replace=kw.pop("cross", 0.8),
                     self_replace=kw.pop("self", 0.4), **kw)


def edit(model, inversion, **kw):
    return call_node("AttnEditEditSampler", model=model, inversion=inversion, **kw)


def test_same_prompt_reproduces_the_source_branch(tiny, inversion):
    model, _ = hook(tiny, SRC)
    edited, source, _ = edit(model, inversion)
    assert float((edited["samples"] - source["samples"]).abs().max()) <= 1e-5


def test_inactive_controller_is_bit_identical_to_the_unpatched_model(tiny, inversion):
    import nodes

    patched, target = hook(tiny, "a photo of a dog", cross=0.0, self=0.0)
    negative = pkg("inversion.comfy_model").encode_text(tiny.clip, "")
    args = dict(seed=3, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", positive=target,
                negative=negative, latent_image=make_latent(seed=5), denoise=1.0)
    with torch.inference_mode():
        plain = nodes.KSampler().sample(tiny.model, **args)[0]["samples"]
        hooked = nodes.KSampler().sample(patched, **args)[0]["samples"]
    assert torch.equal(plain, hooked)
    # inside the edit sampler, a controller whose windows are empty equals running without it
    a, _, _ = edit(patched, inversion)
    b, _, _ = edit(tiny.model, inversion, target=target)
    assert torch.equal(a["samples"], b["samples"])


def test_reweight_by_one_is_identity(tiny, inversion):
    a, _ = hook(tiny, "a photo of a dog")
    b, _ = hook(tiny, "a photo of a dog", reweight="dog=1.0")
    assert torch.equal(edit(a, inversion)[0]["samples"], edit(b, inversion)[0]["samples"])
    c, _ = hook(tiny, "a photo of a dog", reweight="dog=3.0")
    assert not torch.equal(edit(a, inversion)[0]["samples"], edit(c, inversion)[0]["samples"])


def test_patching_leaves_the_input_model_untouched_and_runs_repeat(tiny, inversion):
    before = copy.deepcopy(tiny.model.model_options)
    model, _ = hook(tiny, "a photo of a dog", local_blend="cat, dog")
    assert tiny.model.model_options == before
    first = edit(model, inversion)[0]["samples"]
    other = edit(hook(tiny, "a photo of a bird")[0], inversion)[0]["samples"]  # a different edit in between
    again = edit(model, inversion)[0]["samples"]
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert tiny.model.model_options == before


def test_local_blend_keeps_the_source_outside_the_mask(tiny):
    engine = pkg("inversion.engine")
    inversion = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                          steps=STEPS, cfg=7.5, latent=make_latent(size=32, seed=4))[0]
    model, target = hook(tiny, "a photo of a dog", local_blend="cat, dog", blend_threshold=0.8, blend_start=0.0)
    hooks = pkg("attention.hooks").step_hooks_of(model)
    with torch.inference_mode():
        final, _captured, state = engine.edit_image(model, inversion, 0, target, hooks)
    mask = state["local_blend_mask"]
    assert 0 < float(mask.mean()) < 1, "test needs a non-trivial mask"
    outside = (1 - mask).bool().expand_as(final[0])
    assert torch.equal(final[1][outside], final[0][outside])
    assert not torch.equal(final[1], final[0])


def test_direct_inversion_reconstruction_output_is_the_input_latent(tiny):
    """Direct inversion regenerates the source exactly: the node's `reconstruction` is the clean latent it inverted
    (the last inversion latent, not the noise), up to float rounding of the scale round trip."""
    latent = make_latent(seed=8)
    _inv, noise, _sigmas, recon, *_ = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC,
                                               method="direct", steps=STEPS, cfg=7.5, latent=latent)
    assert torch.allclose(recon["samples"], latent["samples"], atol=1e-5)
    assert not torch.allclose(noise["samples"], latent["samples"], atol=1e-2)


def test_image_batch_is_edited_image_by_image(tiny):
    latents = make_latent(batch=2, seed=6)
    model, _ = hook(tiny, "a photo of a dog")
    inv2 = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                     steps=STEPS, cfg=7.5, latent=latents)[0]
    both = edit(model, inv2)[0]["samples"]
    for i in range(2):
        single = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                           steps=STEPS, cfg=7.5, latent={"samples": latents["samples"][i:i + 1]})[0]
        assert torch.allclose(edit(model, single)[0]["samples"][0], both[i], atol=1e-5)


def test_cfg_one_single_chunk_layout(tiny):
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="ddim",
                    steps=STEPS, cfg=1.0, latent=make_latent(seed=7))[0]
    model, _ = hook(tiny, SRC)
    edited, source, store = edit(model, inv)
    assert float((edited["samples"] - source["samples"]).abs().max()) <= 1e-5
    assert store.cross[4].shape[0] == 2


def test_cond_and_uncond_in_separate_calls_match_batched(tiny, inversion, monkeypatch):
    """ComfyUI's low-VRAM path runs cond and uncond in separate UNet calls; the edit must not change."""
    import comfy.model_management

    model, _ = hook(tiny, "a photo of a dog", local_blend="cat, dog")
    batched = edit(model, inversion)[0]["samples"]
    calls = []
    wrapper_module = pkg("attention.hooks")
    original = wrapper_module._call_inner

    def spy(prev, apply_model, args):
        calls.append(list(args["cond_or_uncond"]))
        return original(prev, apply_model, args)

    real = comfy.model_management.get_free_memory

    def no_room_for_batching(dev=None, torch_free_too=False):  # attention kernels ask with torch_free_too=True
        return real(dev, torch_free_too) if torch_free_too else 0

    monkeypatch.setattr(comfy.model_management, "get_free_memory", no_room_for_batching)
    monkeypatch.setattr(wrapper_module, "_call_inner", spy)
    split = edit(model, inversion)[0]["samples"]
    assert calls and all(len(c) == 1 for c in calls), calls[:4]
    assert torch.allclose(split, batched, rtol=1e-4, atol=1e-3)  # float noise of batching only
