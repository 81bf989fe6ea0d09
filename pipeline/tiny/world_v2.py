"""World v2: scenes as hard as real prompts are, for a bundled model that can tell good caching from bad.

World v1 (`pipeline.tiny.world`) draws one flat shape on a flat background, so a model trained on
it denoises along nearly straight paths and 25 plain steps keep ~44 dB to 50. Here a scene has
1 to 3 objects (each its own colour, shape and motion; they may cross, later ones on top), slow
or fast motion, and per-seed high-frequency detail the prompt does not name (striped, checked
or ringed textures of random period, angle and phase on the background and on every object),
so the flow is multimodal where real video's is and sampling paths curve.

The prompt names every object, in drawing order, so word order carries meaning ("a red circle
and a blue square" is not "a blue circle and a red square"):

    a red circle moving quickly left and a blue square standing still on a green background

Every scene is a pure function of its seed; `pipeline.tiny.scorer_v2` checks clips against
prompts without weights. Shape, colour and motion words, colours and the held-out (colour,
shape) pairs are v1's, so the two worlds share one vocabulary of attributes.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

import numpy as np

from .world import _DIRECTIONS, COLORS, EVAL_SEED_BASE, HELD_OUT_PAIRS, SHAPES, _shape_mask, start_range

HEIGHT = 32
WIDTH = 32
NUM_FRAMES = 17
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = {"slowly": (0.25, 0.45), "quickly": (0.8, 1.0)}  # pixels per frame at 32 px and 17 frames
TEXTURES = ("plain", "stripes", "checker", "rings")
MAX_OBJECTS = 3
COUNT_WEIGHTS = (0.4, 0.35, 0.25)  # 1, 2, 3 objects
MAX_OVERLAP = 0.35  # share of frames one object may spend partly behind another
_SUPERSAMPLE = 4

_OBJECT = r"an? (\w+) (\w+) (?:moving (slowly|quickly) (left|right|up|down)|standing still)"
_OBJECT_RE = re.compile(_OBJECT)
_PROMPT_RE = re.compile(rf"^(?P<objects>{_OBJECT}(?: and {_OBJECT})*) on an? (?P<background>\w+) background$")


@dataclass(frozen=True)
class Texture:
    """Brightness detail added to a flat colour: kind, period (px), angle (rad), phase, amplitude (0-255)."""

    kind: str = "plain"
    period: float = 4.0
    angle: float = 0.0
    phase: float = 0.0
    amplitude: float = 0.0

    def pattern(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """Values in [-1, 1] at positions (px) relative to the textured thing."""
        if self.kind == "plain":
            return np.zeros_like(xs)
        u = xs * np.cos(self.angle) + ys * np.sin(self.angle)
        v = -xs * np.sin(self.angle) + ys * np.cos(self.angle)
        k = 2 * np.pi / self.period
        if self.kind == "stripes":
            return np.sin(k * u + self.phase)
        if self.kind == "checker":
            return np.sign(np.sin(k * u + self.phase) * np.sin(k * v + self.phase)) * 0.9
        if self.kind == "rings":
            return np.sin(k * np.hypot(u, v) + self.phase)
        raise ValueError(f"unknown texture {self.kind!r}; expected one of {TEXTURES}")


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    motion: str  # a direction or "still"
    pace: str | None  # "slowly" / "quickly"; None when still
    radius: float
    speed: float  # px per frame
    start: tuple[float, float]  # centre (x, y) at frame 0
    texture: Texture = Texture()

    @property
    def phrase(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        action = "standing still" if self.motion == "still" else f"moving {self.pace} {self.motion}"
        return f"{article} {self.color} {self.shape} {action}"

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = _DIRECTIONS[self.motion]
        return self.start[0] + dx * self.speed * frame, self.start[1] + dy * self.speed * frame


@dataclass(frozen=True)
class SceneSpec:
    """Everything that determines one clip; objects in drawing order (the first at the back)."""

    objects: tuple[ObjectSpec, ...]
    background: str
    background_texture: Texture = Texture()

    @property
    def prompt(self) -> str:
        article = "an" if self.background[0] in "aeiou" else "a"
        return " and ".join(o.phrase for o in self.objects) + f" on {article} {self.background} background"


@dataclass(frozen=True)
class ObjectWant:
    """One object as a prompt asks for it."""

    color: str
    shape: str
    motion: str
    pace: str | None


def parse_prompt(prompt: str) -> tuple[list[ObjectWant], str]:
    """Inverse of `SceneSpec.prompt`: the objects asked for and the background; ValueError outside the grammar."""
    text = " ".join(prompt.strip().lower().split())
    m = _PROMPT_RE.match(text)
    found = _OBJECT_RE.findall(m["objects"]) if m else []
    objects = [ObjectWant(c, s, d or "still", p or None) for c, s, p, d in found]
    bad = (not m or m["background"] not in COLORS or len(objects) > MAX_OBJECTS
           or any(o.color not in COLORS or o.shape not in SHAPES for o in objects)
           or len({o.color for o in objects} | {m["background"]}) != len(objects) + 1)
    if bad:
        raise ValueError(f"prompt {prompt!r} is not in world v2's grammar: 1 to {MAX_OBJECTS} objects "
                         "'a <colour> <shape> moving <slowly|quickly> <left|right|up|down>' or "
                         "'a <colour> <shape> standing still', joined by 'and', then 'on a <colour> background'; "
                         "every colour distinct")
    return objects, m["background"]


def vocabulary() -> list[str]:
    """Every word the grammar can produce (the text encoders' vocabulary)."""
    return sorted({"a", "an", "and", "on", "background", "moving", "standing", "still", *COLORS, *SHAPES,
                   *DIRECTIONS, *SPEEDS})


def _texture(rng: random.Random, plain_share: float) -> Texture:
    if rng.random() < plain_share:
        return Texture()
    return Texture(kind=rng.choice(TEXTURES[1:]), period=rng.uniform(3.0, 6.0), angle=rng.uniform(0, np.pi),
                   phase=rng.uniform(0, 2 * np.pi), amplitude=rng.uniform(14.0, 28.0))


def sample_scene(seed: int, *, count: int | None = None, objects: list[dict] | None = None,
                 background: str | None = None, height: int = HEIGHT, width: int = WIDTH,
                 num_frames: int = NUM_FRAMES, split: str = "train") -> SceneSpec:
    """Draw a scene from the seed. `objects` fixes attributes of the first objects (dicts with any of shape,
    color, motion, pace); `split="train"` never draws a held-out (colour, shape) pair unless asked for."""
    rng = random.Random(seed)
    fixed = list(objects or [])
    n = count or (len(fixed) if fixed else rng.choices(range(1, MAX_OBJECTS + 1), COUNT_WEIGHTS)[0])
    if not 1 <= n <= MAX_OBJECTS or len(fixed) > n:
        raise ValueError(f"count {n}: expected 1 to {MAX_OBJECTS} objects and at least as many as fixed ({len(fixed)})")
    fixed += [{}] * (n - len(fixed))
    taken = {f["color"] for f in fixed if "color" in f}
    if background is not None and background in taken:
        raise ValueError(f"background colour {background!r} must differ from every object's colour")
    bg = background or rng.choice([c for c in COLORS if c not in taken])
    scale = min(height, width) / 32
    time_scale = 16 / max(num_frames - 1, 1)
    radius_range = (6.0, 8.0) if n == 1 else (5.0, 6.5)  # a 4x VAE keeps the corners of these, not of smaller ones
    specs = []
    used = {bg} | taken
    for want in fixed:
        while True:
            shape = want.get("shape") or rng.choice(SHAPES)
            color = want.get("color") or rng.choice([c for c in COLORS if c not in used])
            if (split != "train" or "shape" in want or "color" in want or (color, shape) not in HELD_OUT_PAIRS):
                break
        used.add(color)
        for _ in range(200):  # objects may cross, but none stays hidden behind a later one for long
            o = _draw_object(rng, shape, color, want, radius_range, scale, time_scale, height, width, num_frames)
            if all(_overlap_share(prev, o, num_frames) <= MAX_OVERLAP for prev in specs):
                specs.append(o)
                break
        else:
            if want:
                raise ValueError(f"no room for the fixed object {want} beside {len(specs)} others")
            used.discard(color)  # a crowded scene keeps the objects that fit
    return SceneSpec(tuple(specs), bg, _texture(rng, plain_share=0.2))


def _draw_object(rng: random.Random, shape: str, color: str, want: dict, radius_range: tuple[float, float],
                 scale: float, time_scale: float, height: int, width: int, num_frames: int) -> ObjectSpec:
    motion = want.get("motion") or rng.choice([*DIRECTIONS, "still"])
    pace = None if motion == "still" else (want.get("pace") or rng.choice(list(SPEEDS)))
    speed = 0.0 if pace is None else rng.uniform(*SPEEDS[pace]) * scale * time_scale
    radius = rng.uniform(*radius_range) * scale
    dx, dy = _DIRECTIONS[motion]
    travel = speed * (num_frames - 1)
    start = (rng.uniform(*start_range(width, dx, radius, travel)),
             rng.uniform(*start_range(height, dy, radius, travel)))
    return ObjectSpec(shape, color, motion, pace, radius, speed, start, _texture(rng, plain_share=0.3))


def _overlap_share(below: ObjectSpec, above: ObjectSpec, num_frames: int) -> float:
    """Share of frames in which `above` covers part of `below` (their bounding circles meet)."""
    touching = [np.hypot(*np.subtract(below.centre(f), above.centre(f))) < below.radius + above.radius
                for f in range(num_frames)]
    return float(np.mean(touching))


def render(scene: SceneSpec, height: int = HEIGHT, width: int = WIDTH, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """Render a scene as uint8 frames (num_frames, height, width, 3); edges anti-aliased, textures per pixel."""
    ss = _SUPERSAMPLE
    ys, xs = np.meshgrid((np.arange(height * ss) + 0.5) / ss, (np.arange(width * ss) + 0.5) / ss, indexing="ij")
    py, px = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")

    def colour(name: str, texture: Texture, ox: float = 0.0, oy: float = 0.0) -> np.ndarray:
        base = np.asarray(COLORS[name], np.float32)
        return base + (texture.amplitude * texture.pattern(px - ox, py - oy))[..., None].astype(np.float32)

    background = colour(scene.background, scene.background_texture)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for f in range(num_frames):
        img = background.copy()
        for o in scene.objects:
            cx, cy = o.centre(f)
            cover = _shape_mask(o.shape, cx, cy, o.radius, xs, ys).astype(np.float32)
            cover = cover.reshape(height, ss, width, ss).mean(axis=(1, 3))[..., None]
            img = cover * colour(o.color, o.texture, cx, cy) + (1 - cover) * img
        frames[f] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return frames


def rebound_prompt(scene: SceneSpec) -> str:
    """The scene's prompt with each object's shape and motion handed to the next object (the last's to the
    first), colours in place: the binding error a model cannot tell from the true prompt unless it knows which
    words belong to which object. The same prompt for a scene whose objects all look and move alike."""
    objs = scene.objects
    moved = tuple(replace(o, shape=prev.shape, motion=prev.motion, pace=prev.pace)
                  for o, prev in zip(objs, objs[-1:] + objs[:-1]))
    return replace(scene, objects=moved).prompt


def eval_scenes(n: int = 48, *, height: int = HEIGHT, width: int = WIDTH,
                num_frames: int = NUM_FRAMES) -> list[SceneSpec]:
    """A fixed held-out set: unseen seeds; every third scene's first object is a held-out (colour, shape)
    pair, and the object count (1, 2, 3) changes every three scenes, so both splits hold every count."""
    held = sorted(HELD_OUT_PAIRS)
    scenes = []
    for i in range(n):
        first = {}
        if i % 3 == 0:
            color, shape = held[(i // 3) % len(held)]
            first = {"color": color, "shape": shape}
        scenes.append(sample_scene(EVAL_SEED_BASE + i, count=1 + (i // 3) % MAX_OBJECTS, objects=[first], height=height,
                                   width=width, num_frames=num_frames, split="eval"))
    return scenes
