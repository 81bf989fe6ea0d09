"""Typed, validated configuration for loading a model and for each sample request.

Everything is checked here, at the edge, before any model work; each error names the field,
the value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace

DTYPES = ("auto", "float32", "bfloat16", "float16")

# Ids name objects (videos/<id>.mp4, stats/<id>.parquet) on every backend: S3's safe characters,
# and short enough that <id>.parquet plus a temporary-name suffix stays under 255 bytes.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_ID_LENGTH = 128
# Flow-matching schedulers are trained on 1000 timesteps: more steps than that only repeat them.
MAX_STEPS = 1000


class InvalidRequest(ValueError):
    """A request or config field has a value that cannot work; `field` names it."""

    def __init__(self, field: str, value, allowed: str):
        self.field = field
        super().__init__(f"{field}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how.

    Args:
        model: "bundled" (the tiny model in this package), a diffusers-format folder, or a hub id
            such as "hunyuanvideo-community/HunyuanVideo".
        device: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".
        dtype: "auto" (bfloat16 on CUDA, float32 on CPU), "float32", "bfloat16" or "float16"
            (float16 gives NaNs / black videos on HunyuanVideo; bfloat16 is the safe half type).
        attention_backend: a diffusers attention backend ("native" = PyTorch SDPA, "_native_cudnn",
            "xformers", ...). Backends that refuse an attention mask cannot run HunyuanVideo.
        vae_tiling: decode the VAE in spatial tiles (needed at 720p on most GPUs); under sequence
            parallelism the tiles are spread over the ranks (pipeline/parallel/vae.py).
        vae_tile_size: tile side in pixels (stride 3/4 of it); None: diffusers' 256. Implies vae_tiling.
    """

    model: str = "bundled"
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "native"
    vae_tiling: bool = False
    vae_tile_size: int | None = None

    def __post_init__(self) -> None:
        tile = self.vae_tile_size
        if tile is not None and (not _is_int(tile) or tile < 8):
            raise InvalidRequest("vae_tile_size", tile, "expected an integer >= 8 (pixels)")
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidRequest("model", self.model, "expected 'bundled', a folder or a hub id")
        if self.dtype not in DTYPES:
            raise InvalidRequest("dtype", self.dtype, f"expected one of {DTYPES}")
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise InvalidRequest("device", dev, "expected 'auto', 'cpu', 'cuda' or 'cuda:N'")

    def resolve_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise InvalidRequest("device", self.device, "CUDA is not available on this machine (use 'cpu')")
            index = int(self.device.split(":")[1]) if ":" in self.device else 0
            if index >= torch.cuda.device_count():
                raise InvalidRequest("device", self.device, f"only {torch.cuda.device_count()} CUDA device(s) present")
        return self.device

    def resolve_dtype(self, device: str):
        import torch

        name = self.dtype if self.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        if device == "cpu" and name == "float16":
            raise InvalidRequest("dtype", self.dtype, "float16 is not supported on CPU (use float32 or bfloat16)")
        if name == "bfloat16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
            raise InvalidRequest("dtype", self.dtype, "this GPU has no bfloat16 support (use float32)")
        return getattr(torch, name)


@dataclass(frozen=True)
class GenerationDefaults:
    """Per-model defaults: the family's (`pipeline.families`, from the model's configs), overridden by the
    model folder's generation_config.json when present. The class defaults are HunyuanVideo 1.0's.

    HunyuanVideo 1.5 only: `text_crop_start` (chat-template tokens cropped, 108), `glyph_max_length`
    (ByT5 tokens, 256) and `image_tokens` (zeroed image embeds, 729); None: the pipeline's own.
    `flow_shift`: the scheduler's shift (5 at 480p, 9 at 720p on 1.5; recorded, set by the scheduler config).
    """

    height: int = 720
    width: int = 1280
    num_frames: int = 129
    num_inference_steps: int = 50
    guidance_scale: float = 6.0
    true_cfg_scale: float = 1.0
    negative_prompt: str = ""
    max_sequence_length: int = 256
    prompt_template: dict | None = None  # None: the pipeline's own (the real model's) template
    fps: int = 24
    vae_framewise: bool = True
    flow_shift: float | None = None
    text_crop_start: int | None = None
    glyph_max_length: int | None = None
    image_tokens: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationDefaults":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class ModelLimits:
    """Size rules of a loaded model: latent strides in space and time."""

    spatial_stride: int  # VAE spatial compression x transformer patch size
    temporal_stride: int  # VAE temporal compression x temporal patch size
    vae_spatial: int
    patch: int
    max_tokens: int | None = None  # latent tokens per sample; None: no budget (see `with_token_budget`)
    max_steps: int = MAX_STEPS
    embedded_guidance: bool = True  # False (HunyuanVideo 1.5): guidance_scale must be 1, CFG is true_cfg_scale

    def tokens(self, height: int, width: int, num_frames: int) -> int:
        """Latent tokens the transformer attends over for one sample of this size."""
        return (height // self.spatial_stride) * (width // self.spatial_stride) * (
            (num_frames - 1) // self.temporal_stride + 1)


def with_token_budget(limits: ModelLimits, defaults: GenerationDefaults, max_tokens: int | None = None) -> ModelLimits:
    """`limits` with a token budget: `max_tokens`, else the tokens of the model's default size.

    The default size (generation_config.json) is what the model is configured for; anything
    larger multiplies attention cost quadratically, so it has to be asked for explicitly.
    """
    if max_tokens is None:
        max_tokens = limits.tokens(defaults.height, defaults.width, defaults.num_frames)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise InvalidRequest("max_tokens", max_tokens, "must be an integer >= 1")
    return replace(limits, max_tokens=max_tokens)


@dataclass(frozen=True)
class SampleRequest:
    """One video to generate; unset fields take the model's defaults."""

    prompt: str
    seed: int = 0
    id: str | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    negative_prompt: str | None = None

    def resolve(self, defaults: GenerationDefaults) -> "SampleRequest":
        """Fill unset fields from the model defaults and assign a stable id."""
        filled = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "true_cfg_scale",
                     "negative_prompt"):
            if filled[name] is None:
                filled[name] = getattr(defaults, name)
        req = SampleRequest(**filled)
        return req if req.id else replace(req, id=req.content_hash())

    def content_hash(self) -> str:
        """A stable id from everything that determines the video."""
        payload = {k: v for k, v in asdict(self).items() if k != "id"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self, limits: ModelLimits) -> None:
        """Raise InvalidRequest naming the first bad field; expects a resolved request."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidRequest("prompt", self.prompt, "must be a non-empty string")
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise InvalidRequest("seed", self.seed, "must be an integer in [0, 2**63)")
        if self.id is not None and (not isinstance(self.id, str) or len(self.id) > MAX_ID_LENGTH
                                    or not ID_PATTERN.fullmatch(self.id)):
            raise InvalidRequest("id", self.id, f"must be 1 to {MAX_ID_LENGTH} characters from A-Z a-z 0-9 . _ - "
                                                "(so without '/'), starting with a letter or digit: it names the "
                                                "video's object")
        s = limits.spatial_stride
        for name in ("height", "width"):
            v = getattr(self, name)
            if not _is_int(v) or v <= 0 or v % s:
                lo = max(s, (v // s) * s) if _is_int(v) and v > 0 else s
                raise InvalidRequest(name, v, f"must be a positive multiple of {s} (VAE x{limits.vae_spatial} times "
                                              f"patch {limits.patch}), e.g. {lo} or {lo + s}")
        t = limits.temporal_stride
        n = self.num_frames
        if not _is_int(n) or n < 1 or (n - 1) % t:
            base = ((n - 1) // t) * t + 1 if _is_int(n) and n > 1 else 1
            raise InvalidRequest("num_frames", n, f"must be {t}k+1 frames (the VAE compresses time {t}x), e.g. {base} or {base + t}")
        if not _is_int(self.num_inference_steps) or not 1 <= self.num_inference_steps <= limits.max_steps:
            raise InvalidRequest("num_inference_steps", self.num_inference_steps,
                                 f"must be an integer >= 1 and <= {limits.max_steps}")
        if limits.max_tokens is not None:
            tokens = limits.tokens(self.height, self.width, self.num_frames)
            if tokens > limits.max_tokens:
                raise InvalidRequest("height/width/num_frames", (self.height, self.width, self.num_frames),
                                     f"{tokens} latent tokens per sample exceed this model's budget of "
                                     f"{limits.max_tokens} (its default size; raise it with --max-tokens)")
        for name in ("guidance_scale", "true_cfg_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise InvalidRequest(name, v, "must be a finite number >= 0")
        if not limits.embedded_guidance and self.guidance_scale != 1:
            raise InvalidRequest("guidance_scale", self.guidance_scale,
                                 "must be 1: this model has no embedded guidance; its CFG scale is true_cfg_scale")
        if not isinstance(self.negative_prompt, str):
            raise InvalidRequest("negative_prompt", self.negative_prompt, "must be a string (may be empty)")

    def batch_key(self) -> tuple:
        """Samples with equal keys can share one batch."""
        return (self.height, self.width, self.num_frames, self.num_inference_steps, self.guidance_scale,
                self.true_cfg_scale)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
