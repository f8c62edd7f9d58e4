"""The demo model: the synthetic world's determinism and ground truth, and the Attention Edit Demo Model loader
(ComfyUI's own classes, shipped weights, nothing registered globally) on the host in COMFYUI_PATH."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from conftest import HOST, call_node

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import tiny_models  # noqa: E402
from demo import world  # noqa: E402

VAE_PSNR_MIN = 22.0  # dB on 16 held-out world scenes at 128 px (shipped VAE ~24 dB; the random tiny VAE ~7 dB)
VAE_COLOUR_MIN = 0.9  # one-object scenes whose encode -> decode round trip reads back the object's colour


def test_world_is_deterministic_and_captions_follow_the_grammar():
    a, b = world.sample_scene(3, 17), world.sample_scene(3, 17)
    assert a == b and world.sample_scene(3, 18) != a and world.sample_scene(4, 17) != a
    np.testing.assert_array_equal(world.render(a)[0], world.render(b)[0])
    assert world.make_scene([("circle", "red", 0.5, 0.5, 0.2)], "gray").caption == "a red circle on a gray background"
    two = world.make_scene([("square", "orange", 0.7, 0.5, 0.1), ("triangle", "blue", 0.3, 0.5, 0.1)], "white")
    assert two.caption == "a blue triangle and an orange square on a white background"  # left to right


def test_world_masks_are_the_objects_and_the_measures_read_them_back():
    for i in range(40):
        scene = world.sample_scene(0, i)
        img, masks = world.render(scene)
        assert masks.shape == (len(scene.objects), 128, 128) and all(m.sum() > 100 for m in masks)
        for obj, m in zip(scene.objects, masks, strict=True):
            inner = m & ~np.roll(m, 2, 0) & ~np.roll(m, -2, 0)  # interior has the object's exact colour
            assert world.nearest_colour(np.median(img[m], axis=0)) == obj.colour
            assert np.allclose(img[m & np.roll(m, 2, 0) & np.roll(m, -2, 0) & np.roll(m, 2, 1) & np.roll(m, -2, 1)],
                               np.asarray(world.COLOURS[obj.colour]) / 255, atol=1e-6) or inner.sum() == 0
        if len(scene.objects) == 1:
            colour, shape, found = world.describe(img, scene.background)
            assert (colour, shape) == (scene.objects[0].colour, scene.objects[0].shape), scene
            assert (found & masks[0]).sum() / (found | masks[0]).sum() > 0.9
    with pytest.raises(ValueError, match="unknown shape/colour 'hexagon'"):
        world.make_scene([("hexagon", "red", 0.5, 0.5, 0.2)])


@pytest.fixture(scope="module")
def demo():
    import nodes

    before = (dict(nodes.NODE_CLASS_MAPPINGS), _supported_models())
    out = call_node("AttnEditDemoModel", weights="attnedit_demo.safetensors")
    assert (dict(nodes.NODE_CLASS_MAPPINGS), _supported_models()) == before  # nothing registered globally
    return out


def _supported_models():
    import comfy.supported_models

    return list(getattr(comfy.supported_models, "models", []))


def test_demo_loader_builds_an_sd1_family_model_with_comfyui_classes(demo):
    import comfy.model_patcher
    import comfy.sd

    model, clip, vae = demo
    assert isinstance(model, comfy.model_patcher.ModelPatcher) and isinstance(clip, comfy.sd.CLIP)
    assert isinstance(vae, comfy.sd.VAE)
    assert HOST.module("inversion.comfy_model").model_family(model) == "sd1"
    assert model.model.latent_format.scale_factor == pytest.approx(0.18215)
    n = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert 5e6 < n < 8e6, n


def test_demo_vae_reconstructs_world_scenes(demo):
    """Trained autoencoder: PSNR >= VAE_PSNR_MIN on held-out scenes (the random tiny VAE fails it)."""
    import nodes

    imgs = torch.from_numpy(world.batch(424242, 0, 16)[0])

    def psnr(vae):
        with torch.inference_mode():
            rec = nodes.VAEDecode().decode(vae, nodes.VAEEncode().encode(vae, imgs)[0])[0]
        return float(-10 * torch.log10(((rec.clamp(0, 1) - imgs) ** 2).mean()))

    assert psnr(demo[2]) >= VAE_PSNR_MIN
    assert psnr(tiny_models.make_vae(2)) < VAE_PSNR_MIN


def test_demo_vae_keeps_object_colours(demo):
    """The round trip keeps each object's palette colour (an earlier, unweighted VAE turned red, yellow and blue into
    orange and purple: 0.25 of these scenes); the random tiny VAE fails it."""
    import nodes

    scenes = [world.sample_scene(123, i, 0.0) for i in range(24)]
    imgs = torch.from_numpy(np.stack([world.render(s)[0] for s in scenes]))

    def colour_share(vae):
        with torch.inference_mode():
            rec = nodes.VAEDecode().decode(vae, nodes.VAEEncode().encode(vae, imgs)[0])[0].clamp(0, 1).numpy()
        return np.mean([world.describe(r, s.background)[0] == s.objects[0].colour for r, s in zip(rec, scenes)])

    assert colour_share(demo[2]) >= VAE_COLOUR_MIN
    assert colour_share(tiny_models.make_vae(2)) < VAE_COLOUR_MIN


def test_vae_loss_weights_object_pixels():
    """tools/demo/train.py: an error on an object pixel costs `object_weight` times one on a background pixel."""
    from demo import train

    scene = world.sample_scene(5, 0, 0.0)
    x = train.to_tensor(world.render(scene)[0][None], "cpu")
    mask = torch.from_numpy(world.render(scene)[1][0])
    (oy, ox), (by, bx) = mask.nonzero()[0].tolist(), (~mask).nonzero()[0].tolist()
    on_object, on_background = x.clone(), x.clone()
    on_object[0, :, oy, ox] += 0.5
    on_background[0, :, by, bx] += 0.5
    for weight in (1.0, 8.0):
        ratio = train.reconstruction_loss(on_object, x, [scene], weight) / \
            train.reconstruction_loss(on_background, x, [scene], weight)
        assert float(ratio) == pytest.approx(weight, rel=1e-5)


def test_localisation_targets_are_each_objects_colour_and_shape_words():
    """tools/demo/train.py: the loss's targets are the colour and shape tokens of each object, in caption order (left
    to right), with that object's own ground-truth mask."""
    from demo import train

    captions = train.Captions()
    scene = world.make_scene([("square", "blue", 0.72, 0.5, 0.15), ("circle", "red", 0.28, 0.5, 0.15)], "white")
    assert scene.caption == "a red circle and a blue square on a white background"
    (left_tokens, left_mask), (right_tokens, right_mask) = train.object_word_tokens(scene, captions)
    ids = captions(scene.caption)
    assert [ids[t] for t in left_tokens] == [captions("red")[1], captions("circle")[1]]
    assert [ids[t] for t in right_tokens] == [captions("blue")[1], captions("square")[1]]
    masks = world.render(scene)[1]
    assert np.array_equal(left_mask, masks[1]) and np.array_equal(right_mask, masks[0])  # scene order: square first


def test_localisation_loss_is_the_share_of_word_attention_off_the_object():
    """1 - share of the word's attention mass on its object: 0 for a map inside the object, 1 - coverage for a flat
    map, 1 for a map outside; the 2x2 grid is left out and a sample without caption adds nothing."""
    from demo import train

    mask = np.zeros((128, 128), bool)
    mask[:64, :64] = True  # top-left quarter: cells 0, 1, 4, 5 of a 4x4 grid
    inside = torch.zeros(2, 16, 77)
    inside[0, [0, 1, 4, 5], 3] = 0.25
    flat = torch.full((2, 16, 77), 1 / 77)
    outside = torch.zeros(2, 16, 77)
    outside[0, 15, 3] = 1.0
    coarse = torch.zeros(2, 4, 77)  # 2x2: ignored even though it is off the object
    coarse[0, 3, 3] = 1.0
    targets = [[([3], mask)], []]
    assert float(train.localisation_loss([inside, coarse], targets)) == pytest.approx(0.0, abs=1e-6)
    assert float(train.localisation_loss([flat], targets)) == pytest.approx(0.75, abs=1e-6)
    assert float(train.localisation_loss([outside], targets)) == pytest.approx(1.0, abs=1e-6)
    assert float(train.localisation_loss([inside, outside], targets)) == pytest.approx(0.5, abs=1e-6)


def test_localisation_coverage_term_is_zero_only_for_a_map_spread_over_the_whole_object():
    """The coverage term: total variation distance between the normalised map and the normalised mask. A map on one
    of the object's four cells has full mass share but overlaps the mask's distribution by 1/4, so with coverage 1
    its loss is 0.75; a flat map adds 0.75 to its 0.75; the evenly spread map's is 0."""
    from demo import train

    mask = np.zeros((128, 128), bool)
    mask[:64, :64] = True  # cells 0, 1, 4, 5 of a 4x4 grid
    spread = torch.zeros(1, 16, 77)
    spread[0, [0, 1, 4, 5], 3] = 0.25
    one_cell = torch.zeros(1, 16, 77)
    one_cell[0, 0, 3] = 1.0
    targets = [[([3], mask)]]
    assert float(train.localisation_loss([one_cell], targets)) == pytest.approx(0.0, abs=1e-6)  # mass share alone
    assert float(train.localisation_loss([one_cell], targets, coverage=1.0)) == pytest.approx(0.75, abs=1e-5)
    assert float(train.localisation_loss([one_cell], targets, coverage=0.2)) == pytest.approx(0.15, abs=1e-5)
    flat = torch.full((1, 16, 77), 1 / 77)
    assert float(train.localisation_loss([flat], targets, coverage=1.0)) == pytest.approx(1.5, abs=1e-5)
    assert float(train.localisation_loss([spread], targets, coverage=1.0)) == pytest.approx(0.0, abs=1e-6)


def test_attention_recorder_computes_the_default_attention():
    """The training's attn2 replacement returns what the host's attention returns and keeps head-averaged maps."""
    import comfy.ldm.modules.attention as attention
    from demo import train

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 32, generator=g) for n in (16, 77, 77))
    rec = train.CrossAttentionRecorder()
    out = rec(q, k, v, {"n_heads": 4})
    assert torch.allclose(out, attention.attention_basic(q, k, v, 4), atol=1e-5)
    assert rec.maps[0].shape == (2, 16, 77) and torch.allclose(rec.maps[0].sum(-1), torch.ones(2, 16))


def test_demo_text_encoder_tells_colours_apart(demo):
    """The colour word's embedding differs between prompts, the shared words' do not (causal text model). Pins the
    loader's restore of the shipped token rows: with zero rows (the unshipped vocabulary) both prompts give the same
    output."""
    import nodes

    with torch.inference_mode():
        red = nodes.CLIPTextEncode().encode(demo[1], "a red circle on a gray background")[0][0][0][0]
        blue = nodes.CLIPTextEncode().encode(demo[1], "a blue circle on a gray background")[0][0][0][0]
    torch.testing.assert_close(red[:2], blue[:2])  # <start> a: before the colour word
    assert (red[2] - blue[2]).norm() > 0.01 * red[2].norm()


def test_demo_loader_names_a_missing_weights_file():
    cls = HOST.pack.NODE_CLASS_MAPPINGS["AttnEditDemoModel"]
    with pytest.raises(ValueError, match="`weights` 'nope.safetensors' is not in .*models/demo"):
        cls().load("nope.safetensors")


def test_runner_without_checkpoint_edits_with_the_demo_model():
    """scripts/run.sh with no arguments: the default workflow's loader becomes the demo model, the prompts and local
    blend words become the demo's red -> blue circle, the image the demo asset; other workflows stay smoke runs."""
    import run_workflow

    args = run_workflow.parse_args([])
    assert run_workflow.wants_demo(args)
    assert not run_workflow.wants_demo(run_workflow.parse_args(["workflows/07_mag_edit.json"]))
    assert not run_workflow.wants_demo(run_workflow.parse_args(["--checkpoint", "x.safetensors"]))
    prompt = run_workflow.to_api(run_workflow.load_workflow(args.workflow))
    swapped = run_workflow.use_demo_model(prompt, args)
    by_type = {n["class_type"]: n["inputs"] for n in prompt.values()}
    assert swapped and by_type["AttnEditDemoModel"] == {"weights": "attnedit_demo.safetensors"}
    assert "CheckpointLoaderSimple" not in by_type
    assert by_type["AttnEditInvert"]["source_prompt"] == "a red circle on a gray background"
    assert by_type["AttnEditAttentionHook"]["target_prompt"] == "a blue circle on a gray background"
    assert by_type["AttnEditAttentionHook"]["local_blend"] == "circle"
    assert by_type["AttnEditInvert"]["steps"] == 20
