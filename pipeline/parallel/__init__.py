"""Sequence parallelism (Ulysses, ring, both) for diffusers' HunyuanVideo, applied after loading.

    from pipeline.parallel import ParallelConfig, enable_sequence_parallel, init_from_env

    device = init_from_env()                       # under torchrun
    pipe = load_pipeline(ModelConfig(device=str(device))).pipe
    sp = enable_sequence_parallel(pipe, ParallelConfig(ulysses_degree=4, ring_degree=2))
    apply_speca(pipe, cfg, error_reduce=sp.error_reduce, token_layout=lambda: sp.layout)

Modules: `config` (degrees), `distributed` (process groups, launchers, the prompt broadcast),
`attention` (the parallel attention processor), `shard` (hooks that split and gather the tokens),
`vae` (tile-parallel VAE decode), `comm` (communication volume: formula and counter).

Names load on first use (PEP 562), so `pipeline.parallel.config` alone imports no torch or diffusers.
"""

from importlib import import_module

_MODULES = {"comm": ("CommBytes", "CommCounter", "count_comm", "step_comm_bytes", "transformer_comm_bytes"),
            "config": ("ParallelConfig",),
            "distributed": ("ParallelGroups", "broadcast_tensors", "create_groups", "destroy", "free_port",
                            "init_distributed", "init_from_env", "spawn_local"),
            "shard": ("SequenceParallel", "ShardLayout", "disable_sequence_parallel", "enable_sequence_parallel",
                      "get_sequence_parallel")}
_EXPORTS = {name: module for module, names in _MODULES.items() for name in names}

__all__ = ["CommBytes", "CommCounter", "ParallelConfig", "ParallelGroups", "SequenceParallel", "ShardLayout",
           "broadcast_tensors", "count_comm", "create_groups", "destroy", "disable_sequence_parallel",
           "enable_sequence_parallel", "free_port", "get_sequence_parallel", "init_distributed", "init_from_env",
           "spawn_local",
           "step_comm_bytes", "transformer_comm_bytes"]


def __getattr__(name: str):  # PEP 562: a name's module is imported when the name is first used
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
