"""SpeCa's HunyuanVideo family: diffusers' `HunyuanVideoTransformer3DModel`.

20 dual-stream blocks then 40 single-stream blocks, each taking and returning
`(hidden_states, encoder_hidden_states)` (video first); the verified block is the last
single-stream block by default. True CFG runs as two calls (`cache_context("cond")` /
`"uncond"`), which the core pairs by step.
"""

from __future__ import annotations

import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import (HunyuanVideoSingleTransformerBlock,
                                                                     HunyuanVideoTransformerBlock)

from .blocks import STREAMS, dual_stream_spec, redraft_joint
from .config import SpeCaConfig
from .flops import num_blocks, speculative_fraction, step_flops, video_tokens  # noqa: F401  (this family's, by name)
from .registry import BlockSpec, FamilySpec, TokenSubset, register


def _redraft_single(block, streams: dict, args: dict, cached) -> dict:
    video, text = streams["hidden_states"], streams["encoder_hidden_states"]
    joint = redraft_joint(block, torch.cat([video, text], dim=1), args["temb"], cached)
    return {"hidden_states": joint[:, :video.shape[1]], "encoder_hidden_states": joint[:, video.shape[1]:]}


def subset_rule(rotary: str):
    """The token-subset rule of a HunyuanVideo block (1.0 or 1.5) whose rotary tables are argument `rotary`."""

    def subset(args: dict, sub: TokenSubset) -> dict:
        """Video tokens of the subset with all text tokens: the rotary tables (video rows) and the joint
        attention mask (B, 1, 1, video columns + text; video columns in the sequence-parallel padded
        layout when sharded) follow them, padding slots masked out. A text-only mask (B, text), 1.5's in
        one process, where the attention puts the video columns in front itself, stays as it is."""
        video = args["hidden_states"]
        out = {**args, "hidden_states": video.index_select(1, sub.local)}
        if args.get(rotary) is not None:
            out[rotary] = tuple(t.index_select(0, sub.local.to(t.device)) for t in args[rotary])
        mask = args.get("attention_mask")
        text = args["encoder_hidden_states"].shape[1]
        if mask is not None and mask.shape[-1] != text:
            columns = mask[..., :mask.shape[-1] - text].index_select(-1, sub.columns.to(mask.device))
            out["attention_mask"] = torch.cat([columns & sub.column_real.to(mask.device),
                                               mask[..., mask.shape[-1] - text:]], dim=-1)
        return out

    return subset


def head(transformer, video: torch.Tensor, args: dict) -> torch.Tensor:
    """The prediction per video token: `norm_out` then `proj_out`, as the model's forward ends (its forward
    called directly, so a sequence-parallel gather hook on `proj_out` does not run)."""
    return transformer.proj_out.forward(transformer.norm_out(video, args["temb"]))


FAMILY = register(FamilySpec(
    name="HunyuanVideo",
    model_class=HunyuanVideoTransformer3DModel,
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    blocks={
        HunyuanVideoTransformerBlock: dual_stream_spec(subset=subset_rule("freqs_cis")),  # its rotary tables' name
        HunyuanVideoSingleTransformerBlock: BlockSpec(STREAMS, STREAMS, {"proj_out": ("proj_out",)}, _redraft_single,
                                                      subset=subset_rule("image_rotary_emb"),
                                                      spans={"proj_out": STREAMS}),
    },
    batched_args=("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections",
                  "timestep", "guidance"),
    branch_args=("encoder_hidden_states", "encoder_attention_mask", "pooled_projections"),
    head=head,
    layers=("num_layers", "num_single_layers"),
))


# FLOPs and cache size from the transformer config (dict-like), for stats and benchmarks: `step_flops`,
# `video_tokens` and `num_blocks` are `speca.flops`'.


def speculative_step_flops(transformer_config, tokens: int, verified_blocks: int = 1) -> float:
    """FLOPs of a speculative pass: only the verified block(s) run."""
    return step_flops(transformer_config, tokens) * speculative_fraction(num_blocks(transformer_config),
                                                                         verified_blocks)


def estimate_cache_bytes(transformer_config, config: SpeCaConfig, video_tokens: int, text_tokens: int,
                         batch: int = 1, dtype_bytes: int = 2, contexts: int = 1,
                         clip_tokens: int | None = None) -> int:
    """Feature-cache bytes SpeCa holds for a batch (per rank under sequence parallelism, pass the rank's
    video tokens; with a draft gate the whole clip's in `clip_tokens`); `contexts` = 2 with true CFG. The layout is
    the hooks' (`FamilySpec.cache_bytes`)."""
    return FAMILY.cache_bytes(transformer_config, config, video_tokens, text_tokens, batch, dtype_bytes, contexts,
                              clip_tokens)
