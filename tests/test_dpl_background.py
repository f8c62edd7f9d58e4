"""Dynamic Prompt Learning's background estimate (Sec. 3.3) at the node (issue 18 item 5): the segments are scored
against every word of the source prompt, not only the listed nouns, and an estimate that is empty or covers the whole
image is not used silently (warning, background leakage loss off)."""

import pytest
import torch
from conftest import call_node, pkg

BG = pkg("masks.background")
SRC = "a cat and a dog"


def latent(seed=4):
    return {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(seed))}


def dpl(tiny, nouns="cat, dog", prompt=SRC, **kw):
    kw.setdefault("token_iterations", 2)
    kw.setdefault("null_text_iterations", 1)
    return call_node("AttnEditDynamicPromptLearn", model=tiny.model, clip=tiny.clip, source_prompt=prompt,
                     nouns=nouns, steps=kw.pop("steps", 3), cfg=7.5, latent=latent(), **kw)


def test_scoring_words_are_the_listed_nouns_then_every_other_content_word(tiny):
    tokens = pkg("attention.tokens").tokenize_prompt(tiny.clip, "a photo of a cat, sitting on the sofa.")
    groups = {text: pos for pos, text in tokens.word_groups()}
    cat = groups["cat"]
    scored = BG.scoring_words(tokens.word_groups(), [cat])
    assert scored == [cat, groups["photo"], groups["sitting"], groups["sofa"]]
    # a listed multi-word noun keeps its own group; its words are not scored twice
    both = BG.scoring_words(tokens.word_groups(), [groups["cat"] + groups["sitting"]])
    assert both == [cat + groups["sitting"], groups["photo"], groups["sofa"]]
    assert BG.scoring_words([], [[2]]) == [[2]]


def test_an_unlisted_noun_of_the_prompt_is_scored_too(tiny):
    listed = dpl(tiny, nouns="cat, dog")[0].extras["dpl"]["estimated_background"][0]
    only_cat = dpl(tiny, nouns="cat")[0].extras["dpl"]["estimated_background"][0]
    assert 0 < float(listed.mean()) < 1
    assert torch.equal(only_cat, listed)  # "dog" is scored although only "cat" is learned


@pytest.mark.parametrize("threshold, issue", [(1.0, "covers the whole image"), (0.0, "is empty")])
def test_a_degenerate_estimate_warns_and_switches_the_background_loss_off(tiny, caplog, threshold, issue):
    with caplog.at_level("WARNING"):
        inv, _, mask, _, _ = dpl(tiny, background_threshold=threshold)
    estimate = inv.extras["dpl"]["estimated_background"][0]
    assert float(estimate.mean()) == (1.0 if threshold == 1.0 else 0.0)  # the estimate itself is degenerate
    assert f"background_threshold={threshold:g}" in caplog.text and issue in caplog.text
    assert "background leakage loss is off" in caplog.text
    # nothing is used as background: the loss is 0 at every step and the output mask is empty
    assert float(inv.extras["dpl"]["background"][0].abs().max()) == 0 and float(mask.abs().max()) == 0
    assert all(first[2] == 0.0 and last[2] == 0.0 for first, last in inv.extras["dpl"]["losses"][0])


def test_a_usable_estimate_or_a_zero_background_weight_gives_no_warning(tiny, caplog):
    with caplog.at_level("WARNING"):
        inv = dpl(tiny)[0]
        off = dpl(tiny, background_threshold=1.0, lambda_background=0.0)[0]  # L_bg is off anyway: nothing to say
    assert "estimated background" not in caplog.text
    assert any(last[2] > 0 for _, last in inv.extras["dpl"]["losses"][0])
    assert all(last[2] == 0 for _, last in off.extras["dpl"]["losses"][0])


def test_an_empty_background_mask_input_warns_with_the_fix(tiny, caplog):
    with caplog.at_level("WARNING"):
        inv = dpl(tiny, background=torch.zeros(1, 128, 128), steps=2, token_iterations=1)[0]
    assert "`background` is empty" in caplog.text and "disconnect `background`" in caplog.text
    assert all(last[2] == 0 for _, last in inv.extras["dpl"]["losses"][0])


@pytest.mark.parametrize("kw, message", [
    ({"nouns": "dog"}, "lambda_disjoint=0.05 has no effect with one noun ('dog')"),
    ({"lambda_attention": 0.0, "lambda_disjoint": 0.0, "lambda_background": 0.0}, "nothing to optimise"),
])
def test_a_loss_weight_that_cannot_act_is_reported(tiny, caplog, kw, message):  # (warnings name knob and value)
    with caplog.at_level("WARNING"):
        inv = dpl(tiny, steps=2, token_iterations=1, **kw)[0]
    assert message in caplog.text
    if "nouns" not in kw:
        assert inv.extras["dpl"]["token_iterations"][0] == [0, 0]  # indeed no update was made
    caplog.clear()
    quiet = {**kw, "lambda_disjoint": 0.0, "token_iterations": 1} if "nouns" in kw else {**kw, "token_iterations": 0}
    with caplog.at_level("WARNING"):
        dpl(tiny, steps=2, **quiet)
    assert message not in caplog.text


def test_background_threshold_with_a_mask_connected_is_reported(tiny, caplog):
    half = torch.zeros(1, 128, 128)
    half[:, :, :64] = 1.0
    with caplog.at_level("WARNING"):
        dpl(tiny, background=half, steps=2, token_iterations=1, background_threshold=0.3)
    assert "background_threshold=0.3 has no effect" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        dpl(tiny, background=half, steps=2, token_iterations=1)  # the default: nothing was asked of it
    assert "background_threshold" not in caplog.text
