"""InstDiffEdit: the blended denoising maths (Eq. 1, 4, 5), the node on the tiny model and the tiny 9-channel
inpainting model (CPU, 16x16 latents, 4 steps)."""

import pytest
import tiny_models
import torch
import torch.nn.functional as F
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


# ------------------------------------------------------------------------------------------------ instant mask maths
def masks():
    return pkg("masks.instant")


# cv2.GaussianBlur(img, (5, 5), 0) of a 5x6 float image that is 1 at (row 1, col 0) and 0 elsewhere, computed by
# hand: OpenCV's 5-tap table for sigma 0 is [1, 4, 6, 4, 1] / 16 and its default border is BORDER_REFLECT_101
# (..., x2, x1 | x0, x1, x2, ...). Along the rows the impulse at 1 gives [4+4, 1+6, 4, 1, 0] / 16 (position -1 and 1
# both read x1), along the columns the impulse at 0 gives [6, 4, 1, 0, 0, 0] / 16; the blur is their outer product.
CV2_IMPULSE = torch.tensor([[8.0], [7.0], [4.0], [1.0], [0.0]]) * torch.tensor([[6.0, 4.0, 1.0, 0.0, 0.0, 0.0]]) / 256


def test_blur_is_opencv_5x5_sigma_0_table_with_reflect_101_borders():
    impulse = torch.zeros(5, 6)
    impulse[1, 0] = 1.0
    assert torch.equal(masks().blur_kernel(), torch.tensor([1.0, 4, 6, 4, 1])[:, None] * torch.tensor([1.0, 4, 6, 4, 1])
                       / 256)
    once = masks().gaussian_blur(impulse, passes=1)
    assert torch.allclose(once, CV2_IMPULSE, atol=1e-7, rtol=0)
    assert torch.allclose(masks().gaussian_blur(impulse), masks().gaussian_blur(once, passes=1), atol=1e-7)  # twice


def test_binarisation_is_strictly_above_phi():
    """Eq. 9 and the reference post_deal: M = 1 where the normalised map is > phi; a value equal to phi is 0."""
    refined = torch.tensor([[0.0, 0.25], [0.5, 1.0]])
    assert masks().binarize(refined, phi=0.25, blur_passes=0).tolist() == [[0.0, 0.0], [1.0, 1.0]]
    just_below = float(torch.nextafter(torch.tensor(0.25), torch.tensor(0.0)))
    assert masks().binarize(refined, phi=just_below, blur_passes=0).tolist() == [[0.0, 1.0], [1.0, 1.0]]


def test_gamma_thresholds_include_their_boundary():
    """Eq. 8 as the reference get_position: +1 when S >= gamma1, -1 when S <= gamma2, 0 strictly between."""
    per_word = torch.tensor([[[1.0, 0.0], [0.0, 0.0]],   # index word
                             [[1.0, 0.3], [0.0, 0.0]],   # S = 0.958
                             [[1.0, 1.0], [0.2, 0.0]],   # S = 0.700
                             [[0.3, 1.0], [1.0, 0.0]]])  # S = 0.206
    sims = masks().cosine(per_word, per_word[0])
    up = lambda v: float(torch.nextafter(v, torch.tensor(2.0)))  # noqa: E731
    down = lambda v: float(torch.nextafter(v, torch.tensor(-2.0)))  # noqa: E731
    roles = lambda g1, g2: masks().instant_roles(per_word, per_word[0], g1, g2, index=0).roles.tolist()  # noqa: E731
    assert roles(float(sims[1]), float(sims[3])) == [1.0, 1.0, 0.0, -1.0]  # S equal to gamma1 / gamma2
    assert roles(up(sims[1]), down(sims[3])) == [1.0, 0.0, 0.0, 0.0]  # one ulp past: no longer reached
    assert roles(float(sims[2]), 0.0) == [1.0, 1.0, 1.0, 0.0]
    assert roles(0.99, float(sims[2])) == [1.0, 0.0, -1.0, -1.0]


def test_map_resizing_is_pils_bicubic():
    """The reference resizes each map with PIL's Image.resize (bicubic, a = -0.5, renormalised at the borders)."""
    import numpy as np
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for (h, w), (H, W) in [((16, 16), (64, 64)), ((3, 3), (9, 11)), ((16, 24), (64, 96)), ((5, 7), (3, 4))]:
        maps = torch.rand(2, h, w, generator=g)
        ours = masks().upsample(maps, (H, W))
        for k in range(2):
            ref = Image.fromarray(maps[k].numpy(), mode="F").resize((W, H), Image.BICUBIC)
            assert torch.allclose(ours[k], torch.tensor(np.array(ref)), atol=3e-7, rtol=0), (h, w, H, W)
    bilinear = F.interpolate(maps[:, None], size=(3, 4), mode="bilinear", align_corners=False)[:, 0]
    assert not torch.allclose(ours, bilinear, atol=1e-2)  # the test tells the filters apart


def reference_similarity(word: torch.Tensor, index: torch.Tensor) -> float:
    """S of Eq. 7 as the reference computes it: map -> 255 m / max -> uint8 -> PIL resize to 64x64 -> min-max to
    uint8 -> cosine of the flattened images (token_combination + cal_sim), written independently of the pack."""
    import numpy as np
    from PIL import Image

    def image(m):
        pic = Image.fromarray((255 * m / m.max()).numpy().astype(np.uint8)).resize((64, 64), Image.BICUBIC)
        a = np.asarray(pic).astype(np.float64) / 255
        return ((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8).astype(np.float64).ravel()

    a, b = image(word), image(index)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_a_word_near_gamma2_takes_the_role_the_reference_gives_it():
    """A word whose similarity to the object word is 0.014 under gamma2 = 0.6 in the reference: the reference makes
    it background (-1); the pack agrees. The old bilinear resizing put it at 0.62 (role 0)."""
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    blob = lambda cy, cx, s: torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))  # noqa: E731
    obj = blob(7.0, 6.0, 2.0)
    word = 0.065 * obj + 0.935 * blob(5.16, 5.18, 0.84)
    maps = torch.stack([1.0 - obj, obj, word], -1)  # tokens: start (its complement is the object), object, word
    reference = reference_similarity(word, obj)
    assert abs(reference - masks().GAMMA2) < 0.02 and reference < masks().GAMMA2
    per_word, start = masks().word_maps(maps, [[1], [2]], 0, (64, 64))
    roles = masks().instant_roles(per_word, start)
    assert roles.index == 0 and roles.roles.tolist() == [1.0, -1.0], "the reference's roles: object, background"
    assert abs(float(roles.similarities[1]) - reference) < 0.01  # the float pipeline, without 8-bit rounding
    old = F.interpolate(torch.stack([obj, word])[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    old = masks().minmax(old)
    assert float(masks().cosine(old[1:], old[0])[0]) > masks().GAMMA2  # bilinear maps gave role 0 (the issue)


# ------------------------------------------------------------------------------------------------ node
def test_inpainting_finish_keeps_the_input_outside_the_final_mask(tiny, inpaint_model):
    base_log, inpaint_log = [], []
    image = make_image(size=128, seed=3)
    out, mask, latent = call_node(
        "AttnEditInstantEdit", image=image, model=count_unet_calls(tiny.model, base_log), clip=tiny.clip,
        vae=tiny.vae, edit_text=TEXT, steps=STEPS, inpaint_model=count_unet_calls(inpaint_model, inpaint_log),
        paste_back=True, phi=0.5, feather=0)
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
    assert torch.equal(out[keep], image[keep]), "paste_back with feather 0: pixels outside the mask are the input's"


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


# ------------------------------------------------------------------------------------------------ finish: seams
def test_feather_weights_and_finish_growth_by_hand():
    mask = torch.zeros(1, 5, 9)
    mask[:, 1:4, :3] = 1.0
    w = masks().feather_weights(mask, 2)
    assert torch.allclose(w[0, 2], torch.tensor([1, 1, 1, 2 / 3, 1 / 3, 0, 0, 0, 0]))  # (r + 1 - d) / (r + 1)
    assert torch.allclose(w[0, 0, :5], torch.tensor([2 / 3, 2 / 3, 2 / 3, 2 / 3, 1 / 3]))  # Chebyshev: corner d = 1
    assert torch.equal(masks().feather_weights(mask, 0), mask)
    assert torch.equal(masks().feather_weights(mask, -1), mask)  # a negative radius (API callers) is no feather
    assert [masks().finish_cells(r) for r in (0, 1, 8, 9, 16, 17)] == [0, 2, 2, 3, 3, 4]


def test_feathering_hides_a_latent_cell_edge_of_the_regenerated_region():
    """Synthetic: the decoded finish equals the original except a constant shift on the regenerated region (the mask
    grown by finish_cells), a hard step on an 8-px cell edge. Pasted back through the feather weights, the step falls
    where the weight is 0 and the largest jump between neighbours is the shift / (feather + 1)."""
    feather = 16
    grid = torch.zeros(1, 1, 8, 12)
    grid[..., 3:5, 4:7] = 1.0
    ops = pkg("masks.ops")
    mask_img = ops.grid_to_image(grid, (64, 96))
    region_img = ops.grid_to_image(ops.dilate(grid, masks().finish_cells(feather)), (64, 96))
    original = torch.linspace(0, 1, 96).expand(1, 64, 96)
    decoded = original + 0.8 * region_img
    w = masks().feather_weights(mask_img, feather)
    out = engine().blend(decoded, original, w)
    jump = lambda x: max(float((x[..., 1:] - x[..., :-1]).abs().max()), float((x[:, 1:] - x[:, :-1]).abs().max()))  # noqa: E731
    hard = engine().blend(decoded, original, mask_img)
    assert jump(hard - original) == pytest.approx(0.8)
    assert jump(out - original) <= 0.8 / (feather + 1) + 1e-6
    assert torch.equal(out[w == 0], original[w == 0]) and torch.equal(out[mask_img > 0], decoded[mask_img > 0])


def test_default_finish_feathers_the_paste_back_over_a_regenerated_band(tiny):
    image = make_image(size=128, seed=3)
    out, mask, latent = run(tiny, image, phi=0.8)  # defaults: inpaint finish, paste_back on, feather 16
    assert 0 < float(mask.mean()) < 0.5, "the test needs a mask with an inside and an outside"
    w = masks().feather_weights(mask, masks().FEATHER)
    beyond = (w == 0)[..., None].expand_as(out)
    assert torch.equal(out[beyond], image[beyond]), "beyond the band: the input's pixels"
    band = ((w > 0) & (w < 1))[..., None].expand_as(out)
    assert not torch.equal(out[band], image[band]), "in the band the edit fades in"
    ops = pkg("masks.ops")
    cells = ops.mask_to_grid(mask, (16, 16), binary=True)
    grown = ops.dilate(cells, masks().finish_cells(masks().FEATHER))
    with torch.inference_mode(), engine().seeded(0):
        x0 = pkg("inversion.comfy_model").vae_encode(tiny.vae, image).float()
    outside, ring = (grown == 0).expand(-1, 4, -1, -1), ((grown == 1) & (cells == 0)).expand(-1, 4, -1, -1)
    assert torch.allclose(latent["samples"][outside], x0[outside], atol=1e-5), "kept beyond the grown region"
    assert not torch.allclose(latent["samples"][ring], x0[ring], atol=1e-3), "the band's cells are regenerated"
    node = pkg("nodes.instant").AttnEditInstantEdit.INPUT_TYPES()["optional"]
    assert node["paste_back"][1]["default"] is True and node["feather"][1]["default"] == 16
    assert list(node)[-1] == "feather", "new inputs go at the end"


def test_full_frame_finish_repaints_everything_with_the_inpainting_model(tiny, inpaint_model, caplog):
    image = make_image(size=128, seed=3)
    log = []
    out, mask, latent = run(tiny, image, phi=0.5, finish="inpaint full frame", paste_back=False,
                            inpaint_model=count_unet_calls(inpaint_model, log))
    assert log == [2] * STEPS
    with torch.inference_mode(), engine().seeded(0):
        x0 = pkg("inversion.comfy_model").vae_encode(tiny.vae, image).float()
    outside = pkg("masks.ops").mask_to_grid(1 - mask, (16, 16), binary=True).bool().expand(-1, 4, -1, -1)
    assert not torch.allclose(latent["samples"][outside], x0[outside], atol=1e-2), "no latent kept: full frame"
    # without an inpainting checkpoint it cannot repaint the frame: a warning, and the 'inpaint' finish
    with caplog.at_level("WARNING"):
        fallback = run(tiny, image, phi=0.5, finish="inpaint full frame")
    assert "`finish` 'inpaint full frame' needs an SD inpainting checkpoint" in caplog.text
    assert torch.equal(fallback[0], run(tiny, image, phi=0.5)[0])


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_chain_runs_each_phase_on_its_steps(tiny, steps):
    """At 10, 20 and 50 steps: the mask phase runs the last int(S * r) steps of the S-step DDIM schedule (one batched
    call of 2n rows each), then the finish all S steps from sigma_max (finish_denoise 1)."""
    calls = []
    clone = tiny.model.clone()

    def recording(apply_model, args):
        calls.append((int(args["input"].shape[0]), float(args["timestep"][0])))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(recording)
    out, mask, _ = call_node("AttnEditInstantEdit", image=make_image(size=64, seed=3), model=clone, clip=tiny.clip,
                             vae=tiny.vae, edit_text=TEXT, steps=steps, seeds=1)
    cm = pkg("inversion.comfy_model")
    sigmas = pkg("inversion.schedule").ddim_sigmas(cm.sigma_table(tiny.model), steps)
    levels = sigmas[:-1].tolist()  # the wrapper sees ComfyUI's sigma as "timestep"
    masked = int(steps * engine().STRENGTH)
    assert [b for b, _ in calls] == [2] * (masked + steps)
    assert [t for _, t in calls] == pytest.approx(levels[steps - masked:] + levels)
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("height, width", [(64, 96), (112, 144)])  # 2:3 like 512x768; odd 14x18 latent
def test_chain_on_non_square_images(tiny, height, width):
    """Non-square pictures (one with odd latent sides, whose attention grids ceil-halve to 7x9 and 4x5): the same
    schedule as on a square one, the mask and the edit at the picture's size, the mask inside the frame."""
    calls = []
    clone = tiny.model.clone()

    def recording(apply_model, args):
        calls.append(tuple(args["input"].shape))
        return apply_model(args["input"], args["timestep"], **args["c"])

    clone.set_model_unet_function_wrapper(recording)
    image = make_image(size=max(height, width), seed=3)[:, :height, :width]
    out, mask, _ = call_node("AttnEditInstantEdit", image=image, model=clone, clip=tiny.clip, vae=tiny.vae,
                             edit_text=TEXT, steps=10, seeds=1)
    masked = int(10 * engine().STRENGTH)
    assert calls == [(2, 4, height // 8, width // 8)] * (masked + 10)
    assert out.shape == (1, height, width, 3) and torch.isfinite(out).all()
    assert mask.shape == (1, height, width) and float(mask.min()) >= 0 and float(mask.max()) <= 1
