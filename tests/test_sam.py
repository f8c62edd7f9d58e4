"""SAM Mask node and loader with a tiny random Segment Anything model (built from the package's own classes)."""

import os
import sys

import pytest
import tiny_models
import torch
from conftest import call_node, make_image, pkg


@pytest.fixture(scope="module")
def tiny_sam():
    return tiny_models.register_tiny_sam()


def sam():
    return pkg("masks.sam")


def segment(name, image, **kw):
    return call_node("AttnEditSAMMask", image=image, sam_model=name, **kw)


def test_checkpoint_is_listed_and_the_architecture_read_from_the_file(tiny_sam, tmp_path):
    import nodes

    spec = nodes.NODE_CLASS_MAPPINGS["AttnEditSAMMask"].INPUT_TYPES()
    assert tiny_sam in spec["required"]["sam_model"][0]
    path = pkg("masks.comfy_io").sam_checkpoint_path(tiny_sam)
    config = sam().infer_config(sam().load_state_dict(path))
    expected = tiny_models.TINY_SAM
    assert (config.img_size, config.embed_dim, config.depth, config.num_heads, config.global_attn_indexes,
            config.window_size, config.prompt_dim) == (64, 32, 2, 2, (1,), 2, 32)
    assert config.decoder_mlp_dim == expected["decoder_mlp_dim"] and config.model_type == "custom"
    # a .pth written with torch.save loads the same weights through torch.load(weights_only=True)
    pth = tiny_models.write_tiny_sam(str(tmp_path), "tiny.pth")
    a, b = sam().load_state_dict(pth), sam().load_state_dict(path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_official_sizes_are_recognised(model_type):
    from segment_anything import sam_model_registry

    with torch.device("meta"):  # shapes only: no memory, no download
        official = sam_model_registry[model_type]()
        config = sam().infer_config(official.state_dict())
        rebuilt = sam().build_sam(config)
    assert config.model_type == model_type
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in official.state_dict().items()}
    # the same normalisation constants too (the image encoder's LayerNorms use eps 1e-6, as build_sam's)
    assert [(n, m.eps) for n, m in rebuilt.named_modules() if hasattr(m, "eps")] == \
        [(n, m.eps) for n, m in official.named_modules() if hasattr(m, "eps")]


def test_masks_have_the_image_shape_dtype_and_batch(tiny_sam):
    images = make_image(size=48, batch=2)[:, :, :40]  # 40x48: not square, SAM pads to its square frame
    mask, score = segment(tiny_sam, images, points="10,12; 30,20", negative_points="2,2", box="5,5,40,35")
    assert mask.shape == (2, 48, 40) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and isinstance(score, float)
    single, _ = segment(tiny_sam, images[:1], points="10,12; 30,20", negative_points="2,2", box="5,5,40,35")
    assert torch.equal(single[0], mask[0]), "images of a batch are segmented independently"


def test_prompt_kinds_and_coordinates(tiny_sam):
    image = make_image(size=64)
    by_pixels, _ = segment(tiny_sam, image, points="16,32", multimask=False)
    by_fraction, _ = segment(tiny_sam, image, points="0.25,0.5", coordinates="fraction", multimask=False)
    assert torch.equal(by_pixels, by_fraction)
    box_only, _ = segment(tiny_sam, image, box="40,40,8,8")  # corners in any order
    assert torch.equal(box_only, segment(tiny_sam, image, box="8,8,40,40")[0])
    hint = torch.zeros(1, 32, 32)
    hint[:, 8:24, 8:24] = 1
    with_hint, _ = segment(tiny_sam, image, points="16,32", mask_hint=hint, multimask=False)
    hint_only, _ = segment(tiny_sam, image, mask_hint=hint)
    assert with_hint.shape == hint_only.shape == (1, 64, 64)
    assert not torch.equal(with_hint, by_pixels), "the mask hint must reach SAM's prompt encoder"


def test_mask_hint_logits_cover_the_padded_frame():
    hint = torch.zeros(40, 80)
    hint[:, :40] = 1  # left half of a wide picture
    logits = sam().hint_to_logits(hint, 64, (16, 16))
    assert logits.shape == (1, 16, 16)
    m = 10.0  # MASK_HINT_LOGIT
    assert torch.all(logits[0, :8, :8] == m) and torch.all(logits[0, :8, 8:] == -m)  # image rows 0..31 of 64
    assert torch.all(logits[0, 8:] == -m), "the padding below the picture is outside"


@pytest.mark.parametrize("inputs, message", [
    ({}, "nothing to segment: give `points` on the object, a `box`, or connect `mask_hint`"),
    ({"points": "1,2,3"}, "has an odd count of numbers"),
    ({"points": "a,b"}, "is not a list of numbers"),
    ({"box": "1,2,3"}, "must be four numbers x1,y1,x2,y2"),
    ({"points": "100,10"}, "`points` has coordinates outside the 64x64 px image"),
    ({"points": "10,10", "model_type": "vit_h"}, "`model_type` is 'vit_h' but 'attnedit_tiny_sam.safetensors' is a "
                                                 "custom checkpoint"),
    ({"points": "10,10", "mask_hint": torch.ones(2, 8, 8)}, "`mask_hint` has a batch of 2 masks for 1 image"),
])
def test_errors_name_the_input_and_the_fix(tiny_sam, inputs, message):
    with pytest.raises(ValueError, match=r"\[Attention Edit\] SAM Mask: .*" + message.replace("(", r"\(")):
        segment(tiny_sam, make_image(size=64), **inputs)


def test_missing_checkpoint_names_the_folder():
    with pytest.raises(ValueError, match=r"SAM checkpoint 'sam_vit_b_01ec64.pth' not found\. .* put it in .*sams"):
        pkg("masks.comfy_io").sam_checkpoint_path("sam_vit_b_01ec64.pth")


def test_missing_package_gives_the_install_hint(tiny_sam, monkeypatch):
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # import fails as if not installed
    with pytest.raises(ValueError, match="pip install segment-anything"):
        segment(tiny_sam, make_image(size=64), points="10,10")


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    bad = tmp_path / "not_sam.safetensors"
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="is not a Segment Anything checkpoint"):
        sam().load_sam(str(bad))
    pickled = tmp_path / "code.pth"
    torch.save({"model": os.path.join}, str(pickled))  # a pickled function reference: refused by weights_only
    with pytest.raises(ValueError, match="cannot read SAM checkpoint 'code.pth' safely"):
        sam().load_state_dict(str(pickled))


def test_folder_registration_is_idempotent_and_shares_an_existing_entry(tiny_sam):
    import folder_paths

    io = pkg("masks.comfy_io")
    io.register_sam_folder()
    before = folder_paths.get_folder_paths("sams")
    for _ in range(3):
        default = io.register_sam_folder()
    paths = folder_paths.get_folder_paths("sams")
    assert paths == before and paths.count(default) == 1, "registered once, other packs' folders kept"
    assert os.path.join(tiny_models.scratch_dir(), "sams") in paths  # the test's own folder (tiny_sam) is kept


def test_a_new_sams_folder_is_models_sams_with_the_sam_extensions(monkeypatch):
    """Without a "sams" entry: models/sams is registered as the only path and .pth/.safetensors are listed."""
    import folder_paths

    io = pkg("masks.comfy_io")
    monkeypatch.delitem(folder_paths.folder_names_and_paths, "sams", raising=False)
    default = io.register_sam_folder()
    assert default == os.path.join(folder_paths.models_dir, "sams")
    paths, extensions = folder_paths.folder_names_and_paths["sams"]
    assert paths == [default] and set(extensions) == set(sam().SAM_EXTENSIONS)


def test_an_existing_every_file_sams_entry_stays_every_file(monkeypatch):
    """Another pack's "sams" entry with an empty extension set (ComfyUI: every file) keeps it empty; our path is
    appended after theirs."""
    import folder_paths

    io = pkg("masks.comfy_io")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sams", (["/elsewhere/sams"], set()))
    default = io.register_sam_folder()
    paths, extensions = folder_paths.folder_names_and_paths["sams"]
    assert paths == ["/elsewhere/sams", default] and extensions == set()



def test_an_existing_sams_entry_with_an_extension_list_gets_ours_appended(monkeypatch):
    """Another pack's "sams" entry that lists its extensions in a list (not a set) gets the missing SAM extensions
    appended, its own kept first."""
    import folder_paths

    io = pkg("masks.comfy_io")
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "sams", (["/elsewhere/sams"], [".bin", ".pth"]))
    io.register_sam_folder()
    _paths, extensions = folder_paths.folder_names_and_paths["sams"]
    assert isinstance(extensions, list)
    assert extensions[:2] == [".bin", ".pth"]
    assert sorted(extensions[2:]) == sorted(set(sam().SAM_EXTENSIONS) - {".bin", ".pth"})

def test_progress_bar_totals():
    io = pkg("masks.comfy_io")
    assert io.progress_bar(5).total == 5 and io.progress_bar(0).total == 1


# ------------------------------------------------------------------------------------- against the official package
def _tiny_sam_model(name):
    return sam().load_sam(pkg("masks.comfy_io").sam_checkpoint_path(name))


def _official(model, image, points=None, labels=None, box=None, multimask=True):
    """segment_anything's own SamPredictor on the uint8 picture (set_image / predict, numpy in): best mask by score."""
    import numpy as np
    from segment_anything import SamPredictor

    predictor = SamPredictor(model)
    predictor.set_image((image[..., :3].clamp(0, 1) * 255).round().to(torch.uint8).numpy())
    masks, scores, _ = predictor.predict(None if points is None else np.array(points, dtype=np.float32),
                                         None if labels is None else np.array(labels),
                                         None if box is None else np.array(box, dtype=np.float32),
                                         multimask_output=multimask)
    best = int(np.argmax(scores))
    return torch.from_numpy(masks[best]).float(), float(scores[best])


def test_predict_mask_equals_the_official_predictor(tiny_sam):
    """On a non-square picture (48 x 80 px: resized and padded into SAM's square frame), predict_mask gives the
    official predictor's mask and predicted IoU: pixels 0..255 from [0, 1] (clamped, alpha dropped), prompts scaled
    from the picture's own size, the best of the multimask proposals by predicted IoU (the default), single-mask output
    when asked, points only, box only, both."""
    model = _tiny_sam_model(tiny_sam)
    image = make_image(size=80, seed=3)[0, 16:64]
    prompts = [
        dict(points=[[16.0, 30.0], [70.0, 8.0]], labels=[1, 0], box=None),
        dict(points=None, labels=None, box=[6.0, 10.0, 60.0, 40.0]),
        dict(points=[[20.0, 20.0]], labels=[1], box=[4.0, 4.0, 44.0, 30.0]),
    ]
    overexposed = image * 1.6 - 0.3  # values outside [0, 1]: clamped
    rgba = torch.cat([overexposed, torch.rand(48, 80, 1)], -1)
    for p in prompts:
        prompt = sam().SamPrompt(torch.tensor(p["points"] or torch.zeros(0, 2)).view(-1, 2),
                                 torch.tensor(p["labels"] or [], dtype=torch.long),
                                 None if p["box"] is None else torch.tensor(p["box"]))
        for multimask in (True, False):
            want_mask, want_score = _official(model, overexposed, multimask=multimask, **p)
            got_mask, got_score = sam().predict_mask(model, rgba, prompt, multimask=multimask)
            assert torch.equal(got_mask, want_mask) and abs(got_score - want_score) < 1e-5, (p, multimask)
        assert torch.equal(sam().predict_mask(model, rgba, prompt)[0], _official(model, overexposed, **p)[0])
    assert torch.equal(sam().build_sam(sam().infer_config(model.state_dict())).pixel_mean.flatten(),
                       torch.tensor(_sam_default("pixel_mean")))
    assert torch.equal(model.pixel_std.flatten(), torch.tensor(_sam_default("pixel_std")))


def _sam_default(name):
    import inspect

    from segment_anything.modeling import Sam

    return inspect.signature(Sam.__init__).parameters[name].default


def test_checkpoint_containers_and_strict_loading(tiny_sam, tmp_path):
    """A {"model": state_dict} container loads like the bare state dict; a file holding no state dict (a list, an
    empty dict) is refused by name; a state dict with a stray key does not fit the architecture read from it."""
    sd = sam().load_state_dict(pkg("masks.comfy_io").sam_checkpoint_path(tiny_sam))
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": sd}, str(wrapped))
    assert sam().load_state_dict(str(wrapped)).keys() == sd.keys()
    for i, bad in enumerate(([1, 2], {})):
        path = tmp_path / f"bad{i}.pth"
        torch.save(bad, str(path))
        with pytest.raises(ValueError, match=f"'bad{i}.pth' holds no state dict"):
            sam().load_state_dict(str(path))
    stray = tmp_path / "stray.pth"
    torch.save({**sd, "image_encoder.extra.weight": torch.zeros(1)}, str(stray))
    with pytest.raises(ValueError, match="'stray.pth' does not fit the SAM architecture read from it"):
        sam().load_sam(str(stray))


def test_box_corners_fractions_and_the_picture_border():
    """A box's corners are sorted; fractions scale x by the width and y by the height (points and boxes); a point
    exactly on the border is inside, one a hair outside on any side is refused."""
    s = sam()
    assert s.parse_box("30,40,10,20").tolist() == [10, 20, 30, 40]
    assert s.parse_box("10,40,30,20").tolist() == [10, 20, 30, 40]
    hw = (100, 200)  # H, W
    assert s.to_pixels(torch.tensor([[0.5, 0.25], [1.0, 1.0]]), hw, True).tolist() == [[100, 25], [200, 100]]
    assert s.to_pixels(torch.tensor([0.1, 0.2, 0.5, 0.6]), hw, True).tolist() == pytest.approx([20, 20, 100, 60])
    assert s.to_pixels(torch.tensor([[3.0, 4.0]]), hw, False).tolist() == [[3, 4]]
    s.check_inside(torch.tensor([[0.0, 0.0], [200.0, 100.0]]), hw, "points")
    for outside in ([-0.1, 50.0], [200.1, 50.0], [50.0, -0.1], [50.0, 100.1]):
        with pytest.raises(ValueError, match="`points` has coordinates outside the 200x100 px image"):
            s.check_inside(torch.tensor([[10.0, 10.0], outside]), hw, "points")


def test_mask_hint_resizing_uses_half_pixel_centres():
    """A 1x2 hint [0, 1] on a 4 px frame: bilinear with half-pixel centres gives 0, 1/4, 3/4, 1 across the top two
    rows (logits (2v - 1) * 10), the padded rows below are -10."""
    logits = sam().hint_to_logits(torch.tensor([[0.0, 1.0]]), 4, (4, 4))
    row = torch.tensor([-10.0, -5.0, 5.0, 10.0])
    assert torch.allclose(logits[0, :2], row.expand(2, 4)) and torch.all(logits[0, 2:] == -10.0)


def test_every_size_of_a_custom_checkpoint_is_read_back():
    """build_sam of a config whose sizes all differ from each other (IoU head width != prompt width, 3 multimask
    outputs, one global block of three) gives a state dict from which infer_config reads the same config."""
    config = sam().SamConfig(embed_dim=24, depth=3, num_heads=3, global_attn_indexes=(2,), window_size=2, img_size=64,
                             patch_size=16, mlp_ratio=2.0, qkv_bias=False, prompt_dim=16, mask_in_chans=8,
                             decoder_depth=1, decoder_mlp_dim=40, iou_head_depth=2, iou_head_hidden=24,
                             multimask_outputs=3)
    assert sam().infer_config(sam().build_sam(config).state_dict()) == config
