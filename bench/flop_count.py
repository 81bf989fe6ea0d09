"""FLOPs a method spends in the transformer blocks, counted per call while it runs, and projected to a deeper model.

Each call is priced with `speca.flops`' `linear_flops` and `attention_flops`, the pieces SpeCa's own
compute record and the stats are built from (one counting rule; tests/test_flops.py checks it against
torch's FlopCounterMode)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from speca.flops import attention_flops, linear_flops

HUNYUAN_DEPTH = 60  # HunyuanVideo's 20 dual- + 40 single-stream blocks, for the projected speedups


@contextlib.contextmanager
def count_block_flops(transformer):
    """Tally FLOPs of the linear layers and attention calls inside the transformer blocks while active:
    in all (`flops`) and per block in execution order (`blocks`), and per block the calls in which it
    ran its attention (`ran`; a call a cache answered without attention does not count) and the
    transformer's calls (`calls`), for `projected_fraction`."""
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    total = {"flops": 0.0, "blocks": [0.0] * len(blocks), "ran": [0] * len(blocks), "calls": 0}
    inside: list[int] = []  # the block being run; attention elsewhere (refiner, text encoders, VAE) is not counted
    attended: list[bool] = []  # per entry of `inside`: did this call run attention
    handles = []

    def add(flops: float) -> None:
        total["flops"] += flops
        total["blocks"][inside[-1]] += flops

    def linear_hook(module, inputs, output):
        x = inputs[0]
        add(linear_flops(x.numel() / x.shape[-1], module.in_features, module.out_features))

    def enter(index):
        def hook(module, inputs):
            inside.append(index)
            attended.append(False)
        return hook

    def leave(module, inputs, output):
        total["ran"][inside.pop()] += attended.pop()

    def called(module, inputs):
        total["calls"] += 1

    if isinstance(transformer, torch.nn.Module):  # a bare holder of block lists (a test's) has no calls to count
        handles.append(transformer.register_forward_pre_hook(called))
    for i, block in enumerate(blocks):
        handles += [block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave)]
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))
    original = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        if inside:
            q = kwargs["query"] if "query" in kwargs else args[0]
            k = kwargs["key"] if "key" in kwargs else args[1]
            batch, heads, queries, head_dim = q.shape  # diffusers' native backend: (B, heads, N, head dim)
            add(batch * attention_flops(queries, k.shape[2], heads * head_dim))
            attended[-1] = True
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield total
    finally:
        F.scaled_dot_product_attention = original
        for h in handles:
            h.remove()


def projected_fraction(blocks: list[float], reference_blocks: list[float], ran: list[int], calls: int,
                       depth: int = HUNYUAN_DEPTH) -> float:
    """A method's share of the uncached block FLOPs, projected from this model's depth to `depth` blocks.

    Each block's share is its FLOPs over the uncached run's. A block that ran (its attention) in
    every one of the method's `calls` of the transformer (SpeCa's verified blocks, on all tokens or a token subset;
    FirstBlockCache's and DBCache's compute blocks) is a fixed cost that a deeper model pays once,
    not per layer, at its own share; the other blocks' mean share stands for the rest of the deeper
    model. A method that skips part of every block (attention caching) or whole steps keeps its
    share. So a check that costs 1/6 of a step here costs 1/60 on HunyuanVideo, neither hidden nor
    flattered by the shallow model.
    """
    shares = [b / r for b, r in zip(blocks, reference_blocks)]
    always = [n >= calls for n in ran]
    fixed = [x for x, a in zip(shares, always) if a]
    rest = [x for x, a in zip(shares, always) if not a]
    if not rest or len(fixed) >= depth:
        return float(np.mean(shares))
    return (sum(fixed) + (depth - len(fixed)) * float(np.mean(rest))) / depth
