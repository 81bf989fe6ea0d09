"""Process-group set-up for sequence parallelism: init, the Ulysses / ring groups, a local launcher.

The same code runs on CPU (gloo) and on GPUs (nccl): the backend follows the device. Under
torchrun call `init_from_env()`; for single-machine CPU runs and tests, `spawn_local` starts
the ranks itself on 127.0.0.1.

Rank layout for `ParallelConfig(ulysses_degree=U, ring_degree=R)`, world = U * R:
    rank r = ring_rank * U + ulysses_rank
so Ulysses groups are runs of U consecutive ranks (one node's fast links carry the heavier
all-to-all) and ring groups are strided by U. Rank r holds the r-th contiguous shard of the
video tokens; after the Ulysses all-to-all the ranks of Ulysses group g together hold shard
block g, which is the chunk ring rank g passes round the ring.
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import socket
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import ParallelConfig


def _backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(rank: int, world_size: int, init_method: str = "tcp://127.0.0.1:29500",
                     backend: str | None = None, *, device: str | torch.device | None = None) -> None:
    """Join the default process group; gloo for CPU, nccl for CUDA (`device` defaults to cuda if present).

    On CUDA the current device is set to `device`, or to `cuda:(rank % device_count)`.
    """
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev if dev.index is not None else rank % torch.cuda.device_count())
    dist.init_process_group(backend or _backend_for(dev), init_method=init_method, rank=rank, world_size=world_size)


def init_from_env(backend: str | None = None) -> torch.device:
    """Join the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK).

    Returns this rank's device: `cuda:LOCAL_RANK` when CUDA is available, else CPU.
    """
    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    missing = [k for k, v in env.items() if v is None]
    if missing:
        raise RuntimeError(f"init_from_env needs {', '.join(missing)} (run under torchrun)")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
    else:
        device = torch.device("cpu")
    init_distributed(rank, world, f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}", backend, device=device)
    return device


def destroy() -> None:
    """Leave the default process group (no-op when none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the sequence-parallel layout and the groups it talks in.

    A group is None where its degree is 1 (no communication) or without torch.distributed.
    """

    config: ParallelConfig
    rank: int
    world: dist.ProcessGroup | None
    ulysses: dist.ProcessGroup | None
    ring: dist.ProcessGroup | None
    ring_ranks: tuple[int, ...]  # global ranks of this rank's ring group, in ring order

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def ulysses_rank(self) -> int:
        return self.rank % self.config.ulysses_degree

    @property
    def ring_rank(self) -> int:
        return self.rank // self.config.ulysses_degree


def create_groups(config: ParallelConfig) -> ParallelGroups:
    """Make the Ulysses and ring groups; every rank must call this (collective), in the same order.

    Degree 1 in total needs no torch.distributed at all.
    """
    u, r = config.ulysses_degree, config.ring_degree
    if not (dist.is_available() and dist.is_initialized()):
        config.check_world(1)  # several ranks need an initialized default group
        return ParallelGroups(config, 0, None, None, None, (0,))
    config.check_world(dist.get_world_size())
    rank = dist.get_rank()
    ulysses = ring = None
    ring_ranks: tuple[int, ...] = (rank,)
    for g in range(r):  # new_group is collective: all ranks create every group
        ranks = list(range(g * u, (g + 1) * u))
        group = dist.new_group(ranks) if u > 1 else None
        if rank in ranks:
            ulysses = group
    for i in range(u):
        ranks = list(range(i, u * r, u))
        group = dist.new_group(ranks) if r > 1 else None
        if rank in ranks:
            ring, ring_ranks = group, tuple(ranks)
    world = dist.group.WORLD if config.world_size > 1 else None
    return ParallelGroups(config, rank, world, ulysses, ring, ring_ranks)


def broadcast_tensors(tensors: dict[str, torch.Tensor] | None, group, device: str | torch.device
                      ) -> dict[str, torch.Tensor]:
    """Rank 0's `tensors` on every rank of `group`, on `device` (others pass None).

    Through the CPU (`broadcast_object_list`), so the names and shapes travel with them and no rank
    needs to know them in advance; used for a batch's prompt embeddings (a few MB).
    """
    payload = [None if tensors is None else {k: v.cpu() for k, v in tensors.items()}]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, 0), group=group)
    return {k: v.to(device) for k, v in payload[0].items()}


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, threads: int, device: str, fn: Callable, args: tuple,
           results) -> None:
    torch.set_num_threads(threads)
    try:
        dev = f"cuda:{rank}" if device == "cuda" else device
        init_distributed(rank, world_size, f"tcp://127.0.0.1:{port}", device=dev)
        buf = io.BytesIO()
        torch.save(fn(rank, *args), buf)  # bytes, not shared tensors: the child may exit first
        results.put((rank, True, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
    finally:
        destroy()


def spawn_local(fn: Callable[..., Any], world_size: int, *args: Any, threads: int = 1, device: str = "cpu",
                timeout: float = 600.0, preload: Sequence[str] = ()) -> list[Any]:
    """Run `fn(rank, *args)` on `world_size` fresh processes joined by a group on 127.0.0.1.

    Returns the ranks' return values in rank order (anything `torch.save` can write). `fn` must
    be importable (module level). A failure on any rank stops all of them and raises here with
    that rank's traceback. `threads` is each process's torch thread count. With `preload`
    (module names), ranks are forked from a forkserver that imported those modules and `fn`'s
    module once, so later launches skip the imports (seconds each for torch + diffusers);
    without it they are spawned.
    """
    import torch.multiprocessing as mp

    if preload and "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        extra = [] if fn.__module__ == "__main__" else [fn.__module__]
        ctx.set_forkserver_preload([*preload, *extra])  # no effect once its forkserver runs
    else:
        ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(r, world_size, port, threads, device, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    try:
        while len(out) < world_size:
            try:
                rank, ok, payload = results.get(timeout=timeout)
            except queue_module.Empty:
                raise TimeoutError(f"spawn_local: no result from ranks {sorted(set(range(world_size)) - set(out))} "
                                   f"within {timeout:.0f}s") from None
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
            out[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=30 if len(out) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
    return [out[r] for r in range(world_size)]
