"""SpeCa against every peer on one model: same prompts, seeds and process, under one quality floor.

    python -m bench.caching [--prompts 48] [--steps 50] [--repeats 1] [--only all] [--out bench/results/caching.md]
    python -m bench.caching --list                       # the method keys --only selects from
    pip install -e ".[bench]"                            # cache-dit, for its rows

Methods (every one runs on the same held-out prompts with the same seeds, batch 8 unless named):
  no cache          the reference every other method is compared with;
  SpeCa             `speca.apply_speca`: the tuned "default" preset at three strengths and alone (batch 1),
                    the paper's method ("reference" preset) at three thresholds, and one ablation row per
                    option the default adds;
  fewer steps       no caching, 4/5 down to 1/4 of the steps;
  diffusers hooks   `transformer.enable_cache(config)`: FirstBlockCache, TaylorSeerCache (full and
                    lite), MagCache (ratios from diffusers' calibration mode on separate prompts),
                    FasterCache (attention only) and PyramidAttentionBroadcast, each at 2-3 settings;
                    FasterCache and PAB also with one hook state per CFG branch (see the report notes);
  cache-dit         `cache_dit.enable_cache(pipe, ...)`: DBCache, and DBCache with its TaylorSeer
                    calibrator (`bench.cache_dit_peer`; the `bench` extra installs it).

Measures:
  FLOPs speedup   counted, not assumed: every nn.Linear call and every attention call inside the
                  transformer's double- and single-stream blocks is tallied (2 x multiply-adds) while
                  the method runs; speedup = reference FLOPs / method FLOPs; also projected to
                  HunyuanVideo's 60 blocks from the per-block counts (`projected_fraction`), so a
                  verification that costs 1/6 of a step on a 6-block model is charged 1/60 there.
  wall speedup    the denoising loop only; every method is generated --repeats more times without
                  any instrumentation, in rounds over all methods; median reference seconds /
                  median method seconds. Ratios from one process are all that is reported.
  quality         per-sample PSNR to the uncached clips (mean, p10, worst) and SSIM (mean, worst),
                  structural failures (a clip under 25 dB, or one the tiny world's scorer judges
                  otherwise than its uncached clip), VBench temporal flickering and adherence.
  cache memory    SpeCa: its own peak feature-cache bytes per batch; the peers: the peak bytes of
                  the tensors their states hold.
  full steps      SpeCa: the distribution over samples of steps run in full (rejected drafts count).

The goals: under the floor (mean PSNR >= 32 dB and worst clip >= 26 dB), SpeCa's best FLOPs speedup
is >= 1.25x each peer family's best, at both depths; the default preset has no structural failure
and a wall speedup >= 80% of its FLOPs speedup; batch 8 and batch 1 give the same step patterns.
Writes the markdown report (--out), the JSON next to it and speedup-vs-PSNR plots
(<out stem>_pareto.png). The report states the goals and whether the rows meet them.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fnmatch
import importlib.metadata
import io
import json
import logging
import math
import os
import platform
import shlex
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import __version__ as diffusers_version

from bench import cache_dit_peer
from bench.cache_memory import storage_bytes
from pipeline.config import ModelConfig, SampleRequest
from pipeline.generate import Generator
from pipeline.loading import load_pipeline, resolve_model_path
from pipeline.quality import psnr, ssim, temporal_flickering
from pipeline.tiny.worlds import World, world_of
from speca import SpeCaConfig

FLOOR_MEAN_DB = 32.0  # the quality floor: mean PSNR to the uncached clips ...
FLOOR_WORST_DB = 26.0  # ... and the worst clip's
FAILURE_PSNR_DB = 25.0  # a clip below this, or judged otherwise than its uncached clip, is a structural failure
SPEEDUP_GOAL = 1.25  # SpeCa's best under the floor / each peer's best under the floor
WALL_SHARE_GOAL = 0.8  # the default preset's wall speedup / its FLOPs speedup
HUNYUAN_DEPTH = 60  # HunyuanVideo's 20 dual- + 40 single-stream blocks, for the projected speedups
PSNR_CAP_DB = 100.0  # identical clips (inf dB) count as this in means
PLOT_PSNR_CAP_DB = 60.0
CALIBRATION_SEED_OFFSET = 500_000  # calibration clips draw their seeds from the evaluation seeds + this on
FAMILIES = {  # --only family names -> display names
    "reference": "no cache",
    "speca": "SpeCa",
    "fewer-steps": "fewer steps",
    "firstblockcache": "FirstBlockCache",
    "taylorseercache": "TaylorSeerCache",
    "magcache": "MagCache",
    "fastercache": "FasterCache",
    "pab": "PyramidAttentionBroadcast",
    "cache-dit": "cache-dit",
}
REFERENCE_THRESHOLDS = (0.25, 0.5, 1.0)  # the paper's preset at three tau0
SPECA_ABLATIONS = [  # (key, what changes against the default preset, SpeCaConfig changes)
    ("paper-schedule", "the paper's threshold direction, lenient early and strict late (0.05 -> 0.025; the "
     "previous default)", dict(tau0=0.05, beta=0.5, tau_min=0.02)),
    ("first-block", "also checks the first block on the real latent (thresholds x2: its errors are larger)",
     dict(verify_first=True, tau0=0.012)),
    ("delta", "checks the verified block's own update, not its output (thresholds x6: errors undiluted)",
     dict(signal="delta", tau0=0.036)),
    ("floor", "accumulated-error floor: a run of drafts ends when its errors sum to 0.05", dict(max_error_sum=0.05)),
    ("order-2", "order-2 drafts", dict(order=2)),
    ("subset", "the check on a quarter of the video tokens (cheaper verification)", dict(verify_tokens=0.25)),
    ("first-block-subset", "the first-block check too, both on a quarter of the video tokens (thresholds x2)",
     dict(verify_first=True, verify_tokens=0.25, tau0=0.012)),
]
_MAG_CACHE_LOG_PREFIX = "MagCache Calibration Results: "


@contextlib.contextmanager
def count_block_flops(transformer):
    """Tally FLOPs of the linear layers and attention calls inside the transformer blocks while active:
    in all (`flops`) and per block in execution order (`blocks`), and per block the calls in which it
    ran its attention (`ran`; a call a cache answered without attention does not count) and the
    transformer's calls (`calls`), for `projected_fraction`."""
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    total = {"flops": 0.0, "blocks": [0.0] * len(blocks), "ran": [0] * len(blocks), "calls": 0}
    inside: list[int] = []  # the block being run; attention elsewhere (refiner, text encoders, VAE) is not counted
    attended: list[bool] = []  # per entry of `inside`: did this call run attention
    handles = []

    def add(flops: float) -> None:
        total["flops"] += flops
        total["blocks"][inside[-1]] += flops

    def linear_hook(module, inputs, output):
        x = inputs[0]
        add(2.0 * x.numel() / x.shape[-1] * module.in_features * module.out_features)

    def enter(index):
        def hook(module, inputs):
            inside.append(index)
            attended.append(False)
        return hook

    def leave(module, inputs, output):
        total["ran"][inside.pop()] += attended.pop()

    def called(module, inputs):
        total["calls"] += 1

    if isinstance(transformer, torch.nn.Module):  # a bare holder of block lists (a test's) has no calls to count
        handles.append(transformer.register_forward_pre_hook(called))
    for i, block in enumerate(blocks):
        handles += [block.register_forward_pre_hook(enter(i)), block.register_forward_hook(leave)]
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))
    original = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        if inside:
            q = kwargs["query"] if "query" in kwargs else args[0]
            k = kwargs["key"] if "key" in kwargs else args[1]
            # (B, heads, Nq, d) x (B, heads, Nk, d): scores and weighted sum, 2 x 2 x B x h x Nq x Nk x d
            add(4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3])
            attended[-1] = True
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield total
    finally:
        F.scaled_dot_product_attention = original
        for h in handles:
            h.remove()


def projected_fraction(blocks: list[float], reference_blocks: list[float], ran: list[int], calls: int,
                       depth: int = HUNYUAN_DEPTH) -> float:
    """A method's share of the uncached block FLOPs, projected from this model's depth to `depth` blocks.

    Each block's share is its FLOPs over the uncached run's. A block that ran (its attention) in
    every one of the method's `calls` of the transformer (SpeCa's verified blocks, on all tokens or a token subset;
    FirstBlockCache's and DBCache's compute blocks) is a fixed cost that a deeper model pays once,
    not per layer, at its own share; the other blocks' mean share stands for the rest of the deeper
    model. A method that skips part of every block (attention caching) or whole steps keeps its
    share. So a check that costs 1/6 of a step here costs 1/60 on HunyuanVideo, neither hidden nor
    flattered by the shallow model.
    """
    shares = [b / r for b, r in zip(blocks, reference_blocks)]
    always = [n >= calls for n in ran]
    fixed = [x for x, a in zip(shares, always) if a]
    rest = [x for x, a in zip(shares, always) if not a]
    if not rest or len(fixed) >= depth:
        return float(np.mean(shares))
    return (sum(fixed) + (depth - len(fixed)) * float(np.mean(rest))) / depth


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


@dataclass
class Method:
    name: str
    family: str  # a FAMILIES key
    key: str  # what --only matches
    speca: SpeCaConfig | None = None
    steps: int | None = None  # fewer-steps baseline
    enable: Callable | None = None  # a peer's cache: pipeline -> None (diffusers: enables it on pipeline.transformer)
    disable: Callable | None = None  # pipeline -> None; default: `pipeline.transformer.disable_cache()`
    per_branch: bool = False  # run the diffusers hook under per_branch_state
    batch: int = 8
    ablation: str | None = None  # SpeCa: what this row changes, for the ablation table

    @property
    def kind(self) -> str:
        return {"reference": "reference", "speca": "speca", "fewer-steps": "baseline"}.get(self.family, "peer")


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


DEFAULT_KEY = "speca-default"  # the default preset at batch 8; "-b1" at batch 1


def speca_methods() -> list[Method]:
    """The default preset at three strengths and alone, the subset preset at two, the paper's method
    at three thresholds, and one ablation row per option the default adds to the paper's method."""
    d = SpeCaConfig.from_name("default")
    out = [Method("SpeCa default", "speca", DEFAULT_KEY, d),
           Method("SpeCa default, batch 1", "speca", DEFAULT_KEY + "-b1", d, batch=1)]
    for factor, name in ((0.5, "strict"), (1.5, "fast"), (2.0, "faster")):
        cfg = d.replace(tau0=d.tau0 * factor)
        out.append(Method(f"SpeCa default, {name} (thresholds x{factor})", "speca", f"{DEFAULT_KEY}-{name}", cfg))
    s = SpeCaConfig.from_name("subset")
    out.append(Method("SpeCa subset preset (the check on 1/8 of the video tokens)", "speca", "speca-subset", s))
    out.append(Method("SpeCa subset preset, strict (thresholds x0.8)", "speca", "speca-subset-strict",
                      s.replace(tau0=s.tau0 * 0.8)))
    for tau0 in REFERENCE_THRESHOLDS:
        cfg = SpeCaConfig.from_name("reference", tau0=tau0)
        out.append(Method(f"SpeCa reference (the paper's method) tau0={tau0}", "speca", f"speca-reference-{tau0}", cfg,
                          ablation="the paper's method (authors' HunyuanVideo settings)" if tau0 == 1.0 else None))
    for key, label, changes in SPECA_ABLATIONS:
        out.append(Method(f"SpeCa default, {label}", "speca", f"speca-ablate-{key}", d.replace(**changes),
                          ablation=label))
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


def select(methods: list[Method], only: str) -> list[Method]:
    """Methods whose key or family name matches one of the comma-separated shell patterns ("all": every one)."""
    patterns = ["*"] if only == "all" else [p.strip() for p in only.split(",") if p.strip()]
    return [m for m in methods if any(fnmatch.fnmatchcase(m.key, p) or fnmatch.fnmatchcase(m.family, p)
                                      for p in patterns)]


def evaluation_requests(w: World, n: int, steps: int) -> list[SampleRequest]:
    """The world's first `n` held-out evaluation clips (clip i has seed `eval_seed_base + i`)."""
    return [SampleRequest(prompt=s.prompt, seed=w.eval_seed_base + i, num_inference_steps=steps)
            for i, s in enumerate(w.eval_set(n))]


def calibration_requests(w: World, n: int, steps: int, exclude_prompts: set[str]) -> list[SampleRequest]:
    """`n` held-out clips drawn apart from the evaluation set: other seeds, none of its prompts."""
    out, seed = [], w.eval_seed_base + CALIBRATION_SEED_OFFSET
    while len(out) < n:
        spec = w.sample_eval(seed)
        if spec.prompt not in exclude_prompts and spec.prompt not in {r.prompt for r in out}:
            out.append(SampleRequest(prompt=spec.prompt, seed=seed, num_inference_steps=steps))
        seed += 1
    return out


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


def run_method(model, method: Method, requests: list[SampleRequest], measure: bool = True) -> dict:
    """Generate every request with the method; with `measure`, count FLOPs and hook cache memory too."""
    pipe = model.pipe
    if method.enable is not None:
        method.enable(pipe)
    gen = Generator(model, method.speca)
    reqs = [replace(r, num_inference_steps=method.steps) if method.steps else r for r in requests]
    try:
        with contextlib.ExitStack() as stack:
            branch_states = (stack.enter_context(per_branch_state(pipe.transformer)) if method.per_branch
                             else {})
            flops = stack.enter_context(count_block_flops(pipe.transformer)) if measure else None
            memory = (stack.enter_context(track_hook_cache_bytes(pipe.transformer, branch_states.values()))
                      if measure and method.family != "cache-dit" else None)
            samples = gen.generate(reqs, batch_size=method.batch)
            peer_bytes = cache_dit_peer.cache_bytes(pipe) if measure and method.family == "cache-dit" else 0
    finally:
        gen.close()
        if method.disable is not None:
            method.disable(pipe)
        elif method.enable is not None:
            pipe.transformer.disable_cache()
    denoise = sum(s.stats.seconds_denoise for s in samples[::method.batch])  # batches share their stage times
    if not measure:
        return {"denoise": denoise}
    cache_bytes = (max(s.stats.cache_bytes for s in samples) if method.speca is not None
                   else memory["bytes"] if memory is not None else peer_bytes)
    return {"samples": samples, "flops": flops["flops"], "block_flops": flops["blocks"], "block_ran": flops["ran"],
            "calls": flops["calls"], "denoise": denoise,
            "cache_bytes": cache_bytes, "world": world_of(model.info.path)}


def verdicts(w: World, samples) -> list[dict[str, bool]]:
    """The tiny world's scorer on each clip, per attribute."""
    return [w.score(s.frames, s.request.prompt) for s in samples]


def make_row(method: Method, result: dict | None, reference: dict, seconds: list[float], ref_seconds: list[float],
             error: str | None = None) -> dict:
    row = {"key": method.key, "method": method.name, "family": method.family, "kind": method.kind,
           "batch": method.batch, "ablation": method.ablation, "error": error}
    if result is None:
        return row
    samples = result["samples"]
    pairs = list(zip(samples, reference["samples"]))
    psnrs = [psnr(s.frames, r.frames) for s, r in pairs]
    ssims = [ssim(s.frames, r.frames) for s, r in pairs]
    w = reference["world"]
    ref_verdicts = reference.get("verdicts") or verdicts(w, reference["samples"])
    mine = verdicts(w, samples)
    failures = [{"prompt": s.request.prompt, "psnr": p, "flipped": sorted(k for k in v if v[k] != rv[k])}
                for s, p, v, rv in zip(samples, psnrs, mine, ref_verdicts) if p < FAILURE_PSNR_DB or v != rv]
    adh = w.scorer.accuracy(mine)
    full = [s.stats.full_steps + s.stats.spec_rejected for s in samples] if method.speca is not None else None
    capped = np.minimum(psnrs, PSNR_CAP_DB)
    flops_speedup = reference["flops"] / result["flops"]
    wall = float(np.median(ref_seconds) / np.median(seconds)) if seconds else None
    row.update({
        "flops_speedup": flops_speedup,
        "flops_speedup_60": 1.0 / projected_fraction(result["block_flops"], reference["block_flops"],
                                                     result["block_ran"], result["calls"]),
        "wall_speedup": wall,
        "wall_share": wall / flops_speedup if wall is not None else None,
        "denoise_seconds": seconds,
        "psnr_all": psnrs,
        "psnr": math.inf if all(math.isinf(p) for p in psnrs) else float(np.mean(capped)),
        "psnr_p10": float(np.percentile(psnrs, 10, method="lower")),
        "psnr_worst": float(min(psnrs)),
        "ssim": float(np.mean(ssims)),
        "ssim_worst": float(min(ssims)),
        "failures": failures,
        "flicker": float(np.mean([temporal_flickering(s.frames) for s in samples])),
        "adherence_all": adh["all"], **{f"adh_{k}": v for k, v in adh.items() if k != "all"},
        "cache_mb": result["cache_bytes"] / 1e6,
        "full_steps": full,
        "full_steps_min": min(full) if full else None,
        "full_steps_max": max(full) if full else None,
        "full_steps_mean": float(np.mean(full)) if full else None,
        "patterns": [s.stats.step_pattern for s in samples] if full else None,
        "distinct_patterns": len({s.stats.step_pattern for s in samples}) if full else None,
    })
    return row


def under_floor(row: dict) -> bool:
    return row["error"] is None and row["psnr"] >= FLOOR_MEAN_DB and row["psnr_worst"] >= FLOOR_WORST_DB


DEPTHS = {"flops_speedup": "at the model's depth", "flops_speedup_60": f"projected to {HUNYUAN_DEPTH} blocks"}


def goals(rows: list[dict]) -> dict:
    """The issue's goals, computed from the rows."""
    ok = [r for r in rows if r["error"] is None]

    def best(candidates: list[dict], key: str) -> dict | None:
        fit = [r for r in candidates if under_floor(r)]
        return max(fit, key=lambda r: r[key]) if fit else None

    out: dict = {"depths": {}}
    peers = list(dict.fromkeys(r["family"] for r in rows if r["kind"] in ("peer", "baseline")))
    for key in DEPTHS:
        speca = best([r for r in ok if r["kind"] == "speca"], key)
        table = []
        for family in peers:
            b = best([r for r in ok if r["family"] == family], key)
            ratio = speca[key] / b[key] if speca and b else None
            table.append({"family": family, "best_method": b["method"] if b else None,
                          "best_speedup": b[key] if b else None, "ratio": ratio,
                          "beaten": speca is not None and (b is None or ratio >= SPEEDUP_GOAL),
                          "ran": any(r["family"] == family for r in ok)})
        out["depths"][key] = {"speca_best_method": speca["method"] if speca else None,
                              "speca_best_speedup": speca[key] if speca else None, "peers": table,
                              "met": speca is not None and bool(table) and all(p["beaten"] for p in table)}
    default = next((r for r in ok if r["key"] == DEFAULT_KEY), None)
    out["default"] = None if default is None else {
        "method": default["method"], "failures": len(default["failures"]),
        "wall_share": default["wall_share"],
        "met": not default["failures"] and default["wall_share"] is not None
        and default["wall_share"] >= WALL_SHARE_GOAL}
    alone = next((r for r in ok if r["key"] == DEFAULT_KEY + "-b1"), None)
    out["batch"] = None if default is None or alone is None else {
        "same": sum(a == b for a, b in zip(default["patterns"], alone["patterns"])), "of": len(default["patterns"])}
    return out


def describe_model(model) -> str:
    """The weights a run used: folder, depth, width and a hash of the transformer's weights file."""
    import hashlib

    c = model.info.transformer_config
    files = sorted(Path(model.info.path, "transformer").glob("*.safetensors"))
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:12] if files else "n/a"
    path = Path(model.info.path)
    where = f"pipeline/tiny/{path.name}" if path.parent.name == "tiny" else str(path)
    return (f"`{where}`, {c['num_layers']} dual- + {c['num_single_layers']} single-stream blocks, "
            f"{c['num_attention_heads']} heads x {c['attention_head_dim']}, transformer weights sha256 {digest}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m bench.caching", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled", help="'bundled' (the tiny model) or a diffusers HunyuanVideo "
                                                           "folder / hub id (default: bundled)")
    parser.add_argument("--prompts", type=int, default=48, help="held-out evaluation prompts (default: 48)")
    parser.add_argument("--prompt-set", choices=("evaluation", "calibration"), default="evaluation",
                        help="evaluation: the held-out evaluation prompts (the model's world's evaluation set); calibration: as many "
                             "other held-out prompts, none of them an evaluation prompt, for tuning presets "
                             "(default: evaluation)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed, uninstrumented generations of every method for the wall speedup (median); "
                             "they run after the measured one, in rounds over all methods (default: 1)")
    parser.add_argument("--calibration-prompts", type=int, default=4,
                        help="prompts for MagCache's calibration run, none of them an evaluation prompt (default: 4)")
    parser.add_argument("--only", default="all",
                        help="comma-separated method keys or family names, shell wildcards allowed, e.g. "
                             "'speca,magcache-*,pab-2'; the uncached reference always runs (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="print the method keys and families, then exit")
    parser.add_argument("--render", action="store_true",
                        help="rewrite the report (--out) from its JSON, e.g. after editing <stem>_analysis.md; "
                             "runs nothing")
    parser.add_argument("--out", default="bench/results/caching.md",
                        help="markdown report; the JSON and <stem>_pareto.png go next to it "
                             "(default: bench/results/caching.md)")
    args = parser.parse_args(argv)
    for name in ("prompts", "steps", "repeats", "calibration_prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    if args.render:
        data = json.loads(Path(args.out).with_suffix(".json").read_text())
        rows = data.pop("rows")
        data.pop("goals")
        write_report(rows, data, Path(args.out))
        return
    model = None  # loaded after --list
    w = world_of(resolve_model_path(args.model))
    requests = evaluation_requests(w, args.prompts, args.steps)
    evaluation_prompts = {r.prompt for r in requests}
    calibration = calibration_requests(w, args.calibration_prompts, args.steps, evaluation_prompts)
    if args.prompt_set == "calibration":  # tuning: never the evaluation prompts
        requests = calibration_requests(w, args.prompts, args.steps, evaluation_prompts)

    @cache
    def mag_ratios() -> list[float]:
        print(f"[bench.caching] MagCache calibration on {len(calibration)} separate prompts", flush=True)
        return calibrate_mag_cache(model, calibration, args.steps)

    catalogue = (speca_methods() + fewer_steps_methods(args.steps) + diffusers_methods(args.steps, mag_ratios)
                 + cache_dit_methods(args.steps))
    if args.list:
        for m in catalogue:
            print(f"{m.key:34s} {m.family:16s} {m.name}")
        return
    methods = select(catalogue, args.only)
    if not methods:
        parser.error(f"--only {args.only!r} selects no method (see --list)")
    if any(m.family == "cache-dit" for m in methods) and not cache_dit_peer.is_available():
        parser.error("cache-dit is not installed: pip install -e '.[bench]' (or leave its methods out with --only)")

    model = load_pipeline(ModelConfig(model=args.model, device="cpu"))
    ref_method = Method("no cache", "reference", "reference")
    print("[bench.caching] no cache", flush=True)
    reference = run_method(model, ref_method, requests)
    reference["verdicts"] = verdicts(w, reference["samples"])
    results: dict[str, dict] = {}
    errors: dict[str, str] = {}

    def measure(m: Method) -> None:
        print(f"[bench.caching] {m.name}", flush=True)
        try:
            results[m.key] = run_method(model, m, requests)
        except Exception as e:  # noqa: BLE001 - a method that cannot run on this model becomes an error row
            errors[m.key] = f"{type(e).__name__}: {e}"
            print(f"[bench.caching]   failed: {errors[m.key]}", flush=True)

    for m in methods:
        measure(m)

    timed = [ref_method, *(m for m in methods if m.key in results)]
    seconds: dict[str, list[float]] = {m.key: [] for m in timed}
    for r in range(args.repeats):
        print(f"[bench.caching] timing round {r + 1}/{args.repeats}", flush=True)
        for m in timed:
            seconds[m.key].append(run_method(model, m, requests, measure=False)["denoise"])

    rows = [make_row(ref_method, reference, reference, seconds["reference"], seconds["reference"])]
    for m in methods:
        rows.append(make_row(m, results.get(m.key), reference, seconds.get(m.key, []), seconds["reference"],
                             errors.get(m.key)))
    used_mag = any(m.family == "magcache" and m.key in results for m in methods)
    meta = {
        "command": "python -m bench.caching" + (" " + shlex.join(argv) if argv else ""),
        "machine": (f"{platform.machine()} CPU ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads, "
                    f"torch {torch.__version__}, diffusers {diffusers_version}"
                    + (f", cache-dit {importlib.metadata.version('cache-dit')}"
                       if cache_dit_peer.is_available() else "")
                    + "; fp32"),
        "model": args.model, "model_desc": describe_model(model), "prompts": args.prompts,
        "prompt_set": args.prompt_set, "prompt_list": [r.prompt for r in requests], "steps": args.steps,
        "repeats": args.repeats,
        "calibration_prompts": [r.prompt for r in calibration] if used_mag else None,
        "mag_ratios": mag_ratios() if used_mag else None,
    }
    write_report(rows, meta, Path(args.out))


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both speedup and PSNR, by increasing speedup."""
    front, best_y = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return front[::-1]


def plot_pareto(rows: list[dict], path: Path) -> None:
    """Speedup vs mean PSNR and vs the worst clip's PSNR, one panel each, with the floor's lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5.5))
    FigureCanvasAgg(fig)
    markers = "os^vDP*Xh<>"
    plotted = [r for r in rows if r["error"] is None and r["kind"] != "reference"]
    for panel, (field, floor, label) in enumerate((("psnr", FLOOR_MEAN_DB, "mean PSNR"),
                                                   ("psnr_worst", FLOOR_WORST_DB, "worst clip's PSNR"))):
        ax = fig.add_subplot(1, 2, panel + 1)
        for i, family in enumerate(dict.fromkeys(r["family"] for r in plotted)):
            pts = [(r["flops_speedup"], min(r[field], PLOT_PSNR_CAP_DB)) for r in plotted if r["family"] == family]
            ax.scatter(*zip(*pts), marker=markers[i % len(markers)], color=f"C{i}", label=FAMILIES[family], alpha=0.8)
            ax.plot(*zip(*pareto_front(pts)), color=f"C{i}", lw=1.2)
        ax.axhline(floor, ls="--", color="grey", lw=1, label=f"floor {floor:.0f} dB")
        ax.set_xlabel("FLOPs speedup over no cache (counted, this model's depth)")
        ax.set_ylabel(f"{label} to the uncached clips (dB; capped at {PLOT_PSNR_CAP_DB:.0f})")
        ax.set_title(f"Speedup vs {label}; lines: each family's Pareto front")
        ax.grid(alpha=0.3)
        if panel == 0:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _steps_histogram(full: list[int]) -> str:
    return ", ".join(f"{k} (x{v})" for k, v in sorted(Counter(full).items()))


def _speedup(value) -> str:
    return _fmt(value, ".2f") + ("x" if value is not None else "")


def _db(value) -> str:
    return "inf" if value is not None and math.isinf(value) else _fmt(value, ".1f")


def _prompt(failure) -> str:
    return failure if isinstance(failure, str) else failure["prompt"]


def _failure(failure, flips: Counter) -> str:
    """One failing clip for the report; JSON written before 2026-12-01 13:40 kept only the prompt."""
    if isinstance(failure, str):
        return f"{failure} [{flips[failure]}]"
    why = ", ".join(failure["flipped"]) or "none"
    return f"{failure['prompt']} ({_db(failure['psnr'])} dB; {why}) [{flips[failure['prompt']]}]"


def write_report(rows: list[dict], meta: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    g = goals(rows)
    plot = out.with_name(out.stem + "_pareto.png")
    out.with_suffix(".json").write_text(json.dumps({**meta, "goals": g, "rows": rows}, indent=2))
    plot_pareto(rows, plot)
    title = "the bundled tiny model" if meta["model"] == "bundled" else f"`{meta['model']}`"
    floor = f"mean PSNR >= {FLOOR_MEAN_DB:.0f} dB and worst clip >= {FLOOR_WORST_DB:.0f} dB"
    lines = [
        f"# Caching methods on {title}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: {meta['model_desc']}  ",
        (f"Machine: {meta['machine']}. One process; the same {meta['prompts']} held-out "
         f"{meta.get('prompt_set', 'evaluation')} prompts, seeds and "
         f"{meta['steps']} steps for every method; PSNR / SSIM against the uncached clips.  "),
        f"Plot: `{plot.name}`; every figure below, per-sample PSNRs too: `{out.with_suffix('.json').name}`.",
        "",
        "## Goals",
        "",
        f"Quality floor: {floor} to the uncached clips. A structural failure: a clip under "
        f"{FAILURE_PSNR_DB:.0f} dB, or one the tiny world's scorer judges otherwise than its uncached clip.",
        "",
    ]
    all_met = True
    for n, (key, where) in enumerate(DEPTHS.items(), start=1):
        d = g["depths"][key]
        all_met &= d["met"]
        best = (f"{d['speca_best_speedup']:.2f}x ({d['speca_best_method']})" if d["speca_best_method"]
                else "no SpeCa row is above the floor")
        lines += [
            (f"Goal 1{'ab'[n - 1]}, FLOPs {where}: SpeCa's best under the floor is >= {SPEEDUP_GOAL}x every peer's "
             f"best under it: **{'met' if d['met'] else 'NOT met'}**. SpeCa's best: {best}."),
            "",
            f"| peer | its best FLOPs speedup {where}, under the floor | SpeCa best / peer best | >= {SPEEDUP_GOAL}x |",
            "|---|---|---|---|",
        ]
        for p in d["peers"]:
            pb = (f"{p['best_speedup']:.2f}x ({p['best_method']})" if p["best_method"]
                  else ("no row above the floor" if p["ran"] else "did not run"))
            lines.append(f"| {FAMILIES[p['family']]} | {pb} | {_fmt(p['ratio'], '.2f')} | "
                         f"{'yes' if p['beaten'] else 'no'} |")
        lines.append("")
    lines.append("A peer with no row above the floor counts as beaten when SpeCa has one.")
    lines.append("")
    dflt = g["default"]
    if dflt is None:
        lines += [f"Goal 2 (the default preset, `{DEFAULT_KEY}`): did not run.", ""]
        all_met = False
    else:
        all_met &= dflt["met"]
        lines += [(f"Goal 2, the default preset ({dflt['method']}): zero structural failures and a wall speedup >= "
                   f"{WALL_SHARE_GOAL:.0%} of its FLOPs speedup at batch 8: **{'met' if dflt['met'] else 'NOT met'}** "
                   f"({dflt['failures']} failures; wall / FLOPs speedup {_fmt(dflt['wall_share'], '.0%')})."), ""]
    if g["batch"] is not None:
        same = g["batch"]["same"] == g["batch"]["of"]
        all_met &= same
        lines += [(f"Goal 3, batch 8 and batch 1 give each sample the same step pattern (default preset): "
                   f"**{'met' if same else 'NOT met'}** ({g['batch']['same']} of {g['batch']['of']} samples)."), ""]
    if not all_met:
        # The why is written by hand from a run's numbers and kept beside the report, so a rerun keeps it.
        analysis = out.with_name(f"{out.stem}_analysis.md")
        text = analysis.read_text().strip() if analysis.is_file() else "_To be written._"
        lines += ["## Analysis", "", f"(`{analysis.name}`, written from the run it names.)", "", text, ""]
    lines += [
        "## Results",
        "",
        ("| method | key | FLOPs speedup | at 60 blocks | wall speedup | PSNR mean | p10 | worst | SSIM | SSIM worst "
         "| structural failures | adherence (all 4) | cache MB | full steps min/mean/max |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["error"] is not None:
            text = r["error"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['method']} | `{r['key']}` | error: {text} |" + " |" * 11)
            continue
        full = (f"{r['full_steps_min']}/{r['full_steps_mean']:.1f}/{r['full_steps_max']}" if r["full_steps"]
                else "n/a")
        mark = "" if r["kind"] == "reference" else (" (floor)" if under_floor(r) else "")
        lines.append(f"| {r['method']}{mark} | `{r['key']}` | {_speedup(r['flops_speedup'])} | "
                     f"{_speedup(r['flops_speedup_60'])} | {_speedup(r['wall_speedup'])} | {_db(r['psnr'])} | "
                     f"{_db(r['psnr_p10'])} | {_db(r['psnr_worst'])} | {r['ssim']:.3f} | {r['ssim_worst']:.3f} | "
                     f"{len(r['failures'])} | {100 * r['adherence_all']:.0f}% | {r['cache_mb']:.2f} | {full} |")
    lines += ["", "(floor): the row is above the quality floor.", ""]
    ablations = [r for r in rows if r["error"] is None and r.get("ablation")]
    if ablations:
        lines += ["## SpeCa ablations", "",
                  "Each row changes one thing against the default preset (or names the paper's method).", "",
                  "| row | what changes | FLOPs speedup | at 60 blocks | PSNR mean | worst | structural failures |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| `{r['key']}` | {r['ablation']} | {_speedup(r['flops_speedup'])} | "
                  f"{_speedup(r['flops_speedup_60'])} | {_db(r['psnr'])} | {_db(r['psnr_worst'])} | "
                  f"{len(r['failures'])} |" for r in ablations]
        lines.append("")
    failing = [r for r in rows if r["error"] is None and r["kind"] != "reference" and r["failures"]]
    if failing:
        flips = Counter(_prompt(f) for r in failing for f in r["failures"])
        methods = sum(r["error"] is None and r["kind"] != "reference" for r in rows)
        lines += ["## Structural failures", "",
                  "Each failing clip: its PSNR to the uncached clip and the attributes the scorer judged otherwise "
                  f"(none: under {FAILURE_PSNR_DB:.0f} dB only); [n] = failing clips with that prompt over all "
                  f"{methods} methods.", ""]
        lines += [f"- {r['method']}: " + "; ".join(_failure(f, flips) for f in r["failures"]) for r in failing]
        lines.append("")
    speca_rows = [r for r in rows if r["error"] is None and r["full_steps"]]
    if speca_rows:
        lines += ["Full steps per sample (SpeCa): full-step count (x number of samples).", ""]
        lines += [f"- {r['method']}: {_steps_histogram(r['full_steps'])}" for r in speca_rows]
    families = {r["family"] for r in rows}
    notes = [
        ("FLOPs: every nn.Linear and attention call inside the double- and single-stream blocks, counted while "
         "the method runs (text encoders, token refiner, embeddings and VAE are the same for all methods and left "
         "out)."),
        (f"At 60 blocks: the counted per-block FLOPs projected to HunyuanVideo's {HUNYUAN_DEPTH} blocks "
         "(`projected_fraction`): a block that ran its attention at every call (SpeCa's verified blocks, on all "
         "tokens or a token subset; FirstBlockCache's and "
         "DBCache's compute blocks) stays one block, a fixed cost; the other blocks' mean share stands for the rest. "
         "Methods that skip whole steps or part of every block keep their share."),
        (f"Wall speedup: the denoising loop only; median of {meta['repeats']} uninstrumented generation(s) per "
         "method, run in rounds over all methods in this process; a ratio to the uncached reference."),
        (f"PSNR mean counts identical clips (inf dB) as {PSNR_CAP_DB:.0f} dB; p10 is a sample's value (the lower "
         "one, no interpolation). SSIM: torchmetrics, per frame. "
         "Cache MB: SpeCa's own peak feature cache per batch; for the peers the peak bytes of the tensors their "
         "states hold (all cache contexts)."),
        ("The pipeline runs true CFG as two transformer calls per step (cache contexts `cond` / `uncond`). "
         "The peers run at batch 8; FirstBlockCache, MagCache and cache-dit decide to skip for the whole batch."),
    ]
    if "cache-dit" in families:
        notes.append("cache-dit: DBCache through `cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...), "
                     "calibrator_config=TaylorSeerCalibratorConfig(...))` with `enable_separate_cfg=True` (CFG runs "
                     "as two calls); its HunyuanVideo adapter caches each block list separately, so Fn / Bn blocks of "
                     "both lists always run (two fixed blocks per call at 60 blocks for F1B0). Settings were chosen "
                     "on calibration prompts (`bench/cache_dit_peer.py`).")
    if "fastercache" in families:
        notes.append("FasterCache: attention skipping only (`is_guidance_distilled=True`, spatial skip range "
                     "(-1, 901), weight 0.5, as diffusers' own HunyuanVideo test configures it). Its CFG cache "
                     "(approximating the unconditional branch) expects [uncond, cond] stacked in one batch; with the "
                     "two separate calls it splits the conditional batch in halves and fails (the 'with its CFG "
                     "cache' row, when run), so the other rows leave it off.")
    if "pab" in families:
        notes.append("PAB: spatial attention only, timestep range (100, 800): HunyuanVideo's attention modules are "
                     "joint self-attention, so PAB's cross-attention and temporal ranges have nothing to act on. Its "
                     "default identifiers also match the token refiner's attention, which it skips too (outside the "
                     "counted blocks).")
    if families & {"pab", "fastercache"}:
        notes.append("PAB and FasterCache keep one state per hooked module, not per cache context, so as shipped "
                     "the cond and uncond calls share an iteration counter and an attention cache (one branch reuses "
                     "the other's attention). Rows marked 'per-branch state' run the same hooks with one state per "
                     "cache context (`per_branch_state` here); both variants count towards the peer's best.")
    if meta["mag_ratios"] is not None:
        notes.append(f"MagCache: ratios from diffusers' calibration mode (`MagCacheConfig(calibrate=True)`) on "
                     f"{len(meta['calibration_prompts'])} prompts that are not evaluation prompts, averaged over "
                     f"prompts and both CFG branches; max_skip_steps 3, retention_ratio 0.2. Ratios: "
                     f"{', '.join(f'{x:.4f}' for x in meta['mag_ratios'])}.")
    lines += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
