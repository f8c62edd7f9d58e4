"""CPAM at the run's step count and size: S (Eq. 2) and T_m (Sec. 3.4) given on the paper's 50 steps move to the run
(the same fraction of it); the object gate, the mask switch and the mask refinement start on exactly the expected
step (checked on the step before and the first step of each window, through the real edit sampler on the tiny model);
a non-square latent with odd sides at every halving; the source branch pinned to the inversion (Alg. 1 l.3); the
null-prompt DDIM inversion (Sec. 4.1)."""

import logging

import pytest
import torch
from conftest import call_node, pkg

cpam = pkg("attention.cpam")
core = pkg("attention.core")
hooks = pkg("attention.hooks")
run_mod = pkg("attention.run")
ops = pkg("masks.ops")
cmasks = pkg("masks.cpam")

# Eq. 2's S = 3 and T_m = 5 (defaults) on the paper's 50 steps -> the run's first step of each window, by hand:
# round(3 * n / 50) and round(5 * n / 50), halves up.
EXPECTED = {10: (1, 1), 20: (1, 2), 50: (3, 5)}
LAYER_L, LAYER_BEFORE = ("output", 4), ("output", 3)  # layer 8 (the paper's L) and layer 7 on the SD1.5 layout


def test_run_step_hand_computed():
    assert [cpam.run_step(3, n) for n in (10, 20, 50, 100)] == [1, 1, 3, 6]
    assert [cpam.run_step(5, n) for n in (10, 20, 50, 100)] == [1, 2, 5, 10]
    assert cpam.run_step(0, 10) == 0 and cpam.run_step(1, 10) == 0  # 0.2 -> 0
    assert cpam.run_step(5, 5) == 1 and cpam.run_step(15, 5) == 2  # halves (0.5, 1.5) round up
    assert cpam.run_step(49, 10) == 9 and cpam.run_step(48, 10) == 9  # acts at 50 steps -> acts on the last step
    assert cpam.run_step(50, 10) == 10 and cpam.run_step(50, 50) == 50 and cpam.run_step(60, 100) == 100  # never
    assert all(cpam.run_step(v, 50) == v for v in range(50))  # the paper's schedule is the identity


def box(h, w, top, left, height, width):
    m = torch.zeros(1, h, w)
    m[:, top:top + height, left:left + width] = 1.0
    return m


class Spy(run_mod.Controller):
    """Test-only controller after CPAM: keeps CPAM's output of the calls at the given steps and sites."""

    EDITS_OUTPUT = True

    def __init__(self, steps, sites=None):
        self.steps, self.sites, self.calls = set(steps), sites, []

    def active(self, call):
        return call.run is not None and "target" in call.run.roles and call.step in self.steps

    def edit_output(self, call, out):
        key = (call.site.block, call.site.index)
        if self.sites is None or key in self.sites.get(call.kind, ()):
            self.calls.append({"kind": call.kind, "site": key, "step": call.step, "grid": call.grid, "call": call,
                               "q": call.q.clone(), "k": call.k.clone(), "v": call.v.clone(), "out": out.clone(),
                               "extra": {n: (k.clone(), v.clone()) for n, (k, v) in call.extra.items()},
                               "refined": call.run.scratch.get(cpam.REFINED_MASK)})
        return out


def invert(tiny, steps, hw=(16, 16), method="ddim_null_prompt", **kw):
    latent = {"samples": torch.randn(1, 4, *hw, generator=torch.Generator().manual_seed(11))}
    kw.setdefault("source_prompt", "")
    return call_node("AttnEditInvert", model=tiny.model, clip=tiny.clip, method=method, steps=steps, cfg=7.5,
                     latent=latent, **kw)


def spied_edit(model, inversion, spy, **kw):
    spied = hooks.add_controller(model, spy)
    return call_node("AttnEditEditSampler", model=spied, inversion=inversion, **kw)


def grid(mask, g):
    return ops.mask_to_grid(mask, g, binary=True).flatten().bool()


def attention(q, k, v, heads, keys=None):
    return core.masked_attention(q, k, v, heads, None if keys is None else keys.view(1, 1, 1, -1))


def cond_pair(call):
    c = call["call"]
    return c.role_rows(0, "source")[0], c.role_rows(0, "target")[0]


def object_is_retained(call, m_t):
    """Eq. 2 on the recorded call: inside M_t the target's output is Att(Q, K_i, V_i; M_t) (True) or its own
    Att(Q, K, V) (False); anything else fails."""
    src, tgt = cond_pair(call)
    q, out = call["q"][tgt:tgt + 1, m_t], call["out"][tgt:tgt + 1, m_t]
    heads = call["call"].heads
    kept = attention(q, call["k"][src:src + 1], call["v"][src:src + 1], heads, m_t)
    own = attention(q, call["k"][tgt:tgt + 1], call["v"][tgt:tgt + 1], heads)
    is_kept, is_own = torch.allclose(out, kept, atol=1e-5), torch.allclose(out, own, atol=1e-5)
    assert is_kept != is_own, (call["site"], call["step"])
    return is_kept


def hears_null(call, cells):
    """Eq. 4 on the recorded call: whether the target's cross-attention output at `cells` is the null-text output."""
    src, tgt = cond_pair(call)
    kn, vn = call["extra"]["null"]
    null = attention(call["q"][tgt:tgt + 1], kn[tgt:tgt + 1], vn[tgt:tgt + 1], call["call"].heads)
    return torch.equal(call["out"][tgt:tgt + 1, cells], null[:, cells])


# ------------------------------------------------------------------------------------------------ chains
@pytest.mark.parametrize("steps", [10, 20, 50])
def test_object_gate_and_mask_switch_start_on_the_expected_step(tiny, steps):
    """S = 3 and T_m = 5 (given at 50 steps) at 10, 20, 50 steps: the step before each window and its first step.
    The static M_t is the source box grown by one cell (expand_mask), so the switch shows on the ring of cells
    between them: they hear the null text while M_s rules and the prompt from T_m on."""
    s, t_m = EXPECTED[steps]
    inv = invert(tiny, steps)[0]
    source = box(16, 16, 4, 5, 6, 5)
    model, _ = call_node("AttnEditCPAMSelfAttn", model=tiny.model, inversion=inv, clip=tiny.clip,
                         source_mask=source, target_prompt="a photo of a cat jumping",
                         strategy="edit object (keep identity)", free_layers=0.0)
    ctrl = hooks.controllers_of(model)[-1]
    assert (ctrl.start_step, ctrl.refine_step, ctrl.start_layer) == (s, t_m, 8)
    spy = Spy({s - 1, s, t_m - 1, t_m}, {"self": {LAYER_L, LAYER_BEFORE}, "cross": {("input", 1)}})
    spied_edit(model, inv, spy, source_branch="pin to inversion")
    ms = grid(source, (16, 16))
    grown = grid(box(16, 16, 3, 4, 8, 7), (16, 16))  # the box dilated by one cell on every side, by hand
    m_t = {i: ms if i < t_m else grown for i in range(steps)}  # the M_t each step must use
    for call in (c for c in spy.calls if c["kind"] == "self"):
        expected = call["step"] >= s and call["site"] == LAYER_L
        assert object_is_retained(call, grid(m_t[call["step"]].view(1, 16, 16).float(), call["grid"])
                                  ) == expected, (steps, call["site"], call["step"])
    ring = grown & ~ms
    cross = {c["step"]: c for c in spy.calls if c["kind"] == "cross"}
    assert set(cross) == {s - 1, s, t_m - 1, t_m} - {-1}
    assert hears_null(cross[t_m], ~grown) and not hears_null(cross[t_m], ring)  # first step of M_t
    if t_m >= 1:
        assert hears_null(cross[t_m - 1], ~ms) and hears_null(cross[t_m - 1], ring)  # the step before: M_s
    selfs = {(c["step"], c["site"]) for c in spy.calls if c["kind"] == "self"}
    assert {(s - 1, LAYER_L), (s, LAYER_L), (s, LAYER_BEFORE)} <= selfs


@pytest.mark.parametrize("steps", [10, 20])
def test_mask_refinement_starts_on_the_expected_step(tiny, steps):
    """The refined M_t from the object words is computed after step T_m - 1 and used from step T_m on: a refinement
    that starts one step late (or early) fails here."""
    t_m = EXPECTED[steps][1]
    inv = invert(tiny, steps)[0]
    model, _ = call_node("AttnEditCPAMSelfAttn", model=tiny.model, inversion=inv, clip=tiny.clip,
                         source_mask=box(16, 16, 4, 5, 6, 5), target_prompt="a photo of a cat jumping",
                         strategy="replace object", object_words="cat", free_layers=0.0)
    spy = Spy({t_m - 1, t_m, t_m + 1}, {"cross": {("input", 1)}})
    spied_edit(model, inv, spy, source_branch="pin to inversion")
    by_step = {c["step"]: c for c in spy.calls}
    assert by_step[t_m - 1]["refined"] is None  # the step before T_m: no refinement yet
    refined = by_step[t_m]["refined"]
    assert refined is not None and refined.any()  # the first step of T_m already uses it
    inside = grid(refined.float(), (16, 16))
    assert hears_null(by_step[t_m], ~inside) and not hears_null(by_step[t_m], inside)
    assert by_step[t_m + 1]["refined"] is not None


def test_non_square_latent_with_odd_sides(tiny):
    """A 512x768-shaped picture scaled down to a 14 x 18 latent (112 x 144 px): odd sides at every halving (7 x 9,
    4 x 5). Every call's grid matches its queries, Eq. 4 holds on every grid with the mask aligned to it, and the
    gate starts at the same steps as on a square latent."""
    steps = 10
    s, t_m = EXPECTED[steps]
    inv = invert(tiny, steps, hw=(14, 18))[0]
    source = box(112, 144, 40, 56, 48, 40)  # pixels: 6 x 5 latent cells at (5, 7)
    model, _ = call_node("AttnEditCPAMSelfAttn", model=tiny.model, inversion=inv, clip=tiny.clip,
                         source_mask=source, target_prompt="a photo of a cat jumping",
                         strategy="edit object (keep identity)", free_layers=0.0, mask_expand=0.0)
    spy = Spy({s - 1, s, t_m + 1})
    latent = spied_edit(model, inv, spy, source_branch="pin to inversion")[0]["samples"]
    assert latent.shape[-2:] == (14, 18) and torch.isfinite(latent).all()
    grids = {c["grid"] for c in spy.calls}
    assert {(14, 18), (7, 9), (4, 5)} <= grids
    for call in spy.calls:
        assert call["grid"][0] * call["grid"][1] == call["q"].shape[1]
        m = grid(source, call["grid"])
        if call["kind"] == "cross":
            assert hears_null(call, ~m) and (not m.any() or not hears_null(call, m))
        elif call["site"] in (LAYER_L, LAYER_BEFORE) and m.any():
            assert object_is_retained(call, m) == (call["step"] >= s and call["site"] == LAYER_L)


# ------------------------------------------------------------------------------------------------ the node's steps
def test_values_that_never_act_are_warned(tiny, caplog):
    inv = invert(tiny, 10)[0]
    kw = dict(model=tiny.model, inversion=inv, clip=tiny.clip, source_mask=box(16, 16, 4, 5, 6, 5),
              target_prompt="a photo of a cat jumping")
    with caplog.at_level(logging.WARNING):
        model, _ = call_node("AttnEditCPAMSelfAttn", strategy="edit object (keep identity)", start_step=50,
                             refine_step=50, **kw)
    assert "`start_step` 50 is past the last of the paper's 50 steps" in caplog.text
    assert "`refine_step` 50 is past the last of the paper's 50 steps" in caplog.text
    ctrl = hooks.controllers_of(model)[-1]
    assert ctrl.start_step == 10 and ctrl.refine_step == 10  # = the run's step count: never
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the largest value that still acts: the last step, no warning
        model, _ = call_node("AttnEditCPAMSelfAttn", strategy="edit object (keep identity)", start_step=49,
                             refine_step=49, **kw)
        call_node("AttnEditCPAMSelfAttn", strategy="change background", start_step=60, refine_step=60, **kw)
    assert "past the last" not in caplog.text  # change background uses neither S nor T_m
    ctrl = hooks.controllers_of(model)[-1]
    assert ctrl.start_step == 9 and ctrl.refine_step == 9


def test_knobs_the_strategy_does_not_read_are_warned(tiny, caplog):
    """A knob changed from its default that the chosen strategy never reads is named in a warning (it would otherwise
    do nothing silently); at the defaults, or on a strategy that reads it, there is no such warning."""
    inv = invert(tiny, 10)[0]
    kw = dict(model=tiny.model, inversion=inv, clip=tiny.clip, source_mask=box(16, 16, 4, 5, 6, 5))
    with caplog.at_level(logging.WARNING):
        call_node("AttnEditCPAMSelfAttn", strategy="remove object", target_prompt="", start_step=10, start_layer=3,
                  refine_step=20, object_words="cat", background_prompt="a beach", **kw)
    assert ("`start_step`, `start_layer`, `refine_step`, `object_words`, `background_prompt` are not used by strategy "
            "'remove object'") in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        call_node("AttnEditCPAMSelfAttn", strategy="replace object", target_prompt="a photo of a dog", start_step=10,
                  refine_threshold=0.5, **kw)
    assert "`start_step`, `refine_threshold` are not used by strategy 'replace object'" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        call_node("AttnEditCPAMSelfAttn", strategy="remove object", target_prompt="", **kw)
        call_node("AttnEditCPAMSelfAttn", strategy="edit object (keep identity)", target_prompt="a photo of a cat",
                  start_step=10, start_layer=3, refine_step=20, object_words="cat", refine_threshold=0.5, **kw)
    assert "not used by strategy" not in caplog.text


# ------------------------------------------------------------------------------------------------ Alg. 1 l.3
def test_cpam_pins_the_source_branch_to_the_inversion_latents(tiny, caplog):
    inv, _, _, recon, _, _ = invert(tiny, 4, method="null_text", source_prompt="a photo of a cat", inner_steps=2)
    model, _ = call_node("AttnEditCPAMSelfAttn", model=tiny.model, inversion=inv, clip=tiny.clip,
                         source_mask=box(16, 16, 4, 5, 6, 5), target_prompt="a photo of a dog",
                         strategy="replace object")
    spy = Spy(range(4), {"self": {("input", 1)}})
    with caplog.at_level(logging.WARNING):
        edited, source, _ = spied_edit(model, inv, spy)  # default source_branch: reconstruct
    assert "`source_branch` 'reconstruct' cannot take effect with CPAMController" in caplog.text
    assert "'pin to inversion'" in caplog.text
    z0 = pkg("inversion.comfy_model").latent_to_raw(tiny.model, inv.latents[-1])
    assert torch.allclose(source["samples"], z0, atol=1e-6)  # the source branch ends on z_0 of the inversion
    assert not torch.allclose(recon["samples"], z0, atol=1e-3)  # (a regenerated one would not)
    # every step's source row is the inversion latent z_i: its first self-attention input is a function of z_i only,
    # so it equals the same call in a pinned run without CPAM's edit of the target
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pinned, _, _ = spied_edit(model, inv, Spy(()), source_branch="pin to inversion")
    assert "source_branch" not in caplog.text and torch.equal(pinned["samples"], edited["samples"])
    plain = Spy(range(4), {"self": {("input", 1)}})
    target = hooks.controllers_of(model)[-1].target_conditioning
    spied_edit(tiny.model, inv, plain, target=target, source_branch="pin to inversion")
    for a, b in zip(spy.calls, plain.calls, strict=True):
        src = cond_pair(a)[0]
        assert torch.allclose(a["k"][src], b["k"][src], atol=1e-5), a["step"]


def test_null_prompt_ddim_inversion_hears_only_the_null_text(tiny, caplog):
    """Sec. 4.1: DDIM inversion guided by the null text with no source prompt. Both CFG halves hear the null text,
    so there is no CFG drift: its reconstruction beats plain DDIM inversion of the source prompt at cfg 7.5."""
    with caplog.at_level(logging.WARNING):
        inv, _, _, recon, _, _ = invert(tiny, 10, source_prompt="a photo of a cat")
    assert "`source_prompt` 'a photo of a cat' is not used by method 'ddim_null_prompt'" in caplog.text
    assert inv.method == "ddim_null_prompt" and inv.source_prompt == ""
    assert torch.equal(inv.source[0][0], inv.negative[0][0])
    plain, _, _, plain_recon, _, _ = invert(tiny, 10, method="ddim", source_prompt="a photo of a cat")
    clean = pkg("inversion.comfy_model").latent_to_raw(tiny.model, inv.latents[-1])
    err = float((recon["samples"] - clean).abs().mean())
    plain_err = float((plain_recon["samples"] - clean).abs().mean())
    assert err < 0.5 * plain_err, (err, plain_err)
    # the edit's source row hears the null text in its conditional half too (Alg. 1 l.3: eps(z_i, t), no prompt)
    model, _ = call_node("AttnEditCPAMSelfAttn", model=tiny.model, inversion=inv, clip=tiny.clip,
                         source_mask=box(16, 16, 4, 5, 6, 5), target_prompt="a photo of a dog",
                         strategy="replace object")
    spy = Spy({0}, {"cross": {("input", 1)}})
    spied_edit(model, inv, spy)
    call = spy.calls[0]
    src, tgt = cond_pair(call)
    to_k = tiny.model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    with torch.inference_mode():
        null_k = to_k(inv.negative[0][0])
    assert torch.allclose(call["k"][src:src + 1], null_k, atol=1e-5)
    assert not torch.allclose(call["k"][tgt:tgt + 1], null_k, atol=1e-3)


def test_768px_sd15_shaped_grids_without_the_unet():
    """SD1.5 at 768 px (96 x 96 latent; attention grids 96, 48, 24, 12): the full tiny UNet at that size is too slow
    for the suite on CPU (the chain itself runs in tests/test_768px.py on the UNet without the 96 x 96 level), so the
    controller runs on synthetic calls at each of those grids, the 96 x 96 one included. Eq. 4 holds with the mask
    aligned to every grid, the object gate opens at the moved S, and the refinement maps at the 24 x 24 semantic
    grid come back at latent resolution."""
    mask = box(768, 768, 200, 264, 296, 240)  # 37 x 30 latent cells at (25, 33) (pixel box on 8 px cells)
    latent = ops.mask_to_grid(mask, (96, 96))[:, 0]
    assert latent.sum() == 37 * 30
    steps = 20
    s, t_m = cpam.run_step(cpam.START_STEP, steps), cpam.run_step(cmasks.REFINE_START_STEP, steps)
    ctrl = cpam.CPAMController(
        strategy=cpam.STRATEGIES["edit object (keep identity)"], source_masks=latent,
        target_masks=cmasks.expand_mask(latent[:, None])[:, 0], layers={("output", 4): 8, ("output", 3): 7},
        free_layers=torch.zeros(steps, 16, dtype=torch.bool), null_context=torch.zeros(1, 77, 8), start_step=s,
        start_layer=8, refine_step=t_m)
    g = torch.Generator().manual_seed(0)
    run = run_mod.RunState(torch.linspace(10, 0, steps + 1), ("source", "target"))
    for level, side in ((1, 96), (2, 48), (4, 24), (8, 12)):
        n = side * side
        q = torch.randn(2, n, 8, generator=g)
        k, v, kn, vn = (torch.randn(2, 77, 8, generator=g) for _ in range(4))
        for step in (t_m - 1, t_m):
            call = run_mod.AttnCall(q, k, v, 2, "cross", pkg("attention.layers").AttnSite("input", 1, 0, level),
                                    (side, side), run_mod.BatchLayout((0,), 2), run, float(run.sigmas[step]))
            call.extra = {"null": (kn, vn)}
            out = ctrl.edit_output(call, core.masked_attention(q, k, v, 2))
            m = grid((latent if step < t_m else ctrl.target_masks)[:1], (side, side))
            null = core.masked_attention(q[1:], kn[1:], vn[1:], 2)
            assert m.any() and torch.equal(out[1:, ~m], null[:, ~m]) and not torch.equal(out[1:, m], null[:, m])
    q, k, v = (torch.randn(2, 576, 8, generator=g) for _ in range(3))
    m_t = grid(ctrl.target_masks[:1], (24, 24))
    for step, site in ((s - 1, ("output", 4)), (s, ("output", 4)), (s, ("output", 3))):
        call = run_mod.AttnCall(q, k, v, 2, "self", pkg("attention.layers").AttnSite(*site, 0, 4), (24, 24),
                                run_mod.BatchLayout((0,), 2), run, float(run.sigmas[step]))
        out = ctrl.edit_output(call, core.masked_attention(q, k, v, 2))
        m = m_t if step >= t_m else grid(latent[:1], (24, 24))
        kept = core.masked_attention(q[1:, m], k[:1], v[:1], 2, m.view(1, 1, 1, -1))
        assert torch.allclose(out[1:, m], kept, atol=1e-5) == (step >= s and site == ("output", 4)), (step, site)
    maps = torch.rand(576, 77, generator=g)
    refined = cmasks.mask_from_attention(maps, [5], (24, 24), (96, 96))
    assert refined.shape == (1, 1, 96, 96) and bool(refined.any())


def test_null_prompt_ddim_round_trip_is_exact_with_constant_epsilon(tiny):
    """The new method is plain DDIM inversion (Eq. 12) with the null text as prompt: with a constant eps_theta the
    reconstruction returns the input and the trajectory is x_t = x_0 + sigma_t * eps."""
    import tiny_models

    eps = torch.randn(1, 4, 1, 1, generator=torch.Generator().manual_seed(3))
    model = tiny_models.constant_eps_model(tiny.model, eps)
    latent = {"samples": torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))}
    inv, _, sigmas, recon, _, _ = call_node("AttnEditInvert", model=model, clip=tiny.clip, source_prompt="",
                                            method="ddim_null_prompt", steps=10, cfg=7.5, latent=latent)
    assert torch.allclose(recon["samples"], latent["samples"], atol=1e-4, rtol=0)
    x0 = latent["samples"][0] * tiny.model.model.latent_format.scale_factor
    for i in (0, 5, 10):
        assert torch.allclose(inv.latents[i, 0], x0 + float(sigmas[i]) * eps[0], atol=1e-4)
