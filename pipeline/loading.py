"""Load a HunyuanVideo or HunyuanVideo 1.5 pipeline: real weights (folder or hub id) or the bundled tiny model.

The family comes from `model_index.json`'s `_class_name` (`pipeline.families`); every model goes through
its diffusers pipeline's `from_pretrained`, and the bundled model is just a folder in this package. Size
rules and defaults are read from the configs first, so requests can be validated before any weights are
loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from .config import GenerationDefaults, InvalidRequest, ModelConfig, ModelLimits
from .families import PipelineFamily, family_named

BUNDLED = "bundled"
_MASK_FREE_HINT = "use 'native' (PyTorch SDPA), '_native_cudnn', '_native_efficient' or 'xformers'"


def bundled_model_dir() -> Path:
    from .tiny import BUNDLED_MODEL_DIR

    return BUNDLED_MODEL_DIR


def resolve_model_path(model: str) -> str:
    return str(bundled_model_dir()) if model == BUNDLED else model


def _read_json(model: str, name: str) -> dict:
    path = resolve_model_path(model)
    local = Path(path) / name
    if local.exists():
        return json.loads(local.read_text())
    if Path(path).exists():
        raise FileNotFoundError(local)
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(path, name)).read_text())


@dataclass(frozen=True)
class ModelInfo:
    """What we know about a model from its configs alone."""

    model: str
    path: str
    limits: ModelLimits
    defaults: GenerationDefaults
    transformer_config: dict
    family: PipelineFamily


def _read_optional(model: str, name: str) -> dict | None:
    try:
        return _read_json(model, name)
    except Exception:  # noqa: BLE001 - an optional file: absent locally or on the hub
        return None


def read_model_info(model: str) -> ModelInfo:
    """Read configs (no weights); errors name the model and the missing file.

    Defaults: the family's (from its configs), then the folder's `generation_config.json` over them.
    """
    try:
        vae = _read_json(model, "vae/config.json")
        transformer = _read_json(model, "transformer/config.json")
        family = family_named((_read_optional(model, "model_index.json") or {}).get("_class_name"))
    except Exception as e:  # noqa: BLE001 - any failure here means the model cannot be used
        raise InvalidRequest("model", model, f"not a diffusers-format HunyuanVideo / HunyuanVideo 1.5 folder or "
                                             f"reachable hub id ({e})") from e
    fields = {**family.defaults(lambda name: _read_optional(model, name), transformer, vae),
              **(_read_optional(model, "generation_config.json") or {})}
    defaults = GenerationDefaults.from_dict(fields)
    vae_s = int(vae.get("spatial_compression_ratio", 8))
    vae_t = int(vae.get("temporal_compression_ratio", 4))
    patch, patch_t = int(transformer.get("patch_size", 2)), int(transformer.get("patch_size_t", 1))
    limits = ModelLimits(spatial_stride=vae_s * patch, temporal_stride=vae_t * patch_t, vae_spatial=vae_s, patch=patch,
                         embedded_guidance=family.embedded_guidance)
    return ModelInfo(model=model, path=resolve_model_path(model), limits=limits, defaults=defaults,
                     transformer_config=transformer, family=family)


@dataclass
class LoadedModel:
    pipe: object  # diffusers.HunyuanVideoPipeline or HunyuanVideo15Pipeline
    info: ModelInfo
    config: ModelConfig
    device: str
    dtype: object  # torch.dtype


def load_pipeline(config: ModelConfig = ModelConfig(), text_encoders: bool = True) -> LoadedModel:
    """Load the pipeline on the configured device / dtype with the chosen attention backend.

    `text_encoders=False` leaves out the text encoders and their tokenizers (HunyuanVideo's Llama is
    ~14 GB, 1.5's Qwen2.5-VL ~16 GB): for a sequence-parallel rank that is handed its prompts' embeddings.
    """
    device = config.resolve_device()
    dtype = config.resolve_dtype(device)
    info = read_model_info(config.model)
    pipe = info.family.load(info.path, dtype, text_encoders)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    info.family.prepare(pipe, info.defaults)
    tile = config.vae_tile_size
    if config.vae_tiling or tile is not None:
        pipe.vae.enable_tiling(**({} if tile is None else dict(
            tile_sample_min_height=tile, tile_sample_min_width=tile, tile_sample_stride_height=tile * 3 // 4,
            tile_sample_stride_width=tile * 3 // 4)))
    set_attention_backend(pipe.transformer, config.attention_backend, device, dtype)
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        if module is not None:
            module.eval().requires_grad_(False)
    return LoadedModel(pipe=pipe, info=info, config=config, device=device, dtype=dtype)


def set_attention_backend(transformer, backend: str, device: str, dtype) -> None:
    """Select a diffusers attention backend, refusing those that cannot take HunyuanVideo's mask.

    HunyuanVideo (1.0 and 1.5) always passes a text-padding mask; flash / sage backends raise on masks deep
    inside the first forward. We probe the backend once with a masked call so the error comes
    at load time and names the backend.
    """
    import torch
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    names = [b.value for b in AttentionBackendName]
    if backend not in names:
        raise InvalidRequest("attention_backend", backend, f"expected one of {names}")
    if backend == "native":
        return
    logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)
    try:
        transformer.set_attention_backend(backend)
    except Exception as e:  # noqa: BLE001 - missing packages / unsupported hardware
        raise InvalidRequest("attention_backend", backend, f"unavailable here ({e}); {_MASK_FREE_HINT}") from e
    q = torch.randn(1, 4, 2, 64, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 1, 4, dtype=torch.bool, device=device)
    mask[..., -1] = False
    try:
        dispatch_attention_fn(q, q, q, attn_mask=mask, backend=AttentionBackendName(backend))
    except (ValueError, NotImplementedError, RuntimeError) as e:
        transformer.set_attention_backend("native")
        raise InvalidRequest("attention_backend", backend, f"refuses HunyuanVideo's text-padding attention mask or "
                                                           f"cannot run on {device} ({e}); {_MASK_FREE_HINT}") from e
