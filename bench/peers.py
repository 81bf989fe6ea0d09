"""The peers SpeCa is compared with in `bench.caching`: diffusers' cache hooks (with the per-branch state and the
memory count they need here), MagCache's calibration, cache-dit (`bench.cache_dit_peer`) and plain fewer steps."""

from __future__ import annotations

import ast
import contextlib
import io
import logging
from collections.abc import Callable

import numpy as np
import torch

from bench import cache_dit_peer
from bench.cache_memory import storage_bytes
from bench.method import Method
from pipeline.config import SampleRequest
from pipeline.generate import Generator

_MAG_CACHE_LOG_PREFIX = "MagCache Calibration Results: "


def _hook_states(transformer) -> list:
    """Every state object of the diffusers hooks on the transformer, in every cache context."""
    from diffusers.hooks.hooks import StateManager

    states = []
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook in registry.hooks.values():
            if hasattr(hook, "state"):  # PAB, FasterCache: one bare state per hook
                states.append(hook.state)
            for value in vars(hook).values():  # FirstBlockCache, TaylorSeer, MagCache: one per context
                if isinstance(value, StateManager):
                    states.extend(value._state_cache.values())
    return states


def hook_cache_bytes(transformer, extra_states=()) -> int:
    """Bytes of the tensor storages the hooks' states hold right now (each storage once)."""
    states = {id(s): s for s in [*_hook_states(transformer), *extra_states]}
    return storage_bytes([vars(s) for s in states.values()], max_depth=5)


@contextlib.contextmanager
def track_hook_cache_bytes(transformer, extra_states=()):
    """Peak of `hook_cache_bytes`, sampled after every transformer call while active."""
    peak = {"bytes": 0}

    def sample(module, inputs, output):
        peak["bytes"] = max(peak["bytes"], hook_cache_bytes(transformer, list(extra_states)))

    handle = transformer.register_forward_hook(sample)
    try:
        yield peak
    finally:
        handle.remove()


@contextlib.contextmanager
def per_branch_state(transformer):
    """One state per cache context ("cond" / "uncond") for hooks that keep a single bare `state`.

    In diffusers 0.42.1 PAB and FasterCache keep one `state` per hooked module, while FirstBlockCache,
    TaylorSeer and MagCache keep theirs in a `StateManager` keyed by the pipeline's cache context.
    HunyuanVideoPipeline runs true CFG as two transformer calls per step, so as shipped the PAB /
    FasterCache iteration counter advances twice per step and one branch reuses the other branch's
    attention output. This swaps a per-context state into each such hook when the pipeline enters a
    cache context, and drops them all when the pipeline resets its stateful hooks after a generation.
    Yields the stored states (for the cache-memory count).
    """
    hooks = [hook for module in transformer.modules() if getattr(module, "_diffusers_hook", None) is not None
             for hook in module._diffusers_hook.hooks.values() if hasattr(hook, "state")]
    states: dict[tuple[int, str], object] = {}
    cache_context, reset = transformer.cache_context, transformer._reset_stateful_cache

    @contextlib.contextmanager
    def branch_context(name: str, **kwargs):
        for hook in hooks:
            hook.state = states.setdefault((id(hook), name), type(hook.state)())
        with cache_context(name, **kwargs):
            yield

    def reset_all(recurse: bool = True) -> None:
        states.clear()
        reset(recurse)

    transformer.cache_context, transformer._reset_stateful_cache = branch_context, reset_all
    try:
        yield states
    finally:
        del transformer.cache_context, transformer._reset_stateful_cache


# Each family's settings run from <= 1.2x FLOPs up to where it leaves the quality floor (and a step past it), so
# that neither "no row above the floor" nor a family's cap decides the goal's ratio. Chosen on the first 16
# calibration prompts (`--prompt-set calibration`: never an evaluation prompt; 50 steps, batch 8; the speedups are
# per batch for the caches that decide per call); the figures that placed them are in
# bench/results/peer_frontier_calibration.md.
FEWER_STEPS = (0.9, 0.84, 0.8, 0.76, 0.72, 0.68, 0.64)  # of the steps (45 ... 32 of 50): left the floor at 34
FIRST_BLOCK_CACHE = (0.02, 0.023, 0.026, 0.03, 0.04)  # thresholds: 1.01x at 0.02, 1.32x (worst 22 dB) at 0.03
# TaylorSeerCache, full and lite: (cache interval, share of the steps run in full before caching starts). Full mode
# left the floor when caching started at step 3 (1.36x, worst 21.8 dB) and kept 46.6 dB from step 10 (1.28x).
# Lite mode from step 10 holds the floor at N=4 (2.50x) on the evaluation prompts; N=5 (2.78x) and N=6 (2.94x) are the
# steps past it (worst 24.8 and 21.9 dB on the first 48 calibration prompts: `--prompt-set calibration --prompts 48`).
TAYLORSEER = ((2, 0.8), (2, 0.2), (3, 0.2), (4, 0.2), (2, 0.06))
TAYLORSEER_LITE = ((2, 0.8), (2, 0.2), (4, 0.2), (5, 0.2), (6, 0.2), (8, 0.2), (2, 0.06))
# MagCache: (threshold, max_skip_steps, retention_ratio). diffusers' default 3 skips cap it near 2.5x; longer skips
# left the floor sooner (6 skips: worst 24.7 dB at 2.08x, where 3 skips kept 26.5 dB at 2.38x).
MAGCACHE = ((0.005, 3, 0.2), (0.02, 3, 0.2), (0.04, 3, 0.2), (0.12, 3, 0.2), (0.24, 3, 0.2), (0.12, 4, 0.2),
            (0.04, 6, 0.2), (0.04, 10, 0.1))
PAB = ((2, (100, 800)), (4, (0, 1000)), (8, (0, 1000)))  # (attention skip range, timestep range)
FASTER_CACHE = ((2, (-1, 701)), (3, (-1, 901)), (8, (-1, 1001)))  # (attention skip range, timestep range)


def diffusers_methods(steps: int, mag_ratios: Callable[[], list[float]]) -> list[Method]:
    """diffusers' hooks over each one's frontier (the settings above). `mag_ratios()` gives MagCache's ratios,
    calibrated on prompts that are not evaluation prompts."""
    from diffusers import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
    )

    def enabler(make_config: Callable) -> Callable:
        return lambda pipe: pipe.transformer.enable_cache(make_config(pipe))

    out = []
    for t in FIRST_BLOCK_CACHE:
        out.append(Method(f"FirstBlockCache t={t}", "firstblockcache", f"fbc-{t}",
                          enable=enabler(lambda pipe, t=t: FirstBlockCacheConfig(threshold=t))))
    for lite, grid in ((False, TAYLORSEER), (True, TAYLORSEER_LITE)):
        for n, share in grid:
            start = max(1, round(share * steps))
            out.append(Method(f"TaylorSeerCache{' lite' if lite else ''} N={n} from step {start}", "taylorseercache",
                              f"taylorseer{'-lite' if lite else ''}-{n}-from{start}", enable=enabler(
                                  lambda pipe, n=n, lite=lite, start=start: TaylorSeerCacheConfig(
                                      cache_interval=n, disable_cache_before_step=start, max_order=1,
                                      taylor_factors_dtype=torch.float32, use_lite_mode=lite))))
    for t, skips, retention in MAGCACHE:
        out.append(Method(f"MagCache t={t} skips<={skips} retention {retention}", "magcache",
                          f"magcache-{t}-k{skips}-r{retention}", enable=enabler(
                              lambda pipe, t=t, skips=skips, retention=retention: MagCacheConfig(
                                  threshold=t, max_skip_steps=skips, retention_ratio=retention,
                                  num_inference_steps=steps, mag_ratios=mag_ratios()))))

    def faster_cache(n: int, timesteps: tuple[int, int], cfg_cache: bool = False) -> Callable:
        return lambda pipe: FasterCacheConfig(
            spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=timesteps,
            unconditional_batch_skip_range=2, attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=not cfg_cache, current_timestep_callback=lambda: pipe.current_timestep)

    def pab(n: int, timesteps: tuple[int, int]) -> Callable:
        return lambda pipe: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=timesteps,
            current_timestep_callback=lambda: pipe.current_timestep)

    out.append(Method("FasterCache N=2 with its CFG cache", "fastercache", "fastercache-cfg",
                      enable=enabler(faster_cache(2, (-1, 901), cfg_cache=True))))
    out.append(Method("FasterCache N=2, as shipped (one state for both CFG branches)", "fastercache", "fastercache-2",
                      enable=enabler(faster_cache(2, (-1, 901)))))
    out.append(Method("PAB N=2, as shipped (one state for both CFG branches)", "pab", "pab-2",
                      enable=enabler(pab(2, (100, 800)))))
    out += [Method(f"FasterCache N={n} t in {lo}..{hi}, per-branch state", "fastercache", f"fastercache-{n}-{hi}-branch",
                   enable=enabler(faster_cache(n, (lo, hi))), per_branch=True) for n, (lo, hi) in FASTER_CACHE]
    out += [Method(f"PAB N={n} t in {lo}..{hi}, per-branch state", "pab", f"pab-{n}-{lo}-{hi}-branch",
                   enable=enabler(pab(n, (lo, hi))), per_branch=True) for n, (lo, hi) in PAB]
    return out


def fewer_steps_methods(steps: int) -> list[Method]:
    """No caching, fewer steps (`FEWER_STEPS` of the steps): the baseline every cache must beat."""
    counts = dict.fromkeys(max(1, round(steps * f)) for f in FEWER_STEPS)
    return [Method(f"fewer steps ({n})", "fewer-steps", f"fewer-steps-{n}", steps=n) for n in counts if n < steps]


def cache_dit_methods(steps: int) -> list[Method]:
    """cache-dit's DBCache (with and without its TaylorSeer calibrator), from `bench.cache_dit_peer`."""
    return [Method(c.name, "cache-dit", c.key, enable=lambda pipe, c=c: c.enable(pipe, steps), disable=c.disable)
            for c in cache_dit_peer.settings()]


def calibrate_mag_cache(model, requests: list[SampleRequest], steps: int) -> list[float]:
    """MagCache's per-step magnitude ratios from diffusers' calibration mode, averaged over runs.

    With `MagCacheConfig(calibrate=True)` nothing is skipped; at the end of every generation and
    cache context (cond, uncond) diffusers logs the ratios (mean over batch and tokens of
    ||residual_t|| / ||residual_t-1||) and prints them. The log records are captured here (the
    print is swallowed) and averaged element-wise: one set of ratios serves both CFG branches.
    """
    from diffusers import MagCacheConfig

    captured: list[list[float]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith(_MAG_CACHE_LOG_PREFIX):
                captured.append(ast.literal_eval(message[len(_MAG_CACHE_LOG_PREFIX):]))

    log = logging.getLogger("diffusers.hooks.mag_cache")
    handler, saved = Capture(logging.INFO), (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    transformer = model.pipe.transformer
    transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    gen = Generator(model)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            gen.generate(requests)
    finally:
        gen.close()
        transformer.disable_cache()
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
    if not captured or any(len(r) != steps for r in captured):
        raise RuntimeError(f"MagCache calibration logged {len(captured)} ratio lists, expected lists of {steps}")
    return [float(x) for x in np.mean(np.asarray(captured, dtype=np.float64), axis=0)]
