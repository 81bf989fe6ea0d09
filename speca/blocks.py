"""Module-cache drafts of the adaLN-Zero block shapes diffusers' DiTs share (no model names here).

Each helper rebuilds a block's residual update with its attention / MLP outputs replaced by
`cached(key)` drafts, while the gates come from this step's real modulation, so a speculative
step skips only the attention and MLP matmuls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Cached = Callable[[str], torch.Tensor]


def redraft_dual_stream(block, hidden: torch.Tensor, context: torch.Tensor, temb: torch.Tensor,
                        cached: Cached) -> tuple[torch.Tensor, torch.Tensor]:
    """An MMDiT block: `norm1` / `norm1_context` give the gates; `attn` (both streams), `ff`, `ff_context`."""
    _, gate_msa, _, _, gate_mlp = block.norm1(hidden, emb=temb)
    _, c_gate_msa, _, _, c_gate_mlp = block.norm1_context(context, emb=temb)
    hidden = hidden + cached("attn") * gate_msa.unsqueeze(1)
    context = context + cached("attn_context") * c_gate_msa.unsqueeze(1)
    hidden = hidden + gate_mlp.unsqueeze(1) * cached("ff")
    context = context + c_gate_mlp.unsqueeze(1) * cached("ff_context")
    return hidden, context


def redraft_joint(block, joint: torch.Tensor, temb: torch.Tensor, cached: Cached) -> torch.Tensor:
    """A single-stream block on the joint sequence: `norm` gives the gate; `proj_out` is cached."""
    _, gate = block.norm(joint, emb=temb)
    return gate.unsqueeze(1) * cached("proj_out") + joint


def redraft_adaln_zero(block, hidden: torch.Tensor, gate_msa: torch.Tensor, gate_mlp: torch.Tensor,
                       cached: Cached) -> torch.Tensor:
    """A self-attention + MLP block with adaLN-Zero gates: `attn1` and `ff` are cached."""
    hidden = gate_msa.unsqueeze(1) * cached("attn1") + hidden
    return gate_mlp.unsqueeze(1) * cached("ff") + hidden
