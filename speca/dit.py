"""SpeCa's DiT family: diffusers' class-conditional `DiTTransformer2DModel` (DiT-XL/2: 28 blocks).

One stream: each `BasicTransformerBlock` (adaLN-Zero) takes and returns `hidden_states`; the
module cache records its self-attention and MLP outputs. `DiTPipeline` runs CFG as ONE batch:
rows `[x, x]` with labels `[y, null]`, so row b and row b + B are the same sample and share a
decision (their error partials are summed).
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.attention import BasicTransformerBlock

from .blocks import redraft_adaln_zero
from .config import SpeCaConfig
from .flops import step_flops as _step_flops
from .registry import BlockSpec, FamilySpec, register

# The authors' DiT settings (Cache4Diffusion speca-dit): order 4, 3 warm-up steps, tau 0.1 -> 0.001
# (floor 0.01) on their element-wise relative L1, 2..5 speculative steps, per-module cache.
REFERENCE = SpeCaConfig(order=4, cache="module", tau0=0.1, beta=0.01, tau_min=0.01, metric="rel_l1_elementwise",
                        warmup_steps=3, min_spec=2, max_spec=5)


def _redraft(block, streams: dict, args: dict, cached) -> dict:
    h = streams["hidden_states"]
    _, gate_msa, _, _, gate_mlp = block.norm1(h, args["timestep"], args["class_labels"], hidden_dtype=h.dtype)
    return {"hidden_states": redraft_adaln_zero(block, h, gate_msa, gate_mlp, cached)}


def cfg_samples(transformer, args: dict, batch: int) -> list[int]:
    """Sample of each row: a batch `[x, x]` labelled `[y, null]` (DiTPipeline's CFG) is B samples."""
    labels, x = args.get("class_labels"), args["hidden_states"]
    null = transformer.config.num_embeds_ada_norm  # the label table's extra "no class" row
    if labels is None or labels.dim() != 1 or batch % 2:
        return list(range(batch))
    half = batch // 2
    if bool((labels[half:] == null).all()) and not bool((labels[:half] == null).any()) and torch.equal(x[:half],
                                                                                                     x[half:]):
        return list(range(half)) * 2
    return list(range(batch))


def _check(transformer) -> None:
    for i, block in enumerate(transformer.transformer_blocks):
        if block.norm_type != "ada_norm_zero" or block.attn2 is not None or block.pos_embed is not None \
                or block._chunk_size is not None:
            raise ValueError(f"SpeCa (DiT) needs adaLN-Zero self-attention blocks without cross-attention, "
                             f"positional embedding or chunked MLP; transformer_blocks[{i}] has "
                             f"norm_type={block.norm_type!r}, cross-attention={block.attn2 is not None}")


FAMILY = register(FamilySpec(
    name="DiT",
    model_class=DiTTransformer2DModel,
    block_lists=("transformer_blocks",),
    blocks={BasicTransformerBlock: BlockSpec(("hidden_states",), ("hidden_states",),
                                             {"attn1": ("attn1",), "ff": ("ff",)}, _redraft)},
    batched_args=("hidden_states", "timestep", "class_labels"),
    samples=cfg_samples,
    check=_check,
))


def image_tokens(transformer_config) -> int:
    return (int(transformer_config["sample_size"]) // int(transformer_config["patch_size"])) ** 2


def step_flops(transformer_config) -> float:
    """FLOPs of one full transformer pass for one row (a CFG sample is two rows; MLP ratio 4, FeedForward's)."""
    return _step_flops(transformer_config, image_tokens(transformer_config))


def estimate_cache_bytes(transformer_config, config: SpeCaConfig, rows: int = 1, dtype_bytes: int = 2) -> int:
    """Feature-cache bytes for `rows` batch rows (2 per sample with CFG); the hooks' layout
    (`FamilySpec.cache_bytes`): lean, the stream into the verified block and out of it (+ the first
    block's out, with verify_first); module, attention + MLP output per block."""
    return FAMILY.cache_bytes(transformer_config, config, image_tokens(transformer_config), batch=rows,
                              dtype_bytes=dtype_bytes)
