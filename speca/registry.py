"""What SpeCa must know about a model family, and the registry that maps model classes to it.

The core (`hooks.py`) drives any transformer whose blocks are residual streams in, the same
streams out. A family module describes its blocks once (`BlockSpec`) and its model once
(`FamilySpec`), then calls `register`; `family_for` finds it by the model's class, never by
duck-typing attribute names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


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
    """

    streams: tuple[str, ...]
    returns: tuple[str, ...]
    captures: Mapping[str, tuple[str, ...]]
    redraft: Callable[[torch.nn.Module, dict, dict, Callable[[str], torch.Tensor]], dict]
    image: str = "hidden_states"
    subset: Callable[[dict, "TokenSubset"], dict] | None = None

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


def supported() -> list[str]:
    return [f"{f.name} ({f.model_class.__name__})" for f in _FAMILIES]


def family_for(transformer) -> FamilySpec:
    for family in _FAMILIES:
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
