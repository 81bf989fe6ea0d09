"""One FLOPs rule for the stats, SpeCa and the benchmarks, checked once against torch.

`speca.flops.block_flops` (the stats' and SpeCa's count) and `bench.flop_count.count_block_flops` (the
benchmark's per-call counter; both priced with `linear_flops` / `attention_flops`) against
`torch.utils.flop_counter.FlopCounterMode` on diffusers' own HunyuanVideo double- and single-stream blocks.
FlopCounterMode counts matmuls only and does not see CPU's fused attention kernel, so the blocks run with
the math attention backend, which it counts as two batched matmuls.
"""

from __future__ import annotations

import types

import pytest
import torch
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTransformerBlock,
)
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.flop_count import count_block_flops
from speca.flops import block_flops

HEADS, HEAD_DIM, MLP_RATIO = 4, 16, 4.0
HIDDEN = HEADS * HEAD_DIM
BATCH, VIDEO, TEXT = 2, 96, 16


@pytest.mark.parametrize("block_class", [HunyuanVideoTransformerBlock, HunyuanVideoSingleTransformerBlock])
def test_counts_agree_with_torch_flop_counter(block_class):
    torch.manual_seed(0)
    block = block_class(HEADS, HEAD_DIM, MLP_RATIO).eval()
    double = block_class is HunyuanVideoTransformerBlock
    holder = types.SimpleNamespace(transformer_blocks=[block] if double else [],
                                   single_transformer_blocks=[] if double else [block])
    args = (torch.randn(BATCH, VIDEO, HIDDEN), torch.randn(BATCH, TEXT, HIDDEN), torch.randn(BATCH, HIDDEN))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as torch_count, \
            count_block_flops(holder) as ours:
        block(*args)
    counted = torch_count.get_total_flops()
    assert counted > 0 and ours["ran"] == [1]  # the block ran its attention once
    # Every matmul in the block is a linear layer or attention: the per-call counter matches torch exactly.
    assert ours["flops"] == pytest.approx(counted, rel=1e-9)
    # The formula leaves out the per-sample adaLN modulation (a d -> 6d linear per stream in the double block,
    # d -> 3d in the single): about 1/N of a double block, under 1% at these 112 tokens (1e-4 at HunyuanVideo's
    # 20k), so the formula reads at most 1% low and never high.
    formula = BATCH * block_flops(HIDDEN, VIDEO + TEXT, MLP_RATIO)
    assert 0.99 * counted <= formula <= counted
