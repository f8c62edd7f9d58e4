"""Issue 18, bad input: images below the model's minimum, a CLIP of another family, an inversion reused with a
weight-patched (LoRA'd) MODEL, torch's own ValueErrors, and knobs that cannot take effect at the run's step count.
Each is a clear error (or a warning) naming the input, the value and the fix, and the next run is unaffected."""

import logging
import re

import pytest
import tiny_families
import torch
from conftest import call_node, make_image, make_latent, pkg

SRC = "a photo of a cat"
DOG = "a photo of a dog"
PAIR = "a cat and a dog"


def box(size=128, top=32, left=40, height=64, width=64):
    mask = torch.zeros(1, size, size)
    mask[:, top:top + height, left:left + width] = 1.0
    return mask


def error_of(node_id, **inputs):
    with pytest.raises(ValueError) as info:
        call_node(node_id, **inputs)
    message = str(info.value)
    assert message.startswith("[Attention Edit] "), message
    return message


@pytest.fixture(scope="module")
def sdxl():
    return tiny_families.make_sdxl(0)


@pytest.fixture(scope="module")
def inv(tiny):
    return call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="ddim", steps=3,
                     cfg=7.5, latent=make_latent(seed=8))[0]


def invert(model, clip, **kw):
    kw.setdefault("latent", make_latent(seed=8))
    return call_node("AttnEditInvert", model=model, clip=clip, source_prompt=SRC, method="ddim", steps=2, cfg=7.5,
                     **kw)


# ----------------------------------------------------------------------------------------------- image size
IMAGE_NODES = {
    "AttnEditInvert": dict(source_prompt=SRC, method="ddim", steps=2, cfg=7.5),
    "AttnEditDynamicPromptLearn": dict(source_prompt=PAIR, nouns="cat, dog", steps=2, cfg=7.5, token_iterations=1,
                                       null_text_iterations=1),
    "AttnEditInstantEdit": dict(edit_text=DOG, steps=2),
}


@pytest.mark.parametrize("node_id", sorted(IMAGE_NODES))
@pytest.mark.parametrize("family, size, minimum", [("sd1", 8, 64), ("sd1", 56, 64), ("sdxl", 8, 32),
                                                   ("sdxl", 24, 32)])
def test_image_below_the_model_minimum_is_refused_by_size(tiny, sdxl, node_id, family, size, minimum):
    """8x8 px used to end in torch's GroupNorm "Expected more than 1 value per channel" dressed as a pack error."""
    model, clip = (tiny.model, tiny.clip) if family == "sd1" else sdxl
    message = error_of(node_id, model=model, clip=clip, vae=tiny.vae, image=make_image(size), **IMAGE_NODES[node_id])
    assert f"`image` is {size // 8 * 8}x{size // 8 * 8} px" in message, message
    assert f"needs at least {minimum}x{minimum} px ({minimum // 8}x{minimum // 8} cells, one per UNet level)" in message
    assert "Use a larger image" in message and "Expected more than 1 value" not in message


def test_smallest_allowed_image_works_and_the_next_run_is_unaffected(tiny, sdxl):
    before = invert(tiny.model, tiny.clip)[3]["samples"]
    with pytest.raises(ValueError):
        call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="ddim", steps=2,
                  cfg=7.5, image=make_image(8), vae=tiny.vae)
    assert torch.equal(invert(tiny.model, tiny.clip)[3]["samples"], before)
    ok = invert(tiny.model, tiny.clip, latent=None, image=make_image(64), vae=tiny.vae)  # SD1.x minimum: 64 px
    assert ok[1]["samples"].shape[-2:] == (8, 8)
    ok = invert(*sdxl, latent=None, image=make_image(32), vae=tiny.vae)  # SDXL minimum: 32 px
    assert ok[1]["samples"].shape[-2:] == (4, 4)


def test_latent_below_the_model_minimum_is_refused(tiny, sdxl):
    message = error_of("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="ddim", steps=2,
                       cfg=7.5, latent=make_latent(size=2))
    assert "`latent` is 16x16 px (2x2 latent cells); this SD1.x MODEL needs at least 64x64 px" in message, message
    # every node that samples goes through run_sampler, which refuses the same way (DPL here)
    message = error_of("AttnEditDynamicPromptLearn", model=sdxl[0], clip=sdxl[1], latent=make_latent(size=2),
                       **IMAGE_NODES["AttnEditDynamicPromptLearn"])
    assert "the latent is 16x16 px (2x2 latent cells); this SDXL MODEL needs at least 32x32 px" in message, message


def test_minimum_latent_side_per_family(tiny, sdxl):
    cm = pkg("inversion.comfy_model")
    assert cm.min_latent_side(tiny.model) == 8 and cm.min_latent_side(sdxl[0]) == 4


# ----------------------------------------------------------------------------------------------- internal errors
def test_torch_value_errors_are_not_presented_as_input_checks(tiny):
    common = pkg("nodes.common")

    def torch_fails():  # torch's own check, as GroupNorm / BatchNorm raise it on one value per channel
        return torch.nn.functional.batch_norm(torch.zeros(1, 32), None, None, training=True)

    with pytest.raises(common.AttnEditInternalError) as info:
        common.wrap_errors("Invert Image", torch_fails)
    message = str(info.value)
    assert not isinstance(info.value, ValueError)
    assert message.startswith("[Attention Edit] Invert Image: internal failure while running torch_fails: "
                              "ValueError: Expected more than 1 value per channel"), message
    assert "not one of the pack's input checks" in message
    assert isinstance(info.value.__cause__, ValueError)  # the original, with torch's traceback, is chained

    # the pack's own checks stay input errors
    with pytest.raises(common.AttnEditError, match=r"\[Attention Edit\] X: steps must be >= 1, got 0"):
        common.wrap_errors("X", pkg("inversion.schedule").ddim_sigmas, torch.linspace(0.1, 10, 1000), 0)


def test_a_torch_value_error_inside_a_node_names_what_was_running(tiny):
    class BrokenVae:  # a VAE whose encoder fails inside torch (e.g. a GroupNorm on one value per channel)
        downscale_ratio = 8

        def encode(self, pixels):
            return torch.nn.functional.batch_norm(torch.zeros(1, 32), None, None, training=True)

    with pytest.raises(RuntimeError) as info:
        call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="ddim", steps=2,
                  cfg=7.5, image=make_image(64), vae=BrokenVae())
    assert not isinstance(info.value, ValueError)
    assert "internal failure while running vae_encode (inversion/comfy_model.py)" in str(info.value), info.value


# ----------------------------------------------------------------------------------------------- CLIP family
def clip_nodes(tiny, inv, clip):
    """(node id, inputs) of every node that takes a CLIP or CONDITIONING with a MODEL, given `clip` (a CLIP of
    another family): the CONDITIONING inputs get that CLIP's encoding."""
    other = pkg("inversion.comfy_model").encode_text(clip, DOG)
    return [
        ("AttnEditInvert", dict(model=tiny.model, clip=clip, source_prompt=SRC, method="ddim", steps=2, cfg=7.5,
                                latent=make_latent())),
        ("AttnEditAttentionHook", dict(model=tiny.model, clip=clip, source_prompt=SRC, target_prompt=DOG,
                                       mode="replace", cross_replace=0.8, self_replace=0.4)),
        ("AttnEditEditSampler", dict(model=tiny.model, inversion=inv, target=other)),
        ("AttnEditCPAMSelfAttn", dict(model=tiny.model, inversion=inv, clip=clip, source_mask=box(),
                                      target_prompt=DOG, strategy="replace object")),
        ("AttnEditFusionWithAdapter", dict(model=tiny.model, inversion=inv, clip=clip, target_prompt=DOG,
                                           mask=box(), seed=0, start_step=0, layers="all")),
        ("AttnEditDynamicPromptLearn", dict(model=tiny.model, clip=clip, latent=make_latent(),
                                            **IMAGE_NODES["AttnEditDynamicPromptLearn"])),
        ("AttnEditInstantEdit", dict(model=tiny.model, clip=clip, vae=tiny.vae, image=make_image(64),
                                     **IMAGE_NODES["AttnEditInstantEdit"])),
    ]


def test_a_clip_of_another_family_is_refused_at_every_node(tiny, sdxl, inv):
    """SDXL CLIP into an SD1.5 UNet used to fail inside the model with "mat1 and mat2 shapes cannot be multiplied"."""
    cm = pkg("inversion.comfy_model")
    width = cm.context_width(tiny.model)
    for node_id, inputs in clip_nodes(tiny, inv, sdxl[1]):
        message = error_of(node_id, **inputs)
        what = "`target`" if node_id == "AttnEditEditSampler" else "`clip`"
        assert re.search(rf"{what} comes from a text encoder of width 64 \(another model's CLIP\) but this SD1.x "
                         rf"MODEL takes text embeddings of width {width}; connect the CLIP of the same checkpoint",
                         message), (node_id, message)
        assert "mat1 and mat2" not in message
    # and an SD1.x CLIP into the SDXL UNet
    message = error_of("AttnEditInvert", model=sdxl[0], clip=tiny.clip, source_prompt=SRC, method="ddim", steps=2,
                       cfg=7.5, latent=make_latent())
    assert "width 32 (another model's CLIP) but this SDXL MODEL takes text embeddings of width 64" in message
    # the hook's own target (an SDXL-encoded hook on an SD1 model cannot be built, so check the sampler's function)
    common = pkg("nodes.common")
    with pytest.raises(common.AttnEditError, match=r"width 2048 \(SDXL CLIP\) but this SD1.x MODEL"):
        common.check_text_encoder("N", tiny.model, torch.zeros(1, 77, 2048), "`clip`")
    for other, family in ((768, "SD1.x"), (1024, "SD2.x"), (2048, "SDXL"), (4096, "Flux / SD3 T5-XXL"),
                          (767, "another model's"), (1025, "another model's")):  # the real families' widths, exactly
        with pytest.raises(common.AttnEditError, match=rf"width {other} \({family} CLIP\) but this SDXL MODEL"):
            common.check_text_encoder("N", sdxl[0], torch.zeros(1, 77, other), "`clip`")
    common.check_text_encoder("N", tiny.model, torch.zeros(1, 77, width), "`clip`")  # the right width passes


def test_after_a_refused_clip_the_next_run_is_unaffected(tiny, sdxl):
    before = invert(tiny.model, tiny.clip)
    with pytest.raises(ValueError):
        invert(tiny.model, sdxl[1])
    after = invert(tiny.model, tiny.clip)
    assert torch.equal(before[0].latents, after[0].latents) and torch.equal(before[3]["samples"], after[3]["samples"])


# ----------------------------------------------------------------------------------------------- patched MODEL
def lora(model, scale=0.05):
    """A real weight patch (what LoraLoader does: ModelPatcher.add_patches) on a clone of the tiny model."""
    patched = model.clone()
    key = "diffusion_model.out.2.weight"
    weight = patched.model.state_dict()[key]
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * scale
    assert patched.add_patches({key: (delta,)}, 1.0) == [key]
    return patched


def test_inversion_reused_with_a_weight_patched_model_warns(tiny, inv, caplog):
    cm = pkg("inversion.comfy_model")
    patched = lora(tiny.model)
    assert cm.model_fingerprint(tiny.model.clone()) == cm.model_fingerprint(tiny.model)  # a plain clone is the same
    assert cm.model_fingerprint(patched) != cm.model_fingerprint(tiny.model)
    assert cm.model_fingerprint(patched)[:4] == cm.model_fingerprint(tiny.model)[:4]  # same base model
    dog = cm.encode_text(tiny.clip, DOG)
    with caplog.at_level(logging.WARNING):
        plain = call_node("AttnEditEditSampler", model=tiny.model, inversion=inv, target=dog)
    assert "weight patches" not in caplog.text
    with caplog.at_level(logging.WARNING):
        drifted = call_node("AttnEditEditSampler", model=patched, inversion=inv, target=dog)
    assert re.search(r"\[Attention Edit\] Attention Edit Sampler: the MODEL's weight patches \(1 patched weights "
                     r"#\w+\) differ from those of the MODEL `inversion` was made with \(none\), e.g. a LoRA applied "
                     r"after inverting: the source branch will not regenerate the input. Invert with the same "
                     r"patched MODEL you edit with, or set the sampler's `source_branch` to 'pin to inversion'",
                     caplog.text), caplog.text
    assert not torch.equal(plain[1]["samples"], drifted[1]["samples"])  # the patch is real: the source drifts
    # pinning the source branch to the inversion is the other fix: the LoRA then only acts on the target, no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pinned = call_node("AttnEditEditSampler", model=patched, inversion=inv, target=dog,
                           source_branch="pin to inversion")
    assert "weight patches" not in caplog.text
    assert torch.allclose(pinned[1]["samples"], pkg("inversion.comfy_model").latent_to_raw(tiny.model, inv.latents[-1]))
    # inverting with the patched model gives an inversion that matches it: no warning
    caplog.clear()
    inv_patched = call_node("AttnEditInvert", model=patched, clip=tiny.clip, source_prompt=SRC, method="ddim",
                            steps=3, cfg=7.5, latent=make_latent(seed=8))[0]
    with caplog.at_level(logging.WARNING):
        call_node("AttnEditEditSampler", model=patched, inversion=inv_patched, target=dog)
    assert "weight patches" not in caplog.text
    # another LoRA strength is another patch
    assert cm.model_fingerprint(lora(tiny.model, 0.1)) != cm.model_fingerprint(patched)
    # and the next plain run equals the first
    assert torch.equal(call_node("AttnEditEditSampler", model=tiny.model, inversion=inv, target=dog)[0]["samples"],
                       plain[0]["samples"])


def test_another_base_model_is_still_refused(tiny, inv):
    other = pkg("inversion.trajectory").InversionTrajectory(
        **{**inv.__dict__, "fingerprint": ("SDXL", "sdxl", "", 1, "")})
    message = error_of("AttnEditEditSampler", model=tiny.model, inversion=other,
                       target=pkg("inversion.comfy_model").encode_text(tiny.clip, DOG))
    assert "`inversion` was made with another model (SDXL, sdxl)" in message



def test_patch_nodes_leave_the_weight_patch_warning_to_the_sampler(tiny, inv, caplog):
    """MAG-Edit and CPAM only check the base model; whether a LoRA'd model drifts from the inversion is said once, by
    the sampler, where the source branch runs. Under CPAM the sampler pins the source, so nothing is said at all."""
    patched = lora(tiny.model)
    mask = box()
    hook = call_node("AttnEditAttentionHook", model=patched, clip=tiny.clip, source_prompt=SRC,
                     target_prompt="a photo of a white cat", mode="refine", cross_replace=0.8, self_replace=0.5)[0]
    with caplog.at_level(logging.WARNING):
        mag = call_node("AttnEditMAGGuidance", model=hook, inversion=inv, mask=mask, target_words="white",
                        constraint="token_ratio", max_iterations=1, guidance_steps=25, scale=2.5)[0]
        cpam = call_node("AttnEditCPAMSelfAttn", model=patched, inversion=inv, clip=tiny.clip, source_mask=mask,
                         target_prompt=DOG, strategy="edit object (keep identity)")[0]
    assert "weight patches" not in caplog.text
    with caplog.at_level(logging.WARNING):
        call_node("AttnEditEditSampler", model=cpam, inversion=inv)
    assert "weight patches" not in caplog.text  # CPAM pins the source branch to the inversion
    with caplog.at_level(logging.WARNING):
        call_node("AttnEditEditSampler", model=mag, inversion=inv)
    assert caplog.text.count("weight patches (") == 1 and "Attention Edit Sampler: the MODEL's weight patches" in \
        caplog.text


def test_invert_warns_about_knobs_the_method_or_model_does_not_read(tiny, caplog):
    """inner_steps away from its default on a method other than null_text, and guidance away from its default on a
    model without a guidance embedding, are named in a warning; at their defaults, or where they are read, nothing."""
    with caplog.at_level(logging.WARNING):
        invert(tiny.model, tiny.clip, inner_steps=3, guidance=5.0)
    assert "`inner_steps` 3 is only used by method null_text (this is ddim)" in caplog.text
    assert "`guidance` 5 is only used by models with a guidance embedding (Flux-dev)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        invert(tiny.model, tiny.clip)
        call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="null_text", steps=2,
                  cfg=7.5, latent=make_latent(seed=8), inner_steps=3)
    assert "is only used by" not in caplog.text
