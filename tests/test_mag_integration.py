"""MAG-Edit Guidance on the tiny model through the real edit sampler: guidance works, parity with plain P2P, masks,
errors, interrupts. 32x32 latents (8x8 semantic grid) so masks are non-trivial; few steps to stay fast."""

import dataclasses

import pytest
import torch
from conftest import call_node, make_latent, pkg

SRC = "a photo of a cat"
TGT = "a photo of a yellow striped cat"
STEPS = 3
IMAGE = 256  # 32x32 latent


@pytest.fixture(scope="module")
def inversion(tiny):
    return call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                     steps=STEPS, cfg=7.5, latent=make_latent(size=IMAGE // 8, seed=4))[0]


@pytest.fixture(scope="module")
def p2p(tiny):
    return call_node("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip, source_prompt=SRC, target_prompt=TGT,
                     mode="refine", cross_replace=0.8, self_replace=0.5)[0]


def square(lo=64, hi=192, batch=1, size=IMAGE):
    mask = torch.zeros(batch, size, size)
    mask[:, lo:hi, lo:hi] = 1
    return mask


def guided(model, inversion, **kw):
    # step knobs count steps of a 50-step run, scaled to the STEPS = 3 here: 25 -> 2 guided, 34 -> 2 blended, 1 -> 1
    args = dict(mask=square(), target_words="yellow", constraint="token_ratio", max_iterations=3, guidance_steps=25,
                scale=2.5, blend_steps=34)
    args.update(kw)
    return call_node("AttnEditMAGGuidance", model=model, inversion=inversion, **args)[0]


def run(model, inversion, image=0):
    """engine.edit_image with the model's hooks: (final [2, C, h, w] (source, target), captured RunState, state)."""
    hooks = pkg("attention.hooks")
    target = hooks.controllers_of(model)[0].target_conditioning
    step_hooks = hooks.step_hooks_of(model)
    with torch.inference_mode():
        return pkg("inversion.engine").edit_image(model, inversion, image, target, step_hooks,
                                                  grad=any(getattr(h, "NEEDS_GRAD", False) for h in step_hooks))


def sample(model, inversion):
    edited, source, _ = call_node("AttnEditEditSampler", model=model, inversion=inversion)
    return edited["samples"], source["samples"]


@pytest.fixture(scope="module")
def runs(p2p, inversion):
    """Shared runs: plain P2P; the node with max_iterations 0 and no blend; TR guidance with the final blend."""
    return {"plain": run(p2p, inversion),
            "noop": run(guided(p2p, inversion, max_iterations=0, blend_steps=0), inversion),
            "guided": run(guided(p2p, inversion), inversion)}


def in_mask_ratio(maps, tokens):
    """Token ratio of `tokens` in the test mask on the 8x8 grid, from head-averaged maps [N, T]."""
    grid = pkg("masks.ops").mask_to_grid(square(), (8, 8), binary=True).flatten(1)[0]
    return pkg("attention.mag").in_mask_token_ratio(maps[None], grid, tokens).item()


def test_each_guided_step_lowers_the_loss_and_raises_the_target_ratio(runs):
    trace = runs["guided"][2]["mag_edit"]
    assert sorted(trace["loss"]) == [0, 1], "guidance runs in the first guidance_steps steps only"
    for step, losses in trace["loss"].items():
        assert len(losses) == 3
        assert sum(losses[1:]) / len(losses[1:]) < losses[0], (step, losses)
        ratios = [r[0] for r in trace["target_ratio"][step]]
        assert ratios[-1] > ratios[0], (step, ratios)


def test_guidance_raises_the_target_words_attention_in_the_mask_over_the_run(runs, p2p):
    """The sampler's own averaged maps (main passes, all steps): the target row attends more to 'yellow' in M."""
    tokens = pkg("attention.hooks").controllers_of(p2p)[0].target_tokens.find_text("yellow")
    ratio = {name: in_mask_ratio(runs[name][1].mean_map("cross", 4)[1], tokens) for name in ("noop", "guided")}
    assert ratio["guided"] > ratio["noop"], ratio


def test_max_iterations_zero_is_plain_prompt_to_prompt(runs):
    """No iterations and no blend: bit-identical to the P2P edit without the node, maps included."""
    plain, noop = runs["plain"], runs["noop"]
    assert torch.equal(plain[0], noop[0])
    assert torch.equal(plain[1].mean_map("cross", 4), noop[1].mean_map("cross", 4))
    assert "mag_edit" not in noop[2]


def test_final_blend_region_is_the_update_mask_grown_by_one_latent_cell(p2p, inversion):
    """The reference blends with a 3x3 max-pool of the latent-resolution mask: one cell of growth on every side."""
    hook = pkg("attention.hooks").step_hooks_of(guided(p2p, inversion))[0]
    m = hook.masks.float()
    grown = torch.nn.functional.max_pool2d(m.reshape(-1, 1, *m.shape[-2:]), 3, 1, 1).reshape(m.shape)
    assert not torch.equal(grown, m) and torch.equal(hook.blend_masks.float(), grown)


def test_outside_the_mask_the_latent_equals_the_plain_p2p_run(runs, p2p, inversion):
    """Guidance moves the latent inside the mask only, and the final blend makes everything outside the (dilated)
    mask the plain P2P run's source branch, bit for bit."""
    final, plain = runs["guided"][0], runs["plain"][0]
    hook = pkg("attention.hooks").step_hooks_of(guided(p2p, inversion))[0]
    outside = (hook.blend_masks[0] == 0).expand_as(final[1])
    assert 0 < outside.float().mean() < 1
    assert torch.equal(final[0], plain[0]), "the source branch is never touched"
    assert torch.equal(final[1][outside], plain[0][outside])
    assert not torch.equal(final[1][~outside], plain[1][~outside]), "guidance must change the latent in the mask"


def test_spatial_ratio_guidance_lowers_its_loss(p2p, inversion):
    model = guided(p2p, inversion, constraint="spatial_ratio", guidance_steps=1, blend_steps=0)
    losses = run(model, inversion)[2]["mag_edit"]["loss"][0]
    assert sum(losses[1:]) / 2 < losses[0], losses


def test_negative_word_moves_its_ratio_down(p2p, inversion):
    """Only the negative constraint (lambda_p = 0): the in-mask ratio of 'striped' falls."""
    model = guided(p2p, inversion, negative_words="striped", lambda_p=0.0, guidance_steps=1, max_iterations=2,
                   blend_steps=0)
    trace = run(model, inversion)[2]["mag_edit"]
    ratios = [r[0] for r in trace["negative_ratio"][0]]
    assert ratios[-1] < ratios[0] and trace["loss"][0][-1] < trace["loss"][0][0], (ratios, trace["loss"])


@pytest.fixture(scope="module")
def small(tiny, p2p):
    """16x16 latents (4x4 semantic grid) for the plumbing tests: a 2-image inversion."""
    return call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                     steps=STEPS, cfg=7.5, latent=make_latent(size=16, batch=2, seed=6))[0]


def test_each_image_of_a_batch_uses_its_own_mask(p2p, small):
    masks = torch.cat([square(0, 64, size=128), square(64, 128, size=128)])
    edited, source = sample(guided(p2p, small, mask=masks, max_iterations=0, blend_steps=50), small)
    ops = pkg("masks.ops")
    latent_masks = ops.dilate(ops.mask_to_grid(masks, (16, 16), binary=True))
    for i in range(2):
        outside = (latent_masks[i] == 0).expand_as(edited[i])
        assert torch.equal(edited[i][outside], source[i][outside])
        assert not torch.equal(edited[i][~outside], source[i][~outside])


def test_early_stop_of_the_guidance_pass_is_exact(p2p, small):
    """Ending each guidance forward after the last semantic-level layer (stop_after) gives bit-identical results to
    running the whole UNet."""
    model = guided(p2p, small, mask=square(32, 96, size=128), guidance_steps=1, max_iterations=2, blend_steps=0)
    hooks = pkg("attention.hooks")
    hook = hooks.step_hooks_of(model)[0]
    assert hook.stop_after == 5, "SD1.5 topology: five 16x16 cross-attention layers"
    full = hooks.add_step_hook(p2p, dataclasses.replace(hook, stop_after=None))
    stopped = run(model, small)
    assert torch.equal(run(full, small)[0], stopped[0]) and len(stopped[2]["mag_edit"]["loss"][0]) == 2


def test_interrupt_mid_optimisation_leaves_the_next_run_clean(p2p, small, monkeypatch):
    import comfy.model_management as mm

    small = dataclasses.replace(small, latents=small.latents[:, :1], offsets=small.offsets[:, :1])  # image 0 only
    model = guided(p2p, small, mask=square(32, 96, size=128), guidance_steps=1, max_iterations=2, blend_steps=1)
    progress_cls = pkg("inversion.comfy_model").Progress
    original = progress_cls.update
    calls = []

    def counting(self, units=1, x0=None):
        calls.append((units, self.total))
        if interrupt_at and len(calls) == interrupt_at:
            mm.interrupt_current_processing(True)
        return original(self, units, x0)

    monkeypatch.setattr(progress_cls, "update", counting)
    interrupt_at = 0
    fresh = sample(model, small)
    assert sum(u for u, _ in calls) == calls[0][1] == STEPS + 2, "progress counts steps and guidance iterations"
    calls.clear()
    interrupt_at = 2  # the second guidance iteration of the first step
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(model, small)
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 2
    monkeypatch.setattr(progress_cls, "update", original)
    again = sample(model, small)
    assert torch.equal(fresh[0], again[0]) and torch.equal(fresh[1], again[1])


# ------------------------------------------------------------------------------------------------ input errors
@pytest.mark.parametrize("kw, message", [
    (dict(target_words="tiger"), "the word 'tiger' is not in the target prompt"),
    (dict(target_words="yellow=0.7, striped=0.2"), "must be >= 0 and sum to 1"),
    (dict(target_words=""), "is empty"),
    (dict(negative_words="dog"), "the word 'dog' is not in the target prompt"),
    (dict(negative_words="yellow"), "cannot be both raised and lowered"),
    (dict(mask=square(100, 120)), "covers no cell of the 8x8 attention grid"),
    (dict(mask=torch.zeros(3, 64, 64)), "batch of 3 masks for 1 image"),
    (dict(guidance_steps=51), "`guidance_steps` is 51; it counts steps of the paper's 50-step run"),
    (dict(blend_steps=-1), "`blend_steps` is -1; it counts steps of the paper's 50-step run"),
    (dict(target_words="cat"), "copied from the source during every guided step"),
    (dict(token_ratio_denominator="rows"), "`token_ratio_denominator` 'rows' is unknown"),
])
def test_bad_inputs_are_clear_errors(p2p, inversion, kw, message):
    with pytest.raises(ValueError, match=message) as err:
        guided(p2p, inversion, **kw)
    assert str(err.value).startswith("[Attention Edit] MAG-Edit Guidance:")


def test_model_without_attention_hook_and_replace_mode_are_errors(tiny, inversion):
    with pytest.raises(ValueError, match="Prompt-to-Prompt Attention Hook"):
        guided(tiny.model, inversion)
    replace = call_node("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip, source_prompt=SRC,
                        target_prompt="a photo of a dog", mode="replace", cross_replace=0.8, self_replace=0.5)[0]
    with pytest.raises(ValueError, match="Use mode 'refine'"):
        guided(replace, inversion, target_words="dog")


def test_patching_leaves_the_input_model_untouched(p2p, inversion):
    import copy

    before = copy.deepcopy(p2p.model_options)
    model = guided(p2p, inversion)
    assert p2p.model_options == before
    assert len(pkg("attention.hooks").step_hooks_of(model)) == 1
