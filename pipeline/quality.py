"""Weight-free quality measures on decoded clips: fidelity to a reference and temporal flicker.

Clips are uint8 arrays of shape (frames, height, width, 3). Fidelity follows the protocol of
the caching papers (ToCa, TaylorSeer, SpeCa): each frame in [0, 1], the measure taken per frame,
then averaged over frames.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected two clips of the same (frames, height, width, 3) shape, got {a.shape} and {b.shape}")


def _float64(x) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t.to(torch.float64)


def psnr(a, b, data_range: float | None = None, per_frame: bool = True) -> float:
    """PSNR in dB of two arrays or tensors of the same shape (torchmetrics'); ``inf`` when they are identical.

    per_frame: the PSNR of each entry along the first axis (the frames of a clip), averaged, as
        the caching papers report it (a frame's MSE is floored at 1e-10, so one identical frame does not
        make a clip's mean infinite); False: of the whole array.
    data_range: the value range's width: 255 for uint8 (the default for uint8 inputs), 1.0 for
        [0, 1] (the default otherwise), 2.0 for [-1, 1].
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"psnr needs arrays of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if data_range is None:
        data_range = 255.0 if a.dtype in (np.uint8, torch.uint8) else 1.0
    x = _float64(a)
    y = _float64(b).to(x.device)
    if torch.equal(x, y):
        return math.inf
    dims = tuple(range(1, x.dim())) if per_frame and x.dim() > 1 else tuple(range(x.dim()))
    # torchmetrics makes its range and log-base constants in the default dtype: in float32 they move a result
    # by up to 3e-7 dB (0 dB read as 3e-7), so the call runs with float64 as the default.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        values = peak_signal_noise_ratio(x, y, data_range=data_range, reduction="none", dim=dims)
    finally:
        torch.set_default_dtype(previous)
    ceiling = 10.0 * math.log10(data_range**2 / 1e-10)  # the MSE floor
    return float(values.clamp(max=ceiling).mean())


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Per-frame SSIM of two uint8 clips, averaged over frames (torchmetrics: gaussian window 11,
    sigma 1.5, RGB channels averaged, borders the window does not cover left out)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check_pair(a, b)
    x = torch.from_numpy(np.ascontiguousarray(a)).to(torch.float64).div(255).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.ascontiguousarray(b)).to(torch.float64).div(255).permute(0, 3, 1, 2)
    return float(structural_similarity_index_measure(x, y, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                     data_range=1.0))


def temporal_flickering(frames: np.ndarray) -> float:
    """VBench's temporal-flickering score: (255 - mean absolute difference of adjacent frames) / 255.

    1.0 for a static clip; VBench averages it over videos and min/max-normalises it.
    """
    if frames.ndim != 4 or len(frames) < 2:
        raise ValueError(f"temporal flickering needs at least 2 frames of (frames, height, width, 3), got {frames.shape}")
    f = frames.astype(np.float32)
    return float((255.0 - np.abs(f[1:] - f[:-1]).mean(axis=(1, 2, 3)).mean()) / 255.0)
