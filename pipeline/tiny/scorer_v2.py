"""Weight-free scorer for world v2: count, colour, shape and motion of every object, and the background.

Every pixel is labelled with its nearest palette colour (textures change brightness by less than
the gap between palette colours). The background is the border's majority label; each other
colour's pixels, split into connected pieces per frame, are that colour's objects, so a
duplicated object (two pieces of one colour) fails the count. An object's shape comes from the
frames where it shows most of itself (crossing objects hide each other), its motion from its
centroid's path: direction, and pace from the distance covered per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from . import scorer as v1_scorer
from .world import COLORS, SHAPES, _shape_mask
from .world_v2 import SPEEDS, parse_prompt

ATTRIBUTES = ("count", "color", "shape", "motion", "background")
_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[k] for k in _NAMES], np.float32)
NEAR = 75.0  # RGB distance to a palette colour; textures move a colour by at most ~50
MIN_PIECE = 5  # pixels; anti-aliased edges between two colours can label a few stray pixels as a third
_STILL_PX_PER_FRAME = 0.12
_SS = 4  # supersampling of the ideal shapes
_PACE_SPLIT = (SPEEDS["slowly"][1] + SPEEDS["quickly"][0]) / 2  # px per frame at 32 px
# The scorer's stated margins, in each deciding measure's unit (`verdict_gaps`): at least the largest shift of the
# measure between an uncached clip of the bundled model and the same clip with 45-36 plain steps still >= 32 dB from
# it, over 16 calibration prompts (`python -m bench.scorer_margins`, bench/results/scorer_margins_v2.md: count and
# colour 0.176, i.e. 3 of 17 frames; shape 0.033; motion 0.045; background 0.003), rounded up.
MARGINS = {"count": 0.2, "color": 0.2, "shape": 0.04, "motion": 0.05, "background": 0.01}


@dataclass(frozen=True)
class ObjectEstimate:
    """One object's verdicts, and how far each deciding measure is from the threshold that would change it."""

    color: str
    shape: str
    motion: str
    pace: str | None
    shape_gap: float = math.inf  # mean IoU of the best-fitting shape minus the runner-up's
    motion_gap: float = math.inf  # px per frame (at 32 px) to the nearest motion threshold: still, axis, pace


@dataclass(frozen=True)
class SceneEstimate:
    background: str
    count: int
    objects: dict[str, ObjectEstimate]  # by colour; colours with more than one piece hold their largest
    pieces_gap: float = math.inf  # share of frames that would have to change for any colour's piece count to change
    background_gap: float = math.inf  # border share of the background colour minus the runner-up colour's


def _labels(x: np.ndarray) -> np.ndarray:
    """Nearest palette colour per pixel; -1 where none is near (the blend at an edge between two colours)."""
    d = ((x[..., None, :] - _PALETTE) ** 2).sum(axis=-1)
    return np.where(d.min(axis=-1) <= NEAR**2, d.argmin(axis=-1), -1)


def _ideal(shape: str, area: float, cx: float, cy: float, h: int, w: int) -> np.ndarray:
    """The world's own shape of the given area, centred on the centroid (a triangle's sits 1/3 r below the box
    centre), as the pixels it covers at least half of."""
    r = math.sqrt(area / {"circle": math.pi, "square": 4 * 0.886**2, "triangle": 2.0}[shape])
    ys, xs = np.meshgrid((np.arange(h * _SS) + 0.5) / _SS, (np.arange(w * _SS) + 0.5) / _SS, indexing="ij")
    cover = _shape_mask(shape, cx, cy - (r / 3 if shape == "triangle" else 0.0), r, xs, ys)
    return cover.reshape(h, _SS, w, _SS).mean(axis=(1, 3)) >= 0.5


def _shape(masks: list[np.ndarray]) -> tuple[str, float]:
    """The shape whose ideal outline overlaps the unhidden frames' masks best (intersection over union), and
    its mean IoU's lead over the runner-up."""
    if not masks:
        return "none", math.inf
    h, w = masks[0].shape
    fit = dict.fromkeys(SHAPES, 0.0)
    for m in masks:
        ys, xs = np.nonzero(m)
        for shape in SHAPES:
            ideal = _ideal(shape, float(m.sum()), xs.mean() + 0.5, ys.mean() + 0.5, h, w)
            fit[shape] += (ideal & m).sum() / max((ideal | m).sum(), 1)
    best, runner_up = sorted(fit.values(), reverse=True)[:2]
    return max(fit, key=fit.get), float(best - runner_up) / len(masks)


def _median_gap(counts: list[int]) -> float:
    """How far a colour's per-frame piece counts are from changing their `int(median)` m: the smaller share
    of frames at or above m / at or below m, less one half (0: a frame more on either side changes it)."""
    c = np.asarray(counts)
    m = int(np.median(c))
    return float(min((c >= m).mean(), (c <= m).mean()) - 0.5)


def estimate(frames: np.ndarray) -> SceneEstimate:
    """Estimate a clip's scene; frames are uint8 (T, H, W, 3)."""
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {x.shape}")
    x = x.astype(np.float32)
    t, h, w, _ = x.shape
    labels = _labels(x)
    border = np.concatenate([labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]], axis=1).ravel()
    votes = np.bincount(border[border >= 0], minlength=len(_NAMES))
    bg = int(votes.argmax())
    background_gap = float(np.diff(np.sort(votes)[-2:])[0] / max(votes.sum(), 1))
    scale = min(h, w) / 32
    count, objects, pieces_gap = 0, {}, math.inf
    for c in range(len(_NAMES)):
        if c == bg:
            continue
        pieces_per_frame, largest, touched = [], [], []
        for f in range(t):
            lab, n = ndimage.label(labels[f] == c)
            sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
            keep = np.flatnonzero(sizes >= MIN_PIECE * scale * scale)
            pieces_per_frame.append(len(keep))
            piece = lab == (1 + keep[sizes[keep].argmax()]) if len(keep) else None
            if piece is not None:  # a frame where it touches another object may hide part of it
                ring = labels[f][ndimage.binary_dilation(piece, iterations=2) & ~piece]
                touching = np.isin(ring, [k for k in range(len(_NAMES)) if k not in (c, bg)]).any()
                touched.append(touching)
            largest.append(piece)
        pieces = int(np.median(pieces_per_frame))
        pieces_gap = min(pieces_gap, _median_gap(pieces_per_frame))
        if pieces == 0:
            continue
        count += pieces
        seen = [(f, m) for f, m in enumerate(largest) if m is not None]
        alone = [fm for fm, hit in zip(seen, touched) if not hit]
        seen = alone if len(alone) >= 2 else seen
        areas = np.asarray([m.sum() for _, m in seen])
        seen = [fm for fm, a in zip(seen, areas) if a >= 0.85 * areas.max()]  # frames where nothing hides it
        whole = [m for _, m in seen]
        centroids = np.asarray([(np.nonzero(m)[1].mean(), np.nonzero(m)[0].mean()) for m in whole])
        frame_ids = np.asarray([f for f, _ in seen])
        q = max(1, len(seen) // 4)
        (dx, dy), span = centroids[-q:].mean(0) - centroids[:q].mean(0), frame_ids[-q:].mean() - frame_ids[:q].mean()
        to_pace = 1.0 / max(span, 1.0) / scale * (max(t - 1, 1) / 16)  # px between first and last frames -> pace
        per_frame = np.hypot(dx, dy) * to_pace
        gaps = [abs(per_frame - _STILL_PX_PER_FRAME)]
        if per_frame < _STILL_PX_PER_FRAME:
            motion, pace = "still", None
        else:
            motion = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
            pace = "quickly" if per_frame > _PACE_SPLIT else "slowly"
            gaps += [abs(abs(dx) - abs(dy)) * to_pace, abs(per_frame - _PACE_SPLIT)]  # axis, pace
        shape, shape_gap = _shape(whole)
        objects[_NAMES[c]] = ObjectEstimate(_NAMES[c], shape, motion, pace, shape_gap, float(min(gaps)))
    return SceneEstimate(_NAMES[bg], count, objects, pieces_gap, background_gap)


def score(frames: np.ndarray, prompt: str) -> dict[str, bool]:
    """Per-attribute correctness of one clip against its prompt (every object must be right)."""
    return _score(estimate(frames), prompt)


def verdict_gaps(frames: np.ndarray, prompt: str) -> dict[str, float]:
    """Per attribute, how far the clip's deciding measure is from the threshold that would turn its verdict,
    in that measure's unit (count, colour: share of frames; shape: mean IoU; motion: px per frame at 32 px;
    background: share of the border), the closest object's for a scene. An attribute is `clear` when its gap
    is at least the scorer's stated margin for it (`MARGINS`)."""
    want, _ = parse_prompt(prompt)
    got = estimate(frames)
    found = [g for g in (got.objects.get(o.color) for o in want) if g is not None]
    return {"count": got.pieces_gap, "color": got.pieces_gap,
            "shape": min((g.shape_gap for g in found), default=math.inf),
            "motion": min((g.motion_gap for g in found), default=math.inf),
            "background": got.background_gap}


def clear(frames: np.ndarray, prompt: str) -> dict[str, bool]:
    """Per attribute: is the verdict clear of its threshold by the scorer's stated margin (`MARGINS`)?"""
    return {a: gap >= MARGINS[a] for a, gap in verdict_gaps(frames, prompt).items()}


def _score(got: SceneEstimate, prompt: str) -> dict[str, bool]:
    want, background = parse_prompt(prompt)
    found = [got.objects.get(o.color) for o in want]
    return {
        "count": got.count == len(want),
        "color": set(got.objects) == {o.color for o in want},
        "shape": all(g is not None and g.shape == o.shape for g, o in zip(found, want)),
        "motion": all(g is not None and (g.motion, g.pace) == (o.motion, o.pace) for g, o in zip(found, want)),
        "background": got.background == background,
    }


def object_verdicts(frames: np.ndarray, prompt: str) -> list[dict[str, str]]:
    """What the clip shows of each object the prompt asks for, as words: `score` says a scene is wrong, this
    says how. Shape: "right" or "<drawn> for <asked>"; motion: "right", "another object's" (a binding error: the
    motion the prompt gives one of the other objects), "wrong pace", "still, asked to move", "moving, asked to
    stand still" or "wrong direction"; both "missing" when no piece of the object's colour is found."""
    want, _ = parse_prompt(prompt)
    got = estimate(frames)
    verdicts = []
    for o in want:
        g = got.objects.get(o.color)
        if g is None:
            verdicts.append({"shape": "missing", "motion": "missing"})
            continue
        asked, drawn = (o.motion, o.pace), (g.motion, g.pace)
        if drawn == asked:
            motion = "right"
        elif drawn in [(x.motion, x.pace) for x in want if x is not o]:
            motion = "another object's"
        elif g.motion == o.motion:
            motion = "wrong pace"
        elif g.motion == "still":
            motion = "still, asked to move"
        elif o.motion == "still":
            motion = "moving, asked to stand still"
        else:
            motion = "wrong direction"
        verdicts.append({"shape": "right" if g.shape == o.shape else f"{g.shape} for {o.shape}", "motion": motion})
    return verdicts


def accuracy(results: list[dict[str, bool]]) -> dict[str, float]:
    """Per-attribute accuracy plus `all` (every attribute right) over many clips."""
    return v1_scorer.accuracy(results, ATTRIBUTES)
