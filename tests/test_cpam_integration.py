"""CPAM node + edit sampler on real ComfyUI machinery (tiny model, CPU): parity, the equations on recorded calls,
mask refinement, seeds, batches, isolation and input errors."""

import copy
import dataclasses

import pytest
import torch
from conftest import call_node, make_latent, pkg

cpam = pkg("attention.cpam")
core = pkg("attention.core")
hooks = pkg("attention.hooks")
run_mod = pkg("attention.run")
ops = pkg("masks.ops")
engine = pkg("inversion.engine")

SRC = "a photo of a cat on a sofa"
STEPS = 4


@pytest.fixture(scope="module")
def inversion(tiny):
    return call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="null_text",
                     steps=STEPS, cfg=7.5, latent=make_latent(seed=4), inner_steps=2)[0]


def box_mask(size=128, top=32, left=48, height=64, width=48, batch=1):
    mask = torch.zeros(batch, size, size)
    mask[:, top:top + height, left:left + width] = 1.0
    return mask


def patch(tiny, inversion, strategy, mask=None, target=SRC, **kw):
    return call_node("AttnEditCPAMSelfAttn", model=tiny.model, inversion=inversion, clip=tiny.clip,
                     source_mask=box_mask() if mask is None else mask, target_prompt=target, strategy=strategy, **kw)


def edit(model, inversion, **kw):
    return call_node("AttnEditEditSampler", model=model, inversion=inversion, **kw)


class Spy(run_mod.Controller):
    """Test-only controller installed after CPAM: records every call of the edit sampler with CPAM's output."""

    EDITS_OUTPUT = True

    def __init__(self):
        self.calls = []

    def active(self, call):
        return call.run is not None and "target" in call.run.roles

    def edit_output(self, call, out):
        self.calls.append({"kind": call.kind, "site": call.site, "step": call.step, "grid": call.grid,
                           "q": call.q.clone(), "k": call.k.clone(), "v": call.v.clone(), "out": out.clone(),
                           "heads": call.heads, "layout": call.layout, "call": call,
                           "extra": {n: (k.clone(), v.clone()) for n, (k, v) in call.extra.items()},
                           "refined": call.run.scratch.get(cpam.REFINED_MASK)})
        return out


def spied_run(model, inversion):
    spy = Spy()
    spied = hooks.add_controller(model, spy)
    with torch.inference_mode():
        target = hooks.controllers_of(model)[-1].target_conditioning
        final, _, state = engine.edit_image(spied, inversion, 0, target, hooks.step_hooks_of(model))
    return spy.calls, final, state


def reference_attention(q, k, v, heads, keys=None):
    """Explicit float64 softmax attention (test reference), keys [T] bool or None."""
    qh, kh, vh = (core.split_heads(t, heads).double() for t in (q, k, v))
    logits = qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5
    if keys is not None:
        logits = logits.masked_fill(~keys.view(1, 1, 1, -1), float("-inf"))
    return core.merge_heads(logits.softmax(-1) @ vh)


def grid_mask(mask, grid):
    return ops.mask_to_grid(mask, grid, binary=True).flatten().bool()


def pairs(call):
    c = call["call"]
    return [(c.role_rows(lab, "source")[0], c.role_rows(lab, "target")[0]) for lab in call["layout"].labels]


# ------------------------------------------------------------------------------------------------ parity
def test_all_background_mask_with_the_source_prompt_reproduces_the_source(tiny, inversion):
    # 'change background' with a mask that keeps nothing: the whole picture is the (new) background, which is
    # generated from the source prompt, so the target branch must regenerate the source reconstruction.
    model, target = patch(tiny, inversion, "change background", mask=torch.zeros(1, 128, 128))
    edited, source, _ = edit(model, inversion, source_branch="pin to inversion")
    regenerated = edit(tiny.model, inversion, target=target)[0]  # plain sampling of the source prompt, no hook
    assert float((edited["samples"] - regenerated["samples"]).abs().max()) <= 1e-5
    # the same mask read as the object to edit (nothing) is an input error, not a silent no-op
    with pytest.raises(ValueError, match="`source_mask` is empty for image 0"):
        patch(tiny, inversion, "replace object", mask=torch.zeros(1, 128, 128))


def test_source_branch_is_untouched_and_the_edit_acts(tiny, inversion):
    model, target = patch(tiny, inversion, "replace object", target="a photo of a dog on a sofa")
    edited, source, _ = edit(model, inversion, source_branch="pin to inversion")
    plain_edit, plain_source, _ = edit(tiny.model, inversion, target=target, source_branch="pin to inversion")
    assert torch.allclose(source["samples"], plain_source["samples"], atol=1e-5)
    assert float((edited["samples"] - plain_edit["samples"]).abs().max()) > 1e-3


def test_patched_model_outside_the_edit_sampler_is_bit_identical(tiny):
    import nodes

    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="ddim",
                    steps=STEPS, cfg=1.0, latent=make_latent(seed=2))[0]
    patched, target = patch(tiny, inv, "replace object", target="a photo of a dog on a sofa")
    negative = pkg("inversion.comfy_model").encode_text(tiny.clip, "")
    args = dict(seed=3, steps=3, cfg=5.0, sampler_name="euler", scheduler="normal", positive=target,
                negative=negative, latent_image=make_latent(seed=5), denoise=1.0)
    with torch.inference_mode():
        plain = nodes.KSampler().sample(tiny.model, **args)[0]["samples"]
        hooked = nodes.KSampler().sample(patched, **args)[0]["samples"]
    assert torch.equal(plain, hooked)


def test_a_foreign_cross_attention_patch_after_cpam_never_sees_the_null_tokens(tiny, inversion):
    seen = []

    def foreign(q, k, v, extra_options):  # another pack's attn2 replace at one site, added after CPAM
        from comfy.ldm.modules.attention import optimized_attention

        seen.append(k.shape[1])
        return optimized_attention(q, k, v, extra_options["n_heads"])

    model, _ = patch(tiny, inversion, "replace object", target="a photo of a dog on a sofa")
    model = model.clone()
    model.set_model_attn2_replace(foreign, "input", 1, 0)
    assert torch.isfinite(edit(model, inversion)[0]["samples"]).all()
    assert seen and set(seen) == {77}  # the prompt's 77 tokens only (154 with the null tokens appended)


# ------------------------------------------------------------------------------------------------ equations
def test_self_attention_follows_eq_1_to_3_on_every_recorded_call(tiny, inversion):
    mask = box_mask()
    model, _ = patch(tiny, inversion, "edit object (keep identity)", mask=mask, target="a photo of a cat jumping",
                     start_step=25, start_layer=8, mask_expand=0.0, free_layers=0.2, seed=5)  # S: 25 of 50 -> 2 of 4
    ctrl = hooks.controllers_of(model)[-1]
    assert ctrl.start_step == 2
    calls, _, _ = spied_run(model, inversion)
    checked = {"free": 0, "retained": 0, "plain": 0}
    for call in (c for c in calls if c["kind"] == "self"):
        step, layer = call["step"], ctrl.layers[(call["site"].block, call["site"].index)]
        m_s = grid_mask(mask, call["grid"])  # M_t = M_s here (no expansion, no refinement)
        free = bool(ctrl.free_layers[step, ctrl.attention_layers[(call["site"].block, call["site"].index,
                                                                   call["site"].depth)]])
        retained = step >= 2 and layer >= 8
        for src, tgt in pairs(call):
            q, k, v = (call[n][tgt:tgt + 1] for n in "qkv")
            ks, vs = call["k"][src:src + 1], call["v"][src:src + 1]
            expected = reference_attention(q, k, v, call["heads"])
            if not free:
                bg_keys = ~m_s if bool((~m_s).any()) else None
                expected[:, ~m_s] = reference_attention(q[:, ~m_s], ks if bg_keys is not None else k,
                                                         vs if bg_keys is not None else v, call["heads"], bg_keys)
                if retained and bool(m_s.any()):
                    expected[:, m_s] = reference_attention(q[:, m_s], ks, vs, call["heads"], m_s)
            assert torch.allclose(call["out"][tgt:tgt + 1].double(), expected, atol=1e-4), (call["site"], step)
        checked["free" if free else "retained" if retained and bool(m_s.any()) else "plain"] += 1
    assert all(checked.values()), checked  # every branch of Eq. 2/3 and the 10% rule was exercised


def test_cross_attention_outside_the_target_mask_is_the_null_prompt_output(tiny, inversion):
    mask = box_mask()
    model, _ = patch(tiny, inversion, "replace object", mask=mask, target="a photo of a dog on a sofa",
                     mask_expand=0.0)
    calls, _, _ = spied_run(model, inversion)
    cross = [c for c in calls if c["kind"] == "cross"]
    assert cross and all("null" in c["extra"] for c in cross)
    to_k = tiny.model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    for call in cross:
        inside = grid_mask(mask, call["grid"])
        kn, vn = call["extra"]["null"]
        for tgt in call["call"].role_rows(0, "target"):
            null_out = core.masked_attention(call["q"][tgt:tgt + 1], kn[tgt:tgt + 1], vn[tgt:tgt + 1], call["heads"])
            assert torch.equal(call["out"][tgt:tgt + 1, ~inside], null_out[:, ~inside])
            if bool(inside.any()):
                assert not torch.allclose(call["out"][tgt:tgt + 1, inside], null_out[:, inside])
        if call["site"].block == "input" and call["site"].index == 1:  # the null tokens are the step's ∅_t
            with torch.inference_mode():
                expected = to_k(inversion.uncond[call["step"], 0][None])
            assert torch.allclose(kn[0:1], expected, atol=1e-5)


def test_mask_refinement_follows_the_object_words(tiny, inversion):
    model, _ = patch(tiny, inversion, "edit object (keep identity)", target="a photo of a cat jumping",
                     object_words="cat", refine_step=10, refine_threshold=0.25)  # T_m: 10 of 50 -> 1 of 4
    calls, _, state = spied_run(model, inversion)
    refined = state["cpam_target_mask"]
    assert refined.shape == (1, 1, 16, 16) and set(refined.unique().tolist()) <= {0.0, 1.0} and refined.any()
    late = [c for c in calls if c["kind"] == "cross" and c["step"] >= 2]
    assert late and all(c["refined"] is not None for c in late)
    for call in late:  # after T_m, Eq. 4 uses the refined mask
        inside = grid_mask(call["refined"], call["grid"])
        kn, vn = call["extra"]["null"]
        for tgt in call["call"].role_rows(0, "target"):
            null_out = core.masked_attention(call["q"][tgt:tgt + 1], kn[tgt:tgt + 1], vn[tgt:tgt + 1], call["heads"])
            assert torch.equal(call["out"][tgt:tgt + 1, ~inside], null_out[:, ~inside])
    early = [c for c in calls if c["step"] == 0]
    assert all(c["refined"] is None for c in early)


def test_removal_and_regional_prompts_run(tiny, inversion):
    removed, _ = patch(tiny, inversion, "remove object", target="")
    regional, _ = patch(tiny, inversion, "regional prompts", target="a photo of a dog",
                        background_prompt="a snowy forest")
    assert hooks.controllers_of(regional)[-1].region_context is not None
    outs = [edit(m, inversion)[0]["samples"] for m in (removed, regional)]
    assert all(torch.isfinite(o).all() for o in outs) and not torch.equal(outs[0], outs[1])


def test_seed_reproducibility_and_isolation(tiny, inversion):
    before = copy.deepcopy(tiny.model.model_options)
    first = edit(patch(tiny, inversion, "replace object", target="a photo of a dog", seed=1)[0], inversion)[0]
    other = edit(patch(tiny, inversion, "replace object", target="a photo of a dog", seed=2)[0], inversion)[0]
    again = edit(patch(tiny, inversion, "replace object", target="a photo of a dog", seed=1)[0], inversion)[0]
    assert torch.equal(first["samples"], again["samples"]) and not torch.equal(first["samples"], other["samples"])
    assert tiny.model.model_options == before  # patching and sampling never touch the input MODEL


def test_image_batch_uses_each_images_mask(tiny):
    latents = make_latent(batch=2, seed=6)
    masks = torch.cat([box_mask(), box_mask(top=0, left=0, height=48, width=128)])
    inv2 = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="ddim",
                     steps=STEPS, cfg=7.5, latent=latents)[0]
    both = edit(patch(tiny, inv2, "replace object", mask=masks, target="a photo of a dog")[0], inv2)[0]["samples"]
    # the second image must use the second mask (the sampler runs image by image; RunState.image picks the mask)
    single = dataclasses.replace(inv2, latents=inv2.latents[:, 1:2])
    one = edit(patch(tiny, single, "replace object", mask=masks[1:2], target="a photo of a dog")[0], single)
    assert torch.allclose(one[0]["samples"][0], both[1], atol=1e-5)


def test_cfg_one_ddim_uses_the_negative_prompt_as_null(tiny):
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="ddim",
                    steps=STEPS, cfg=1.0, latent=make_latent(seed=7), negative_prompt="blurry")[0]
    model, _ = patch(tiny, inv, "replace object", target="a photo of a dog")
    calls, final, _ = spied_run(model, inv)
    assert torch.isfinite(final).all()
    call = next(c for c in calls if c["kind"] == "cross" and c["site"].block == "input" and c["site"].index == 1)
    assert call["layout"].labels == (0,)
    to_k = tiny.model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    with torch.inference_mode():
        expected = to_k(pkg("inversion.conditioning").context_of(inv.negative, "negative"))
    assert torch.allclose(call["extra"]["null"][0][0:1], expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------ input errors
@pytest.mark.parametrize("kwargs, message", [
    ({"mask": torch.zeros(1, 128, 128)}, "`source_mask` is empty for image 0"),
    ({"mask": torch.ones(1, 128, 128), "strategy": "remove object"}, "covers the whole image 0"),
    ({"mask": torch.ones(1, 128, 128), "strategy": "change background"}, "covers the whole image .nothing left"),
    ({"mask": box_mask(batch=3)}, "batch of 3 masks for 1 image"),
    ({"mask": torch.zeros(2, 3, 4, 5)}, "has shape \\(2, 3, 4, 5\\)"),
    ({"object_words": "dog"}, "'dog' is not in the target prompt"),
    ({"strategy": "regional prompts"}, "needs `background_prompt`"),
    ({"strategy": "nonsense"}, "`strategy` 'nonsense' is unknown"),
])
def test_bad_inputs_give_clear_errors(tiny, inversion, kwargs, message):
    kwargs = dict(kwargs)
    strategy = kwargs.pop("strategy", "replace object")
    with pytest.raises(ValueError, match=r"\[Attention Edit\] CPAM Self-Attention: .*" + message):
        patch(tiny, inversion, strategy, **kwargs)


def test_a_mask_of_another_size_or_aspect_is_aligned_and_logged(tiny, inversion, caplog):
    small = torch.zeros(1, 32, 32)
    small[:, 8:24, 12:24] = 1.0  # the same box as box_mask() at a quarter of the size
    a = hooks.controllers_of(patch(tiny, inversion, "replace object", mask=small)[0])[-1]
    b = hooks.controllers_of(patch(tiny, inversion, "replace object")[0])[-1]
    assert torch.equal(a.source_masks, b.source_masks) and torch.equal(a.target_masks, b.target_masks)
    assert a.source_masks.shape == (1, 16, 16) and a.source_masks.sum() == 6 * 8  # whole latent cells: exact
    with caplog.at_level("WARNING"):
        patch(tiny, inversion, "replace object", mask=torch.ones(1, 64, 128) * box_mask()[:, ::2], target="a dog")
    assert "stretched" in caplog.text
