"""EmbCtrl (Alg. 4, Eq. 12): source embeddings everywhere but the changed tokens (real SD1 tokenizer, tiny CLIP)."""

import pytest
import torch
from conftest import call_node, make_latent, pkg

embctrl = pkg("attention.embctrl")
tokens = pkg("attention.tokens")
comfy_model = pkg("inversion.comfy_model")


def encode(clip, text):
    return comfy_model.encode_text(clip, text)[0][0]


def emb_ctrl(clip, source, target, alignment="align tokens"):
    cond, changed = call_node("AttnEditEmbCtrl", clip=clip, source_prompt=source, target_prompt=target,
                              alignment=alignment)
    return cond, changed


def test_same_length_keeps_the_source_everywhere_but_the_changed_word(tiny):
    src_text, tgt_text = "a woman with brown hair", "a woman with pink hair"
    cond, changed = emb_ctrl(tiny.clip, src_text, tgt_text)
    emb = cond[0][0]
    src, tgt = encode(tiny.clip, src_text), encode(tiny.clip, tgt_text)
    pos = tokens.tokenize_prompt(tiny.clip, tgt_text).find_text("pink")
    assert pos == [4] and changed == "pink"
    others = [j for j in range(77) if j not in pos]
    assert torch.equal(emb[:, others], src[:, others])  # incl. "hair", EOT and padding after the changed word
    assert torch.equal(emb[:, pos], tgt[:, pos])
    # the test means something: CLIP is causal, so the plain target differs from the source after the changed word
    assert torch.equal(tgt[:, :4], src[:, :4]) and not torch.allclose(tgt[:, 5:], src[:, 5:], atol=1e-4)


def test_identical_prompts_give_the_source_embedding(tiny):
    cond, changed = emb_ctrl(tiny.clip, "a photo of a cat", "a photo of a cat")
    assert torch.equal(cond[0][0], encode(tiny.clip, "a photo of a cat"))
    assert changed.startswith("(none")


def test_words_of_other_token_length_are_aligned(tiny):
    src_text, tgt_text = "a photo of a cat on a sofa", "a photo of a grimalkin on a sofa"
    src_tok, tgt_tok = (tokens.tokenize_prompt(tiny.clip, t) for t in (src_text, tgt_text))
    new = tgt_tok.find_text("grimalkin")
    assert len(new) == 3, "grimalkin must be three tokens for this test"
    shift = len(new) - 1  # the target is two tokens longer
    cond, changed = emb_ctrl(tiny.clip, src_text, tgt_text)
    emb, src, tgt = cond[0][0], encode(tiny.clip, src_text), encode(tiny.clip, tgt_text)
    assert changed == ", ".join(tgt_tok.pieces[j] for j in new)
    assert torch.equal(emb[:, new], tgt[:, new])
    assert torch.equal(emb[:, :new[0]], src[:, :new[0]])  # SOT .. "a" before the changed word
    tail = list(range(new[-1] + 1, 77))  # "on a sofa", EOT, padding: the source's, `shift` positions further on
    assert torch.equal(emb[:, tail], src[:, [min(j - shift, 76) for j in tail]])
    index = embctrl.source_index(src_tok, tgt_tok)
    assert (index[new] == -1).all() and index[new[-1] + 1] == src_tok.find_text("on")[0]
    assert not torch.allclose(tgt[:, tail], src[:, [min(j - shift, 76) for j in tail]], atol=1e-4)


def test_shorter_target_pads_with_the_last_source_position():
    make = pkg("attention.tokens").PromptTokens
    pad = 49407
    src = make("a b c", tuple([49406, 1, 2, 3, pad] + [pad] * 72), ("",) * 77, tuple([0, 1, 2, 3] + [0] * 73), pad)
    tgt = make("a c", tuple([49406, 1, 3, pad] + [pad] * 73), ("",) * 77, tuple([0, 1, 2] + [0] * 74), pad)
    index = embctrl.source_index(src, tgt)
    assert index[:4].tolist() == [0, 1, 3, 4]  # "b" dropped: "c" and EOT keep their source embeddings
    assert index[4:].tolist() == [min(j + 1, 76) for j in range(4, 77)]
    counts = r"different token counts \(source 'a b c': 3 tokens, target 'a c': 2\)"
    with pytest.raises(tokens.PromptError, match=counts):
        embctrl.source_index(src, tgt, "same token count only")
    # the other way round: the inserted "b" is changed, the target's EOT keeps the source's EOT (not a padding token)
    index = embctrl.source_index(tgt, src)
    assert index[:5].tolist() == [0, 1, -1, 2, 3]
    assert index[5:].tolist() == [j - 1 for j in range(5, 77)]
    # the last word changed into a longer one: both of its tokens take the target embedding, EOT the source's
    longer = make("a b x y", tuple([49406, 1, 2, 7, 8, pad] + [pad] * 71), ("",) * 77,
                  tuple([0, 1, 2, 3, 3] + [0] * 72), pad)
    index = embctrl.source_index(src, longer)
    assert index[:6].tolist() == [0, 1, 2, -1, -1, 4] and index[6:].tolist() == [j - 1 for j in range(6, 77)]
    # SD2 pads with id 0, also the token "!": only SOT..EOT are aligned, so an added "!" is changed and EOT keeps
    # the source's EOT (not the source's first padding token)
    plain = make("a", tuple([49406, 1, pad] + [0] * 74), ("",) * 77, (0, 1) + (0,) * 75, pad)
    bang = make("a !", tuple([49406, 1, 0, pad] + [0] * 73), ("",) * 77, (0, 1, 2) + (0,) * 74, pad)
    assert embctrl.source_index(plain, bang)[:4].tolist() == [0, 1, -1, 2]


def test_control_embedding_is_eq_12_by_hand():
    source = torch.arange(77 * 2, dtype=torch.float32).view(1, 77, 2)
    target = -source
    index = torch.arange(77)
    index[3] = -1
    index[10] = 5
    out = embctrl.control_embedding(source, target, index)
    assert torch.equal(out[0, 3], target[0, 3]) and torch.equal(out[0, 10], source[0, 5])
    keep = [j for j in range(77) if j not in (3, 10)]
    assert torch.equal(out[0, keep], source[0, keep])
    for bad_source, bad_target in ((source, torch.cat([target, target], 1)), (torch.cat([source, source], 1), target)):
        with pytest.raises(tokens.PromptError, match="one 77-token chunk per prompt"):
            embctrl.control_embedding(bad_source, bad_target, index)


def test_control_options_carry_the_chosen_prompts_pooled_output():
    """SDXL's pooled vector: the source's with pooled "source" (the default), the target's with "target"; a source
    without one leaves the target's; every other option is the target's."""
    source, target = {"pooled_output": "P_src", "width": 1}, {"pooled_output": "P_tgt", "width": 2}
    assert embctrl.control_options(source, target) == {"pooled_output": "P_src", "width": 2}
    assert embctrl.control_options(source, target, "target") == {"pooled_output": "P_tgt", "width": 2}
    assert embctrl.control_options({}, target, "source") == target
    with pytest.raises(tokens.PromptError, match="`pooled` 'both' is unknown"):
        embctrl.control_options(source, target, "both")


def test_other_token_count_is_rejected_in_strict_mode(tiny):
    with pytest.raises(ValueError, match=r"\[Attention Edit\] EmbCtrl.*different token counts.*'align tokens'"):
        emb_ctrl(tiny.clip, "a photo of a cat", "a photo of a grimalkin", "same token count only")
    cond, _ = emb_ctrl(tiny.clip, "a photo of a cat", "a photo of a dog", "same token count only")
    assert cond[0][0].shape == (1, 77, 32)


def test_long_prompts_are_rejected(tiny):
    long = "a photo of " + " ".join(["cat"] * 80)
    with pytest.raises(ValueError, match="longer than 75 tokens"):
        emb_ctrl(tiny.clip, long, long.replace("photo", "painting"))


def test_usable_with_the_edit_sampler_and_core_samplers(tiny):
    import nodes

    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt="a woman with brown hair",
                    method="direct", steps=4, cfg=7.5, latent=make_latent(seed=2))[0]
    ctrl, _ = emb_ctrl(tiny.clip, "a woman with brown hair", "a woman with pink hair")
    plain = comfy_model.encode_text(tiny.clip, "a woman with pink hair")
    edited, source, _ = call_node("AttnEditEditSampler", model=tiny.model, inversion=inv, target=ctrl)
    edited_plain, _, _ = call_node("AttnEditEditSampler", model=tiny.model, inversion=inv, target=plain)
    assert torch.isfinite(edited["samples"]).all()
    assert not torch.allclose(edited["samples"], edited_plain["samples"], atol=1e-4)
    negative = comfy_model.encode_text(tiny.clip, "")
    with torch.inference_mode():
        out = nodes.KSampler().sample(tiny.model, 1, 2, 5.0, "euler", "normal", ctrl, negative,
                                      make_latent(seed=3), denoise=1.0)[0]["samples"]
    assert torch.isfinite(out).all()


def test_75_tokens_fit_and_76_are_rejected(tiny):
    """One CLIP chunk holds SOT + 75 tokens + EOT: a 75-token prompt is aligned position by position (its last token
    changed, EOT kept), one token more is an error naming the prompt."""
    src = tokens.tokenize_prompt(tiny.clip, "a " * 75)
    tgt = tokens.tokenize_prompt(tiny.clip, "a " * 74 + "b")
    assert src.chunks == 1 and src.last_word_position() == 75
    index = embctrl.source_index(src, tgt, "same token count only")
    assert index[75] == -1 and index[:75].tolist() == list(range(75)) and index[76] == 76
    longer = tokens.tokenize_prompt(tiny.clip, "a " * 76)
    with pytest.raises(tokens.PromptError,
                       match="source prompt .* is longer than 75 tokens; EmbCtrl needs both prompts within one CLIP"):
        embctrl.source_index(longer, tgt)


def test_description_says_where_the_sampler_takes_it(tiny):
    """The node's text must not promise hooks the sampler refuses: with a Prompt-to-Prompt hook on the MODEL the
    edit sampler insists on the hook's own target prompt, so an EmbCtrl target is an error there (and works on the
    plain MODEL, test above)."""
    import nodes

    description = nodes.NODE_CLASS_MAPPINGS["AttnEditEmbCtrl"].DESCRIPTION
    assert "with or without attention hooks" not in description
    assert "without a Prompt-to-Prompt or CPAM hook" in description
    src_text, tgt_text = "a woman with brown hair", "a woman with pink hair"
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=src_text, method="direct",
                    steps=3, cfg=7.5, latent=make_latent(seed=2))[0]
    hooked, _ = call_node("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip, source_prompt=src_text,
                          target_prompt=tgt_text, mode="replace", cross_replace=0.8, self_replace=0.4)
    ctrl, _ = emb_ctrl(tiny.clip, src_text, tgt_text)
    with pytest.raises(ValueError, match="`target` is not the attention hook's target prompt"):
        call_node("AttnEditEditSampler", model=hooked, inversion=inv, target=ctrl)


class TargetKeys(pkg("attention.run").Controller):
    """Test controller: per step, the largest difference between the target row's and the source row's cross-attention
    keys (cond chunk) at every token position except `changed`; leaves the output unchanged."""

    EDITS_OUTPUT = True

    def __init__(self, changed):
        self.changed, self.gap = changed, {}

    def active(self, call):
        return call.kind == "cross" and call.run is not None

    def edit_output(self, call, out):
        src, tgt = call.role_rows(0, "source"), call.role_rows(0, "target")
        keep = [j for j in range(call.k.shape[1]) if j not in self.changed]
        gap = float((call.k[tgt][:, keep] - call.k[src][:, keep]).abs().max())
        self.gap[call.step] = max(self.gap.get(call.step, 0.0), gap)
        return out


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_chain_reads_the_source_embedding_at_every_step(tiny, steps):
    """Invert -> EmbCtrl -> Attention Edit Sampler at 10, 20 and 50 steps: at every step the target row's
    cross-attention keys equal the source row's everywhere but the changed token (Eq. 12 holds for the whole run);
    with the plain target prompt they differ after the changed word."""
    hooks = pkg("attention.hooks")
    src_text, tgt_text = "a woman with brown hair", "a woman with pink hair"
    inv = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=src_text, method="direct",
                    steps=steps, cfg=7.5, latent=make_latent(size=8, seed=2))[0]
    changed = tokens.tokenize_prompt(tiny.clip, tgt_text).find_text("pink")
    ctrl, _ = emb_ctrl(tiny.clip, src_text, tgt_text)
    for target, expect_equal in ((ctrl, True), (comfy_model.encode_text(tiny.clip, tgt_text), False)):
        recorder = TargetKeys(changed)
        call_node("AttnEditEditSampler", model=hooks.add_controller(tiny.model, recorder), inversion=inv,
                  target=target)
        assert sorted(recorder.gap) == list(range(steps))
        if expect_equal:
            assert max(recorder.gap.values()) < 1e-5
        else:
            assert min(recorder.gap.values()) > 1e-3
