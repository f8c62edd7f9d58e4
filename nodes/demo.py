"""AttnEditDemoModel: loads the pack's tiny demo text-to-image model (synthetic shapes world) as MODEL, CLIP, VAE."""

from __future__ import annotations

import os

from ..inversion import comfy_model
from .common import AttnEditError, wrap_errors
from .types import CATEGORY

NODE = "Attention Edit Demo Model"
DEMO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "demo")
DEFAULT_WEIGHTS = "attnedit_demo.safetensors"


def demo_weights() -> list[str]:
    """The demo weight files shipped in models/demo (the default first)."""
    names = sorted(f for f in os.listdir(DEMO_DIR) if f.endswith(".safetensors")) if os.path.isdir(DEMO_DIR) else []
    return sorted(names, key=lambda n: n != DEFAULT_WEIGHTS) or [DEFAULT_WEIGHTS]


class AttnEditDemoModel:
    DESCRIPTION = (
        "Loads the pack's tiny demo model (a few MB, shipped in models/demo): a text-to-image model in SD1 layout "
        "trained from scratch on a synthetic world of coloured shapes on plain backgrounds at 128x128 px, e.g. "
        "\"a red circle on a gray background\" (colours red green blue yellow purple orange; shapes circle square "
        "triangle; backgrounds gray white black). Lets every workflow show a real edit on a CPU in seconds. It knows "
        "nothing else: use it for demos and tests, an SD1.5 checkpoint for photos.")
    CATEGORY = f"{CATEGORY}/demo"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    OUTPUT_TOOLTIPS = ("The demo diffusion model (SD1 layout, eps prediction, SD1 latent format).",
                       "Its text encoder (ComfyUI's SD1 tokenizer, 2-layer CLIP text model).",
                       "Its autoencoder (x8 downscale, 4 latent channels); use 128x128 px images.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"weights": (demo_weights(), {
            "tooltip": "Demo weight file in the pack's models/demo folder (tools/demo/export.py writes it)."})}}

    def load(self, weights):
        return wrap_errors(NODE, self._load, weights)

    def _load(self, weights):
        path = os.path.join(DEMO_DIR, os.path.basename(str(weights)))
        if not os.path.isfile(path):
            raise AttnEditError(NODE, f"`weights` {weights!r} is not in {DEMO_DIR} (found: "
                                      f"{', '.join(demo_weights())}); reinstall the pack or run tools/demo/export.py")
        return comfy_model.load_demo_model(path)


NODES = {"AttnEditDemoModel": (AttnEditDemoModel, "Attention Edit Demo Model")}
