"""Edit quality on the shipped demo model, measured against the shapes world's ground truth.

Regression tests of the pack on a toy model (128 px, 10 null-text steps), not claims about SD1.5 photos. Each
threshold is stated here and in docs/quality.md; the tiny random model fails them (checked in the first test).
Scene: "a red circle on a gray background" (tools/demo/quality.py: SOURCE), edit red -> blue.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import tiny_models  # noqa: E402
from demo import quality as q  # noqa: E402
from demo import world  # noqa: E402

# Word swap red -> blue with local blend "circle":
BLUE_SHARE_MIN = 0.5  # share of the object's (eroded GT mask) pixels nearest to blue
BACKGROUND_CHANGE_MAX = 0.06  # mean |RGB| change outside the dilated GT mask (0..1)
OBJECT_IOU_MIN = 0.6  # the edited object's mask against the GT mask: it stays in place
MASK_IOU_MIN = 0.3  # Mask from Attention (local blend and InstDiffEdit instant, word "circle") against the GT object
# CPAM remove object (ground-truth mask grown 3 px): the object's pixels become background, the rest stays.
REMOVAL_BACKGROUND_SHARE_MIN = 0.6
REMOVAL_MARGIN = 0.3  # ... and at least this much more than in the inversion's reconstruction (object still there)
# MAG-Edit with the ground-truth mask, target word "blue": blue inside, nothing changes outside.
MAG_BLUE_SHARE_MIN = 0.5
# DPL on "a red circle and a blue square": each noun's mask overlaps its own object more than the other, and the two
# masks overlap little. At 128 px the masks come from 4x4 maps (cells of 32 px): no union of cells reaches an IoU above
# 0.29 with these objects (radius 19 px; q.best_grid_iou), so the own-object IoU is asked relative to that best.
DPL_OWN_SHARE_OF_BEST, DPL_OVERLAP_MAX = 0.6, 0.2
# The thresholds hold for weights trained on at least this many samples (the issue measured 97% correct colours at
# 90k); weights exported earlier are declared expected failures (strict: passing anyway is reported). Re-export the
# running training's checkpoint (docs/demo_model.md) to lift the mark.
MIN_TRAINED_SAMPLES = 60_000
UNDERTRAINED = int(q.shipped_training().get("samples", 0)) < MIN_TRAINED_SAMPLES
needs_trained = pytest.mark.xfail(UNDERTRAINED, strict=True, reason=(
    f"shipped demo weights saw {q.shipped_training().get('samples')} samples < {MIN_TRAINED_SAMPLES}: too early in "
    "training to edit colours; re-export .tmp/demo_ckpt/state.pt (docs/demo_model.md)"))


@pytest.fixture(scope="module")
def demo():
    return q.load_demo()


@pytest.fixture(scope="module")
def edits(demo):
    target = q.swap_colour(q.SOURCE, 0, q.TARGET_COLOUR).caption
    inv = q.invert(demo, q.SOURCE)
    return {"blend": q.p2p(demo, q.SOURCE, target, "circle", inv[0]),
            "no_blend": q.p2p(demo, q.SOURCE, target, "", inv[0]),
            "sdedit": q.sdedit(demo, q.SOURCE, target),
            "mag": q.mag_edit(demo, q.SOURCE, inversion=inv[0]),
            "cpam_remove": q.cpam_remove(demo, q.SOURCE, inv[0]),
            "reconstruction": q.EditResult(q.decode(demo[2], inv[3]))}


@needs_trained
def test_word_swap_with_local_blend_recolours_the_object_in_place(edits):
    s = q.word_swap_scores(edits["blend"])
    assert s["colour_share"] >= BLUE_SHARE_MIN, s
    assert s["background_change"] <= BACKGROUND_CHANGE_MAX, s
    assert s["object_iou"] >= OBJECT_IOU_MIN, s


def test_random_model_fails_the_word_swap_thresholds():
    """The thresholds measure the edit, not the plumbing: the tiny random model misses them."""
    bundle = tiny_models.make_bundle(0)
    target = q.swap_colour(q.SOURCE, 0, q.TARGET_COLOUR).caption
    s = q.word_swap_scores(q.p2p((bundle.model, bundle.clip, bundle.vae), q.SOURCE, target, "circle"))
    assert not (s["colour_share"] >= BLUE_SHARE_MIN and s["background_change"] <= BACKGROUND_CHANGE_MAX
                and s["object_iou"] >= OBJECT_IOU_MIN), s


@needs_trained
def test_local_blend_keeps_the_background_better_than_the_baselines(edits):
    blend, no_blend, sdedit = (q.word_swap_scores(edits[k]) for k in ("blend", "no_blend", "sdedit"))
    assert blend["colour_share"] >= BLUE_SHARE_MIN, blend  # the comparison means something once the edit happens
    assert blend["background_change"] <= no_blend["background_change"] + 1e-3, (blend, no_blend)
    assert blend["background_change"] < sdedit["background_change"], (blend, sdedit)
    assert blend["object_iou"] > sdedit["object_iou"], (blend, sdedit)


@needs_trained
@pytest.mark.parametrize("mode", ["local blend", "instant"])
def test_mask_from_attention_overlaps_the_ground_truth_object(edits, mode):
    gt = world.render(q.SOURCE)[1][0]
    mask = q.attention_mask(edits["blend"].attention, "circle", mode)
    assert q.iou(mask, gt) >= MASK_IOU_MIN, q.iou(mask, gt)


@pytest.mark.xfail(strict=True, reason=(
    "the demo model keeps the object under CPAM's removal: with every query reading only background keys in every "
    "self-attention layer the circle stays red (background share at most 0.02 with null-text or ddim_null_prompt "
    "inversions at 10-50 steps). Measured cause: self-attention does not carry the object in this model; denoising "
    "the inverted latent with every self-attention output zeroed still leaves 96% of the circle (q.attention_ablation: "
    "background share 0.04); only zeroing cross-attention too removes most of it (0.72). CPAM's removal changes "
    "self-attention only, so it cannot pass on this model (docs/quality.md)"))
def test_cpam_removal_leaves_background_where_the_object_was(edits):
    s = q.removal_scores(edits["cpam_remove"])
    kept = q.removal_scores(edits["reconstruction"])  # the inversion's reconstruction still shows the object
    assert s["background_share"] >= REMOVAL_BACKGROUND_SHARE_MIN, s
    assert s["background_share"] >= kept["background_share"] + REMOVAL_MARGIN, (s, kept)
    assert s["background_change"] <= BACKGROUND_CHANGE_MAX, s


@needs_trained
def test_mag_edit_puts_the_new_colour_inside_the_mask_only(edits):
    s = q.word_swap_scores(edits["mag"])
    assert s["colour_share"] >= MAG_BLUE_SHARE_MIN, s
    assert s["background_change"] <= BACKGROUND_CHANGE_MAX, s


@needs_trained
def test_dpl_keeps_the_two_objects_maps_apart(demo):
    d = q.maps_apart_scores(q.dpl_attention(demo))
    best = [q.best_grid_iou(m) for m in world.render(q.TWO)[1]]
    assert d["circle_own"] >= DPL_OWN_SHARE_OF_BEST * best[0], (d, best)
    assert d["square_own"] >= DPL_OWN_SHARE_OF_BEST * best[1], (d, best)
    assert d["circle_own"] > d["circle_other"] and d["square_own"] > d["square_other"], d
    assert d["maps_overlap"] <= DPL_OVERLAP_MAX, d


def test_best_grid_iou_is_the_best_union_of_cells():
    """A mask filling one 32 px cell of the 4x4 grid reaches 1, half a cell 0.5; a mask across two half cells reaches
    0.5 with both cells (one cell alone: 1/3); the DPL scene's objects 0.29 (values from a separate brute force)."""
    m = np.zeros((128, 128), bool)
    m[32:64, 32:64] = True
    assert q.best_grid_iou(m) == 1.0
    m[32:64, 48:64] = False
    assert q.best_grid_iou(m) == 0.5
    m = np.zeros((128, 128), bool)
    m[32:64, 48:80] = True  # half of cell (1, 1) and half of cell (1, 2)
    assert q.best_grid_iou(m) == 0.5
    best = [q.best_grid_iou(mask) for mask in world.render(q.TWO)[1]]
    assert best == pytest.approx([0.29237, 0.28675], abs=1e-4)
