"""Sequence parallelism applied to an unmodified diffusers `HunyuanVideoTransformer3DModel` or
`HunyuanVideo15Transformer3DModel`.

`enable_sequence_parallel(pipe_or_transformer, ParallelConfig(...))` changes nothing in the
model's code; it
  * swaps the attention processor of every double- and single-stream block (1.5 has only
    dual-stream ones) for `SequenceParallelAttnProcessor` (the token refiner attends over text only
    and keeps its own);
  * adds a forward pre-hook on the first block that shards the video tokens: the model has
    already built the attention mask from the FULL text lengths and the rotary table for the
    full video, so padded prompts stay correct (diffusers' own context parallel builds the
    mask from local lengths and is wrong with padded prompts). 1.5 hands its blocks a text-only
    mask (its valid Qwen, ByT5 and image tokens first, padding after), which its attention extends
    over the video as (query and key) padding; the hook extends it the same way, as a key mask,
    which gives the same video and valid-text outputs (only the padding text rows, which no valid
    token reads, differ). The hook keeps this rank's
    contiguous slice of the video tokens (zero-padded to a multiple of the world size), and
    every block's pre-hook hands its attention the local rotary table and the mask in the
    padded layout (padding keys masked out);
  * adds a forward hook on the final `proj_out` that all-gathers the video tokens (and drops
    the padding), so every rank returns the full output. `norm_out` and `proj_out` act per
    token, so gathering after them instead of before `norm_out` gives the same tensor while
    sending `p_t * p * p * out_channels` channels (64 for HunyuanVideo) instead of 3072.
Text tokens, timestep embeddings and everything before the first block are replicated: every
rank computes them from the same inputs.

Hooks handle any batch size, so SpeCa's sub-batched passes work unchanged. SpeCa registers
its hooks with diffusers' HookRegistry, which replaces `forward`; torch pre-hooks run before
that, so blocks SpeCa skips or drafts still see sharded inputs, and SpeCa's caches hold only
this rank's shard (per-rank cache bytes fall with the degree). For identical per-sample
decisions on every rank, pass SpeCa this object's error reducer and shard layout:

    sp = enable_sequence_parallel(pipe, ParallelConfig(ulysses_degree=4, ring_degree=2))
    session = apply_speca(pipe, cfg, error_reduce=sp.error_reduce, token_layout=lambda: sp.layout)

VAE decode: the transformer's output is the full latent on every rank, so every rank takes a
share of the VAE's tiles and rank 0 gathers the video (`pipeline/parallel/vae.py`).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .attention import SequenceParallelAttnProcessor, all_gather_tensor
from .config import ParallelConfig
from .distributed import ParallelGroups, create_groups


@dataclass(frozen=True)
class ShardLayout:
    """How `total` video tokens split over `world` ranks: `local` each, the last ones zero-padded."""

    total: int
    world: int
    rank: int

    @property
    def local(self) -> int:
        return -(-self.total // self.world)

    @property
    def padded(self) -> int:
        return self.local * self.world

    @property
    def start(self) -> int:
        return self.rank * self.local

    @property
    def valid(self) -> int:
        """Real (not padding) tokens in this rank's shard."""
        return max(0, min(self.local, self.total - self.start))

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's slice of `x` along `dim` (full length `total`), zero-padded to `local`."""
        part = x.narrow(dim, self.start, self.valid) if self.valid else x.narrow(dim, 0, 0)
        if self.valid == self.local:
            return part
        shape = list(x.shape)
        shape[dim] = self.local - self.valid
        return torch.cat([part, x.new_zeros(shape)], dim=dim)


def _arg_names(block) -> list[str]:
    """The block's forward parameter names (positions 0, 1, 3, 4: video, text, mask, rotary)."""
    return _forward_params(type(block))


@functools.cache
def _forward_params(cls: type) -> list[str]:
    return list(inspect.signature(cls.forward).parameters)[1:]  # without self


class SequenceParallel:
    """Sequence parallelism enabled on one transformer: its hooks, groups and SpeCa reducers."""

    def __init__(self, transformer, config: ParallelConfig, groups: ParallelGroups) -> None:
        self.transformer = transformer
        self.config = config
        self.groups = groups
        self.layout: ShardLayout | None = None  # of the forward in flight (or the last one)
        self._mask: torch.Tensor | None = None
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self._source: tuple[int, int] = (0, 0)  # ids of the model's mask and rotary this forward
        self._processors: list[tuple[object, object]] = []
        self._handles: list = []

    @property
    def rank(self) -> int:
        return self.groups.rank

    @property
    def world_size(self) -> int:
        return self.groups.world_size

    # --- for SpeCa ---------------------------------------------------------------------

    def error_reduce(self, partials: torch.Tensor) -> torch.Tensor:
        """Sum per-sample error partials over every rank (a copy), so all ranks decide alike."""
        out = partials.clone()
        if self.groups.world is not None:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.groups.world)
        return out

    # --- hooks ---------------------------------------------------------------------------

    def _enter(self, block, args: tuple, kwargs: dict):
        """First block: shard the video tokens; build the local rotary table and the padded mask."""
        names = _arg_names(block)
        hidden = _get(args, kwargs, names, 0)
        mask = _get(args, kwargs, names, 3)
        rotary = _get(args, kwargs, names, 4)
        b, total = hidden.shape[:2]
        text = _get(args, kwargs, names, 1).shape[1]
        layout = ShardLayout(total, self.world_size, self.rank)
        if mask is None:
            mask = torch.ones(b, 1, 1, total + text, dtype=torch.bool, device=hidden.device)
        elif mask.dim() == 2 and mask.shape[-1] == text:  # 1.5: text-only, the video columns all valid
            mask = torch.cat([torch.ones(b, total, dtype=torch.bool, device=mask.device), mask.bool()], dim=1)
        if mask.dtype != torch.bool or mask.shape[-1] != total + text:
            raise RuntimeError(f"sequence parallel expects the model's bool mask over {total} video + {text} text "
                               f"tokens, got {mask.dtype} {tuple(mask.shape)}")
        mask = mask.reshape(b, total + text)
        pad = mask.new_zeros(b, layout.padded - total)
        self._mask = torch.cat([mask[:, :total], pad, mask[:, total:]], dim=1)[:, None, None, :]
        self._rotary = None if rotary is None else tuple(layout.shard(f, 0) for f in rotary)
        self._source = (id(_get(args, kwargs, names, 3)), id(rotary))
        self.layout = layout
        args, kwargs = _put(args, kwargs, names, 0, layout.shard(hidden, 1))
        return self._local_args(block, args, kwargs)

    def _local_args(self, block, args: tuple, kwargs: dict):
        """Every block: the padded-layout mask and the local rotary table instead of the model's."""
        names = _arg_names(block)
        if (id(_get(args, kwargs, names, 3)), id(_get(args, kwargs, names, 4))) != self._source:
            raise RuntimeError("sequence parallel: a block got another mask / rotary table than the first block of "
                               "this forward (was the first block skipped?)")
        if _get(args, kwargs, names, 0).shape[1] != self.layout.local:
            raise RuntimeError("sequence parallel: a block got unsharded video tokens")
        args, kwargs = _put(args, kwargs, names, 3, self._mask)
        return _put(args, kwargs, names, 4, self._rotary)

    def _exit(self, _module, _inputs, output: torch.Tensor) -> torch.Tensor:
        """After proj_out: all ranks' tokens, padding dropped."""
        layout = self.layout
        if output.shape[1] != layout.local:
            raise RuntimeError("sequence parallel: proj_out got unsharded tokens")
        if self.groups.world is not None:
            b = output.shape[0]
            parts = torch.empty((layout.world * b, *output.shape[1:]), dtype=output.dtype, device=output.device)
            all_gather_tensor(parts, output.contiguous(), group=self.groups.world)
            output = parts.view(layout.world, *output.shape).transpose(0, 1).flatten(1, 2)
        self._source = (0, 0)
        return output[:, :layout.total]


def _get(args: tuple, kwargs: dict, names: list[str], i: int):
    return args[i] if i < len(args) else kwargs.get(names[i])


def _put(args: tuple, kwargs: dict, names: list[str], i: int, value):
    if i < len(args):
        return args[:i] + (value,) + args[i + 1:], kwargs
    return args, {**kwargs, names[i]: value}


def _resolve(target):
    from diffusers import HunyuanVideo15Transformer3DModel, HunyuanVideoTransformer3DModel

    transformer = getattr(target, "transformer", target)
    if not isinstance(transformer, (HunyuanVideoTransformer3DModel, HunyuanVideo15Transformer3DModel)):
        raise TypeError(f"sequence parallel needs a HunyuanVideoTransformer3DModel or HunyuanVideo15Transformer3DModel "
                        f"or a pipeline holding one, got {type(target).__name__}")
    return transformer


def _blocks(transformer) -> list:
    """Every block that attends over video + text, in execution order."""
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]


def enable_sequence_parallel(target, config: ParallelConfig, groups: ParallelGroups | None = None) -> SequenceParallel:
    """Shard HunyuanVideo's (1.0 or 1.5) video tokens over the ranks; every rank calls this (collective).

    `target` is a HunyuanVideo / HunyuanVideo 1.5 pipeline or transformer; `groups` defaults to
    `create_groups(config)` (needs an initialized default group when the degree is > 1).
    The model's output is the full tensor on every rank.

    Example (every rank, e.g. under torchrun after `init_from_env()`):
        >>> sp = enable_sequence_parallel(pipe, ParallelConfig(ulysses_degree=2, ring_degree=2))
        >>> session = apply_speca(pipe, SpeCaConfig(), error_reduce=sp.error_reduce, token_layout=lambda: sp.layout)
        >>> latents = pipe(prompt=..., generator=torch.Generator().manual_seed(0), output_type="latent").frames
        >>> disable_sequence_parallel(pipe)
    """
    transformer = _resolve(target)
    if getattr(transformer, "_sequence_parallel", None) is not None:
        raise RuntimeError("sequence parallel is already enabled on this transformer; disable it first")
    if getattr(transformer.config, "image_condition_type", None) == "token_replace":
        raise NotImplementedError("sequence parallel does not support token_replace (first-frame) conditioning")
    config.check(transformer.config.num_attention_heads)
    groups = groups if groups is not None else create_groups(config)
    if groups.config != config:
        raise ValueError(f"groups were made for {groups.config}, not {config}")
    sp = SequenceParallel(transformer, config, groups)
    blocks = _blocks(transformer)
    for block in blocks:
        original = block.attn.processor
        processor = SequenceParallelAttnProcessor(groups)
        processor._attention_backend = getattr(original, "_attention_backend", None)
        sp._processors.append((block.attn, original))
        block.attn.set_processor(processor)
    for i, block in enumerate(blocks):
        hook = sp._enter if i == 0 else sp._local_args
        sp._handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    sp._handles.append(transformer.proj_out.register_forward_hook(sp._exit))
    transformer._sequence_parallel = sp
    return sp


def disable_sequence_parallel(target) -> None:
    """Remove the hooks and put the original processors back (the model is as before)."""
    transformer = _resolve(target)
    sp = getattr(transformer, "_sequence_parallel", None)
    if sp is None:
        return
    for handle in sp._handles:
        handle.remove()
    for attn, original in sp._processors:
        attn.set_processor(original)
    del transformer._sequence_parallel


def get_sequence_parallel(target) -> SequenceParallel | None:
    return getattr(_resolve(target), "_sequence_parallel", None)
