"""cache-dit (PyPI `cache-dit`, the `bench` extra) as a peer of SpeCa in `bench.caching`.

cache-dit is the caching library users pick instead of ours, so the benchmark runs it through its
public API only: `cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...),
calibrator_config=TaylorSeerCalibratorConfig(...))`, `cache_dit.summary(pipe)` and
`cache_dit.disable_cache(pipe)`. Its HunyuanVideo adapter wraps both block lists
(`transformer_blocks`, `single_transformer_blocks`), each with its own cache context that decides
per transformer call, for the whole batch, whether to run the blocks after the first Fn (and
before the last Bn) or to add back the residual they produced last time.

Our HunyuanVideoPipeline runs true CFG as two transformer calls per step (cond, then uncond), so
every setting passes `enable_separate_cfg=True` (the adapter's default for HunyuanVideo 1.0 is
False: one context then compares each call with the other branch's, a residual diff of ~0.41-0.48
on the tiny model, so t=0.08 never caches and larger thresholds reuse the wrong branch). With it
cache-dit tells the branches apart by call parity, so every request must use true CFG
(`true_cfg_scale > 1`; the tiny model's default).

`import bench.caching` does not need the extra: cache_dit is imported inside the functions.
"""

from __future__ import annotations

import os
import re
import weakref
from dataclasses import dataclass

from bench.cache_memory import storage_bytes

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # what cache-dit's HunyuanVideo adapter wraps
_MODULE_ORDER: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformer -> its children's order at enable


def is_available() -> bool:
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        return False
    return True


def _cache_dit():
    """cache_dit, imported on first use; unless CACHE_DIT_LOG_LEVEL says otherwise it logs warnings only
    (its INFO log prints the config of every context at every enable)."""
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # read once, when cache_dit is first imported
    import cache_dit

    return cache_dit


@dataclass(frozen=True)
class CacheDitSetting:
    """One cache-dit DBCache configuration (optionally with its TaylorSeer calibrator).

    Fn / Bn: blocks of each block list always computed at its start / end; the blocks between
    are the ones a cached call skips. threshold: cache-dit's `residual_diff_threshold` (relative
    L1 change of the first Fn blocks' residual since the last computed call; 0 never caches).
    warmup: steps computed in full before caching may start. max_cached_steps /
    max_continuous_cached_steps: cache-dit's caps (-1: none).
    """

    name: str  # display, e.g. "cache-dit DBCache F1B0 t=0.08"
    key: str  # what `--only` matches, e.g. "cachedit-f1b0-0.08"
    Fn: int = 1
    Bn: int = 0
    threshold: float = 0.08
    warmup: int = 8
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    taylorseer_order: int | None = None  # None: plain DBCache

    def __post_init__(self) -> None:
        checks = {
            "key": re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", self.key) is not None,
            "Fn": self.Fn >= 1, "Bn": self.Bn >= 0, "threshold": self.threshold >= 0, "warmup": self.warmup >= 0,
            "max_cached_steps": self.max_cached_steps >= -1,
            "max_continuous_cached_steps": self.max_continuous_cached_steps >= -1,
            "taylorseer_order": self.taylorseer_order is None or self.taylorseer_order >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"CacheDitSetting {self.name!r}: invalid {bad[0]}={getattr(self, bad[0])!r}")

    def configs(self, num_inference_steps: int):
        """(DBCacheConfig, TaylorSeerCalibratorConfig or None) for a run of `num_inference_steps`."""
        cd = _cache_dit()
        cache = cd.DBCacheConfig(
            Fn_compute_blocks=self.Fn, Bn_compute_blocks=self.Bn, residual_diff_threshold=self.threshold,
            max_warmup_steps=self.warmup, max_cached_steps=self.max_cached_steps,
            max_continuous_cached_steps=self.max_continuous_cached_steps, enable_separate_cfg=True,
            num_inference_steps=num_inference_steps)
        calibrator = (cd.TaylorSeerCalibratorConfig(taylorseer_order=self.taylorseer_order)
                      if self.taylorseer_order is not None else None)
        return cache, calibrator

    def enable(self, pipe, num_inference_steps: int) -> None:
        """Turn cache-dit on for `pipe` (every later `pipe(...)` call starts with fresh contexts)."""
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={num_inference_steps!r} must be >= 1")
        transformer = pipe.transformer
        if getattr(transformer, "_context_manager", None) is not None:
            raise RuntimeError("cache-dit is already enabled on this pipeline; disable it first")
        shortest = min(len(getattr(transformer, name)) for name in BLOCK_LISTS)
        if self.Fn + self.Bn > shortest:
            raise ValueError(f"CacheDitSetting {self.name!r}: Fn + Bn = {self.Fn + self.Bn} exceeds the "
                             f"shortest block list ({shortest} blocks)")
        cache, calibrator = self.configs(num_inference_steps)
        _MODULE_ORDER[transformer] = tuple(transformer._modules)
        _cache_dit().enable_cache(pipe, cache_config=cache, calibrator_config=calibrator)

    def disable(self, pipe) -> None:
        disable(pipe)


def disable(pipe) -> None:
    """`cache_dit.disable_cache(pipe)`, then undo what it leaves behind, so the pipeline is as before `enable`.

    cache-dit 1.5.3 leaves three things (each checked in tests/test_cache_dit_peer.py):
    - the transformer's children in another order: every cached forward swaps the block lists with
      `unittest.mock.patch.object`, which on exit deletes and re-adds them, so they move to the end
      of `_modules` (single_transformer_blocks before transformer_blocks). diffusers' FirstBlockCache
      takes its head block from that order and then fails on the next run; the order recorded at
      `enable` is put back.
    - `transformer.forward` stored on the instance (`original.__get__(transformer)`, the class's forward
      bound): deleted when it is exactly that.
    - its per-call stats (`_cached_steps`, ...) on the two block lists: removed with its own `remove_stats`.
    """
    from cache_dit.caching.cache_blocks import remove_stats

    cd = _cache_dit()
    cd.disable_cache(pipe)
    transformer = pipe.transformer
    stored = vars(transformer).get("forward")
    if (stored is not None and getattr(stored, "__self__", None) is transformer
            and getattr(stored, "__func__", None) is type(transformer).forward):
        del transformer.forward
    for name in BLOCK_LISTS:
        remove_stats(getattr(transformer, name))
    order = _MODULE_ORDER.pop(transformer, None)
    if order is not None:
        children = transformer._modules
        ordered = {name: children[name] for name in order if name in children}
        ordered.update((name, module) for name, module in children.items() if name not in ordered)
        children.clear()
        children.update(ordered)


# DBCache F1B0 residual-diff thresholds, plain and with the TaylorSeer calibrator, from <= 1.2x FLOPs to where each
# leaves the quality floor, chosen on the first 16 calibration prompts (bench.caching --prompt-set calibration, never
# an evaluation prompt; 50 steps, batch 8; bench/results/peer_frontier_calibration.md): plain 0.02 never cached
# (1.00x), 0.04 gave 1.25x at a worst clip of 33.2 dB, 0.06 1.34x at 23.2 dB.
THRESHOLDS = (0.03, 0.04, 0.05, 0.06, 0.08)
TAYLORSEER_THRESHOLDS = (0.04, 0.08, 0.12, 0.2)


def settings() -> list[CacheDitSetting]:
    """DBCache over its frontier (`THRESHOLDS`), and DBCache + TaylorSeer (`TAYLORSEER_THRESHOLDS`).

    F1B0 throughout: on the tiny model a cached call still runs the first block of each list, so no setting can
    pass ~2.9x there; Bn > 0 (F1B1: 1.2x at 47 dB on v1) gave up speed without buying fidelity over F1B0.
    TaylorSeer extrapolates only from the 4th computed step on (its state counts steps from its first update), so
    every setting keeps cache-dit's default 8 warmup steps.
    """
    plain = [CacheDitSetting(f"cache-dit DBCache F1B0 t={t}", f"cachedit-f1b0-{t}", threshold=t) for t in THRESHOLDS]
    return plain + [CacheDitSetting(f"cache-dit DBCache F1B0 t={t} + TaylorSeer", f"cachedit-f1b0-{t}-ts", threshold=t,
                                    taylorseer_order=1) for t in TAYLORSEER_THRESHOLDS]


def cached_calls(pipe) -> dict[str, tuple[int, int]]:
    """Per block list: (transformer calls that reused the cache, transformer calls) in the last `pipe(...)`.

    From `cache_dit.summary(pipe)`: its entries per block list carry the context name
    ("<block list>_<id>"); the last entry is the transformer-level one and is skipped.
    """
    stats = _cache_dit().summary(pipe, logging=False)
    out = {}
    for s in stats[:-1]:
        block_list = s.cache_options["name"].rsplit("_", 1)[0]
        out[block_list] = (len(s.cached_steps) + len(s.cfg_cached_steps), s.accumulated_transformer_executed_steps)
    if set(out) != set(BLOCK_LISTS):
        raise RuntimeError(f"cache_dit.summary named block lists {sorted(out)}, expected {sorted(BLOCK_LISTS)}")
    return out


def _contexts(pipe) -> list:
    """The cache contexts cache-dit holds for the pipeline (the objects its debug notes point at)."""
    manager = getattr(pipe.transformer, "_context_manager", None)
    names = getattr(pipe.transformer, "_context_names", None) or []
    if manager is None:
        return []
    out = []
    for name in names:
        try:
            out.append(manager.get_context(name))
        except Exception:  # cache-dit's ContextNotExistError: not created yet
            continue
    return out


def cache_bytes(pipe) -> int:
    """Bytes of the tensor storages cache-dit's cache contexts hold right now (each storage once).

    The contexts keep their buffers (Fn residual for the diff, Bn residual to add back, per CFG
    branch) and calibrator states (TaylorSeer: value and derivatives per stream) after a call
    until the next `pipe(...)` replaces them or `disable` clears them; 0 when not enabled.
    """
    return storage_bytes(_contexts(pipe), max_depth=6,
                         into=lambda obj: hasattr(obj, "__dict__") and type(obj).__module__.startswith("cache_dit."))
