"""Dynamic Prompt Learning on real ComfyUI machinery (tiny model, 16x16 latents): parity with null-text inversion,
the per-step conditioning reaching the UNet, Prompt-to-Prompt on top, leakage reduction, gradient isolation."""

import dataclasses

import pytest
import torch
from conftest import call_node, make_latent, pkg

SRC = "a cat and a dog"
STEPS = 4
NOUNS = [[2], [5]]  # token positions of "cat" and "dog"


def dpl(tiny, latent=None, prompt=SRC, nouns="cat, dog", **kw):
    kw.setdefault("token_iterations", 4)
    kw.setdefault("null_text_iterations", 2)
    return call_node("AttnEditDynamicPromptLearn", model=kw.pop("model", tiny.model), clip=tiny.clip,
                     source_prompt=prompt, nouns=nouns, steps=kw.pop("steps", STEPS), cfg=7.5,
                     latent=latent or make_latent(seed=4), **kw)


def null_text(tiny, latent=None, **kw):
    return call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method="null_text",
                     steps=STEPS, cfg=7.5, latent=latent or make_latent(seed=4), inner_steps=2, **kw)[0]


@pytest.fixture(scope="module")
def learned(tiny):
    return dpl(tiny, learning_rate=0.03)


@pytest.fixture(scope="module")
def baseline(tiny):
    return null_text(tiny)


def source_maps(tiny, inversion):
    """Source-branch cross-attention [h, w, T] of an edit that keeps the prompt (mean over steps)."""
    _, _, store = call_node("AttnEditEditSampler", model=tiny.model, inversion=inversion, target=inversion.source)
    return store.cross[4][store.row_of("source")]


def test_outputs_shapes_and_types(tiny, learned):
    inv, store, mask, recon, psnr = learned
    assert inv.method == "dpl" and inv.steps == STEPS and inv.batch == 1
    assert inv.cond.shape == inv.uncond.shape == (STEPS, 1, 77, 32)
    assert store.cross[4].shape == (1, 4, 4, 77) and store.self_maps[2].shape == (1, 64, 64)
    # the maps the losses saw, averaged over steps: still a distribution over the prompt's tokens in every cell
    assert torch.allclose(store.cross[4].sum(-1), torch.ones(1, 4, 4), atol=1e-4)
    assert mask.shape == (1, 128, 128) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert recon["samples"].shape == (1, 4, 16, 16) and psnr == -1.0
    assert torch.isfinite(inv.cond).all() and torch.isfinite(inv.uncond).all()
    logs = inv.extras["dpl"]
    assert len(logs["token_iterations"][0]) == STEPS and all(0 <= n <= 4 for n in logs["token_iterations"][0])
    assert logs["estimated_background"][0].shape == (8, 8)


def test_progress_counts_every_unit_once(tiny, monkeypatch):
    """The bar's total is steps x (1 + token_iterations + null_text_iterations): the DDIM pass, one unit per token
    update and per null-text step, and the unspent budget of a step that stopped early, so it ends exactly full."""
    progress_cls = pkg("inversion.comfy_model").Progress
    original = progress_cls.update
    calls = []

    def counting(self, units=1, x0=None):
        calls.append((units, self.total))
        return original(self, units, x0)

    monkeypatch.setattr(progress_cls, "update", counting)
    inv = dpl(tiny)[0]
    monkeypatch.setattr(progress_cls, "update", original)
    assert calls[0][1] == STEPS * (1 + 4 + 2)
    assert sum(units for units, _ in calls) == calls[0][1]
    assert sum(inv.extras["dpl"]["token_iterations"][0]) > 0  # token updates happened (each is one unit)
    assert sum(1 for units, _ in calls if units == 1) >= STEPS + sum(inv.extras["dpl"]["token_iterations"][0])


def test_without_token_updates_it_is_null_text_inversion_bit_for_bit(tiny):
    inv = dpl(tiny, token_iterations=0)[0]
    assert inv.extras["dpl"]["token_iterations"] == [[]]  # no token loop ran: no step logs
    reference = null_text(tiny, capture_self_attention=True)  # same capture, so the same attention kernels run
    assert torch.equal(inv.latents, reference.latents)
    assert torch.equal(inv.uncond, reference.uncond)
    source = pkg("inversion.conditioning").context_of(reference.source, "source")
    assert torch.equal(inv.cond, source[None].expand_as(inv.cond))
    # with a background mask nothing extra is captured: identical to the default Invert node
    half = torch.zeros(1, 64, 64)
    half[:, :, :32] = 1.0  # (a full background is an input error: the nouns would have nowhere to attend)
    masked = dpl(tiny, token_iterations=0, background=half)[0]
    assert torch.equal(masked.uncond, null_text(tiny).uncond)


def recording(model):
    """A clone whose UNet calls record (step, chunk labels, cross-attention context) after our overrides."""
    keys = pkg("attention.keys")
    calls = []
    clone = model.clone()

    def recorder(apply_model, args):
        run = args["c"]["transformer_options"].get(keys.RUN)
        calls.append((run.step, list(args["cond_or_uncond"]), args["c"]["c_crossattn"].detach().clone()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(recorder)
    return clone, calls


def test_the_learned_conditioning_is_the_one_applied_at_each_step(tiny, learned):
    inv = learned[0]
    target = pkg("inversion.comfy_model").encode_text(tiny.clip, "a cat and a fox")
    model, calls = recording(tiny.model)
    call_node("AttnEditEditSampler", model=model, inversion=inv, target=target)
    assert sorted({c[0] for c in calls}) == list(range(STEPS))
    assert not torch.equal(inv.cond[0, 0], inv.cond[-1, 0]), "tokens should differ between steps"
    for step, labels, ctx in calls:
        rows = ctx.view(len(labels), 2, *ctx.shape[1:])  # chunk-major, rows (source, target)
        for chunk, label in enumerate(labels):
            if label == 0:
                assert torch.equal(rows[chunk, 0], inv.cond[step, 0].to(ctx))
                assert torch.equal(rows[chunk, 1], target[0][0][0].to(ctx))
            else:
                assert torch.equal(rows[chunk, 0], inv.uncond[step, 0].to(ctx))
                assert torch.equal(rows[chunk, 1], inv.uncond[step, 0].to(ctx))
    # and it matters: without the learned tokens the source branch regenerates something else
    plain = dataclasses.replace(inv, cond=None)
    a = call_node("AttnEditEditSampler", model=tiny.model, inversion=inv, target=target)[1]["samples"]
    b = call_node("AttnEditEditSampler", model=tiny.model, inversion=plain, target=target)[1]["samples"]
    assert not torch.equal(a, b)


def hook(tiny, target, mode="replace", **kw):
    return call_node("AttnEditAttentionHook", model=tiny.model, clip=tiny.clip, source_prompt=SRC,
                     target_prompt=target, mode=mode, cross_replace=0.8, self_replace=0.4, **kw)[0]


def test_prompt_to_prompt_word_swap_refine_and_reweight_on_top(tiny, learned):
    inv = learned[0]
    swapped, source, _ = call_node("AttnEditEditSampler", model=hook(tiny, "a cat and a fox", local_blend="dog, fox"),
                                   inversion=inv)
    assert torch.isfinite(swapped["samples"]).all() and not torch.equal(swapped["samples"], source["samples"])
    same = call_node("AttnEditEditSampler", model=hook(tiny, "a cat and a fox", reweight="fox=1.0"), inversion=inv)
    plain = call_node("AttnEditEditSampler", model=hook(tiny, "a cat and a fox"), inversion=inv)
    assert torch.equal(same[0]["samples"], plain[0]["samples"])  # reweight by 1 is the identity here too
    stronger = call_node("AttnEditEditSampler", model=hook(tiny, "a cat and a fox", reweight="fox=3.0"), inversion=inv)
    assert not torch.equal(stronger[0]["samples"], plain[0]["samples"])
    refined = call_node("AttnEditEditSampler", model=hook(tiny, "a cat and a small dog", "refine"), inversion=inv)
    assert torch.isfinite(refined[0]["samples"]).all()
    # the source branch follows the learned tokens whatever the hook does
    assert torch.equal(source["samples"], plain[1]["samples"])


def test_a_target_prompt_longer_than_one_chunk_works_with_learned_tokens(tiny, learned):
    long_target = "a cat and a fox, " + ", ".join(["very detailed"] * 40)
    target = pkg("inversion.comfy_model").encode_text(tiny.clip, long_target)
    assert target[0][0].shape[1] > 77
    edited, _, _ = call_node("AttnEditEditSampler", model=tiny.model, inversion=learned[0], target=target)
    assert torch.isfinite(edited["samples"]).all()


def leakage(tiny, inversion, background):
    return pkg("attention.dpl").overlap_and_leakage(source_maps(tiny, inversion), NOUNS, background)


@pytest.mark.parametrize("weights, lower", [((0.0, 1.0, 0.0), "overlap"), ((0.0, 0.0, 1.0), "background"),
                                            (None, "both")])
def test_dpl_lowers_noun_overlap_and_background_mass_vs_null_text(tiny, learned, baseline, weights, lower):
    if weights is None:  # the paper's weights (1, 0.05, 0.05); the tiny model needs a larger step to move
        inv = learned[0]
    else:
        inv = dpl(tiny, learning_rate=0.01, lambda_attention=weights[0], lambda_disjoint=weights[1],
                  lambda_background=weights[2])[0]
    background = inv.extras["dpl"]["background"][0]
    assert 0 < float(background.mean()) < 1, "test needs a non-trivial background"
    base_overlap, base_bg = leakage(tiny, baseline, background)
    overlap, bg = leakage(tiny, inv, background)
    if lower in ("overlap", "both"):
        assert overlap < base_overlap - (0.02 if lower == "overlap" else 0.0), (overlap, base_overlap)
    if lower in ("background", "both"):
        assert bg < base_bg - (0.02 if lower == "background" else 0.0), (bg, base_bg)


def test_one_noun_gives_no_nan_and_skips_the_disjoint_loss(tiny):
    inv, store, mask, _, _ = dpl(tiny, nouns="dog", token_iterations=3)
    assert torch.isfinite(inv.cond).all() and torch.isfinite(inv.uncond).all() and torch.isfinite(store.cross[4]).all()
    losses = inv.extras["dpl"]["losses"][0]
    assert all(first[1] == 0.0 and last[1] == 0.0 for first, last in losses)
    assert all(all(v == v for v in first + last) for first, last in losses)  # no NaN anywhere


def test_gradients_reach_only_the_noun_rows(tiny):
    text = pkg("inversion.dpl_text")
    comfy_model = pkg("inversion.comfy_model")
    tokens = pkg("attention.tokens").tokenize_prompt(tiny.clip, SRC)
    encoder = text.RowEncoder(tiny.clip, tokens, [2, 5])
    transformer = text.text_encoders(tiny.clip)["l"]
    table = transformer.get_input_embeddings().weight
    with torch.inference_mode(False), torch.enable_grad():
        comfy_model.make_autograd_safe(tiny.clip.cond_stage_model)
        table = transformer.get_input_embeddings().weight
        before = table.detach().clone()
        initial = encoder.initial_rows()
        plain = comfy_model.encode_text(tiny.clip, SRC)[0][0]
        assert torch.equal(encoder.encode(initial), plain)  # initial rows = CLIPTextEncode, bit for bit
        rows = {"l": (initial["l"] + 0.3).requires_grad_(True)}
        cond = encoder.encode(rows)
        cond.pow(2).sum().backward()
        # the embedding sequence fed to the transformer differs from the plain one only at the noun positions
        ids = encoder.chunk_ids["l"]
        fed = text.RowOverride(transformer.get_input_embeddings(), ids, [2, 5], rows["l"])(ids)
        base = transformer.get_input_embeddings()(ids)
    others = [i for i in range(77) if i not in (2, 5)]
    assert torch.equal(fed[0, others], base[0, others])
    assert torch.equal(fed[0, [2, 5]], rows["l"].detach().to(fed.dtype))  # (the host asks for float32 itself)
    assert rows["l"].grad is not None and bool((rows["l"].grad.abs().sum(-1) > 0).all())
    assert table.grad is None and torch.equal(table.detach(), before)
    assert all(p.grad is None for p in tiny.clip.cond_stage_model.parameters())
    assert torch.equal(cond[0, :2].detach(), plain[0, :2])  # causal text model: tokens before "cat" are untouched
    assert not torch.equal(cond[0, 2].detach(), plain[0, 2])
    assert transformer.get_input_embeddings() is not None and not isinstance(transformer.get_input_embeddings(),
                                                                            text.RowOverride)


def test_a_full_run_learns_the_noun_rows_and_leaves_the_text_encoder_untouched(tiny, learned):
    transformer = pkg("inversion.dpl_text").text_encoders(tiny.clip)["l"]
    table = transformer.get_input_embeddings().weight.detach().clone()
    inv = dpl(tiny, learning_rate=0.03, steps=2, token_iterations=2)[0]
    assert torch.equal(transformer.get_input_embeddings().weight.detach(), table)
    rows = inv.extras["dpl"]["rows"][0]["l"]
    initial = table[[2368, 1929]].float()  # "cat", "dog"
    assert rows.shape == (2, 2, 32) and not torch.equal(rows[0], initial) and not torch.equal(rows[0], rows[1])


def test_multi_token_nouns_learn_all_their_tokens(tiny):
    inv = dpl(tiny, prompt="a cat and an armadillo", nouns="cat, armadillo", steps=2, token_iterations=2)[0]
    rows = inv.extras["dpl"]["rows"][0]["l"]
    assert rows.shape == (2, 3, 32)  # cat + the two tokens of armadillo
    assert torch.isfinite(inv.cond).all()


def test_a_background_mask_input_is_used_instead_of_the_estimate(tiny):
    mask = torch.zeros(1, 128, 128)
    mask[:, :, :64] = 1.0
    inv, store, out, _, _ = dpl(tiny, background=mask, steps=2, token_iterations=1)
    used = inv.extras["dpl"]["background"][0]
    assert torch.equal(used, torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 4))
    assert torch.equal(out, mask) and inv.extras["dpl"]["estimated_background"] == [None]
    assert store.self_maps == {}


def test_image_batch_is_inverted_image_by_image(tiny):
    latents = make_latent(batch=2, seed=6)
    both = dpl(tiny, latent=latents, steps=2, token_iterations=1, null_text_iterations=1)[0]
    for i in range(2):
        single = dpl(tiny, latent={"samples": latents["samples"][i:i + 1]}, steps=2, token_iterations=1,
                     null_text_iterations=1)[0]
        assert torch.allclose(single.cond[:, 0], both.cond[:, i], atol=1e-6)
        assert torch.allclose(single.uncond[:, 0], both.uncond[:, i], atol=1e-6)


@pytest.mark.parametrize("kw, message", [
    ({"nouns": "bird"}, "'bird' is not in the source prompt"),
    ({"nouns": " , "}, "`nouns`"),
    ({"nouns": "cat, cat"}, "share tokens"),
    ({"image": torch.zeros(1, 64, 64, 3)}, "both `image` and `latent`"),
    ({"background": torch.zeros(3, 64, 64)}, "`background` has a batch of 3"),
])
def test_bad_inputs_are_clear_errors(tiny, kw, message):
    with pytest.raises(ValueError, match="Dynamic Prompt Learning") as err:
        dpl(tiny, **kw)
    assert message in str(err.value)
