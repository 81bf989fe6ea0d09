"""Command-line flags of the model, SpeCa and sequence parallelism, and the configs they make.

Shared by the one-off CLI (`python -m pipeline.generate`) and the Ray job's driver (`python -m jobs.generate`);
this module imports no torch or diffusers, so the driver starts without them.
"""

from __future__ import annotations

import argparse

from speca.config import SpeCaConfig

from .config import ModelConfig
from .parallel.config import ParallelConfig


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model, SpeCa and sample-default flags shared by the CLI and the Ray job."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="bundled",
                   help="'bundled' (tiny test model), or a diffusers HunyuanVideo or HunyuanVideo 1.5 folder or hub id "
                        "(default: bundled)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    g.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    g.add_argument("--attention-backend", default="native",
                   help="diffusers attention backend (default: native = PyTorch SDPA)")
    g.add_argument("--vae-tiling", action="store_true",
                   help="decode the VAE in tiles (720p); with several ranks the tiles are spread over them")
    g.add_argument("--vae-tile-size", type=int, default=None,
                   help="VAE tile side in pixels, stride 3/4 of it (default: diffusers' 256); implies --vae-tiling")
    s = parser.add_argument_group("SpeCa")
    s.add_argument("--speca", default="default",
                   help="SpeCa preset: 'default' (tuned on the bundled model: checks on 1/8 of the video tokens, "
                        "the first block's on the real latent deciding which clips need full steps), 'reference' "
                        "(the authors' HunyuanVideo settings) or 'off'")
    s.add_argument("--speca-cache", choices=["module", "lean"], help="override the preset's cache granularity")
    s.add_argument("--speca-tau0", type=float, help="override the preset's initial threshold")
    s.add_argument("--speca-max-spec", type=int, help="override the preset's maximum speculative run")
    s.add_argument("--speca-draft-gate", type=float,
                   help="override the preset's curvature gate (a sample drafts only while its last full step's "
                        "one-step prediction draft was within this; lower = more full steps on bending clips)")
    p = parser.add_argument_group("sequence parallelism (ranks = ulysses x ring)")
    p.add_argument("--ulysses-degree", type=int, default=1, help="all-to-all (head-sharded) degree")
    p.add_argument("--ring-degree", type=int, default=1, help="ring attention degree")


def model_config_from_args(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(model=args.model, device=args.device, dtype=args.dtype,
                       attention_backend=args.attention_backend, vae_tiling=args.vae_tiling,
                       vae_tile_size=args.vae_tile_size)


def parallel_config_from_args(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree)


def speca_config_from_args(args: argparse.Namespace) -> SpeCaConfig | None:
    if args.speca == "off":
        return None
    overrides = {k: v for k, v in (("cache", args.speca_cache), ("tau0", args.speca_tau0),
                                   ("max_spec", args.speca_max_spec), ("draft_gate", args.speca_draft_gate))
                 if v is not None}
    return SpeCaConfig.from_name(args.speca, **overrides)
