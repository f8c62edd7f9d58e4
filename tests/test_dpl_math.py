"""Dynamic Prompt Learning maths: hand-computed losses (Eq. 6-9), thresholds (Eq. 10), smoothing, background
estimation (Sec. 3.3) and k-means. Pure torch, no model."""

import math

import pytest
import torch
from conftest import pkg

L = pkg("attention.dpl")
BG = pkg("masks.background")

E1 = math.exp(-1.0)
NORM = (1 + 2 * E1) ** 2  # sum of the A&E 3x3 kernel before normalisation (1D weights e^-1, 1, e^-1)


def test_ae_kernel_reproduces_the_sigma_sqrt2_quirk():
    k = L.ae_gaussian_kernel()
    assert k.shape == (3, 3) and float(k.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(k[1, 1]) == pytest.approx(1 / NORM, abs=1e-6)  # 0.3319
    assert float(k[0, 1]) == pytest.approx(E1 / NORM, abs=1e-6)  # 0.1221
    assert float(k[0, 0]) == pytest.approx(E1 * E1 / NORM, abs=1e-6)  # 0.0449
    assert float(k[1, 1]) == pytest.approx(0.332, abs=1e-3) and float(k[0, 0]) == pytest.approx(0.045, abs=1e-3)


def test_smoothing_of_a_delta_and_reflect_padding():
    m = torch.zeros(5, 5)
    m[2, 2] = 1.0
    s = L.smooth(m)
    assert float(s[2, 2]) == pytest.approx(1 / NORM, abs=1e-6)
    assert float(s[1, 2]) == pytest.approx(E1 / NORM, abs=1e-6)
    corner = torch.zeros(5, 5)
    corner[0, 0] = 1.0  # reflect padding mirrors without repeating the edge: the delta is not doubled
    assert float(L.smooth(corner)[0, 0]) == pytest.approx(1 / NORM, abs=1e-6)
    const = torch.full((4, 6), 0.3)
    assert torch.allclose(L.smooth(const), const, atol=1e-6)
    # a batch of one map is padded as the map (the batch is no spatial side); a one-cell-high map replicates its edge
    assert torch.equal(L.smooth(corner[None]), L.smooth(corner)[None])
    row = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    g = L.ae_gaussian_kernel().sum(0)  # a row filtered with replicate padding: the kernel's column sums
    assert torch.allclose(L.smooth(row), torch.tensor([[g[0], g[1], g[2], 0.0]]), atol=1e-6)
    five = L.ae_gaussian_kernel(5)  # any odd kernel keeps the map's size (pad = size // 2)
    assert L.smooth(m, five).shape == (5, 5) and float(L.smooth(m, five)[2, 2]) == pytest.approx(float(five[2, 2]))


def test_noun_maps_average_each_nouns_token_columns_and_no_noun_is_an_empty_stack():
    maps = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    out = L.noun_maps(maps, [[1, 3], [2]])
    assert out.shape == (2, 2, 3)
    assert torch.equal(out[0], (maps[..., 1] + maps[..., 3]) / 2) and torch.equal(out[1], maps[..., 2])
    assert L.noun_maps(maps, []).shape == (0, 2, 3)


def test_overlap_and_leakage_by_hand():
    """Fig. 5's diagnostics: the mean cosine between noun maps (0 below two nouns) and the mean per-noun share of the
    map's mass on the background (0 without nouns)."""
    maps = torch.zeros(2, 2, 3)
    maps[0, 0, 1] = 1.0  # noun 1: one cell, on the background
    maps[..., 2] = 1.0  # noun 2: every cell
    background = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert L.overlap_and_leakage(maps, [[1]], background) == (0.0, 1.0)
    overlap, leak = L.overlap_and_leakage(maps, [[1], [2]], background)
    assert overlap == pytest.approx(0.5) and leak == pytest.approx((1.0 + 0.25) / 2)
    assert L.overlap_and_leakage(maps, [], background) == (0.0, 0.0)


def test_schedule_threshold_of_a_run_without_steps_is_beta():
    """t = step * 50 / max(steps, 1): a 0-step call is evaluated at t = 0, not divided by zero."""
    assert L.schedule_threshold(0.7, 25.0, 0, 0) == 0.7


def make_maps(h=5, w=5, t=6):
    return torch.zeros(h, w, t)


def test_attention_balancing_loss_hand_computed():
    # uniform attention over the 4 inner tokens: softmax gives 1/4 everywhere -> L_at = 1 - 1/4
    maps = torch.full((5, 5, 6), 0.1)
    assert float(L.attention_balancing_loss(maps, [[2]])) == pytest.approx(0.75, abs=1e-6)
    # token 2 dominates one interior pixel: P = 1 there, 1/4 elsewhere; smoothed peak = c + (1 - c) / 4
    maps = make_maps()
    maps[2, 2, 2] = 0.5
    centre = 1 / NORM
    expected = 1 - (centre + (1 - centre) * 0.25)
    assert float(L.attention_balancing_loss(maps, [[2]])) == pytest.approx(expected, abs=1e-5)
    # max over nouns: token 3 is uniform (0.75) and worse than token 2
    assert float(L.attention_balancing_loss(maps, [[2], [3]])) == pytest.approx(0.75, abs=1e-5)
    # SOT (0) and the last slot are excluded from the softmax: a huge value there changes nothing
    maps2 = maps.clone()
    maps2[..., 0] = 5.0
    maps2[..., 5] = 5.0
    assert float(L.attention_balancing_loss(maps2, [[2]])) == pytest.approx(expected, abs=1e-5)


def test_attention_balancing_loss_is_clamped_at_zero_and_multi_token_nouns_average():
    d = L.token_distribution(make_maps())
    assert d.shape == (5, 5, 6) and float(d[..., 0].abs().max()) == 0 and float(d[..., -1].abs().max()) == 0
    cell = torch.tensor([0.0, 0.01, 0.02, 0.0, 0.03, 0.0])  # softmax(100 A) over the inner tokens (A&E's scale)
    inner = torch.exp(100 * cell[1:-1]) / torch.exp(100 * cell[1:-1]).sum()
    assert torch.allclose(L.token_distribution(cell.view(1, 1, 6))[0, 0], torch.cat([torch.zeros(1), inner,
                                                                                       torch.zeros(1)]), atol=1e-6)
    maps = make_maps()
    maps[2, 2, 2] = 0.5
    maps[2, 2, 3] = 0.5  # tokens 2 and 3 share the pixel: each gets 1/2 there
    single = float(L.attention_balancing_loss(maps, [[2]]))
    both = float(L.attention_balancing_loss(maps, [[2, 3]]))
    assert both == pytest.approx(single, abs=1e-6)  # the mean of two identical columns
    assert float(L.attention_balancing_loss(maps, [[2, 4]])) > single  # token 4 is uniform: the mean is lower


def test_disjoint_loss_hand_computed():
    maps = torch.zeros(2, 2, 6)
    maps[0, 0, 1] = 1.0  # noun A: [1, 0, 0, 0]
    maps[0, 0, 2] = 1.0  # noun B: [1, 1, 0, 0]
    maps[0, 1, 2] = 1.0
    maps[1, 1, 3] = 1.0  # noun C: [0, 0, 0, 1]
    assert float(L.disjoint_loss(maps, [[1], [2]])) == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    # three nouns: mean over the 3 unordered pairs (A,B)=1/sqrt2, (A,C)=0, (B,C)=0
    assert float(L.disjoint_loss(maps, [[1], [2], [3]])) == pytest.approx(1 / math.sqrt(2) / 3, abs=1e-6)
    assert float(L.disjoint_loss(maps, [[1]])) == 0.0
    # symmetric in the order of the nouns
    assert float(L.disjoint_loss(maps, [[2], [1]])) == pytest.approx(1 / math.sqrt(2), abs=1e-6)


def test_background_loss_hand_computed_and_empty_background():
    maps = torch.zeros(2, 2, 6)
    maps[0, 0, 1] = maps[0, 1, 1] = 1.0  # noun A on the top row
    maps[1, 1, 2] = 2.0  # noun B on one bottom cell
    bg = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # cos(A, B_bg) = 1 / (sqrt2 * sqrt2) = 0.5 ; cos(B, B_bg) = 0 -> mean 0.25
    assert float(L.background_loss(maps, [[1], [2]], bg)) == pytest.approx(0.25, abs=1e-6)
    assert float(L.background_loss(maps, [[1]], bg)) == pytest.approx(0.5, abs=1e-6)
    empty = L.background_loss(maps, [[1], [2]], torch.zeros(2, 2))
    assert float(empty) == 0.0 and not torch.isnan(empty)


def test_thresholds_of_eq10():
    th0 = L.thresholds(0)
    assert (th0.at, th0.dj, th0.bg) == pytest.approx((0.3, 0.9, 0.7))
    th = L.thresholds(25)
    assert th.at == pytest.approx(0.3 * E1) and th.dj == pytest.approx(0.9 * E1)
    assert th.bg == pytest.approx(0.7 * math.exp(-0.5))
    assert L.thresholds(49).at == pytest.approx(0.3 * math.exp(-49 / 25))
    # other step counts are measured in 50-step units
    assert L.thresholds(10, 20).at == pytest.approx(th.at) and L.thresholds(10, 20).bg == pytest.approx(th.bg)


def test_total_loss_weights_and_the_stop_test():
    maps = torch.rand(4, 4, 8, generator=torch.Generator().manual_seed(0))
    bg = torch.zeros(4, 4)
    bg[:, :2] = 1
    nouns = [[2], [4, 5]]
    losses = L.dpl_losses(maps, nouns, bg)
    at, dj, bg_loss = (float(L.attention_balancing_loss(maps, nouns)), float(L.disjoint_loss(maps, nouns)),
                       float(L.background_loss(maps, nouns, bg)))
    assert losses.values() == pytest.approx((at, dj, bg_loss))
    assert float(losses.total) == pytest.approx(1.0 * at + 0.05 * dj + 0.05 * bg_loss, abs=1e-6)
    assert not L.dpl_losses(maps, nouns, bg).below(L.Thresholds(at, 1, 1))  # strict: equal is not below
    assert L.dpl_losses(maps, nouns, bg).below(L.Thresholds(at + 1e-3, dj + 1e-3, bg_loss + 1e-3))
    only_bg = L.dpl_losses(maps, nouns, bg, L.Weights(0.0, 0.0, 1.0))
    assert float(only_bg.at) == 0 and float(only_bg.dj) == 0 and float(only_bg.total) == pytest.approx(bg_loss)


def test_single_noun_skips_the_disjoint_loss_without_nan():
    maps = torch.rand(4, 4, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    losses = L.dpl_losses(maps, [[3]], torch.ones(4, 4))
    assert float(losses.dj) == 0.0 and torch.isfinite(losses.total)
    losses.total.backward()
    assert torch.isfinite(maps.grad).all() and float(maps.grad.abs().sum()) > 0


def test_gradients_lower_each_loss():
    """One gradient step on the maps lowers each loss: the signs of Eq. 6-8 are right."""
    torch.manual_seed(0)
    base = torch.rand(6, 6, 10) * 0.1
    bg = torch.zeros(6, 6)
    bg[:, :3] = 1
    nouns = [[2], [5]]
    for weights in (L.Weights(1, 0, 0), L.Weights(0, 1, 0), L.Weights(0, 0, 1)):
        maps = base.clone().requires_grad_(True)
        before = L.dpl_losses(maps, nouns, bg, weights).total
        before.backward()
        after = L.dpl_losses(base - 1e-3 * maps.grad / maps.grad.norm(), nouns, bg, weights).total
        assert float(after) < float(before), weights


def test_mean_cross_map_averages_layers_and_heads():
    a = torch.rand(1, 2, 4, 5)
    b = torch.rand(1, 2, 4, 5)
    out = L.mean_cross_map([a, b], (2, 2))
    assert out.shape == (2, 2, 5)
    assert torch.allclose(out.reshape(4, 5), (a[0].mean(0) + b[0].mean(0)) / 2)
    with pytest.raises(ValueError):
        L.mean_cross_map([], (2, 2))


# ------------------------------------------------------------------------------------------ background (Sec. 3.3)
def planted(h=8, w=8, noise=1e-3, seed=0):
    """Self-attention of a grid with three segments (background, object A block, object B block)."""
    seg = torch.zeros(h, w, dtype=torch.long)
    seg[0:4, 0:4] = 1  # aligned with the coarser noun-map grid, so noun maps do not spill onto the background
    seg[4:8, 4:8] = 2
    flat = seg.flatten()
    same = (flat[:, None] == flat[None, :]).float()
    gen = torch.Generator().manual_seed(seed)
    sa = same / same.sum(-1, keepdim=True) + noise * torch.rand(h * w, h * w, generator=gen)
    return sa / sa.sum(-1, keepdim=True), seg


def test_kmeans_recovers_planted_segments_and_is_seeded():
    sa, seg = planted()
    labels = BG.kmeans(sa, 3, seed=1)
    flat = seg.flatten()
    for s in range(3):  # every segment is exactly one cluster
        assert len(set(labels[flat == s].tolist())) == 1
    assert len(set(labels.tolist())) == 3
    assert torch.equal(labels, BG.kmeans(sa, 3, seed=1))


def test_planted_background_is_recovered():
    sa, seg = planted()
    maps = torch.zeros(2, 4, 4)  # noun maps on the coarser (x2) grid, as 16x16 vs 32x32
    maps[0, 0:2, 0:2] = 1.0  # noun A over its block
    maps[1, 2:4, 2:4] = 1.0
    maps = maps * 0.02 + 0.001
    est = BG.estimate_background(sa, maps)
    assert est.shape == (8, 8) and set(est.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(est, (seg == 0).float())
    # one noun only: object B's segment has no noun agreeing with it and becomes background too
    only_a = BG.estimate_background(sa, maps[:1])
    assert torch.equal(only_a, (seg != 1).float())
    # threshold 1: nothing scores above it, everything is background
    assert float(BG.estimate_background(sa, maps, threshold=1.0).min()) == 1.0


def test_background_degenerate_inputs_are_documented_and_never_nan():
    sa, _ = planted()
    none = BG.estimate_background(sa, torch.zeros(0, 4, 4))
    assert torch.equal(none, torch.ones(8, 8))
    equal_rows = torch.full((64, 64), 1 / 64)
    for maps in (torch.zeros(2, 4, 4), torch.full((1, 4, 4), 0.3)):
        est = BG.estimate_background(equal_rows, maps)
        assert torch.equal(est, torch.ones(8, 8))
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 0, 0] = 1.0  # 4 of 64 cells at 1 after upsampling: score 1/16 <= 0.2
    assert torch.equal(BG.estimate_background(equal_rows, one_hot), torch.ones(8, 8))
    spread = torch.ones(1, 4, 4)
    spread[0, 0, 0] = 2.0  # normalised: (m - 1) / 2 -> 0.5 on 4 cells, 0 elsewhere; mean 1/32
    assert torch.equal(BG.estimate_background(equal_rows, spread), torch.ones(8, 8))
    assert not torch.isnan(BG.normalise_noun_maps(torch.zeros(2, 3, 3))).any()


def test_background_input_checks_and_rectangular_grids():
    sa, seg = planted()
    with pytest.raises(ValueError, match="square"):
        BG.estimate_background(torch.rand(6, 6), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="does not match"):
        BG.estimate_background(sa, torch.zeros(1, 4, 4), grid=(4, 8))
    rect = torch.eye(32)  # every cell its own feature: 4x8 grid, 5 clusters
    est = BG.estimate_background(rect, torch.ones(1, 2, 4), grid=(4, 8))
    assert est.shape == (4, 8) and not torch.isnan(est).any()
    batched = BG.estimate_background(sa[None], torch.zeros(0, 4, 4))
    assert batched.shape == (8, 8)


# ------------------------------------------------------------------- boundaries (issue 22): stop test, schedule, grid
D = pkg("inversion.dpl")


def scripted(values):
    """evaluate(params) returning the scripted (at, dj, bg) of each call in turn; total depends on the rows."""
    calls = []

    def evaluate(params):
        at, dj, bg = (torch.tensor(v) for v in values[len(calls)])
        calls.append({k: v.detach().clone() for k, v in params.items()})
        total = at + dj + bg + params["l"].pow(2).sum()
        return L.Losses(at, dj, bg, total), None
    return evaluate, calls


TH = L.Thresholds(0.5, 0.25, 0.125)  # exact in float32, so "equal" is equal
ABOVE, UNDER = (0.9, 0.9, 0.9), (0.1, 0.1, 0.1)


@pytest.mark.parametrize("values, evaluations, updates", [
    ([ABOVE] * 5, 5, 5),  # budget spent: 5 evaluations, each followed by an update
    ([ABOVE, ABOVE, UNDER], 3, 2),  # stops at the first evaluation under every threshold, before updating
    ([UNDER], 1, 0),  # already under at the first evaluation: rows untouched
    ([(0.5, 0.1, 0.1), (0.4999, 0.1, 0.1)], 2, 1),  # L_at equal to TH_at is not under it (Alg. 1: while L >= TH)
    ([(0.1, 0.25, 0.1), (0.1, 0.2499, 0.1)], 2, 1),  # the same for L_dj
    ([(0.1, 0.1, 0.125), (0.1, 0.1, 0.1249)], 2, 1),  # and L_bg
    ([(0.1, 0.1, 0.9), (0.01, 0.01, 0.01)], 2, 1),  # one loss above is enough to go on
])
def test_token_loop_evaluates_tests_then_updates(values, evaluations, updates):
    rows = {"l": torch.ones(2, 3)}
    evaluate, calls = scripted(values)
    ticks = []
    settings = D.DPLSettings(token_iterations=5)
    out, n, first, last, _ = D.token_loop(evaluate, rows, TH, settings, lambda: ticks.append(1))
    assert len(calls) == evaluations and n == updates and len(ticks) == updates
    assert first == pytest.approx(values[0]) and last == pytest.approx(values[evaluations - 1])
    assert torch.equal(calls[0]["l"], rows["l"])  # the first evaluation sees the incoming rows (warm start)
    assert torch.equal(out["l"], rows["l"]) == (updates == 0)
    if evaluations > 1:  # each evaluation after the first sees the rows of the update before it
        assert not torch.equal(calls[1]["l"], calls[0]["l"])
        assert torch.equal(out["l"], calls[-1]["l"]) == (evaluations > updates)


def test_token_loop_budget_of_one_and_zero():
    rows = {"l": torch.ones(2, 3)}
    evaluate, calls = scripted([ABOVE] * 3)
    out, n, *_ = D.token_loop(evaluate, rows, TH, D.DPLSettings(token_iterations=1))
    assert len(calls) == 1 and n == 1 and not torch.equal(out["l"], rows["l"])  # evaluated once, updated once
    evaluate, calls = scripted([ABOVE])
    out, n, first, last, _ = D.token_loop(evaluate, rows, TH, D.DPLSettings(token_iterations=0))
    assert calls == [] and n == 0 and torch.equal(out["l"], rows["l"]) and first == last == (0.0, 0.0, 0.0)


def test_estimate_threshold_is_inclusive_at_the_exact_score():
    equal_rows = torch.full((64, 64), 1 / 64)  # one segment over the 8x8 grid
    one_hot = torch.zeros(1, 4, 4)
    one_hot[0, 0, 0] = 1.0  # 4 of 64 cells at 1 after upsampling: the segment's score is exactly 1/16
    assert torch.equal(BG.estimate_background(equal_rows, one_hot, threshold=0.0625), torch.ones(8, 8))  # "<= TH"
    assert torch.equal(BG.estimate_background(equal_rows, one_hot, threshold=0.0624), torch.zeros(8, 8))


def test_background_on_the_loss_grid_takes_half_covered_cells_and_degenerate_cases():
    mask = torch.zeros(4, 4)
    mask[0, 0:2] = 1.0  # top-left 2x2 cell: exactly half covered -> background
    mask[2, 2] = 1.0  # bottom-right cell: a quarter covered -> not background
    grid = D.background_on_grid(mask, (2, 2))
    assert torch.equal(grid, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert D.degenerate(grid) == ""
    assert D.degenerate(torch.zeros(2, 2)) == "empty" and D.degenerate(torch.ones(2, 2)) == "full"
    one_free = torch.ones(2, 2)
    one_free[1, 1] = 0.0
    assert D.degenerate(one_free) == ""
