"""Masks: the MASK contract (masks/ops.py), InstDiffEdit's instant mask and P2P local blend on planted attention maps,
and the Mask from Attention node."""

import pytest
import torch
import torch.nn.functional as F
from conftest import call_node, make_image, make_latent, pkg

WORDS = ["a", "photo", "of", "a", "cat", "on", "grass"]  # token positions 1..7; SOT 0, EOT 8
CAT, GRASS = 5, 7


def ops():
    return pkg("masks.ops")


def instant():
    return pkg("masks.instant")


# ------------------------------------------------------------------------------------------------ planted maps
def disc(size, cx, cy, r):
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return (((xx - cx) ** 2 + (yy - cy) ** 2) < r * r).float()


def planted(seed=0, grid=16, latent=64, leak=0.15, radius=0.3, object_pos=CAT, tokens=77):
    """Cross-attention maps [grid, grid, T] of "a photo of a cat on grass" with a planted object blob.

    The object word attends the blob, "grass" and the function words the rest (as SD's maps do), the start token
    soaks up attention outside the object; every map leaks uniform noise. Returns (maps, object mask on the latent).
    """
    g = torch.Generator().manual_seed(seed)
    o = disc(grid, grid * 0.45, grid * 0.55, grid * radius)
    noise = lambda: torch.rand(grid, grid, generator=g)  # noqa: E731
    maps = torch.rand(grid, grid, tokens, generator=g) * 0.05
    maps[..., 0] = 1 - 0.7 * o + leak * noise()
    for pos in range(1, 8):
        maps[..., pos] = 0.4 * (1 - o) + 0.3 * noise()
    maps[..., object_pos] = o + leak * noise()
    maps[..., GRASS] = 0.8 * (1 - o) + leak * noise()
    maps[..., 8] = 0.5 * noise()
    maps = maps / maps.sum(-1, keepdim=True)  # rows of a softmax
    return maps, F.interpolate(o[None, None], size=(latent, latent))[0, 0]


def groups():
    return [[p] for p in range(1, 8)]


def iou(a, b):
    return float((a * b).sum() / ((a + b) > 0).float().sum())


# ------------------------------------------------------------------------------------------------ MASK contract
def test_block_masks_map_exactly_onto_the_latent_grid_and_back():
    g = torch.Generator().manual_seed(0)
    blocks = (torch.rand(3, 1, 12, 10, generator=g) > 0.5).float()
    pixels = ops().grid_to_image(blocks, (96, 80))  # each latent cell -> its 8x8 pixel block
    assert pixels.shape == (3, 96, 80)
    assert torch.equal(ops().mask_to_grid(pixels, (12, 10)), blocks)
    assert torch.equal(ops().mask_to_grid(pixels, (12, 10), binary=True), blocks)
    # area average: a cell 3/4 covered is 0.75 soft and inside when binary, 1/4 covered is outside
    m = torch.zeros(1, 16, 16)
    m[0, :8, :6] = 1
    grid = ops().mask_to_grid(m, (2, 2))
    assert torch.allclose(grid[0, 0], torch.tensor([[0.75, 0.0], [0.0, 0.0]]))
    assert torch.equal(ops().mask_to_grid(m, (2, 2), binary=True)[0, 0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_mask_batches_broadcast_and_mismatches_are_clear():
    as_batch = ops().as_mask_batch
    assert as_batch(torch.ones(8, 8), 3).shape == (3, 8, 8)
    assert as_batch(torch.ones(1, 1, 8, 8), 2).shape == (2, 8, 8)
    assert torch.equal(as_batch(torch.full((2, 4, 4), 3.0), 2), torch.ones(2, 4, 4))  # clamped to [0, 1]
    with pytest.raises(ValueError, match=r"`mask` has a batch of 2 masks for 3 image\(s\); connect one mask, or one"):
        as_batch(torch.ones(2, 8, 8), 3)
    with pytest.raises(ValueError, match=r"shape \(2, 3, 8, 8\); a MASK is \[batch, height, width\]"):
        as_batch(torch.ones(2, 3, 8, 8), 2)
    with pytest.raises(ValueError, match="NaN"):
        as_batch(torch.full((4, 4), float("nan")), 1)


def test_non_divisible_sizes_use_area_coverage():
    m = torch.zeros(1, 100, 100)
    m[0, :50] = 1
    grid = ops().mask_to_grid(m, (13, 13), binary=True)
    assert grid.shape == (1, 1, 13, 13)
    assert grid[0, 0, :6].min() == 1 and grid[0, 0, 7:].max() == 0


# ------------------------------------------------------------------------------------------------ instant maths
def test_instant_building_blocks_by_hand():
    inst = instant()
    assert torch.equal(inst.minmax(torch.full((1, 3, 3), 7.0)), torch.zeros(1, 3, 3))
    assert torch.allclose(inst.minmax(torch.tensor([[[1.0, 3.0], [2.0, 5.0]]])), torch.tensor([[[0, 0.5], [0.25, 1]]]))
    a = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]], [[0.0, 0.0]]])
    assert torch.allclose(inst.cosine(a, torch.tensor([[1.0, 0.0]])), torch.tensor([1.0, 2**-0.5, 0.0]))
    k = inst.blur_kernel()  # cv2.GaussianBlur((5, 5), 0): OpenCV's fixed table, values in tests/test_instdiffedit.py
    assert k.shape == (5, 5) and torch.equal(k.sum(), torch.tensor(1.0))
    flat = torch.full((6, 6), 0.3)
    assert torch.allclose(inst.gaussian_blur(flat), flat)  # normalised kernel, reflected borders


def test_eq8_position_vector_thresholds_and_refined_map():
    inst = instant()
    base = torch.zeros(4, 2, 2)
    base[0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # index word
    base[1] = torch.tensor([[1.0, 0.3], [0.0, 0.0]])  # cos = 1/sqrt(1.09) = 0.958 -> +1
    base[2] = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # cos = 0.707 -> 0
    base[3] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # cos = 0 -> -1
    roles = inst.instant_roles(base, base[0], 0.9, 0.6, index=0)
    assert torch.allclose(roles.similarities, torch.tensor([1.0, 1 / 1.09**0.5, 2**-0.5, 0.0]))
    assert roles.roles.tolist() == [1.0, 1.0, 0.0, -1.0]
    refined = inst.refined_map(base, base[0], roles)
    obj = inst.minmax(base[:2].mean(0))
    assert torch.allclose(refined, (obj - inst.minmax(base[3])).clamp_min(0))
    # Eq. 6: without a forced index the word most similar to the reference map wins
    assert inst.instant_roles(base, torch.tensor([[0.0, 1.0], [1.0, 0.1]]), index=None).index == 3


def test_instant_mask_finds_the_planted_object_without_a_word():
    for seed in range(4):
        maps, obj = planted(seed)
        mask, refined, roles = instant().instant_mask(maps, groups(), (64, 64))
        assert roles.index == CAT - 1, "Eq. 6 must pick the object word"
        assert roles.roles[GRASS - 1] == -1
        assert iou(mask, obj) >= 0.9, seed
        assert set(mask.unique().tolist()) <= {0.0, 1.0} and refined.min() >= 0 and refined.max() <= 1


def test_instant_mask_follows_the_object_word_wherever_it_is():
    maps, obj = planted(1, object_pos=2)  # "photo" holds the object this time
    mask, _, roles = instant().instant_mask(maps, groups(), (64, 64))
    assert roles.index == 1 and iou(mask, obj) >= 0.9


def test_instant_roles_are_decided_once_and_reused():
    maps, obj = planted(0)
    _, _, first = instant().instant_mask(maps, groups(), (64, 64))
    later = maps.clone()
    later[..., CAT] = maps[..., GRASS]  # a later step whose maps would pick other roles
    _, _, reused = instant().instant_mask(later, groups(), (64, 64), roles=first)
    assert reused is first
    _, _, fresh = instant().instant_mask(later, groups(), (64, 64))
    assert not torch.equal(fresh.roles, first.roles)


def test_forced_words_and_single_word_prompts():
    maps, obj = planted(2)
    mask, _, roles = instant().instant_mask(maps, groups(), (64, 64), index=[CAT - 1])
    assert roles.index == CAT - 1 and iou(mask, obj) >= 0.9
    single, refined, _ = instant().instant_mask(maps, [[CAT]], (64, 64))
    assert iou(single, obj) >= 0.8  # one word: no refinement, the blur and low phi widen it
    none, _, roles = instant().instant_mask(maps, [], (64, 64))  # no word: the inverted start map
    assert roles.index == -1 and float((none * obj).sum() / obj.sum()) >= 0.9
    assert iou(none, obj) < iou(mask, obj), "the paper's point: the start token alone is noisier than the refinement"


def test_local_blend_recovers_the_planted_object():
    lb = pkg("masks.local_blend")
    for seed in range(3):
        maps, obj = planted(seed)
        mask, heat = lb.local_blend(maps, [CAT], (64, 64), threshold=0.3, dilation=0)
        assert iou(mask, obj) >= 0.9
        grown, _ = lb.local_blend(maps, [CAT], (64, 64))  # the paper's 3x3 dilation: a superset grown by one cell
        assert torch.equal(grown * obj, obj) and grown.sum() > mask.sum()
        assert torch.equal(grown, ops().grid_to_image(ops().dilate(ops().mask_to_grid(mask[None], (16, 16)), 1),
                                                      (64, 64))[0])


def test_local_blend_matches_the_edit_samplers_mask():
    maps, _ = planted(0, grid=8)
    mask, _ = pkg("masks.local_blend").local_blend(maps, [CAT, GRASS], (32, 32), 0.4, 1)
    ref = pkg("attention.p2p").local_blend_mask(maps.reshape(1, 64, 77), [[CAT, GRASS]], (32, 32), (8, 8), 0.4, 1)
    assert torch.equal(mask, ref[0, 0])


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_degenerate_maps_are_documented_and_never_nan(value):
    maps = torch.full((16, 16, 77), value)
    mask, refined, roles = instant().instant_mask(maps, groups(), (64, 64))
    assert not torch.isnan(refined).any() and not torch.isnan(roles.similarities).any()
    assert mask.sum() == 0, "flat maps carry no location: the instant mask is empty"
    lb, heat = pkg("masks.local_blend").local_blend(maps, [CAT], (64, 64))
    assert not torch.isnan(heat).any()
    assert float(lb.mean()) == value, "local blend: all-zero -> empty, all-one -> full"


# ------------------------------------------------------------------------------------------------ the node
def make_store(tiny, maps, latent_hw, roles=("source",), text="a photo of a cat on grass"):
    tokens = pkg("attention.tokens").tokenize_prompt(tiny.clip, text)
    return pkg("attention.store").AttentionStore({4: maps}, roles, (tokens,) * len(roles), latent_hw, 1)


def test_node_outputs_masks_at_image_and_latent_size(tiny):
    a, obj_a = planted(0, grid=8, latent=32)
    b, obj_b = planted(1, grid=8, latent=32, radius=0.2)
    store = make_store(tiny, torch.stack([a, b]), (32, 32), roles=("source", "source"))
    mask, latent_mask, preview = call_node("AttnEditMaskFromAttention", attention=store, mode="instant")
    assert mask.shape == (2, 256, 256) and latent_mask.shape == (2, 32, 32) and preview.shape == (4, 256, 256, 3)
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask, ops().grid_to_image(latent_mask[:, None], (256, 256)))
    assert iou(latent_mask[0], obj_a) >= 0.85 and iou(latent_mask[1], obj_b) >= 0.8
    image = make_image(size=200)
    sized, _, pic = call_node("AttnEditMaskFromAttention", attention=store, mode="local blend", words="cat",
                              image_index=1, image=image)
    assert sized.shape == (1, 200, 200) and pic.shape == (2, 200, 200, 3)
    from_latent, _, _ = call_node("AttnEditMaskFromAttention", attention=store, mode="instant",
                                  latent=make_latent(size=16))
    assert from_latent.shape == (2, 128, 128)


@pytest.mark.parametrize("inputs, message", [
    ({"mode": "local blend"}, "mode 'local blend' needs `words` of the prompt"),
    ({"mode": "local blend", "words": "dog"}, "the word 'dog' is not in the source prompt"),
    ({"mode": "instant", "image_index": 3}, "`image_index` 3 is out of range"),
    ({"mode": "instant", "image": make_image(size=64, batch=3)}, "`image` has 3 pictures for 1 mask"),
])
def test_node_errors_are_actionable(tiny, inputs, message):
    maps, _ = planted(0, grid=8, latent=32)
    store = make_store(tiny, maps[None], (32, 32))
    with pytest.raises(ValueError, match=r"\[Attention Edit\] Mask from Attention: .*" + message.replace("(", r"\(")):
        call_node("AttnEditMaskFromAttention", attention=store, **inputs)


def test_node_on_a_real_inversion_store(tiny):
    out = call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt="a photo of a cat",
                    method="ddim", steps=2, cfg=1.0, latent=make_latent(size=16, batch=2, seed=3))
    store = out[-1]
    mask, latent_mask, preview = call_node("AttnEditMaskFromAttention", attention=store, mode="instant")
    assert mask.shape == (2, 128, 128) and latent_mask.shape == (2, 16, 16) and preview.shape == (4, 128, 128, 3)
    assert not torch.isnan(preview).any()
    blend, _, _ = call_node("AttnEditMaskFromAttention", attention=store, mode="local blend", words="cat",
                            threshold=0.0)
    assert blend.min() == 1, "threshold 0 keeps every cell with attention"


def test_background_mode_recovers_a_planted_background(tiny):
    """Mode "background" (DPL Sec. 3.3) through the node: a store whose 32x32-level self-attention has two planted
    segments and whose noun map covers one of them gives exactly the other segment as background."""
    from conftest import call_node

    store_mod, tokens = pkg("attention.store"), pkg("attention.tokens")
    prompt = tokens.tokenize_prompt(tiny.clip, "a photo of a cat")
    obj = torch.zeros(8, 8)
    obj[:4, :4] = 1  # object segment on the 8x8 self-attention grid of a 16x16 latent
    flat = obj.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    self_attention = same / same.sum(-1, keepdim=True)
    cross = torch.full((1, 4, 4, 77), 0.01)
    cross[0, :2, :2, 5] = 1.0  # "cat" attends to the object's 2x2 cells of the 4x4 map
    store = store_mod.AttentionStore({4: cross}, ("source",), (prompt,), (16, 16), 4, {2: self_attention[None]})
    mask, latent_mask, _ = call_node("AttnEditMaskFromAttention", attention=store, mode="background", words="cat")
    expected = torch.ones(16, 16)
    expected[:8, :8] = 0
    assert torch.equal(latent_mask[0], expected) and mask.shape == (1, 128, 128)
    with pytest.raises(ValueError, match="needs `words`: the nouns"):
        call_node("AttnEditMaskFromAttention", attention=store, mode="background")
    no_self = store_mod.AttentionStore({4: cross}, ("source",), (prompt,), (16, 16), 4)
    with pytest.raises(ValueError, match="turn on `capture_self_attention` in Invert Image"):
        call_node("AttnEditMaskFromAttention", attention=no_self, mode="background", words="cat")


def test_background_mode_scores_every_content_word_of_the_prompt(tiny):
    """DPL Sec. 3.3 scores the segments against all nouns: a sofa the user did not list is not background."""
    from conftest import call_node

    store_mod, tokens = pkg("attention.store"), pkg("attention.tokens")
    prompt = tokens.tokenize_prompt(tiny.clip, "a cat on a sofa")  # BOS a cat on a sofa: cat 2, sofa 5
    segments = torch.zeros(8, 8)
    segments[:4, :4] = 1  # the cat
    segments[4:, :] = 2  # the sofa; the rest (top right) is the background
    flat = segments.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    self_attention = same / same.sum(-1, keepdim=True)
    cross = torch.zeros(1, 4, 4, 77)
    cross[0, :2, :2, 2] = 1.0  # "cat" on the cat's cells of the 4x4 map
    cross[0, 2:, :, 5] = 1.0  # "sofa" on the sofa's cells
    store = store_mod.AttentionStore({4: cross}, ("source",), (prompt,), (16, 16), 4, {2: self_attention[None]})
    _, latent_mask, _ = call_node("AttnEditMaskFromAttention", attention=store, mode="background", words="cat")
    expected = torch.zeros(16, 16)
    expected[:8, 8:] = 1
    assert torch.equal(latent_mask[0], expected)
