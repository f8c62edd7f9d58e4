"""Segment Anything (Kirillov et al., ICCV 2023) masks from points / a box / a mask hint. Pure torch + the optional
`segment-anything` package, imported lazily (install hint: pip install segment-anything).

The architecture is read from the checkpoint itself (`infer_config`), so the official vit_b / vit_l / vit_h files and
any smaller model built from the package's classes load the same way; weights are read with safetensors or
`torch.load(weights_only=True)` (never unpickled code).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SAM_TYPES = {"vit_b": 768, "vit_l": 1024, "vit_h": 1280}  # encoder width of the official checkpoints
SAM_EXTENSIONS = (".pth", ".pt", ".bin", ".safetensors")
DECODER_HEADS = 8  # TwoWayTransformer heads in every official SAM (not recoverable from weight shapes)
MASK_HINT_LOGIT = 10.0  # a MASK hint enters SAM's low-res mask prompt as +-10 logits (inside / outside)
PIXEL_MEAN = (123.675, 116.28, 103.53)  # segment_anything.build_sam
PIXEL_STD = (58.395, 57.12, 57.375)
INSTALL_HINT = ("the `segment-anything` package is not installed; install it into ComfyUI's Python with "
                "`pip install segment-anything` and restart ComfyUI")


class SamError(ValueError):
    """A SAM input or checkpoint that cannot be used (message says what and how to fix it)."""


@dataclass(frozen=True)
class SamConfig:
    """Every size of a SAM model (segment_anything.build_sam._build_sam's arguments, generalised)."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int
    img_size: int
    patch_size: int
    mlp_ratio: float
    qkv_bias: bool
    prompt_dim: int
    mask_in_chans: int
    decoder_depth: int
    decoder_mlp_dim: int
    iou_head_depth: int
    iou_head_hidden: int
    multimask_outputs: int

    @property
    def model_type(self) -> str:
        """"vit_b" / "vit_l" / "vit_h" for the official sizes, else "custom"."""
        for name, width in SAM_TYPES.items():
            if self.embed_dim == width and self.img_size == 1024:
                return name
        return "custom"


def import_sam():
    """The segment_anything package, or a SamError with the install hint."""
    try:
        import segment_anything
    except ImportError as err:
        raise SamError(INSTALL_HINT) from err
    return segment_anything


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Weights of a SAM checkpoint file (.safetensors, or a torch file read with weights_only=True)."""
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path, device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled code, corrupt file
            raise SamError(f"cannot read SAM checkpoint {os.path.basename(path)!r} safely ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:200]}); use the official .pth or a .safetensors file") from err
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not sd:
        raise SamError(f"{os.path.basename(path)!r} holds no state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def _count(sd: dict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in sd for m in [pattern.match(k)] if m}
    return max(found) + 1 if found else 0


def infer_config(sd: dict[str, torch.Tensor], name: str = "checkpoint") -> SamConfig:
    """The SamConfig of a state dict (official or custom sizes); SamError when it is not a SAM checkpoint."""
    try:
        patch = sd["image_encoder.patch_embed.proj.weight"]
        grid = sd["image_encoder.pos_embed"].shape[1]
        depth = _count(sd, "image_encoder.blocks.")
        embed, patch_size = patch.shape[0], patch.shape[-1]
        spans = [(sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2 for i in range(depth)]
        head_dim = sd["image_encoder.blocks.0.attn.rel_pos_h"].shape[1]
        windows = {s for s in spans if s != grid}
        prompt_dim = sd["mask_decoder.mask_tokens.weight"].shape[1]
        return SamConfig(
            embed_dim=embed, depth=depth, num_heads=embed // head_dim,
            global_attn_indexes=tuple(i for i, s in enumerate(spans) if s == grid),
            window_size=windows.pop() if windows else grid, img_size=grid * patch_size, patch_size=patch_size,
            mlp_ratio=sd["image_encoder.blocks.0.mlp.lin1.weight"].shape[0] / embed,
            qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd, prompt_dim=prompt_dim,
            mask_in_chans=sd["prompt_encoder.mask_downscaling.3.weight"].shape[0],
            decoder_depth=_count(sd, "mask_decoder.transformer.layers."),
            decoder_mlp_dim=sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
            iou_head_depth=_count(sd, "mask_decoder.iou_prediction_head.layers."),
            iou_head_hidden=sd["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
            multimask_outputs=sd["mask_decoder.mask_tokens.weight"].shape[0] - 1)
    except (KeyError, IndexError) as err:
        raise SamError(f"{name} is not a Segment Anything checkpoint (missing {err}); use sam_vit_b/l/h from "
                       "https://github.com/facebookresearch/segment-anything") from None


def build_sam(config: SamConfig):
    """An (uninitialised-weights) segment_anything.modeling.Sam of the given sizes, in eval mode on the CPU."""
    from functools import partial

    sam_pkg = import_sam()
    modeling = sam_pkg.modeling
    grid = config.img_size // config.patch_size
    encoder = modeling.ImageEncoderViT(
        depth=config.depth, embed_dim=config.embed_dim, img_size=config.img_size, mlp_ratio=config.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=config.num_heads, patch_size=config.patch_size,
        qkv_bias=config.qkv_bias, use_rel_pos=True, global_attn_indexes=config.global_attn_indexes,
        window_size=config.window_size, out_chans=config.prompt_dim)
    prompt = modeling.PromptEncoder(embed_dim=config.prompt_dim, image_embedding_size=(grid, grid),
                                    input_image_size=(config.img_size, config.img_size),
                                    mask_in_chans=config.mask_in_chans)
    transformer = modeling.TwoWayTransformer(depth=config.decoder_depth, embedding_dim=config.prompt_dim,
                                             mlp_dim=config.decoder_mlp_dim, num_heads=DECODER_HEADS)
    decoder = modeling.MaskDecoder(num_multimask_outputs=config.multimask_outputs, transformer=transformer,
                                   transformer_dim=config.prompt_dim, iou_head_depth=config.iou_head_depth,
                                   iou_head_hidden_dim=config.iou_head_hidden)
    return modeling.Sam(image_encoder=encoder, prompt_encoder=prompt, mask_decoder=decoder,
                        pixel_mean=list(PIXEL_MEAN), pixel_std=list(PIXEL_STD)).eval()


def load_sam(path: str, model_type: str = "auto"):
    """A SAM model with the checkpoint's weights; `model_type` ("auto" or vit_b/l/h) must match the checkpoint."""
    name = os.path.basename(path)
    sd = load_state_dict(path)
    config = infer_config(sd, repr(name))
    if model_type != "auto" and model_type != config.model_type:
        raise SamError(f"`model_type` is {model_type!r} but {name!r} is a {config.model_type} checkpoint (encoder "
                       f"width {config.embed_dim}); choose 'auto' or {config.model_type!r}")
    sam = build_sam(config)
    try:
        sam.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise SamError(f"{name!r} does not fit the SAM architecture read from it: {str(err).splitlines()[0]}") from None
    return sam


# ------------------------------------------------------------------------------------------------ prompts
def _numbers(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in re.split(r"[\s,;\[\]()]+", text.strip()) if x]
    except ValueError:
        raise SamError(f"`{name}` = {text!r} is not a list of numbers; write points as \"x,y; x,y\" and a box as "
                       "\"x1,y1,x2,y2\"") from None


def parse_points(text: str, name: str = "points") -> torch.Tensor:
    """"x,y; x,y" (or "[[x,y],[x,y]]") -> [K, 2] float; empty text -> [0, 2]."""
    values = _numbers(text, name)
    if len(values) % 2:
        raise SamError(f"`{name}` = {text!r} has an odd count of numbers; give x,y pairs: \"120,80; 200,150\"")
    return torch.tensor(values, dtype=torch.float32).view(-1, 2)


def parse_box(text: str) -> torch.Tensor | None:
    """"x1,y1,x2,y2" -> [4] (corners sorted), empty -> None."""
    values = _numbers(text, "box")
    if not values:
        return None
    if len(values) != 4:
        raise SamError(f"`box` = {text!r} must be four numbers x1,y1,x2,y2 (left, top, right, bottom)")
    x1, y1, x2, y2 = values
    return torch.tensor([min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)], dtype=torch.float32)


def to_pixels(coords: torch.Tensor, image_hw: tuple[int, int], fractions: bool) -> torch.Tensor:
    """Coordinates (x, y, ...) as pixels: scaled by (W, H) when given as fractions of the image size."""
    if not fractions or coords.numel() == 0:
        return coords
    scale = torch.tensor([image_hw[1], image_hw[0]], dtype=coords.dtype).repeat(coords.shape[-1] // 2)
    return coords * scale


def check_inside(coords: torch.Tensor, image_hw: tuple[int, int], name: str) -> None:
    """A point or box corner outside the picture is a user error (usually fractions given as pixels or vice versa)."""
    if coords.numel() == 0:
        return
    xy = coords.view(-1, 2)
    h, w = image_hw
    if bool((xy[:, 0] < 0).any() or (xy[:, 0] > w).any() or (xy[:, 1] < 0).any() or (xy[:, 1] > h).any()):
        raise SamError(f"`{name}` has coordinates outside the {w}x{h} px image: {xy.tolist()}; give pixels in the "
                       "image (or set `coordinates` to 'fraction' for values in 0..1)")


def hint_to_logits(hint: torch.Tensor, img_size: int, low_res_hw: tuple[int, int]) -> torch.Tensor:
    """A MASK hint [H, W] in [0, 1] -> SAM's low-res mask prompt [1, h, w] in logits.

    SAM's mask prompt covers the image resized so its long side is `img_size`, padded bottom/right to a square, at
    1/4 resolution (256x256 for the official models).
    """
    h, w = hint.shape
    scale = img_size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = F.interpolate(hint[None, None].float(), size=(nh, nw), mode="bilinear", align_corners=False)
    padded = F.pad(resized, (0, img_size - nw, 0, img_size - nh))
    low = F.interpolate(padded, size=low_res_hw, mode="area")[0]
    return (low * 2.0 - 1.0) * MASK_HINT_LOGIT


@dataclass(frozen=True)
class SamPrompt:
    """One image's SAM prompt in pixels: points [K, 2] with labels [K] (1 = object, 0 = background), box [4]."""

    points: torch.Tensor
    labels: torch.Tensor
    box: torch.Tensor | None

    @property
    def empty(self) -> bool:
        return self.points.shape[0] == 0 and self.box is None


def predict_mask(sam, image: torch.Tensor, prompt: SamPrompt, hint: torch.Tensor | None = None,
                 multimask: bool = True) -> tuple[torch.Tensor, float]:
    """SAM mask of one IMAGE [H, W, 3] (values 0..1) -> (mask [H, W] in {0, 1}, predicted IoU of the chosen mask).

    With `multimask` SAM proposes several masks and the one with the highest predicted IoU is returned.
    """
    sam_pkg = import_sam()
    predictor = sam_pkg.SamPredictor(sam)
    device = predictor.device
    hw = (int(image.shape[0]), int(image.shape[1]))
    # The official numpy path (uint8 RGB, resized by ResizeLongestSide.apply_image): segment-anything 1.0's
    # apply_image_torch sizes the picture from its batch and channel dimensions (upstream issue #218), which squashes
    # it into the top rows of SAM's frame while the prompts are scaled to the whole frame.
    predictor.set_image((image[..., :3].float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy(), "RGB")
    coords = labels = box = mask_input = None
    if prompt.points.shape[0]:
        coords = predictor.transform.apply_coords_torch(prompt.points.to(device), hw)[None]
        labels = prompt.labels.to(device=device, dtype=torch.int)[None]
    if prompt.box is not None:
        box = predictor.transform.apply_boxes_torch(prompt.box.to(device)[None], hw)
    if hint is not None:
        low_res = tuple(sam.prompt_encoder.mask_input_size)
        mask_input = hint_to_logits(hint, sam.image_encoder.img_size, low_res).to(device)[None]
    with torch.no_grad():
        masks, scores, _ = predictor.predict_torch(coords, labels, box, mask_input, multimask_output=multimask)
    best = int(scores[0].argmax())
    mask = masks[0, best].float()
    predictor.reset_image()
    return mask, float(scores[0, best])
