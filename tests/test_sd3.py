"""SD3 / SD3.5 (the second MMDiT family of "Beyond UNets"): the tiny SD3 from ComfyUI 0.3.x's own classes (MMDiT
with RMS QK-norm, tiny clip_l + clip_g, no T5), flow inversion, the edit sampler, Prompt-to-Prompt on its joint
attention (CLIP word positions, self injection in every joint block), local blend, CPAM's background preservation,
and the invariants of the UNet and Flux families. Everything here needs ComfyUI 0.3.x (newer_host)."""

import pytest
import tiny_families
import torch
from conftest import HOST, call_node, pkg

NEWER = "SD3 exists only in ComfyUI 0.3.x"
SRC, TGT = "a photo of a cat", "a photo of a dog"
FLOW_METHODS = ("flow_euler", "rf_solver")
BLEND = 0.97  # local-blend threshold for the tiny model's flat maps (as for the tiny Flux)


def sd3_latent(seed: int = 3, size: int = 16):
    return {"samples": torch.randn(1, 16, size, size, generator=torch.Generator().manual_seed(seed))}


def error_of(node_id, **inputs):
    with pytest.raises(ValueError) as info:
        call_node(node_id, **inputs)
    message = str(info.value)
    assert message.startswith("[Attention Edit] ") and "\n" not in message.strip(), message
    return message


@pytest.fixture(scope="module")
def sd3():
    return tiny_families.make_sd3(0)


def invert(model, clip, method="flow_euler", steps=4, prompt=SRC, cfg=1.0, **inputs):
    inputs.setdefault("latent", sd3_latent())
    return call_node("AttnEditInvert", model=model, clip=clip, source_prompt=prompt, method=method, steps=steps,
                     cfg=cfg, **inputs)


def hook(model, clip, source=SRC, target=TGT, mode="replace", cross=0.8, self_=0.4, **inputs):
    return call_node("AttnEditAttentionHook", model=model, clip=clip, source_prompt=source, target_prompt=target,
                     mode=mode, cross_replace=cross, self_replace=self_, **inputs)


def edit(model, inv, **inputs):
    inputs.setdefault("target", None)
    return call_node("AttnEditEditSampler", model=model, inversion=inv, **inputs)


# ----------------------------------------------------------------------------------------------- the tiny SD3
@pytest.mark.newer_host(NEWER)
def test_tiny_sd3_is_comfyuis_sd3(sd3):
    import comfy.model_base
    import comfy.supported_models
    import tiny_models
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper

    model, clip = sd3
    cm, hooks = pkg("inversion.comfy_model"), pkg("attention.hooks")
    assert isinstance(model.model, comfy.model_base.SD3)
    assert isinstance(model.model.model_config, comfy.supported_models.SD3)
    assert isinstance(model.model.diffusion_model, OpenAISignatureMMDITWrapper)
    assert cm.model_family(model) == "sd3" and cm.sampler_maths(model) == "flow"
    assert not cm.guidance_embedded(model) and cm.context_width(model) == 4096
    assert [s.key for s in hooks.joint_sites(model)] == [("double", 0, 0), ("double", 1, 0)]
    assert hooks.is_joint(model) and not hooks.flux_sites(model)
    cond = cm.encode_text(clip, SRC)
    assert cond[0][0].shape == (1, 77, 4096)  # clip_l + clip_g padded to 4096 (no T5 part)
    assert cond[0][1]["pooled_output"].shape == (1, tiny_families.L_DIM + tiny_families.G_DIM)
    loaded = tiny_models.AttnEditTestTinyCheckpoint().load("tiny-sd3")
    assert cm.model_family(loaded[0]) == "sd3" and loaded[2].latent_channels == 16


def test_tiny_sd3_checkpoint_needs_the_newer_host():
    """On ComfyUI 2024-03 an "sd3" placeholder is refused by name; on 0.3.x it loads."""
    import tiny_models

    if HOST.is_new:
        assert pkg("inversion.comfy_model").is_flow(tiny_models.AttnEditTestTinyCheckpoint().load("sd3")[0])
    else:
        with pytest.raises(RuntimeError, match="no SD3 classes: the tiny SD3 needs ComfyUI 0.3.x"):
            tiny_models.AttnEditTestTinyCheckpoint().load("sd3")


# ----------------------------------------------------------------------------------------------- exact flow maths
@pytest.mark.newer_host(NEWER)
@pytest.mark.parametrize("method", FLOW_METHODS)
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_roundtrip_is_exact_with_a_constant_velocity(sd3, method, cfg):
    """x_sigma = x0 + sigma v solves the flow ODE for a constant v, so inversion and reconstruction are exact, also
    with real CFG (cond and uncond chunks give the same v: the CFG mix is v); the velocity at sigma 0 is read through
    the MMDiT forward tap (MMDiT runs no DIFFUSION_MODEL wrappers)."""
    model, clip = sd3
    v = torch.randn(1, 16, 1, 1, generator=torch.Generator().manual_seed(1))
    const = tiny_families.sd3_constant_velocity_patch(model, v)
    latent = sd3_latent()
    inv, _noise, sigmas, recon, _psnr, _store = invert(const, clip, method, steps=5, latent=latent, cfg=cfg)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0 and len(sigmas) == 6
    assert torch.allclose(recon["samples"], latent["samples"], atol=1e-5), float(
        (recon["samples"] - latent["samples"]).abs().max())
    x0 = model.model.process_latent_in(latent["samples"])
    for i, sigma in enumerate(sigmas.tolist()):
        assert torch.allclose(inv.latents[i, 0], x0[0] + sigma * v[0], atol=1e-5), i
    _edited, source, _ = edit(const, inv, target=inv.source)
    assert torch.allclose(source["samples"], latent["samples"], atol=1e-5)
