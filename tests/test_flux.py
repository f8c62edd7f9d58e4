"""Flux (milestone 1 of "Beyond UNets"): the tiny Flux from ComfyUI 0.3.x's own classes, flow inversion (Euler and
RF-Solver) in Invert Image, the edit sampler's source branch on it, and the refusals around it.

Exact-maths tests patch the tiny Flux's diffusion model with a stand-in velocity (tiny_families.flow_patch), so the
host's CONST parameterisation, the guidance conditioning and the latent format still run unchanged."""

import types

import pytest
import tiny_families
import torch
from conftest import HOST, call_node, make_image, pkg
from joint_checks import error_of

NEWER = "Flux exists only in ComfyUI 0.3.x"
SRC = "a photo of a cat"
FLOW_METHODS = ("flow_euler", "rf_solver")


def flux_latent(seed: int = 3, size: int = 16):
    return {"samples": torch.randn(1, 16, size, size, generator=torch.Generator().manual_seed(seed))}




@pytest.fixture(scope="module")
def flux():
    return tiny_families.make_flux(0)


def invert(model, clip, method, steps=4, **inputs):
    inputs.setdefault("latent", flux_latent())
    return call_node("AttnEditInvert", model=model, clip=clip, source_prompt=SRC, method=method, steps=steps, cfg=1.0,
                     **inputs)


def model_space(model, raw):
    return model.model.process_latent_in(raw)


# ----------------------------------------------------------------------------------------------- the tiny Flux
@pytest.mark.newer_host(NEWER)
def test_tiny_flux_is_comfyuis_flux(flux):
    import comfy.model_base
    import tiny_models

    model, clip = flux
    cm = pkg("inversion.comfy_model")
    assert isinstance(model.model, comfy.model_base.Flux)
    assert cm.model_family(model) == "flux" and cm.sampler_maths(model) == "flow" and cm.guidance_embedded(model)
    cond = cm.encode_text(clip, SRC)
    assert cond[0][0].shape == (1, 256, tiny_families.FLUX_T5_DIM)  # T5: padded to 256 tokens
    assert cond[0][1]["pooled_output"].shape == (1, tiny_families.FLUX_L_DIM)  # clip_l pooled vector
    loaded = tiny_models.AttnEditTestTinyCheckpoint().load("tiny-flux")
    assert cm.model_family(loaded[0]) == "flux" and loaded[2].latent_channels == 16


def test_tiny_flux_checkpoint_needs_the_newer_host():
    """On ComfyUI 2024-03 a "flux" placeholder is refused by name; on 0.3.x it loads."""
    import tiny_models

    if HOST.is_new:
        assert pkg("inversion.comfy_model").is_flow(tiny_models.AttnEditTestTinyCheckpoint().load("flux")[0])
    else:
        with pytest.raises(RuntimeError, match="no Flux classes: the tiny Flux needs ComfyUI 0.3.x"):
            tiny_models.AttnEditTestTinyCheckpoint().load("flux")


# ----------------------------------------------------------------------------------------------- exact maths
@pytest.mark.newer_host(NEWER)
@pytest.mark.parametrize("method", FLOW_METHODS)
def test_roundtrip_is_exact_with_a_constant_velocity(flux, method):
    model, clip = flux
    v = torch.randn(1, 16, 1, 1, generator=torch.Generator().manual_seed(1))
    const = tiny_families.constant_velocity_patch(model, v)
    latent = flux_latent()
    inv, _noise, sigmas, recon, _psnr, _store = invert(const, clip, method, steps=5, latent=latent)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0 and len(sigmas) == 6
    assert torch.allclose(recon["samples"], latent["samples"], atol=1e-5), float(
        (recon["samples"] - latent["samples"]).abs().max())
    x0 = model_space(model, latent["samples"])
    for i, sigma in enumerate(sigmas.tolist()):  # x_sigma = x0 + sigma * v solves the ODE exactly
        assert torch.allclose(inv.latents[i, 0], x0[0] + sigma * v[0], atol=1e-5), i
    _edited, source, _ = call_node("AttnEditEditSampler", model=const, inversion=inv, target=inv.source)
    assert torch.allclose(source["samples"], latent["samples"], atol=1e-5)


def _linear_velocity(a=0.3, b=0.7, c=0.05):
    """v = a x + b t + c g: depends on the input, on the timestep the model is told and on the guidance embedding."""
    def velocity(x, t, g):
        return a * x + b * t.view(-1, 1, 1, 1).to(x) + c * g.view(-1, 1, 1, 1).to(x)
    return velocity


@pytest.mark.newer_host(NEWER)
def test_euler_and_rf_solver_inversion_steps_by_hand(flux):
    """The first two inversion steps against the formulas, with an input-, sigma- and guidance-dependent velocity:
    Euler x' = x + (s' - s) v(x, s); RF-Solver x' = x + h v + h^2/2 (v(x + h/2 v, s + h/2) - v) / (h/2)."""
    model, clip = flux
    velocity = _linear_velocity()
    patched = tiny_families.flow_patch(model, velocity)
    latent = flux_latent(seed=4)
    g = torch.tensor([2.0])
    v = lambda x, s: velocity(x, torch.tensor([s]), g)  # noqa: E731
    for method in FLOW_METHODS:
        inv, _n, sigmas, _r, _p, _s = invert(patched, clip, method, steps=3, latent=latent, guidance=2.0)
        x = model_space(model, latent["samples"])  # the inversion starts at the latent in model space (rescaled)
        for j in range(2):
            s, s_next = float(sigmas[3 - j]), float(sigmas[2 - j])
            h = s_next - s
            if method == "flow_euler":
                x = x + h * v(x, s)
            else:
                d = (v(x + h / 2 * v(x, s), s + h / 2) - v(x, s)) / (h / 2)
                x = x + h * v(x, s) + 0.5 * h**2 * d
            assert torch.allclose(inv.latents[2 - j, 0], x[0], atol=1e-5, rtol=1e-5), (method, j)
        assert float(sigmas[-2]) > 0 and float(sigmas[-1]) == 0  # step 0 evaluates v at sigma = 0 exactly


@pytest.mark.newer_host(NEWER)
@pytest.mark.parametrize("method", FLOW_METHODS)
def test_source_branch_pinned_is_bit_exact_and_reconstruct_uses_the_solver(flux, method):
    model, clip = flux
    patched = tiny_families.flow_patch(model, _linear_velocity())
    inv, _n, _s, recon, _p, _st = invert(patched, clip, method, steps=4, guidance=2.0)
    cm = pkg("inversion.comfy_model")
    edited, source, _ = call_node("AttnEditEditSampler", model=patched, inversion=inv, target=inv.source,
                                  source_branch="pin to inversion")
    assert torch.equal(source["samples"], cm.latent_to_raw(patched, inv.latents[-1]))
    # the target prompt carries no guidance: the branch batch gets the inversion's (2.0), not Flux's default 3.5
    target = cm.encode_text(clip, SRC)
    _e, rebuilt, _ = call_node("AttnEditEditSampler", model=patched, inversion=inv, target=target)
    assert torch.allclose(rebuilt["samples"], recon["samples"], atol=1e-5)
    other = invert(patched, clip, FLOW_METHODS[1 - FLOW_METHODS.index(method)], steps=4, guidance=2.0)[3]
    assert float((other["samples"] - recon["samples"]).abs().max()) > 1e-3  # the solver matters


@pytest.mark.newer_host(NEWER)
@pytest.mark.parametrize("method", FLOW_METHODS)
def test_reconstruction_on_the_random_tiny_flux_is_finite_with_psnr(flux, method):
    model, clip = flux
    vae = tiny_families.make_flux_vae(2)
    inv, noise, _s, recon, psnr, _st = invert(model, clip, method, steps=3, latent=None, image=make_image(64), vae=vae)
    assert torch.isfinite(recon["samples"]).all() and torch.isfinite(noise["samples"]).all()
    assert isinstance(psnr, float) and 0 < psnr < 100 and inv.psnr == (pytest.approx(psnr),)
    assert inv.method == method and inv.latents.shape == (4, 1, 16, 8, 8)


@pytest.mark.newer_host(NEWER)
def test_no_state_leaks_into_the_next_run(flux):
    model, clip = flux
    keys = pkg("attention.keys")
    options_before = repr(model.model_options)
    first = invert(model, clip, "rf_solver", steps=3)
    second = invert(model, clip, "rf_solver", steps=3)
    assert torch.equal(first[0].latents, second[0].latents) and torch.equal(first[3]["samples"], second[3]["samples"])
    assert repr(model.model_options) == options_before and keys.VELOCITY not in repr(model.model_options)
    ed1 = call_node("AttnEditEditSampler", model=model, inversion=first[0], target=first[0].source)
    ed2 = call_node("AttnEditEditSampler", model=model, inversion=first[0], target=first[0].source)
    assert torch.equal(ed1[0]["samples"], ed2[0]["samples"])


@pytest.mark.newer_host(NEWER)
def test_velocity_reads_are_exact_at_sigma_zero_and_refuse_partial_labels(flux):
    """ComfyDenoiser(velocity=True) returns the raw model output even at sigma 0 (denoised = x there), and cannot be
    combined with a partial-chunk `labels` read; the run's knobs are reset afterwards."""
    model, clip = flux
    cm, run_mod = pkg("inversion.comfy_model"), pkg("attention.run")
    patched = tiny_families.flow_patch(model, _linear_velocity())
    cond = cm.with_guidance(patched, cm.encode_text(clip, SRC), 2.0)
    sigmas = torch.tensor([1.0, 0.0])
    run = run_mod.RunState(sigmas, ("source",))

    def algorithm(den, x):
        v0, d0 = den(x, 0.0, velocity=True), den(x, 0.0)
        with pytest.raises(ValueError, match="`labels` cannot be combined"):
            den(x, 0.0, labels=frozenset({0}), velocity=True)
        return v0, d0, x, run.velocity

    v0, d0, x, flag = cm.run_sampler(patched, cond, cond, flux_latent()["samples"], sigmas, 1.0, algorithm, run)
    assert torch.allclose(v0, 0.3 * x + 0.05 * 2.0) and torch.equal(d0, x) and flag is False


# ----------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.newer_host(NEWER)
def test_flux_with_an_sd_clip_is_refused(flux, tiny):
    model, _clip = flux
    message = error_of("AttnEditInvert", model=model, clip=tiny.clip, source_prompt=SRC, method="flow_euler",
                       steps=3, cfg=1.0, latent=flux_latent())
    assert "width 32" in message and "this Flux MODEL takes text embeddings of width 48" in message, message
    assert "connect the CLIP of the same checkpoint" in message


@pytest.mark.newer_host(NEWER)
@pytest.mark.parametrize("method", ["ddim", "null_text", "direct", "negative_prompt", "ddim_null_prompt"])
def test_ddim_methods_are_refused_on_flux(flux, method):
    model, clip = flux
    message = error_of("AttnEditInvert", model=model, clip=clip, source_prompt=SRC, method=method, steps=3, cfg=1.0,
                       latent=flux_latent())
    assert f"`method` {method!r} does not apply to this Flux MODEL" in message, message
    assert "'flow_euler'" in message and "'rf_solver'" in message


def test_flow_methods_are_refused_on_a_unet(tiny):
    for method in FLOW_METHODS:
        message = error_of("AttnEditInvert", model=tiny.model, clip=tiny.clip, source_prompt=SRC, method=method,
                           steps=3, cfg=7.5, latent={"samples": torch.zeros(1, 4, 8, 8)})
        assert f"`method` {method!r} inverts rectified-flow models (Flux); this SD1.x MODEL" in message, message
        assert "ddim, null_text" in message


class AuraFlow:  # a config class of a non-UNet family the pack does not handle at all (SD3 is handled since sd3)
    pass


@pytest.mark.parametrize("node_id", ["AttnEditInvert", "AttnEditEditSampler"])
def test_a_non_unet_non_flux_model_is_refused_clearly(tiny, node_id):
    """On both hosts (the 2024 host included): Invert and the edit sampler accept SD UNets, Flux and SD3 only."""
    fake = types.SimpleNamespace(model=types.SimpleNamespace(model_config=AuraFlow(), diffusion_model=torch.nn.Linear(1, 1)))
    inputs = {"AttnEditInvert": dict(clip=tiny.clip, source_prompt=SRC, method="ddim", steps=3, cfg=7.5,
                                     latent={"samples": torch.zeros(1, 4, 8, 8)}),
              "AttnEditEditSampler": dict(inversion=None)}[node_id]
    message = error_of(node_id, model=fake, **inputs)
    assert ("supports SD1.x, SD2.x, SDXL UNet models and Flux, SD3 / SD3.5 (ComfyUI 0.3.x); the connected MODEL is "
            "AuraFlow") in message


# ----------------------------------------------------------------------------------------------- pure flow maths
def test_flow_steps_invert_and_sample_by_hand():
    """inversion/flow.py without a model (both hosts): the step formulas on a nonlinear field, the order in which
    invert / sample walk the schedule and the latents' alignment with the sigmas."""
    flow = pkg("inversion.flow")
    calls = []

    def velocity(x, s):
        calls.append(s)
        return torch.sin(x) + s * x

    x = torch.tensor([0.3, -1.2, 2.0])
    h = 0.25
    x_e, v_e = flow.euler_step(velocity, x, 0.5, 0.75)
    assert torch.allclose(x_e, x + h * (torch.sin(x) + 0.5 * x)) and torch.equal(v_e, torch.sin(x) + 0.5 * x)
    x_r, _ = flow.rf_solver_step(velocity, x, 0.5, 0.75)
    v0 = torch.sin(x) + 0.5 * x
    x_mid = x + h / 2 * v0
    v_mid = torch.sin(x_mid) + 0.625 * x_mid
    assert torch.allclose(x_r, x + h * v0 + 0.5 * h**2 * (v_mid - v0) / (h / 2))
    assert calls == [0.5, 0.5, 0.625]
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    calls.clear()
    latents = flow.invert(velocity, x, sigmas, flow.euler_step)
    assert calls == [0.0, pytest.approx(0.2), pytest.approx(0.6)] and torch.equal(latents[3], x)
    assert torch.allclose(latents[2], x + 0.2 * torch.sin(x))  # v(x, 0) = sin(x)
    calls.clear()
    seen = []
    flow.sample(velocity, latents[0], sigmas, flow.rf_solver_step, on_step=lambda i, xn, d: seen.append((i, xn, d)))
    assert calls[::2] == [1.0, pytest.approx(0.6), pytest.approx(0.2)]
    # the step's x0 estimate (previews, step hooks): x - sigma * v at the step's start, as ComfyUI's CONST
    assert [i for i, _, _ in seen] == [0, 1, 2]
    assert torch.allclose(seen[0][2], latents[0] - 1.0 * velocity(latents[0], 1.0))
    assert torch.allclose(flow.denoised_from_velocity(x, torch.ones(3), 0.4), x - 0.4)
    with pytest.raises(ValueError, match="flow method 'heun' is unknown"):
        flow.solver_of("heun")


def test_flow_sigmas_are_comfyuis_simple_scheduler(tiny):
    import comfy.samplers

    schedule = pkg("inversion.schedule")
    sampling = tiny.model.model.model_sampling
    # the 2024 host's simple_scheduler takes the model (reads .model_sampling), 0.3.x's the model sampling
    arg = types.SimpleNamespace(model_sampling=sampling, sigmas=sampling.sigmas)
    for steps in (1, 3, 7, 28):
        assert torch.equal(schedule.flow_sigmas(sampling.sigmas, steps), comfy.samplers.simple_scheduler(arg, steps))


@pytest.mark.newer_host(NEWER)
def test_flux_schedule_is_the_simple_scheduler_of_its_model_sampling(flux):
    import comfy.samplers

    model, clip = flux
    sigmas = invert(model, clip, "flow_euler", steps=5)[2]
    assert torch.equal(sigmas, comfy.samplers.simple_scheduler(model.get_model_object("model_sampling"), 5))


@pytest.mark.newer_host(NEWER)
def test_capture_self_attention_on_flux_is_warned(flux, caplog):
    """Invert Image's capture_self_attention keeps UNet self-attention maps; on Flux it is named in a warning (the
    guidance knob, read by Flux-dev, is not)."""
    import logging

    model, clip = flux
    with caplog.at_level(logging.WARNING):
        invert(model, clip, "flow_euler", steps=2, capture_self_attention=True, guidance=5.0)
    assert "`capture_self_attention` keeps UNet self-attention maps" in caplog.text
    assert "`guidance`" not in caplog.text
