"""Boundary pins (issue 22): exact thresholds, the step before / first step / last step of every window, level
filters, non-symmetric inputs and odd latent sides. Each test names the planted bug it kills; no model is run.

The table of what is pinned where is tests/README.md; tools/mutate.py checks that these tests kill planted edits.
"""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import pkg

ddim = pkg("inversion.ddim")
null_text = pkg("inversion.null_text")
schedule = pkg("inversion.schedule")
p2p = pkg("attention.p2p")
layers = pkg("attention.layers")
run_mod = pkg("attention.run")
edit_mod = pkg("inversion.edit")
ops = pkg("masks.ops")
local_blend = pkg("masks.local_blend")

SOURCE, TARGET = run_mod.SOURCE, run_mod.TARGET


# ------------------------------------------------------------------------------------------------ DDIM inversion
def eps_model(z, sigma):
    """An analytic eps_theta(z_t, sigma): depends on its DDPM-space input and on the level, non-linearly."""
    return 0.3 * z + 0.05 * z**2 + 0.1 * sigma


class RecordingDenoiser:
    """Model-space denoiser x0_hat(x, sigma) = x - sigma * eps_theta(x / sqrt(1 + sigma^2), sigma) that records its
    inputs (ComfyUI's eps-prediction convention: the UNet sees the DDPM latent z = x / sqrt(1 + sigma^2))."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma):
        self.calls.append((x.clone(), float(sigma)))
        return x - sigma * eps_model(x / math.sqrt(1 + sigma**2), sigma)


def reference_next_step(z, sigma, sigma_next):
    """The null-text / P2P reference `next_step` in DDPM space: eps = unet(z_t, t_next);
    x0 = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t); z_next = sqrt(a_next) x0 + sqrt(1 - a_next) eps."""
    a, a_next = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    eps = eps_model(z, sigma_next)
    x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps


def test_ddim_inverse_step_matches_the_reference_and_feeds_the_latent_rescaled_to_the_next_level():
    """Kills: the UNet fed x (level sigma) instead of x * sqrt((1 + sigma_next^2) / (1 + sigma^2)); sigma instead of
    sigma_next as the model's level; a sign flip of the update."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 5, generator=g, dtype=torch.float64)
    sigma, sigma_next = 0.7, 2.3
    den = RecordingDenoiser()
    out = ddim.ddim_inverse_step(x, den, sigma, sigma_next)
    assert len(den.calls) == 1
    x_in, level = den.calls[0]
    assert level == sigma_next
    assert torch.allclose(x_in, x * math.sqrt((1 + sigma_next**2) / (1 + sigma**2)), rtol=1e-12, atol=0)
    z = x / math.sqrt(1 + sigma**2)  # DDPM latent at t
    expected = reference_next_step(z, sigma, sigma_next) * math.sqrt(1 + sigma_next**2)  # back to model space
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-12)


def test_ddim_step_and_sampling_order_by_hand():
    """Eq. 12 with eta = 0 in VE form: x_next = x0_hat + sigma_next * (x - x0_hat) / sigma; sigma = 0 returns x0_hat;
    sample() visits the schedule in order and reports (i, x_next, x0_hat)."""
    x, den = torch.tensor([3.0]), torch.tensor([1.0])
    assert torch.allclose(ddim.ddim_step(x, den, 2.0, 0.5), torch.tensor([1.0 + 0.5 * (3.0 - 1.0) / 2.0]))
    assert torch.equal(ddim.ddim_step(x, den, 0.0, 0.5), den)
    assert torch.allclose(ddim.ddim_step(x, den, 1.0, 0.5), torch.tensor([2.0]))  # only sigma = 0 is special
    rec = RecordingDenoiser()
    seen = []
    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.0])
    x0 = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    out = ddim.sample(rec, x0, sigmas, on_step=lambda i, xn, d: seen.append((i, xn.clone(), d.clone())))
    assert [s for _x, s in rec.calls] == [4.0, 2.0, 1.0]
    assert [i for i, _x, _d in seen] == [0, 1, 2]
    x = x0
    for i, (sig, nxt) in enumerate(((4.0, 2.0), (2.0, 1.0), (1.0, 0.0))):
        assert torch.equal(rec.calls[i][0], x)
        d = x - sig * eps_model(x / math.sqrt(1 + sig**2), sig)
        x = d + nxt * (x - d) / sig
        assert torch.allclose(seen[i][1], x) and torch.allclose(seen[i][2], d)
    assert torch.allclose(out, x)


def test_invert_walks_the_schedule_upwards_and_aligns_latents_with_sigmas():
    """latents[S] = x0, latents[0] = x_T; step j goes from sigmas[S - j] to sigmas[S - j - 1] (kills off-by-one
    indices and a reversed stack)."""
    sigmas = torch.tensor([3.0, 1.5, 0.5, 0.0])
    x0 = torch.tensor([[0.25, -0.75, 1.0]], dtype=torch.float64)
    rec = RecordingDenoiser()
    steps = []
    lat = ddim.invert(rec, x0, sigmas, on_step=steps.append)
    assert steps == [0, 1, 2]
    assert [s for _x, s in rec.calls] == [0.5, 1.5, 3.0]  # the model is told the next (higher) level
    assert lat.shape == (4, 1, 3) and torch.equal(lat[3], x0)
    x = x0
    for j, (sig, nxt) in enumerate(((0.0, 0.5), (0.5, 1.5), (1.5, 3.0))):
        z = x / math.sqrt(1 + sig**2)
        x = reference_next_step(z, sig, nxt) * math.sqrt(1 + nxt**2)
        assert torch.allclose(lat[2 - j], x, rtol=1e-10, atol=1e-12)


def test_vp_conversion_and_ddim_timesteps():
    assert float(schedule.alpha_bar(3.0)) == pytest.approx(0.1)
    assert torch.allclose(schedule.to_vp(torch.tensor([2.0]), 3.0), torch.tensor([2.0 / math.sqrt(10)]))
    assert schedule.ddim_timesteps(4) == [1, 251, 501, 751]
    assert schedule.ddim_timesteps(3, 10) == [1, 4, 7]  # stride 10 // 3 = 3; 10 is past the table
    assert schedule.ddim_timesteps(1) == [1]
    assert schedule.ddim_timesteps(20, 10) == list(range(1, 10))  # stride at least 1; t = 10 is past the table
    table = torch.arange(1000, dtype=torch.float32)
    assert schedule.ddim_sigmas(table, 4).tolist() == [751.0, 501.0, 251.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        schedule.ddim_timesteps(0)


# ------------------------------------------------------------------------------------------------ null-text
def test_null_text_schedule_constants():
    """The official code's schedule: lr 1e-2 * (1 - i / 100), early stop at 1e-5 + i * 2e-5, 10 inner steps."""
    assert null_text.null_text_lr(0) == pytest.approx(1e-2, rel=1e-12)
    assert null_text.null_text_lr(49) == pytest.approx(0.51e-2, rel=1e-12)
    assert null_text.null_text_threshold(0) == pytest.approx(1e-5, rel=1e-12)
    assert null_text.null_text_threshold(10) == pytest.approx(2.1e-4, rel=1e-12)
    assert null_text.NULL_TEXT_INNER_STEPS == 10


def scripted(losses):
    """predict(uncond) whose loss (with target 0 and sigma_next = 0, where x_next = x0_hat) follows `losses` call by
    call; it keeps a graph through the embedding so the optimiser runs. Records the embeddings it was given."""
    seen = []

    def predict(emb):
        k = len(seen)
        seen.append(emb.detach().clone())
        return torch.full((1, 4), math.sqrt(losses[min(k, len(losses) - 1)])) + emb.sum() * 0.0

    return predict, seen


def run_scripted(losses, step, **kw):
    predict, seen = scripted(losses)
    its = []
    res = null_text.optimize_step(predict, torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 2, 3), 1.0, 0.0,
                                  step, on_iteration=its.append, **kw)
    return res, seen, its


def test_null_text_stops_at_the_first_loss_below_the_step_threshold():
    """Step 0 threshold 1e-5: 5e-5 and 1.2e-5 go on, 0.9e-5 stops after iteration 4 (a 1e-4 base would stop at 2)."""
    res, seen, its = run_scripted([4e-4, 5e-5, 1.2e-5, 0.9e-5, 1e-9], step=0)
    assert res.iterations == 4 and its == [0, 1, 2, 3]
    assert res.loss == pytest.approx(0.9e-5, rel=1e-5)
    assert len(seen) == 5  # 4 iterations + the final prediction with the optimised embedding
    # step 5: threshold 1.1e-4 (grows by 2e-5 per step): 1.2e-4 goes on, 1.05e-4 stops
    res5, _seen, _its = run_scripted([3e-4, 1.2e-4, 1.05e-4, 1e-9], step=5)
    assert res5.iterations == 3
    # step 4: threshold 0.9e-4: 1.05e-4 does not stop, 0.85e-4 does
    res4, _seen, _its = run_scripted([3e-4, 1.05e-4, 0.85e-4, 1e-9], step=4)
    assert res4.iterations == 3
    res4b, _seen, _its = run_scripted([3e-4, 1.05e-4, 0.95e-4, 1e-9], step=4)
    assert res4b.iterations == 4


def test_null_text_runs_at_most_inner_steps_and_returns_the_last_loss():
    res, seen, its = run_scripted([1.0, 0.5, 0.25], step=0)
    assert res.iterations == 10 and its == list(range(10)) and len(seen) == 11
    assert res.loss == pytest.approx(0.25)
    res3, _seen, _its = run_scripted([1.0], step=0, inner_steps=3)
    assert res3.iterations == 3
    res0, seen0, _its = run_scripted([1.0], step=0, inner_steps=0)  # no optimisation: warm start kept, loss unknown
    assert res0.iterations == 0 and res0.loss == math.inf and len(seen0) == 1 and res0.uncond.eq(0).all()


def test_null_text_adam_learning_rate_follows_the_step():
    """Adam's first update moves each coordinate by lr (m / sqrt(v) = sign(g)): lr(30) = 0.7e-2, lr(0) = 1e-2."""
    for step, lr in ((0, 1e-2), (30, 0.7e-2)):
        seen = []

        def predict(emb, seen=seen):
            seen.append(emb.detach().clone())
            return emb.reshape(1, -1)

        start = torch.tensor([[[1.0, -2.0, 0.5]]])
        res = null_text.optimize_step(predict, torch.zeros(1, 3), torch.zeros(1, 3), start, 1.0, 0.0, step,
                                      inner_steps=1)
        assert res.iterations == 1
        assert torch.allclose(seen[1] - start, -lr * start.sign(), rtol=1e-4, atol=0)
        assert torch.equal(res.uncond, seen[1])
        assert res.loss == pytest.approx(float((start**2).mean()), rel=1e-6)  # loss of the iteration, before update
        assert torch.allclose(res.x_next, seen[1].reshape(1, -1))


def test_null_text_loss_is_measured_in_ddpm_space():
    """Loss = mse(z_next, z*_next) with z = x / sqrt(1 + sigma_next^2) (kills a model-space loss or the wrong level)."""
    x = torch.tensor([[2.0, -1.0]])
    target = torch.tensor([[0.0, 0.0]])
    sigma, sigma_next = 2.0, 3.0
    x0_hat = torch.tensor([[1.0, 1.0]])
    res = null_text.optimize_step(lambda emb: x0_hat + emb.sum() * 0, x, target, torch.zeros(1, 1, 2), sigma,
                                  sigma_next, 0, inner_steps=1)
    x_next = x0_hat + sigma_next * (x - x0_hat) / sigma
    assert torch.allclose(res.x_next, x_next)
    assert res.loss == pytest.approx(float((x_next**2).mean()) / (1 + sigma_next**2), rel=1e-6)


# ------------------------------------------------------------------------------------------------ P2P
def swap_mapper():
    """"a photo of a cat" -> "a photo of a grimalkin": source token 5 spread over target tokens 5..7, rest shifted."""
    mapper = torch.zeros(77, 77)
    for i in range(5):
        mapper[i, i] = 1
    mapper[5, 5:8] = 1 / 3
    for k in range(69):
        mapper[6 + k, 8 + k] = 1
    return mapper


def test_word_swap_mapper_is_applied_source_token_by_target_token():
    """replace_attention: target[..., t] = sum_w source[..., w] * M[w, t]. A non-symmetric M (source word 5 spread
    over target tokens 5..7, the rest shifted by 2) kills a transposed mapper."""
    g = torch.Generator().manual_seed(1)
    src = torch.rand(2, 3, 77, generator=g).softmax(-1)
    out = p2p.replace_attention(src, swap_mapper())
    for t in (5, 6, 7):
        assert torch.allclose(out[..., t], src[..., 5] / 3)
    assert torch.allclose(out[..., 8], src[..., 6]) and torch.allclose(out[..., 76], src[..., 74])
    assert torch.equal(out[..., :5], src[..., :5])


def make_call(run, kind, level, step, labels=(1, 0), heads=2, grid=(4, 4)):
    rows = 2 * len(labels)
    q = torch.zeros(rows, grid[0] * grid[1], 4 * heads)
    k = torch.zeros(rows, 77 if kind == "cross" else q.shape[1], 4 * heads)
    layout = run_mod.BatchLayout.from_call(rows, list(labels))
    return run_mod.AttnCall(q, k, k, heads, kind, layers.AttnSite("output", 3, 0, level), grid, layout, run,
                            float(run.sigmas[step]))


def controller(self_window=(0.0, 0.4), cross=(0.0, 0.8), **kw):
    windows = torch.tensor([list(cross)], dtype=torch.float64).repeat(77, 1)
    return p2p.PromptToPrompt("reweight", None, None, windows, self_window, **kw)


def test_p2p_self_attention_levels_and_window_steps():
    """Self-attention is replaced only at levels >= 2 (the coarse ones: the reference's <= 32^2 queries) and only for
    steps [int(S * s), int(S * e)): S = 10, window (0.2, 0.5) -> steps 2, 3, 4."""
    run = run_mod.RunState(torch.linspace(10, 0, 11), (SOURCE, TARGET))
    ctrl = controller(self_window=(0.2, 0.5))
    assert p2p.SELF_MIN_LEVEL == 2
    inside = {(lvl, s) for lvl in (1, 2, 4, 8) for s in range(10) if ctrl.active(make_call(run, "self", lvl, s))}
    assert inside == {(lvl, s) for lvl in (2, 4, 8) for s in (2, 3, 4)}
    # default window (0, 0.4) of 50 steps: the first step is in, step 20 is the first one out
    run50 = run_mod.RunState(torch.linspace(50, 0, 51), (SOURCE, TARGET))
    ctrl50 = controller()
    assert [ctrl50.active(make_call(run50, "self", 2, s)) for s in (0, 19, 20)] == [True, True, False]
    assert p2p.self_window_steps((0.25, 0.5), 10) == (2, 5)
    # a custom minimum level moves the filter
    assert not controller(self_window=(0.0, 1.0), self_min_level=4).active(make_call(run, "self", 2, 0))
    assert controller(self_window=(0.0, 1.0), self_min_level=4).active(make_call(run, "self", 4, 0))


def test_p2p_cross_window_steps_and_rows():
    """Cross-attention edited for steps [int(s * (S + 1)), int(e * (S + 1))): S = 10, (0.2, 0.8) -> steps 2..7; at
    every level; never without a conditional target row."""
    run = run_mod.RunState(torch.linspace(10, 0, 11), (SOURCE, TARGET))
    ctrl = controller(cross=(0.2, 0.8))
    steps = [s for s in range(10) if ctrl.active(make_call(run, "cross", 4, s))]
    assert steps == [2, 3, 4, 5, 6, 7]
    assert p2p.window_steps((0.2, 0.8), 10) == (2, 8)
    assert ctrl.active(make_call(run, "cross", 1, 3)) and ctrl.active(make_call(run, "cross", 8, 3))
    assert not ctrl.active(make_call(run, "cross", 4, 3, labels=(1,)))  # no conditional chunk
    assert not ctrl.active(make_call(run_mod.RunState(torch.linspace(10, 0, 11), (SOURCE, SOURCE)), "cross", 4, 3))
    windows = torch.tensor([[0.0, 0.8], [0.2, 0.4], [0.5, 1.0]], dtype=torch.float64)
    assert p2p.token_alpha(2, 10, windows).tolist() == [1, 1, 0]
    assert p2p.token_alpha(1, 10, windows).tolist() == [1, 0, 0]
    assert p2p.token_alpha(4, 10, windows).tolist() == [1, 0, 0]  # int(0.4 * 11) = 4 is out
    assert p2p.token_alpha(5, 10, windows).tolist() == [1, 0, 1]
    assert p2p.token_alpha(8, 10, windows).tolist() == [0, 0, 1]
    # fractions where S + 1 and S (or S + 2) disagree: (0.55, 0.95) -> [6, 10), (0.5, 0.6) -> [5, 6) at S = 10
    odd = torch.tensor([[0.55, 0.95], [0.5, 0.6]], dtype=torch.float64)
    assert [p2p.token_alpha(s, 10, odd).tolist() for s in (4, 5, 6, 9, 10)] == [[0, 0], [0, 1], [1, 0], [1, 0], [0, 0]]
    assert p2p.window_steps((0.55, 0.95), 10) == (6, 10) and p2p.window_steps((0.5, 0.6), 10) == (5, 6)
    # the cross edit is active while ANY token's window is open (per-word windows may close earlier)
    mixed = controller(cross=(0.0, 0.8))
    mixed.cross_windows[6] = torch.tensor([0.0, 0.4], dtype=torch.float64)
    assert [mixed.active(make_call(run, "cross", 4, s)) for s in (3, 4, 7, 8)] == [True, True, True, False]
    assert p2p.CROSS_REPLACE_DEFAULT == 0.8 and p2p.SELF_REPLACE_DEFAULT == 0.4


def test_p2p_replace_mode_edits_inside_each_tokens_window_only():
    """Word swap through the controller: inside its window a target token reads the mapped source attention (a
    non-symmetric mapper), outside it keeps the target's own; only the conditional target row changes."""
    run = run_mod.RunState(torch.linspace(10, 0, 11), (SOURCE, TARGET))
    mapper = swap_mapper()
    windows = torch.tensor([[0.0, 0.8]], dtype=torch.float64).repeat(77, 1)
    windows[7] = torch.tensor([0.0, 0.4], dtype=torch.float64)  # token 7 closes at step int(0.4 * 11) = 4
    ctrl = p2p.PromptToPrompt("replace", mapper, None, windows, (0.0, 0.4))
    probs = torch.rand(4, 2, 16, 77, generator=torch.Generator().manual_seed(2))
    out = ctrl.edit_probs(make_call(run, "cross", 4, 5), probs)
    src, tgt = probs[2], probs[3]
    assert torch.allclose(out[3, ..., 6], src[..., 5] / 3) and torch.allclose(out[3, ..., 5], src[..., 5] / 3)
    assert torch.equal(out[3, ..., 7], tgt[..., 7])  # outside its window at step 5
    assert torch.allclose(out[3, ..., 8:], src[..., 6:75]) and torch.equal(out[:3], probs[:3])
    out3 = ctrl.edit_probs(make_call(run, "cross", 4, 3), probs)
    assert torch.allclose(out3[3, ..., 7], src[..., 5] / 3)  # still inside at step 3


def test_p2p_self_edit_reaches_the_output_through_dispatch():
    """The controller edits probabilities (EDITS_PROBS): through run.dispatch the target row's self-attention output
    is the source row's probabilities applied to the target's own values."""
    run = run_mod.RunState(torch.linspace(10, 0, 11), (SOURCE, TARGET))
    g = torch.Generator().manual_seed(3)
    call = make_call(run, "self", 2, 0)
    call.q, call.k, call.v = (torch.randn(4, 16, 8, generator=g) for _ in range(3))
    out = run_mod.dispatch(call, [controller()], lambda: None)
    probs = pkg("attention.core").attention_probs(call.q, call.k, 2)
    core = pkg("attention.core")
    expected = core.apply_probs(probs[2:3], call.v[3:4], 2)
    assert torch.allclose(out[3:4], expected, atol=1e-6)
    assert torch.allclose(out[:3], core.apply_probs(probs[:3], call.v[:3], 2), atol=1e-6)


def test_p2p_self_edit_copies_conditional_source_rows_only():
    run = run_mod.RunState(torch.linspace(10, 0, 11), (SOURCE, TARGET))
    call = make_call(run, "self", 2, 0)  # labels (1, 0): rows 0, 1 uncond; 2 source, 3 target
    probs = torch.rand(4, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    out = controller().edit_probs(call, probs)
    assert torch.equal(out[3], probs[2]) and torch.equal(out[:3], probs[:3])


# ------------------------------------------------------------------------------------------------ local blend
def test_local_blend_threshold_is_strict():
    """Mask = (map / max) > threshold: a cell exactly at the threshold is outside."""
    maps = torch.zeros(1, 4, 77)  # 2x2 grid
    maps[0, :, 3] = torch.tensor([1.0, 0.5, 0.25, 0.75])
    mask = p2p.local_blend_mask(maps, [[3]], (2, 2), (2, 2), threshold=0.5, dilation=0)
    assert mask[0, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]
    mask = p2p.local_blend_mask(maps, [[3]], (2, 2), (2, 2), threshold=0.25, dilation=0)
    assert mask[0, 0].tolist() == [[1.0, 1.0], [0.0, 1.0]]
    assert local_blend.THRESHOLD == 0.3 and local_blend.DILATION == 1
    hook = p2p.LocalBlend((1,), (1,))
    assert (hook.threshold, hook.dilation, hook.start) == (0.3, 1, 0.2)
    # defaults of the maths (threshold 0.3, k = 1): a 0.45 corner is in, a 0.3 one is out; an empty row stays a row
    grid = torch.zeros(2, 25, 77)
    grid[0, 0, 3], grid[0, 24, 3], grid[0, 4, 3] = 1.0, 0.45, 0.3
    default = p2p.local_blend_mask(grid, [[3], []], (5, 5), (5, 5))
    assert default.shape == (2, 1, 5, 5) and default[1].sum() == 0
    expected = torch.zeros(5, 5)
    expected[:2, :2] = 1
    expected[3:, 3:] = 1
    assert torch.equal(default[0, 0], expected)
    # words' maps are summed before the max-normalisation; the store helper returns the same mask and the heat
    maps[0, :, 4] = torch.tensor([0.0, 0.5, 0.0, 0.0])  # cell 1 -> 1.0, the max together with cell 0
    mask2 = p2p.local_blend_mask(maps, [[3, 4]], (2, 2), (2, 2), threshold=0.75, dilation=0)
    assert mask2[0, 0].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    m, heat = local_blend.local_blend(maps[0].view(2, 2, 77), [3, 4], (2, 2), threshold=0.75, dilation=0)
    assert torch.equal(m, mask2[0, 0]) and torch.allclose(heat, torch.tensor([[1.0, 1.0], [0.25, 0.75]]))


def test_local_blend_dilation_window_and_resize():
    """k = 1: a 3x3 max-pool on the map grid, then nearest resize to the latent (one 3x3 block per cell at 3x)."""
    maps = torch.zeros(1, 25, 77)
    maps[0, 0, 2] = 1.0  # corner cell of a 5x5 grid
    mask = p2p.local_blend_mask(maps, [[2]], (15, 15), (5, 5), threshold=0.3, dilation=1)[0, 0]
    assert mask.sum() == 4 * 9 and mask[:6, :6].eq(1).all()
    mask2 = p2p.local_blend_mask(maps, [[2]], (5, 5), (5, 5), threshold=0.3, dilation=2)[0, 0]
    assert mask2.sum() == 9 and mask2[:3, :3].eq(1).all()


class FakeDenoiser:
    def __init__(self, run):
        self.run = run


def blend_ctx(step, total=10):
    """Roles (source, target); the target word marks the top-left latent quarter, the source word the bottom-right."""
    run = run_mod.RunState(torch.linspace(total, 0, total + 1), (SOURCE, TARGET))
    maps = torch.zeros(2, 4, 77)
    maps[1, 0, 5] = 1.0  # target word (token 5 of the target) at the top-left cell
    maps[0, 3, 3] = 1.0  # source word (token 3 of the source) at the bottom-right cell
    run.sums[("cross", layers.SEMANTIC_LEVEL)] = maps
    run.counts[("cross", layers.SEMANTIC_LEVEL)] = 1
    run.grids[("cross", layers.SEMANTIC_LEVEL)] = (2, 2)
    x_next = torch.stack([torch.full((1, 4, 4), 0.25), torch.ones(1, 4, 4)])
    return edit_mod.StepContext(step, run.sigmas, (SOURCE, TARGET), x_next.clone(), FakeDenoiser(run), {},
                                torch.zeros(total + 1, 1, 4, 4), x_next=x_next)


def test_p2p_local_blend_starts_at_int_start_times_steps():
    """LocalBlend(start=0.2) with S = 10 blends from step 2 on: step 1 is untouched, step 2 is blended."""
    hook = p2p.LocalBlend((3,), (5,), threshold=0.3, dilation=0, start=0.2)
    before = blend_ctx(1)
    hook.after_step(before)
    assert before.x_next[1].eq(1).all() and "local_blend_mask" not in before.state
    first = blend_ctx(2)
    hook.after_step(first)
    expected = torch.full((1, 4, 4), 0.25)
    expected[:, :2, :2] = 1  # inside the union of both words' masks the target keeps its latent, outside it takes
    expected[:, 2:, 2:] = 1  # the source's (0.25)
    assert torch.equal(first.x_next[1], expected) and first.x_next[0].eq(0.25).all()
    last = blend_ctx(9)
    hook.after_step(last)
    assert torch.equal(last.x_next[1], expected)
    # start 0.25 of 10 steps -> int(2.5) = 2
    at2 = blend_ctx(2)
    p2p.LocalBlend((3,), (5,), dilation=0, start=0.25).after_step(at2)
    assert torch.equal(at2.x_next[1], expected)


# ------------------------------------------------------------------------------------------------ masks
def test_mask_coverage_of_exactly_one_half_is_inside():
    """A grid cell is inside a binary mask when coverage >= 0.5: the exactly half-covered cell is in, in every
    branch of mask_to_grid (divisible pooling, exact area shares for any other ratio)."""
    assert ops.BINARY_COVERAGE == 0.5
    m = torch.zeros(1, 4, 4)
    m[0, 0, :2] = 1  # cell (0, 0) of a 2x2 grid: 2 of its 4 pixels
    m[0, 2, 2] = 1  # cell (1, 1): 1 of 4 pixels
    assert ops.mask_to_grid(m, (2, 2), binary=True)[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert ops.mask_to_grid(m, (2, 2))[0, 0].tolist() == [[0.5, 0.0], [0.0, 0.25]]
    # not a divisor (6 -> 4: cells [0, 1.5), [1.5, 3), ...): exact area shares; pixel 0 at 0.25 and pixel 1 full
    # cover (0.25 + 0.5) / 1.5 = one half of cell 0, and pixel 1's other half is a third of cell 1
    a = torch.zeros(1, 6, 6)
    a[0, :, 0] = 0.25
    a[0, :, 1] = 1
    grid = ops.mask_to_grid(a, (4, 4))[0, 0, 0]
    assert torch.allclose(grid, torch.tensor([0.5, 1 / 3, 0.0, 0.0]))
    assert ops.mask_to_grid(a, (4, 4), binary=True)[0, 0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]
    # coarser than the grid: 2 mask columns over 3 cells, the middle one half in each pixel
    c = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert torch.allclose(ops.mask_to_grid(c, (4, 3))[0, 0], torch.tensor([[1.0, 0.5, 0.0]]).expand(4, 3))
    assert ops.mask_to_grid(c, (4, 3), binary=True)[0, 0, 0].tolist() == [1.0, 1.0, 0.0]


def test_coverage_weights_and_small_mask_helpers():
    cov = ops._coverage(2, 3)
    assert torch.allclose(cov, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))
    assert torch.allclose(ops._coverage(3, 2), torch.tensor([[2 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 2 / 3]]))
    one = torch.zeros(1, 1, 5, 5)
    one[0, 0, 2, 2] = 1
    assert ops.dilate(one, 0) is one
    assert ops.dilate(one, 1).sum() == 9 and ops.dilate(one, 2).sum() == 25
    assert ops.grid_to_image(torch.tensor([[[[1.0, 0.0]]]]), (2, 4))[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]
    assert not ops.aspect_mismatch((64, 64), (512, 512)) and ops.aspect_mismatch((64, 80), (512, 512))
    assert not ops.aspect_mismatch((200, 201), (200, 200)) and ops.aspect_mismatch((100, 102), (100, 100))
    assert ops.as_mask_batch(torch.full((1, 2, 2), -1.0), 1).eq(0).all()
    with pytest.raises(ops.MaskError, match="no pixels"):
        ops.as_mask_batch(torch.zeros(1, 0, 4), 1)


# ------------------------------------------------------------------------------------------------ grids
@pytest.mark.parametrize("hw, grids", [((14, 18), {1: (14, 18), 2: (7, 9), 4: (4, 5), 8: (2, 3)}),
                                       ((15, 9), {1: (15, 9), 2: (8, 5), 4: (4, 3), 8: (2, 2)}),
                                       ((64, 64), {1: (64, 64), 2: (32, 32), 4: (16, 16), 8: (8, 8)})])
def test_semantic_grid_ceil_halves_like_query_grid_on_odd_sides(hw, grids):
    """Each down-sampling ceil-halves (stride-2 conv, padding 1): 14x18 -> 7x9 -> 4x5 -> 2x3 (floor would give 3x4 at
    level 4 and disagree with the attention layer's own grid)."""
    for level, grid in grids.items():
        assert layers.semantic_grid(hw, level) == grid
        assert layers.query_grid(grid[0] * grid[1], hw) == (*grid, level)
    assert layers.semantic_grid(hw) == grids[layers.SEMANTIC_LEVEL]
    assert layers.SEMANTIC_LEVEL == 4 and layers.SELF_LEVEL_DPL == 2


def test_query_grid_rejects_a_count_of_no_level():
    with pytest.raises(ValueError, match="21 queries match no level of a 14x18 latent"):
        layers.query_grid(21, (14, 18))
    assert layers.query_grid(1, (3, 3)) == (1, 1, 4)
    # thin latents: the loop halves while either side is > 1 (a 2x1 or 1x3 grid still has levels above it)
    assert layers.query_grid(1, (2, 1)) == (1, 1, 2) and layers.query_grid(1, (1, 2)) == (1, 1, 2)
    assert layers.query_grid(1, (1, 3)) == (1, 1, 4) and layers.query_grid(2, (3, 1)) == (2, 1, 2)
    assert layers.query_grid(1, (3, 1)) == (1, 1, 4)
    with pytest.raises(ValueError, match="0 queries match no level of a 4x4 latent"):
        layers.query_grid(0, (4, 4))  # terminates at 1x1
    assert layers.AttnSite("input", 4, 1, 2).key == ("input", 4, 1)


# ------------------------------------------------------------------------------------------------ attention core
def reference_attention(q, k, v, heads, key_mask=None):
    """Per-head loops: head h owns columns [h D, (h + 1) D); softmax(q k^T / sqrt(D)) over the allowed keys."""
    rows, n, inner = q.shape
    d = inner // heads
    probs = torch.zeros(rows, heads, n, k.shape[1], dtype=torch.float64)
    out = torch.zeros(rows, n, inner, dtype=torch.float64)
    for r in range(rows):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            logits = q[r, :, cols].double() @ k[r, :, cols].double().T / math.sqrt(d)
            if key_mask is not None:
                allowed = key_mask[r, 0].expand(n, -1)
                logits = logits.masked_fill(~allowed, float("-inf"))
            p = torch.nan_to_num(logits.softmax(-1), nan=0.0)
            probs[r, h] = p
            out[r, :, cols] = p @ v[r, :, cols].double()
    return probs, out


def test_attention_probs_and_masked_attention_against_per_head_loops():
    """[R, N, H*D] head split, 1 / sqrt(D) scale (D != N != T), softmax over keys, a fully masked query -> 0."""
    core = pkg("attention.core")
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 3, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    probs, out = reference_attention(q, k, v, 2)
    assert torch.allclose(core.attention_probs(q, k, 2).double(), probs, atol=1e-6)
    assert torch.allclose(core.apply_probs(probs.float(), v, 2).double(), out, atol=1e-5)
    assert torch.allclose(core.masked_attention(q, k, v, 2).double(), out, atol=1e-5)
    mask = torch.rand(2, 1, 3, 5, generator=g) > 0.4
    mask[0, 0, 1] = False  # query 1 of row 0 may attend nothing
    mask[1, 0, 2] = True
    probs_m, out_m = reference_attention(q, k, v, 2, mask)
    got = core.attention_probs(q, k, 2, key_mask=mask)
    assert torch.allclose(got.double(), probs_m, atol=1e-6) and got[0, :, 1].eq(0).all()
    got_out = core.masked_attention(q, k, v, 2, key_mask=mask)
    assert torch.allclose(got_out.double(), out_m, atol=1e-5) and got_out[0, 1].eq(0).all()
    split = core.split_heads(q, 2)
    assert split.shape == (2, 2, 3, 4) and torch.equal(split[1, 1, 2], q[1, 2, 4:])
    assert torch.equal(core.merge_heads(split), q)


def test_mask_contract_edges():
    """as_mask_batch: every empty side is rejected, one-pixel sides are fine, [B, 1, H, W] of any batch, a NaN
    anywhere; mask_to_grid: one side divisible and the other not, non-square pooling, the area / coverage branch
    choice at equal sizes, values outside [0, 1]; grid_to_image's bilinear corners; aspect_mismatch at its edges."""
    for shape in ((0, 4, 4), (1, 0, 4), (1, 4, 0)):
        with pytest.raises(ops.MaskError, match="no pixels"):
            ops.as_mask_batch(torch.zeros(shape), 1)
    assert ops.as_mask_batch(torch.ones(1, 1, 4), 2).shape == (2, 1, 4)
    assert ops.as_mask_batch(torch.ones(1, 4, 1), 1).shape == (1, 4, 1)
    assert ops.as_mask_batch(torch.ones(2, 1, 5), 2).shape == (2, 1, 5)  # a 3-D mask with one row is not [B, 1, ...]
    assert ops.as_mask_batch(torch.ones(2, 1, 4, 4), 2).shape == (2, 4, 4)
    part = torch.zeros(1, 3, 3)
    part[0, 1, 1] = float("nan")
    with pytest.raises(ops.MaskError, match="NaN"):
        ops.as_mask_batch(part, 1)
    # one side divisible, the other not: the output has the grid's size either way
    assert ops.mask_to_grid(torch.ones(1, 8, 10), (4, 4)).shape == (1, 1, 4, 4)
    assert ops.mask_to_grid(torch.ones(1, 10, 8), (4, 4)).shape == (1, 1, 4, 4)
    tall = torch.zeros(1, 8, 4)
    tall[0, :4, :2] = 1
    assert ops.mask_to_grid(tall, (2, 2))[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]  # 4x2 pooling windows
    # equal height, wider mask: exact coverage (pixel column 0 is 2/3 of cell 0), not torch's area-resize bins (1/2)
    wide = torch.zeros(1, 4, 6)
    wide[0, :, 0] = 1
    assert torch.allclose(ops.mask_to_grid(wide, (4, 4))[0, 0, 0], torch.tensor([2 / 3, 0.0, 0.0, 0.0]))
    assert torch.allclose(ops.mask_to_grid(wide.transpose(1, 2), (4, 4))[0, 0, :, 0],
                          torch.tensor([2 / 3, 0.0, 0.0, 0.0]))
    # taller than the grid but narrower: the exact coverage branch (row cell 0 = 2/3 of pixel row 0)
    narrow = torch.zeros(1, 3, 2)
    narrow[0, 0] = 1
    assert torch.allclose(ops.mask_to_grid(narrow, (2, 4))[0, 0, 0], torch.full((4,), 2 / 3))
    # the branch is chosen from the mask's sides only (not its batch): each image as if alone
    pair = torch.zeros(2, 4, 5)
    pair[:, :, 4] = 1
    alone = torch.cat([ops.mask_to_grid(pair[i:i + 1], (2, 2)) for i in range(2)])
    assert torch.equal(ops.mask_to_grid(pair, (2, 2)), alone) and alone[:, 0, :, 1].gt(0).all()
    # a mask coarser than the grid on one side and finer on the other (3 -> 5 rows: pixel row 0 is 2/3 of cell 1)
    short = torch.zeros(1, 3, 8)
    short[0, 0] = 1
    assert torch.allclose(ops.mask_to_grid(short, (5, 4))[0, 0, 1], torch.full((4,), 2 / 3))
    assert torch.allclose(ops.mask_to_grid(short.transpose(1, 2), (4, 5))[0, 0, :, 1], torch.full((4,), 2 / 3))
    # a side with a remainder is never average-pooled (that would drop its last pixel row): 5 -> 2 rows, the last
    # pixel row is 1 / 2.5 of cell 1
    rest = torch.zeros(1, 5, 4)
    rest[0, 4] = 1
    assert torch.allclose(ops.mask_to_grid(rest, (2, 2))[0, 0, 1], torch.full((2,), 0.4))
    assert ops.mask_to_grid(torch.full((1, 2, 2), 2.0), (1, 1)).item() == 1.0
    assert ops.mask_to_grid(torch.full((1, 2, 2), -1.0), (1, 1)).item() == 0.0
    # grid -> image: bilinear with align_corners=False, clamped
    smooth = ops.grid_to_image(torch.tensor([[[[1.0, 0.0]]]]), (1, 4), smooth=True)[0, 0]
    assert torch.allclose(smooth, torch.tensor([1.0, 0.75, 0.25, 0.0]))
    assert ops.grid_to_image(torch.full((1, 1, 2, 2), 2.0), (4, 4)).max() == 1.0
    assert ops.grid_to_image(torch.full((1, 1, 2, 2), -1.0), (4, 4), smooth=True).min() == 0.0
    # aspect: exactly at the tolerance is not a mismatch; one-pixel and zero sides do not divide by zero
    assert not ops.aspect_mismatch((2, 3), (1, 1), tolerance=0.5) and ops.aspect_mismatch((2, 3), (1, 1), 0.49)
    assert not ops.aspect_mismatch((1, 2), (1, 2)) and not ops.aspect_mismatch((0, 5), (0, 5))


# ------------------------------------------------------------------------------------------------ mutation survivors
# (tools/mutate.py over inversion/{quality,trajectory}.py and masks/from_attention.py: docs/mutation.md)
def test_psnr_of_known_differences():
    """10 log10(1 / MSE) on [0, 1] images: a uniform 0.2 error is 13.98 dB, 0.1 is 20 dB, none is infinite."""
    psnr = pkg("inversion.quality").psnr
    ref = torch.full((1, 4, 4, 3), 0.1)
    assert psnr(torch.full((1, 4, 4, 3), 0.3), ref) == pytest.approx(10 * math.log10(1 / 0.04), abs=1e-5)
    assert psnr(torch.zeros(1, 4, 4, 3), ref) == pytest.approx(20.0, abs=1e-4)
    assert psnr(ref, ref.clone()) == math.inf
    half = torch.zeros(1, 2, 1, 3)
    half[:, 0] = 0.5  # MSE 0.125 (half the pixels off by 0.5): the square of the error, averaged
    assert psnr(half, torch.zeros_like(half)) == pytest.approx(10 * math.log10(8), abs=1e-5)


def test_trajectory_reports_a_non_square_latent_and_no_psnr():
    traj = pkg("inversion.trajectory").InversionTrajectory(
        "ddim", torch.tensor([1.0, 0.0]), torch.zeros(2, 1, 4, 6, 10), [], [], "a", "", 1.0, ())
    assert traj.latent_hw == (6, 10) and traj.steps == 1 and traj.batch == 1
    assert "latent 6x10" in traj.describe() and "PSNR n/a dB" in traj.describe()


def _store(roles):
    """A store whose rows have these roles (store_rows reads nothing else)."""
    return pkg("attention.store").AttentionStore({4: torch.zeros(len(roles), 2, 2, 77)}, roles,
                                                 (None,) * len(roles), (8, 8), 1)


def test_store_rows_pick_one_image_by_index_and_refuse_past_the_end():
    fa = pkg("masks.from_attention")
    store = _store(("source", "target", "source", "target"))
    assert fa.store_rows(store, "target") == [1, 3]
    assert fa.store_rows(store, "target", 0) == [1]  # index 0 is one image, not all
    assert fa.store_rows(store, "target", 1) == [3]  # the last valid index
    with pytest.raises(fa.StoreMaskError, match="`image_index` 2 is out of range"):
        fa.store_rows(store, "target", 2)
    single = _store(("source", "source"))
    assert fa.store_rows(single, "target", 1) == [1]  # a one-role store serves any branch


def test_instant_mask_with_a_word_uses_exactly_that_words_group(tiny):
    """mode 'instant' with `words`: the named word's group is the object (index), the same as instant_mask with that
    index; a group is chosen when all its tokens are among the word's positions (a one-token word included)."""
    fa, instant = pkg("masks.from_attention"), pkg("masks.instant")
    prompt = pkg("attention.tokens").tokenize_prompt(tiny.clip, "a photo of a cat on grass")
    maps = torch.rand(1, 8, 8, 77, generator=torch.Generator().manual_seed(3))
    store = pkg("attention.store").AttentionStore({4: maps}, ("source",), (prompt,), (16, 16), 1)
    groups = [pos for pos, _ in prompt.word_groups()]
    cat = [i for i, (_, word) in enumerate(prompt.word_groups()) if word == "cat"]
    for word, index in (("cat", cat), ("grass", [i for i, (_, w) in enumerate(prompt.word_groups()) if w == "grass"])):
        mask, heat = fa.mask_of_row(store, 0, fa.MaskSettings(mode=fa.INSTANT, words=(word,)))
        expected, expected_heat, _ = instant.instant_mask(maps[0].float(), groups, (16, 16), index=index)
        assert torch.equal(mask, expected) and torch.equal(heat, expected_heat), word


def test_store_row_of_picks_the_images_row_and_clamps_past_the_end():
    """row_of(role, image): the image-th row with that role; an index past the end gives that role's last row."""
    store = _store(("source", "target", "source", "target"))
    assert [store.row_of("target", i) for i in range(4)] == [1, 3, 3, 3]
    assert [store.row_of("source", i) for i in range(3)] == [0, 2, 2]
    with pytest.raises(ValueError, match="no 'intermediate' row"):
        store.row_of("intermediate")


def test_store_from_run_keeps_a_non_square_grid_and_merge_concatenates_rows():
    """A 3x5 capture grid stays [B, 3, 5, T] (rows = grid[0], columns = grid[1]); merging one store returns it
    unchanged, merging two concatenates their rows and keeps the first's latent size, steps and extras."""
    run_mod, store_mod = pkg("attention.run"), pkg("attention.store")
    run = run_mod.RunState(torch.tensor([2.0, 1.0, 0.0]), ("source", "target"))
    mean = torch.arange(2 * 15 * 4, dtype=torch.float32).view(2, 15, 4)
    run.sums[("cross", 4)], run.counts[("cross", 4)], run.grids[("cross", 4)] = mean * 2, 2, (3, 5)
    store = store_mod.store_from_run(run, (None, None), (6, 10), extras={"k": 1})
    assert store.cross[4].shape == (2, 3, 5, 4) and store.steps == 2
    assert torch.equal(store.cross[4][1, 2, 4], mean[1, 14]) and torch.equal(store.cross[4][0, 1, 0], mean[0, 5])
    assert store_mod.merge_stores([store]) is store
    other = store_mod.AttentionStore({4: torch.ones(1, 3, 5, 4)}, ("source",), (None,), (6, 10), 2, {}, {"k": 2})
    merged = store_mod.merge_stores([store, other])
    assert merged.roles == ("source", "target", "source") and merged.cross[4].shape == (3, 3, 5, 4)
    assert torch.equal(merged.cross[4][2], torch.ones(3, 5, 4)) and merged.extras == {"k": 1}


def test_mask_preview_frames_tint_the_mask_red_at_half_strength():
    """Frame 1 is the mask over the image: image * (1 - 0.5 m) + (1, 0.15, 0.1) * 0.5 m; frame 0 the heat map over
    the image; an RGBA image loses its alpha; the canvas without an image is mid grey [H, W, 3]."""
    preview, visualize = pkg("masks.preview"), pkg("attention.visualize")
    image = torch.rand(4, 6, 4, generator=torch.Generator().manual_seed(1))  # RGBA
    mask = torch.zeros(4, 6)
    mask[1, 2], mask[2, 3] = 1.0, 0.5
    frames = preview.mask_preview(image, torch.rand(2, 3, generator=torch.Generator().manual_seed(2)), mask)
    assert frames.shape == (2, 4, 6, 3)
    tint = torch.tensor([1.0, 0.15, 0.1])
    assert torch.allclose(frames[1][1, 2], image[1, 2, :3] * 0.5 + tint * 0.5)
    assert torch.allclose(frames[1][2, 3], image[2, 3, :3] * 0.75 + tint * 0.25)
    assert torch.equal(frames[1][0, 0], image[0, 0, :3])
    heat = torch.rand(2, 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(frames[0], visualize.heatmap_overlay(image, heat))
    assert torch.equal(preview.canvas((3, 5)), torch.full((3, 5, 3), 0.5))


# (tools/mutate.py --sample over the technique modules: docs/mutation.md, fifth run)
def test_heat_map_ramp_hits_its_stops_and_interpolates_between_them():
    """colorize: five stops (dark blue, blue, green, yellow, red) at 0, 1/4, 1/2, 3/4, 1, linear between them;
    values outside [0, 1] take the end stops."""
    visualize = pkg("attention.visualize")
    stops = torch.tensor([[0.19, 0.07, 0.23], [0.11, 0.50, 0.95], [0.18, 0.90, 0.55], [0.98, 0.80, 0.15],
                          [0.80, 0.10, 0.05]])
    out = visualize.colorize(torch.tensor([[0.0, 0.25, 0.5, 0.75, 1.0], [0.625, -0.5, 1.5, 0.125, 0.875]]))
    assert torch.allclose(out[0], stops)
    assert torch.allclose(out[1, 0], (stops[2] + stops[3]) / 2) and torch.allclose(out[1, 3], (stops[0] + stops[1]) / 2)
    assert torch.allclose(out[1, 1], stops[0]) and torch.allclose(out[1, 2], stops[4])
    assert torch.allclose(out[1, 4], (stops[3] + stops[4]) / 2)


def test_heat_map_overlay_by_hand():
    """heatmap_overlay on a non-square image [2, 4, 3]: the map [1, 2] = [[3, 7]] is upsampled bilinearly with
    half-pixel centres (0, 1/4, 3/4, 1 after min-max), coloured, and mixed as image * (1 - a) + heat * a;
    normalize_map gives (m - min) / (max - min), zeros for a constant map and for no map spread at all;
    heatmap_grid stacks one overlay per map."""
    visualize = pkg("attention.visualize")
    stops = visualize.colorize(torch.tensor([[0.0, 0.25, 0.75, 1.0]]))[0]
    image = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))  # RGBA: alpha dropped
    out = visualize.heatmap_overlay(image, torch.tensor([[3.0, 7.0]]), alpha=0.3)
    assert out.shape == (2, 4, 3)
    assert torch.allclose(out, image[..., :3] * 0.7 + stops[None] * 0.3, atol=1e-6)
    assert torch.allclose(visualize.normalize_map(torch.tensor([2.0, 2.5, 4.0])), torch.tensor([0.0, 0.25, 1.0]))
    assert torch.allclose(visualize.normalize_map(torch.tensor([-0.1, 0.3, 0.1])), torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(visualize.normalize_map(torch.full((2, 2), 5.0)), torch.zeros(2, 2))
    grid = visualize.heatmap_grid(image, [torch.tensor([[3.0, 7.0]]), torch.tensor([[7.0, 3.0]])], alpha=0.3)
    assert grid.shape == (2, 2, 4, 3) and torch.equal(grid[0], out)
    assert torch.allclose(grid[1], image[..., :3] * 0.7 + stops.flip(0)[None] * 0.3, atol=1e-6)


def test_dpl_progress_counts_token_and_null_text_updates_per_step():
    settings = pkg("inversion.dpl").DPLSettings(token_iterations=3, null_text_iterations=2)
    assert settings.units_per_step() == 5


def test_dpl_nouns_need_one_word_each_and_no_shared_tokens():
    dpl = pkg("inversion.dpl")
    assert dpl.check_nouns([[5, 4, 4], [7]]) == [[4, 5], [7]]
    for nouns in ([], [[3], []], [[]]):
        with pytest.raises(ValueError, match="`nouns` is empty"):
            dpl.check_nouns(nouns)
    with pytest.raises(ValueError, match="share tokens"):
        dpl.check_nouns([[3, 4], [4]])


def test_dpl_background_estimate_needs_both_captured_maps():
    """Sec. 3.3 needs the level-2 self-attention and the semantic-level cross-attention of the DDIM pass: a model
    without either gets the clear error, not a crash inside the estimate."""
    dpl = pkg("inversion.dpl")
    maps = {("self", dpl.SELF_LEVEL_DPL): torch.ones(1, 4, 4), ("cross", 4): torch.ones(1, 1, 77)}
    for missing in maps:
        run = SimpleNamespace(mean_map=lambda kind, level, gone=missing: None if (kind, level) == gone
                              else maps[(kind, level)])
        with pytest.raises(ValueError, match="too small for the background estimate"):
            dpl.estimate_from_run(run, [[1]], dpl.DPLSettings())


def test_dpl_background_estimate_reads_a_non_square_cross_grid_row_major():
    """A 2x4 cross-attention grid (wider than high) whose noun sits in the right half, and level-2 self-attention
    (4x8) that groups each half: the estimate is the left half, so the cross maps were laid out (h, w)."""
    dpl = pkg("inversion.dpl")
    cross = torch.zeros(2, 4, 3)
    cross[:, 2:, 1] = 1.0  # the noun (token 1) attends to the right half
    cross[:, :2, 0] = 1.0
    half = (torch.arange(32) % 8 >= 4).float()  # 4x8 self grid, row-major: right-half cells
    same = (half[:, None] == half[None, :]).float()
    self_map = same / same.sum(-1, keepdim=True)  # each query attends uniformly to its own half
    maps = {("self", dpl.SELF_LEVEL_DPL): self_map[None], ("cross", 4): cross.view(1, 8, 3)}
    run = SimpleNamespace(mean_map=lambda kind, level: maps[(kind, level)],
                          grids={("self", dpl.SELF_LEVEL_DPL): (4, 8), ("cross", 4): (2, 4)})
    background = dpl.estimate_from_run(run, [[1]], dpl.DPLSettings(background_clusters=2))
    assert torch.equal(background, 1.0 - half.view(4, 8))


def test_dpl_defaults_are_the_official_codes():
    """At most 21 token updates per step (DPL.sh: ATTN_STEP=21), AdamW at torch's defaults (lr 1e-3, weight decay
    1e-2), null-text's 10 inner steps (see inversion/dpl.py), V = 5 segments, cross-attention at level 4."""
    dpl = pkg("inversion.dpl")
    s = dpl.DPLSettings()
    assert (s.token_iterations, s.learning_rate, s.weight_decay, s.null_text_iterations, s.background_clusters,
            s.level) == (21, 1e-3, 1e-2, 10, 5, 4)


def test_kmeans_empty_cluster_keeps_its_centre():
    """A Lloyd step whose third centre attracts no point leaves that centre where it was (not at the origin)."""
    background = pkg("masks.background")
    x = torch.tensor([[0.0, 0.0], [0.2, 0.0], [10.0, 10.0], [10.2, 10.0]])
    centers = torch.tensor([[0.1, 0.0], [10.1, 10.0], [50.0, -50.0]])
    labels, new, _ = background._lloyd(x, centers, max_iter=1, tol=0.0)
    assert labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(new[2], centers[2]) and torch.allclose(new[:2], centers[:2])


def test_kmeans_takes_the_best_of_exactly_inits_seedings():
    """inits=1 returns the first seeding's clustering even where a second seeding would reach a lower inertia, and
    inits=2 returns that better second one (a data set with both found among seeds 0..199 of a fixed point cloud)."""
    background = pkg("masks.background")
    x = torch.rand(40, 2, generator=torch.Generator().manual_seed(0))
    k, found = 4, None
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        first = background._lloyd(x, background._kmeans_pp(x, k, gen), 300, 0.0)
        second = background._lloyd(x, background._kmeans_pp(x, k, gen), 300, 0.0)
        if second[2] < first[2] - 1e-6 and not torch.equal(first[0], second[0]):
            found = seed, first[0], second[0]
            break
    assert found is not None, "no seed where the second seeding wins"
    seed, first_labels, second_labels = found
    assert torch.equal(background.kmeans(x, k, seed=seed, inits=1, tol=0.0), first_labels)
    assert torch.equal(background.kmeans(x, k, seed=seed, inits=2, tol=0.0), second_labels)
    # a tie (the same partition numbered differently, equal inertia) keeps the first seeding's numbering
    for seed in range(200):
        gen = torch.Generator().manual_seed(seed)
        first = background._lloyd(x, background._kmeans_pp(x, k, gen), 300, 0.0)
        second = background._lloyd(x, background._kmeans_pp(x, k, gen), 300, 0.0)
        if second[2] == first[2] and not torch.equal(first[0], second[0]):
            assert torch.equal(background.kmeans(x, k, seed=seed, inits=2, tol=0.0), first[0])
            break
    else:
        raise AssertionError("no seed with a tie between two seedings")



def test_kmeans_pp_draws_the_first_centre_from_every_point_and_the_next_by_squared_distance():
    """k-means++: the first centre is the generator's first uniform draw over all N points (not over the D features);
    the next one is drawn with probability ~ D(x)^2, so one far point among 49 coincident ones is always the second."""
    background = pkg("masks.background")
    x = torch.rand(50, 2, generator=torch.Generator().manual_seed(1))
    for seed in range(5):
        first = int(torch.randint(50, (1,), generator=torch.Generator().manual_seed(seed)))
        centres = background._kmeans_pp(x, 1, torch.Generator().manual_seed(seed))
        assert torch.equal(centres[0], x[first]), seed
    for scale in (100.0, 0.01):  # D^2 sums above and below 1
        far = torch.zeros(50, 2)
        far[17], far[33] = scale, -scale
        for seed in range(10):
            centres = background._kmeans_pp(far, 3, torch.Generator().manual_seed(seed))
            assert sorted(centres[:, 0].tolist()) == pytest.approx([-scale, 0.0, scale]), (scale, seed)


def _naive_lloyd(x, centres, iterations):
    """Lloyd's algorithm written out point by point (the reference for _lloyd)."""
    centres = [c.clone() for c in centres]
    for _ in range(iterations):
        groups = [[] for _ in centres]
        for p in x:
            groups[min(range(len(centres)), key=lambda i: float(((p - centres[i]) ** 2).sum()))].append(p)
        centres = [torch.stack(g).mean(0) if g else c for g, c in zip(groups, centres)]
    return torch.stack(centres)


def test_lloyd_runs_to_convergence_and_moves_a_one_point_cluster_onto_its_point(monkeypatch):
    """_lloyd with tol 0 reaches the fixed point of plain Lloyd iterations (random clouds, random starts); one step
    moves a cluster holding a single point onto that point; kmeans hands _lloyd the tolerance relative to the mean
    per-feature (biased) variance, 0 for a single row, runs at least one seeding and at least one cluster."""
    background = pkg("masks.background")
    g = torch.Generator().manual_seed(4)
    for trial in range(12):
        x = torch.randn(30, 2, generator=g)
        start = x[torch.randperm(30, generator=g)[:4]] + 0.3
        _, centres, _ = background._lloyd(x, start, 300, 0.0)
        assert torch.allclose(centres, _naive_lloyd(x, start, 60), atol=1e-5), trial
    # the stop rule: the first iteration whose squared centre shift is <= tol is the last
    x = torch.randn(30, 2, generator=g)
    start = x[:4] + 0.5
    one = _naive_lloyd(x, start, 1)
    shift = float(((one - start) ** 2).sum())
    assert not torch.allclose(one, _naive_lloyd(x, start, 60), atol=1e-3)
    assert torch.allclose(background._lloyd(x, start, 300, shift)[1], one, atol=1e-6)
    x = torch.tensor([[0.0, 0.0], [0.2, 0.0], [9.0, 9.0]])
    _, centres, _ = background._lloyd(x, torch.tensor([[0.0, 0.0], [10.0, 10.0]]), 1, 0.0)
    assert torch.allclose(centres, torch.tensor([[0.1, 0.0], [9.0, 9.0]]))
    seen = []
    real = background._lloyd

    def spy(x_, centres_, max_iter, tol):
        seen.append((max_iter, tol))
        return real(x_, centres_, max_iter, tol)

    monkeypatch.setattr(background, "_lloyd", spy)
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 4.0]])  # feature variances 1 and 4
    background.kmeans(x, 2, inits=1, tol=0.1, max_iter=7)
    assert seen == [(7, pytest.approx(0.1 * 2.5))]
    seen.clear()
    assert background.kmeans(x[:1], 2, inits=1, tol=0.1).tolist() == [0] and seen == [(300, 0.0)]
    seen.clear()
    assert background.kmeans(x, 0, inits=0).tolist() == [0, 0, 0, 0] and len(seen) == 1


def test_background_estimate_constants_are_the_papers_and_the_official_codes():
    """V = 5 segments (Sec. 3.3); sklearn KMeans as the official code runs it: seed 1, n_init 10, max_iter 300, tol
    1e-4 (relative to the mean feature variance); the estimate's defaults are these."""
    background = pkg("masks.background")
    assert (background.BACKGROUND_CLUSTERS, background.KMEANS_SEED, background.KMEANS_INITS,
            background.KMEANS_MAX_ITER, background.KMEANS_TOL) == (5, 1, 10, 300, 1e-4)
    import inspect

    defaults = {n: p.default for n, p in inspect.signature(background.kmeans).parameters.items()}
    assert (defaults["seed"], defaults["inits"], defaults["max_iter"], defaults["tol"]) == (1, 10, 300, 1e-4)
    defaults = {n: p.default for n, p in inspect.signature(background.estimate_background).parameters.items()}
    assert (defaults["clusters"], defaults["seed"], defaults["inits"]) == (5, 1, 10)



def test_agreement_scores_by_hand_and_the_estimates_shapes():
    """sigma_nv = sum(A^n M_v) / |M_v|: a one-cell segment is not halved, an empty one scores 0 (not NaN).
    estimate_background: a non-square self-attention matrix is refused by name; no nouns on a 4 x 8 grid give ones of
    that (h, w) shape; V = 0 segments count as one."""
    background = pkg("masks.background")
    scores = background.agreement_scores(torch.tensor([0, 0, 1]), torch.tensor([[1.0, 1.0, 0.5]]), 3)
    assert scores.tolist() == [[1.0, 0.5, 0.0]]
    with pytest.raises(ValueError, match=r"self_attention must be \[N, N\] \(one image\); got \(16, 64\)"):
        background.estimate_background(torch.rand(16, 64), torch.zeros(1, 4, 4))
    sa = torch.rand(32, 32, generator=torch.Generator().manual_seed(0))
    none = background.estimate_background(sa, torch.zeros(0, 2, 4), grid=(4, 8))
    assert torch.equal(none, torch.ones(4, 8))
    one = background.estimate_background(sa, torch.rand(1, 2, 4, generator=torch.Generator().manual_seed(1)),
                                         clusters=0, grid=(4, 8))
    assert one.shape == (4, 8) and len(one.unique()) == 1

def test_scoring_words_keep_words_with_any_letter():
    """A word is scored when it has at least one letter ("t-shirt", "3d"), not when it has none ("42", ",")."""
    background = pkg("masks.background")
    words = [([1], "a"), ([2], "t-shirt"), ([3], "42"), ([4], "3d"), ([5], ","), ([6], "cat")]
    assert background.scoring_words(words, [[6]]) == [[6], [2], [4]]

def test_instant_refined_map_leaves_neutral_words_out():
    """Eq. 9's input: relu(minmax(mean of +1 maps) - minmax(mean of -1 maps)); a role-0 word is in neither mean."""
    instant = pkg("masks.instant")
    per_word = torch.zeros(3, 2, 2)
    per_word[0, 0, 0] = 1.0  # +1 word: top-left
    per_word[1, 1, 1] = 5.0  # neutral word: bottom-right (would enter the +1 mean if 0 counted as positive)
    per_word[2, 0, 1] = 1.0  # -1 word: top-right
    roles = instant.InstantRoles(0, torch.zeros(3), torch.tensor([1, 0, -1]))
    out = instant.refined_map(per_word, torch.zeros(2, 2), roles)
    assert torch.equal(out, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_row_override_replaces_only_sequences_equal_to_a_chunk():
    """RowOverride: a sequence equal to chunk 1 gets the learned row at its position (prompt-wide 77 + 2); a sequence
    that only shares some ids with a chunk (start token, padding) passes through as the host's embedding."""
    text = pkg("inversion.dpl_text")
    base = torch.nn.Embedding(10, 3)
    chunks = torch.tensor([[0, 1, 2, 9, 9], [0, 3, 4, 9, 9]])
    override = text.RowOverride(base, chunks, [text.CHUNK + 2], torch.full((1, 3), 7.0))
    tokens = torch.tensor([[0, 3, 4, 9, 9], [0, 5, 6, 9, 9], [0, 1, 2, 9, 9]])
    with torch.no_grad():
        out, plain = override(tokens), base(tokens)
    assert torch.equal(out[0, 2], torch.full((3,), 7.0)) and torch.equal(out[0, [0, 1, 3, 4]], plain[0, [0, 1, 3, 4]])
    assert torch.equal(out[1], plain[1]) and torch.equal(out[2], plain[2])  # partial match; chunk 0 has no position
    assert override.hits == 1
    # token batches of another length, or not [batch, length], are not chunks: the host's embedding, untouched
    for other in (torch.tensor([[0, 3, 4, 9, 9, 9, 9]]), torch.tensor([0, 3, 4, 9, 9])):
        with torch.no_grad():
            assert torch.equal(override(other), base(other))
    assert override.hits == 1


class TextTable(torch.nn.Module):
    """The part of a CLIP text transformer DPL's RowEncoder uses: a token table (10 ids, width 3)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(10, 3)

    def get_input_embeddings(self):
        return self.table

    def set_input_embeddings(self, table):
        self.table = table


def test_row_encoder_refuses_a_prompt_with_a_textual_inversion_embedding():
    """A token that is an embedding vector (ComfyUI's `embedding:name`) instead of an id is refused by name."""
    text = pkg("inversion.dpl_text")
    clip = SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=SimpleNamespace(transformer=TextTable())),
                           tokenize=lambda _text: {"l": [[(0, 1.0), (torch.zeros(3), 1.0), (9, 1.0)]]})
    with pytest.raises(text.LearnedRowsError, match="textual-inversion embedding"):
        text.RowEncoder(clip, SimpleNamespace(text="a embedding:thing"), [1])
    plain = SimpleNamespace(cond_stage_model=clip.cond_stage_model,
                            tokenize=lambda _text: {"l": [[(0, 1.0), (5, 1.0), (9, 1.0)]]})
    assert text.RowEncoder(plain, SimpleNamespace(text="a thing"), [1]).chunk_ids["l"].tolist() == [[0, 5, 9]]
    second = SimpleNamespace(cond_stage_model=clip.cond_stage_model,  # the embedding in the second chunk only
                             tokenize=lambda _text: {"l": [[(0, 1.0), (5, 1.0), (9, 1.0)],
                                                           [(0, 1.0), (torch.zeros(3), 1.0), (9, 1.0)]]})
    with pytest.raises(text.LearnedRowsError, match="textual-inversion embedding"):
        text.RowEncoder(second, SimpleNamespace(text="a long prompt"), [1])


def test_row_encoder_needs_every_encoder_to_read_the_learned_rows():
    """Every CLIP text encoder of the prompt (SDXL: l and g) must read its learned rows; an encoder whose table has
    no get_input_embeddings is not a learnable CLIP, and a model with none is refused."""
    text = pkg("inversion.dpl_text")

    class Model:
        def __init__(self, read):
            self.clip_l = SimpleNamespace(transformer=TextTable())
            self.clip_g = SimpleNamespace(transformer=TextTable())
            self.read = read

        def reset_clip_options(self):
            pass

        def encode_token_weights(self, tokens):
            out = [getattr(self, f"clip_{k}").transformer.get_input_embeddings()(torch.tensor([[t for t, _w in
                                                                                               tokens[k][0]]]))
                   for k in self.read]
            return torch.cat(out, -1), None

    ids = [(0, 1.0), (5, 1.0), (9, 1.0)]
    for read, ok in (("lg", True), ("l", False), ("g", False)):
        clip = SimpleNamespace(cond_stage_model=Model(read), tokenize=lambda _text: {"l": [ids], "g": [ids]})
        encoder = text.RowEncoder(clip, SimpleNamespace(text="a thing"), [1])
        assert sorted(encoder.encoders) == ["g", "l"]
        if ok:
            assert encoder.encode(encoder.initial_rows()).shape == (1, 3, 3 * len(read))
        else:
            with pytest.raises(text.LearnedRowsError, match="did not use the learned noun rows"):
                encoder.encode(encoder.initial_rows())
    model = SimpleNamespace(clip_l=SimpleNamespace(transformer=torch.nn.Linear(2, 2)),  # no token table to learn
                            clip_g=SimpleNamespace(transformer=TextTable()))
    assert list(text.text_encoders(SimpleNamespace(cond_stage_model=model))) == ["g"]
    with pytest.raises(text.LearnedRowsError, match="no CLIP text encoder whose token embeddings can be learned"):
        text.text_encoders(SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=SimpleNamespace(transformer=None),
                                                                             clip_h=SimpleNamespace())))


class StubDenoiser:
    """A denoiser the edit loops can drive: `fn(x)` is its x0 estimate; `calls` keeps every batch it was given."""

    def __init__(self, fn):
        self.fn, self.run, self.calls = fn, SimpleNamespace(step=0), []

    def __call__(self, x, sigma, context=None):
        self.calls.append(x.clone())
        return self.fn(x)


def test_step_context_puts_the_steps_null_text_on_the_uncond_label_and_learned_tokens_on_source_rows():
    """Label 1 (ComfyUI's uncond) gets ∅_t of this step; label 0 gets the learned source tokens on source rows and
    the target context (or the per-step target tokens) on the others."""
    uncond = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)
    cond = -uncond
    target_context = torch.full((2, 2, 4), 9.0)
    only_null = edit_mod.step_context(edit_mod.SourceBranch(torch.zeros(4, 1, 2, 2), uncond), 1, (SOURCE, TARGET),
                                      None)
    assert list(only_null) == [1] and torch.equal(only_null[1], uncond[1][None])
    both = edit_mod.step_context(edit_mod.SourceBranch(torch.zeros(4, 1, 2, 2), uncond, cond), 2, (SOURCE, TARGET),
                                 target_context)
    assert torch.equal(both[1], uncond[2][None])
    assert torch.equal(both[0], torch.stack([cond[2], target_context[1]]))
    per_step = edit_mod.SourceBranch(torch.zeros(4, 1, 2, 2), uncond, cond, target_cond=cond * 2)
    assert torch.equal(edit_mod.step_context(per_step, 0, (SOURCE, TARGET), target_context)[0][1], cond[0] * 2)
    # a target context with more tokens than the per-step rows (a second chunk): theirs are repeated along T
    long_target = torch.full((2, 4, 4), 9.0)
    longer = edit_mod.step_context(per_step, 1, (SOURCE, TARGET), long_target)[0]
    assert longer.shape == (2, 4, 4)
    assert torch.equal(longer[0], torch.cat([cond[1], cond[1]])) and torch.equal(longer[1], torch.cat([cond[1],
                                                                                                       cond[1]]) * 2)


def test_flow_edit_loop_hands_hooks_and_on_step_the_x0_estimate_x_minus_sigma_v():
    """With a flow solver the step's `denoised` is x - sigma * v at the step's start (ComfyUI's CONST), whatever the
    solver returns as x_next."""
    asked, seen = [], []

    def solver(velocity, x, sigma, sigma_next):
        v = velocity(x, sigma)
        asked.append(sigma)
        return x + (sigma_next - sigma) * v, v

    class Velocity(StubDenoiser):
        def __call__(self, x, sigma, context=None, velocity=False):
            assert velocity
            return super().__call__(x, sigma, context)

    x = torch.full((1, 1, 1, 2), 2.0)
    edit_mod.edit(Velocity(lambda z: 3.0 * z + 1.0), x, torch.tensor([0.5, 0.25, 0.0]), (TARGET,),
                  edit_mod.SourceBranch(torch.zeros(3, 1, 1, 2)), solver=solver,
                  on_step=lambda i, x_, d: seen.append((i, x_.clone(), d.clone())))
    assert asked == [0.5, 0.25]
    (i0, x1, d0), (i1, _, d1) = seen
    assert i0 == 0 and torch.allclose(d0, torch.full_like(x, 2.0 - 0.5 * 7.0))  # v = 3 * 2 + 1 = 7
    assert torch.allclose(x1, torch.full_like(x, 2.0 - 0.25 * 7.0))  # Euler to sigma 0.25: 0.25
    assert i1 == 1 and torch.allclose(d1, x1 - 0.25 * (3.0 * x1 + 1.0))


def test_edit_loop_defaults_free_source_rows_and_image_zero():
    """Without `pin` the source row follows its own DDIM steps (not the inversion latents), and hooks see image 0."""
    seen = []

    class Hook:
        def before_step(self, ctx):
            seen.append(ctx.image)

        def after_step(self, ctx):
            pass

    latents = torch.full((3, 1, 2, 2), 7.0)
    x = torch.ones(2, 1, 2, 2)
    out, _ = edit_mod.edit(StubDenoiser(lambda z: 0.5 * z), x, torch.tensor([2.0, 1.0, 0.0]), (SOURCE, TARGET),
                           edit_mod.SourceBranch(latents), hooks=[Hook()])
    assert seen == [0, 0]
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], latents[-1])
    pinned, _ = edit_mod.edit(StubDenoiser(lambda z: 0.5 * z), x, torch.tensor([2.0, 1.0, 0.0]), (SOURCE, TARGET),
                              edit_mod.SourceBranch(latents, pin=True))
    assert torch.equal(pinned[0], latents[-1]) and torch.equal(pinned[1], out[1])
    steps = []
    edit_mod.edit(StubDenoiser(lambda z: 0.5 * z), x, torch.tensor([2.0, 1.0, 0.0]), (SOURCE, TARGET),
                  edit_mod.SourceBranch(latents), on_step=lambda i, x_, d: steps.append((i, x_.shape, d.shape)))
    assert steps == [(0, x.shape, x.shape), (1, x.shape, x.shape)]  # on_step(step, latents, denoised)


def test_stacked_conditioning_keeps_the_inversions_flux_guidance_and_says_so(caplog):
    """Every branch runs in one batch: the guidance is the first entry's (the inversion's source prompt); a later entry
    asking for another value is logged with both values."""
    conditioning = pkg("inversion.conditioning")
    cond = [[torch.zeros(1, 4, 8), {"guidance": 2.0}]]
    other = [[torch.ones(1, 4, 8), {"guidance": 3.5}]]
    bare = [[torch.ones(1, 4, 8), {}]]
    with caplog.at_level("WARNING"):
        stacked = conditioning.stack_conditioning([cond, bare], ["inversion source", "target"])
        assert stacked[0][1]["guidance"] == 2.0 and "guidance" not in caplog.text
        stacked = conditioning.stack_conditioning([cond, other], ["inversion source", "target"])
    assert stacked[0][1]["guidance"] == 2.0 and stacked[0][0].shape == (2, 4, 8)
    # an inversion without guidance: none for the batch, although the target entry carries one
    assert "guidance" not in conditioning.stack_conditioning([bare, other], ["inversion source", "target"])[0][1]
    assert "`target` asks for Flux guidance 3.5" in caplog.text and "the inversion's guidance 2.0" in caplog.text


def test_conditioning_stack_by_hand_token_repetition_sizes_and_options(caplog):
    """Contexts of different token lengths are repeated along T (dim 1) to their lcm, whatever the batch or width;
    an entry's SDXL size conditioning defaults to the picture's own size (width = image columns), crops 0, targets
    the size; a later entry that asks for another size is logged with both. Other options are the last entry's, and
    pooled outputs are stacked only when every entry has one."""
    conditioning = pkg("inversion.conditioning")
    t = torch.arange(8.0).view(1, 2, 4)
    assert torch.equal(conditioning.repeat_tokens(t, 4), torch.cat([t, t], 1))  # width 4 == length: still along T
    assert conditioning.repeat_tokens(t, 2) is t
    assert conditioning.repeat_tokens(torch.zeros(4, 2, 3), 4).shape == (4, 4, 3)  # batch 4 == length
    assert conditioning.size_conditioning({}, (64, 96)) == {"width": 96, "height": 64, "crop_w": 0, "crop_h": 0,
                                                             "target_width": 96, "target_height": 64}
    asked = {"width": 1024, "height": 512, "crop_w": 8, "crop_h": 4, "target_height": 256}
    assert conditioning.size_conditioning(asked, (64, 96)) == {"width": 1024, "height": 512, "crop_w": 8, "crop_h": 4,
                                                                "target_width": 1024, "target_height": 256}
    source = [[torch.zeros(1, 2, 4), {"pooled_output": torch.zeros(1, 3)}]]
    target = [[torch.ones(1, 3, 4), {"pooled_output": torch.ones(1, 3), **asked}]]
    with caplog.at_level("WARNING"):
        tensor, options = conditioning.stack_conditioning([source, target], ["source", "target"], (64, 96))[0]
    assert tensor.shape == (2, 6, 4) and torch.equal(tensor[1], torch.ones(6, 4)) and not any(k in options for k in asked)
    assert torch.equal(options["pooled_output"], torch.tensor([[0.0] * 3, [1.0] * 3]))
    assert "`target` asks for SDXL size conditioning {'width': 1024, 'height': 512, 'crop_w': 8, 'crop_h': 4, " \
           "'target_width': 1024, 'target_height': 256}" in caplog.text
    assert "with the source's {'width': 96, 'height': 64, 'crop_w': 0, 'crop_h': 0, 'target_width': 96, " \
           "'target_height': 64}" in caplog.text
    # options other than size, guidance and pooled output are the last entry's; pooled only when every entry has one
    middle = [[torch.ones(1, 2, 4), {"strength": 0.5}]]
    last = [[torch.ones(1, 2, 4), {"strength": 0.25}]]
    tensor, options = conditioning.stack_conditioning([source, middle, last], ["a", "b", "c"])[0]
    assert tensor.shape == (3, 2, 4) and options == {"strength": 0.25}


def test_prompt_tokens_mark_a_textual_inversion_vector_as_id_minus_one():
    """A token that is an embedding vector (ComfyUI's `embedding:name`) has id -1 and piece "<emb>" (what the pack's
    consumers, e.g. DPL's refusal, read)."""
    tokens_mod = pkg("attention.tokens")
    sub = SimpleNamespace(inv_vocab={49406: "<|startoftext|>", 320: "a</w>", 49407: "<|endoftext|>"},
                          start_token=49406, end_token=49407)
    clip = SimpleNamespace(tokenizer=SimpleNamespace(clip_l=sub), tokenize=lambda _t: {
        "l": [[(49406, 1.0), (320, 1.0), (torch.zeros(4), 1.0), (49407, 1.0)]]})
    prompt = tokens_mod.tokenize_prompt(clip, "a embedding:thing")
    assert prompt.ids == (49406, 320, -1, 49407) and prompt.pieces[2] == "<emb>"


def test_run_constants_are_copied_to_the_asked_dtype_once():
    """RunState.on_device: the copy takes the asked dtype (half on a GPU run), keeps the source's without one, and is
    made once per key."""
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), (SOURCE,))
    made = []

    def make():
        made.append(1)
        return torch.tensor([1.5, 2.5])

    half = run.on_device("k", make, torch.device("cpu"), torch.float16)
    assert half.dtype == torch.float16 and run.on_device("k", make, torch.device("cpu"), torch.float16) is half
    assert run.on_device("k", make, torch.device("cpu")).dtype == torch.float32 and len(made) == 2


def test_context_override_is_padded_by_repetition_to_the_batchs_token_count():
    """A 3-token override on a 6-token batch context (ComfyUI's lcm padding) is repeated twice along the tokens and
    expanded to the chunk's rows; chunks without an override keep the host's context."""
    hooks = pkg("attention.hooks")
    context = torch.zeros(4, 6, 5)  # 2 chunks x 2 rows, 6 tokens, width 5 (width != tokens: the repeat is per token)
    override = torch.arange(15, dtype=torch.float32).view(1, 3, 5)
    out = hooks._override_context(context, [0, 1], 2, {1: override})
    assert out.shape == (4, 6, 5) and torch.equal(out[:2], context[:2])
    assert torch.equal(out[2], torch.cat([override[0], override[0]])) and torch.equal(out[3], out[2])
    with pytest.raises(ValueError, match="4 tokens; the batch has 6"):
        hooks._override_context(context, [0, 1], 2, {1: torch.zeros(1, 4, 5)})


def test_progress_sends_latent_previews_when_the_host_enables_them(tiny, monkeypatch):
    """With ComfyUI's previews on (here Latent2RGB), each update with an x0 hands the bar a preview of its last
    row; with previews off, none (and no error)."""
    import comfy.cli_args
    import comfy.utils

    sent = []
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute",
                        lambda self, value, total=None, preview=None: sent.append((value, total, preview)))
    comfy_model = pkg("inversion.comfy_model")
    monkeypatch.setattr(comfy.cli_args.args, "preview_method", comfy.cli_args.LatentPreviewMethod.Latent2RGB)
    progress = comfy_model.Progress(tiny.model, 2)
    assert progress.previewer is not None
    progress.update(1, torch.randn(2, 4, 8, 8))
    progress.update(1)
    assert [(v, t) for v, t, _ in sent] == [(1, 2), (2, 2)]
    assert sent[0][2] is not None and sent[1][2] is None
    monkeypatch.setattr(comfy.cli_args.args, "preview_method", comfy.cli_args.LatentPreviewMethod.NoPreviews)
    quiet = comfy_model.Progress(tiny.model, 1)
    quiet.update(1, torch.randn(1, 4, 8, 8))
    assert quiet.previewer is None and sent[-1] == (1, 1, None)


def test_progress_of_no_work_is_one_unit_never_zero_over_zero():
    """A run with no counted work still shows a bar of one unit that completes (0/0 would draw as NaN in the
    frontend); updates never pass the total."""
    progress = pkg("inversion.comfy_model").Progress(SimpleNamespace(), 0)
    assert progress.total == 1
    progress.update(3)
    assert progress.done == 1
    four = pkg("inversion.comfy_model").Progress(SimpleNamespace(), 4)
    assert (four.total, four.done) == (4, 0)  # starts empty
    four.update()
    assert four.done == 1
    four.update(5)
    assert four.done == 4


def test_min_latent_side_counts_downsamplings_when_the_unet_has_no_channel_mult():
    """2 ** (number of Downsample modules) for UNets that do not expose channel_mult; channel_mult wins otherwise."""
    comfy_model = pkg("inversion.comfy_model")

    class Downsample(torch.nn.Identity):
        pass

    blocks = [[torch.nn.Identity()], [Downsample()], [torch.nn.Identity(), Downsample()], [Downsample()]]
    plain = SimpleNamespace(model=SimpleNamespace(diffusion_model=SimpleNamespace(input_blocks=blocks)))
    assert comfy_model.min_latent_side(plain) == 8
    with_mult = SimpleNamespace(model=SimpleNamespace(diffusion_model=SimpleNamespace(
        input_blocks=blocks, channel_mult=(1, 2, 4))))
    assert comfy_model.min_latent_side(with_mult) == 4


@pytest.mark.parametrize("layout_name, expected", [("ALG1", [0.0, 1.0, 1.0, 2.0, 2.0]), ("ALG5", [0.0, 1.0, 1.0])])
def test_fusion_loop_feeds_each_row_its_stream(layout_name, expected):
    """Alg. 1's rows (source, t2i_bar, t2i, target_bar, target) read streams (source, t2i, t2i, target, target);
    Alg. 5's rows (source, target_bar, target) read (source, target, target)."""
    fusion = pkg("inversion.fusion")
    layout = getattr(fusion, layout_name)
    den = StubDenoiser(torch.zeros_like)
    n = layout.streams
    streams = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone()
    fusion.fusion_loop(den, streams, torch.tensor([1.0, 0.0]), layout, torch.ones(1, 1, 2, 2),
                       edit_mod.SourceBranch(torch.zeros(2, 1, 2, 2)), lambda _i: {})
    assert [x[:, 0, 0, 0].tolist() for x in den.calls] == [expected]


@pytest.mark.parametrize("layout_name, expected", [("ALG1", [[0, 1, 3], [0, 2, 4]]), ("ALG5", [[0, 1], [0, 2]])])
def test_fusion_loop_blends_each_streams_bar_row_outside_the_region_and_its_hat_row_inside(layout_name, expected):
    """Eq. 9/10/14: stream s's prediction is its eps_bar row on A^c and its eps_hat row on A (the source stream is
    row 0 alone): t2i = (1, 2), target = (3, 4) in Alg. 1; target = (1, 2) in Alg. 5."""
    fusion = pkg("inversion.fusion")
    layout = getattr(fusion, layout_name)
    den = StubDenoiser(lambda x: torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1, 1, 1).expand_as(x).clone())
    region = torch.tensor([[[[0.0, 1.0]]]])  # A^c on the left cell, A on the right
    seen = []
    final = fusion.fusion_loop(den, torch.zeros(layout.streams, 1, 1, 2), torch.tensor([1.0, 0.0]), layout, region,
                               edit_mod.SourceBranch(torch.zeros(2, 1, 1, 2)), lambda _i: {},
                               on_step=lambda i, s, j: seen.append((i, s.clone(), j.clone())))
    (step, streams, joined), = seen  # on_step(step, the streams after it, the blended predictions)
    assert [joined[:, 0, 0, cell].tolist() for cell in (0, 1)] == expected
    assert step == 0 and torch.equal(streams, final)


@pytest.mark.parametrize("layout_name", ["ALG1", "ALG5"])
def test_fusion_loop_adds_direct_inversion_offsets_to_the_source_and_to_the_target_outside_the_region(layout_name):
    """x_{i+1} = DDIM + d_i on the source stream; the target stream gets d_i on A^c only; no other stream gets it."""
    fusion = pkg("inversion.fusion")
    layout = getattr(fusion, layout_name)
    region = torch.tensor([[[[0.0, 1.0]]]])
    final = fusion.fusion_loop(StubDenoiser(torch.zeros_like), torch.zeros(layout.streams, 1, 1, 2),
                               torch.tensor([1.0, 0.0]), layout, region,
                               edit_mod.SourceBranch(torch.zeros(2, 1, 1, 2), offsets=torch.full((1, 1, 1, 2), 3.0)),
                               lambda _i: {})
    expected = [[3.0, 3.0]] + [[0.0, 0.0]] * (layout.streams - 2) + [[3.0, 0.0]]
    assert final[:, 0, 0].tolist() == expected


def test_fusion_row_contexts_give_each_c_t_row_its_own_negative_row():
    """Rows on C^S (source, t2i_bar, target_bar) take the step's ∅_t; the t2i and target rows take their own row of
    a per-row negative (the last row included)."""
    fusion = pkg("inversion.fusion")
    uncond = torch.full((2, 3, 4), -1.0)
    negative = torch.arange(5, dtype=torch.float32).view(5, 1, 1).expand(5, 3, 4)
    ctx = fusion.row_contexts(fusion.ALG1, edit_mod.SourceBranch(torch.zeros(3, 1, 2, 2), uncond), negative,
                              torch.zeros(1, 3, 4))(1)
    assert list(ctx) == [1] and ctx[1][:, 0, 0].tolist() == [-1.0, -1.0, 2.0, -1.0, 4.0]


def test_fusion_row_contexts_put_per_step_source_tokens_on_c_s_rows_and_repeat_tokens_to_the_longer_prompt():
    """Label 0: rows on C^S take the step's learned source tokens, the others their row of the target context; a
    77-token step context beside a 154-token target is repeated along the tokens (ComfyUI's chunk rule)."""
    fusion = pkg("inversion.fusion")
    cond = torch.arange(3 * 77 * 2, dtype=torch.float32).view(3, 77, 2)
    positive = torch.arange(5, dtype=torch.float32).view(5, 1, 1).expand(5, 154, 2) + 1000.0
    ctx = fusion.row_contexts(fusion.ALG1, edit_mod.SourceBranch(torch.zeros(4, 1, 2, 2), cond=cond),
                              torch.zeros(1, 77, 2), positive)(2)
    assert list(ctx) == [0] and ctx[0].shape == (5, 154, 2)
    for row, on_source in enumerate((True, True, False, True, False)):
        expected = torch.cat([cond[2], cond[2]]) if on_source else positive[row]
        assert torch.equal(ctx[0][row], expected), row


def test_joint_layout_of_a_non_square_grid():
    layout = pkg("attention.joint").JointLayout(3, (2, 5))
    assert layout.image == 10 and layout.fits(13) and not layout.fits(28)


def test_instdiffedit_loop_reports_each_step_and_averages_seeds_on_a_non_square_grid():
    """`on_step(step, x after it, the step's x0 estimate)`; the seed average of [n, N, T] maps reads N row-major on
    an (h, w) grid that is not square."""
    inv_instant = pkg("inversion.instant")
    seen = []
    x0, noise = torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2)
    inv_instant.masked_denoise(lambda x, s: 0.5 * x, x0, noise, torch.tensor([2.0, 1.0, 0.0]),
                               lambda i: torch.ones(1, 1, 1, 2), on_step=lambda i, x, d: seen.append((i, x, d)))
    assert [(i, x.flatten().tolist(), d.flatten().tolist()) for i, x, d in seen] == [
        (0, [1.5, 1.5], [1.0, 1.0]), (1, [0.75, 0.75], [0.75, 0.75])]  # x_T = 2; DDIM 2 -> 1 -> 0
    maps = torch.arange(2 * 6 * 1, dtype=torch.float32).view(2, 6, 1)
    assert inv_instant.seed_average(maps, (2, 3))[..., 0].tolist() == [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]


def test_instdiffedit_defaults_are_the_papers():
    """Eq. 8 thresholds gamma1 0.9 / gamma2 0.6 and Eq. 9's phi 0.2 (paper "Implementation"), the reference's blur
    (5-tap OpenCV table, twice) and PIL's bicubic a = -0.5, a 16 px feathered paste-back; the run's defaults use
    them."""
    masks_instant, inv_instant = pkg("masks.instant"), pkg("inversion.instant")
    assert (masks_instant.GAMMA1, masks_instant.GAMMA2, masks_instant.PHI) == (0.9, 0.6, 0.2)
    assert (masks_instant.BLUR_TAPS, masks_instant.BLUR_PASSES, masks_instant.BICUBIC_A, masks_instant.FEATHER,
            masks_instant.LATENT_CELL) == ((1.0, 4.0, 6.0, 4.0, 1.0), 2, -0.5, 16, 8)
    s = inv_instant.InstantSettings()
    assert (s.phi, s.gamma1, s.gamma2) == (0.2, 0.9, 0.6)
    # r = 0.5, 50 steps, cfg 7.5, n = 3 rounds (paper); the finish is the inpainting model at its default strength 1
    assert (s.strength, s.steps, s.cfg, s.seeds, s.finish, s.finish_denoise) == (0.5, 50, 7.5, 3, "inpaint", 1.0)


def test_mag_edit_defaults_are_the_papers():
    """Sec. 4.1: MAX_IT = 15 updates per guided step, the first tau = 25 of 50 DDIM steps guided, Eq. 2's lambda = 3;
    the reference code's step scale 2.5, a final blend over the last 15 of 50 steps with the mask grown one cell;
    Eq. 3's weights 1. The guidance's and the node's defaults use them."""
    mag = pkg("attention.mag")
    assert (mag.MAX_IT, mag.TAU, mag.PAPER_STEPS, mag.SR_LAMBDA) == (15, 25, 50, 3.0)
    assert (mag.SCALE, mag.BLEND_STEPS, mag.BLEND_DILATION, mag.LAMBDA_P, mag.LAMBDA_NG) == (2.5, 15, 1, 1.0, 1.0)
    fields = {f.name: f.default for f in dataclasses.fields(mag.MAGGuidance)}
    assert {k: fields[k] for k in ("scale", "max_iterations", "guidance_steps", "blend_steps", "sr_lambda",
                                   "lambda_p", "lambda_ng")} == {"scale": 2.5, "max_iterations": 15,
                                                                 "guidance_steps": 25, "blend_steps": 15,
                                                                 "sr_lambda": 3.0, "lambda_p": 1.0, "lambda_ng": 1.0}
    node = pkg("nodes.mag").AttnEditMAGGuidance.INPUT_TYPES()
    widgets = {**node["required"], **node["optional"]}
    assert [widgets[k][1]["default"] for k in ("max_iterations", "guidance_steps", "scale", "blend_steps")] == \
        [15, 25, 2.5, 15]
    assert widgets["guidance_steps"][1]["max"] == widgets["blend_steps"][1]["max"] == 50


def test_mag_guided_and_blend_steps_scale_to_runs_longer_than_the_papers():
    """tau = 25 of 50 steps is the first half at any step count: 50 of 100, 5 of 10; none without iterations. The
    blend's 15 of 50 likewise."""
    mag = pkg("attention.mag")
    guided = mag.MAGGuidance.guided_steps
    assert [guided(SimpleNamespace(guidance_steps=25, max_iterations=15), n) for n in (10, 50, 100)] == [5, 25, 50]
    assert guided(SimpleNamespace(guidance_steps=50, max_iterations=15), 100) == 100
    assert guided(SimpleNamespace(guidance_steps=25, max_iterations=0), 100) == 0
    # the final blend covers the last 15 of 50 steps: from step 70 of 100, step 7 of 10
    blend_start = mag.MAGGuidance.blend_start
    assert [blend_start(SimpleNamespace(blend_steps=15), n) for n in (10, 100)] == [7, 70]


def test_mag_guidance_passes_capture_live_semantic_maps_without_adding_to_the_runs_sums():
    """Each guidance iteration sees a capture of live cond cross maps at the semantic level only, stopped after the
    last needed layer; it adds nothing to the run's running sums (heat maps, local blend), and the run's own capture
    comes back after the step."""
    mag, run_mod = pkg("attention.mag"), pkg("attention.run")
    own = run_mod.CaptureSpec(cross_levels=frozenset({2, 4}))
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), ("source", "target"), capture=own)
    seen = []
    hook = SimpleNamespace(guided_steps=lambda n: 1, max_iterations=2, stop_after=3,
                           _iterate=lambda ctx, x, trace: (seen.append(run.capture), x + 1)[1])
    ctx = SimpleNamespace(step=0, total_steps=4, denoiser=SimpleNamespace(run=run), state={}, x=torch.zeros(2),
                          report=lambda n: None)
    mag.MAGGuidance.before_step(hook, ctx)
    expected = run_mod.CaptureSpec(cross_levels=frozenset({pkg("attention.layers").SEMANTIC_LEVEL}),
                                   self_levels=frozenset(), labels=frozenset({0}), live=True, accumulate=False,
                                   stop_after=3)
    assert seen == [expected, expected] and run.capture is own and ctx.x.tolist() == [2.0, 2.0]


def test_mag_final_blend_writes_the_target_rows_only():
    """Outside the blend mask the target takes the source; inside it keeps its own; the source rows stay."""
    mag = pkg("attention.mag")
    hook = SimpleNamespace(blend_start=lambda n: 0, blend_masks=torch.tensor([[[0.0, 1.0]]]))
    x_next = torch.tensor([[[0.0, 0.0]], [[5.0, 5.0]]])
    ctx = SimpleNamespace(step=3, total_steps=4, image=0, state={}, x_next=x_next,
                          rows=lambda role: {"source": [0], "target": [1]}[role])
    mag.MAGGuidance.after_step(hook, ctx)
    assert ctx.x_next.tolist() == [[[0.0, 0.0]], [[0.0, 5.0]]] and x_next[1].tolist() == [[5.0, 5.0]]
    assert ctx.state[mag.STATE_KEY]["blended"] == [3]


def test_running_sums_average_the_captured_chunks_of_a_call_row_by_row():
    """A capture of both labels in a call laid out (uncond, cond): the head-mean maps of the two chunks are averaged
    row by row (branch b of each chunk), then summed over calls; live maps keep every picked row, cond first."""
    run_mod, layers = pkg("attention.run"), pkg("attention.layers")
    spec = run_mod.CaptureSpec(labels=frozenset({0, 1}), live=True)
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), ("source", "target"), capture=spec)
    probs = torch.arange(4 * 2 * 1 * 1, dtype=torch.float32).view(4, 2, 1, 1)  # rows 0-1 uncond, 2-3 cond; 2 heads
    call = run_mod.AttnCall(torch.zeros(4, 1, 2), torch.zeros(4, 1, 2), torch.zeros(4, 1, 2), 2, "cross",
                            layers.AttnSite("output", 3, 0, 4), (1, 1), run_mod.BatchLayout((1, 0), 2), run, 1.0)
    run.record(call, probs)
    run.record(call, probs)
    heads = probs.mean(1)  # [4, 1, 1]: 0.5, 2.5, 4.5, 6.5
    expected = torch.stack([(heads[2] + heads[0]) / 2, (heads[3] + heads[1]) / 2])
    assert torch.equal(run.mean_map("cross", 4), expected) and run.counts[("cross", 4)] == 2
    assert run.live[0].labels == (0, 1) and torch.equal(run.live[0].probs, probs[[2, 3, 0, 1]])


def test_clearing_a_run_drops_every_tensor_and_resets_the_wrapper_knobs():
    """What `clear` (the sampling node's `finally`) leaves: no tensor references and the wrapper's knobs off, so
    nothing of one queued workflow reaches the next."""
    run = pkg("attention.run").RunState(torch.tensor([1.0, 0.0]), ("source",))
    t = torch.ones(1)
    run.context_override[0], run.fill[0], run.outputs[0] = t, t, t
    run.live.append(t)
    run.sums[("cross", 4)], run.counts[("cross", 4)], run.scratch["x"] = t, 1, t
    run.memo("k", lambda: t)
    run.compute_labels, run.sigma, run.velocity = frozenset({0}), 0.5, True
    run.clear()
    assert not (run.context_override or run.fill or run.outputs or run.live or run.sums or run.counts or run.scratch)
    assert (run.compute_labels, run.sigma, run.velocity) == (None, None, False) and run.memo("k", lambda: 2) == 2


def test_default_capture_a_new_runs_counters_and_a_step_context():
    """The inversion's default capture: running sums of the cond chunk's cross-attention at level 4 (the 16x16 maps
    of a 512 px SD1 image), no live maps; a new run starts at step 0 of image 0 with no overrides."""
    run_mod = pkg("attention.run")
    spec = run_mod.CaptureSpec()
    assert (spec.cross_levels, spec.self_levels, spec.labels) == (frozenset({4}), frozenset(), frozenset({0}))
    assert (spec.live, spec.accumulate, spec.stop_after) == (False, True, None)
    run = run_mod.RunState(torch.tensor([1.0, 0.0]), ("source",))
    assert (run.step, run.image, run.sigma, run.capture, run.velocity) == (0, 0, None, None, False)
    assert run.context_override == {} and run.fill == {} and run.compute_labels is None and run.control_roles is None
    # a step hook's context: no step result yet, fresh state per step, image 0, no progress bar (report is a no-op)
    ctx = edit_mod.StepContext(2, torch.tensor([2.0, 1.0, 0.5, 0.0]), ("source",), torch.zeros(1), None, {},
                               torch.zeros(4, 1))
    assert (ctx.x_next, ctx.denoised, ctx.state, ctx.image, ctx.progress) == (None, None, {}, 0, None)
    assert ctx.report(3) is None and (ctx.sigma, ctx.sigma_next, ctx.total_steps) == (0.5, 0.0, 3)
    # a hook that overrides nothing changes nothing and reports no inner work
    hook, before = edit_mod.StepHook(), ctx.x
    assert hook.before_step(ctx) is None and hook.after_step(ctx) is None and ctx.x is before
    assert hook.progress_units(10) == 0
    assert edit_mod.StepContext(0, ctx.sigmas, (), ctx.x, None, {}, ctx.source_latents).state is not ctx.state


def test_word_maps_without_words_is_an_empty_stack_and_the_inverted_start_map():
    """No prompt words: zero word maps of the asked size (float), the start map still min-max normalised and inverted
    (the reference compares 255 - x), and Eq. 6-8 give no index word and empty similarities and roles."""
    instant = pkg("masks.instant")
    maps = torch.zeros(4, 4, 3)
    maps[0, 0, 0] = 1.0  # the start token's map peaks in one corner
    per_word, start = instant.word_maps(maps, [], 0, (4, 4))
    assert per_word.shape == (0, 4, 4) and per_word.dtype == torch.float32
    assert float(start[0, 0]) == 0.0 and float(start.max()) == 1.0
    roles = instant.instant_roles(per_word, start)  # no index word, no similarity, no role
    assert roles.index == -1 and roles.similarities.shape == (0,) and roles.roles.shape == (0,)


def test_instant_roles_of_forced_words_and_of_a_flat_index_map():
    """Forced index words (a list) give the min-max normalised mean of their maps as A_index and role +1 each, even
    when their own similarity to that mean is below gamma1; a flat index map forces nothing (empty mask: its word's
    S = 0 is below gamma2). Maps thinner than 3 cells are blurred with edge replication, either side."""
    instant = pkg("masks.instant")
    per_word = torch.zeros(3, 4, 4)
    per_word[0, 0, :] = 1.0  # top row
    per_word[1, :, 0] = 1.0  # left column
    per_word[2, 3, 3] = 1.0  # a far corner
    start = torch.zeros(4, 4)
    roles = instant.instant_roles(per_word, start, index=[0, 1])
    mean = instant.minmax(per_word[[0, 1]].mean(0))
    assert torch.allclose(roles.similarities, instant.cosine(per_word, mean))
    assert roles.index == 0 and bool((roles.similarities[:2] < 0.9).all()) and roles.roles[:2].tolist() == [1.0, 1.0]
    flat = instant.instant_roles(torch.zeros(2, 4, 4), start, index=0)
    assert flat.roles.tolist() == [-1.0, -1.0]
    for shape in ((2, 6), (6, 2)):
        assert instant.gaussian_blur(torch.ones(shape)).shape == shape


def test_binarize_blurs_once_with_one_pass():
    """Eq. 9 with `blur_passes` = 1 blurs once (not zero times): a single hot cell spreads to its neighbours."""
    instant = pkg("masks.instant")
    refined = torch.zeros(8, 8)
    refined[4, 4] = 1.0
    once = instant.binarize(refined, phi=0.2, blur_passes=1)
    assert torch.equal(once, (instant.minmax(instant.gaussian_blur(refined, 1)) > 0.2).float())
    assert float(once.sum()) > 1.0 and float(instant.binarize(refined, phi=0.2, blur_passes=0).sum()) == 1.0


def test_refined_map_of_two_words_subtracts_the_background_word():
    """Eq. 9's input for two words with roles +1 / -1: relu(minmax(A_obj) - minmax(A_bg)), not the first word's map."""
    instant = pkg("masks.instant")
    per_word = torch.tensor([[[1.0, 0.5], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.5]]])
    roles = instant.InstantRoles(0, torch.tensor([1.0, 0.0]), torch.tensor([1.0, -1.0]))
    refined = instant.refined_map(per_word, torch.zeros(2, 2), roles)
    assert torch.allclose(refined, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
