"""Analytic transformer FLOPs of a DiT block (multiply-add = 2 FLOPs); no model names here.

One counting rule for the stats, SpeCa's own compute record and the benchmarks: a linear layer
costs `linear_flops`, an attention call `attention_flops` (scores and weighted sum; softmax, norms
and gates are left out), and `block_flops` is built from the two. For hidden size d, MLP ratio m
and N tokens through the block, one block costs
    (2 * (4 + 2m)) * N * d^2   projections and MLP   (= 24 N d^2 at m = 4)
  + 4 * N^2 * d                attention scores and weighted sum
Dual-stream blocks (QKV + out-projection per stream, an MLP per stream), single-stream blocks
(fused QKV + MLP-in, then one out-projection over d + m*d) and plain DiT blocks (self-attention
+ MLP) all come to this count. Embedders, output heads and the per-sample adaLN modulation are left
out (under 1% at real sizes; tests/test_flops.py checks the count against torch's FlopCounterMode on
diffusers' HunyuanVideo blocks); each family module turns its config into hidden size, block count
and tokens (`hidden_size`, `num_blocks`, `video_tokens`, `step_flops` read diffusers' config keys:
`num_attention_heads` x `attention_head_dim`, `num_layers` + `num_single_layers`, `patch_size(_t)`,
`mlp_ratio`, 4 when absent). A full step runs every block; a speculative step runs only the verified
block(s), so its cost is verified / num_blocks of a full step.
"""

from __future__ import annotations


def linear_flops(rows: float, in_features: int, out_features: int) -> float:
    """A linear layer applied to `rows` token vectors (bias adds left out)."""
    return 2.0 * rows * in_features * out_features


def attention_flops(queries: int, keys: int, width: int) -> float:
    """One sample's attention: query-key scores and the weighted sum of values, over all heads
    (`width` = heads x head dim)."""
    return 2 * 2.0 * queries * keys * width


def block_flops(hidden: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    """One sample through one block: 4 d x d projections (q, k, v, out) and the MLP's two d x md layers."""
    return (4 + 2 * mlp_ratio) * linear_flops(tokens, hidden, hidden) + attention_flops(tokens, tokens, hidden)


def speculative_fraction(num_blocks: int, verified_blocks: int = 1) -> float:
    """Share of a full step's block FLOPs that a speculative step spends."""
    return verified_blocks / num_blocks


def hidden_size(transformer_config) -> int:
    return int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])


def num_blocks(transformer_config) -> int:
    """Every block a full step runs: dual- (or plain) blocks plus single-stream blocks, where the model has them."""
    return int(transformer_config["num_layers"]) + int(transformer_config.get("num_single_layers", 0) or 0)


def video_tokens(transformer_config, latent_frames: int, latent_height: int, latent_width: int) -> int:
    """Video tokens of a latent of this size after the transformer's patching."""
    p, pt = int(transformer_config["patch_size"]), int(transformer_config.get("patch_size_t", 1) or 1)
    return (latent_frames // pt) * (latent_height // p) * (latent_width // p)


def step_flops(transformer_config, tokens: int) -> float:
    """FLOPs of one full transformer pass for one sample (tokens = image/video + text, through every block)."""
    return num_blocks(transformer_config) * block_flops(hidden_size(transformer_config), tokens,
                                                        float(transformer_config.get("mlp_ratio", 4.0) or 4.0))
