"""Make docs/instdiffedit_finish.png: InstDiffEdit's finishes side by side on one synthetic test picture.

What it is: the pack's InstDiffEdit node run on the TINY RANDOM-WEIGHT test models (tools/tiny_models.py: a random
UNet, CLIP and VAE, and a random 9-channel inpainting UNet) at 128x128 px, CPU, 10 steps. The "edit" is therefore
noise, not a picture: the figure shows WHERE the output's pixels come from (kept, faded, regenerated) and the shape
of the edge between them, not the quality of an edit. Panels: input, instant mask (8-px latent cells), inpaint with a
hard paste-back (feather 0: the block edge), inpaint with the default feathered paste-back (16 px), the reference's
full-frame inpainting without paste-back, and full frame with the feathered paste-back.

Usage: python tools/instdiffedit_finish_figure.py [--out docs/instdiffedit_finish.png]
(ComfyUI from COMFYUI_PATH or the CI host, like the tests; no download.)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import comfy_host  # noqa: E402
import tiny_models  # noqa: E402

SIZE = 128
STEPS = 10
TEXT = "a photo of a dog on grass"
SCALE = 2  # nearest-neighbour enlargement of each panel, so single pixels stay visible


def test_picture(seed: int = 3) -> torch.Tensor:
    """A smooth synthetic picture [1, H, W, 3]: three coloured discs on a gradient (the tests' make_image)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    img = torch.stack([xx, yy, 1 - xx], -1) * 0.5
    for _ in range(3):
        cx, cy, r = torch.rand(3, generator=g).tolist()
        disc = (((xx - cx) ** 2 + (yy - cy) ** 2) < (0.1 + 0.2 * r) ** 2).float()
        img = img * (1 - disc[..., None]) + disc[..., None] * torch.rand(3, generator=g)
    return img[None].clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(comfy_host.REPO_ROOT, "docs", "instdiffedit_finish.png"))
    args = parser.parse_args()
    comfy_host.boot()
    from PIL import Image, ImageDraw

    import nodes

    bundle = tiny_models.make_bundle(0)
    with torch.inference_mode():
        inpaint = tiny_models.make_inpaint_model()
    node = nodes.NODE_CLASS_MAPPINGS["AttnEditInstantEdit"]()
    image = test_picture()

    def edit(**kw):
        with torch.inference_mode():
            out = node.edit(image=image, model=bundle.model, clip=bundle.clip, vae=bundle.vae, edit_text=TEXT,
                            inpaint_model=inpaint, steps=STEPS, seeds=1, phi=0.8, **kw)
        return out["result"] if isinstance(out, dict) else out

    hard, mask, _ = edit(feather=0)
    soft, _, _ = edit()
    full, _, _ = edit(finish="inpaint full frame", paste_back=False)
    full_soft, _, _ = edit(finish="inpaint full frame")
    panels = [("input", image), ("instant mask", mask[..., None].expand(-1, -1, -1, 3)),
              ("inpaint, feather 0", hard), ("inpaint, feather 16", soft), ("full frame", full),
              ("full frame, feather 16", full_soft)]
    side, label = SIZE * SCALE, 16
    sheet = Image.new("RGB", (side * len(panels), side + label), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, pic) in enumerate(panels):
        arr = (pic[0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        sheet.paste(Image.fromarray(arr).resize((side, side), Image.NEAREST), (i * side, label))
        draw.text((i * side + 4, 2), name, fill="black")
    sheet.save(args.out)
    print(f"wrote {args.out}")  # tools/ script output, not package code


if __name__ == "__main__":
    main()
