"""Dynamic Prompt Learning's learned tokens reach the edit (issue 18 item 8): as the official edit, every noun that the
target prompt keeps gets its learned token at each step, so target = source regenerates DPL's own reconstruction."""

import pytest
import torch
from conftest import call_node, pkg
from test_dpl import recording  # UNet calls with their step, chunk labels and context

D = pkg("inversion.dpl")
SRC = "a cat and a dog"
STEPS = 4


@pytest.fixture(scope="module")
def runs(tiny):
    """A DPL inversion with the option on (default) and the same run with it off."""
    kw = dict(model=tiny.model, clip=tiny.clip, source_prompt=SRC, nouns="cat, dog", steps=STEPS, cfg=7.5,
              latent={"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))},
              token_iterations=4, null_text_iterations=2, learning_rate=0.03)
    on = call_node("AttnEditDynamicPromptLearn", **kw)
    off = call_node("AttnEditDynamicPromptLearn", learned_tokens_in_target=False, **kw)
    return on, off


def hook(tiny, target):
    return call_node("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip, source_prompt=SRC,
                     target_prompt=target, mode="replace", cross_replace=0.8, self_replace=0.4)[0]


def relative(a, b):
    return float((a - b).norm() / b.norm())


def test_target_equal_to_source_reproduces_the_dpl_reconstruction(tiny, runs):
    inv, _, _, recon, _ = runs[0]
    by_conditioning = call_node("AttnEditEditSampler", model=tiny.model, inversion=inv, target=inv.source)
    by_hook = call_node("AttnEditEditSampler", model=hook(tiny, SRC), inversion=inv)
    for edited, source, _ in (by_conditioning, by_hook):
        assert relative(edited["samples"], source["samples"]) < 1e-6  # the target row is the source row
        assert relative(edited["samples"], recon["samples"]) < 1e-4  # 0.4 with the plain target prompt (option off)


def test_with_the_option_off_the_target_uses_the_plain_prompt(tiny, runs):
    inv_off, _, _, recon, _ = runs[1]
    assert inv_off.extras["dpl"]["edit"] is None
    edited, source, _ = call_node("AttnEditEditSampler", model=tiny.model, inversion=inv_off, target=inv_off.source)
    assert relative(source["samples"], recon["samples"]) < 1e-4
    assert relative(edited["samples"], recon["samples"]) > 0.1


def test_a_word_swap_target_gets_the_learned_token_of_the_kept_noun_only(tiny, runs):
    inv = runs[0][0]
    target_text = "a cat and a fox"  # keeps "cat" (position 2), drops "dog"
    model, calls = recording(hook(tiny, target_text))
    call_node("AttnEditEditSampler", model=model, inversion=inv)
    tokens = pkg("attention.tokens").tokenize_prompt(tiny.clip, target_text)
    plain = pkg("inversion.comfy_model").encode_text(tiny.clip, target_text)[0][0][0]
    rows = inv.extras["dpl"]["rows"][0]["l"]  # [S, 2, E]: cat, dog
    encoder = pkg("inversion.dpl_text").RowEncoder(tiny.clip, tokens, [2])
    seen = set()
    for step, labels, ctx in calls:
        for chunk, label in enumerate(labels):
            if label != 0:
                continue
            target_row = ctx.view(len(labels), 2, *ctx.shape[1:])[chunk, 1]
            with torch.no_grad():
                expected = encoder.encode({"l": rows[step, [0]]})[0]  # the cat row of this step at position 2
            assert torch.equal(target_row, expected.to(target_row))
            assert torch.equal(target_row[:2], plain[:2].to(target_row))  # causal: before "cat" = plain prompt
            assert not torch.equal(target_row[2], plain[2].to(target_row))
            seen.add(step)
    assert seen == set(range(STEPS))


def test_target_row_map_hand_computed():
    # noun A: 1 token at 2; noun B: 2 tokens, two occurrences (4,5) and (9,10); target keeps A twice, B once
    assert D.target_row_map([[2], [4, 5, 9, 10]], [[3, 8], [5, 6]], [1, 2]) == ([3, 8, 5, 6], [0, 0, 1, 2])
    # a dropped noun takes no row but still shifts the row offset of the next noun
    assert D.target_row_map([[2], [5]], [[], [6]], [1, 1]) == ([6], [1])
    # more occurrences in the target than in the source: the extra ones take the last source occurrence
    assert D.target_row_map([[4, 5, 9, 10]], [[1, 2, 3, 4, 6, 7]], [2]) == ([1, 2, 3, 4, 6, 7], [0, 1, 2, 3, 2, 3])
    assert D.target_row_map([[2]], [[]], [1]) == ([], [])


def test_a_conditioning_target_of_unknown_text_warns(tiny, runs, caplog):
    inv = runs[0][0]
    target = pkg("inversion.comfy_model").encode_text(tiny.clip, "a cat and a fox")
    with caplog.at_level("WARNING"):
        edited = call_node("AttnEditEditSampler", model=tiny.model, inversion=inv, target=target)[0]
    assert "learned_tokens_in_target" in caplog.text and "attention hook" in caplog.text
    assert torch.isfinite(edited["samples"]).all()
