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


def diffusers_methods(steps: int, mag_ratios: Callable[[], list[float]]) -> list[Method]:
    """diffusers' hooks at 2-3 settings each. `mag_ratios()` gives MagCache's calibrated ratios."""
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
    for t in (0.05, 0.1, 0.2):
        out.append(Method(f"FirstBlockCache t={t}", "firstblockcache", f"fbc-{t}",
                          enable=enabler(lambda pipe, t=t: FirstBlockCacheConfig(threshold=t))))
    for n in (2, 3, 4, 5):
        for lite in (False, True):
            out.append(Method(f"TaylorSeerCache{' lite' if lite else ''} N={n}", "taylorseercache",
                              f"taylorseer{'-lite' if lite else ''}-{n}", enable=enabler(
                                  lambda pipe, n=n, lite=lite: TaylorSeerCacheConfig(
                                      cache_interval=n, disable_cache_before_step=3, max_order=1,
                                      taylor_factors_dtype=torch.float32, use_lite_mode=lite))))
    for t in (0.03, 0.06, 0.12):
        out.append(Method(f"MagCache t={t}", "magcache", f"magcache-{t}", enable=enabler(
            lambda pipe, t=t: MagCacheConfig(threshold=t, max_skip_steps=3, retention_ratio=0.2,
                                             num_inference_steps=steps, mag_ratios=mag_ratios()))))
    def faster_cache(n: int, cfg_cache: bool = False) -> Callable:
        return lambda pipe: FasterCacheConfig(
            spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(-1, 901),
            unconditional_batch_skip_range=2, attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=not cfg_cache, current_timestep_callback=lambda: pipe.current_timestep)

    def pab(n: int) -> Callable:
        return lambda pipe: PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=n, spatial_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=lambda: pipe.current_timestep)

    out.append(Method("FasterCache N=2 with its CFG cache", "fastercache", "fastercache-cfg",
                      enable=enabler(faster_cache(2, cfg_cache=True))))
    for per_branch in (False, True):
        name, key = (", per-branch state", "-branch") if per_branch else ("", "")
        out += [Method(f"FasterCache N={n}{name}", "fastercache", f"fastercache-{n}{key}",
                       enable=enabler(faster_cache(n)), per_branch=per_branch) for n in (2, 3, 4)]
        out += [Method(f"PAB N={n}{name}", "pab", f"pab-{n}{key}", enable=enabler(pab(n)), per_branch=per_branch)
                for n in (2, 3, 4)]
    return out


def fewer_steps_methods(steps: int) -> list[Method]:
    """No caching, fewer steps: the baseline every cache must beat (4/5 down to 1/4 of the steps,
    finer where the floor usually falls)."""
    counts = dict.fromkeys(max(1, round(steps * f)) for f in (0.8, 0.64, 0.5, 0.4, 0.36, 0.32, 0.25))
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
