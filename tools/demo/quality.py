"""Edit quality on the demo model, measured against the shapes world's ground truth (tests/test_demo_quality.py and
the docs/quality.md table).

    python tools/demo/quality.py      # prints the docs/quality.md table (boots the host in COMFYUI_PATH)

Every edit goes through the pack's nodes as a workflow would (Invert Image -> Prompt-to-Prompt Attention Hook ->
Attention Edit Sampler -> VAE Decode) at 128 px and few steps. Measures (all on 0..1 sRGB pictures):
- colour_share: share of the pixels inside the (eroded) ground-truth object mask whose nearest palette colour (object
  colours plus the scene's background) is the wanted colour;
- background_change: mean absolute RGB difference to the input outside the (dilated) object mask;
- object IoU: the edited picture's object mask (pixels far from the background colour) against the ground truth.
These numbers are regression tests of the pack on a toy model, not claims about SD1.5 photos.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from demo import world  # noqa: E402

STEPS, CFG, INNER_STEPS = 10, 7.5, 5  # null-text inversion at 10 steps: seconds on a CPU at 128 px
CROSS_REPLACE, SELF_REPLACE = 0.8, 0.5  # the pack's P2P word-swap defaults
SDEDIT_DENOISE = 0.8  # SDEdit baseline: img2img re-noising 80% of the schedule (as many steps as cross_replace edits)
SOURCE = world.make_scene([("circle", "red", 0.5, 0.52, 0.22)], "gray")
TARGET_COLOUR = "blue"


@dataclass(frozen=True)
class EditResult:
    image: np.ndarray  # [H, W, 3] 0..1
    attention: object = None


def node(node_id: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[node_id]()


def call(node_id: str, fn: str | None = None, **inputs):
    obj = node(node_id)
    with torch.inference_mode():
        out = getattr(obj, fn or obj.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "models", "demo", "attnedit_demo.safetensors")


def shipped_training() -> dict:
    """The shipped weights' training record (safetensors metadata: step, samples, seed, seconds, VAE PSNR)."""
    from safetensors import safe_open

    with safe_open(WEIGHTS, framework="pt") as f:
        return dict(f.metadata() or {})


def load_demo():
    return call("AttnEditDemoModel", weights="attnedit_demo.safetensors")


def scene_image(scene: world.Scene) -> torch.Tensor:
    return torch.from_numpy(world.render(scene)[0])[None]


def swap_colour(scene: world.Scene, index: int, colour: str) -> world.Scene:
    objs = list(scene.objects)
    o = objs[index]
    objs[index] = world.Obj(o.shape, colour, o.cx, o.cy, o.r)
    return world.Scene(tuple(objs), scene.background)


def invert(bundle, scene: world.Scene):
    model, clip, vae = bundle
    return call("AttnEditInvert", model=model, clip=clip, source_prompt=scene.caption, method="null_text",
                steps=STEPS, cfg=CFG, image=scene_image(scene), vae=vae, inner_steps=INNER_STEPS)


def p2p(bundle, scene: world.Scene, target_prompt: str, local_blend: str = "", inversion=None) -> EditResult:
    """Prompt-to-Prompt word swap on the inverted scene."""
    import nodes

    model, clip, vae = bundle
    inversion = inversion or invert(bundle, scene)[0]
    hooked = call("AttnEditAttentionHook", model=model, clip=clip, source_prompt=scene.caption,
                  target_prompt=target_prompt, mode="replace", cross_replace=CROSS_REPLACE,
                  self_replace=SELF_REPLACE, local_blend=local_blend)
    latent, _, attention = call("AttnEditEditSampler", model=hooked[0], inversion=inversion)
    with torch.inference_mode():
        img = nodes.VAEDecode().decode(vae, latent)[0]
    return EditResult(img[0].clamp(0, 1).numpy(), attention)


def sdedit(bundle, scene: world.Scene, target_prompt: str, seed: int = 0) -> EditResult:
    """Baseline: img2img (SDEdit) with the target prompt at denoise SDEDIT_DENOISE, same steps and guidance."""
    import nodes

    model, clip, vae = bundle
    with torch.inference_mode():
        latent = nodes.VAEEncode().encode(vae, scene_image(scene))[0]
        pos = nodes.CLIPTextEncode().encode(clip, target_prompt)[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        out = nodes.KSampler().sample(model, seed, STEPS, CFG, "ddim", "ddim_uniform", pos, neg, latent,
                                      denoise=SDEDIT_DENOISE)[0]
        img = nodes.VAEDecode().decode(vae, out)[0]
    return EditResult(img[0].clamp(0, 1).numpy())


def decode(vae, latent) -> np.ndarray:
    import nodes

    with torch.inference_mode():
        return nodes.VAEDecode().decode(vae, latent)[0][0].clamp(0, 1).numpy()


def gt_mask(scene: world.Scene, index: int = 0, grow: int = 0) -> torch.Tensor:
    """The ground-truth MASK [1, H, W] of object `index`, dilated by `grow` px."""
    m = world.render(scene)[1][index]
    return torch.from_numpy(dilate(m, grow) if grow else m).float()[None]


def cpam_remove(bundle, scene: world.Scene, inversion=None) -> EditResult:
    """CPAM 'remove object' with the ground-truth mask grown by 3 px (the workflow's advice: cover the outline)."""
    model, clip, vae = bundle
    inversion = inversion or invert(bundle, scene)[0]
    patched = call("AttnEditCPAMSelfAttn", model=model, inversion=inversion, clip=clip,
                   source_mask=gt_mask(scene, grow=3), target_prompt="", strategy="remove object")
    latent = call("AttnEditEditSampler", model=patched[0], inversion=inversion, source_branch="pin to inversion")[0]
    return EditResult(decode(vae, latent))


def attention_ablation(bundle, scene: world.Scene, inversion_outputs, ablate: str) -> EditResult:
    """Diagnosis of the CPAM removal failure: denoise the inversion's noise latent with the source prompt (plain
    ComfyUI SamplerCustom, DDIM, cfg CFG, empty negative) while every self-attention ("self"), cross-attention
    ("cross") or both ("both") output is zeroed through ComfyUI's attn1/attn2 output patches; "none" zeroes nothing.
    If the object survives with no attention at all, no attention-only removal can take it out of this model."""
    import comfy_extras.nodes_custom_sampler as cs

    import nodes

    model, clip, vae = bundle
    patched = model.clone()
    if ablate in ("self", "both"):
        patched.set_model_attn1_output_patch(lambda n, _extra: torch.zeros_like(n))
    if ablate in ("cross", "both"):
        patched.set_model_attn2_output_patch(lambda n, _extra: torch.zeros_like(n))
    with torch.inference_mode():
        pos = nodes.CLIPTextEncode().encode(clip, scene.caption)[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        sampler = cs.KSamplerSelect().get_sampler("ddim")[0]
        out = cs.SamplerCustom().sample(patched, False, 0, CFG, pos, neg, sampler, inversion_outputs[2],
                                        inversion_outputs[1])[0]
    return EditResult(decode(vae, out))


MAG_ITERATIONS, MAG_GUIDANCE_STEPS, MAG_BLEND_STEPS, MAG_SCALE = 3, 5, 5, 2.5  # 10-step schedule; scale: workflow 07


def mag_edit(bundle, scene: world.Scene, colour: str = TARGET_COLOUR, inversion=None) -> EditResult:
    """MAG-Edit (P2P refine hook -> MAG-Edit Guidance with the ground-truth mask, target word = the new colour)."""
    model, clip, vae = bundle
    inversion = inversion or invert(bundle, scene)[0]
    target = swap_colour(scene, 0, colour).caption
    hooked = call("AttnEditAttentionHook", model=model, clip=clip, source_prompt=scene.caption, target_prompt=target,
                  mode="refine", cross_replace=CROSS_REPLACE, self_replace=SELF_REPLACE)
    guided = call("AttnEditMAGGuidance", model=hooked[0], inversion=inversion, mask=gt_mask(scene),
                  target_words=colour, constraint="token_ratio", max_iterations=MAG_ITERATIONS,
                  guidance_steps=MAG_GUIDANCE_STEPS, scale=MAG_SCALE, negative_words="", blend_steps=MAG_BLEND_STEPS)
    latent = call("AttnEditEditSampler", model=guided[0], inversion=inversion)[0]
    return EditResult(decode(vae, latent))


def removal_scores(result: EditResult, scene: world.Scene = SOURCE) -> dict:
    """background_share: share of the eroded object pixels nearest to the background colour (the object is gone)."""
    ref, masks = world.render(scene)
    return {"background_share": colour_share(result.image, masks[0], scene.background, scene.background),
            "background_change": background_change(result.image, ref, masks[0])}


TWO = world.make_scene([("circle", "red", 0.28, 0.5, 0.15), ("square", "blue", 0.72, 0.5, 0.15)], "gray")
DPL_ITERATIONS = 5  # token and null-text iterations per step (paper: 21 / 10): CI time


def dpl_attention(bundle, scene: world.Scene = TWO):
    """Dynamic Prompt Learning inversion of a two-object scene with nouns "circle, square"; its attention store."""
    model, clip, vae = bundle
    return call("AttnEditDynamicPromptLearn", model=model, clip=clip, source_prompt=scene.caption,
                nouns="circle, square", steps=STEPS, cfg=CFG, image=scene_image(scene), vae=vae,
                token_iterations=DPL_ITERATIONS, null_text_iterations=DPL_ITERATIONS)[1]


def maps_apart_scores(attention, scene: world.Scene = TWO) -> dict:
    """Each noun's local-blend mask against both objects: own-object IoU, other-object IoU, and the two masks' IoU."""
    masks = world.render(scene)[1]
    circle = attention_mask(attention, "circle", image=scene_image(scene))
    square = attention_mask(attention, "square", image=scene_image(scene))
    return {"circle_own": iou(circle, masks[0]), "circle_other": iou(circle, masks[1]),
            "square_own": iou(square, masks[1]), "square_other": iou(square, masks[0]),
            "maps_overlap": iou(circle, square)}


# At 128 px the maps Mask from Attention reads are 4x4 cells (latent 16x16 / 4, as P2P's 16x16 maps at 512 px): P2P's
# 3x3 max-pool (dilation 1), meant for 16x16 maps, grows a centred object's cells over the whole picture there, so the
# masks here use dilation 0, what a user would set at this size.
MASK_DILATION = 0


def attention_mask(attention, words: str, mode: str = "local blend", image=None) -> np.ndarray:
    knobs = {"dilation": MASK_DILATION} if mode == "local blend" else {}
    mask = call("AttnEditMaskFromAttention", attention=attention, mode=mode, words=words,
                image=scene_image(SOURCE) if image is None else image, **knobs)[0]
    return mask[0].numpy() >= 0.5


# ---------------------------------------------------------------------------------------------------- measures
def _shift_any(m: np.ndarray, r: int) -> np.ndarray:
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(m, dy, 0), dx, 1)
    return out


def erode(m: np.ndarray, r: int = 3) -> np.ndarray:
    return ~_shift_any(~m, r)


def dilate(m: np.ndarray, r: int = 6) -> np.ndarray:
    return _shift_any(m, r)


def colour_share(img: np.ndarray, mask: np.ndarray, colour: str, background: str) -> float:
    """Share of the eroded mask's pixels whose nearest palette colour (objects + background) is `colour`."""
    names = (*world.COLOURS, background)
    table = np.asarray([world.COLOURS[n] if n in world.COLOURS else world.BACKGROUNDS[n] for n in names],
                       np.float32) / 255
    px = img[erode(mask)]
    nearest = np.argmin(((px[:, None, :] - table[None]) ** 2).sum(-1), axis=1)
    return float((nearest == names.index(colour)).mean())


def background_change(img: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute RGB difference (0..1) outside the dilated mask."""
    outside = ~dilate(mask)
    return float(np.abs(img[outside] - ref[outside]).mean())


def best_grid_iou(mask: np.ndarray, grid: int = 4) -> float:
    """The highest IoU with `mask` [H, W] that a union of cells of a grid x grid partition can reach: what a mask
    from attention maps on that grid (nearest upsampling) can reach at best. Exhaustive over the cells the mask
    touches (at most the 16 cells of a 4x4 grid)."""
    h, w = mask.shape
    cells = [(mask[i * h // grid:(i + 1) * h // grid, j * w // grid:(j + 1) * w // grid].sum(),
              (h // grid) * (w // grid)) for i in range(grid) for j in range(grid)]
    touched = [c for c in cells if c[0] > 0]
    best, total = 0.0, float(mask.sum())
    for bits in range(1, 2 ** len(touched)):
        chosen = [c for k, c in enumerate(touched) if bits >> k & 1]
        inter = sum(c[0] for c in chosen)
        best = max(best, inter / (sum(c[1] for c in chosen) + total - inter))
    return best


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def object_iou(img: np.ndarray, scene: world.Scene, mask: np.ndarray) -> float:
    return iou(world.object_mask(img, scene.background), mask)


def word_swap_scores(result: EditResult, scene: world.Scene = SOURCE, colour: str = TARGET_COLOUR) -> dict:
    ref, masks = world.render(scene)
    return {"colour_share": colour_share(result.image, masks[0], colour, scene.background),
            "background_change": background_change(result.image, ref, masks[0]),
            "object_iou": object_iou(result.image, scene, masks[0])}


def table() -> str:
    sys.path.insert(0, os.path.dirname(HERE))
    import comfy_host

    comfy_host.boot()
    bundle = load_demo()
    target = swap_colour(SOURCE, 0, TARGET_COLOUR).caption
    inv = invert(bundle, SOURCE)
    rows = {
        "P2P word swap + local blend 'circle'": p2p(bundle, SOURCE, target, "circle", inv[0]),
        "P2P word swap, no local blend (baseline)": p2p(bundle, SOURCE, target, "", inv[0]),
        f"SDEdit, denoise {SDEDIT_DENOISE} (baseline)": sdedit(bundle, SOURCE, target),
    }
    rows["MAG-Edit, ground-truth mask, target word 'blue'"] = mag_edit(bundle, SOURCE, inversion=inv[0])
    lines = ["| method | blue share in object (higher better) | background change (lower better) | object IoU "
             "(higher better) |", "|---|---|---|---|"]
    for name, res in rows.items():
        s = word_swap_scores(res)
        lines.append(f"| {name} | {s['colour_share']:.2f} | {s['background_change']:.3f} | {s['object_iou']:.2f} |")
    gt = world.render(SOURCE)[1][0]
    r = removal_scores(cpam_remove(bundle, SOURCE, inv[0]))
    lines.append(f"\nCPAM remove object: background share in the object {r['background_share']:.2f}, background "
                 f"change {r['background_change']:.3f}")
    shares = {a: removal_scores(attention_ablation(bundle, SOURCE, inv, a))["background_share"]
              for a in ("none", "self", "cross", "both")}
    lines.append("\nDenoising the inverted latent with attention outputs zeroed (background share in the object): "
                 + ", ".join(f"{a} {v:.2f}" for a, v in shares.items()))
    att = rows["P2P word swap + local blend 'circle'"].attention
    for mode in ("local blend", "instant"):
        m = attention_mask(att, "circle", mode)
        lines.append(f"\nMask from Attention ({mode}, 'circle') IoU with the ground-truth object: {iou(m, gt):.2f}")
    for name, att in (("null-text inversion (baseline)", invert(bundle, TWO)[5]), ("DPL", dpl_attention(bundle))):
        d = maps_apart_scores(att)
        lines.append(f"\nTwo objects, {name}: 'circle' mask IoU own/other {d['circle_own']:.2f}/{d['circle_other']:.2f}"
                     f", 'square' own/other {d['square_own']:.2f}/{d['square_other']:.2f}, overlap of the two masks "
                     f"{d['maps_overlap']:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
