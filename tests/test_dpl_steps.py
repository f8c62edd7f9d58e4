"""Dynamic Prompt Learning at the user's settings (issue 18 item 1, issue 22): the chain at 10, 20 and 50 steps runs
every stage on the expected steps with the Eq. 10 schedule defined at 50 steps, and odd / non-square latents work."""

import math

import pytest
import torch
from conftest import call_node, pkg

L = pkg("attention.dpl")
SRC = "a cat and a dog"


def latent(h=16, w=16, seed=4):
    return {"samples": torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed))}


def recording(model):
    """A clone whose UNet calls record (run id, step, chunk labels, grad enabled). The recorder keeps every RunState
    alive, so a finished run's id is never reused by the next run."""
    keys = pkg("attention.keys")
    calls, alive = [], []
    clone = model.clone()

    def recorder(apply_model, args):
        run = args["c"]["transformer_options"].get(keys.RUN)
        alive.append(run)
        calls.append((id(run), run.step, tuple(args["cond_or_uncond"]), torch.is_grad_enabled()))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(recorder)
    return clone, calls


def dpl(tiny, steps, lat=None, **kw):
    kw.setdefault("token_iterations", 1)
    kw.setdefault("null_text_iterations", 1)
    return call_node("AttnEditDynamicPromptLearn", model=kw.pop("model", tiny.model), clip=tiny.clip,
                     source_prompt=SRC, nouns="cat, dog", steps=steps, cfg=7.5, latent=lat or latent(), **kw)


def fifty_step_thresholds(t: float):
    return (0.3 * math.exp(-t / 25), 0.9 * math.exp(-t / 25), 0.7 * math.exp(-t / 50))


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_every_stage_runs_on_every_step_with_the_schedule_defined_at_50_steps(tiny, steps):
    model, calls = recording(tiny.model)
    inv = dpl(tiny, steps, model=model)[0]
    assert inv.steps == steps
    logs = inv.extras["dpl"]
    # token stage: one evaluation + update at every step (the thresholds are never met by the untrained rows here)
    assert logs["token_iterations"][0] == [1] * steps
    # the DPL pass (the run after the DDIM inversion) makes, at every step i, a cond-only pass with gradients (the
    # token losses) and an uncond-only pass with gradients (null-text), nothing at other step indices
    runs = list(dict.fromkeys(c[0] for c in calls))
    assert len(runs) == 2
    ddim = [c for c in calls if c[0] == runs[0]]
    passes = [c for c in calls if c[0] == runs[1]]
    assert len(ddim) == steps and not any(c[3] for c in ddim)  # DDIM inversion: one pass per step, no gradients
    token = [c[1] for c in passes if c[2] == (0,) and c[3]]
    null = [c[1] for c in passes if c[2] == (1,) and c[3]]
    assert token == list(range(steps)) and null == list(range(steps))
    assert logs["null_text_iterations"] == [steps]
    # the stop test of step i compared against Eq. 10 at t = 50 i / steps (the schedule is defined at 50 steps)
    assert logs["thresholds"][0] == [pytest.approx(fifty_step_thresholds(i * 50 / steps), rel=1e-12)
                                     for i in range(steps)]


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_eq10_thresholds_at_t_equal_50_i_over_steps(steps):
    for i in range(steps):
        th = L.thresholds(i, steps)
        assert (th.at, th.dj, th.bg) == pytest.approx(fifty_step_thresholds(i * 50 / steps), rel=1e-12)
    first = L.thresholds(0, steps)
    assert (first.at, first.dj, first.bg) == (0.3, 0.9, 0.7)  # the first (noisiest) step is the loosest: beta
    if 50 % steps == 0:  # a step of a shorter run is the 50-step run's step at the same fraction
        k = 50 // steps
        assert all(L.thresholds(i, steps) == L.thresholds(i * k, 50) for i in range(steps))
    last = L.thresholds(steps - 1, steps)
    assert last.at == pytest.approx(0.3 * math.exp(-(50 - 50 / steps) / 25), rel=1e-12)


@pytest.mark.parametrize("hw, grid, grid2", [((14, 18), (4, 5), (7, 9)), ((16, 24), (4, 6), (8, 12)),
                                              ((18, 14), (5, 4), (9, 7))])
def test_odd_and_non_square_latents_with_the_estimated_background(tiny, hw, grid, grid2):
    h, w = hw
    inv, store, mask, recon, _ = dpl(tiny, 3, lat=latent(h, w), token_iterations=2)
    assert inv.latent_hw == hw and recon["samples"].shape == (1, 4, h, w)
    assert inv.extras["dpl"]["background"][0].shape == grid  # the loss grid, ceil-halved: 14x18 -> 7x9 -> 4x5
    assert inv.extras["dpl"]["estimated_background"][0].shape == grid2
    n = grid2[0] * grid2[1]
    assert store.cross[4].shape == (1, *grid, 77) and store.self_maps[2].shape == (1, n, n)
    assert mask.shape == (1, h * 8, w * 8)
    assert torch.isfinite(inv.cond).all() and torch.isfinite(inv.uncond).all()
    assert len(inv.extras["dpl"]["token_iterations"][0]) == 3
