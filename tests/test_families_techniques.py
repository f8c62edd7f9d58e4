"""Every technique node on tiny SDXL (two text encoders, pooled/size conditioning, attention at levels 2 and 4 only)
and tiny SD2.x v-prediction (OpenCLIP): the SD1.x invariants of each technique (identity/parity, the region outside a
mask unchanged, gradient isolation), the SDXL conditioning kept, and clear errors where families do not mix.
16x16 latents (4x4 semantic grid), 2-4 steps."""

import copy
import dataclasses
import logging

import pytest
import tiny_families
import tiny_models
import torch
from conftest import call_node, make_image, make_latent, pkg

SRC = "a photo of a cat on a sofa"
STEPS = 3
FAMILIES = ("sdxl", "sd2v")

hooks = pkg("attention.hooks")
comfy_model = pkg("inversion.comfy_model")
ops = pkg("masks.ops")
core = pkg("attention.core")
keys = pkg("attention.keys")


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def models():
    with torch.inference_mode():
        return {"sdxl": tiny_families.make_sdxl(0), "sd2v": tiny_families.make_sd2v(0)}


@pytest.fixture(scope="module")
def vae():
    with torch.inference_mode():
        return tiny_models.make_vae(2)


@pytest.fixture(scope="module")
def inversions(models):
    """{family: {method: inversion}} of the same 16x16 latent (null_text for CPAM, direct for MAG / MaSaFusion)."""
    out = {}
    for name, (model, clip) in models.items():
        out[name] = {method: call_node("AttnEditInvert", model=model, clip=clip, source_prompt=SRC, method=method,
                                       steps=STEPS, cfg=7.5, latent=make_latent(size=16, seed=4), inner_steps=1)[0]
                     for method in ("null_text", "direct")}
    return out


def box(size=128, top=32, left=32, height=64, width=64, batch=1):
    mask = torch.zeros(batch, size, size)
    mask[:, top:top + height, left:left + width] = 1.0
    return mask


def encode(clip, text):
    return comfy_model.encode_text(clip, text)


def recording(model):
    """A clone whose UNet calls record (step, chunk labels, context, y) as the UNet receives them."""
    calls = []
    clone = model.clone()

    def recorder(apply_model, args):
        run = args["c"]["transformer_options"].get(keys.RUN)
        y = args["c"].get("y")
        calls.append((None if run is None else run.step, list(args["cond_or_uncond"]),
                      args["c"]["c_crossattn"].detach().clone(), None if y is None else y.detach().clone(),
                      args["c"].get("c_concat")))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(recorder)
    return clone, calls


def test_tiny_sdxl_has_the_sdxl_layout(models):
    """What the tests below rely on: attention only at levels 2 and 4, SDXL adm conditioning, v-prediction SD2."""
    model, clip = models["sdxl"]
    levels = {s.level for s in hooks.unet_sites(model)}
    assert levels == {2, 4} and comfy_model.model_family(model) == "sdxl"
    cond = encode(clip, SRC)[0]
    assert cond[0].shape == (1, 77, 64) and cond[1]["pooled_output"].shape == (1, 32)
    assert str(models["sd2v"][0].model.model_type).endswith("V_PREDICTION")


# ------------------------------------------------------------------------------------------------ Mask from Attention
@pytest.mark.parametrize("family", FAMILIES)
def test_mask_from_attention_finds_planted_objects_with_the_familys_tokens(models, family):
    """Planted maps on a store tokenised by the family's CLIP (SDXL clip_l + clip_g, SD2 OpenCLIP padding with token
    0): instant finds the object without a word, local blend with the word; padding never counts as a word."""
    from test_masks import CAT, iou, planted

    clip = models[family][1]
    tokens = pkg("attention.tokens").tokenize_prompt(clip, "a photo of a cat on grass")
    assert tokens.find_text("cat") == [CAT] and all(w == 0 for w in tokens.word_ids[9:])
    maps, obj = planted(0, grid=8, latent=32)
    store = pkg("attention.store").AttentionStore({4: maps[None]}, ("source",), (tokens,), (32, 32), 1)
    for mode, words in (("instant", ""), ("local blend", "cat")):
        mask, latent_mask, _ = call_node("AttnEditMaskFromAttention", attention=store, mode=mode, words=words,
                                         dilation=0)
        assert mask.shape == (1, 256, 256) and iou(latent_mask[0], obj) >= 0.85, (mode, iou(latent_mask[0], obj))


@pytest.mark.parametrize("family", FAMILIES)
def test_mask_from_attention_every_mode_on_a_real_store(models, family):
    model, clip = models[family]
    store = call_node("AttnEditInvert", model=model, clip=clip, source_prompt=SRC, method="ddim", steps=2, cfg=1.0,
                      latent=make_latent(size=16, seed=3), capture_self_attention=True)[-1]
    # the semantic level is level 4 of the latent on every family: 4x4 for a 16x16 latent; self-attention at level 2
    assert store.cross[4].shape == (1, 4, 4, 77) and store.self_maps[2].shape == (1, 64, 64)
    masks = {}
    for mode, words, extra in (("instant", "", {}), ("local blend", "cat", {"threshold": 0.0}),
                               ("background", "cat, sofa", {})):
        mask, latent_mask, preview = call_node("AttnEditMaskFromAttention", attention=store, mode=mode, words=words,
                                               **extra)
        assert mask.shape == (1, 128, 128) and latent_mask.shape == (1, 16, 16) and preview.shape == (2, 128, 128, 3)
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and torch.isfinite(preview).all()
        assert torch.equal(mask, ops.grid_to_image(latent_mask[:, None], (128, 128)))
        masks[mode] = latent_mask
    assert masks["local blend"].min() == 1, "threshold 0 keeps every cell with attention"


# ------------------------------------------------------------------------------------------------ MAG-Edit
TGT_MAG = "a photo of a yellow cat on a sofa"


@pytest.fixture(scope="module")
def mag(models, inversions):
    """Per family: the P2P refine hook and runs of plain P2P, the node with nothing to do, and guidance."""
    out = {}
    for name, (model, clip) in models.items():
        inv = inversions[name]["direct"]
        p2p = call_node("AttnEditAttentionHook", model=model, clip=clip, source_prompt=SRC, target_prompt=TGT_MAG,
                        mode="refine", cross_replace=0.8, self_replace=0.5)[0]
        out[name] = {"p2p": p2p, "inv": inv, "plain": mag_run(p2p, inv),
                     "noop": mag_run(mag_model(p2p, inv, max_iterations=0, blend_steps=0), inv),
                     "guided": mag_run(mag_model(p2p, inv), inv)}
    return out


def mag_model(p2p, inv, **kw):
    # step knobs count steps of a 50-step run, scaled to STEPS = 3: 25 -> 2 guided, 34 -> 2 blended steps
    args = dict(mask=box(), target_words="yellow", constraint="token_ratio", max_iterations=3, guidance_steps=25,
                scale=2.5, blend_steps=34)
    args.update(kw)
    return call_node("AttnEditMAGGuidance", model=p2p, inversion=inv, **args)[0]


def mag_run(model, inv):
    target = hooks.controllers_of(model)[0].target_conditioning
    step_hooks = hooks.step_hooks_of(model)
    with torch.inference_mode():
        return pkg("inversion.engine").edit_image(model, inv, 0, target, step_hooks,
                                                  grad=any(getattr(h, "NEEDS_GRAD", False) for h in step_hooks))


@pytest.mark.parametrize("family", FAMILIES)
def test_mag_without_iterations_is_plain_prompt_to_prompt(mag, family):
    plain, noop = mag[family]["plain"], mag[family]["noop"]
    assert torch.equal(plain[0], noop[0])
    assert torch.equal(plain[1].mean_map("cross", 4), noop[1].mean_map("cross", 4))


@pytest.mark.parametrize("family", FAMILIES)
def test_mag_guidance_lowers_its_loss_and_keeps_the_outside(mag, family):
    runs = mag[family]
    trace = runs["guided"][2]["mag_edit"]
    assert sorted(trace["loss"]) == [0, 1]
    for step, losses in trace["loss"].items():
        assert len(losses) == 3 and min(losses[1:]) < losses[0], (step, losses)
    ratios = [r[0] for r in trace["target_ratio"][0]]
    assert ratios[-1] > ratios[0], ratios
    final, plain = runs["guided"][0], runs["plain"][0]
    hook = hooks.step_hooks_of(mag_model(runs["p2p"], runs["inv"]))[0]
    outside = (hook.blend_masks[0] == 0).expand_as(final[1])
    assert 0 < outside.float().mean() < 1
    assert torch.equal(final[0], plain[0]), "the source branch is never touched"
    assert torch.equal(final[1][outside], plain[0][outside]), "outside the (dilated) mask: the source, bit for bit"
    assert not torch.equal(final[1][~outside], plain[1][~outside])


def test_mag_stops_after_sdxls_last_semantic_layer_exactly(mag):
    runs = mag["sdxl"]
    hook = hooks.step_hooks_of(mag_model(runs["p2p"], runs["inv"]))[0]
    # tiny SDXL: input 7, 8 (3 transformers each), middle (3), output 0-2 (3 each) at 4x4
    assert hook.stop_after == 18 and hook.semantic_grid == (4, 4)
    full = hooks.add_step_hook(runs["p2p"], dataclasses.replace(hook, stop_after=None))
    assert torch.equal(mag_run(full, runs["inv"])[0], runs["guided"][0])


# ------------------------------------------------------------------------------------------------ CPAM
def cpam(models, inversions, family, strategy, mask=None, target=SRC, **kw):
    model, clip = models[family]
    return call_node("AttnEditCPAMSelfAttn", model=model, inversion=inversions[family]["null_text"], clip=clip,
                     source_mask=box() if mask is None else mask, target_prompt=target, strategy=strategy, **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_cpam_background_change_with_nothing_kept_reproduces_the_source(models, inversions, family):
    patched, target = cpam(models, inversions, family, "change background", mask=torch.zeros(1, 128, 128))
    inv = inversions[family]["null_text"]
    edited = call_node("AttnEditEditSampler", model=patched, inversion=inv)[0]  # source pinned under CPAM
    regenerated = call_node("AttnEditEditSampler", model=models[family][0], inversion=inv, target=target)[0]
    assert float((edited["samples"] - regenerated["samples"]).abs().max()) <= 1e-5


class Spy(pkg("attention.run").Controller):
    """Installed after CPAM: records the target rows' cross-attention calls with CPAM's output."""

    EDITS_OUTPUT = True

    def __init__(self):
        self.calls = []

    def active(self, call):
        return call.kind == "cross" and call.run is not None and "target" in call.run.roles

    def edit_output(self, call, out):
        self.calls.append((call, call.q.clone(), {n: (k.clone(), v.clone()) for n, (k, v) in call.extra.items()},
                           out.clone()))
        return out


def test_cpam_on_sdxl_edits_only_the_target_and_outside_the_mask_hears_the_null_text(models, inversions):
    inv = inversions["sdxl"]["null_text"]
    model, clip = models["sdxl"]
    patched, target = cpam(models, inversions, "sdxl", "replace object", target="a photo of a dog on a sofa",
                           mask_expand=0.0)
    assert target[0][0].shape == (1, 77, 64) and target[0][1]["pooled_output"].shape == (1, 32)
    spy = Spy()
    with torch.inference_mode():
        final, _, _ = pkg("inversion.engine").edit_image(hooks.add_controller(patched, spy), inv, 0, target)
    plain = call_node("AttnEditEditSampler", model=model, inversion=inv, target=target)
    assert torch.allclose(comfy_model.latent_to_raw(model, final[:1]), plain[1]["samples"], atol=1e-5)
    assert float((comfy_model.latent_to_raw(model, final[1:]) - plain[0]["samples"]).abs().max()) > 1e-3
    assert {c.site.level for c, *_ in spy.calls} == {2, 4}
    for call, q, extra, out in spy.calls:  # Eq. 4 on both SDXL levels: outside M_t only the step's null text
        inside = ops.mask_to_grid(box(), call.grid, binary=True).flatten().bool()
        kn, vn = extra["null"]
        for row in call.role_rows(0, "target"):
            null_out = core.masked_attention(q[row:row + 1], kn[row:row + 1], vn[row:row + 1], call.heads)
            assert torch.equal(out[row:row + 1, ~inside], null_out[:, ~inside])


def test_cpam_patched_sdxl_model_outside_the_edit_sampler_is_bit_identical(models, inversions):
    import nodes

    model, clip = models["sdxl"]
    patched, target = cpam(models, inversions, "sdxl", "replace object", target="a photo of a dog")
    args = dict(seed=3, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal", positive=target,
                negative=encode(clip, ""), latent_image=make_latent(seed=5), denoise=1.0)
    with torch.inference_mode():
        assert torch.equal(nodes.KSampler().sample(model, **args)[0]["samples"],
                           nodes.KSampler().sample(patched, **args)[0]["samples"])


def test_cpam_start_layer_follows_the_architecture(models, inversions, tiny):
    """-1 = the paper's L: the decoder's second block at the semantic level (SD1.x/SD2.x 8 of 16, SDXL 6 of 11)."""
    cpam_math = pkg("attention.cpam")
    expected = {"sdxl": (11, 6), "sd2v": (16, 8)}
    for family, (blocks, start) in expected.items():
        ctrl = hooks.controllers_of(cpam(models, inversions, family, "edit object (keep identity)")[0])[-1]
        assert len(ctrl.layers) == blocks and ctrl.start_layer == start
        assert set(ctrl.layers.values()) == set(range(blocks))
        sites = hooks.unet_sites(models[family][0])  # free layers: one column per attention layer (SDXL: per depth)
        assert list(ctrl.attention_layers) == [(s.block, s.index, s.depth) for s in sites]
        assert ctrl.free_layers.shape == (STEPS, len(sites)) and (len(sites) > blocks) == (family == "sdxl")
    sd1 = [(s.block, s.index, s.level) for s in hooks.unet_sites(tiny.model)]
    assert cpam_math.paper_start_layer(sd1) == cpam_math.START_LAYER == 8  # the paper's own value on SD1.5
    fixed = hooks.controllers_of(cpam(models, inversions, "sdxl", "edit object (keep identity)", start_layer=3)[0])
    assert fixed[-1].start_layer == 3


def test_cpam_start_layer_past_the_last_block_is_reported(models, inversions, caplog):
    with caplog.at_level(logging.WARNING):
        cpam(models, inversions, "sdxl", "edit object (keep identity)", start_layer=12)
    assert "start_layer 12 is past the model's last transformer block (11 blocks, 0-10)" in caplog.text


# ------------------------------------------------------------------------------------------------ MaSaFusion
TGT_FUSION = "a photo of a dog on a sofa"


@pytest.fixture(scope="module")
def adapters():
    with torch.inference_mode():
        return {"sdxl": tiny_families.make_t2i_adapter_xl(), "sd1": tiny_models.make_t2i_adapter()}


def adapter_cond(clip, net, hint_seed=0):
    import nodes

    with torch.inference_mode():
        return nodes.ControlNetApply().apply_controlnet(encode(clip, TGT_FUSION), net, make_image(128, seed=hint_seed),
                                                        1.0)[0]


def fuse(models, inversions, family, adapter=None, mask=None, **kw):
    model, clip = models[family]
    args = dict(model=model, clip=clip, inversion=inversions[family]["direct"], target_prompt=TGT_FUSION,
                mask=box() if mask is None else mask, seed=7, start_step=0, layers="all", **kw)
    if adapter is not None:
        args["adapter"] = adapter
    return [o["samples"] for o in call_node("AttnEditFusionWithAdapter", **args)]


def test_fusion_with_an_sdxl_t2i_adapter(models, inversions, adapters):
    """The SDXL adapter (features after input blocks 3, 5, 8 and the middle block) drives the intermediate image only;
    with an empty region the edit returns the source (see test_fusion for the tolerance)."""
    clip = models["sdxl"][1]
    control = adapter_cond(clip, adapters["sdxl"], 1)[0][1]["control"]
    assert control.t2i_model.xl and comfy_model.model_family(models["sdxl"][0]) == "sdxl"
    t1, i1, s1 = fuse(models, inversions, "sdxl", adapter_cond(clip, adapters["sdxl"], 1))
    t2, i2, s2 = fuse(models, inversions, "sdxl", adapter_cond(clip, adapters["sdxl"], 2))
    assert float((i1 - i2).abs().max()) > 1e-2, "a different hint must change the intermediate image"
    assert not torch.allclose(t1, t2, atol=1e-3) and torch.equal(s1, s2)
    target, intermediate, source = fuse(models, inversions, "sdxl", adapter_cond(clip, adapters["sdxl"], 1),
                                        mask=torch.zeros(1, 64, 64), adapter_on_target=False)
    assert torch.allclose(target, source, atol=5e-2, rtol=0) and not torch.allclose(intermediate, source, atol=1e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_fusion_without_adapter_and_empty_region_returns_the_source(models, inversions, family):
    target, intermediate, source = fuse(models, inversions, family, mask=torch.zeros(1, 64, 64))
    assert torch.allclose(target, source, atol=5e-2, rtol=0) and torch.equal(intermediate, source)
    edited, _, _ = fuse(models, inversions, family)
    assert float((edited - source).abs().max()) > 1e-2


def test_fusion_decoder_layers_on_sdxl_are_the_level_2_decoder(models):
    """SDXL has no attention at the latent resolution: "decoder" = its finest decoder level (64x64 at 1024 px)."""
    fusion = pkg("attention.fusion")
    run = pkg("attention.run")
    ctrl = fusion.MaskedSelfAttentionFusion(fusion.ALG5_SOURCES, layers="decoder")
    sites = hooks.unet_sites(models["sdxl"][0])
    state = run.RunState(torch.linspace(10, 0, 4), fusion.ALG5_ROLES)
    active = set()
    for site in sites:
        call = run.AttnCall(torch.zeros(3, 4, 8), torch.zeros(3, 4, 8), torch.zeros(3, 4, 8), 1, "self", site, (2, 2),
                            run.BatchLayout.from_call(3, [0]), state, 10.0)
        if ctrl.active(call):
            active.add((site.block, site.index))
    assert active == {("output", 3), ("output", 4), ("output", 5)}


@pytest.mark.parametrize("family, adapter, message", [
    ("sdxl", "sd1", "`adapter` carries an SD1.x/SD2.x T2I-Adapter but the MODEL is SDXL; load a T2I-Adapter made "
                    "for SDXL"),
    ("sd2v", "sdxl", "`adapter` carries an SDXL T2I-Adapter but the MODEL is SD2.x; load a T2I-Adapter made for "
                     "SD1.x/SD2.x"),
])
def test_fusion_rejects_an_adapter_of_another_family(models, inversions, adapters, family, adapter, message):
    cond = adapter_cond(models[family][1], adapters[adapter])
    with pytest.raises(ValueError, match=r"\[Attention Edit\] MaSaFusion") as err:
        fuse(models, inversions, family, cond)
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------------ EmbCtrl
BROWN, PINK = "a woman with brown hair", "a woman with pink hair"


def emb_ctrl(clip, source, target, **kw):
    return call_node("AttnEditEmbCtrl", clip=clip, source_prompt=source, target_prompt=target,
                     alignment="align tokens", **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_embctrl_keeps_every_encoders_source_rows_but_the_changed_word(models, family):
    clip = models[family][1]
    (cond,), changed = emb_ctrl(clip, BROWN, PINK)
    emb, options = cond
    (src, src_opt), (tgt, tgt_opt) = encode(clip, BROWN)[0], encode(clip, PINK)[0]
    pos = pkg("attention.tokens").tokenize_prompt(clip, PINK).find_text("pink")
    assert pos == [4] and changed == "pink" and emb.shape == src.shape
    others = [j for j in range(77) if j != 4]
    halves = [slice(0, 32), slice(32, 64)] if family == "sdxl" else [slice(0, 32)]  # clip_l | clip_g
    for half in halves:
        assert torch.equal(emb[:, others, half], src[:, others, half])
        assert torch.equal(emb[:, 4, half], tgt[:, 4, half])
        # the test means something for every encoder: the plain target differs after the word (causal CLIP)
        assert not torch.allclose(tgt[:, 5:, half], src[:, 5:, half], atol=1e-4)
    assert torch.equal(options["pooled_output"], src_opt["pooled_output"])
    assert not torch.equal(src_opt["pooled_output"], tgt_opt["pooled_output"])
    (target_pooled,), _ = emb_ctrl(clip, BROWN, PINK, pooled="target")
    assert torch.equal(target_pooled[1]["pooled_output"], tgt_opt["pooled_output"])
    assert torch.equal(target_pooled[0], emb)
    (same,), _ = emb_ctrl(clip, BROWN, BROWN)
    assert torch.equal(same[0], src) and torch.equal(same[1]["pooled_output"], src_opt["pooled_output"])


@pytest.mark.parametrize("family", FAMILIES)
def test_embctrl_pooled_output_reaches_only_the_sdxl_unet(models, inversions, family):
    """SDXL reads the pooled vector (adm), SD2.x does not: the `pooled` choice changes only the SDXL edit."""
    model, clip = models[family]
    inv = inversions[family]["direct"]
    edits = {}
    for pooled in ("source", "target"):
        cond, _ = emb_ctrl(clip, SRC, "a photo of a dog on a sofa", pooled=pooled)
        edited, source, _ = call_node("AttnEditEditSampler", model=model, inversion=inv, target=cond)
        edits[pooled] = edited["samples"]
    assert torch.equal(edits["source"], edits["target"]) == (family == "sd2v")


# ------------------------------------------------------------------------------------------------ SDXL size conditioning
def test_edit_sampler_keeps_the_sources_size_conditioning(models, inversions, caplog):
    """One batch holds both branches and SDXL's size conditioning is one value per entry: a CLIPTextEncodeSDXL
    target with other sizes must not move the source branch (it would leave the inverted path); it is logged."""
    model, clip = models["sdxl"]
    inv = inversions["sdxl"]["direct"]
    plain = encode(clip, "a photo of a dog on a sofa")
    sized = [[plain[0][0], dict(plain[0][1], width=2048, height=2048, target_width=1024, target_height=1024)]]
    same = [[plain[0][0], dict(plain[0][1], width=128, height=128)]]  # the image's own size: nothing to report
    recorder, calls = recording(model)
    with caplog.at_level(logging.WARNING):
        a = call_node("AttnEditEditSampler", model=recorder, inversion=inv, target=plain)
        assert "size conditioning" not in caplog.text
        c = call_node("AttnEditEditSampler", model=model, inversion=inv, target=same)
        assert "size conditioning" not in caplog.text
        b = call_node("AttnEditEditSampler", model=model, inversion=inv, target=sized)
    assert "`target` asks for SDXL size conditioning" in caplog.text and "'width': 2048" in caplog.text
    assert all(torch.equal(x[0]["samples"], y[0]["samples"]) for x, y in ((a, b), (a, c)))
    assert torch.equal(a[1]["samples"], b[1]["samples"])
    y = calls[0][3]
    assert y.shape[-1] == 32 + 6 * 256 and y.shape[0] == 2 * len(calls[0][1])  # pooled + 6 size embeddings per row



def test_a_non_square_images_own_size_is_not_reported(models, caplog):
    """A 128 x 64 px picture (16 x 8 latent): a target encoded with the picture's own size (height 128, width 64)
    asks for the size the source branch uses, so nothing is logged; the image size is (rows, columns) of the latent."""
    model, clip = models["sdxl"]
    latent = {"samples": torch.randn(1, 4, 16, 8, generator=torch.Generator().manual_seed(4))}
    inv = call_node("AttnEditInvert", model=model, clip=clip, source_prompt=SRC, method="direct", steps=STEPS,
                    cfg=7.5, latent=latent)[0]
    plain = encode(clip, "a photo of a dog on a sofa")
    own = [[plain[0][0], dict(plain[0][1], width=64, height=128, target_width=64, target_height=128)]]
    with caplog.at_level(logging.WARNING):
        call_node("AttnEditEditSampler", model=model, inversion=inv, target=own)
    assert "size conditioning" not in caplog.text


# ------------------------------------------------------------------------------------------------ InstDiffEdit
def count_unet_calls(model, log):
    clone = model.clone()

    def counting(apply_model, args):
        concat = args["c"].get("c_concat")
        log.append((int(args["input"].shape[0]), None if concat is None else tuple(concat.shape)))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(counting)
    return clone


def test_instant_edit_with_an_sdxl_inpainting_finish(models, vae):
    model, clip = models["sdxl"]
    with torch.inference_mode():
        inpaint, _ = tiny_families.make_sdxl(3, inpaint=True)
    base_log, inpaint_log = [], []
    image = make_image(size=128, seed=3)
    out, mask, latent = call_node(
        "AttnEditInstantEdit", image=image, model=count_unet_calls(model, base_log), clip=clip, vae=vae,
        edit_text="a photo of a dog on grass", steps=4, inpaint_model=count_unet_calls(inpaint, inpaint_log),
        paste_back=True, phi=0.5, feather=0)
    assert 0 < float(mask.mean()) < 1, "the test needs a mask with an inside and an outside"
    # mask phase int(4 * 0.5) batched calls of 2n rows; the finish 4 calls of 2 rows, with the mask (1 channel) and the
    # masked image's latent (4) concatenated to the SDXL inpainting UNet's input
    assert [n for n, _ in base_log] == [6, 6] and all(c is None for _, c in base_log)
    assert inpaint_log == [(2, (2, 5, 16, 16))] * 4
    with torch.inference_mode(), pkg("inversion.instant").seeded(0):
        x0 = comfy_model.vae_encode(vae, image).float()
    outside = ops.mask_to_grid(1 - mask, (16, 16), binary=True).bool().expand(-1, 4, -1, -1)
    assert torch.allclose(latent["samples"][outside], x0[outside], atol=1e-5)
    assert not torch.allclose(latent["samples"][~outside], x0[~outside], atol=1e-3)
    keep = (mask == 0)[..., None].expand_as(out)
    assert torch.equal(out[keep], image[keep])


def test_instant_edit_on_sd2_v_prediction_keeps_the_outside(models, vae):
    model, clip = models["sd2v"]
    image = make_image(size=128, seed=3)
    out, mask, latent = call_node("AttnEditInstantEdit", image=image, model=model, clip=clip, vae=vae,
                                  edit_text="a photo of a dog on grass", steps=4, seeds=2, phi=0.5, feather=0)
    assert 0 < float(mask.mean()) < 1
    with torch.inference_mode(), pkg("inversion.instant").seeded(0):
        x0 = comfy_model.vae_encode(vae, image).float()
    outside = ops.mask_to_grid(1 - mask, (16, 16), binary=True).bool().expand(-1, 4, -1, -1)
    assert torch.allclose(latent["samples"][outside], x0[outside], atol=1e-5)
    assert torch.isfinite(out).all() and not torch.allclose(latent["samples"], x0, atol=1e-3)


def test_instant_edit_rejects_an_inpainting_model_of_another_family(models, vae):
    model, clip = models["sdxl"]
    with torch.inference_mode():
        sd1_inpaint = tiny_models.make_inpaint_model()
    with pytest.raises(ValueError, match=r"\[Attention Edit\] InstDiffEdit: `inpaint_model` is sd1 but `model` is "
                                         r"sdxl; connect an inpainting checkpoint of the same family"):
        call_node("AttnEditInstantEdit", image=make_image(size=64), model=model, clip=clip, vae=vae,
                  edit_text="a dog", steps=4, inpaint_model=sd1_inpaint)


# ------------------------------------------------------------------------------------------------ DPL
def dpl(models, family, latent=None, **kw):
    model, clip = models[family]
    kw.setdefault("token_iterations", 2)
    kw.setdefault("null_text_iterations", 2)
    return call_node("AttnEditDynamicPromptLearn", model=kw.pop("model", model), clip=clip,
                     source_prompt="a cat and a dog", nouns="cat, dog", steps=kw.pop("steps", STEPS), cfg=7.5,
                     latent=latent or make_latent(size=16, seed=4), **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_dpl_without_token_updates_is_null_text_inversion_bit_for_bit(models, family):
    model, clip = models[family]
    inv = dpl(models, family, token_iterations=0, null_text_iterations=1, steps=2)[0]
    reference = call_node("AttnEditInvert", model=model, clip=clip, source_prompt="a cat and a dog",
                          method="null_text", steps=2, cfg=7.5, latent=make_latent(size=16, seed=4),
                          inner_steps=1, capture_self_attention=True)[0]
    assert torch.equal(inv.latents, reference.latents) and torch.equal(inv.uncond, reference.uncond)


def test_dpl_on_sdxl_learns_both_encoders_rows_and_keeps_the_pooled_output(models):
    """Learned rows for clip_l and clip_g; the per-step context [77, 2048-like] reaches the source row; the pooled /
    size conditioning (y) of the source row is the source prompt's in the inversion and in the edit, so the edit's
    source branch regenerates DPL's reconstruction."""
    model, clip = models["sdxl"]
    recorder, inversion_calls = recording(model)
    inv, store, _, recon, _ = dpl(models, "sdxl", model=recorder, learning_rate=0.03)
    rows = inv.extras["dpl"]["rows"][0]
    assert set(rows) == {"l", "g"} and rows["l"].shape == rows["g"].shape == (STEPS, 2, 32)
    assert inv.cond.shape == inv.uncond.shape == (STEPS, 1, 77, 64) and store.cross[4].shape == (1, 4, 4, 77)
    assert not torch.equal(inv.cond[0, 0], inv.cond[-1, 0])
    edit_model, edit_calls = recording(model)
    target = encode(clip, "a cat and a fox")
    edited, source, _ = call_node("AttnEditEditSampler", model=edit_model, inversion=inv, target=target)
    assert torch.allclose(source["samples"], recon["samples"], atol=1e-3, rtol=0)  # one row vs a batch of two
    pooled = {"source": encode(clip, "a cat and a dog")[0][1]["pooled_output"][0],
              "target": target[0][1]["pooled_output"][0]}
    source_y, seen = set(), 0
    for step, labels, ctx, y, _ in edit_calls:
        ctx, y = ctx.view(len(labels), 2, *ctx.shape[1:]), y.view(len(labels), 2, -1)
        for chunk, label in enumerate(labels):
            if label == 0:
                assert torch.equal(ctx[chunk, 0], inv.cond[step, 0].to(ctx)), "the learned context of this step"
                assert torch.equal(y[chunk, 0, :32], pooled["source"]) and torch.equal(y[chunk, 1, :32],
                                                                                       pooled["target"])
                source_y.add(tuple(y[chunk, 0].tolist()))
                seen += 1
    assert seen == STEPS and len(source_y) == 1
    inversion_y = {tuple(y[0].tolist()) for _, labels, _, y, _ in inversion_calls if labels == [0]}
    assert inversion_y == source_y, "the conditional passes of the inversion saw the same pooled/size conditioning"


def test_dpl_gradients_reach_only_the_noun_rows_of_each_encoder(models):
    """The SDXL context is clip_l | clip_g along E: moving only the clip_g rows changes only the clip_g half, and the
    gradient reaches both encoders' noun rows and nothing of the text encoders."""
    text = pkg("inversion.dpl_text")
    clip = models["sdxl"][1]
    tokens = pkg("attention.tokens").tokenize_prompt(clip, "a cat and a dog")
    encoder = text.RowEncoder(clip, tokens, [2, 5])
    with torch.inference_mode(False), torch.enable_grad():
        comfy_model.make_autograd_safe(clip.cond_stage_model)
        initial = encoder.initial_rows()
        plain = encode(clip, "a cat and a dog")[0][0]
        assert torch.equal(encoder.encode(initial), plain)
        only_g = encoder.encode({"l": initial["l"], "g": initial["g"] + 0.3}).detach()
        only_l = encoder.encode({"l": initial["l"] + 0.3, "g": initial["g"]}).detach()
        rows = {k: (v + 0.3).requires_grad_(True) for k, v in initial.items()}
        encoder.encode(rows).pow(2).sum().backward()
    assert torch.equal(only_g[..., :32], plain[..., :32]) and not torch.equal(only_g[..., 32:], plain[..., 32:])
    assert torch.equal(only_l[..., 32:], plain[..., 32:]) and not torch.equal(only_l[..., :32], plain[..., :32])
    assert torch.equal(only_g[:, :2], plain[:, :2])  # causal: tokens before "cat" untouched
    for key in ("l", "g"):
        assert rows[key].grad is not None and bool((rows[key].grad.abs().sum(-1) > 0).all())
    assert all(p.grad is None for p in clip.cond_stage_model.parameters())


def test_dpl_on_sd2_v_prediction_learns_the_openclip_rows(models):
    inv, _, _, recon, _ = dpl(models, "sd2v", learning_rate=0.03, token_iterations=1)
    assert set(inv.extras["dpl"]["rows"][0]) == {"h"} and inv.cond.shape == (STEPS, 1, 77, 32)
    _, source, _ = call_node("AttnEditEditSampler", model=models["sd2v"][0], inversion=inv,
                             target=encode(models["sd2v"][1], "a cat and a fox"))
    assert torch.allclose(source["samples"], recon["samples"], atol=1e-3, rtol=0)  # one row vs a batch of two


def test_nodes_leave_the_sdxl_model_untouched(models, inversions):
    model = models["sdxl"][0]
    before = copy.deepcopy(model.model_options)
    cpam(models, inversions, "sdxl", "remove object", target="")
    fuse(models, inversions, "sdxl", mask=torch.zeros(1, 64, 64))
    assert model.model_options == before
