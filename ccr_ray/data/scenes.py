"""Procedural scenes for the embedded default dataset: 1-3 coloured shapes on a plain background.

A scene is data (`Scene`), sampled by `SceneSampler` and drawn by `render`. Captions come from
`ccr_ray.data.grammar`. Held-out (shape, position) combinations never appear in train/val and appear in test,
so the test split measures composition, not memorisation. (Not (shape, colour): in Czech the only feminine
noun is "hvězda", so holding out e.g. a red star would leave the feminine forms of "red" unseen in training,
an unknown word rather than a new combination. Position words never agree with anything.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "heart", "hexagon")
COLOURS = {
    "red": (215, 35, 35),
    "green": (35, 165, 50),
    "blue": (40, 70, 225),
    "yellow": (240, 215, 35),
    "purple": (135, 45, 170),
    "orange": (245, 135, 25),
    "pink": (245, 135, 190),
    "brown": (120, 72, 35),
}
SIZES = {"small": 0.42, "medium": 0.66, "large": 0.92}  # object diameter as a fraction of a grid cell
# 3 x 3 grid, row-major: the position words every grammar must name
POSITIONS = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)
BACKGROUNDS = {"white": (242, 242, 242), "black": (18, 18, 18), "grey": (128, 128, 128)}
MAX_OBJECTS = 3


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]  # in caption order (the sampler shuffles it)

    def pairs(self) -> set[tuple[str, str]]:
        """(shape, position) pairs of the scene."""
        return {(o.shape, o.position) for o in self.objects}


def heldout_pairs(seed: int, count: int = len(POSITIONS)) -> frozenset[tuple[str, str]]:
    """`count` (shape, position) pairs held out of train/val: by default one per position, shapes spread."""
    rng = np.random.default_rng([seed, 7])
    perm = rng.permutation(len(SHAPES))
    pairs = [(SHAPES[perm[i % len(SHAPES)]], position) for i, position in enumerate(POSITIONS)]
    return frozenset(pairs[:count])


class SceneSampler:
    """Samples scenes; `held_out` pairs are excluded (train/val) or forced into a fraction of scenes (test)."""

    def __init__(self, held_out: frozenset[tuple[str, str]], max_objects: int = MAX_OBJECTS):
        self.held_out = held_out
        self.max_objects = max_objects
        self.allowed = {p: [s for s in SHAPES if (s, p) not in held_out] for p in POSITIONS}

    def sample(self, rng: np.random.Generator, include_held_out: bool = False) -> Scene:
        n = int(rng.integers(1, self.max_objects + 1))
        if include_held_out:
            held = sorted(self.held_out)
            first_shape, first_position = held[int(rng.integers(len(held)))]
            others = [i for i in range(len(POSITIONS)) if POSITIONS[i] != first_position]
            cells = [POSITIONS.index(first_position)] + list(rng.choice(others, size=n - 1, replace=False))
        else:
            cells = list(rng.choice(len(POSITIONS), size=n, replace=False))
        objects = []
        for k, cell in enumerate(cells):
            position = POSITIONS[int(cell)]
            if include_held_out and k == 0:
                shape = first_shape
            else:
                pool = self.allowed[position]
                shape = pool[int(rng.integers(len(pool)))]
            colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
            size = list(SIZES)[int(rng.integers(len(SIZES)))]
            objects.append(SceneObject(shape, colour, size, position))
        order = rng.permutation(n)
        background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        return Scene(background, tuple(objects[i] for i in order))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
    elif shape == "triangle":
        pts = [(0.0, -1.0), (0.92, 0.75), (-0.92, 0.75)]
    elif shape == "diamond":
        pts = [(0.0, -1.0), (0.72, 0.0), (0.0, 1.0), (-0.72, 0.0)]
    elif shape == "hexagon":
        pts = [(math.cos(a), math.sin(a)) for a in np.arange(6) * math.pi / 3]
    elif shape == "star":
        pts = [((1.0 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                (1.0 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    elif shape == "cross":
        w = 0.34
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w),
               (-w, -w)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 32, endpoint=False)
        pts = [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                            - math.cos(4 * t)) / 17 - 0.1) for t in ts]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def render(scene: Scene, size: int, rng: np.random.Generator, supersample: int = 2) -> Image.Image:
    """Draw the scene at `size` x `size` pixels, with small jitter in place, size, angle and colour."""
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    cell = big / 3
    for obj in scene.objects:
        row, col = divmod(POSITIONS.index(obj.position), 3)
        cx = (col + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        cy = (row + 0.5 + rng.uniform(-0.08, 0.08)) * cell
        r = SIZES[obj.size] * rng.uniform(0.93, 1.07) * cell / 2
        colour = tuple(int(np.clip(v + rng.integers(-12, 13), 0, 255)) for v in COLOURS[obj.colour])
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            angle = 0.0 if obj.shape == "heart" else float(rng.uniform(-0.2, 0.2))
            draw.polygon(_polygon(obj.shape, cx, cy, r, angle), fill=colour)
    if supersample > 1:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return image
