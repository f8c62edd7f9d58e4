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
    m = sam().MASK_HINT_LOGIT
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
    assert extensions[:2] == [".bin", ".pth"] and sorted(extensions[2:]) == sorted(set(sam().SAM_EXTENSIONS) - {".bin", ".pth"})

def test_progress_bar_totals():
    io = pkg("masks.comfy_io")
    assert io.progress_bar(5).total == 5 and io.progress_bar(0).total == 1
