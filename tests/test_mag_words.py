"""MAG-Edit words through the node and the real edit sampler on the tiny model (issue 18 item 4): Eq. 1's
denominator from P2P's alignment, one mask per target word (Eq. 5 / Fig. 9b), negative words from a prompt of their
own (Eq. 3, the authors' third prompt)."""

import pytest
import torch
from conftest import call_node, make_latent, pkg

SRC = "a photo of a cat"
TGT = "a photo of a yellow striped cat"
IMAGE = 128  # 16x16 latent, 4x4 semantic grid
STEPS = 3


@pytest.fixture(scope="module")
def inversion(tiny):
    return call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="direct",
                     steps=STEPS, cfg=7.5, latent=make_latent(size=IMAGE // 8, seed=4))[0]


@pytest.fixture(scope="module")
def p2p(tiny):
    return call_node("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip, source_prompt=SRC, target_prompt=TGT,
                     mode="refine", cross_replace=0.8, self_replace=0.5)[0]


def half(side):
    m = torch.zeros(1, IMAGE, IMAGE)
    if side == "left":
        m[..., :IMAGE // 2] = 1
    elif side == "right":
        m[..., IMAGE // 2:] = 1
    else:
        m[..., 32:96, 32:96] = 1
    return m


def guided(model, inversion, **kw):
    args = dict(mask=half("centre"), target_words="yellow", constraint="token_ratio", max_iterations=3,
                guidance_steps=1, scale=2.5, blend_steps=0)
    args.update(kw)
    return call_node("AttnEditMAGGuidance", model=model, inversion=inversion, **args)[0]


def hook_of(model):
    return pkg("attention.hooks").step_hooks_of(model)[0]


def run(model, inversion):
    hooks = pkg("attention.hooks")
    target = hooks.controllers_of(model)[0].target_conditioning
    with torch.inference_mode():
        return pkg("inversion.engine").edit_image(model, inversion, 0, target, hooks.step_hooks_of(model), grad=True)


def test_denominator_columns_leave_out_the_other_new_word(p2p, inversion):
    """'yellow' and 'striped' are both new: yellow's Eq. 1 denominator holds every aligned token (SOT, 'a photo of a',
    'cat', EOT, padding) and neither new word; all_tokens is the reference's full row."""
    tokens = pkg("attention.hooks").controllers_of(p2p)[0].target_tokens
    yellow, striped = tokens.find_text("yellow"), tokens.find_text("striped")
    others = hook_of(guided(p2p, inversion)).target_others
    assert others.shape == (1, len(tokens.ids))
    expected = torch.ones(len(tokens.ids))
    expected[yellow + striped] = 0
    assert torch.equal(others[0].cpu(), expected)
    assert hook_of(guided(p2p, inversion, token_ratio_denominator="all_tokens")).target_others is None


def test_each_target_word_is_guided_in_its_own_mask(p2p, inversion):
    """word_masks: 'yellow' left, 'striped' right. Each word's in-mask ratio (in its own mask) rises over the
    iterations; the update region is the union; the trace differs from one shared mask."""
    masks = torch.cat([half("left"), half("right")])
    model = guided(p2p, inversion, target_words="yellow, striped", word_masks=masks, mask=half("centre") * 0)
    hook = hook_of(model)
    ops = pkg("masks.ops")
    torch.testing.assert_close(hook.semantic_masks[0].cpu(), ops.mask_to_grid(masks, (4, 4), binary=True).flatten(1))
    assert hook.masks[0].sum().item() == 16 * 16, "the update region is the union of the word masks"
    trace = run(model, inversion)[2]["mag_edit"]
    ratios = trace["target_ratio"][0]
    assert ratios[-1][0] > ratios[0][0] and ratios[-1][1] > ratios[0][1], ratios
    shared = run(guided(p2p, inversion, target_words="yellow, striped", mask=half("left")), inversion)[2]
    assert shared["mag_edit"]["target_ratio"][0][0] != ratios[0]


@pytest.mark.parametrize("masks, message", [
    (torch.zeros(3, IMAGE, IMAGE), "a batch of 3 masks for 2 target word"),
    (torch.cat([half("left"), torch.zeros(1, IMAGE, IMAGE)]), "`word_masks` for word 'striped' of image 0 covers no"),
])
def test_bad_word_masks_are_clear_errors(p2p, inversion, masks, message):
    with pytest.raises(ValueError, match=message):
        guided(p2p, inversion, target_words="yellow, striped", word_masks=masks)


def test_negative_words_from_their_own_prompt_are_lowered(tiny, p2p, inversion):
    """'red' is in neither prompt of the edit (before: an error). With negative_words_prompt its attention is read
    from a pass of the target latent with that prompt, and the negative constraint alone lowers it."""
    model = guided(p2p, inversion, negative_words="red", negative_words_prompt="a photo of a red cat",
                   clip=tiny.clip, lambda_p=0.0)
    hook = hook_of(model)
    assert hook.negative_context is not None and hook.negative_others is None
    trace = run(model, inversion)[2]["mag_edit"]
    ratios = [r[0] for r in trace["negative_ratio"][0]]
    assert ratios[-1] < ratios[0] and trace["loss"][0][-1] < trace["loss"][0][0], (ratios, trace["loss"])
    again = run(model, inversion)  # the row roles swapped for the negative pass are restored: a re-run is identical
    assert torch.equal(run(model, inversion)[0], again[0])


def test_negative_words_prompt_needs_clip_and_the_word(p2p, inversion):
    with pytest.raises(ValueError, match="needs `clip`"):
        guided(p2p, inversion, negative_words="red", negative_words_prompt="a photo of a red cat")


def test_negative_word_missing_from_its_prompt_is_an_error(tiny, p2p, inversion):
    with pytest.raises(ValueError, match="the word 'blue' is not in the negative_words_prompt"):
        guided(p2p, inversion, negative_words="blue", negative_words_prompt="a photo of a red cat", clip=tiny.clip)


def test_knobs_that_cannot_take_effect_are_warnings(tiny, p2p, inversion, caplog):
    """Negative words with lambda_ng 0, and a negative-words prompt without negative words, do nothing: say so."""
    with caplog.at_level("WARNING"):
        guided(p2p, inversion, negative_words="striped", lambda_ng=0.0)
    assert "`negative_words` 'striped' has no effect with `lambda_ng` 0" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        model = guided(p2p, inversion, negative_words_prompt="a photo of a red cat", clip=tiny.clip)
    assert "`negative_words_prompt` 'a photo of a red cat' is not used without `negative_words`" in caplog.text
    assert hook_of(model).negative_context is None
    caplog.clear()
    with caplog.at_level("WARNING"):
        guided(p2p, inversion, negative_words="striped")
    assert "MAG-Edit" not in caplog.text
