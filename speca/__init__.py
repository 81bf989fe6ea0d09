"""SpeCa: speculative feature caching for diffusion transformers (arXiv 2509.11628).

Core modules name no model: `config` (SpeCaConfig, presets), `forecast` (the draft),
`controller` (accept/reject per sample), `flops`, `blocks` (adaLN-Zero redrafts), `registry`
(what a family must describe) and `hooks` (apply_speca on any registered family). One module
per family registers it: `hunyuan_video`, `hunyuan_video15`, `flux`, `dit`.
"""

from . import dit, flux, hunyuan_video, hunyuan_video15  # noqa: F401  (each registers its family)
from .config import PRESETS, SpeCaConfig
from .hooks import SampleSpeCaStats, SpeCaSession, apply_speca, disable_speca, get_session
from .hunyuan_video import estimate_cache_bytes  # the batch job's model (kept for its callers)
from .registry import supported

__all__ = ["PRESETS", "SampleSpeCaStats", "SpeCaConfig", "SpeCaSession", "apply_speca", "disable_speca",
           "estimate_cache_bytes", "get_session", "supported"]
