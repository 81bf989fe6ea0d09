"""Tile-parallel VAE decode: diffusers' tiled decode with its tiles spread over a replica's ranks.

HunyuanVideo's VAE decodes a large or long latent tile by tile (temporal tiles, spatial tiles
inside them): every tile is one independent `vae.decoder(...)` call, and the overlaps are blended
afterwards. At 720p x 129 that is ~300 decoder calls, 20-25 s on one H100 (anchors), while the
other ranks of a sequence-parallel replica would idle. `parallel_decode` keeps diffusers' own
tiling and blending and only moves where the decoder calls run (as ParaAttention's
`parallelize_vae` and xDiT's DistVAE do, without forking the VAE's code):

  1. plan: every rank runs `vae.decode` with the decoder stubbed by a diffusers hook that records
     each tile's input and returns zeros of the tile's output shape (blending zeros is cheap):
     the ordered tile list, the same on every rank;
  2. work: rank r decodes the tiles i with i % K == r, the very call the one-process decode makes;
  3. gather: rank 0 receives the others' tiles (point to point, in tile order) and runs
     `vae.decode` once more with the stub returning the decoded tiles in order, so diffusers'
     blending builds the video.

The result equals one process's tiled decode up to the decoder's own run-to-run noise (tested:
1e-5 in fp32 on CPU, tests/test_parallel_vae.py). Rank 0 holds every decoded tile before
blending, as the one-process decode does; the other ranks hold only their own.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook

from .attention import all_gather_tensor

_HOOK = "tile_parallel_decode"


@dataclass(frozen=True)
class DecodeShare:
    """What each rank did in one decode (index = rank): the stats record it per sample."""

    tiles: list[int]
    seconds: list[float]
    peak_memory_bytes: list[int]


class _TileHook(ModelHook):
    """Replaces the decoder's forward: record the input tile (plan) or return the decoded one (gather)."""

    def __init__(self, vae, decoded: list[torch.Tensor] | None = None):
        super().__init__()
        self.vae = vae
        self.inputs: list[torch.Tensor] = []
        self.decoded = decoded

    def new_forward(self, module, tile: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        i = len(self.inputs)
        self.inputs.append(tile)
        return self.decoded[i] if self.decoded is not None else _decoded_shape(self.vae, tile).zero_()


def _decoded_shape(vae, tile: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like `vae.decoder(tile)` (the causal decoder keeps the first frame)."""
    b, _, t, h, w = tile.shape
    s = vae.spatial_compression_ratio
    return tile.new_empty(b, vae.config.out_channels, (t - 1) * vae.temporal_compression_ratio + 1, h * s, w * s)


def _with_hook(vae, hook: _TileHook, z: torch.Tensor) -> torch.Tensor:
    registry = HookRegistry.check_if_exists_or_initialize(vae.decoder)
    registry.register_hook(hook, _HOOK)
    try:
        return vae.decode(z, return_dict=False)[0]
    finally:
        registry.remove_hook(_HOOK)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@torch.no_grad()
def parallel_decode(vae, z: torch.Tensor, group=None) -> tuple[torch.Tensor | None, DecodeShare]:
    """Decode scaled latents `z` with every rank of `group`; every rank calls this (collective).

    Returns (the decoded video on rank 0, None elsewhere; each rank's share, on every rank).
    Without a group (one process) it is `vae.decode`. Ranks are the group's; rank 0 of the
    group gathers (its global rank is used for the point-to-point calls).
    """
    world = 1 if group is None else dist.get_world_size(group)
    t0 = time.perf_counter()
    if world == 1:
        calls, me = [], threading.get_ident()  # this thread's calls: a replica may decode two batches at once
        handle = vae.decoder.register_forward_pre_hook(lambda *_: calls.append(threading.get_ident() == me))
        try:
            video = vae.decode(z, return_dict=False)[0]
        finally:
            handle.remove()
        return video, DecodeShare([sum(calls)], [time.perf_counter() - t0], [_peak_memory(z.device)])
    rank = dist.get_rank(group)
    plan = _TileHook(vae)
    _with_hook(vae, plan, z)
    tiles, lead = plan.inputs, dist.get_global_rank(group, 0)
    decoded: list[torch.Tensor | None] = [None] * len(tiles)
    requests = []
    if rank == 0:  # receives posted first, so the other ranks' tiles arrive while rank 0 decodes its own
        for i in range(len(tiles)):
            if i % world:
                decoded[i] = _decoded_shape(vae, tiles[i])
                requests.append(dist.irecv(decoded[i], src=dist.get_global_rank(group, i % world), group=group))
    mine = range(rank, len(tiles), world)
    for i in mine:
        decoded[i] = vae.decoder(tiles[i]).contiguous()
        if rank:
            requests.append(dist.isend(decoded[i], dst=lead, group=group))
    for r in requests:
        r.wait()
    video = _with_hook(vae, _TileHook(vae, decoded), z) if rank == 0 else None
    seconds = time.perf_counter() - t0
    share = torch.tensor([float(len(mine)), seconds, float(_peak_memory(z.device))], dtype=torch.float64,
                         device=z.device if z.device.type == "cuda" else "cpu")
    everyone = torch.empty(world * 3, dtype=share.dtype, device=share.device)
    all_gather_tensor(everyone, share, group=group)
    rows = everyone.view(world, 3).tolist()
    return video, DecodeShare([int(r[0]) for r in rows], [r[1] for r in rows], [int(r[2]) for r in rows])
