"""Flux joint attention (milestone 2 of "Beyond UNets"): routing through optimized_attention_override and
patches_replace["dit"], the image->text ("cross") and image->image ("self") slices, capture, heat maps and masks,
Prompt-to-Prompt on the joint attention, T5 words. On the tiny Flux built from ComfyUI 0.3.x's own classes.

The pure joint maths (attention/joint.py) is checked by hand on both hosts; everything that runs Flux is newer_host."""

import pytest
import tiny_families
import torch
from conftest import call_node, pkg

NEWER = "Flux exists only in ComfyUI 0.3.x"
SRC, TGT = "a photo of a cat", "a photo of a dog"


def flux_latent(seed: int = 3, size: int = 16, batch: int = 1):
    return {"samples": torch.randn(batch, 16, size, size, generator=torch.Generator().manual_seed(seed))}


@pytest.fixture(scope="module")
def flux():
    return tiny_families.make_flux(0)


def invert(model, clip, steps=4, prompt=SRC, **inputs):
    inputs.setdefault("latent", flux_latent())
    return call_node("AttnEditInvert", model=model, clip=clip, source_prompt=prompt, method="flow_euler", steps=steps,
                     cfg=1.0, **inputs)


def hook(model, clip, source=SRC, target=TGT, mode="replace", cross=0.8, self_=0.4, **inputs):
    return call_node("AttnEditAttentionHook", model=model, clip=clip, source_prompt=source, target_prompt=target,
                     mode=mode, cross_replace=cross, self_replace=self_, **inputs)


def error_of(node_id, **inputs):
    with pytest.raises(ValueError) as info:
        call_node(node_id, **inputs)
    message = str(info.value)
    assert message.startswith("[Attention Edit] ") and "\n" not in message.strip(), message
    return message


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


class _Replace:
    """A controller that swaps the cross slice of row 1 for row 0's times a mapper (P2P replace, Eq. in Sec. 3.2)."""

    EDITS_PROBS, EDITS_PROBS_IF_COMPUTED, EDITS_OUTPUT = True, False, False

    def __init__(self, mapper):
        self.mapper, self.seen = mapper, []

    def active(self, call):
        return call.kind == "cross"

    def edit_probs(self, call, probs):
        self.seen.append((call.kind, tuple(probs.shape), call.grid, call.site.block))
        out = probs.clone()
        out[1] = torch.einsum("hnw,wt->hnt", probs[0], self.mapper)
        return out


def test_joint_dispatch_replace_equals_the_formula_and_keeps_text_queries():
    """Hand-computed: row 1's image queries get [P0_cross @ M, P1_self] / row sum, output = P' @ V; row 0 and every
    text query are unchanged (text queries through the host kernel)."""
    joint, run_mod, layers = pkg("attention.joint"), pkg("attention.run"), pkg("attention.layers")
    q, k, v = _qkv()
    text, layout = 3, joint.JointLayout(3, (2, 2))
    mapper = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    ctrl = _Replace(mapper)
    site = layers.AttnSite("double", 0, 0, layers.FLUX_LEVEL)
    batch = run_mod.BatchLayout.from_call(2, [0])
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), ("source", "target"))

    def text_attention(q_text):
        p = torch.softmax(q_text @ k.transpose(-1, -2) / 2.0, -1)
        return pkg("attention.core").merge_heads(p @ v)

    out = joint.joint_dispatch(q, k, v, layout, site, batch, run, 1.0, (ctrl,), text_attention, lambda: None)
    full = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)  # [R, H, L, L]
    img = full[:, :, text:]
    edited1 = torch.cat([img[0, :, :, :text] @ mapper, img[1, :, :, text:]], -1)
    edited1 = edited1 / edited1.sum(-1, keepdim=True)
    expect = torch.stack([img[0], edited1]) @ v
    merge = pkg("attention.core").merge_heads
    assert torch.allclose(out[:, text:], merge(expect), atol=1e-5)
    assert torch.allclose(out[:, :text], merge(full[:, :, :text] @ v), atol=1e-5)
    assert ctrl.seen == [("cross", (2, 2, 4, 3), (2, 2), "double")]


def test_joint_dispatch_without_controllers_runs_the_host_kernel_and_captures_slices():
    joint, run_mod, layers = pkg("attention.joint"), pkg("attention.run"), pkg("attention.layers")
    q, k, v = _qkv()
    layout = joint.JointLayout(3, (2, 2))
    site = layers.AttnSite("single", 1, 0, layers.FLUX_LEVEL)
    batch = run_mod.BatchLayout.from_call(2, [1, 0])  # cfg > 1: two chunks (uncond, cond) of one row each
    sentinel = object()
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), ("source",))
    assert joint.joint_dispatch(q, k, v, layout, site, batch, run, 1.0, (), None, lambda: sentinel) is sentinel
    run.capture = run_mod.CaptureSpec(cross_levels=frozenset({layers.FLUX_LEVEL}))
    out = joint.joint_dispatch(q, k, v, layout, site, batch, run, 1.0, (), lambda qt: qt.new_zeros(2, 3, 8), None)
    assert out.shape == (2, 7, 8)
    cross = joint.joint_probs(q, k, 3)[..., :3]
    assert torch.allclose(run.mean_map("cross", layers.FLUX_LEVEL), cross[1:].mean(1))  # the cond chunk only
    assert run.grids[("cross", layers.FLUX_LEVEL)] == (2, 2)


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
