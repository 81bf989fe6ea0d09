"""SpeCa's FLUX family: diffusers' `FluxTransformer2DModel` (FLUX.1: 19 dual + 38 single blocks).

Blocks take `(hidden_states, encoder_hidden_states)` and return them the other way round,
`(encoder_hidden_states, hidden_states)`; single-stream blocks put the text first in their
joint sequence. Verification reads the image stream. Position ids (`img_ids`, `txt_ids`) are
shared by the batch and passed whole. True CFG runs as two calls, like HunyuanVideo's.
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.transformers.transformer_flux import (FluxIPAdapterAttnProcessor, FluxSingleTransformerBlock,
                                                          FluxTransformerBlock)

from .blocks import STREAMS, dual_stream_spec, redraft_joint
from .config import SpeCaConfig
from .flops import num_blocks, step_flops  # noqa: F401  (this family's, by name; FLUX's MLP ratio is 4, no config key)
from .registry import BlockSpec, FamilySpec, register

RETURNS = ("encoder_hidden_states", "hidden_states")
# The authors' FLUX settings (Cache4Diffusion speca-flux): order 2, 3 warm-up steps, tau 7 -> 2.1
# (floor 0.1) on their element-wise relative L1, 2..8 speculative steps, per-module cache.
REFERENCE = SpeCaConfig(order=2, cache="module", tau0=7.0, beta=0.3, tau_min=0.1, metric="rel_l1_elementwise",
                        warmup_steps=3, min_spec=2, max_spec=8)


def _redraft_single(block, streams: dict, args: dict, cached) -> dict:
    image, text = streams["hidden_states"], streams["encoder_hidden_states"]
    joint = redraft_joint(block, torch.cat([text, image], dim=1), args["temb"], cached)
    return {"hidden_states": joint[:, text.shape[1]:], "encoder_hidden_states": joint[:, :text.shape[1]]}


def _check(transformer) -> None:
    for i, block in enumerate(transformer.transformer_blocks):
        if isinstance(block.attn.processor, FluxIPAdapterAttnProcessor):
            raise ValueError(f"SpeCa (FLUX) does not cover IP-Adapter attention (transformer_blocks[{i}]): its extra "
                             f"image-prompt output is not in the module cache; unload the IP-Adapter first")


FAMILY = register(FamilySpec(
    name="FLUX",
    model_class=FluxTransformer2DModel,
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    blocks={
        FluxTransformerBlock: dual_stream_spec(RETURNS),
        FluxSingleTransformerBlock: BlockSpec(STREAMS, RETURNS, {"proj_out": ("proj_out",)}, _redraft_single,
                                              spans={"proj_out": STREAMS}),
    },
    batched_args=("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"),
    check=_check,
    layers=("num_layers", "num_single_layers"),
))


def image_tokens(height: int, width: int, vae_scale_factor: int = 8) -> int:
    """Image tokens of a `height` x `width` image: FluxPipeline packs 2x2 latent pixels per token."""
    return (height // (2 * vae_scale_factor)) * (width // (2 * vae_scale_factor))


def estimate_cache_bytes(transformer_config, config: SpeCaConfig, image_tokens: int, text_tokens: int,
                         batch: int = 1, dtype_bytes: int = 2, contexts: int = 1) -> int:
    """Feature-cache bytes for a batch; `contexts` = 2 with true CFG. The layout is the hooks'
    (`FamilySpec.cache_bytes`): lean caches both streams into the verified block and the image stream out
    of it; module caches both streams' attention and MLP outputs per dual block and the joint projection
    per single block."""
    return FAMILY.cache_bytes(transformer_config, config, image_tokens, text_tokens, batch, dtype_bytes, contexts)
