"""Frame strips: a few frames of a clip side by side as one small JPEG, for the report's gallery.

One strip per shown clip lets a reviewer spot a structurally wrong video (a duplicated object,
a frozen frame) at a glance, without opening thousands of MP4s or loading a video player per
sample. Strips are made from frames the score stage has already decoded, so they cost no extra
read of the video.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

STRIP_FRAMES = 5
MIN_HEIGHT = 72  # tiny clips (the bundled model's 32 px) are enlarged by whole pixels so they stay sharp
MAX_HEIGHT = 144  # large clips are shrunk so a 10^4-sample report stays light


def strip_frames(num_frames: int, count: int = STRIP_FRAMES) -> list[int]:
    """Evenly spaced frame indices, first and last included; fewer when the clip is shorter."""
    if num_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_frames}")
    count = min(count, num_frames)
    return sorted({round(i * (num_frames - 1) / max(count - 1, 1)) for i in range(count)})


def frame_strip(frames: np.ndarray, count: int = STRIP_FRAMES, quality: int = 85) -> bytes:
    """JPEG bytes of `count` frames of a (T, H, W, 3) uint8 clip, left to right in time, 2 px apart."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (T, H, W, 3) uint8 frames, got {frames.shape} {frames.dtype}")
    _, h, w, _ = frames.shape
    if h < MIN_HEIGHT:
        scale = -(-MIN_HEIGHT // h)
        size, resample = (w * scale, h * scale), Image.Resampling.NEAREST
    elif h > MAX_HEIGHT:
        size, resample = (max(1, round(w * MAX_HEIGHT / h)), MAX_HEIGHT), Image.Resampling.LANCZOS
    else:
        size, resample = (w, h), Image.Resampling.NEAREST
    tiles = [Image.fromarray(frames[i]).resize(size, resample) for i in strip_frames(len(frames), count)]
    gap = 2
    strip = Image.new("RGB", (len(tiles) * size[0] + (len(tiles) - 1) * gap, size[1]), (255, 255, 255))
    for i, tile in enumerate(tiles):
        strip.paste(tile, (i * (size[0] + gap), 0))
    buf = io.BytesIO()
    strip.save(buf, format="JPEG", quality=quality, subsampling=0)  # 4:4:4: saturated colours stay put
    return buf.getvalue()
