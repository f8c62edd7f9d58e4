"""Issue 18 item 1 for Prompt-to-Prompt and the inversions: at 10, 20 and 50 steps, at a square, a non-square and a
768-px-shaped latent, every window runs on exactly the steps the paper's reference code gives, and a window that
rounds to zero steps (or a start past the end) is a warning naming the knob, never a silent no-op.

Sizes: the tiny model runs the latents 16x16 (the 512-px SD1.5 shape scaled by 1/4) at 10, 20 and 50 steps, and
16x24 (512x768 px, scaled by 1/4) and 24x24 (SD1.5 at 768 px, scaled by 1/4) at 10 and 20 steps. The real 96x96 latent runs in tests/test_768px.py (every technique's
chain, on the tiny UNet without its latent-resolution transformers: 9216-token self-attention is too slow on a CPU).

Expected windows, hand-computed from the reference code (prompt-to-prompt's get_time_words_attention_alpha and
num_self_replace, the null-text notebook's start_blend) for cross_replace 0.8, self_replace 0.4, blend_start 0.2:
  S = 10: cross steps 0-7  (int(0.8 * 11) = 8),  self steps 0-3  (int(0.4 * 10) = 4),  local blend steps 2-9
  S = 20: cross steps 0-15 (int(0.8 * 21) = 16), self steps 0-7  (int(0.4 * 20) = 8),  local blend steps 4-19
  S = 50: cross steps 0-39 (int(0.8 * 51) = 40), self steps 0-19 (int(0.4 * 50) = 20), local blend steps 10-49
"""

import logging

import pytest
import torch
from conftest import call_node, pkg

SRC = "a photo of a cat"
DOG = "a photo of a dog"
EXPECTED = {10: (8, 4, 2), 20: (16, 8, 4), 50: (40, 20, 10)}  # S: (cross end, self end, blend start)
SHAPES = {"square": (16, 16), "non-square 512x768": (16, 24), "768 px": (24, 24)}
# every step count on the square latent, the other shapes at 10 and 20 steps (what artists run; 50 steps at 24x24
# costs minutes on the shared CPU test machine and adds no new window arithmetic: the windows depend on S only)
CASES = [(steps, "square") for steps in sorted(EXPECTED)] + [(steps, shape) for steps in (10, 20)
                                                              for shape in ("non-square 512x768", "768 px")]


def latent(hw, seed=4):
    return {"samples": torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(seed))}


@pytest.fixture
def spy(monkeypatch):
    """Records (kind, step) of every P2P attention edit and the steps on which local blend changed the target."""
    p2p = pkg("attention.p2p")
    seen = {"cross": set(), "self": set(), "blend": set()}
    edit_probs, after_step = p2p.PromptToPrompt.edit_probs, p2p.LocalBlend.after_step

    def recording_edit(self, call, probs):
        seen[call.kind].add(call.step)
        return edit_probs(self, call, probs)

    def recording_blend(self, ctx):
        before = ctx.x_next
        after_step(self, ctx)
        if ctx.x_next is not before:
            seen["blend"].add(ctx.step)

    monkeypatch.setattr(p2p.PromptToPrompt, "edit_probs", recording_edit)
    monkeypatch.setattr(p2p.LocalBlend, "after_step", recording_blend)
    return seen


def hook(tiny, target, mode="replace", **kw):
    return call_node("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip, source_prompt=SRC,
                     target_prompt=target, mode=mode, cross_replace=kw.pop("cross_replace", 0.8),
                     self_replace=kw.pop("self_replace", 0.4), **kw)[0]


CHAINS = {
    "replace + local blend": dict(target=DOG, mode="replace", local_blend="cat, dog"),
    "refine": dict(target="a photo of a fluffy cat", mode="refine"),
    "reweight": dict(target=SRC, mode="reweight", reweight="cat=2"),
}


@pytest.mark.slow
@pytest.mark.parametrize("steps, shape", CASES)
def test_p2p_windows_run_on_the_expected_steps(tiny, spy, steps, shape, caplog):
    hw = SHAPES[shape]
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                    steps=steps, cfg=7.5, latent=latent(hw))[0]
    cross_end, self_end, blend_start = EXPECTED[steps]
    for name, chain in CHAINS.items():
        for kind in spy:
            spy[kind].clear()
        with caplog.at_level(logging.WARNING):
            edited, source, _ = call_node("AttnEditEditSampler", model=hook(tiny, **chain), inversion=inv)
        assert spy["cross"] == set(range(cross_end)), (name, sorted(spy["cross"]))
        assert spy["self"] == set(range(self_end)), (name, sorted(spy["self"]))
        assert spy["blend"] == (set(range(blend_start, steps)) if "local_blend" in chain else set()), name
        assert edited["samples"].shape[-2:] == hw and torch.isfinite(edited["samples"]).all()
        assert not torch.equal(edited["samples"], source["samples"]), name  # the edit did something
    assert "covers 0 of the" not in caplog.text and "never runs" not in caplog.text  # the defaults all take effect


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ddim", "null_text", "direct"])
@pytest.mark.parametrize("steps, shape", CASES)
def test_inversions_visit_every_step_once(tiny, method, steps, shape):
    """Each inversion step runs at the schedule's timesteps, one per step (null-text: one null embedding optimised per
    step; direct: one offset per step), at the square, non-square and 768-px-shaped latents."""
    for hw in [SHAPES[shape]]:
        timesteps = []
        clone = tiny.model.clone()

        def counting(apply_model, args, timesteps=timesteps):
            timesteps.append(float(args["timestep"][0]))
            return apply_model(args["input"], args["timestep"], **args["c"])

        clone.set_model_unet_function_wrapper(counting)
        inv, noise, sigmas, recon, _psnr, _store = call_node(
            "AttnEditInvert", model=clone, clip=tiny.clip, source_prompt=SRC, method=method, steps=steps, cfg=7.5,
            latent=latent(hw), inner_steps=1)
        assert inv.steps == steps and len(sigmas) == steps + 1 and float(sigmas[-1]) == 0.0
        assert inv.latents.shape == (steps + 1, 1, 4, *hw) and noise["samples"].shape[-2:] == hw
        assert recon["samples"].shape[-2:] == hw
        # the UNet saw exactly the schedule's S noise levels (sigmas[:-1], ComfyUI passes sigma to the wrapper)
        expected = {f"{float(s):.4g}" for s in sigmas[:-1]}
        assert {f"{t:.4g}" for t in timesteps} == expected, (sorted(expected), sorted(set(timesteps)))
        assert len(expected) == steps
        if method == "null_text":
            # one null embedding per step, each optimised at most inner_steps = 1 time
            assert inv.uncond.shape[0] == steps and 0 < inv.extras["null_text_iterations"][0] <= steps
        if method == "direct":
            assert inv.offsets.shape[:2] == (steps, 1) and inv.offsets.shape[-2:] == hw


# ----------------------------------------------------------------------------------------------- knobs without effect
@pytest.mark.parametrize("knobs, steps, sentence", [
    (dict(cross_replace=0.04), 20, "the cross-attention window 0.04 (`cross_replace` or a `cross_replace_words` "
                                   "value) covers 0 of the 20 steps (int(0.04 x 21) = 0), so that attention is "
                                   "never replaced; raise it to at least 0.048 or set it to 0"),
    (dict(cross_replace_words="dog=0.05"), 10, "the cross-attention window 0.05"),
    (dict(self_replace=0.04), 20, "`self_replace` 0.04 covers 0 of the 20 steps (int(20 x 0.04) = 0), so no "
                                  "self-attention is injected; raise it to at least 0.05 or set it to 0"),
    (dict(local_blend="cat, dog", blend_start=1.0), 10, "local blend's `blend_start` 1 starts at step 10 of a 10-step "
                                                        "run (steps 0 to 9), so local blend never runs; lower "
                                                        "`blend_start` below 1.0"),
    (dict(target=SRC, mode="reweight", reweight="cat=2", cross_replace=0.0), 10,
     "`reweight` is applied inside the cross-attention window only, and the re-weighted words' window (0) covers 0 "
     "of the 10 steps: the re-weighting never applies"),
])
def test_knobs_that_cannot_take_effect_warn(tiny, spy, knobs, steps, sentence, caplog):
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                    steps=steps, cfg=7.5, latent=latent((16, 16)))[0]
    knobs = dict(knobs)
    model = hook(tiny, knobs.pop("target", DOG), mode=knobs.pop("mode", "replace"), **knobs)
    with caplog.at_level(logging.WARNING):
        call_node("AttnEditEditSampler", model=model, inversion=inv)
    assert f"[Attention Edit] Attention Edit Sampler: {sentence}" in caplog.text, caplog.text
    # and the knob indeed did nothing (so the warning is true)
    if knobs.get("cross_replace") is not None:
        assert spy["cross"] == set()
    if "self_replace" in knobs:
        assert spy["self"] == set()
    if "blend_start" in knobs:
        assert spy["blend"] == set()


def test_knobs_set_to_zero_on_purpose_are_not_reported(tiny, caplog):
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                    steps=10, cfg=7.5, latent=latent((16, 16)))[0]
    with caplog.at_level(logging.WARNING):
        call_node("AttnEditEditSampler", model=hook(tiny, DOG, cross_replace=0.0, self_replace=0.0), inversion=inv)
    assert "covers 0 of the" not in caplog.text


def test_mask_knobs_of_another_mode_warn(tiny, caplog):
    inv, *_, store = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="ddim",
                               steps=3, cfg=7.5, latent=latent((16, 16)))
    with caplog.at_level(logging.WARNING):
        call_node("AttnEditMaskFromAttention", attention=store, mode="local blend", words="cat", branch="source",
                  phi=0.5, threshold=0.4, latent=latent((16, 16)), scale=4)
    text = caplog.text
    assert ("[Attention Edit] Mask from Attention: `phi` 0.5 only applies to mode 'instant'; the mode is 'local "
            "blend', so it has no effect. Set `mode` to 'instant' or leave `phi` at 0.2.") in text, text
    assert "`threshold` 0.4 only applies" not in text  # local blend reads it
    assert "`scale` 4 is only used when neither `image` nor `latent` is connected" in text
