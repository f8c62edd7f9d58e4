"""A deterministic synthetic world of coloured shapes on plain backgrounds, with captions and ground-truth masks.

Scene `i` of seed `s` is always the same picture (numpy Generator seeded with [s, i]): the demo model is trained on
it (tools/demo/train.py) and the quality tests (tests/test_demo_quality.py) edit its scenes and measure the result
against the masks it knows exactly. Pure numpy, no ComfyUI.

Grammar (fixed): "a red circle on a gray background", "an orange square and a blue triangle on a white background"
(two objects are named left to right).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> sRGB 0..255
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 225),
    "yellow": (240, 210, 30), "purple": (140, 40, 180), "orange": (250, 130, 20),
}
BACKGROUNDS = {"gray": (128, 128, 128), "white": (235, 235, 235), "black": (20, 20, 20)}
IMAGE_SIZE = 128
TWO_OBJECT_PROB = 0.2  # share of two-object scenes in training
RADIUS_ONE = (20.0, 34.0)  # object "radius" in px at 128 px (circle radius; square half side ~ 0.88 r)
RADIUS_TWO = (14.0, 22.0)
SUPERSAMPLE = 2  # anti-aliasing: coverage measured on a 2x grid


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float  # centre, as a fraction of the image size (0..1)
    cy: float
    r: float  # radius as a fraction of the image size


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str

    @property
    def caption(self) -> str:
        return caption(self)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """The scene's caption in the fixed grammar (objects left to right)."""
    parts = [f"{_article(o.colour)} {o.colour} {o.shape}" for o in sorted(scene.objects, key=lambda o: o.cx)]
    return f"{' and '.join(parts)} on a {scene.background} background"


def sample_scene(seed: int, index: int, two_object_prob: float = TWO_OBJECT_PROB) -> Scene:
    """Scene `index` of the world with `seed` (deterministic)."""
    rng = np.random.default_rng([int(seed), int(index)])
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    n = 2 if rng.random() < two_object_prob else 1
    colours = list(COLOURS)
    objects = []
    if n == 1:
        r = rng.uniform(*RADIUS_ONE) / IMAGE_SIZE
        cx, cy = rng.uniform(r + 0.04, 1 - r - 0.04, size=2)
        objects.append(Obj(SHAPES[rng.integers(len(SHAPES))], colours[rng.integers(len(colours))], cx, cy, r))
    else:
        picked = rng.choice(len(colours), size=2, replace=False)
        for k, (lo, hi) in enumerate(((0.0, 0.5), (0.5, 1.0))):
            r = rng.uniform(*RADIUS_TWO) / IMAGE_SIZE
            cx = rng.uniform(lo + r + 0.03, hi - r - 0.03)
            cy = rng.uniform(r + 0.04, 1 - r - 0.04)
            objects.append(Obj(SHAPES[rng.integers(len(SHAPES))], colours[picked[k]], cx, cy, r))
    return Scene(tuple(objects), background)


def make_scene(objects: list[tuple[str, str, float, float, float]], background: str = "gray") -> Scene:
    """A hand-placed scene: objects as (shape, colour, cx, cy, r) in image fractions."""
    for shape, colour, *_ in objects:
        if shape not in SHAPES or colour not in COLOURS:
            raise ValueError(f"unknown shape/colour {shape!r}/{colour!r}; shapes {SHAPES}, colours {tuple(COLOURS)}")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; backgrounds {tuple(BACKGROUNDS)}")
    return Scene(tuple(Obj(*o) for o in objects), background)


def _coverage(obj: Obj, size: int) -> np.ndarray:
    """Fraction of each pixel covered by the object, [size, size] float32."""
    n = size * SUPERSAMPLE
    t = (np.arange(n, dtype=np.float32) + 0.5) / n
    x, y = t[None, :] - obj.cx, t[:, None] - obj.cy
    r = obj.r
    if obj.shape == "circle":
        inside = x * x + y * y <= r * r
    elif obj.shape == "square":
        h = 0.88 * r
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    else:  # upward equilateral triangle with circumradius 1.15 r, centred on its centroid
        R = 1.15 * r
        top, base = -R, R / 2  # y grows downwards
        half_w = (y - top) / (base - top) * (R * np.sqrt(3) / 2)
        inside = (y >= top) & (y <= base) & (np.abs(x) <= half_w)
    cov = inside.astype(np.float32).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    return cov


def render(scene: Scene, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(image [size, size, 3] float32 in 0..1, masks [n_objects, size, size] bool: coverage >= 0.5), objects in the
    scene's order."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = np.asarray(BACKGROUNDS[scene.background], np.float32) / 255.0
    masks = []
    for obj in scene.objects:
        cov = _coverage(obj, size)
        colour = np.asarray(COLOURS[obj.colour], np.float32) / 255.0
        img = img * (1 - cov[..., None]) + colour * cov[..., None]
        masks.append(cov >= 0.5)
    return img, np.stack(masks)


def batch(seed: int, start: int, n: int, two_object_prob: float = TWO_OBJECT_PROB, size: int = IMAGE_SIZE):
    """Scenes start..start+n-1: (images [n, size, size, 3] float32, captions list[str], scenes)."""
    scenes = [sample_scene(seed, i, two_object_prob) for i in range(start, start + n)]
    return np.stack([render(s, size)[0] for s in scenes]), [s.caption for s in scenes], scenes


# ---------------------------------------------------------------------------------------------- measuring pictures
def nearest_colour(rgb: np.ndarray, names: tuple[str, ...] | None = None) -> str:
    """The palette colour (object colours, or `names`) nearest to an sRGB 0..1 triple."""
    names = names or tuple(COLOURS)
    table = np.asarray([COLOURS[n] for n in names], np.float32) / 255.0
    return names[int(np.argmin(((table - rgb[None]) ** 2).sum(-1)))]


def object_mask(img: np.ndarray, background: str, threshold: float = 0.25) -> np.ndarray:
    """Pixels of `img` ([H, W, 3], 0..1) further than `threshold` (RGB Euclidean) from the background colour."""
    bg = np.asarray(BACKGROUNDS[background], np.float32) / 255.0
    return np.sqrt(((img - bg) ** 2).sum(-1)) > threshold


def classify_shape(mask: np.ndarray) -> str | None:
    """circle / square / triangle from the fill ratio of the mask in its bounding box (1.0 square, 0.785 circle,
    0.5 triangle); None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 20:
        return None
    fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    return "square" if fill > 0.9 else ("circle" if fill > 0.64 else "triangle")


def describe(img: np.ndarray, background: str) -> tuple[str | None, str | None, np.ndarray]:
    """(colour, shape, mask) of the single object in a picture with a known background."""
    mask = object_mask(img, background)
    if mask.sum() < 20:
        return None, None, mask
    return nearest_colour(np.median(img[mask], axis=0)), classify_shape(mask), mask
