"""CPAM maths (Eq. 1-4, masks, the 10% layer rule) against hand-computed cases and invariants; no model."""

import math

import pytest
import torch
from conftest import pkg

cpam = pkg("attention.cpam")
core = pkg("attention.core")
run_mod = pkg("attention.run")
layers_mod = pkg("attention.layers")
cmasks = pkg("masks.cpam")


def b(*values):
    return torch.tensor(values, dtype=torch.bool)


def test_masked_self_attention_hand_computed():
    # one head, D = 1: logits are q * k. Source keys 0, ln 2, ln 3, 0 with values 10, 20, 30, 40.
    q = torch.ones(1, 4, 1)
    k_src = torch.tensor([0.0, math.log(2), math.log(3), 0.0]).view(1, 4, 1)
    v_src = torch.tensor([10.0, 20.0, 30.0, 40.0]).view(1, 4, 1)
    k, v = torch.zeros(1, 4, 1), torch.full((1, 4, 1), -1.0)  # own keys/values: plain attention gives -1
    normal = core.masked_attention(q, k, v, 1)
    m_s = b(False, False, True, True)  # the object is at keys 2, 3
    m_t = b(False, False, False, True)  # the target object at query/key 3
    groups = cpam.adaptation_groups(m_t, m_s, m_t, object_from_source=True, background_from_source=True)
    out = cpam.adapt_self_attention(q, k, v, k_src, v_src, 1, normal, groups)
    # background queries (0, 1, 2): Eq. 1 over keys 0, 1 only -> (1 * 10 + 2 * 20) / 3; object query 3: Eq. 2 over
    # key 3 only -> 40
    expected = torch.tensor([50 / 3, 50 / 3, 50 / 3, 40.0]).view(1, 4, 1)
    assert torch.allclose(out, expected, atol=1e-5)
    # object not retained (Eq. 2 "otherwise"): query 3 keeps the normal self-attention output
    groups = cpam.adaptation_groups(m_t, m_s, m_t, object_from_source=False, background_from_source=True)
    out = cpam.adapt_self_attention(q, k, v, k_src, v_src, 1, normal, groups)
    assert torch.allclose(out[0, :, 0], torch.tensor([50 / 3, 50 / 3, 50 / 3, -1.0]), atol=1e-5)
    # the same with explicit probabilities: rows sum to one and follow the hand-computed weights
    probs, dense = cpam.dense_self_attention(q, k, v, k_src, v_src, 1, groups)
    assert torch.allclose(dense, out, atol=1e-5)
    assert torch.allclose(probs[0, 0, 0], torch.tensor([0, 0, 0, 0, 1 / 3, 2 / 3, 0, 0]), atol=1e-6)
    assert torch.allclose(probs[0, 0, 3], torch.tensor([0.25] * 4 + [0] * 4), atol=1e-6)


def random_qkv(rows=2, n=16, heads=2, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, n, heads * dim, generator=g) for _ in range(5)]


@pytest.mark.parametrize("free", [False, True])
def test_removal_gives_no_weight_to_masked_keys(free):
    q, k, v, k_src, v_src = random_qkv()
    m_s = torch.zeros(16, dtype=torch.bool)
    m_s[5:11] = True
    m_t = torch.zeros(16, dtype=torch.bool)  # removal: M_t = 0
    groups = cpam.adaptation_groups(m_t, m_s, m_t, object_from_source=False, background_from_source=True,
                                    free=free, background_only=True)
    probs, dense = cpam.dense_self_attention(q, k, v, k_src, v_src, 2, groups)
    masked = torch.cat([m_s, m_s])  # the object's keys in the own and in the source half
    assert float(probs[..., masked].abs().max()) == 0.0
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)  # every query still attends something
    normal = core.masked_attention(q, k, v, 2)
    fast = cpam.adapt_self_attention(q, k, v, k_src, v_src, 2, normal, groups)
    assert torch.allclose(fast, dense, atol=1e-5)
    # changing the object's keys and values anywhere changes nothing
    k2, v2, ks2, vs2 = (t.clone() for t in (k, v, k_src, v_src))
    for t in (k2, v2, ks2, vs2):
        t[:, m_s] = 1e3 * torch.randn_like(t[:, m_s])
    assert torch.equal(cpam.adapt_self_attention(q, k2, v2, ks2, vs2, 2, normal, groups), fast)


def test_free_layer_and_empty_key_fallbacks_are_normal_attention():
    m = torch.zeros(16, dtype=torch.bool)
    groups = cpam.adaptation_groups(m, m, m, object_from_source=True, background_from_source=True, free=True)
    assert len(groups) == 1 and groups[0].normal
    everything = torch.ones(16, dtype=torch.bool)  # M_s covers all keys: Eq. 1 has no key -> normal attention
    groups = cpam.adaptation_groups(m, everything, m, object_from_source=True, background_from_source=True)
    assert all(g.normal for g in groups)
    q, k, v, k_src, v_src = random_qkv()
    normal = core.masked_attention(q, k, v, 2)
    assert torch.equal(cpam.adapt_self_attention(q, k, v, k_src, v_src, 2, normal, groups), normal)


def test_localized_extraction_outside_equals_null_prompt_exactly():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 16, 8, generator=g)
    k_t, v_t, k_n, v_n = (torch.randn(1, 77, 8, generator=g) for _ in range(4))
    inside = torch.zeros(16, dtype=torch.bool)
    inside[[3, 4, 9]] = True
    prompt_out = core.masked_attention(q, k_t, v_t, 2)
    out = cpam.localized_extraction(prompt_out, q, k_n, v_n, 2, inside)
    null_out = core.masked_attention(q, k_n, v_n, 2)
    assert torch.equal(out[:, ~inside], null_out[:, ~inside])
    assert torch.equal(out[:, inside], prompt_out[:, inside])
    # against an explicit float64 softmax
    qh = core.split_heads(q, 2).double()
    ref = ((qh @ core.split_heads(k_n, 2).double().transpose(-1, -2)) * 4 ** -0.5).softmax(-1)
    ref = core.merge_heads(ref @ core.split_heads(v_n, 2).double())
    assert torch.allclose(out[:, ~inside].double(), ref[:, ~inside], atol=1e-5)


def test_free_layer_table_is_seeded_and_ten_percent():
    a = cpam.free_layer_table(7, 50, 16)
    assert a.shape == (50, 16) and a.dtype == torch.bool
    assert bool((a.sum(1) == 2).all())  # round(0.1 * 16) = 2 layers per step
    assert torch.equal(a, cpam.free_layer_table(7, 50, 16))
    assert not torch.equal(a, cpam.free_layer_table(8, 50, 16))
    assert a.any(0).sum() > 2  # a fresh draw per step
    assert not cpam.free_layer_table(7, 5, 16, ratio=0.0).any()
    assert cpam.free_layer_count(11) == 1 and cpam.free_layer_count(16, 1.0) == 16


def test_layer_numbering_matches_the_papers_sd15_order(tiny):
    hooks = pkg("attention.hooks")
    sites = hooks.unet_sites(tiny.model)
    layers = cpam.layer_numbering([(s.block, s.index) for s in sites])
    assert list(layers) == [("input", 1), ("input", 2), ("input", 4), ("input", 5), ("input", 7), ("input", 8),
                            ("middle", 0)] + [("output", i) for i in range(3, 12)]
    assert list(layers.values()) == list(range(16))
    assert [key for key, n in layers.items() if n >= cpam.START_LAYER] == [("output", i) for i in range(4, 12)]
    assert cpam.layer_numbering([("input", 4), ("input", 4), ("input", 5)]) == {("input", 4): 0, ("input", 5): 1}


def test_expand_mask_hand_computed():
    m = torch.zeros(1, 1, 16, 16)
    m[0, 0, 6:10, 6:10] = 1  # area 16 -> sqrt 4
    grown = cmasks.expand_mask(m, 0.1)  # side floor(0.4) = 0, but a non-empty mask grows by at least one cell
    assert grown.sum() == 36 and bool(grown[0, 0, 5:11, 5:11].eq(1).all())
    wide = cmasks.expand_mask(m, 1.0)  # side 4 -> rounded up to the odd 5: two cells on every side
    assert wide.sum() == 64 and bool(wide[0, 0, 4:12, 4:12].eq(1).all())
    assert torch.equal(cmasks.expand_mask(m, 0.0), m)  # scale 0: exact clone
    soft = m * 0.4  # coverage below one half is outside: an empty mask stays empty
    assert cmasks.expand_mask(soft, 1.0).sum() == 0
    assert torch.equal(cmasks.expand_mask(m * 0.5, 0.0), m)  # exactly half covered is inside (>= 0.5)
    # the side: floor(sqrt(area) * scale) rounded up to odd, at least 3 when scale > 0 (boundaries of each rule)
    assert [cmasks.dilation_side(a, 0.1) for a in (1, 399, 400, 899, 900, 1599, 1600, 2500, 3600)] == \
        [3, 3, 3, 3, 3, 3, 5, 5, 7]
    assert cmasks.dilation_side(0, 0.1) == 1 and cmasks.dilation_side(100, 0.0) == 1


def test_expand_mask_grows_the_shipped_workflows_cat_box():
    """The box of tools/workflow_defs/cpam.py on the 512 px picture (21 x 35 latent cells, 18% of the image):
    floor(sqrt(735) * 0.1) = 2, so the old odd-rounded-down kernel (side 1) did not grow it at all."""
    from workflow_defs.cpam import CAT_BOX as box  # tools/ is on sys.path (conftest)

    mask = torch.zeros(1, 512, 512)
    mask[:, box["y"]:box["y"] + box["height"], box["x"]:box["x"] + box["width"]] = 1.0
    cells = pkg("masks.ops").mask_to_grid(mask, (64, 64))
    assert cells.sum() == 21 * 35
    grown = cmasks.expand_mask(cells, cmasks.MASK_EXPAND_SCALE)
    assert grown.sum() == 23 * 37  # one cell on every side
    top, left = box["y"] // 8, box["x"] // 8
    assert bool(grown[0, 0, top - 1:top + 36, left - 1:left + 22].eq(1).all())
    assert grown[0, 0, top - 2].sum() == 0 and grown[0, 0, :, left - 2].sum() == 0


def test_mask_from_attention_hand_computed():
    maps = torch.zeros(4, 10)  # 2x2 grid, tokens 3 and 4 are the object
    maps[:, 3] = torch.tensor([0.0, 1.0, 0.2, 0.3])
    maps[:, 4] = torch.tensor([0.0, 1.0, 0.4, 0.1])
    mask = cmasks.mask_from_attention(maps, [3, 4], (2, 2), (4, 4), threshold=0.25)
    # token mean 0, 1, 0.3, 0.2 -> min-max the same -> >= 0.25: cells (0, 1) and (1, 0)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.float32)
    assert torch.equal(mask[0, 0], expected)
    assert cmasks.mask_from_attention(torch.ones(4, 10), [3], (2, 2), (4, 4)).sum() == 0  # flat map: empty
    # the threshold itself is inside (>=): normalised 0.25 exactly, just below it outside
    maps = torch.zeros(4, 2)
    maps[:, 1] = torch.tensor([0.0, 4.0, 1.0, 0.96])  # min-max: 0, 1, 0.25, 0.24
    edge = cmasks.mask_from_attention(maps, [1], (2, 2), (2, 2), threshold=0.25)
    assert edge.flatten().tolist() == [0.0, 1.0, 1.0, 0.0]
    # a non-square grid (2 x 3) is read row-major and resized to a non-square latent (4 x 6)
    maps = torch.zeros(6, 1)
    maps[2, 0], maps[3, 0] = 1.0, 0.5  # cells (0, 2) and (1, 0)
    wide = cmasks.mask_from_attention(maps, [0], (2, 3), (4, 6), threshold=0.5)
    expected = torch.zeros(4, 6)
    expected[0:2, 4:6], expected[2:4, 0:2] = 1, 1
    assert torch.equal(wide[0, 0], expected)


# ------------------------------------------------------------------------------------------------ controller
def make_call(kind, q, k, v, step=0, layout=(1, 0), extra=None, site=("output", 4), heads=2, image=0):
    run = run_mod.RunState(torch.linspace(10, 0, 5), ("source", "target"), image=image)
    sigma = float(run.sigmas[step])
    call = run_mod.AttnCall(q, k, v, heads, kind, layers_mod.AttnSite(site[0], site[1], 0, 1), (4, 4),
                            run_mod.BatchLayout(tuple(layout), 2), run, sigma)
    call.extra = extra or {}
    return call


def controller(strategy, source, target=None, steps=4, free=None, **kw):
    layers = {("output", 4): 8, ("input", 1): 0}
    return cpam.CPAMController(
        strategy=cpam.STRATEGIES[strategy], source_masks=source, target_masks=source if target is None else target,
        layers=layers, free_layers=torch.zeros(steps, 16, dtype=torch.bool) if free is None else free,
        null_context=torch.zeros(1, 77, 8), **kw)


def test_controller_pairs_each_chunk_with_its_source_row_and_leaves_sources_alone():
    q, k, v, _, _ = (torch.cat([t, t]) for t in random_qkv())  # rows [u_src, u_tgt, c_src, c_tgt]
    mask = torch.zeros(1, 4, 4)
    mask[0, 1:3, 1:3] = 1
    ctrl = controller("remove object", mask, torch.zeros(1, 4, 4))
    call = make_call("self", q, k, v, step=2)
    assert ctrl.active(call)
    normal = core.masked_attention(q, k, v, 2)
    out = ctrl.edit_output(call, normal)
    assert torch.equal(out[[0, 2]], normal[[0, 2]])
    m_s = mask.flatten().bool()
    for tgt, src in ((1, 0), (3, 2)):
        expected = core.masked_attention(q[tgt:tgt + 1], k[src:src + 1], v[src:src + 1], 2, (~m_s).view(1, 1, 1, -1))
        assert torch.allclose(out[tgt:tgt + 1], expected, atol=1e-6)
    # removal: perturbing the object's keys/values of any row leaves the target rows unchanged
    k2, v2 = k.clone(), v.clone()
    k2[:, m_s], v2[:, m_s] = 50.0, -50.0
    out2 = ctrl.edit_output(make_call("self", q, k2, v2, step=2), core.masked_attention(q, k2, v2, 2))
    assert torch.equal(out2[[1, 3]], out[[1, 3]])


def test_controller_object_gate_by_step_and_layer():
    q, k, v, _, _ = random_qkv()
    mask = torch.zeros(1, 4, 4)
    mask[0, :2] = 1
    ctrl = controller("edit object (keep identity)", mask, start_step=2, start_layer=8)
    fg = mask.flatten().bool()
    normal = core.masked_attention(q, k, v, 2)
    before = ctrl.edit_output(make_call("self", q, k, v, step=1, layout=(0,)), normal)
    after = ctrl.edit_output(make_call("self", q, k, v, step=2, layout=(0,)), normal)
    early_layer = ctrl.edit_output(make_call("self", q, k, v, step=3, layout=(0,), site=("input", 1)), normal)
    assert torch.equal(before[1, fg], normal[1, fg])  # step < S: normal self-attention inside M_t
    assert torch.equal(early_layer[1, fg], normal[1, fg])  # layer < L: normal self-attention inside M_t
    src_fg = core.masked_attention(q[1:2, fg], k[0:1], v[0:1], 2, fg.view(1, 1, 1, -1))
    assert torch.allclose(after[1:2, fg], src_fg, atol=1e-6)
    src_bg = core.masked_attention(q[1:2, ~fg], k[0:1], v[0:1], 2, (~fg).view(1, 1, 1, -1))
    for out in (before, after, early_layer):  # Eq. 1 holds at every step and layer
        assert torch.allclose(out[1:2, ~fg], src_bg, atol=1e-6)
    free = torch.zeros(4, 16, dtype=torch.bool)
    free[2, 8] = True  # this layer is one of the random 10% at step 2: normal self-attention everywhere
    ctrl = controller("edit object (keep identity)", mask, free=free, start_step=2, start_layer=8)
    assert torch.equal(ctrl.edit_output(make_call("self", q, k, v, step=2, layout=(0,)), normal), normal)


def test_controller_cross_attention_localized_extraction_and_regions():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 16, 8, generator=g)
    k, v, kn, vn = (torch.randn(4, 77, 8, generator=g) for _ in range(4))
    mask = torch.zeros(1, 4, 4)
    mask[0, 2:, 2:] = 1
    inside = mask.flatten().bool()
    ctrl = controller("replace object", mask, refine_step=0)
    call = make_call("cross", q, k, v, extra={"null": (kn, vn)})
    assert ctrl.active(call) and not ctrl.active(make_call("cross", q, k, v))
    prompt_out = core.masked_attention(q, k, v, 2)
    out = ctrl.edit_output(call, prompt_out)
    rows = [3]  # layout (uncond, cond): only the conditional target row is edited
    assert torch.equal(out[[0, 1, 2]], prompt_out[[0, 1, 2]])
    null_out = core.masked_attention(q[rows], kn[rows], vn[rows], 2)
    assert torch.equal(out[rows][:, ~inside], null_out[:, ~inside])
    assert torch.equal(out[rows][:, inside], prompt_out[rows][:, inside])
    regional = controller("regional prompts", mask, region_context=torch.zeros(1, 77, 8))
    assert regional.extra_name == "region" and not regional.adapts_self
    assert regional.active(make_call("cross", q, k, v, extra={"region": (kn, vn)}))
    off = controller("replace object", mask, localized=False)
    assert off.extra_name is None and not off.active(call)


def test_controller_reads_its_masks_back_once_per_run_not_per_layer_call():
    """The query groups (emptiness tests, nonzero indices: each a GPU read-back) are built once per run and mask,
    then reused by every later self-attention call; results are identical to a fresh controller's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    reads_ops = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default, aten.nonzero.default}

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.n += func in reads_ops
            return func(*args, **(kwargs or {}))

    q, k, v, _, _ = (torch.cat([t, t]) for t in random_qkv())
    mask = torch.zeros(1, 4, 4)
    mask[0, 1:3, 1:3] = 1
    ctrl = controller("remove object", mask, torch.zeros(1, 4, 4))
    first = make_call("self", q, k, v, step=2)
    normal = core.masked_attention(q, k, v, 2)
    with Reads():
        out = ctrl.edit_output(first, normal)
    once = Reads.n
    later = make_call("self", q, k, v, step=2)
    later.run = first.run  # another layer of the same run and step
    with Reads():
        again = [ctrl.edit_output(later, normal) for _ in range(3)]
    assert once > 0 and Reads.n == once
    fresh = ctrl.edit_output(make_call("self", q, k, v, step=2), normal)
    assert all(torch.equal(a, out) for a in again) and torch.equal(fresh, out)
    first.run.clear()
    assert not first.run._memo


def test_free_layers_count_every_attention_layer_of_a_block():
    """Sec. 3.3's "10% of the layers" counts attention layers: SDXL's 70 (2 or 10 transformer depths per block) give
    7 free layers per step, not 1 of its 11 blocks; each depth looks up its own column of the table."""
    sdxl = ([("input", i, d) for i in (4, 5) for d in range(2)] + [("input", i, d) for i in (7, 8) for d in range(10)]
            + [("middle", 0, d) for d in range(10)] + [("output", i, d) for i in (0, 1, 2) for d in range(10)]
            + [("output", i, d) for i in (3, 4, 5) for d in range(2)])
    columns = cpam.attention_layers(sdxl)
    assert len(columns) == 70 and list(columns.values()) == list(range(70))
    assert cpam.free_layer_count(len(columns)) == 7 and cpam.free_layer_count(16) == 2  # nearest to 7.0 and 1.6
    assert cpam.free_layer_count(15) == 2 and cpam.free_layer_count(14) == 1  # 1.5 rounds up, 1.4 down
    assert bool((cpam.free_layer_table(3, 4, 70).sum(1) == 7).all())
    q, k, v, _, _ = random_qkv()
    mask = torch.zeros(1, 4, 4)
    mask[0, :2] = 1
    free = torch.zeros(4, 2, dtype=torch.bool)
    free[2, 1] = True  # at step 2 the second depth of ("output", 4) is free, the first is not
    ctrl = controller("edit object (keep identity)", mask, free=free, start_step=2, start_layer=8,
                      attention_layers={("output", 4, 0): 0, ("output", 4, 1): 1, ("input", 1, 0): 0})
    normal = core.masked_attention(q, k, v, 2)
    depth0, depth1 = make_call("self", q, k, v, step=2, layout=(0,)), make_call("self", q, k, v, step=2, layout=(0,))
    depth1.site = layers_mod.AttnSite("output", 4, 1, 1)
    assert torch.equal(ctrl.edit_output(depth1, normal), normal)  # free: normal self-attention everywhere
    assert not torch.allclose(ctrl.edit_output(depth0, normal)[1], normal[1])  # same block, not free: adapted


def test_mask_defaults_are_the_papers_and_the_authors_code():
    """The CPAM node's mask defaults: M_t refined at >= 0.25 of the min-max normalised object attention from step
    T_m = 5 (the author's STEP_CHANGE_MASK), and the cloned mask grown by 10% of sqrt(area) (Sec. 3.4)."""
    assert (cmasks.REFINE_THRESHOLD, cmasks.REFINE_START_STEP, cmasks.MASK_EXPAND_SCALE) == (0.25, 5, 0.1)
    import nodes

    optional = nodes.NODE_CLASS_MAPPINGS["AttnEditCPAMSelfAttn"].INPUT_TYPES()["optional"]
    assert optional["refine_threshold"][1]["default"] == 0.25 and optional["refine_step"][1]["default"] == 5
    assert optional["mask_expand"][1]["default"] == 0.1
