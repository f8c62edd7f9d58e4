"""The deviations that attention/seq_align.py and inversion/ddim.py document (issue 18 item 7), pinned so that the
docstrings stay true: word swap after a swapped word whose token count changed, punctuation as words, and DDIM
inversion starting from alpha_bar = 1 (sigma = 0)."""

import pytest
import torch
from conftest import pkg

seq_align = pkg("attention.seq_align")
tokens = pkg("attention.tokens")
ddim = pkg("inversion.ddim")


@pytest.fixture(scope="module")
def clip():
    import tiny_models

    return tiny_models.make_clip()


def test_unchanged_words_after_a_token_count_change_are_mapped_word_to_word(clip):
    src = tokens.tokenize_prompt(clip, "a cat sitting on grass")
    tgt = tokens.tokenize_prompt(clip, "a grimalkin sitting on grass")  # cat (1 token) -> gri mal kin (3 tokens)
    m = seq_align.replacement_mapper(src, tgt)
    # "sitting on grass" are source tokens 3, 4, 5 and target tokens 5, 6, 7: mapped word to word (i -> j) ...
    for i, j in ((3, 5), (4, 6), (5, 7)):
        assert m[i, j] == 1 and m[:, j].sum() == 1
    # ... where the reference maps them j -> j (target 5 reads source 5 = "grass"): they differ, as documented
    for j in (5, 6, 7):
        assert m[j, j] == 0
    # and the tail (EOT at source 6, target 8) reads the source tail, the reference's would read source 8
    assert m[6, 8] == 1 and m[8, 8] == 0


def test_equal_token_counts_give_the_reference_mapper(clip):
    m = seq_align.replacement_mapper(tokens.tokenize_prompt(clip, "a cat sitting on grass"),
                                     tokens.tokenize_prompt(clip, "a dog sitting on grass"))
    assert torch.equal(m, torch.eye(77))  # one-token swap: the reference's identity-shaped mapper


def test_glued_punctuation_is_a_word_of_its_own(clip):
    assert tokens.tokenize_prompt(clip, "a cat, sitting").word_ids[1:5] == (1, 2, 3, 4)  # a | cat | , | sitting
    with pytest.raises(tokens.PromptError, match="source 'a cat, sitting' has 4, target 'a dog sitting' has 3"):
        seq_align.replacement_mapper(tokens.tokenize_prompt(clip, "a cat, sitting"),
                                     tokens.tokenize_prompt(clip, "a dog sitting"))


def test_ddim_inversion_starts_from_sigma_zero():
    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.0])  # ComfyUI schedule: ends at sigma 0 (alpha_bar = 1)
    x0 = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    seen = []

    def denoise(x, sigma):
        seen.append(sigma)
        return x - sigma * eps  # constant-eps model in the VE form

    latents = ddim.invert(denoise, x0, sigmas)
    assert torch.equal(latents[-1], x0)  # the chain starts at the clean latent itself, sigma 0, not alpha_bar_0
    assert seen[0] == 1.0  # the first step goes from sigma 0 to sigmas[-2] (labelled with the next level)
    assert torch.allclose(latents[-2], x0 + 1.0 * eps, atol=1e-6)
