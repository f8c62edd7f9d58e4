"""SDXL and SD2.x (v-prediction) on the core paths: family awareness, text side, exact maths, parity."""

import pytest
import tiny_families
import torch
from conftest import call_node, make_latent, pkg


@pytest.fixture(scope="module")
def sdxl():
    return tiny_families.make_sdxl(0)


@pytest.fixture(scope="module")
def sd2v():
    return tiny_families.make_sd2v(0)


@pytest.fixture(params=["sdxl", "sd2v"])
def family(request, sdxl, sd2v):
    return request.param, {"sdxl": sdxl, "sd2v": sd2v}[request.param]


def test_family_and_sites_come_from_the_model(sdxl, sd2v):
    cm, hooks = pkg("inversion.comfy_model"), pkg("attention.hooks")
    assert cm.model_family(sdxl[0]) == "sdxl" and cm.model_family(sd2v[0]) == "sd2"
    sites = hooks.unet_sites(sdxl[0])
    depths = {(s.level, s.depth) for s in sites}
    assert {(2, 0), (2, 1), (4, 0), (4, 1), (4, 2)} <= depths and all(s.level in (2, 4) for s in sites)
    assert {s.level for s in hooks.unet_sites(sd2v[0])} == {1, 2, 4, 8}


def test_prompt_tokens_on_two_encoders_and_openclip(sdxl, sd2v):
    tokens = pkg("attention.tokens")
    for clip in (sdxl[1], sd2v[1]):
        p = tokens.tokenize_prompt(clip, "a photo of a grimalkin")
        assert p.find(tokens.word_token_ids(clip, "grimalkin"), "grimalkin") == [5, 6, 7]
        assert p.word_ids[8] == 0  # EOT; SD2/clip_g pad with token 0, which must not read as a word
        assert all(w == 0 for w in p.word_ids[9:77])


@pytest.mark.parametrize("method", ["ddim", "null_text", "direct", "negative_prompt"])
def test_roundtrip_is_exact_for_eps_and_v_prediction(family, method):
    _name, (model, clip) = family
    eps = torch.randn(1, 4, 1, 1, generator=torch.Generator().manual_seed(1))
    const = tiny_families.constant_eps_patch(model, eps)
    latent = make_latent(size=16, seed=3)
    inv, _noise, sigmas, recon, _psnr, _store = call_node(
        "AttnEditInvert", model=const, clip=clip, source_prompt="a photo of a cat", method=method, steps=8, cfg=7.5,
        latent=latent, inner_steps=2)
    assert torch.allclose(recon["samples"], latent["samples"], atol=1e-4), float(
        (recon["samples"] - latent["samples"]).abs().max())
    scale = model.model.latent_format.scale_factor
    assert torch.allclose(inv.latents[0, 0], latent["samples"][0] * scale + float(sigmas[0]) * eps[0], atol=1e-3)


def test_p2p_identity_and_null_text_on_real_tiny_models(family):
    _name, (model, clip) = family
    latent = make_latent(size=16, seed=5)
    errors = {}
    for method in ("ddim", "null_text"):
        inv, _n, _s, recon, _p, _st = call_node("AttnEditInvert", model=model, clip=clip,
                                                source_prompt="a photo of a cat", method=method, steps=6, cfg=7.5,
                                                latent=latent, inner_steps=3)
        errors[method] = float(((recon["samples"] - latent["samples"]) ** 2).mean())
    assert errors["null_text"] < errors["ddim"], errors
    hooked, _ = call_node("AttnEditAttentionHook", model=model, clip=clip, source_prompt="a photo of a cat",
                          target_prompt="a photo of a cat", mode="replace", cross_replace=0.8, self_replace=0.5)
    edited, source, store = call_node("AttnEditEditSampler", model=hooked, inversion=inv)
    assert float((edited["samples"] - source["samples"]).abs().max()) <= 1e-5
    assert store.cross[4].shape[:3] == (2, 4, 4)  # level 4 of a 16x16 latent
