"""SD1.5 at 768 px (issue 18 item 1): every technique's chain on a real 96 x 96 latent, with the grids, masks and
windows each technique uses at that size.

The test UNet is the tiny SD1.5-layout UNet without the transformers of the latent-resolution level
(`tiny_models.make_model(top_level_attention=False)`): its attention grids are SD1.5's at 768 px below the top,
48 x 48 (level 2), 24 x 24 (level 4, the papers' "16x16" semantic level that MAG-Edit, DPL, InstDiffEdit, local blend
and CPAM's layer L read) and 12 x 12 (the middle). The top level's 9216-token self-attention is left out because it
alone makes one 5-step chain take minutes on a CPU; no technique selects that level by a size rule that differs from
the others (they select by level). Step windows at 10, 20 and 50 steps are pinned by each technique's *_steps tests;
the chains here run 4 steps, where every stage still runs at least once.
"""

import pytest
import torch
from conftest import call_node, make_image, pkg

HW = (96, 96)
PX = 768
STEPS = 4
SRC = "a photo of a cat"
DOG = "a photo of a dog"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sd768():
    import tiny_models

    with torch.inference_mode():
        return tiny_models.TinyBundle(tiny_models.make_model(0, top_level_attention=False), tiny_models.make_clip(1),
                                      tiny_models.make_vae(2))


@pytest.fixture(scope="module")
def inversion(sd768):
    return invert(sd768)[0]


def latent(seed=4):
    return {"samples": torch.randn(1, 4, *HW, generator=torch.Generator().manual_seed(seed))}


def box():
    """A 768 px mask: rows 256-511, columns 224-479 (latent cells 32-63 x 28-59; 8 x 8 cells at the 24 x 24 level)."""
    m = torch.zeros(1, PX, PX)
    m[:, 256:512, 224:480] = 1.0
    return m


def invert(m, prompt=SRC, method="direct", steps=STEPS, **kw):
    return call_node("AttnEditInvert", model=m.model, clip=m.clip, source_prompt=prompt, method=method, steps=steps,
                     cfg=7.5, latent=latent(), **kw)


def p2p(m, target=DOG, mode="replace", source=SRC, **kw):
    return call_node("AttnEditAttentionHook", model=m.model, clip=m.clip, source_prompt=source,
                     target_prompt=target, mode=mode, cross_replace=0.8, self_replace=0.4, **kw)[0]


def edited(model, inversion, **kw):
    out, source, store = call_node("AttnEditEditSampler", model=model, inversion=inversion, **kw)
    assert out["samples"].shape == (1, 4, *HW) and torch.isfinite(out["samples"]).all()
    return out["samples"], source["samples"], store


def test_the_test_model_has_sd15_768_grids_below_the_top(sd768):
    sites = pkg("attention.hooks").unet_sites(sd768.model)
    assert sorted({s.level for s in sites}) == [2, 4, 8]
    grids = {pkg("attention.layers").semantic_grid(HW, level) for level in (2, 4, 8)}
    assert grids == {(48, 48), (24, 24), (12, 12)}


def test_p2p_local_blend_and_mask_from_attention(sd768, inversion):
    target, source, store = edited(p2p(sd768, local_blend="cat, dog"), inversion)
    assert not torch.equal(target, source)
    assert store.cross[4].shape[1:3] == (24, 24)  # the sampler captures the semantic level
    mask, latent_mask, _ = call_node("AttnEditMaskFromAttention", attention=store, mode="local blend", words="dog")
    assert mask.shape == (1, PX, PX) and latent_mask.shape == (1, *HW)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(torch.nn.functional.interpolate(latent_mask[None], size=(PX, PX))[0], mask)


def test_mag_edit_guides_on_the_24x24_level_and_blends_outside_the_mask(sd768, inversion):
    inv = inversion
    model = call_node("AttnEditMAGGuidance", model=p2p(sd768, "a photo of a yellow striped cat", mode="refine"),
                      inversion=inv, mask=box(), target_words="yellow", constraint="token_ratio", max_iterations=1,
                      guidance_steps=25, scale=2.5, blend_steps=15)[0]
    hooks = pkg("attention.hooks")
    hook = hooks.step_hooks_of(model)[0]
    assert hook.semantic_grid == (24, 24)
    target = hooks.controllers_of(model)[0].target_conditioning
    with torch.inference_mode():
        final, _, state = pkg("inversion.engine").edit_image(model, inv, 0, target, hooks.step_hooks_of(model),
                                                             grad=True)
    trace = state["mag_edit"]
    assert sorted(trace["loss"]) == [0, 1]  # 25 of 50 -> 2 of 4 guided steps
    assert trace["blended"] == [3]  # 15 of 50 -> round(1.2) = 1 blended step
    outside = (hook.blend_masks[0] == 0).expand_as(final[1])
    assert hook.blend_masks[0].shape[-2:] == HW and 0 < outside.float().mean() < 1
    assert torch.equal(final[1][outside], final[0][outside])


def test_dpl_learns_on_the_24x24_level_and_edits(sd768):
    inv, store, background, recon, _ = call_node(
        "AttnEditDynamicPromptLearn", model=sd768.model, clip=sd768.clip, source_prompt="a cat and a dog",
        nouns="cat, dog", steps=3, cfg=7.5, latent=latent(), token_iterations=1, null_text_iterations=1)
    assert inv.latent_hw == HW and recon["samples"].shape == (1, 4, *HW)
    assert inv.extras["dpl"]["background"][0].shape == (24, 24)  # the loss grid
    assert inv.extras["dpl"]["estimated_background"][0].shape == (48, 48)  # Sec. 3.3 clusters level-2 self-attention
    assert store.cross[4].shape == (1, 24, 24, 77) and background.shape == (1, PX, PX)
    target, source, _ = edited(p2p(sd768, "a cat and a bird", source="a cat and a dog"), inv)
    assert not torch.equal(target, source)


def test_masafusion_keeps_the_shape_and_an_empty_region_keeps_the_source(sd768, inversion):
    inv = inversion

    def fuse(mask, **kw):
        target, intermediate, source = call_node(
            "AttnEditFusionWithAdapter", model=sd768.model, clip=sd768.clip, inversion=inv, target_prompt=DOG,
            mask=mask, seed=7, start_step=0, layers="all", **kw)
        for x in (target, intermediate, source):
            assert x["samples"].shape == (1, 4, *HW) and torch.isfinite(x["samples"]).all()
        return target["samples"], source["samples"]

    target, source = fuse(box())
    assert not torch.allclose(target, source, atol=1e-3)
    empty_target, empty_source = fuse(torch.zeros(1, PX, PX), adapter_on_target=False)
    assert torch.allclose(empty_target, empty_source, atol=5e-2, rtol=0)


def test_instdiffedit_on_a_768_px_image(sd768):
    shapes = []
    clone = sd768.model.clone()

    def recording(apply_model, args):
        shapes.append(tuple(args["input"].shape))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(recording)
    image = make_image(size=PX, seed=3)
    out, mask, lat = call_node("AttnEditInstantEdit", image=image, model=clone, clip=sd768.clip, vae=sd768.vae,
                               edit_text="a photo of a dog", steps=STEPS, seeds=1)
    assert set(shapes) == {(2, 4, *HW)}
    assert out.shape == (1, PX, PX, 3) and torch.isfinite(out).all()
    assert mask.shape == (1, PX, PX) and float(mask.min()) >= 0 and float(mask.max()) <= 1
    assert lat["samples"].shape == (1, 4, *HW)


def test_cpam_replaces_the_object_on_the_semantic_level_layer(sd768):
    inv = invert(sd768, method="ddim_null_prompt")[0]
    model, _ = call_node("AttnEditCPAMSelfAttn", model=sd768.model, inversion=inv, clip=sd768.clip,
                         source_mask=box(), target_prompt=DOG, strategy="replace object", object_words="dog")
    ctrl = pkg("attention.hooks").controllers_of(model)[-1]
    # L = output block 4, the decoder's second block at the 24 x 24 level (layer 6 of this UNet's 11 blocks)
    assert ctrl.layers[("output", 4)] == ctrl.start_layer == 6
    assert ctrl.source_masks.shape[-2:] == ctrl.target_masks.shape[-2:] == HW
    inside = ctrl.source_masks[0, 32:64, 28:60]
    assert bool((inside > 0).all()) and float(ctrl.source_masks[0].sum()) == 32 * 32
    assert float(ctrl.target_masks[0].sum()) > 32 * 32  # M_t grows (Sec. 3.4), even for an 11% object
    target, source, _ = edited(model, inv, source_branch="pin to inversion")
    assert not torch.equal(target, source)
