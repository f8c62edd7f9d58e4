"""MAG-Edit at any step count and size (issue 18 item 1, issue 22): the guidance and blend windows are the paper's
(first 25 and last 15 of 50 steps) scaled to the run, pinned at their first and last steps; odd and non-square
latents; warnings for words whose attention Prompt-to-Prompt copies during guided steps."""

import pytest
import torch
from conftest import call_node, pkg

SRC = "a photo of a cat"
TGT = "a photo of a yellow striped cat"


@pytest.fixture(scope="module")
def mag():
    return pkg("attention.mag")


def latent(h, w, seed=4):
    return {"samples": torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))}


def box(h, w, top, left, bottom, right):
    """A [1, 8h, 8w] pixel mask, 1 on rows top:bottom and columns left:right (pixels)."""
    m = torch.zeros(1, 8 * h, 8 * w)
    m[:, top:bottom, left:right] = 1
    return m


def invert(tiny, steps, hw):
    return call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                     steps=steps, cfg=7.5, latent=latent(*hw))[0]


def p2p(tiny, target=TGT, mode="refine", cross_replace=0.8):
    return call_node("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip, source_prompt=SRC,
                     target_prompt=target, mode=mode, cross_replace=cross_replace, self_replace=0.5)[0]


def guided(model, inversion, mask, **kw):
    args = dict(mask=mask, target_words="yellow", constraint="token_ratio", max_iterations=1, guidance_steps=25,
                scale=2.5, blend_steps=15)
    args.update(kw)
    return call_node("AttnEditMAGGuidance", model=model, inversion=inversion, **args)[0]


def run(model, inversion):
    """The edit sampler's loop with the model's hooks: (final latents, RunState snapshot, per-run state)."""
    hooks = pkg("attention.hooks")
    target = hooks.controllers_of(model)[0].target_conditioning
    step_hooks = hooks.step_hooks_of(model)
    with torch.inference_mode():
        return pkg("inversion.engine").edit_image(model, inversion, 0, target, step_hooks, grad=True)


@pytest.mark.parametrize("count, total, expected", [
    (25, 50, 25), (25, 20, 10), (25, 10, 5), (15, 50, 15), (15, 20, 6), (15, 10, 3),
    (25, 7, 4),  # 3.5 rounds half up
    (15, 3, 1),  # 0.9 -> 1
    (1, 10, 1),  # 0.2: a non-zero count keeps one step
    (0, 50, 0), (50, 20, 20), (40, 100, 80), (25, 1, 1), (0, 0, 0),
])
def test_steps_at_scales_the_paper_count_to_the_run(mag, count, total, expected):
    assert mag.steps_at(count, total) == expected


@pytest.mark.slow
@pytest.mark.parametrize("steps, hw, guided_n, blend_n", [
    (10, (14, 18), 5, 3),  # odd sides, non-square: semantic grid (4, 5)
    (20, (16, 24), 10, 6),  # 2:3 like 512x768
    (50, (14, 18), 25, 15),  # the paper's setting: steps 0-24 guided, 35-49 blended (reference i < 25, 50 - i <= 15)
])
def test_guidance_and_blend_run_on_exactly_the_scaled_steps(tiny, steps, hw, guided_n, blend_n):
    """Refused before (an inversion under 25 steps); now the paper's windows scaled: guided steps 0..G-1, the blend
    after steps S-B..S-1, and the target equals the source outside the dilated mask at the end."""
    inversion = invert(tiny, steps, hw)
    mask = box(*hw, 24, 40, 96, 120)
    model = guided(p2p(tiny), inversion, mask)
    hook = pkg("attention.hooks").step_hooks_of(model)[0]
    assert hook.semantic_grid == tuple((s + 3) // 4 for s in hw)
    final, _, state = run(model, inversion)
    trace = state["mag_edit"]
    assert sorted(trace["loss"]) == list(range(guided_n)), "guidance: the first G steps, the G-th not"
    assert trace["blended"] == list(range(steps - blend_n, steps)), "blend: from step S-B on, not one step late"
    outside = (hook.blend_masks[0] == 0).expand_as(final[1])
    assert 0 < outside.float().mean() < 1
    assert torch.equal(final[1][outside], final[0][outside])
    assert hook.progress_units(steps) == guided_n


def test_blend_effect_starts_at_the_first_blend_step(tiny):
    """The blend's effect, not only its trace: with a window of one step (blend_steps 5 at 10 steps) the target is
    the source outside the mask at the end; the same run whose blend would start one step late (window 0) is not."""
    inversion = invert(tiny, 10, (14, 18))
    mask = box(14, 18, 24, 40, 96, 120)
    one = run(guided(p2p(tiny), inversion, mask, max_iterations=0, blend_steps=5), inversion)[0]
    none = run(guided(p2p(tiny), inversion, mask, max_iterations=0, blend_steps=0), inversion)[0]
    hook = pkg("attention.hooks").step_hooks_of(guided(p2p(tiny), inversion, mask, blend_steps=5))[0]
    assert hook.blend_start(10) == 9
    outside = (hook.blend_masks[0] == 0).expand_as(one[1])
    assert torch.equal(one[1][outside], one[0][outside])
    assert not torch.equal(none[1][outside], none[0][outside])


# ------------------------------------------------------------------------------------------------ copied columns
def test_target_word_copied_in_some_guided_steps_is_a_warning(tiny, caplog):
    """Replace mode, cross_replace 0.2 at 10 steps: P2P copies 'dog' in steps 0-1 (int(0.2 * 11) = 2) of the 5 guided
    ones; the node says so (before: those iterations were skipped without a word)."""
    inversion = invert(tiny, 10, (14, 18))
    model = p2p(tiny, "a photo of a dog", mode="replace", cross_replace=0.2)
    with caplog.at_level("WARNING"):
        guided(model, inversion, box(14, 18, 24, 40, 96, 120), target_words="dog")
    assert "`target_words` 'dog'" in caplog.text and "guided steps 0-1 of 5" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # cross_replace 0.1: int(0.1 * 11) = 1, step 0 only
        guided(p2p(tiny, "a photo of a dog", mode="replace", cross_replace=0.1), inversion,
               box(14, 18, 24, 40, 96, 120), target_words="dog")
    assert "guided steps 0 of 5" in caplog.text


def test_negative_word_copied_from_the_source_is_a_warning(tiny, caplog):
    """'cat' is in both prompts: under refine its column is the source's in every guided step."""
    inversion = invert(tiny, 10, (14, 18))
    with caplog.at_level("WARNING"):
        guided(p2p(tiny), inversion, box(14, 18, 24, 40, 96, 120), negative_words="cat")
    assert "`negative_words` 'cat' is in the source prompt too" in caplog.text
    assert "guided steps 0-4 of 5" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # a new word of the target prompt is not copied: no warning
        guided(p2p(tiny), inversion, box(14, 18, 24, 40, 96, 120), negative_words="striped")
    assert "negative_words" not in caplog.text
