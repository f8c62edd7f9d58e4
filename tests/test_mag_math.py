"""MAG-Edit maths on planted maps (Mao et al. 2024, Eq. 1-5): hand-computed constraints, weights, the latent update."""

import dataclasses
import math

import pytest
import torch
from conftest import pkg


@pytest.fixture(scope="module")
def mag():
    return pkg("attention.mag")


def planted():
    """maps [H=2, N=4, T=4], word = token 2, mask = the first two queries.

    Head 0: rows sum to 1, word column (0.5, 0.2, 0.1, 0.0). Head 1: rows sum to 2 (an injected map whose aligned
    columns come from the source need not sum to 1), word column (0.4, 0.4, 0.9, 0.9).
    """
    word = torch.tensor([[0.5, 0.2, 0.1, 0.0], [0.4, 0.4, 0.9, 0.9]])
    total = torch.tensor([[1.0], [2.0]])
    rest = (total - word) / 3  # the other three tokens share the rest of each row
    maps = rest[..., None].expand(2, 4, 4).clone()
    maps[..., 2] = word
    return maps, torch.tensor([1.0, 1.0, 0.0, 0.0])


def test_token_ratio_loss_by_hand(mag):
    maps, mask = planted()
    # head 0: ratios (0.5, 0.2) in the mask -> 0.35; head 1: (0.4 / 2, 0.4 / 2) -> 0.2; mean_h (1 - r_h)^2
    expected = ((1 - 0.35) ** 2 + (1 - 0.2) ** 2) / 2
    assert mag.token_ratio_loss(maps, mask, [2]).item() == pytest.approx(expected, abs=1e-6)
    torch.testing.assert_close(mag.in_mask_token_ratio(maps, mask, [2]), torch.tensor([0.35, 0.2]))


def test_token_ratio_is_per_head_then_averaged(mag):
    """The square is per head (reference): not the square of the head-averaged ratio."""
    maps, mask = planted()
    pooled = (1 - (0.35 + 0.2) / 2) ** 2
    assert abs(mag.token_ratio_loss(maps, mask, [2]).item() - pooled) > 1e-3


def test_spatial_ratio_loss_by_hand(mag):
    maps, mask = planted()
    s0, s1 = 0.7 / 0.8, 0.8 / 2.6  # in-mask share of the word's attention mass per head
    expected = (3 * ((1 - s0) - s0) + 3 * ((1 - s1) - s1)) / 2
    assert mag.spatial_ratio_loss(maps, mask, [2]).item() == pytest.approx(expected, abs=1e-6)
    assert mag.spatial_ratio_loss(maps, mask, [2], lam=1.0).item() == pytest.approx(expected / 3, abs=1e-6)


def test_multi_token_word(mag):
    """A word of several tokens: its columns are averaged for the token ratio, summed for the spatial ratio."""
    maps = torch.full((1, 2, 4), 0.25)
    maps[0, 0] = torch.tensor([0.1, 0.3, 0.5, 0.1])
    mask = torch.tensor([1.0, 0.0])
    assert mag.token_ratio(maps, [1, 2])[0, 0].item() == pytest.approx(0.4)
    assert mag.spatial_ratio(maps, mask, [1, 2]).item() == pytest.approx(0.8 / (0.8 + 0.5))


def test_weighted_and_negative_total(mag):
    """Eq. 3 + Eq. 5: lambda_p (0.6 L_a + 0.4 L_b) - lambda_ng L_ng, each word loss averaged over layers."""
    maps, mask = planted()
    other = maps.flip(1)  # a second layer
    layers = [maps, other]

    def word(tokens):
        return sum(mag.token_ratio_loss(m, mask, tokens).item() for m in layers) / 2

    got = mag.total_loss(layers, mask, [([2], 0.6), ([0], 0.4)], [[1]], "token_ratio", lambda_p=2.0, lambda_ng=0.5)
    expected = 2.0 * (0.6 * word([2]) + 0.4 * word([0])) - 0.5 * word([1])
    assert got.item() == pytest.approx(expected, abs=1e-6)
    sr = mag.total_loss(layers, mask, [([2], 1.0)], (), "spatial_ratio", lam=3.0)
    expected_sr = sum(mag.spatial_ratio_loss(m, mask, [2]).item() for m in layers) / 2
    assert sr.item() == pytest.approx(expected_sr, abs=1e-6)


def test_constraints_move_the_ratios_the_right_way(mag):
    """Gradient descent on the logits raises the target's in-mask ratios and lowers the negative word's."""
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 6, requires_grad=True)
    mask = torch.zeros(16)
    mask[:6] = 1
    for constraint in mag.CONSTRAINTS:
        def ratios(lg):
            maps = lg.softmax(-1)
            return (mag.in_mask_token_ratio(maps, mask, [3]).mean(), mag.spatial_ratio(maps, mask, [3]).mean(),
                    mag.in_mask_token_ratio(maps, mask, [4]).mean())

        loss = mag.total_loss([logits.softmax(-1)], mask, [([3], 1.0)], [[4]], constraint)
        (grad,) = torch.autograd.grad(loss, logits)
        before, after = ratios(logits), ratios(logits - 0.5 * grad)
        assert after[0] > before[0] and after[1] > before[1] and after[2] < before[2], constraint


def test_weights_parse_and_validate(mag):
    parse, resolve = mag.parse_weighted_words, mag.resolve_weights
    assert resolve(parse("yellow, striped")) == [("yellow", 0.5), ("striped", 0.5)]
    assert resolve(parse("yellow=0.6, (striped)=0.4")) == [("yellow", 0.6), ("striped", 0.4)]
    for spec, message in (("yellow=0.6, striped=0.6", "sum to 1.2"), ("yellow=0.6, striped", "some words only"),
                          ("", "is empty"), ("yellow=abc", "not a word or word=weight"),
                          ("yellow=1.5, striped=-0.5", "must be >= 0")):
        with pytest.raises(ValueError, match=message):
            resolve(parse(spec))


def test_step_size_matches_the_reference_schedule(mag):
    """delta = scale * sqrt((1 - abar) / abar) with abar = 1 / (1 + sigma^2); reference: ~32.6 at sigma 13.04."""
    for sigma in (13.04, 4.67, 0.3):
        abar = 1 / (1 + sigma**2)
        assert mag.step_size(sigma, 2.5) == pytest.approx(2.5 * math.sqrt((1 - abar) / abar))
    assert mag.step_size(13.04) == pytest.approx(32.6)


def test_update_in_our_latent_equals_the_reference_update(mag):
    """Eq. 4 on z = x / sqrt(1 + sigma^2) (what the UNet sees) equals guided_latent on x; outside M x is untouched."""
    torch.manual_seed(1)
    sigma, weights = 7.0, torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 3:7] = 1
    x = torch.randn(1, 4, 8, 8) * sigma

    def loss_of_z(z):
        return (weights * z.tanh()).sum()

    root = math.sqrt(1 + sigma**2)
    z = (x / root).requires_grad_(True)
    (grad_z,) = torch.autograd.grad(loss_of_z(z), z)
    reference = z.detach() - mask * mag.step_size(sigma) * grad_z
    xl = x.clone().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(loss_of_z(xl / root), xl)
    ours = mag.guided_latent(x, grad_x, mask, sigma)
    torch.testing.assert_close(ours / root, reference, rtol=1e-5, atol=1e-5)
    outside = (mask == 0).expand_as(x)
    assert torch.equal(ours[outside], x[outside]) and not torch.equal(ours, x)
    nan_grad = torch.full_like(x, float("nan"))
    assert torch.equal(mag.guided_latent(x, nan_grad, mask, sigma)[outside], x[outside])


def test_fold_repeats_and_blend(mag):
    maps = torch.rand(2, 3, 77).softmax(-1)
    doubled = torch.cat([maps, maps], -1) / 2  # a 77-token prompt repeated to a 154-token batch
    torch.testing.assert_close(mag.fold_repeats(doubled, 77), maps)
    assert mag.fold_repeats(maps, 77) is maps
    with pytest.raises(ValueError, match="whole copies"):
        mag.fold_repeats(torch.rand(1, 2, 100), 77)
    with pytest.raises(ValueError, match="does not hold whole copies of a 0-token prompt"):
        mag.fold_repeats(torch.rand(1, 2, 3), 0)
    # any leading dimensions; a one-token prompt sums the whole row
    flat = torch.arange(6.0).view(1, 6)
    assert mag.fold_repeats(flat, 3).tolist() == [[3.0, 5.0, 7.0]]
    assert mag.fold_repeats(flat.view(1, 1, 1, 6), 2).tolist() == [[[[6.0, 9.0]]]]
    assert mag.fold_repeats(flat, 1).tolist() == [[15.0]]
    target, source = torch.zeros(1, 4, 4, 4), torch.ones(1, 4, 4, 4)
    mask = torch.zeros(1, 4, 4)
    mask[:, 1] = 1
    out = mag.blend_outside(target, source, mask)
    assert out[:, :, 1].eq(0).all() and out[:, :, 0].eq(1).all() and out[:, :, 2:].eq(1).all()


def test_word_loss_checks_its_inputs(mag):
    maps, mask = planted()
    with pytest.raises(ValueError, match="unknown"):
        mag.word_loss([maps], mask, [2], "area")
    with pytest.raises(ValueError, match="no semantic-level"):
        mag.word_loss([], mask, [2], "token_ratio")


# ------------------------------------------------------------------------------------------------ Eq. 1 denominator
def denominator_case():
    """One head, two queries, five tokens: SOT, a common word, the target word, another NEW word, padding."""
    maps = torch.tensor([[[0.50, 0.10, 0.20, 0.15, 0.05],
                          [0.30, 0.20, 0.05, 0.40, 0.05]]])
    common = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    return maps, common


def test_token_ratio_denominator_is_the_word_plus_common_tokens(mag):
    """Eq. 1: (A*)_i / ((A*)_i + sum_{j in S} (A_t)_j): the other new word (token 3) is not in the denominator; the
    reference code's full row is kept as `others=None`."""
    maps, common = denominator_case()
    others = mag.denominator_columns(common, [2])
    assert others.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    paper = mag.token_ratio(maps, [2], others)
    torch.testing.assert_close(paper, torch.tensor([[0.20 / 0.85, 0.05 / 0.60]]))
    torch.testing.assert_close(mag.token_ratio(maps, [2]), torch.tensor([[0.20, 0.05]]))
    mask = torch.tensor([1.0, 0.0])
    assert mag.token_ratio_loss(maps, mask, [2], others).item() == pytest.approx((1 - 0.20 / 0.85) ** 2)
    assert mag.token_ratio_loss(maps, mask, [2]).item() == pytest.approx((1 - 0.20) ** 2)


def test_denominator_of_a_common_word_counts_it_once(mag):
    """A negative word that is also common (token 1): its own column is not added twice."""
    maps, common = denominator_case()
    others = mag.denominator_columns(common, [1])
    assert others.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    torch.testing.assert_close(mag.token_ratio(maps, [1], others), torch.tensor([[0.10 / 0.65, 0.20 / 0.55]]))


def test_common_columns_from_refine_alphas_or_the_target_words(mag):
    alphas = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0])
    assert mag.common_columns(10, alphas).tolist() == [1, 1, 0, 0, 1] * 2  # repeated over the prompt's chunks
    assert mag.common_columns(5, None, [2, 3]).tolist() == [1, 1, 0, 0, 1]
    assert mag.common_columns(5, None, [1, 5, 9]).tolist() == [1, 0, 1, 1, 1]  # positions past the prompt: none
    with pytest.raises(ValueError, match="whole number"):
        mag.common_columns(7, alphas)


# ------------------------------------------------------------------------------------------------ per-word masks
def test_per_word_masks_each_word_reads_its_own_mask(mag):
    """Eq. 5 with one mask per word (Fig. 9b, reference word[0][i]): sum_i lambda_i L^i(M_i); the negative words are
    measured in the union of the masks."""
    maps, _ = planted()
    layers = [maps]
    m_a, m_b = torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])
    got = mag.total_loss(layers, torch.stack([m_a, m_b]), [([2], 0.6), ([0], 0.4)], [[1]], "token_ratio")
    union = torch.tensor([1.0, 1.0, 1.0, 0.0])
    expected = (0.6 * mag.word_loss(layers, m_a, [2], "token_ratio") + 0.4 * mag.word_loss(layers, m_b, [0],
                "token_ratio") - mag.word_loss(layers, union, [1], "token_ratio"))
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)
    shared = mag.total_loss(layers, m_a, [([2], 0.6), ([0], 0.4)], [[1]], "token_ratio")
    assert abs(shared.item() - got.item()) > 1e-3, "one shared mask must differ from the per-word masks here"
    with pytest.raises(ValueError, match="one per word"):
        mag.total_loss(layers, torch.stack([m_a, m_b, m_b]), [([2], 1.0)], (), "token_ratio")


def test_negative_maps_are_read_from_their_own_prompt(mag):
    """Eq. 3 with a separate negative-words prompt: L_ng reads `negative_maps`, the targets read `maps`."""
    maps, mask = planted()
    other = torch.rand(2, 4, 6).softmax(-1)
    got = mag.total_loss([maps], mask, [([2], 1.0)], [[5]], "token_ratio", negative_maps=[other])
    expected = mag.word_loss([maps], mask, [2], "token_ratio") - mag.word_loss([other], mask, [5], "token_ratio")
    assert got.item() == pytest.approx(expected.item(), abs=1e-6)


def _negative_prompt_hook(mag, negative, den):
    """MAG-Edit guiding token 1 and lowering token 2 of its own 6-token negative prompt on a 1x2 semantic grid, and
    step 0's context of the rows (source, target) on `den`."""
    hook = mag.MAGGuidance(targets=(((1,), 1.0),), negatives=((2,),), masks=torch.ones(1, 1, 1, 2),
                           blend_masks=torch.ones(1, 1, 1, 2), semantic_masks=torch.ones(1, 2), semantic_grid=(1, 2),
                           token_width=6, negative_context=negative, negative_width=6)
    ctx = pkg("inversion.edit").StepContext(0, den.run.sigmas, ("source", "target"), torch.zeros(2, 4, 1, 2), den, {},
                                            torch.zeros(3, 4, 1, 2))
    return hook, ctx


def test_guidance_loss_reads_target_words_on_the_target_maps_and_negative_words_on_their_own_prompts_maps(mag):
    """One iteration with a negative-words prompt: Eq. 3's L_TR of the target word on the target prompt's maps minus
    L_ng of the negative word on the negative prompt's maps, (1 - 0.5)^2 - (1 - 0.3)^2, as recorded in the trace."""
    run_pkg = pkg("attention.run")
    negative = torch.randn(1, 6, 4)
    target_row = torch.tensor([0.1, 0.5, 0.1, 0.1, 0.1, 0.1])  # target word (token 1): ratio 0.5
    negative_row = torch.tensor([0.14, 0.14, 0.3, 0.14, 0.14, 0.14])  # negative word (token 2): ratio 0.3

    class Denoiser:
        def __init__(self):
            self.run = run_pkg.RunState(torch.linspace(2.0, 0.0, 3), ("source", "target"))

        def __call__(self, x, sigma, *, context=None, labels=None, fill=None):
            own = context.get(0)
            row = negative_row if own is not None and torch.equal(own, negative) else target_row
            site = pkg("attention.layers").AttnSite("output", 3, 0, 4)
            self.run.live.append(run_pkg.LiveMap(site, "cross", (1, 2), (0,), row.expand(2, 1, 2, 6).clone()))

    den = Denoiser()
    hook, ctx = _negative_prompt_hook(mag, negative, den)
    trace = {"loss": {}, "target_ratio": {}, "negative_ratio": {}}
    hook._iterate(ctx, ctx.x, trace)
    assert trace["loss"][0] == [pytest.approx(0.5**2 - 0.7**2)]
    assert trace["target_ratio"][0] == [pytest.approx([0.5])] and trace["negative_ratio"][0] == [pytest.approx([0.3])]
    # two target words with disjoint masks: the negative word is measured over their union
    two = dataclasses.replace(hook, targets=(((1,), 0.5), ((3,), 0.5)), semantic_masks=torch.tensor([[[1.0, 0.0],
                                                                                                      [0.0, 1.0]]]))
    trace = {"loss": {}, "target_ratio": {}, "negative_ratio": {}}
    two._iterate(ctx, ctx.x, trace)
    assert trace["target_ratio"][0] == [pytest.approx([0.5, 0.1])] and trace["negative_ratio"][0] == \
        [pytest.approx([0.3])]


def test_word_weight_tolerance_boundary(mag):
    """Eq. 5 weights must sum to 1 within WEIGHT_TOLERANCE = 1e-3: 1.0009 passes, 1.0011 is refused."""
    parse, resolve = mag.parse_weighted_words, mag.resolve_weights
    assert mag.WEIGHT_TOLERANCE == 1e-3
    assert resolve(parse("yellow=0.6009, striped=0.4")) == [("yellow", 0.6009), ("striped", 0.4)]
    with pytest.raises(ValueError, match="sum to 1.0011"):
        resolve(parse("yellow=0.6011, striped=0.4"))
    assert resolve(parse("yellow=0, striped=1")) == [("yellow", 0.0), ("striped", 1.0)]  # a zero weight is >= 0


def test_negative_prompt_pass_runs_without_a_target_row_and_restores_the_roles(mag):
    """The negative-words pass: the denoiser sees the negative context for the cond chunk and no row with the target
    role (so Prompt-to-Prompt does not edit it); the roles come back afterwards, also when the pass fails."""
    run_pkg = pkg("attention.run")
    seen = []

    class Denoiser:
        def __init__(self):
            self.run = run_pkg.RunState(torch.linspace(2.0, 0.0, 3), ("source", "target"))
            self.fail = False

        def __call__(self, x, sigma, *, context=None, labels=None, fill=None):
            seen.append((self.run.roles, context[0]))
            if self.fail:
                raise RuntimeError("boom")
            site = pkg("attention.layers").AttnSite("output", 3, 0, 4)
            self.run.live.append(run_pkg.LiveMap(site, "cross", (1, 2), (0,), torch.full((2, 1, 2, 6), 1 / 6)))

    negative = torch.randn(1, 6, 4)
    den = Denoiser()
    hook, ctx = _negative_prompt_hook(mag, negative, den)
    maps = hook._negative_maps(ctx, ctx.x)
    assert seen[0][0] == ("source", mag.NEGATIVE_ROLE) and torch.equal(seen[0][1], negative)
    assert len(maps) == 1 and maps[0][0].shape == (1, 2, 6) and den.run.roles == ("source", "target")
    den.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        hook._negative_maps(ctx, ctx.x)
    assert den.run.roles == ("source", "target")
