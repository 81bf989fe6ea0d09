"""SpeCa: speculative feature caching for diffusion transformers (arXiv 2509.11628).

The core (`config`, `forecast`, `controller`, `flops`) is model-agnostic; `hunyuan_video` adapts
it to diffusers' HunyuanVideo transformer through hooks.
"""

from .config import PRESETS, SpeCaConfig
from .hunyuan_video import (SampleSpeCaStats, SpeCaSession, apply_speca, disable_speca, estimate_cache_bytes,
                            get_session)

__all__ = ["PRESETS", "SampleSpeCaStats", "SpeCaConfig", "SpeCaSession", "apply_speca", "disable_speca",
           "estimate_cache_bytes", "get_session"]
