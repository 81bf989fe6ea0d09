"""SpeCa: speculative feature caching for diffusion transformers (arXiv 2509.11628).

Core modules name no model: `config` (SpeCaConfig, presets), `forecast` (the draft),
`controller` (accept/reject per sample), `flops`, `blocks` (adaLN-Zero redrafts), `registry`
(what a family must describe) and `hooks` (apply_speca on any registered family). One module
per family registers it: `hunyuan_video`, `hunyuan_video15`, `flux`, `dit`.

Names load on first use (PEP 562), so `speca.config` alone imports no torch or diffusers; the
registry imports the family modules (`FAMILY_MODULES`) before its first lookup.
"""

from importlib import import_module

FAMILY_MODULES = ("dit", "flux", "hunyuan_video", "hunyuan_video15")  # each registers its family when imported

_EXPORTS = {"PRESETS": "config", "SpeCaConfig": "config", "SampleSpeCaStats": "hooks", "SpeCaSession": "hooks",
            "apply_speca": "hooks", "disable_speca": "hooks", "get_session": "hooks",
            "estimate_cache_bytes": "hunyuan_video",  # the batch job's model (kept for its callers)
            "supported": "registry"}

__all__ = ["PRESETS", "SampleSpeCaStats", "SpeCaConfig", "SpeCaSession", "apply_speca", "disable_speca",
           "estimate_cache_bytes", "get_session", "supported"]


def __getattr__(name: str):  # PEP 562: a name's module is imported when the name is first used
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
