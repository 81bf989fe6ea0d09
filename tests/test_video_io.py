"""Round trips through pipeline.video_io: frames, fps, metadata, quality, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.quality import psnr, ssim
from pipeline.video_io import DecodedVideo, VideoEncoding, decode_mp4, encode_mp4

LOSSLESS_RGB = VideoEncoding(codec="libx264rgb", pix_fmt="rgb24", crf=0)

METADATA = {
    "prompt": 'A "red" fox — naïve café, 狐狸 🦊\nsecond line, it\'s {"json": [1, 2]}',
    "seed": "1234567",
    "model": "hunyuanvideo",
}


def moving_square(t: int, h: int, w: int) -> np.ndarray:
    """Colour gradients with a saturated square moving diagonally: (T, H, W, 3) uint8."""
    y, x = np.mgrid[0:h, 0:w]
    out = np.zeros((t, h, w, 3), dtype=np.uint8)
    side = max(h, w) // 4
    for i in range(t):
        frame = np.stack(
            [x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, (i * 15) % 256)], axis=-1
        )
        r0, c0 = (i * 2) % (h - side), (i * 3) % (w - side)
        frame[r0 : r0 + side, c0 : c0 + side] = (255, 32, 0)
        out[i] = frame
    return out


# Default settings (libx264, yuv420p, crf 12) measured 29.53 dB on 17x32x32 and
# 33.50 dB on 9x64x48 (PyAV 18.1): 4:2:0 chroma subsampling of the saturated square's
# edges dominates the error. Bounds are ~2.5 dB below.
@pytest.mark.parametrize(("shape", "min_psnr"), [((17, 32, 32), 27.0), ((9, 64, 48), 31.0)])
def test_round_trip_default_settings(shape: tuple[int, int, int], min_psnr: float) -> None:
    frames = moving_square(*shape)
    data = encode_mp4(frames, METADATA)
    assert data[4:8] == b"ftyp"  # an MP4 file

    video = decode_mp4(data)

    assert isinstance(video, DecodedVideo)
    assert video.frames.shape == (*shape, 3)
    assert video.frames.dtype == np.uint8
    assert video.fps == 8.0
    assert video.metadata == METADATA  # muxer-generated keys are not reported
    quality = psnr(frames, video.frames)
    assert min_psnr < quality < 45.0  # lossy, but close


def test_fps_and_metadata_survive_non_default_fps() -> None:
    frames = moving_square(5, 32, 32)
    video = decode_mp4(encode_mp4(frames, {"seed": "7"}, VideoEncoding(fps=24)))
    assert video.fps == 24.0
    assert video.frames.shape[0] == 5
    assert video.metadata == {"seed": "7"}


def test_no_metadata_gives_empty_dict() -> None:
    assert decode_mp4(encode_mp4(moving_square(3, 32, 32))).metadata == {}


def test_decode_from_path(tmp_path) -> None:
    frames = moving_square(4, 32, 32)
    path = tmp_path / "clip.mp4"
    path.write_bytes(encode_mp4(frames, {"prompt": "path"}, LOSSLESS_RGB))
    for source in (path, str(path)):
        video = decode_mp4(source)
        np.testing.assert_array_equal(video.frames, frames)
        assert video.metadata == {"prompt": "path"}


def round_trip(frames: np.ndarray, encoding: VideoEncoding = VideoEncoding()) -> np.ndarray:
    return decode_mp4(encode_mp4(frames, encoding=encoding)).frames


def test_higher_fidelity_settings_give_higher_psnr() -> None:
    frames = moving_square(17, 32, 32)
    default = psnr(frames, round_trip(frames))  # measured 29.53 dB
    # Measured: yuv444p crf 12 -> 42.97 dB, yuv444p crf 0 -> 52.02 dB (limited by the
    # RGB -> YUV rounding), libx264rgb crf 0 -> exact.
    yuv444 = psnr(frames, round_trip(frames, VideoEncoding(pix_fmt="yuv444p")))
    yuv444_crf0 = psnr(frames, round_trip(frames, VideoEncoding(pix_fmt="yuv444p", crf=0)))
    rgb = round_trip(frames, LOSSLESS_RGB)

    assert yuv444 > default + 8.0
    assert yuv444 > 40.0
    assert yuv444_crf0 > 49.0
    np.testing.assert_array_equal(rgb, frames)
    assert psnr(frames, rgb) == math.inf


def test_yuv444p_and_rgb_accept_odd_sizes() -> None:
    frames = moving_square(3, 33, 35)
    assert round_trip(frames, VideoEncoding(pix_fmt="yuv444p")).shape == (3, 33, 35, 3)
    np.testing.assert_array_equal(round_trip(frames, LOSSLESS_RGB), frames)


def test_float_frames_are_clipped_and_rounded() -> None:
    frames = moving_square(3, 32, 32)
    as_float = frames.astype(np.float32) / 255.0
    as_float[0, 0, 0] = (-0.5, 1.5, 0.5)  # out of range -> clipped; 0.5 -> 127.5 -> 128
    expected = frames.copy()
    expected[0, 0, 0] = (0, 255, 128)
    np.testing.assert_array_equal(round_trip(as_float, LOSSLESS_RGB), expected)


def test_h264_alias_resolves_to_libx264() -> None:
    assert VideoEncoding(codec="h264").encoder == "libx264"
    assert round_trip(moving_square(3, 32, 32), VideoEncoding(codec="h264")).shape[0] == 3


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (np.zeros((32, 32, 3), np.uint8), "frames"),  # one image, no time axis
        (np.zeros((2, 32, 32), np.uint8), "frames"),
        (np.zeros((2, 32, 32, 4), np.uint8), "frames"),  # RGBA
        (np.zeros((0, 32, 32, 3), np.uint8), "frames"),  # no frames
        (np.zeros((2, 32, 32, 3), np.int64), "dtype"),
        (np.full((2, 32, 32, 3), np.nan, np.float32), "NaN"),
    ],
)
def test_invalid_frames_raise(bad: np.ndarray, field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        encode_mp4(bad)
    if field == "frames" and bad.size:
        assert str(bad.shape) in str(info.value)


@pytest.mark.parametrize("shape", [(2, 33, 32, 3), (2, 32, 31, 3)])
def test_odd_size_with_yuv420p_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"yuv420p needs even height and width") as info:
        encode_mp4(np.zeros(shape, np.uint8))
    assert str(shape) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"fps": 0}, "fps"),
        ({"fps": 7.5}, "fps"),
        ({"crf": -1}, "crf"),
        ({"crf": 52}, "crf"),
        ({"codec": "no-such-codec"}, "codec"),
        ({"codec": "aac"}, "codec"),  # an audio encoder
        ({"codec": "mpeg4"}, "codec"),  # exists, but not in the supported table
        ({"pix_fmt": "rgb24"}, "pix_fmt"),  # needs libx264rgb
        ({"codec": "libx264rgb", "pix_fmt": "yuv420p"}, "pix_fmt"),
        ({"preset": "warp"}, "preset"),
    ],
)
def test_invalid_encoding_raises_naming_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}\b") as info:
        VideoEncoding(**kwargs)
    if field in ("codec", "pix_fmt"):
        assert "allowed" in str(info.value)
    if field == "codec":
        assert "libx264" in str(info.value)


@pytest.mark.parametrize(
    ("metadata", "match"),
    [
        ({"seed": 1}, "must be a str"),
        ({"": "x"}, "non-empty"),
        ({"encoder": "mine"}, "reserved"),
        ({"Prompt": "a", "prompt": "b"}, "differ only in case"),
        ({"prompt": "a\x00b"}, "NUL"),
    ],
)
def test_invalid_metadata_raises(metadata: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_mp4(moving_square(2, 32, 32), metadata)


def test_psnr_values() -> None:
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert psnr(a, a) == math.inf
    assert psnr(a, np.full_like(a, 255)) == pytest.approx(0.0)
    assert psnr(a, a + 1) == pytest.approx(20 * math.log10(255), abs=1e-9)  # 48.13 dB
    assert psnr(np.zeros(3), np.full(3, 0.1)) == pytest.approx(20.0)  # floats: range 1
    assert psnr(torch.zeros(2, 3), torch.full((2, 3), 0.2), data_range=2.0) == pytest.approx(20.0)  # [-1, 1]
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[:1])


def test_psnr_matches_torchmetrics() -> None:
    """The one PSNR against torchmetrics' independent implementation: whole array, and per frame."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape) * (np.arange(4) + 1)[:, None, None, None], 0, 255)
    b = b.astype(np.uint8)
    ta, tb = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    whole = peak_signal_noise_ratio(tb, ta, data_range=255.0).item()
    frames = [peak_signal_noise_ratio(tb[i], ta[i], data_range=255.0).item() for i in range(4)]
    assert psnr(a, b, per_frame=False) == pytest.approx(whole, rel=1e-6)  # torchmetrics rounds its range in float32
    assert psnr(a, b) == pytest.approx(np.mean(frames), rel=1e-6)
    assert psnr(a, b) != pytest.approx(whole, abs=1e-3)  # the frames differ in noise, so the two protocols differ


def test_ssim_properties() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    noisy = [np.clip(a.astype(int) + rng.normal(0, s, a.shape), 0, 255).astype(np.uint8) for s in (5, 20, 60)]
    values = [ssim(a, n) for n in noisy]
    assert ssim(a, a) == pytest.approx(1.0)
    assert 1.0 > values[0] > values[1] > values[2] > 0.0
    assert ssim(noisy[1], a) == pytest.approx(values[1], abs=1e-12)  # symmetric
    with pytest.raises(ValueError, match="same"):
        ssim(a, a[:1])
