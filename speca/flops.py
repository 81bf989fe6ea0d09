"""Analytic transformer FLOPs for HunyuanVideo-style DiTs (multiply-add = 2 FLOPs).

For hidden size d, MLP ratio m and N = video + text tokens, one block costs
    (2 * (4 + 2m)) * N * d^2   projections and MLP   (= 24 N d^2 at m = 4)
  + 4 * N^2 * d                attention scores and weighted sum
Double-stream blocks (QKV + out-projection per stream, an MLP per stream) and single-stream
blocks (fused QKV + MLP-in, then one out-projection over d + m*d) both come to this count.
Embedders, the token refiner and the output head are under 0.1% at real sizes and left out.
A full step runs every block; a speculative step runs only the verified block, so its cost is
1 / num_blocks of a full step (1/60 on HunyuanVideo: 20 double + 40 single blocks).
"""

from __future__ import annotations


def block_flops(hidden: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    return 2 * (4 + 2 * mlp_ratio) * tokens * hidden**2 + 4 * tokens**2 * hidden


def num_blocks(transformer_config) -> int:
    return int(transformer_config["num_layers"]) + int(transformer_config["num_single_layers"])


def video_tokens(transformer_config, latent_frames: int, latent_height: int, latent_width: int) -> int:
    p, pt = int(transformer_config["patch_size"]), int(transformer_config["patch_size_t"])
    return (latent_frames // pt) * (latent_height // p) * (latent_width // p)


def step_flops(transformer_config, tokens: int) -> float:
    """FLOPs of one full transformer pass for one sample."""
    hidden = int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])
    return num_blocks(transformer_config) * block_flops(hidden, tokens, float(transformer_config["mlp_ratio"]))


def speculative_step_flops(transformer_config, tokens: int, verified_blocks: int = 1) -> float:
    """FLOPs of a speculative pass: only the verified block(s) run."""
    return step_flops(transformer_config, tokens) * verified_blocks / num_blocks(transformer_config)
