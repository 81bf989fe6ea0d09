"""Weight-free quality measures on decoded clips: fidelity to a reference and temporal flicker.

Clips are uint8 arrays of shape (frames, height, width, 3). Fidelity follows the protocol of
the caching papers (ToCa, TaylorSeer, SpeCa): each frame in [0, 1], the measure taken per frame,
then averaged over frames.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected two clips of the same (frames, height, width, 3) shape, got {a.shape} and {b.shape}")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Per-frame PSNR in dB averaged over frames; ``inf`` when the clips are identical."""
    _check_pair(a, b)
    per_frame = [float(np.mean((fa.astype(np.float64) - fb.astype(np.float64)) ** 2)) for fa, fb in zip(a, b)]
    if max(per_frame) == 0.0:
        return math.inf
    return float(np.mean([10.0 * math.log10(255.0**2 / max(m, 1e-10)) for m in per_frame]))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Per-frame SSIM averaged over frames (gaussian window 11, sigma 1.5, RGB channels averaged)."""
    _check_pair(a, b)
    x = torch.from_numpy(np.ascontiguousarray(a)).float().div(255).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.ascontiguousarray(b)).float().div(255).permute(0, 3, 1, 2)
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = ((g[:, None] * g[None, :]) / g.sum() ** 2).expand(3, 1, 11, 11)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, padding=5, groups=3)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean(dim=(1, 2, 3)).mean())


def temporal_flickering(frames: np.ndarray) -> float:
    """VBench's temporal-flickering score: (255 - mean absolute difference of adjacent frames) / 255.

    1.0 for a static clip; VBench averages it over videos and min/max-normalises it.
    """
    if frames.ndim != 4 or len(frames) < 2:
        raise ValueError(f"temporal flickering needs at least 2 frames of (frames, height, width, 3), got {frames.shape}")
    f = frames.astype(np.float32)
    return float((255.0 - np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3)).mean()) / 255.0)
