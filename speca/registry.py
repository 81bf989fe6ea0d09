"""What SpeCa must know about a model family, and the registry that maps model classes to it.

The core (`hooks.py`) drives any transformer whose blocks are residual streams in, the same
streams out. A family module describes its blocks once (`BlockSpec`) and its model once
(`FamilySpec`), then calls `register`; `family_for` finds it by the model's class, never by
duck-typing attribute names.
"""

from __future__ import annotations

import math

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import import_module

import torch

from .flops import hidden_size


@dataclass(frozen=True)
class BlockSpec:
    """How one kind of transformer block is called, and how its module-cache draft is built.

    Args:
        streams: the block's arguments that carry residual streams, e.g.
            `("hidden_states", "encoder_hidden_states")`; `image` must be one of them.
        returns: the order the block returns its streams in (one name = it returns a tensor).
        captures: submodule name -> the keys its outputs are recorded under in the module cache
            (its output tuple, element by element), taken before any gate.
        redraft: `(block, streams, arguments, cached) -> streams`: the block with its captured
            outputs replaced by `cached(key)` drafts; gates and residual adds are computed for
            real from this step's inputs. `arguments` are all of the block's bound arguments.
        image: the stream SpeCa verifies (image or video tokens, never the text stream).
        subset: `(arguments, TokenSubset) -> arguments`: the block's bound arguments restricted to
            the image tokens at `TokenSubset.local` (this rank's positions), every per-token argument
            (masks, rotary tables) with them, padding slots masked out; text tokens stay whole.
            None: the block cannot be checked on a token subset (`SpeCaConfig.verify_tokens` < 1 is
            refused).
        spans: capture key -> the streams whose tokens that output covers (for cache sizes); a key
            not named covers the image stream.
    """

    streams: tuple[str, ...]
    returns: tuple[str, ...]
    captures: Mapping[str, tuple[str, ...]]
    redraft: Callable[[torch.nn.Module, dict, dict, Callable[[str], torch.Tensor]], dict]
    image: str = "hidden_states"
    subset: Callable[[dict, "TokenSubset"], dict] | None = None
    spans: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.streams) != set(self.returns) or self.image not in self.streams:
            raise ValueError(f"BlockSpec: returns {self.returns} must name the streams {self.streams}, "
                             f"which must include the image stream {self.image!r}")

    def pack(self, streams: dict):
        """Streams in the block's own return order."""
        if len(self.returns) == 1:
            return streams[self.returns[0]]
        return tuple(streams[name] for name in self.returns)

    def unpack(self, output) -> dict:
        if len(self.returns) == 1:
            return {self.returns[0]: output}
        return dict(zip(self.returns, output))


@dataclass(frozen=True)
class FamilySpec:
    """One model family: its transformer class, blocks, batched arguments and CFG pairing.

    Args:
        name: shown to users (error messages, README).
        model_class: the diffusers transformer class; subclasses match too.
        block_lists: attributes holding the block `ModuleList`s, in execution order; the
            verified block is indexed within the last one.
        blocks: block class -> its `BlockSpec`.
        batched_args: forward arguments with one row per batch row; SpeCa slices them into
            per-pass sub-batches (anything else, e.g. position ids, is passed whole).
        samples: `(transformer, arguments, batch) -> sample index of each batch row`, for models
            whose pipeline runs CFG as one concatenated batch: rows of one sample share a decision.
            None: every row is its own sample.
        check: `(transformer) -> None`, raises a clear error for a configuration of the class
            the specs do not cover (called by `apply_speca` before any hook is added).
        branch_args: the forward arguments in which CFG branches run as separate calls differ (the
            text); joint CFG (`SpeCaConfig.cfg_branches`) takes them from each branch's call and
            everything else from the leading branch's.
        head: `(transformer, image_stream, block_arguments) -> prediction tokens`: the model's output
            head on the last block's image stream, per token and without module hooks
            (`SpeCaConfig.signal="prediction"`); None: the family has no such check.
        layers: per block list, the transformer-config key holding its length (e.g. `"num_layers"`),
            for sizes computed from a config alone (`cache_bytes`).
        cfg_contexts: the cache contexts of its pipeline's conditional and unconditional calls, for
            `SpeCaConfig.cfg_branches="guided"` (diffusers' HunyuanVideo: "cond" / "uncond").
    """

    name: str
    model_class: type
    block_lists: tuple[str, ...]
    blocks: Mapping[type, BlockSpec]
    batched_args: tuple[str, ...]
    samples: Callable[[torch.nn.Module, dict, int], list[int]] | None = None
    check: Callable[[torch.nn.Module], None] | None = None
    branch_args: tuple[str, ...] = ()
    head: Callable[[torch.nn.Module, torch.Tensor, dict], torch.Tensor] | None = None
    layers: tuple[str, ...] = ("num_layers",)
    cfg_contexts: tuple[str, str] = ("cond", "uncond")

    def list_specs(self) -> list[BlockSpec]:
        """The spec of each block list's blocks, in `block_lists` order (one block class per list)."""
        specs = list(self.blocks.values())
        if len(specs) != len(self.block_lists) or len(self.layers) != len(self.block_lists):
            raise TypeError(f"{self.name}: one block spec and one config key per block list expected")
        return specs

    def cache_bytes(self, transformer_config, config, image_tokens: int, text_tokens: int = 0, batch: int = 1,
                    dtype_bytes: int = 2, contexts: int = 1, clip_tokens: int | None = None) -> int:
        """Feature-cache bytes SpeCa's hooks (`speca/hooks.py`) hold for a batch of `batch` rows, from the
        transformer config alone; `contexts` = 2 with true CFG (cond and uncond keep separate caches); under
        sequence parallelism pass one rank's image tokens. Each term is kept for `order + 1` steps:

        lean:   the verified block's input streams (`in.<stream>`) and its image stream out (`out`); with
                `verify_first` the first block's image stream out (`first.out`); with `verify_tokens` < 1
                each check's subset out instead (`sub.out`, and `first.sub` for `first.out`); the check
                terms in the deciding context only under `cfg_branches="leader"` (a follower runs no check);
        module: every captured module output of every block (`BlockSpec.captures`) over the tokens of the
                streams it spans (`BlockSpec.spans`);
        and with a `draft_gate` the model's prediction (`prediction`), over the whole clip's image tokens
        (`clip_tokens`, default `image_tokens`: every rank gets the gathered output).
        """
        specs = self.list_specs()

        def tokens(spec: BlockSpec, streams: tuple[str, ...]) -> int:
            return sum(image_tokens if name == spec.image else text_tokens for name in streams)

        if config.cache == "lean":
            last = specs[-1]
            checked = image_tokens if config.verify_tokens >= 1 else subset_size(image_tokens, config.verify_tokens)
            per_step = (tokens(last, last.streams) + image_tokens) * contexts
            checks = (checked if config.verify_first else 0) + (checked if config.verify_tokens < 1 else 0)
            per_step += checks * (1 if config.cfg_branches == "leader" else contexts)
        else:
            per_step = contexts * sum(int(transformer_config.get(key, 0) or 0)
                                      * tokens(spec, spec.spans.get(k, (spec.image,)))
                                      for key, spec in zip(self.layers, specs) for keys in spec.captures.values()
                                      for k in keys)
        per_step *= hidden_size(transformer_config)
        if config.draft_gate < math.inf:
            c = transformer_config
            per_token = (int(c.get("out_channels") or c["in_channels"]) * int(c.get("patch_size") or 1) ** 2
                         * int(c.get("patch_size_t") or 1))
            per_step += (image_tokens if clip_tokens is None else clip_tokens) * per_token * contexts
        return (config.order + 1) * per_step * batch * dtype_bytes

    def iter_blocks(self, transformer) -> list[tuple[torch.nn.Module, BlockSpec]]:
        out = []
        for attr in self.block_lists:
            for i, block in enumerate(getattr(transformer, attr)):
                spec = next((s for cls, s in self.blocks.items() if isinstance(block, cls)), None)
                if spec is None:
                    raise TypeError(f"SpeCa ({self.name}) has no spec for {attr}[{i}] of type "
                                    f"{type(block).__name__}; supported: {[c.__name__ for c in self.blocks]}")
                out.append((block, spec))
        return out


_FAMILIES: list[FamilySpec] = []


def register(family: FamilySpec) -> FamilySpec:
    _FAMILIES[:] = [f for f in _FAMILIES if f.model_class is not family.model_class] + [family]
    return family


def _families() -> list[FamilySpec]:
    """The registered families, the package's own first, in `FAMILY_MODULES` order (`speca/__init__.py`).

    Each family module registers its `FAMILY` when imported; `import speca` imports none of them (so that
    `speca.config` loads no torch or diffusers), and a lookup imports them all first, whichever came first.
    """
    own = [import_module(f"{__package__}.{name}").FAMILY for name in import_module(__package__).FAMILY_MODULES]
    rank = {id(family): i for i, family in enumerate(own)}
    return sorted(_FAMILIES, key=lambda family: rank.get(id(family), len(own)))


def supported() -> list[str]:
    return [f"{f.name} ({f.model_class.__name__})" for f in _families()]


def family_for(transformer) -> FamilySpec:
    for family in _families():
        if isinstance(transformer, family.model_class):
            return family
    raise TypeError(f"SpeCa does not support {type(transformer).__name__}; supported families: "
                    f"{', '.join(supported())}")


def subset_size(image_tokens: int, share: float) -> int:
    """Image tokens a token-subset check runs on (`SpeCaConfig.verify_tokens`), at least one."""
    return max(1, round(share * image_tokens))


@dataclass(frozen=True)
class TokenSubset:
    """A token-subset check's image tokens, as one rank runs them.

    The subset is one fixed draw over the whole clip (`drawn` tokens). Under sequence parallelism
    each rank runs the ones in its shard, padded to the same `slots` on every rank (the parallel
    attention exchanges equal shards), so the check, its error and its decision equal one process's.

    Args:
        local: (slots,) positions in this rank's image tokens; padding slots repeat position 0.
        real: (slots,) bool, False for padding slots (left out of the error).
        columns: (world * slots,) the attention mask's image columns (its padded global layout:
            rank r's tokens at r * local + position) of every rank's slots, rank by rank.
        column_real: (world * slots,) bool, False for padding slots (masked out as keys).
        drawn: tokens in the whole subset.
    """

    local: torch.Tensor
    real: torch.Tensor
    columns: torch.Tensor
    column_real: torch.Tensor
    drawn: int

    @property
    def slots(self) -> int:
        return len(self.local)

    def to(self, device) -> "TokenSubset":
        return TokenSubset(self.local.to(device), self.real.to(device), self.columns.to(device),
                           self.column_real.to(device), self.drawn)


@functools.lru_cache(maxsize=16)
def _subset_draw(image_tokens: int, share: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(image_tokens)
    return torch.randperm(image_tokens, generator=gen)[:subset_size(image_tokens, share)].sort().values


@functools.lru_cache(maxsize=64)
def _token_subset(total: int, share: float, world: int, rank: int, local: int) -> TokenSubset:
    drawn = _subset_draw(total, share)
    shards = [drawn[(drawn >= r * local) & (drawn < (r + 1) * local)] - r * local for r in range(world)]
    slots = max(len(s) for s in shards)

    def padded(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pad = slots - len(index)
        return (torch.cat([index, index.new_zeros(pad)]),
                torch.cat([torch.ones(len(index), dtype=torch.bool), torch.zeros(pad, dtype=torch.bool)]))

    local_index, real = padded(shards[rank])
    columns, column_real = zip(*(padded(s + r * local) for r, s in enumerate(shards)))
    return TokenSubset(local_index, real, torch.cat(columns), torch.cat(column_real), len(drawn))


def token_subset(total: int, share: float, world: int = 1, rank: int = 0, local: int | None = None,
                 device=None) -> TokenSubset:
    """The check's token subset: a fixed draw spread over the whole clip of `total` image tokens
    (seeded, so every call, sample and rank of a run uses the same one), in token order; `world`,
    `rank` and `local` (tokens per rank's shard) place it under sequence parallelism."""
    return _token_subset(total, share, world, rank, total if local is None else local).to(device)
