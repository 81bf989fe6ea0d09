"""MP4 encoding and decoding of generated clips with PyAV, entirely in memory.

Generated videos are written as ``bytes`` (so they can go straight to object storage)
with the generation parameters (prompt, seed, ...) stored as MP4 container metadata,
which lets a clip be traced back to its request without a side-car file.

Metadata: the mp4 muxer only writes a fixed set of iTunes-style keys ("title",
"comment", "description", ...) unless it is given ``movflags=use_metadata_tags``; with
that flag every key is written as an mdta tag and read back by FFmpeg unchanged
(unicode, quotes, newlines and 100 kB values included). We always set it. Keys are
case-insensitive in FFmpeg's dictionaries, and the muxer writes its own
``major_brand``/``minor_version``/``compatible_brands``/``encoder`` keys, so those are
rejected on encode and left out of :attr:`DecodedVideo.metadata` on decode.

Colour: YUV outputs are converted from RGB with the BT.709 matrix (limited range) and
tagged as such in the H.264 bitstream, so players and :func:`decode_mp4` use the
same matrix. 4:2:0 chroma subsampling limits fidelity on saturated sharp edges
(about 29-31 dB PSNR on synthetic test patterns); use ``yuv444p`` or ``libx264rgb``
when a near-lossless copy matters more than file size.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from collections.abc import Mapping

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, ColorTrc, Colorspace

__all__ = [
    "CODEC_PIX_FMTS",
    "DecodedVideo",
    "VideoEncoding",
    "decode_mp4",
    "encode_mp4",
]

# Encoders tested with the mp4 muxer, and the pixel formats we allow for each. The
# names are PyAV/FFmpeg encoder names; aliases such as "h264" resolve to "libx264".
# libx265 is deliberately absent: the x265 in the PyAV 18.1 wheel corrupts the heap
# (glibc "free(): invalid next size") when encoding 48x64 frames a few times in a row.
CODEC_PIX_FMTS: dict[str, tuple[str, ...]] = {
    "libx264": ("yuv420p", "yuv422p", "yuv444p"),
    "libx264rgb": ("rgb24",),
}

# x264 presets.
_PRESETS = (
    "ultrafast", "superfast", "veryfast", "faster", "fast",
    "medium", "slow", "slower", "veryslow", "placebo",
)

# (width divisor, height divisor) imposed by chroma subsampling.
_SUBSAMPLING: dict[str, tuple[int, int]] = {"yuv420p": (2, 2), "yuv422p": (2, 1)}

# Keys the mp4 muxer writes itself (a user "encoder" is silently overwritten), so they
# are reserved on encode and dropped on decode.
_MUXER_KEYS = frozenset({"major_brand", "minor_version", "compatible_brands", "encoder"})


def _resolve_codec(name: str) -> str:
    """Canonical encoder name for ``name`` (e.g. "h264" -> "libx264"), or ValueError."""
    allowed = ", ".join(sorted(CODEC_PIX_FMTS))
    try:
        codec = av.codec.Codec(name, "w")
    except (ValueError, av.error.FFmpegError) as exc:  # UnknownCodecError is a ValueError
        raise ValueError(
            f"codec {name!r} is not an encoder available in PyAV {av.__version__}; "
            f"allowed codecs: {allowed}"
        ) from exc
    if codec.name not in CODEC_PIX_FMTS:
        raise ValueError(
            f"codec {name!r} (encoder {codec.name!r}) is not supported for mp4 output; "
            f"allowed codecs: {allowed}"
        )
    return codec.name


@dataclass(frozen=True)
class VideoEncoding:
    """How clips are encoded. Defaults favour quality: crf 12 is visually lossless.

    crf is x264's constant-quality knob (0 = lossless coding, 51 = worst); with YUV
    pix_fmts the RGB -> YUV conversion still loses a little (~52 dB at crf 0 for
    yuv444p), only libx264rgb + crf 0 round-trips exactly. preset trades encode time
    for size at the same quality.
    """

    fps: int = 8
    codec: str = "libx264"
    crf: int = 12
    pix_fmt: str = "yuv420p"
    preset: str = "medium"

    def __post_init__(self) -> None:
        if isinstance(self.fps, bool) or not isinstance(self.fps, int) or self.fps < 1:
            raise ValueError(f"fps must be an integer >= 1, got {self.fps!r}")
        if isinstance(self.crf, bool) or not isinstance(self.crf, int) or not 0 <= self.crf <= 51:
            raise ValueError(f"crf must be an integer in [0, 51], got {self.crf!r}")
        if not isinstance(self.codec, str):
            raise ValueError(f"codec must be a string, got {self.codec!r}")
        codec = _resolve_codec(self.codec)
        allowed = CODEC_PIX_FMTS[codec]
        if self.pix_fmt not in allowed:
            raise ValueError(
                f"pix_fmt {self.pix_fmt!r} is not allowed for codec {codec!r}; "
                f"allowed pix_fmt values: {', '.join(allowed)}"
            )
        if self.preset not in _PRESETS:
            raise ValueError(
                f"preset {self.preset!r} is not valid; allowed presets: {', '.join(_PRESETS)}"
            )

    @property
    def encoder(self) -> str:
        """The PyAV encoder name ``codec`` resolves to."""
        return _resolve_codec(self.codec)


@dataclass(frozen=True)
class DecodedVideo:
    """A decoded clip: RGB frames (T, H, W, 3) uint8, frame rate and user metadata."""

    frames: np.ndarray
    fps: float
    metadata: dict[str, str] = field(default_factory=dict)


def _to_uint8_frames(frames: np.ndarray) -> np.ndarray:
    """Validate (T, H, W, 3) frames and return them as contiguous uint8."""
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1 or 0 in arr.shape:
        raise ValueError(
            f"frames must have shape (T, H, W, 3) with T, H, W >= 1, got shape {arr.shape}"
        )
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("frames contain NaN or infinite values")
        return np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {arr.dtype}")


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Reject metadata that FFmpeg would silently drop, merge or truncate."""
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metadata keys must be non-empty strings, got {key!r}")
        if not isinstance(value, str):
            raise ValueError(f"metadata[{key!r}] must be a str, got {type(value).__name__}")
        if "\x00" in key or "\x00" in value:
            raise ValueError(f"metadata[{key!r}] contains a NUL character")
        folded = key.lower()
        if folded in _MUXER_KEYS:
            raise ValueError(f"metadata key {key!r} is reserved by the mp4 muxer")
        if folded in seen:  # FFmpeg dictionaries are case-insensitive
            raise ValueError(
                f"metadata keys {seen[folded]!r} and {key!r} differ only in case"
            )
        seen[folded] = key
        out[key] = value
    return out


def encode_mp4(
    frames: np.ndarray,
    metadata: Mapping[str, str] | None = None,
    encoding: VideoEncoding = VideoEncoding(),
) -> bytes:
    """Encode RGB frames (T, H, W, 3), uint8 or float in [0, 1], to MP4 bytes.

    ``metadata`` is stored as container metadata and comes back from :func:`decode_mp4`.
    """
    rgb = _to_uint8_frames(frames)
    meta = _check_metadata(metadata or {})
    _, height, width, _ = rgb.shape
    w_div, h_div = _SUBSAMPLING.get(encoding.pix_fmt, (1, 1))
    if width % w_div or height % h_div:
        need = "even height and width" if h_div == 2 else "an even width"
        raise ValueError(
            f"pix_fmt {encoding.pix_fmt} needs {need}, got frames of height {height} "
            f"and width {width} (shape {rgb.shape}); crop/pad or use pix_fmt 'yuv444p'"
        )

    codec = encoding.encoder
    is_yuv = encoding.pix_fmt.startswith("yuv")
    buf = io.BytesIO()
    # use_metadata_tags: keep arbitrary keys (see module docstring).
    with av.open(buf, "w", format="mp4", options={"movflags": "use_metadata_tags"}) as container:
        for key, value in meta.items():
            container.metadata[key] = value
        stream = container.add_stream(codec, rate=encoding.fps)
        stream.width = width
        stream.height = height
        stream.pix_fmt = encoding.pix_fmt
        # Frames are stamped in the codec's 1/fps time base; the muxer later changes
        # stream.time_base (to 1/16384 for mp4), so it must not be used for frames.
        frame_time_base = Fraction(1, encoding.fps)
        stream.codec_context.time_base = frame_time_base
        stream.codec_context.options = {"crf": str(encoding.crf), "preset": encoding.preset}
        if is_yuv:
            cc = stream.codec_context
            cc.colorspace = Colorspace.ITU709
            cc.color_range = ColorRange.MPEG
            cc.color_primaries = ColorPrimaries.BT709
            cc.color_trc = ColorTrc.BT709

        for index, image in enumerate(rgb):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if is_yuv:
                frame = frame.reformat(
                    format=encoding.pix_fmt,
                    src_colorspace="ITU709",  # RGB input: only the range matters here
                    dst_colorspace="ITU709",
                    src_color_range="JPEG",
                    dst_color_range="MPEG",
                    dst_color_trc=ColorTrc.BT709,
                    dst_color_primaries=ColorPrimaries.BT709,
                    interpolation="BICUBIC",
                )
            frame.pts = index
            frame.time_base = frame_time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buf.getvalue()


def decode_mp4(data: bytes | str | os.PathLike[str]) -> DecodedVideo:
    """Decode an MP4 (bytes or a local path) to RGB uint8 frames, fps and metadata."""
    is_bytes = isinstance(data, (bytes, bytearray, memoryview))
    source = io.BytesIO(data) if is_bytes else os.fspath(data)
    with av.open(source, "r") as container:
        if not container.streams.video:
            raise ValueError("data contains no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else math.nan
        metadata = {
            str(k): str(v) for k, v in container.metadata.items() if k.lower() not in _MUXER_KEYS
        }
        # to_ndarray converts with the colour matrix/range the frame is tagged with.
        images = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        if images:
            frames = np.stack(images)
        else:
            frames = np.zeros((0, stream.height, stream.width, 3), dtype=np.uint8)
    return DecodedVideo(frames=frames, fps=fps, metadata=metadata)
