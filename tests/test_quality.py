"""pipeline.quality's PSNR protocol beyond the hand values in test_video_io.py: per frame, then averaged, with a
frame's MSE floored so that one identical frame does not make a changed clip infinite."""

import math

import numpy as np
import pytest

from pipeline.quality import psnr


def test_an_identical_frame_counts_at_the_mse_floor_and_an_identical_clip_is_inf():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] += 1  # frame 0 identical, frame 1 off by one everywhere
    floor_db = 10 * math.log10(255**2 / 1e-10)  # 148.1 dB
    assert psnr(a, b) == pytest.approx((floor_db + 20 * math.log10(255)) / 2, abs=1e-9)
    assert psnr(a, b, per_frame=False) == pytest.approx(10 * math.log10(255**2 / 0.5), abs=1e-9)  # MSE 1/2
    assert psnr(b, b) == math.inf
