"""Module-cache drafts of the adaLN-Zero block shapes diffusers' DiTs share (no model names here).

Each helper rebuilds a block's residual update with its attention / MLP outputs replaced by
`cached(key)` drafts, while the gates come from this step's real modulation, so a speculative
step skips only the attention and MLP matmuls. `dual_stream_spec` is the whole `BlockSpec` of an
MMDiT block (HunyuanVideo 1.0 and 1.5, FLUX): families differ only in their return order and
token-subset rule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .registry import BlockSpec

Cached = Callable[[str], torch.Tensor]
STREAMS = ("hidden_states", "encoder_hidden_states")  # an MMDiT block's arguments: image / video, then text


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


def _redraft_streams(block, streams: dict, args: dict, cached: Cached) -> dict:
    hidden, context = redraft_dual_stream(block, streams[STREAMS[0]], streams[STREAMS[1]], args["temb"], cached)
    return {STREAMS[0]: hidden, STREAMS[1]: context}


def dual_stream_spec(returns: tuple[str, str] = STREAMS, subset=None) -> BlockSpec:
    """An MMDiT block taking `(hidden_states, encoder_hidden_states, temb, ...)` and returning its streams in
    `returns` order: the module cache records `attn` (both streams), `ff` and `ff_context`."""
    return BlockSpec(STREAMS, returns, {"attn": ("attn", "attn_context"), "ff": ("ff",), "ff_context": ("ff_context",)},
                     _redraft_streams, subset=subset,
                     spans={"attn_context": (STREAMS[1],), "ff_context": (STREAMS[1],)})


def redraft_joint(block, joint: torch.Tensor, temb: torch.Tensor, cached: Cached) -> torch.Tensor:
    """A single-stream block on the joint sequence: `norm` gives the gate; `proj_out` is cached."""
    _, gate = block.norm(joint, emb=temb)
    return gate.unsqueeze(1) * cached("proj_out") + joint


def redraft_adaln_zero(block, hidden: torch.Tensor, gate_msa: torch.Tensor, gate_mlp: torch.Tensor,
                       cached: Cached) -> torch.Tensor:
    """A self-attention + MLP block with adaLN-Zero gates: `attn1` and `ff` are cached."""
    hidden = gate_msa.unsqueeze(1) * cached("attn1") + hidden
    return gate_mlp.unsqueeze(1) * cached("ff") + hidden
