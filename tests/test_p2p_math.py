"""Prompt-to-Prompt alignment and attention edits against hand-computed cases (real SD1 tokenizer, no model)."""

import re
from types import SimpleNamespace

import pytest
import torch
from conftest import pkg

seq_align = pkg("attention.seq_align")
p2p = pkg("attention.p2p")
tokens = pkg("attention.tokens")


@pytest.fixture(scope="module")
def clip():
    import tiny_models

    return tiny_models.make_clip()


def tok(clip, text):
    return tokens.tokenize_prompt(clip, text)


def test_word_lookup_handles_case_punctuation_weights_and_multi_token_words(clip):
    prompt = tok(clip, "a photo of a Cat, sitting (grimalkin:1.2)")
    assert prompt.find(tokens.word_token_ids(clip, "cat"), "cat") == [5]
    assert prompt.find(tokens.word_token_ids(clip, "CAT,"), "CAT,") == [5]
    assert prompt.find(tokens.word_token_ids(clip, "grimalkin"), "grimalkin") == [8, 9, 10]
    assert prompt.find_text("grimalkin") == [8, 9, 10]
    assert prompt.find_text("a photo") == [1, 2]
    with pytest.raises(tokens.PromptError, match="'dog' is not in the prompt.*a, photo, of, a, cat, ,, sitting"):
        prompt.find(tokens.word_token_ids(clip, "dog"), "dog")


def test_word_ids_number_words_from_one_and_give_start_end_and_padding_zero(clip):
    """A punctuation mark is a word of its own; every chunk's start token, the end token and padding are word 0."""
    short = tok(clip, "a red sunflower, twice")
    assert short.word_ids[:8] == (0, 1, 2, 3, 4, 5, 0, 0) and set(short.word_ids[6:]) == {0}
    # "!.," is one word of two BPE pieces, the first of which is id 0 ("!" without the end-of-word mark)
    assert tok(clip, "a !.,").ids[:5] == (49406, 320, 0, 5276, 49407) and tok(clip, "a !.,").word_ids[:5] == \
        (0, 1, 2, 2, 0)
    long = tok(clip, " ".join(["red"] * 80))
    assert len(long.ids) == 154 and long.word_ids[77] == 0 and long.word_ids[76] == 0
    assert long.word_ids[75] == 75 and long.word_ids[78:80] == (76, 77)


def test_t5_word_ids_start_at_one_glue_unmarked_pieces_and_give_end_and_padding_zero():
    raw = ["tail", "\u2581a", "\u2581sun", "flower", ",", "\u2581", "</s>", "<pad>"]
    assert tokens.t5_word_ids(raw, [9, 3, 4, 5, 6, 7, 1, 0], end=1, pad=0) == [1, 2, 3, 3, 3, 4, 0, 0]
    assert tokens.t5_word_ids(raw[1:], [3, 4, 5, 6, 7, 1, 0], end=1, pad=0) == [1, 2, 2, 2, 3, 0, 0]


def test_replacement_mapper_hand_computed(clip):
    m = seq_align.replacement_mapper(tok(clip, "a photo of a cat"), tok(clip, "a photo of a grimalkin"))
    expected = torch.zeros(77, 77)
    for i in range(5):
        expected[i, i] = 1  # SOT, a, photo, of, a
    expected[5, 5:8] = 1 / 3  # cat -> gri mal kin: each target token gets 1/3 of "cat"
    for k in range(69):
        expected[6 + k, 8 + k] = 1  # EOT and padding stay aligned after the longer word
    assert torch.equal(m, expected)


def test_replacement_mapper_rejects_different_word_counts(clip):
    with pytest.raises(tokens.PromptError, match="same number of words.*source 'a cat' has 2, target 'a big cat' has 3"):
        seq_align.replacement_mapper(tok(clip, "a cat"), tok(clip, "a big cat"))


def test_refinement_mapper_hand_computed(clip):
    mapper, alphas = seq_align.refinement_mapper(tok(clip, "a photo of a cat"), tok(clip, "a photo of a fluffy cat"))
    assert mapper[:8].tolist() == [0, 1, 2, 3, 4, 0, 5, 6]
    assert alphas[:8].tolist() == [1, 1, 1, 1, 1, 0, 1, 1]
    assert mapper[8:].tolist() == list(range(8, 77)) and bool(alphas[8:].eq(1).all())



def _t5(word_ids: list[int]):
    """Hand-made T5 tokens (Flux): one token per word, no start token, end token 1, padded with 0 to 256."""
    n = len(word_ids)
    return tokens.PromptTokens("t5 prompt", tuple(word_ids + [1] + [0] * (255 - n)), ("w",) * max(256, n + 1),
                               tuple(range(1, n + 1)) + (0,) * (256 - n), 1, length=256, encoder="t5")


def test_flux_prompts_longer_than_a_clip_chunk_fit_t5s_sequence():
    """T5 prompts past 75 tokens but within T5's 256 (here 100 words) are mapped by word swap and refinement; a prompt
    with no room for the end token is refused naming T5's sequence, not a CLIP chunk. CLIP prompts stop at 75."""
    source = list(range(10, 110))
    target = source[:50] + [500] + source[51:]
    mapper = seq_align.replacement_mapper(_t5(source), _t5(target))
    assert mapper.shape == (256, 256) and torch.equal(mapper, torch.eye(256))  # a one-token swap: token to token
    index, alphas = seq_align.refinement_mapper(_t5(source), _t5(source[:50] + [500] + source[50:]))
    assert index[49:53].tolist() == [49, 0, 50, 51] and alphas[49:53].tolist() == [1, 0, 1, 1]
    seq_align.replacement_mapper(_t5(list(range(10, 265))), _t5(list(range(10, 265))))  # 255 tokens + end: fits
    with pytest.raises(tokens.PromptError,
                       match="has 257 T5 tokens; Prompt-to-Prompt on Flux needs both prompts within T5's 256-token"):
        seq_align.replacement_mapper(_t5(list(range(10, 266))), _t5(source))
    clip_long = tokens.PromptTokens("long", tuple([49406] + [5] * 75 + [49407]), ("w",) * 77,
                                    (0,) + tuple(range(1, 76)) + (0,), 49407)
    clip_over = tokens.PromptTokens("over", tuple([49406] + [5] * 75 + [49407] + [49406, 5, 49407] + [49407] * 74),
                                    ("w",) * 154, (0,) + tuple(range(1, 76)) + (0, 0, 76) + (0,) * 75, 49407)
    assert seq_align.replacement_mapper(clip_long, clip_long).shape == (77, 77)
    with pytest.raises(tokens.PromptError, match="'over' is longer than 75 tokens.*one CLIP chunk"):
        seq_align.replacement_mapper(clip_over, clip_long)
    with pytest.raises(tokens.PromptError, match="source prompt was tokenised for a 256-token context and the target "
                                                 "for 77"):
        seq_align.replacement_mapper(_t5(source), clip_long)
    with pytest.raises(tokens.PromptError, match="source prompt was tokenised for a 77-token context and the target "
                                                 "for 256"):
        seq_align.refinement_mapper(clip_long, _t5(source))


def test_a_prompt_overflows_its_block_when_it_has_more_ids_or_a_word_at_the_blocks_last_position():
    """`overlong`: more ids than one block, or (a tokenizer without an end token) a word at the block's last position;
    `chunks` counts whole blocks and never less than one (a T5 prompt tokenised shorter than its block)."""
    def clip_tokens(last_word):
        return tokens.PromptTokens("p", tuple(range(77)), ("w",) * 77,
                                   (0,) + tuple(range(1, last_word + 1)) + (0,) * (76 - last_word), 49407)

    assert not clip_tokens(75).overlong and clip_tokens(75).last_word_position() == 75
    assert clip_tokens(76).overlong  # no room left for the end token
    assert clip_tokens(75).chunks == 1
    two = tokens.PromptTokens("p", tuple(range(154)), ("w",) * 154, (0,) + (1,) * 3 + (0,) * 150, 49407)
    assert two.chunks == 2 and two.overlong
    short = tokens.PromptTokens("p", (5, 6, 1), ("a", "b", ""), (1, 2, 0), 1, length=256, encoder="t5")
    assert short.chunks == 1 and not short.overlong


def test_readable_tokens_leave_out_start_end_and_padding_and_an_empty_prompts_last_word_is_its_start():
    pieces = ("<|startoftext|>", "red", "cat", "<|endoftext|>", "<|endoftext|>")
    assert tokens.PromptTokens("red cat", (49406, 5, 6, 49407, 49407), pieces, (0, 1, 2, 0, 0), 49407).readable \
        == "red, cat"
    empty = tokens.PromptTokens("", (49406, 49407), pieces[:1] + pieces[3:4], (0, 0), 49407)
    assert empty.readable == "(none)"
    # no word: the start token's position, so an empty prompt's end token is at 1 (EmbCtrl, refinement's alignment)
    assert empty.last_word_position() == 0 and pkg("attention.embctrl")._end(empty) == 1


def test_find_matches_word_tokens_up_to_the_last_word_and_never_start_end_or_padding():
    """A word right before a full chunk's end token is found; an id run that reaches into SOT/EOT/padding is not a
    word (SD2.x pads with id 0, the "!" piece)."""
    full = tokens.PromptTokens("p", tuple(range(77)), ("w",) * 77, (0,) + tuple(range(1, 76)) + (0,), 49407)
    assert full.find([75], "w75") == [75] and full.find([74, 75], "w74 w75") == [74, 75]
    sd2 = tokens.PromptTokens("red", (49406, 5, 49407, 0, 0), ("", "red", "", "!", "!"), (0, 1, 0, 0, 0), 49407)
    assert sd2.find([5], "red") == [1]
    for run in ([0], [5, 49407], [49406, 5]):
        with pytest.raises(tokens.PromptError, match="is not in the prompt 'red'"):
            sd2.find(run, "x")


def test_t5_block_length_is_the_tokenizers_min_length_or_256():
    """A Flux T5 tokenizer without a usable `min_length` gets T5's 256-token sequence (ComfyUI's FluxTokenizer), at
    least 1; a textual-inversion vector is id -1 (a piece of the word before it); a sub-tokenizer without
    `pad_token` pads with id 0."""
    class T5:
        inv_vocab = {5: "\u2581red", 6: "\u2581cat", 1: "</s>"}
        end_token = 1

    class Clip:
        def __init__(self, min_length, pad_token=0):
            self.tokenizer = type("FluxTokenizer", (), {"clip_l": object(), "t5xxl": T5()})()
            if min_length != "absent":
                self.tokenizer.t5xxl.min_length = min_length
            if pad_token is not None:
                self.tokenizer.t5xxl.pad_token = pad_token

        def tokenize(self, text):
            return {"t5xxl": [[(5, 1.0), (torch.zeros(8), 1.0), (6, 1.0), (1, 1.0), (0, 1.0)]]}

    for min_length, expected in (("absent", 256), (None, 256), (0, 256), (300, 300), (1, 1), (-3, 1)):
        got = tokens.tokenize_prompt(Clip(min_length), "red <emb> cat")
        assert (got.length, got.encoder, got.word_ids) == (expected, "t5", (1, 1, 2, 0, 0)), min_length
    got = tokens.tokenize_prompt(Clip(300, pad_token=None), "red <emb> cat")
    assert got.ids == (5, -1, 6, 1, 0) and got.word_ids == (1, 1, 2, 0, 0)


def test_clip_start_and_end_tokens_default_to_clips_own_ids():
    """A CLIP sub-tokenizer without `start_token` / `end_token` attributes: 49406 and 49407 (CLIP's vocabulary)."""
    class Sub:
        inv_vocab = {49406: "<|startoftext|>", 320: "a</w>", 49407: "<|endoftext|>"}

    clip = SimpleNamespace(tokenizer=SimpleNamespace(clip_l=Sub()),
                           tokenize=lambda text: {"l": [[(49406, 1.0), (320, 1.0)] + [(49407, 1.0)] * 75]})
    got = tokens.tokenize_prompt(clip, "a")
    assert got.word_ids[:3] == (0, 1, 0) and got.end_token == 49407 and got.readable == "a"
    # a word's own ids drop the start and end tokens (`tokens_start` 1 when the tokenizer does not say)
    Sub.tokenizer = staticmethod(lambda piece: {"input_ids": [49406, 320, 49407]})
    assert tokens.word_token_ids(clip, "a") == [320]


def test_word_values_parse_and_refuse_items_without_a_word_or_a_number():
    assert tokens.parse_word_values(" cat=2, (red car)=0.5,, ", "weights") == [("cat", 2.0), ("red car", 0.5)]
    for item in ("cat", "=2", "cat=x", "()=1"):
        with pytest.raises(tokens.PromptError, match=rf"`weights` item '{re.escape(item)}' is not of the form "
                                                     "word=number"):
            tokens.parse_word_values(f"dog=1, {item}", "weights")


def test_replacement_mapper_after_a_multi_token_last_source_word(clip):
    """Source "grimalkin" (3 tokens) -> target "cat" (1): the target token reads all three; EOT and padding read the
    source tail, which starts after the source word's LAST token (clamped to position 76 at the end). Two empty
    prompts map position to position."""
    m = seq_align.replacement_mapper(tok(clip, "a photo of a grimalkin"), tok(clip, "a photo of a cat"))
    expected = torch.zeros(77, 77)
    for i in range(5):
        expected[i, i] = 1
    expected[5:8, 5] = 1.0
    for j in range(6, 77):
        expected[min(j + 2, 76), j] = 1
    assert torch.equal(m, expected)
    assert torch.equal(seq_align.replacement_mapper(tok(clip, ""), tok(clip, "")), torch.eye(77))


def _lcs(x, y):
    """Length of the longest common subsequence (plain recursion): the best alignment score with gap 0, match +1,
    mismatch -1, where a mismatch never pays."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(len(x) - 1, -1, -1):
        for j in range(len(y) - 1, -1, -1):
            table[i][j] = table[i + 1][j + 1] + 1 if x[i] == y[j] else max(table[i + 1][j], table[i][j + 1])
    return table[0][0]


def test_global_align_is_an_optimal_alignment_on_random_sequences():
    """For 400 seeded random pairs (lengths 0..8 over 3 symbols, so repeats and ties abound): one entry per y token,
    aligned x indices strictly increasing, every aligned pair equal (a substitution never scores), and as many aligned
    pairs as the longest common subsequence (the optimum)."""
    import random

    rng = random.Random(0)
    for _ in range(400):
        x = [rng.randrange(3) for _ in range(rng.randrange(9))]
        y = [rng.randrange(3) for _ in range(rng.randrange(9))]
        mapping = seq_align.global_align(x, y)
        assert len(mapping) == len(y), (x, y, mapping)
        assert all(-1 <= i < len(x) for i in mapping), (x, y, mapping)
        pairs = [(i, j) for j, i in enumerate(mapping) if i >= 0]
        assert all(x[i] == y[j] for i, j in pairs), (x, y, mapping)
        assert all(a[0] < b[0] for a, b in zip(pairs, pairs[1:])), (x, y, mapping)
        assert len(pairs) == _lcs(x, y), (x, y, mapping)


def test_global_align_breaks_ties_as_the_reference():
    """Traceback from the end prefers an insertion in y, then a deletion from x, then the diagonal: a y token with
    several equal x tokens takes the first of them, of several equal y tokens the last is the inserted one; tokens left
    over at the start are skipped (x) or inserted (y)."""
    assert seq_align.global_align([1, 2, 1], [1]) == [0]
    assert seq_align.global_align([9, 1], [1]) == [1]
    assert seq_align.global_align([1], [9, 1]) == [-1, 0]
    assert seq_align.global_align([1, 1], [1, 1, 1]) == [0, 1, -1]
    assert seq_align.global_align([], [4, 5]) == [-1, -1] and seq_align.global_align([4, 5], []) == []


def test_refinement_aligns_the_real_tokens_only_when_padding_is_a_word():
    """SD2's tokenizer pads with id 0, which is also the token "!": refining "a" into "a !" inserts "!" and keeps EOT
    on the source's EOT. Padding taken into the alignment would match the "!" to the source's first padding token and
    leave EOT unaligned."""
    make = tokens.PromptTokens
    source = make("a", tuple([49406, 320, 49407] + [0] * 74), ("",) * 77, (0, 1) + (0,) * 75, 49407)
    target = make("a !", tuple([49406, 320, 0, 49407] + [0] * 73), ("",) * 77, (0, 1, 2) + (0,) * 74, 49407)
    mapper, alphas = seq_align.refinement_mapper(source, target)
    assert mapper[:4].tolist() == [0, 1, 0, 2] and alphas[:4].tolist() == [1, 1, 0, 1]
    assert mapper[4:].tolist() == list(range(4, 77)) and bool(alphas[4:].eq(1).all())

def test_global_align_prefers_insertion_over_substitution():
    # a substituted token scores lower than two gaps, so "x" is treated as new and "b" is aligned, as the reference
    assert seq_align.global_align([1, 2, 3], [1, 9, 3]) == [0, -1, 2]
    assert seq_align.global_align([1, 2], [1, 2]) == [0, 1]


def test_controller_reweight_and_per_word_windows(clip):
    src, tgt = tok(clip, "a photo of a cat"), tok(clip, "a photo of a fluffy cat")
    ctrl = p2p.build_controller(src, tgt, lambda w: tokens.word_token_ids(clip, w), "refine", 0.8, 0.4,
                                reweight=[("fluffy", 2.0)], cross_words=[("cat", 0.4)])
    assert ctrl.equalizer[5] == 2.0 and ctrl.equalizer.sum() == 78
    assert ctrl.cross_windows[6].tolist() == [0.0, 0.4] and ctrl.cross_windows[5].tolist() == [0.0, 0.8]
    # windows in steps follow the reference: int(f * (S + 1)) for cross, int(S * f) for self
    alpha = p2p.token_alpha(20, 50, ctrl.cross_windows)
    assert alpha[6] == 0 and alpha[5] == 1  # 20 >= int(0.4 * 51) = 20
    assert p2p.self_window_steps((0.0, 0.4), 50) == (0, 20)
    with pytest.raises(tokens.PromptError, match="reweight"):
        p2p.build_controller(src, tgt, lambda w: tokens.word_token_ids(clip, w), "reweight", 0.8, 0.4,
                             reweight=[("fluffy", 2.0)])


def test_replace_refine_reweight_attention_edits():
    g = torch.Generator().manual_seed(0)
    src = torch.rand(2, 4, 77, generator=g).softmax(-1)
    tgt = torch.rand(2, 4, 77, generator=g).softmax(-1)
    assert torch.equal(p2p.replace_attention(src, torch.eye(77)), src)
    mapper, alphas = torch.arange(77), torch.ones(77)
    alphas[5] = 0
    mapper[6] = 5
    out = p2p.refine_attention(src, tgt, mapper, alphas)
    assert torch.equal(out[..., 5], tgt[..., 5]) and torch.equal(out[..., 6], src[..., 5])
    assert torch.equal(out[..., 7], src[..., 7])
    # 154-token contexts (ComfyUI repeats the 77 tokens): the edit applies per 77-column block
    wide = torch.cat([src, src], -1) / 2
    assert torch.equal(p2p.blockwise(lambda a: p2p.replace_attention(a, torch.eye(77)), wide), wide)


def test_local_blend_mask_hand_computed():
    maps = torch.zeros(2, 16, 77)  # 4x4 grid
    maps[0, 5, 3] = 1.0  # source word (token 3) peaks at cell (1, 1)
    maps[1, 10, 4] = 1.0  # target word (token 4) peaks at cell (2, 2)
    mask = p2p.local_blend_mask(maps, [[3], [4]], (8, 8), (4, 4), threshold=0.3, dilation=0)
    assert mask.shape == (2, 1, 8, 8)
    assert mask[0, 0].sum() == 4 and mask[0, 0, 2:4, 2:4].eq(1).all()  # one 4x4 cell -> 2x2 latent pixels
    dilated = p2p.local_blend_mask(maps, [[3], []], (8, 8), (4, 4), threshold=0.3, dilation=1)
    assert dilated[0, 0].sum() == 36 and dilated[1].sum() == 0  # 3x3 cells after max-pool; no words -> empty


def test_controller_constants_reach_the_device_once_per_run_and_stay_out_of_autograd(clip):
    """Per attention call, P2P must not copy its CPU constants (token windows, mapper, alphas, equalizer) to the
    device again: on a GPU each host->device copy from pageable memory synchronises the stream. Checked on the meta
    device: the first call of a step copies, the next calls of that step copy nothing. A grad-mode call (MAG-Edit)
    after an inference-mode one gets its own copies, so backward works."""
    from torch.utils._python_dispatch import TorchDispatchMode

    run_mod, layers = pkg("attention.run"), pkg("attention.layers")
    src, tgt = tok(clip, "a photo of a cat"), tok(clip, "a photo of a fluffy cat")
    ctrl = p2p.build_controller(src, tgt, lambda w: tokens.word_token_ids(clip, w), "refine", 0.8, 0.4,
                                reweight=[("fluffy", 2.0)])
    run = run_mod.RunState(torch.linspace(10, 0, 11), (run_mod.SOURCE, run_mod.TARGET))
    layout = run_mod.BatchLayout.from_call(4, [1, 0])

    def call(device, requires_grad=False):
        q = torch.zeros(4, 16, 8, device=device)
        c = run_mod.AttnCall(q, q, q, 2, "cross", layers.AttnSite("output", 7, 0, 1), (4, 4), layout, run,
                             float(run.sigmas[2]))
        probs = torch.rand(4, 2, 16, 77, device=device, requires_grad=requires_grad)
        return c, probs

    class Copies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
            if isinstance(out, torch.Tensor) and out.device.type not in devices | {"cpu"} and "cpu" in devices:
                Copies.n += 1
            return out

    with torch.inference_mode():
        with Copies():
            ctrl.edit_probs(*call("meta"))
        first = Copies.n
        with Copies():
            for _ in range(3):
                ctrl.edit_probs(*call("meta"))
    assert first > 0 and Copies.n == first  # nothing copied after the first call of the step
    # values (labels [1, 0]: rows 2 and 3 are the conditional source and target): inside the window the target row
    # takes the aligned tokens from the source, keeps its new word, and the new word is reweighted (x2)
    c, probs = call("cpu", requires_grad=True)
    out = ctrl.edit_probs(c, probs)
    out.sum().backward()  # the inference-mode copies above are not used under autograd
    expected = (probs[2][..., ctrl.mapper] * ctrl.alphas + probs[3] * (1 - ctrl.alphas)) * ctrl.equalizer
    assert torch.allclose(out[3], expected)
    assert torch.equal(out[:3], probs[:3]) and probs.grad is not None
    run.clear()
    assert not run._memo


def test_replace_controller_maps_source_to_target_and_blend_tokens(clip):
    """mode "replace" builds the word-swap mapper source -> target (not target -> source: "cat" is one token,
    "grimalkin" three), the self window (0, self_replace) and the cross window (0, cross_replace) for every token;
    local-blend words are looked up in both prompts."""
    src, tgt = tok(clip, "a photo of a cat"), tok(clip, "a photo of a grimalkin")
    lookup = lambda w: tokens.word_token_ids(clip, w)  # noqa: E731
    ctrl = p2p.build_controller(src, tgt, lookup, "replace", 0.7, 0.3)
    assert torch.equal(ctrl.mapper, seq_align.replacement_mapper(src, tgt))
    assert ctrl.mapper[5, 6] == pytest.approx(1 / 3) and ctrl.mapper[6, 5] == 0
    assert ctrl.self_window == (0.0, 0.3) and ctrl.alphas is None and ctrl.equalizer is None
    assert ctrl.cross_windows.shape == (77, 2) and bool((ctrl.cross_windows == torch.tensor([0.0, 0.7],
                                                                                             dtype=torch.float64)).all())
    fluffy = tok(clip, "a photo of a fluffy cat")
    refine = p2p.build_controller(src, fluffy, lookup, "refine", 0.8, 0.4)  # aligned source -> target, not reverse
    assert refine.mapper[:8].tolist() == [0, 1, 2, 3, 4, 0, 5, 6] and refine.alphas[:8].tolist() == [1, 1, 1, 1, 1, 0, 1, 1]
    assert p2p.blend_tokens(src, fluffy, lookup, ["cat", "fluffy"]) == ((5,), (5, 6))
    assert p2p.blend_tokens(src, fluffy, lookup, ["fluffy"]) == ((), (5,))
    with pytest.raises(tokens.PromptError, match="local blend word 'dog' is in neither prompt"):
        p2p.blend_tokens(src, fluffy, lookup, ["dog"])
