"""InstDiffEdit: the blended denoising maths (Eq. 1, 4, 5), the node on the tiny model and the tiny 9-channel
inpainting model (CPU, 16x16 latents, 4 steps)."""

import pytest
import tiny_models
import torch
from conftest import call_node, make_image, pkg

TEXT = "a photo of a dog on grass"
STEPS = 4  # mask phase int(4 * 0.5) = 2 steps, finish 4 steps


def engine():
    return pkg("inversion.instant")


@pytest.fixture(scope="module")
def inpaint_model():
    with torch.inference_mode():
        return tiny_models.make_inpaint_model()


def run(tiny, image=None, **kw):
    image = make_image(size=128) if image is None else image
    return call_node("AttnEditInstantEdit", image=image, model=tiny.model, clip=tiny.clip, vae=tiny.vae,
                     edit_text=TEXT, steps=STEPS, **kw)


def count_unet_calls(model, log):
    """A clone whose every UNet call appends its batch size to `log` (our sampler chains this wrapper)."""
    clone = model.clone()

    def counting(apply_model, args):
        log.append(int(args["input"].shape[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(counting)
    return clone


# ------------------------------------------------------------------------------------------------ maths
def test_eq5_loop_with_full_and_empty_masks():
    sigmas = torch.tensor([3.0, 1.5, 0.5, 0.0])
    x0 = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    target = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    denoise = lambda x, s: target.expand_as(x) + 0.1 * s * x  # noqa: E731  any denoiser
    full, _ = engine().masked_denoise(denoise, x0, noise, sigmas, lambda i: torch.ones(1, 1, 6, 6))
    ddim = pkg("inversion.ddim")
    plain = ddim.sample(denoise, x0 + 3.0 * noise, sigmas)
    assert torch.equal(full, plain), "M = 1 everywhere is plain DDIM from the SDEdit start (Eq. 1)"
    empty, _ = engine().masked_denoise(denoise, x0, noise, sigmas, lambda i: torch.zeros(1, 1, 6, 6))
    assert torch.equal(empty, x0.expand(2, -1, -1, -1)), "M = 0 keeps the original: y_0 = x_0"
    half = torch.zeros(1, 1, 6, 6)
    half[..., :3] = 1
    mixed, _ = engine().masked_denoise(denoise, x0, noise, sigmas, lambda i: half)
    assert torch.equal(mixed[..., :3], plain[..., :3]) and torch.equal(mixed[..., 3:], x0.expand(2, -1, -1, -1)[..., 3:])


def test_blend_step_by_hand():
    x = torch.tensor([[[[2.0, 4.0]]]])
    denoised = torch.tensor([[[[1.0, 1.0]]]])
    noise = torch.tensor([[[[0.5, -0.5]]]])
    mask = torch.tensor([[[[1.0, 0.0]]]])
    calls = []

    def denoise(z, s):
        calls.append((z.clone(), s))
        return denoised

    x0 = torch.tensor([[[[1.0, 5.0]]]])  # x0 + sigma_0 * noise == x at sigma_0 = 2
    out, _ = engine().masked_denoise(denoise, x0, noise, torch.tensor([2.0, 1.0]), lambda i: mask)
    assert torch.equal(calls[0][0], x) and calls[0][1] == 2.0
    # inside: DDIM x_next = d + (x - d) / 2 * 1 = 1.5 ; outside: y = x0 + 1 * noise = 5 - 0.5
    assert torch.equal(out, torch.tensor([[[[1.5, 4.5]]]]))
    assert engine().steps_for(50, 0.5) == 25 and engine().steps_for(50, 1.0) == 50
    with pytest.raises(ValueError, match="leaves no denoising step"):
        engine().steps_for(4, 0.1)


def test_inpaint_inputs_follow_core_inpaint_model_conditioning():
    image = torch.full((1, 4, 4, 3), 0.9)
    mask = torch.zeros(1, 4, 4)
    mask[:, :2] = 1
    pixels = engine().inpaint_pixels(image, mask)
    assert torch.all(pixels[:, :2] == 0.5) and torch.all(pixels[:, 2:] == 0.9)
    cond = [[torch.zeros(1, 77, 8), {"pooled_output": None}]]
    out = engine().with_inpaint_inputs(cond, torch.ones(1, 4, 1, 1), mask)
    assert out[0][1]["concat_mask"] is mask and "concat_mask" not in cond[0][1]


# ------------------------------------------------------------------------------------------------ node
def test_inpainting_finish_keeps_the_input_outside_the_final_mask(tiny, inpaint_model):
    base_log, inpaint_log = [], []
    image = make_image(size=128, seed=3)
    out, mask, latent = call_node(
        "AttnEditInstantEdit", image=image, model=count_unet_calls(tiny.model, base_log), clip=tiny.clip,
        vae=tiny.vae, edit_text=TEXT, steps=STEPS, inpaint_model=count_unet_calls(inpaint_model, inpaint_log),
        paste_back=True, phi=0.5)
    assert out.shape == (1, 128, 128, 3) and mask.shape == (1, 128, 128) and latent["samples"].shape == (1, 4, 16, 16)
    assert 0 < float(mask.mean()) < 1, "the test needs a mask with an inside and an outside"
    # UNet passes: the mask phase runs int(S * r) batched calls of 2n rows, the finish int(S * d) calls of 2 rows
    assert base_log == [6, 6] and inpaint_log == [2] * STEPS
    with torch.inference_mode(), engine().seeded(0):  # the node encodes under its seed (hosts whose VAE samples)
        x0 = pkg("inversion.comfy_model").vae_encode(tiny.vae, image).float()
    outside = pkg("masks.ops").mask_to_grid(1 - mask, (16, 16), binary=True).bool().expand(-1, 4, -1, -1)
    assert torch.allclose(latent["samples"][outside], x0[outside], atol=1e-5), "latent outside = the input's latent"
    assert not torch.allclose(latent["samples"][~outside], x0[~outside], atol=1e-3)
    keep = (mask == 0)[..., None].expand_as(out)
    assert torch.equal(out[keep], image[keep]), "paste_back: pixels outside the mask are the input's"


def test_masks_are_deterministic_and_n_1_works(tiny):
    a = run(tiny, finish="blend only", seeds=1, seed=7)
    b = run(tiny, finish="blend only", seeds=1, seed=7)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert a[0].shape == (1, 128, 128, 3)


def test_seed_average_of_identical_rows_equals_one_row(tiny):
    """n rows with the same noise average to the single row's attention: same mask, same trajectory."""
    eng, cm = engine(), pkg("inversion.comfy_model")
    with torch.inference_mode():
        latent = cm.vae_encode(tiny.vae, make_image(size=128)).float()
        pos, neg = cm.encode_text(tiny.clip, TEXT), cm.encode_text(tiny.clip, "")
        words = [p for p, _ in pkg("attention.tokens").tokenize_prompt(tiny.clip, TEXT).word_groups()]
        sigmas = pkg("inversion.schedule").ddim_sigmas(cm.sigma_table(tiny.model), STEPS)
        settings = eng.InstantSettings(steps=STEPS, seeds=1)
        noise = eng.make_noise(3, 1, (4, 16, 16))
        one = eng.mask_phase(tiny.model, pos, neg, latent, sigmas, noise, words, settings)
        three = eng.mask_phase(tiny.model, pos, neg, latent, sigmas, noise.repeat(3, 1, 1, 1), words, settings)
    assert torch.equal(one[1], three[1]) and torch.equal(one[3].roles, three[3].roles)
    assert torch.allclose(three[0], one[0].expand(3, -1, -1, -1), atol=1e-4)
    assert torch.allclose(one[2], three[2], atol=1e-4)


def test_sizes_that_are_not_multiples_of_64_work(tiny):
    image = make_image(size=92)[:, 2:78]  # 76x92 px -> cropped to 72x88 -> latent 9x11, attention 3x3
    out, mask, latent = run(tiny, image, finish="inpaint", seeds=1, finish_denoise=0.5)
    assert out.shape == (1, 72, 88, 3) and mask.shape == (1, 72, 88) and latent["samples"].shape == (1, 4, 9, 11)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("inputs, message", [
    ({"edit_text": " "}, "`edit_text` is empty"),
    ({"strength": 0.1}, "`strength` 0.1 with 4 steps leaves no denoising step"),
    ({"finish": "nope"}, "`finish` 'nope' is unknown"),
])
def test_errors_are_actionable(tiny, inputs, message):
    args = dict(image=make_image(size=64), model=tiny.model, clip=tiny.clip, vae=tiny.vae, edit_text=TEXT,
                steps=STEPS)
    args.update(inputs)
    with pytest.raises(ValueError, match=r"\[Attention Edit\] InstDiffEdit: " + message):
        call_node("AttnEditInstantEdit", **args)
