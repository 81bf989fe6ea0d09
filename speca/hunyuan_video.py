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

from .blocks import redraft_dual_stream, redraft_joint
from .config import SpeCaConfig
from .flops import block_flops, speculative_fraction
from .registry import BlockSpec, FamilySpec, TokenSubset, register, subset_size

STREAMS = ("hidden_states", "encoder_hidden_states")


def _redraft_double(block, streams: dict, args: dict, cached) -> dict:
    h, e = redraft_dual_stream(block, streams["hidden_states"], streams["encoder_hidden_states"], args["temb"], cached)
    return {"hidden_states": h, "encoder_hidden_states": e}


def _redraft_single(block, streams: dict, args: dict, cached) -> dict:
    video, text = streams["hidden_states"], streams["encoder_hidden_states"]
    joint = redraft_joint(block, torch.cat([video, text], dim=1), args["temb"], cached)
    return {"hidden_states": joint[:, :video.shape[1]], "encoder_hidden_states": joint[:, video.shape[1]:]}


def _subset(rotary: str):
    def subset(args: dict, sub: TokenSubset) -> dict:
        """Video tokens of the subset with all text tokens: the rotary tables (video rows) and the joint
        attention mask (B, 1, 1, video columns + text; video columns in the sequence-parallel padded
        layout when sharded) follow them, padding slots masked out."""
        video = args["hidden_states"]
        out = {**args, "hidden_states": video.index_select(1, sub.local)}
        if args.get(rotary) is not None:
            out[rotary] = tuple(t.index_select(0, sub.local.to(t.device)) for t in args[rotary])
        mask = args.get("attention_mask")
        if mask is not None:
            text = args["encoder_hidden_states"].shape[1]
            columns = mask[..., :mask.shape[-1] - text].index_select(-1, sub.columns.to(mask.device))
            out["attention_mask"] = torch.cat([columns & sub.column_real.to(mask.device),
                                               mask[..., mask.shape[-1] - text:]], dim=-1)
        return out

    return subset


def _head(transformer, video: torch.Tensor, args: dict) -> torch.Tensor:
    """The prediction per video token: `norm_out` then `proj_out`, as the model's forward ends (its forward
    called directly, so a sequence-parallel gather hook on `proj_out` does not run)."""
    return transformer.proj_out.forward(transformer.norm_out(video, args["temb"]))


FAMILY = register(FamilySpec(
    name="HunyuanVideo",
    model_class=HunyuanVideoTransformer3DModel,
    block_lists=("transformer_blocks", "single_transformer_blocks"),
    blocks={
        HunyuanVideoTransformerBlock: BlockSpec(
            STREAMS, STREAMS, {"attn": ("attn", "attn_context"), "ff": ("ff",), "ff_context": ("ff_context",)},
            _redraft_double, subset=_subset("freqs_cis")),  # the dual-stream block's name for the rotary tables
        HunyuanVideoSingleTransformerBlock: BlockSpec(STREAMS, STREAMS, {"proj_out": ("proj_out",)}, _redraft_single,
                                                      subset=_subset("image_rotary_emb")),
    },
    batched_args=("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections",
                  "timestep", "guidance"),
    branch_args=("encoder_hidden_states", "encoder_attention_mask", "pooled_projections"),
    head=_head,
))


# FLOPs and cache size from the transformer config (dict-like), for stats and benchmarks.

def num_blocks(transformer_config) -> int:
    return int(transformer_config["num_layers"]) + int(transformer_config["num_single_layers"])


def video_tokens(transformer_config, latent_frames: int, latent_height: int, latent_width: int) -> int:
    p, pt = int(transformer_config["patch_size"]), int(transformer_config["patch_size_t"])
    return (latent_frames // pt) * (latent_height // p) * (latent_width // p)


def _hidden(transformer_config) -> int:
    return int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])


def step_flops(transformer_config, tokens: int) -> float:
    """FLOPs of one full transformer pass for one sample (tokens = video + text)."""
    return num_blocks(transformer_config) * block_flops(_hidden(transformer_config), tokens,
                                                        float(transformer_config["mlp_ratio"]))


def speculative_step_flops(transformer_config, tokens: int, verified_blocks: int = 1) -> float:
    """FLOPs of a speculative pass: only the verified block(s) run."""
    return step_flops(transformer_config, tokens) * speculative_fraction(num_blocks(transformer_config),
                                                                         verified_blocks)


def estimate_cache_bytes(transformer_config, config: SpeCaConfig, video_tokens: int, text_tokens: int,
                         batch: int = 1, dtype_bytes: int = 2, contexts: int = 1) -> int:
    """Feature-cache bytes SpeCa holds for a batch (per rank under sequence parallelism, pass the
    rank's video tokens). `contexts` = 2 with true CFG (cond and uncond keep separate caches).

    lean:   (order + 1) x [streams into the verified block (video + text) + video stream out of it
                           (+ the first block's video stream out, with verify_first; with
                           verify_tokens < 1 each check keeps its subset's video stream out, and the
                           first block's full one is not kept)]
    module: (order + 1) x [per dual-stream block: attention and MLP outputs of both streams;
                           per single-stream block: the output projection over video + text]
    """
    if config.cache == "lean":
        checked = video_tokens if config.verify_tokens >= 1 else subset_size(video_tokens, config.verify_tokens)
        tokens = 2 * video_tokens + text_tokens + (checked if config.verify_first else 0)
        if config.verify_tokens < 1:
            tokens += checked
    else:
        tokens = (int(transformer_config["num_layers"]) * 2 * (video_tokens + text_tokens)
                  + int(transformer_config["num_single_layers"]) * (video_tokens + text_tokens))
    return (config.order + 1) * tokens * _hidden(transformer_config) * batch * dtype_bytes * contexts
