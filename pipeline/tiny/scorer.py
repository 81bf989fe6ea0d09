"""Weight-free adherence scorer for the moving-shapes world.

From decoded frames it estimates the background colour, the shape's colour, the shape kind
and the motion direction, and compares them with what the prompt asked for. It needs no
model weights, so quality figures of the tiny model are reproducible anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .world import COLORS, parse_prompt

ATTRIBUTES = ("shape", "color", "background", "motion")
_PALETTE_NAMES = list(COLORS)
_PALETTE = np.asarray([COLORS[k] for k in _PALETTE_NAMES], dtype=np.float32)


# The shape rule's thresholds: vertical skew above SKEW_TRIANGLE is a triangle, else a fill of its
# bounding box above FILL_SQUARE is a square (see `estimate`).
SKEW_TRIANGLE = 0.58
FILL_SQUARE = 0.835


@dataclass(frozen=True)
class Estimate:
    """The scorer's verdicts, with the two shape measures behind them (NaN when there is no shape),
    so a caller can tell a clear verdict from one on a threshold."""

    shape: str
    color: str
    background: str
    motion: str
    fill: float = float("nan")
    skew: float = float("nan")

    @property
    def shape_margin(self) -> float:
        """How far the shape verdict is from changing: the deciding measure's distance to its
        threshold (inf when there is no shape)."""
        if math.isnan(self.fill):
            return math.inf
        if self.skew > SKEW_TRIANGLE:
            return self.skew - SKEW_TRIANGLE
        return min(SKEW_TRIANGLE - self.skew, abs(self.fill - FILL_SQUARE))


def _nearest_color(rgb: np.ndarray, exclude: str | None = None) -> str:
    d = ((_PALETTE - rgb[None, :]) ** 2).sum(axis=1)
    if exclude is not None:
        d[_PALETTE_NAMES.index(exclude)] = np.inf
    return _PALETTE_NAMES[int(d.argmin())]


def estimate(frames: np.ndarray) -> Estimate:
    """Estimate the attributes of a clip; frames are uint8 or float in [0, 1], (T, H, W, 3)."""
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must have shape (T, H, W, 3), got {x.shape}")
    x = x.astype(np.float32) * (255.0 if x.dtype != np.uint8 and x.max() <= 1.0 + 1e-6 else 1.0)
    t, h, w, _ = x.shape

    # Background: the median colour of the frame border over the whole clip.
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1).reshape(-1, 3)
    bg_rgb = np.median(border, axis=0)
    background = _nearest_color(bg_rgb)

    # Foreground: pixels far from the background colour; the shape colour is their median.
    dist = np.sqrt(((x - bg_rgb) ** 2).sum(axis=-1))
    fg_mask = dist > 0.5 * max(float(np.percentile(dist, 99)), 30.0)
    if fg_mask.sum() == 0:
        return Estimate(shape="none", color="none", background=background, motion="none")
    color = _nearest_color(np.median(x[fg_mask], axis=0), exclude=background)

    # Soft coverage by the shape colour: 1 at the shape colour, 0 at the background.
    fg_rgb = np.asarray(COLORS[color], dtype=np.float32)
    axis = fg_rgb - bg_rgb
    cover = np.clip(((x - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)

    # Shape, from two measures per frame (medians over frames), both robust to soft edges:
    # vertical skew, the mass centroid's position between the top and bottom rows (0.5 for a
    # circle or a square, 2/3 for the upward triangle), then how much of its bounding box the
    # shape fills (square 1.0, circle 0.79; decoded clips blur these to ~0.9 and ~0.78).
    fills, skews, centroids = [], [], []
    ys, xs = np.mgrid[0:h, 0:w]
    for f in range(t):
        c = cover[f]
        area = float(c.sum())
        rows = np.flatnonzero(c.max(axis=1) > 0.5)
        if area < 4.0 or len(rows) < 2:
            continue
        cy = float((c * ys).sum() / area)
        centroids.append(((c * xs).sum() / area, cy))
        skews.append((cy - rows[0]) / (rows[-1] - rows[0]))
        # Sub-pixel extents: each row's / column's peak coverage sums to the side lengths.
        fills.append(area / (float(c.max(axis=1).sum()) * float(c.max(axis=0).sum())))
    if not fills:
        return Estimate(shape="none", color=color, background=background, motion="none")
    fill, skew = float(np.median(fills)), float(np.median(skews))
    if skew > SKEW_TRIANGLE:
        shape = "triangle"
    else:
        shape = "square" if fill > FILL_SQUARE else "circle"

    # Motion: centroid displacement between the first and the last quarter of the clip.
    cen = np.asarray(centroids)
    q = max(1, len(cen) // 4)
    dx, dy = cen[-q:].mean(axis=0) - cen[:q].mean(axis=0)
    threshold = 0.1 * min(h, w)
    if max(abs(dx), abs(dy)) < threshold:
        motion = "still"
    elif abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    return Estimate(shape=shape, color=color, background=background, motion=motion, fill=fill, skew=skew)


def score(frames: np.ndarray, prompt: str) -> dict[str, bool]:
    """Per-attribute correctness of one clip against its prompt."""
    want = parse_prompt(prompt)
    got = estimate(frames)
    return {a: getattr(got, a) == want[a] for a in ATTRIBUTES}


def accuracy(results: list[dict[str, bool]], attributes: tuple[str, ...] = ATTRIBUTES) -> dict[str, float]:
    """Per-attribute accuracy plus `all` (every attribute right) over many clips."""
    if not results:
        raise ValueError("accuracy() needs at least one scored clip")
    out = {a: float(np.mean([r[a] for r in results])) for a in attributes}
    out["all"] = float(np.mean([all(r.values()) for r in results]))
    return out

