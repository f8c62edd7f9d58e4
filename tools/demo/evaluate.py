"""The demo model's own colour / shape accuracy on generated samples (recorded in docs/demo_model.md).

    python tools/demo/evaluate.py [--n 36] [--steps 20] [--cfg 7.5] [--weights models/demo/attnedit_demo.safetensors]

Samples one-object captions "a <colour> <shape> on a <background> background" (every colour x shape x background
cycled, seed = index) with core KSampler (DDIM, ddim_uniform) at 128 px, then reads the picture back with
world.describe: colour = nearest palette colour of the median non-background pixel, shape = fill ratio of the
object's bounding box. Prints the accuracies and writes a contact sheet next to the weights unless --no-sheet.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from demo import world  # noqa: E402


def evaluate(n: int = 36, steps: int = 20, cfg: float = 7.5, weights: str | None = None, sheet: str | None = None):
    import comfy_host

    comfy_host.boot()
    import nodes

    cm = comfy_host.boot().module("inversion.comfy_model")
    path = weights or os.path.join(comfy_host.REPO_ROOT, "models", "demo", "attnedit_demo.safetensors")
    with torch.inference_mode():
        model, clip, vae = cm.load_demo_model(path)
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    combos = list(itertools.product(world.COLOURS, world.SHAPES, world.BACKGROUNDS))
    rng = np.random.default_rng(0)
    combos = [combos[i] for i in rng.permutation(len(combos))]
    colour_ok = shape_ok = 0
    tiles = []
    for i in range(n):
        colour, shape, bg = combos[i % len(combos)]
        text = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape} on a {bg} background"
        with torch.inference_mode():
            pos = nodes.CLIPTextEncode().encode(clip, text)[0]
            lat = nodes.EmptyLatentImage().generate(128, 128, 1)[0]
            out = nodes.KSampler().sample(model, i, steps, cfg, "ddim", "ddim_uniform", pos, neg, lat)[0]
            img = nodes.VAEDecode().decode(vae, out)[0][0].clamp(0, 1).numpy()
        got_colour, got_shape, _ = world.describe(img, bg)
        colour_ok += got_colour == colour
        shape_ok += got_shape == shape
        tiles.append(img)
    if sheet:
        from PIL import Image

        cols = 9
        rows = [np.concatenate(tiles[r * cols:(r + 1) * cols], 1) for r in range(len(tiles) // cols)]
        if rows:
            Image.fromarray((np.concatenate(rows, 0) * 255).round().astype(np.uint8)).save(sheet)
    return colour_ok / n, shape_ok / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=36)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--weights")
    p.add_argument("--sheet", help="write a contact sheet PNG here")
    args = p.parse_args(argv)
    c, s = evaluate(args.n, args.steps, args.cfg, args.weights, args.sheet)
    print(f"colour accuracy {c:.2f}, shape accuracy {s:.2f} on {args.n} samples ({args.steps} DDIM steps, cfg {args.cfg})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
