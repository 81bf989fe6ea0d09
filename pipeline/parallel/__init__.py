"""Sequence parallelism (Ulysses, ring, both) for diffusers' HunyuanVideo, applied after loading.

    from pipeline.parallel import ParallelConfig, enable_sequence_parallel, init_from_env

    device = init_from_env()                       # under torchrun
    pipe = load_pipeline(ModelConfig(device=str(device))).pipe
    sp = enable_sequence_parallel(pipe, ParallelConfig(ulysses_degree=4, ring_degree=2))
    apply_speca(pipe, cfg, error_reduce=sp.error_reduce, token_layout=lambda: sp.layout)

Modules: `config` (degrees), `distributed` (process groups, launchers, the prompt broadcast),
`attention` (the parallel attention processor), `shard` (hooks that split and gather the tokens),
`vae` (tile-parallel VAE decode), `comm` (communication volume: formula and counter).
"""

from .comm import CommBytes, CommCounter, count_comm, step_comm_bytes, transformer_comm_bytes
from .config import ParallelConfig
from .distributed import (ParallelGroups, broadcast_tensors, create_groups, destroy, free_port, init_distributed,
                          init_from_env, spawn_local)
from .shard import (SequenceParallel, ShardLayout, disable_sequence_parallel, enable_sequence_parallel,
                    get_sequence_parallel)

__all__ = ["CommBytes", "CommCounter", "ParallelConfig", "ParallelGroups", "SequenceParallel", "ShardLayout",
           "broadcast_tensors", "count_comm", "create_groups", "destroy", "disable_sequence_parallel",
           "enable_sequence_parallel", "free_port", "get_sequence_parallel", "init_distributed", "init_from_env",
           "spawn_local",
           "step_comm_bytes", "transformer_comm_bytes"]
