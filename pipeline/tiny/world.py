"""A procedural moving-shapes world: the data the bundled tiny HunyuanVideo is trained on.

One shape (circle, square, triangle) of one colour moves left, right, up, down or stays still
over a plain background of another colour. Every clip is a pure function of its seed, and its
prompt comes from a fixed grammar, so the tiny model's outputs can be scored without weights
(see `pipeline.tiny.scorer`).
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 215, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("left", "right", "up", "down", "still")

# Held out of training: these (shape colour, shape) pairs never appear in a training clip, so
# evaluation can test combinations the model has never seen together.
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square")})
# Training seeds are drawn below this bound; evaluation seeds at or above it.
EVAL_SEED_BASE = 1_000_000_000

HEIGHT = 32
WIDTH = 32
NUM_FRAMES = 17
_SUPERSAMPLE = 4
_PROMPT_RE = re.compile(
    r"^a (?P<color>\w+) (?P<shape>\w+) (?:moving (?P<motion>left|right|up|down)|standing still) "
    r"on a (?P<background>\w+) background$")
_DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0)}


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip."""

    shape: str
    color: str
    background: str
    motion: str
    radius: float
    speed: float
    start: tuple[float, float]  # centre (x, y) in pixels at frame 0

    @property
    def prompt(self) -> str:
        return make_prompt(self.shape, self.color, self.background, self.motion)


def make_prompt(shape: str, color: str, background: str, motion: str) -> str:
    action = "standing still" if motion == "still" else f"moving {motion}"
    return f"a {color} {shape} {action} on a {background} background"


def parse_prompt(prompt: str) -> dict[str, str]:
    """Inverse of `make_prompt`; raises ValueError for text outside the grammar."""
    m = _PROMPT_RE.match(" ".join(prompt.strip().lower().split()))
    if not m or m["color"] not in COLORS or m["background"] not in COLORS or m["shape"] not in SHAPES:
        raise ValueError(f"prompt {prompt!r} is not in the tiny world's grammar: "
                         "'a <colour> <shape> moving <left|right|up|down> on a <colour> background' "
                         "or '... standing still on ...'")
    return {"shape": m["shape"], "color": m["color"], "background": m["background"], "motion": m["motion"] or "still"}


def vocabulary() -> list[str]:
    """Every word the grammar can produce (the tiny text encoders' vocabulary)."""
    words = {"a", "on", "background", "moving", "standing", "still", *COLORS, *SHAPES, *MOTIONS}
    return sorted(words)


def all_attribute_combinations() -> list[tuple[str, str, str, str]]:
    """(shape, colour, background, motion) for every prompt the grammar allows."""
    return [(s, c, b, m) for s, c, b, m in itertools.product(SHAPES, COLORS, COLORS, MOTIONS) if c != b]


def sample_spec(seed: int, *, shape=None, color=None, background=None, motion=None,
                height: int = HEIGHT, width: int = WIDTH, num_frames: int = NUM_FRAMES,
                split: str = "train") -> ClipSpec:
    """Draw a clip from the seed; fixed attributes override the draw.

    `split="train"` never draws a held-out (colour, shape) pair unless it is asked for.
    """
    rng = random.Random(seed)
    while True:
        s = shape or rng.choice(SHAPES)
        c = color or rng.choice(list(COLORS))
        if split == "train" and shape is None and color is None and (c, s) in HELD_OUT_PAIRS:
            continue
        break
    b = background or rng.choice([k for k in COLORS if k != c])
    if b == c:
        raise ValueError(f"background colour {b!r} must differ from the shape colour")
    m = motion or rng.choice(MOTIONS)
    radius = rng.uniform(6.0, 7.5) * min(height, width) / 32
    speed = rng.uniform(0.6, 0.85) * min(height, width) / 32 * 16 / max(num_frames - 1, 1)
    dx, dy = _DIRECTIONS[m]
    travel = speed * (num_frames - 1)
    x0 = rng.uniform(*start_range(width, dx, radius, travel))
    y0 = rng.uniform(*start_range(height, dy, radius, travel))
    return ClipSpec(s, c, b, m, radius, speed, (x0, y0))


def start_range(extent: float, direction: float, radius: float, travel: float) -> tuple[float, float]:
    """Where a shape may start along one axis so that it stays in the frame while it travels."""
    lo, hi = radius + 0.5, extent - radius - 0.5
    if direction > 0:
        hi -= travel
    elif direction < 0:
        lo += travel
    return lo, max(lo, hi)


def _shape_mask(shape: str, cx: float, cy: float, r: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        h = r * 0.886  # same area as the circle of radius r
        return (np.abs(xs - cx) <= h) & (np.abs(ys - cy) <= h)
    if shape == "triangle":
        # Upward-pointing isosceles triangle inside the box [cx-r, cx+r] x [cy-r, cy+r].
        top, bottom = cy - r, cy + r
        t = (ys - top) / (2 * r)  # 0 at the apex, 1 at the base
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= r * t)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(spec: ClipSpec, height: int = HEIGHT, width: int = WIDTH, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Render a clip as uint8 frames of shape (num_frames, height, width, 3), anti-aliased."""
    ss = _SUPERSAMPLE
    coords_y = (np.arange(height * ss) + 0.5) / ss
    coords_x = (np.arange(width * ss) + 0.5) / ss
    ys, xs = np.meshgrid(coords_y, coords_x, indexing="ij")
    fg = np.asarray(COLORS[spec.color], dtype=np.float32)
    bg = np.asarray(COLORS[spec.background], dtype=np.float32)
    dx, dy = _DIRECTIONS[spec.motion]
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for f in range(num_frames):
        cx = spec.start[0] + dx * spec.speed * f
        cy = spec.start[1] + dy * spec.speed * f
        cover = _shape_mask(spec.shape, cx, cy, spec.radius, xs, ys).astype(np.float32)
        cover = cover.reshape(height, ss, width, ss).mean(axis=(1, 3))[..., None]
        frames[f] = np.clip(np.rint(cover * fg + (1 - cover) * bg), 0, 255).astype(np.uint8)
    return frames


def eval_specs(n: int = 48, *, height: int = HEIGHT, width: int = WIDTH, num_frames: int = NUM_FRAMES) -> list[ClipSpec]:
    """A fixed held-out evaluation set: unseen seeds; every third clip uses a held-out pair.

    The other clips draw shape and colour freely, so some of them are held-out pairs too (25 of 48).
    """
    held = sorted(HELD_OUT_PAIRS)
    specs = []
    for i in range(n):
        seed = EVAL_SEED_BASE + i
        if i % 3 == 0:
            color, shape = held[(i // 3) % len(held)]
            specs.append(sample_spec(seed, shape=shape, color=color, motion=MOTIONS[i % len(MOTIONS)],
                                     height=height, width=width, num_frames=num_frames, split="eval"))
        else:
            specs.append(sample_spec(seed, motion=MOTIONS[i % len(MOTIONS)], height=height, width=width,
                                     num_frames=num_frames, split="eval"))
    return specs
