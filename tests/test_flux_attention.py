"""Flux joint attention (milestone 2 of "Beyond UNets"): routing through optimized_attention_override and
patches_replace["dit"], the image->text ("cross") and image->image ("self") slices, capture, heat maps and masks,
Prompt-to-Prompt on the joint attention, T5 words. On the tiny Flux built from ComfyUI 0.3.x's own classes.

The pure joint maths (attention/joint.py) is checked by hand on both hosts; everything that runs Flux is newer_host."""

import types

import pytest
import tiny_families
import torch
from conftest import call_node, pkg
from joint_checks import (
    SRC,
    TGT,
    assert_interrupt_leaves_the_next_run_clean,
    assert_local_blend_keeps_the_source_outside_the_mask,
    assert_no_leakage,
    controller_calls,
    edit,
    error_of,
    hook,
)

NEWER = "Flux exists only in ComfyUI 0.3.x"
BLEND = 0.97  # local-blend threshold for the tiny Flux's flat maps
QK_SCALE = 1.0  # QK-norm scales (the seeded init leaves them 0: uniform attention), see tiny_families.make_flux


def flux_latent(seed: int = 3, size: int = 16, batch: int = 1):
    return {"samples": torch.randn(batch, 16, size, size, generator=torch.Generator().manual_seed(seed))}


@pytest.fixture(scope="module")
def flux():
    return tiny_families.make_flux(0, qk_scale=QK_SCALE)


def invert(model, clip, steps=4, prompt=SRC, cfg=1.0, **inputs):
    inputs.setdefault("latent", flux_latent())
    return call_node("AttnEditInvert", model=model, clip=clip, source_prompt=prompt, method="flow_euler", steps=steps,
                     cfg=cfg, **inputs)






# ----------------------------------------------------------------------------------------------- pure joint maths
def _qkv(rows=2, heads=2, text=3, image=4, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, heads, text + image, dim, generator=g) for _ in range(3)]


def test_joint_probs_split_by_hand():
    """The cross slice is the image queries' joint softmax over the text keys, the self slice over the image keys
    (not re-normalised per slice); rows of both together sum to 1."""
    joint = pkg("attention.joint")
    q, k, _v = _qkv()
    text = 3
    probs = joint.joint_probs(q, k, text)
    cross, self_ = joint.split_joint(probs, text)
    for r in range(2):
        for h in range(2):
            for n in range(4):
                logits = torch.stack([q[r, h, text + n] @ k[r, h, j] / 2.0 for j in range(7)])  # sqrt(D) = 2
                e = logits.exp()
                assert torch.allclose(cross[r, h, n], e[:text] / e.sum(), atol=1e-6)
                assert torch.allclose(self_[r, h, n], e[text:] / e.sum(), atol=1e-6)
    assert torch.allclose(cross.sum(-1) + self_.sum(-1), torch.ones(2, 2, 4), atol=1e-6)
    assert bool((cross.sum(-1) < 1).all())


def test_p2p_replace_on_joint_attention_equals_the_formula():
    """Hand-computed, with the real PromptToPrompt controller (replace, mapper M, cross window covering the step, no
    self injection): the target row's image queries get [P_src,cross @ M, P_tgt,self] / row sum and output P' @ V; the
    source row and every text query are unchanged (text queries through the host kernel)."""
    joint, run_mod, layers, p2p = (pkg("attention.joint"), pkg("attention.run"), pkg("attention.layers"),
                                   pkg("attention.p2p"))
    merge = pkg("attention.core").merge_heads
    q, k, v = _qkv()
    text, layout = 3, joint.JointLayout(3, (2, 2))
    mapper = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    windows = torch.tensor([[0.0, 1.0]] * 3, dtype=torch.float64)
    ctrl = p2p.PromptToPrompt("replace", mapper, None, windows, (0.0, 0.0), length=3)
    site = layers.AttnSite("double", 0, 0, layers.FLUX_LEVEL)
    batch = run_mod.BatchLayout.from_call(2, [0])  # cfg 1: one cond chunk holding (source, target)
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), ("source", "target"))

    def text_attention(q_text, k, v):
        return merge(torch.softmax(q_text @ k.transpose(-1, -2) / 2.0, -1) @ v)

    out = joint.joint_dispatch(q, k, v, layout, site, batch, run, 1.0, (ctrl,), text_attention, lambda *a: None)
    full = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)  # [R, H, L, L]
    img = full[:, :, text:]
    edited = torch.cat([img[0, :, :, :text] @ mapper, img[1, :, :, text:]], -1)
    edited = edited / edited.sum(-1, keepdim=True)
    assert torch.allclose(out[:, text:], merge(torch.stack([img[0], edited]) @ v), atol=1e-5)
    assert torch.allclose(out[:, :text], merge(full[:, :, :text] @ v), atol=1e-5)
    # self injection at the same step: the target's image->image slice is the source's, then the row re-normalised
    both = p2p.PromptToPrompt("replace", mapper, None, windows, (0.0, 1.0), length=3)
    out2 = joint.joint_dispatch(q, k, v, layout, site, batch, run, 1.0, (both,), text_attention, lambda *a: None)
    edited2 = torch.cat([img[0, :, :, :text] @ mapper, img[0, :, :, text:]], -1)
    edited2 = edited2 / edited2.sum(-1, keepdim=True)
    assert torch.allclose(out2[1, text:], merge(edited2 @ v[1:2])[0], atol=1e-5)
    # the same step outside the sites chosen for self injection: only the cross edit
    other = p2p.PromptToPrompt("replace", mapper, None, windows, (0.0, 1.0), length=3,
                               flux_self_sites=frozenset({("single", 0)}))
    out3 = joint.joint_dispatch(q, k, v, layout, site, batch, run, 1.0, (other,), text_attention, lambda *a: None)
    assert torch.allclose(out3, out, atol=1e-6)


def test_joint_dispatch_without_controllers_runs_the_host_kernel_and_captures_slices():
    joint, run_mod, layers = pkg("attention.joint"), pkg("attention.run"), pkg("attention.layers")
    q, k, v = _qkv()
    layout = joint.JointLayout(3, (2, 2))
    site = layers.AttnSite("single", 1, 0, layers.FLUX_LEVEL)
    batch = run_mod.BatchLayout.from_call(2, [1, 0])  # cfg > 1: two chunks (uncond, cond) of one row each
    sentinel = object()
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), ("source",))
    assert joint.joint_dispatch(q, k, v, layout, site, batch, run, 1.0, (), None, lambda *a: sentinel) is sentinel
    run.capture = run_mod.CaptureSpec(cross_levels=frozenset({layers.FLUX_LEVEL}),
                                      self_levels=frozenset({layers.FLUX_LEVEL}))
    # capture only: the output is the host kernel's (untouched), the maps are recorded on the side
    assert joint.joint_dispatch(q, k, v, layout, site, batch, run, 1.0, (), None, lambda *a: sentinel) is sentinel
    probs = joint.joint_probs(q, k, 3)
    assert torch.allclose(run.mean_map("cross", layers.FLUX_LEVEL), probs[1:, ..., :3].mean(1))  # the cond chunk only
    assert torch.allclose(run.mean_map("self", layers.FLUX_LEVEL), probs[1:, ..., 3:].mean(1))
    assert run.grids[("cross", layers.FLUX_LEVEL)] == (2, 2)
    # query chunks (one image query at a time here) give the same maps
    cross, self_ = joint.captured_slices(q, k, 3, True, chunk_bytes=1)
    assert torch.allclose(cross, probs[..., :3]) and torch.allclose(self_, probs[..., 3:])
    assert joint.captured_slices(q, k, 3, False)[1] is None


class _Seen:
    """A probability editor that keeps what it was handed (slice call and probabilities); it scales the self slice by
    `scale_self` and nothing else."""

    EDITS_PROBS, EDITS_PROBS_IF_COMPUTED, EDITS_JOINT_KV, EDITS_OUTPUT = True, False, False, False

    def __init__(self, scale_self=1.0):
        self.calls, self.scale_self = {}, scale_self

    def active(self, call):
        return True

    def edit_probs(self, call, probs):
        self.calls[call.kind] = (call, probs)
        return probs * self.scale_self if call.kind == "self" else probs

    def edit_joint_kv(self, call, k, v, text):
        raise AssertionError("edit_joint_kv called on a controller without EDITS_JOINT_KV")


def _text_queries(q_text, k, v):
    return pkg("attention.core").merge_heads(q_text)


def test_slice_calls_carry_their_own_keys_values_heads_and_probabilities():
    """A controller on a joint call sees two calls: "cross" with the text keys / values (positions :T) and the joint
    probabilities' text slice, "self" with the image keys / values (T:) and the image slice; both with the image
    queries, H heads and the token grid (non-square: 1 x 3 tokens)."""
    joint, run_mod, layers = pkg("attention.joint"), pkg("attention.run"), pkg("attention.layers")
    merge = pkg("attention.core").merge_heads
    q, k, v = _qkv(heads=3, text=2, image=3)
    seen = _Seen()
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), ("source", "target"))
    joint.joint_dispatch(q, k, v, joint.JointLayout(2, (1, 3)), layers.AttnSite("double", 0, 0, layers.FLUX_LEVEL),
                         run_mod.BatchLayout.from_call(2, [0]), run, 1.0, (seen,), _text_queries, None)
    probs = joint.joint_probs(q, k, 2)
    for kind, keys in (("cross", slice(None, 2)), ("self", slice(2, None))):
        call, handed = seen.calls[kind]
        assert call.kind == kind and call.heads == 3 and call.grid == (1, 3)
        assert torch.equal(call.q, merge(q[:, :, 2:]))
        assert torch.equal(call.k, merge(k[:, :, keys])) and torch.equal(call.v, merge(v[:, :, keys]))
        assert torch.equal(call.probs(), probs[..., keys]) and torch.equal(handed, probs[..., keys])


def test_key_value_editors_act_only_when_active_and_only_they_edit_keys():
    """edit_joint_kv runs for an active controller with EDITS_JOINT_KV only: not for an inactive one (KV-Edit outside
    a source + target run, here without any run), not for an active controller without EDITS_JOINT_KV."""
    joint, run_mod, layers, kvedit = (pkg("attention.joint"), pkg("attention.run"), pkg("attention.layers"),
                                      pkg("attention.kvedit"))
    q, k, v = _qkv()
    layout, site = joint.JointLayout(3, (2, 2)), layers.AttnSite("single", 0, 0, layers.FLUX_LEVEL)
    batch = run_mod.BatchLayout.from_call(2, [0])
    handed = []

    def host(q_, k_, v_):
        handed.append((k_, v_))
        return "host"

    kv = kvedit.JointBackgroundKV(torch.zeros(1, 4, 4))
    assert joint.joint_dispatch(q, k, v, layout, site, batch, None, 1.0, (kv,), None, host) == "host"
    assert handed[-1][0] is k and handed[-1][1] is v
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), ("source", "target"))
    out = joint.joint_dispatch(q, k, v, layout, site, batch, run, 1.0, (_Seen(),), _text_queries, None)
    assert out.shape == (2, 7, 8)


def test_capture_records_the_edited_self_slice_when_a_controller_edits():
    """With an editor acting, the captured maps are the edited, re-normalised slices: the self slice halved, then
    every image-query row divided by its new sum (c / (c + s/2) and (s/2) / (c + s/2))."""
    joint, run_mod, layers = pkg("attention.joint"), pkg("attention.run"), pkg("attention.layers")
    q, k, v = _qkv()
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), ("source",))
    run.capture = run_mod.CaptureSpec(cross_levels=frozenset({layers.FLUX_LEVEL}),
                                      self_levels=frozenset({layers.FLUX_LEVEL}))
    joint.joint_dispatch(q, k, v, joint.JointLayout(3, (2, 2)), layers.AttnSite("single", 0, 0, layers.FLUX_LEVEL),
                         run_mod.BatchLayout.from_call(2, [1, 0]), run, 1.0, (_Seen(scale_self=0.5),), _text_queries,
                         None)
    probs = joint.joint_probs(q, k, 3)[1:]  # the cond chunk
    cross, self_ = probs[..., :3], probs[..., 3:] / 2
    total = cross.sum(-1, keepdim=True) + self_.sum(-1, keepdim=True)
    assert torch.allclose(run.mean_map("self", layers.FLUX_LEVEL), (self_ / total).mean(1), atol=1e-6)
    assert torch.allclose(run.mean_map("cross", layers.FLUX_LEVEL), (cross / total).mean(1), atol=1e-6)


def test_capture_chunks_hold_at_most_chunk_bytes_of_logits(monkeypatch):
    """Capture-only calls take the image queries in chunks of max(1, chunk_bytes // (R*H*L*4)) queries, so the float32
    logits of one chunk stay within chunk_bytes (one query at a time when even one does not fit)."""
    joint = pkg("attention.joint")
    q, k, _v = _qkv(rows=2, heads=2, text=3, image=7)  # R*H*L*4 = 2*2*10*4 = 160 bytes of logits per query
    sizes = []
    real = joint.query_probs

    def spy(qi, k_):
        sizes.append(qi.shape[2])
        return real(qi, k_)

    monkeypatch.setattr(joint, "query_probs", spy)
    for chunk_bytes, expected in ((160 * 3, [3, 3, 1]), (160 * 3 + 159, [3, 3, 1]), (160 * 4, [4, 3]),
                                  (160, [1] * 7), (159, [1] * 7)):
        sizes.clear()
        cross, self_ = joint.captured_slices(q, k, 3, True, chunk_bytes=chunk_bytes)
        assert sizes == expected, (chunk_bytes, sizes)
        assert cross.shape == (2, 2, 7, 3) and self_.shape == (2, 2, 7, 7)


def test_flux_grid_and_vital_layers():
    layers = pkg("attention.layers")
    assert layers.flux_grid((16, 16)) == (8, 8) and layers.flux_grid((15, 9)) == (8, 5)
    assert layers.flux_vital_sites(19, 38) == frozenset(
        {("double", 0), ("double", 1), ("double", 17), ("double", 18), ("single", 6), ("single", 9),
         ("single", 34), ("single", 35), ("single", 37)})
    assert layers.flux_vital_sites(1, 1) == frozenset({("double", 0), ("single", 0)})


# ----------------------------------------------------------------------------------------------- routing and capture
@pytest.mark.newer_host(NEWER)
def test_invert_captures_flux_cross_maps_with_t5_positions(flux):
    model, clip = flux
    inv, _n, _s, _r, _p, store = invert(model, clip)
    assert store.semantic_level == 2 and store.cross_map().shape == (1, 8, 8, 256)  # 16x16 latent -> 8x8 tokens
    tokens = inv.source_tokens
    assert tokens.encoder == "t5" and tokens.length == 256 and len(tokens.ids) == 256
    assert [g[1] for g in tokens.word_groups()] == ["a", "photo", "of", "a", "cat"]
    maps = store.cross_map()[0]
    assert torch.isfinite(maps).all() and float(maps.sum(-1).max()) < 1.0 + 1e-5  # joint-softmax mass on the text
    assert float(maps.min()) >= 0 and float(maps[..., tokens.find_text("cat")].sum()) > 0


@pytest.mark.newer_host(NEWER)
def test_routing_is_exact_without_controllers_and_the_model_is_untouched(flux):
    """The override and dit patches on a plain run change nothing (host kernel), and the input MODEL gets none."""
    model, clip = flux
    before = repr(model.model_options)
    first = invert(model, clip, steps=3)
    assert repr(model.model_options) == before and "optimized_attention_override" not in before
    hooks = pkg("attention.hooks")
    clone = model.clone()
    hooks.install_dispatch(clone)
    options = clone.model_options["transformer_options"]
    assert options["optimized_attention_override"] is hooks.joint_attention_override
    assert sorted(options["patches_replace"]["dit"]) == [("double_block", 0), ("single_block", 0)]
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    second = invert(model, clip, steps=3)
    assert torch.equal(first[0].latents, second[0].latents)


@pytest.mark.newer_host(NEWER)
def test_heat_maps_and_mask_from_attention_on_flux(flux):
    """Attention Heat Maps labels the Flux maps with T5 words; Mask from Attention (local blend) equals P2P's
    local-blend maths on the 8x8 token grid, nearest-resized to the 16x16 latent."""
    model, clip = flux
    _inv, _n, _s, _r, _p, store = invert(model, clip)
    image = torch.rand(1, 128, 128, 3)
    (heat,) = call_node("AttnEditAttentionPreview", attention=store, image=image, branch="source", words="cat, photo")
    assert heat.shape[0] == 2 and torch.isfinite(heat).all()  # one picture per word
    full, grid, _preview = call_node("AttnEditMaskFromAttention", attention=store, mode="local blend", words="cat",
                                     image=image)
    tokens = store.prompts[0].find_text("cat")
    maps = store.cross_map()[0]
    expect = pkg("attention.p2p").local_blend_mask(maps.reshape(1, 64, 256), [tokens], (16, 16), (8, 8), 0.3, 1)[0, 0]
    assert torch.equal(grid[0], expect) and full.shape == (1, 128, 128)
    assert 0 < float(expect.mean()) <= 1
    with pytest.raises(ValueError, match="the word 'tiger' is not in the source prompt"):
        call_node("AttnEditMaskFromAttention", attention=store, mode="local blend", words="tiger")
    instant = call_node("AttnEditMaskFromAttention", attention=store, mode="instant", image=image)[1]
    assert instant.shape == (1, 16, 16) and set(instant.unique().tolist()) <= {0.0, 1.0}  # runs; not validated


# ----------------------------------------------------------------------------------------------- Prompt-to-Prompt


@pytest.fixture(scope="module")
def flux_inv(flux):
    model, clip = flux
    return invert(model, clip, steps=4)[0]


@pytest.mark.newer_host(NEWER)
@pytest.mark.parametrize("mode", ["replace", "refine"])
def test_same_prompt_edit_reproduces_the_source(flux, flux_inv, mode):
    """Target = source: the target's attention is the source's own (identity mapper), so the edit equals the source
    branch, which equals Invert's reconstruction."""
    model, clip = flux
    patched, _target = hook(model, clip, target=SRC, mode=mode)
    edited, source, _store = edit(patched, flux_inv)
    assert torch.allclose(edited, source, atol=1e-5), float((edited - source).abs().max())
    recon = edit(model, flux_inv, target=flux_inv.source)[1]
    assert torch.allclose(source, recon, atol=1e-4)  # captured maps: the image queries' attention in float32


@pytest.mark.newer_host(NEWER)
@pytest.mark.parametrize("mode,target,extra", [("replace", TGT, {}), ("refine", "a photo of a small cat", {}),
                                               ("reweight", SRC, {"reweight": "cat=3.0"})])
def test_p2p_modes_edit_flux(flux, flux_inv, mode, target, extra):
    model, clip = flux
    plain = edit(model, flux_inv, target=pkg("inversion.comfy_model").encode_text(clip, target))[0]
    patched, _t = hook(model, clip, target=target, mode=mode, **extra)
    edited, source, store = edit(patched, flux_inv)
    assert torch.isfinite(edited).all()
    assert float((edited - plain).abs().max()) > 1e-3  # the attention edit acts
    assert store.cross_map().shape == (2, 8, 8, 256) and store.roles == ("source", "target")


@pytest.mark.newer_host(NEWER)
def test_local_blend_keeps_the_source_outside_the_mask(flux, flux_inv):
    """After the last step the target equals the source exactly where the union of the blend words' masks (P2P
    local blend on the captured 8x8 maps, the same running mean the step hook read) is 0, and differs inside.
    The random tiny Flux's maps are flat (within 25% of their maximum), hence the high threshold."""
    assert_local_blend_keeps_the_source_outside_the_mask(*flux, flux_inv, BLEND)


@pytest.mark.newer_host(NEWER)
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_batch_layout_and_sites_seen_by_controllers(flux, cfg):
    """cfg 1: one cond chunk; cfg > 1: two chunks (uncond and cond). Every joint call reaches the controllers as one
    cross and one self call per block, with the site, the step and the 8x8 grid."""
    model, clip = flux
    seen = controller_calls(model, invert(model, clip, steps=2, cfg=cfg)[0])
    labels = {s[3] for s in seen}
    assert labels == {(0,)} if cfg == 1.0 else labels in ({(1, 0)}, {(0, 1)})
    rows = 2 * len(next(iter(labels)))
    assert {(s[0], s[1], s[2]) for s in seen} == {(k, b, 0) for k in ("cross", "self") for b in ("double", "single")}
    assert {s[4] for s in seen} == {(8, 8)} and {s[6] for s in seen} == {0, 1}
    assert {s[5] for s in seen} == {(rows, 2, 64, 256), (rows, 2, 64, 64)}


@pytest.mark.newer_host(NEWER)
def test_no_leakage_into_the_next_run(flux, flux_inv):
    assert_no_leakage(*flux, flux_inv)


@pytest.mark.newer_host(NEWER)
def test_interrupted_flux_edit_leaves_the_next_run_clean(flux, flux_inv, monkeypatch):
    assert_interrupt_leaves_the_next_run_clean(*flux, flux_inv, monkeypatch)


# ----------------------------------------------------------------------------------------------- T5 words, bad input
@pytest.mark.newer_host(NEWER)
def test_t5_words_and_prompt_errors(flux):
    model, clip = flux
    tokens = pkg("attention.tokens").tokenize_prompt(clip, "a sunflower, in Paris")
    groups = tokens.word_groups()
    assert [g[1] for g in groups] == ["a", "sunflower", "in", "paris"]
    # T5 pieces: "\u2581" "a" | "\u2581sunflower" "," | ... : glued punctuation belongs to the word, a lone "\u2581"
    # piece opens one; a word given alone finds its own pieces inside the prompt's
    assert groups[0][0] == [0, 1] and groups[1][0] == [2, 3] and tokens.pieces[:4] == ("", "a", "sunflower", ",")
    lookup = pkg("attention.tokens").word_token_ids
    assert tokens.find(lookup(clip, "sunflower"), "sunflower") == [2] and tokens.find(lookup(clip, "a"), "a") == [0, 1]
    message = error_of("AttnEditAttentionHook", model=model, clip=clip, source_prompt="a photo of a Cat",
                       target_prompt="a photo of a dog", mode="replace", cross_replace=0.8, self_replace=0.4,
                       local_blend="cat")
    assert "local blend word 'cat' is in neither prompt" in message and "T5 (Flux) splits a word" in message, message
    words = " ".join(["a red tree"] * 30) + " and a"  # past a CLIP chunk (75 tokens), within T5's 256: accepted
    assert 76 <= pkg("attention.tokens").tokenize_prompt(clip, f"{words} cat").last_word_position() < 255
    patched, _ = call_node("AttnEditAttentionHook", model=model, clip=clip, source_prompt=f"{words} cat",
                           target_prompt=f"{words} dog", mode="replace", cross_replace=0.8, self_replace=0.4)
    assert patched is not model
    long = " ".join(["cat"] * 300)
    message = error_of("AttnEditAttentionHook", model=model, clip=clip, source_prompt=SRC, target_prompt=long,
                       mode="refine", cross_replace=0.8, self_replace=0.4)
    assert "`target_prompt` has 301 T5 tokens" in message and "holds 256" in message and "Shorten" in message
    message = error_of("AttnEditAttentionHook", model=model, clip=clip, source_prompt=SRC, target_prompt=TGT,
                       mode="replace", cross_replace=0.8, self_replace=0.4, reweight="tiger=2")
    assert "the word 'tiger' is not in the target prompt" in message and "T5 (Flux) splits a word" in message


# ----------------------------------------------------------------------------------------------- background (CPAM)
def test_background_keys_and_values_come_from_the_source_by_hand():
    """KV-Edit on a joint call: the target row attends [K_t,text; K_img with the cells outside M' from the source row]
    (every query), by hand; the source row is unchanged. Mask on a 4x4 latent -> 2x2 token grid, editable cell (0, 0)."""
    joint, run_mod, layers, kvedit = (pkg("attention.joint"), pkg("attention.run"), pkg("attention.layers"),
                                      pkg("attention.kvedit"))
    merge = pkg("attention.core").merge_heads
    q, k, v = _qkv()
    layout = joint.JointLayout(3, (2, 2))
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1.0
    ctrl = kvedit.JointBackgroundKV(mask)
    site = layers.AttnSite("single", 0, 0, layers.FLUX_LEVEL)
    batch = run_mod.BatchLayout.from_call(2, [0])
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), ("source", "target"))

    def host(q_, k_, v_):
        return merge(torch.softmax(q_ @ k_.transpose(-1, -2) / 2.0, -1) @ v_)

    out = joint.joint_dispatch(q, k, v, layout, site, batch, run, 1.0, (ctrl,), None, host)
    k2, v2 = k.clone(), v.clone()
    for pos in (4, 5, 6):  # text 0-2, image cells 3 (editable), 4, 5, 6 (background)
        k2[1, :, pos], v2[1, :, pos] = k[0, :, pos], v[0, :, pos]
    assert torch.allclose(out, host(q, k2, v2), atol=1e-6)
    assert torch.allclose(out[0], host(q, k, v)[0], atol=1e-6)
    assert not torch.allclose(out[1], host(q, k, v)[1], atol=1e-4)


def test_background_kv_with_one_background_token_and_only_with_both_rows():
    """Three of four cells editable: the one background token (position 6, a quarter of it painted: coverage below 0.5)
    still comes from the source. The controller acts only in runs that have both a source and a target row."""
    joint, run_mod, layers, kvedit = (pkg("attention.joint"), pkg("attention.run"), pkg("attention.layers"),
                                      pkg("attention.kvedit"))
    merge = pkg("attention.core").merge_heads
    q, k, v = _qkv(seed=1)
    mask = torch.ones(1, 4, 4)
    mask[0, 2:, 2:] = 0.0  # token cell (1, 1) is the only background cell ...
    mask[0, 3, 3] = 1.0  # ... also with a quarter of it editable (coverage < 0.5: background)
    ctrl = kvedit.JointBackgroundKV(mask)
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), ("source", "target"))

    def host(q_, k_, v_):
        return merge(torch.softmax(q_ @ k_.transpose(-1, -2) / 2.0, -1) @ v_)

    out = joint.joint_dispatch(q, k, v, joint.JointLayout(3, (2, 2)), layers.AttnSite("single", 0, 0, layers.FLUX_LEVEL),
                               run_mod.BatchLayout.from_call(2, [0]), run, 1.0, (ctrl,), None, host)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 6], v2[1, :, 6] = k[0, :, 6], v[0, :, 6]
    assert torch.allclose(out, host(q, k2, v2), atol=1e-6)
    assert not torch.allclose(out[1], host(q, k, v)[1], atol=1e-4)
    call = types.SimpleNamespace
    assert not ctrl.active(call(run=None))
    for roles, expected in ((("source",), False), (("target",), False), (("source", "target"), True)):
        assert ctrl.active(call(run=types.SimpleNamespace(roles=roles))) is expected, roles


def test_background_latent_blend_keeps_the_target_inside_and_the_source_outside():
    """After a step: target = source + M (target - source) with M the mask binarised at coverage 0.5 (0.6 -> inside,
    0.4 -> outside); the source row is unchanged."""
    kvedit, edit_mod = pkg("attention.kvedit"), pkg("inversion.edit")
    mask = torch.zeros(1, 3, 3)
    mask[0, 0, 0], mask[0, 0, 1], mask[0, 0, 2] = 1.0, 0.6, 0.4
    g = torch.Generator().manual_seed(2)
    x_next = torch.randn(2, 4, 3, 3, generator=g)
    ctx = edit_mod.StepContext(0, torch.tensor([1.0, 0.0]), ("source", "target"), x_next, None, {},
                               torch.zeros(2, 4, 3, 3), x_next=x_next.clone())
    kvedit.BackgroundLatentBlend(mask).after_step(ctx)
    inside = torch.zeros(3, 3, dtype=torch.bool)
    inside[0, 0] = inside[0, 1] = True
    assert torch.equal(ctx.x_next[0], x_next[0])
    assert torch.allclose(ctx.x_next[1][:, inside], x_next[1][:, inside], atol=1e-6)  # s + 1 (t - s): rounding
    assert torch.equal(ctx.x_next[1][:, ~inside], x_next[0][:, ~inside])


@pytest.mark.newer_host(NEWER)
def test_cpam_on_flux_preserves_the_background_bit_for_bit(flux, flux_inv):
    """CPAM 'replace object' on Flux: outside the (expanded) mask the edit equals the pinned source exactly; inside it
    differs, and differently from a latent blend alone (the source's background keys / values act)."""
    model, clip = flux
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 40:88] = 1.0
    patched, _target = call_node("AttnEditCPAMSelfAttn", model=model, inversion=flux_inv, clip=clip, source_mask=mask,
                                 target_prompt=TGT, strategy="replace object", mask_expand=0.0)
    edited, source, _store = edit(patched, flux_inv)  # the controller pins the source branch by itself
    cm = pkg("inversion.comfy_model")
    assert torch.equal(source, cm.latent_to_raw(model, flux_inv.latents[-1]))
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:12, 5:11] = True
    assert torch.equal(edited[0][:, ~inside], source[0][:, ~inside])
    assert float((edited[0][:, inside] - source[0][:, inside]).abs().max()) > 1e-3
    blend_only = pkg("attention.hooks").add_step_hook(model, pkg("attention.kvedit").BackgroundLatentBlend(
        patched.model_options["transformer_options"]["attnedit_controllers"][0].masks))
    target = cm.encode_text(clip, TGT)
    other = edit(blend_only, flux_inv, target=target, source_branch="pin to inversion")[0]
    assert torch.equal(other[0][:, ~inside], source[0][:, ~inside])
    assert float((edited[0][:, inside] - other[0][:, inside]).abs().max()) > 1e-3


@pytest.mark.newer_host(NEWER)
def test_cpam_strategies_without_a_flux_form_are_refused(flux, flux_inv):
    model, clip = flux
    mask = torch.zeros(1, 128, 128)
    mask[:, 32:96, 40:88] = 1.0
    message = error_of("AttnEditCPAMSelfAttn", model=model, inversion=flux_inv, clip=clip, source_mask=mask,
                       target_prompt=TGT, strategy="remove object")
    assert "`strategy` 'remove object' does not run on Flux" in message
    assert "'replace object' or 'change background'" in message and "Prompt-to-Prompt Attention Hook" in message


@pytest.mark.newer_host(NEWER)
def test_capturing_maps_leaves_the_flux_output_bit_identical(flux):
    """A capture-only run (no controller) returns exactly the velocity of a run without capture: the maps are computed
    on the side and the host's kernel gives the attention output."""
    model, clip = flux
    cm, run_mod = pkg("inversion.comfy_model"), pkg("attention.run")
    cond = cm.with_guidance(model, cm.encode_text(clip, SRC), 3.5)
    sigmas = torch.tensor([1.0, 0.0])
    x = flux_latent()["samples"]

    def algorithm(den, x):
        v = den(x, 0.6, velocity=True)
        return v, den.run.mean_map("cross", 2)

    spec = run_mod.CaptureSpec(cross_levels=frozenset({2}), self_levels=frozenset({2}))
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        plain, none = cm.run_sampler(model, cond, cond, x, sigmas, 1.0, algorithm,
                                     run_mod.RunState(sigmas, ("source",)))
        captured, maps = cm.run_sampler(model, cond, cond, x, sigmas, 1.0, algorithm,
                                        run_mod.RunState(sigmas, ("source",), capture=spec))
    assert none is None and maps.shape == (1, 64, 256) and torch.equal(plain, captured)
