"""Analytic transformer FLOPs of a DiT block (multiply-add = 2 FLOPs); no model names here.

For hidden size d, MLP ratio m and N tokens through the block, one block costs
    (2 * (4 + 2m)) * N * d^2   projections and MLP   (= 24 N d^2 at m = 4)
  + 4 * N^2 * d                attention scores and weighted sum
Dual-stream blocks (QKV + out-projection per stream, an MLP per stream), single-stream blocks
(fused QKV + MLP-in, then one out-projection over d + m*d) and plain DiT blocks (self-attention
+ MLP) all come to this count. Embedders and output heads are left out (under 1% at real sizes);
each family module turns its config into hidden size, block count and tokens.
A full step runs every block; a speculative step runs only the verified block(s), so its cost
is verified / num_blocks of a full step.
"""

from __future__ import annotations


def block_flops(hidden: int, tokens: int, mlp_ratio: float = 4.0) -> float:
    return 2 * (4 + 2 * mlp_ratio) * tokens * hidden**2 + 4 * tokens**2 * hidden


def speculative_fraction(num_blocks: int, verified_blocks: int = 1) -> float:
    """Share of a full step's block FLOPs that a speculative step spends."""
    return verified_blocks / num_blocks
