"""AttnEditSAMMask: a MASK from Segment Anything with points / a box / a mask hint (schema and plumbing only)."""

from __future__ import annotations

import logging

import torch

from ..masks import comfy_io, ops, sam
from .common import AttnEditError, wrap_errors
from .types import CAT_MASKS

log = logging.getLogger("attention_edit")
NODE = "SAM Mask"
MODEL_TYPES = ("auto", *sam.SAM_TYPES)
COORDINATES = ("pixels", "fraction")


class AttnEditSAMMask:
    DESCRIPTION = (
        "Segment Anything (Kirillov et al. 2023) mask of the object you point at: click points on the object, points "
        "on the background and/or a box, optionally a rough MASK as a hint. Needs the segment-anything package and a "
        "checkpoint (sam_vit_b_01ec64.pth, sam_vit_l or sam_vit_h) in ComfyUI's models/sams folder. The same prompt is "
        "applied to every image of the batch.")
    CATEGORY = CAT_MASKS
    FUNCTION = "segment"
    RETURN_TYPES = ("MASK", "FLOAT")
    RETURN_NAMES = ("mask", "score")
    OUTPUT_TOOLTIPS = ("Binary mask per image (1 = the object).",
                       "SAM's predicted IoU of the chosen mask (mean over the batch; near 1 = confident).")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The picture(s) to segment."}),
                "sam_model": (comfy_io.sam_checkpoints(), {
                    "tooltip": "SAM checkpoint in models/sams (.pth or .safetensors; vit_b is fastest)."}),
            },
            "optional": {
                "points": ("STRING", {"default": "", "tooltip": "Points ON the object: \"x,y; x,y\" (pixels from the "
                                                                "top-left, or fractions with coordinates=fraction)."}),
                "negative_points": ("STRING", {"default": "", "tooltip": "Points on what must stay OUT of the mask, "
                                                                         "same format as points."}),
                "box": ("STRING", {"default": "", "tooltip": "A box around the object: \"x1,y1,x2,y2\" (left, top, "
                                                             "right, bottom)."}),
                "mask_hint": ("MASK", {"tooltip": "A rough mask of the object (any size; one or one per image) "
                                                  "used as SAM's mask prompt."}),
                "coordinates": (list(COORDINATES), {"default": "pixels",
                                                    "tooltip": "pixels: coordinates in pixels. fraction: 0..1 of the "
                                                               "image width / height."}),
                "model_type": (list(MODEL_TYPES), {"default": "auto",
                                                   "tooltip": "auto: read from the checkpoint. Otherwise checked "
                                                              "against it."}),
                "multimask": ("BOOLEAN", {"default": True,
                                          "tooltip": "Let SAM propose 3 masks and keep the one it scores best "
                                                     "(best for a single click; off for several prompts)."}),
            },
        }

    def segment(self, image, sam_model, points="", negative_points="", box="", mask_hint=None, coordinates="pixels",
                model_type="auto", multimask=True):
        return wrap_errors(NODE, _segment, image, sam_model, points, negative_points, box, mask_hint, coordinates,
                           model_type, multimask)


def _prompt(image_hw, points, negative_points, box, fractions) -> sam.SamPrompt:
    pos = sam.to_pixels(sam.parse_points(points, "points"), image_hw, fractions)
    neg = sam.to_pixels(sam.parse_points(negative_points, "negative_points"), image_hw, fractions)
    rect = sam.parse_box(box)
    rect = None if rect is None else sam.to_pixels(rect, image_hw, fractions)
    for name, coords in (("points", pos), ("negative_points", neg), ("box", rect if rect is not None else pos[:0])):
        sam.check_inside(coords, image_hw, name)
    labels = torch.cat([torch.ones(pos.shape[0]), torch.zeros(neg.shape[0])])
    return sam.SamPrompt(torch.cat([pos, neg]), labels, rect)


def _hints(mask_hint, batch: int, image_hw: tuple[int, int]) -> torch.Tensor:
    """The hint per image, stretched to the image's frame like every MASK input (masks/ops.py), [B, H, W]."""
    hints = ops.as_mask_batch(mask_hint, batch, "mask_hint")
    if tuple(hints.shape[-2:]) == image_hw:
        return hints
    if ops.aspect_mismatch(tuple(hints.shape[-2:]), image_hw):
        log.warning("%s: mask_hint is %dx%d but the image is %dx%d; the hint is stretched to the image", NODE,
                    hints.shape[-1], hints.shape[-2], image_hw[1], image_hw[0])
    return ops.mask_to_grid(hints, image_hw)[:, 0]


def _segment(image, sam_model, points, negative_points, box, mask_hint, coordinates, model_type, multimask):
    if image.ndim != 4 or image.shape[0] == 0:
        raise AttnEditError(NODE, f"`image` has shape {tuple(image.shape)}; connect an IMAGE")
    if coordinates not in COORDINATES:
        raise AttnEditError(NODE, f"`coordinates` {coordinates!r} is unknown; choose pixels or fraction")
    batch, image_hw = image.shape[0], (int(image.shape[1]), int(image.shape[2]))
    prompt = _prompt(image_hw, points, negative_points, box, coordinates == "fraction")
    hints = None if mask_hint is None else _hints(mask_hint, batch, image_hw)
    if prompt.empty and hints is None:
        raise AttnEditError(NODE, "nothing to segment: give `points` on the object, a `box`, or connect `mask_hint`")
    if prompt.empty:
        empty = [i for i in range(batch) if float(hints[i].max()) <= 0]
        if empty:
            raise AttnEditError(NODE, f"`mask_hint` of image {empty[0]} is empty and no `points` or `box` are given: "
                                      "nothing to segment; paint the object in the hint or give points on it")
    sam.import_sam()  # the install hint before any file is read
    model = sam.load_sam(comfy_io.sam_checkpoint_path(sam_model), model_type)
    device = comfy_io.compute_device()
    bar = comfy_io.progress_bar(batch)
    masks, scores = [], []
    try:
        model.to(device)
        for i in range(batch):
            comfy_io.check_interrupt()
            hint = None if hints is None else hints[i]
            mask, score = sam.predict_mask(model, image[i].to(device), prompt, hint, bool(multimask))
            masks.append(mask.to(comfy_io.intermediate_device()))
            scores.append(score)
            bar.update(1)
    finally:
        del model  # nothing of SAM outlives the node
    return torch.stack(masks).float(), float(sum(scores) / len(scores))


NODES = {"AttnEditSAMMask": (AttnEditSAMMask, "SAM Mask")}
