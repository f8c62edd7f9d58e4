"""Compose README's before/after picture from the demo input and what `scripts/run.sh` wrote.

    ./scripts/run.sh --out out/demo && .venv/bin/python tools/demo/readme_image.py out/demo/attnedit_word_swap_00001_.png

Writes docs/img/demo_edit.png: input | edit, each scaled x2 (nearest) so the 128 px pictures are visible.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCE = os.path.join(REPO, "workflows", "assets", "demo_red_circle.png")
OUT = os.path.join(REPO, "docs", "img", "demo_edit.png")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    a = np.asarray(Image.open(SOURCE).convert("RGB"))
    b = np.asarray(Image.open(argv[0]).convert("RGB").resize(a.shape[1::-1]))
    gap = np.full((a.shape[0], 8, 3), 255, np.uint8)
    pic = Image.fromarray(np.concatenate([a, gap, b], 1))
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    pic.resize((pic.width * 2, pic.height * 2), Image.NEAREST).save(OUT)
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
