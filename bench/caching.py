"""SpeCa against its peers on the bundled model: same prompts, same seeds, one process, one run.

    python -m bench.caching [--prompts 32] [--steps 50] [--out bench/results/caching.md]

Every method generates the same held-out prompts with the same seeds. FLOPs are counted, not
assumed: every nn.Linear call inside the transformer's blocks and every attention call is
tallied while the method runs (2 x multiply-adds), so diffusers' hooks and SpeCa are measured the
same way; speedup = FLOPs of the uncached run / FLOPs of the method. Quality: PSNR and SSIM of the
decoded clips against the uncached clips (per frame, averaged), and the adherence scorer. Wall
time of the denoising loop is reported as a ratio to the uncached run in the same process.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig, SampleRequest
from pipeline.generate import Generator
from pipeline.loading import load_pipeline
from pipeline.tiny import scorer, world
from speca import SpeCaConfig


@contextmanager
def count_block_flops(transformer):
    """Tally FLOPs of the transformer blocks' linear layers and attention while active."""
    total = {"flops": 0.0}
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    handles = []

    def linear_hook(module, inputs, output):
        x = inputs[0]
        total["flops"] += 2.0 * x.numel() / x.shape[-1] * module.in_features * module.out_features

    for block in blocks:
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                handles.append(m.register_forward_hook(linear_hook))
    original = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        q = kwargs["query"] if "query" in kwargs else args[0]
        k = kwargs["key"] if "key" in kwargs else args[1]
        # (B, heads, Nq, d) x (B, heads, Nk, d): scores and weighted sum, 2 x 2 x B x h x Nq x Nk x d
        total["flops"] += 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * q.shape[3]
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield total
    finally:
        F.scaled_dot_product_attention = original
        for h in handles:
            h.remove()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM over frames (gaussian window 11, sigma 1.5, on [0, 1] RGB, channel-averaged)."""
    x = torch.from_numpy(a).float().div(255).permute(0, 3, 1, 2)
    y = torch.from_numpy(b).float().div(255).permute(0, 3, 1, 2)
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = (g[:, None] * g[None, :]) / g.sum() ** 2
    w = w.expand(3, 1, 11, 11)

    def filt(t):
        return F.conv2d(t, w, padding=5, groups=3)

    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx**2, filt(y * y) - my**2, filt(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    per_frame = [np.mean((fa.astype(float) - fb.astype(float)) ** 2) for fa, fb in zip(a, b)]
    if max(per_frame) == 0:
        return math.inf  # identical clips
    return float(np.mean([10 * math.log10(255.0**2 / max(m, 1e-10)) for m in per_frame]))


@dataclass
class Method:
    name: str
    family: str
    speca: SpeCaConfig | None = None
    steps: int | None = None  # fewer-steps baseline
    enable: Callable | None = None  # diffusers cache: transformer -> None
    batch: int = 8


def diffusers_methods() -> list[Method]:
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    out = []
    for t in (0.05, 0.1, 0.2):
        out.append(Method(f"FirstBlockCache t={t}", "diffusers",
                          enable=lambda tr, t=t: tr.enable_cache(FirstBlockCacheConfig(threshold=t))))
    for n in (3, 5):
        out.append(Method(f"TaylorSeerCache N={n}", "diffusers", enable=lambda tr, n=n: tr.enable_cache(
            TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=3, max_order=1,
                                  taylor_factors_dtype=torch.float32))))
        out.append(Method(f"TaylorSeerCache lite N={n}", "diffusers", enable=lambda tr, n=n: tr.enable_cache(
            TaylorSeerCacheConfig(cache_interval=n, disable_cache_before_step=3, max_order=1,
                                  taylor_factors_dtype=torch.float32, use_lite_mode=True))))
    return out


def speca_methods() -> list[Method]:
    out = [Method("SpeCa reference preset", "speca", SpeCaConfig.from_name("reference"))]
    for cache in ("lean", "module"):
        for tau0 in (0.05, 0.1, 0.2):
            out.append(Method(f"SpeCa {cache} tau0={tau0}", "speca", SpeCaConfig.from_name("default", cache=cache,
                                                                                            tau0=tau0)))
    out.append(Method("SpeCa default, batch 1", "speca", SpeCaConfig.from_name("default"), batch=1))
    return out


def run_method(model, method: Method, requests: list[SampleRequest]) -> dict:
    pipe = model.pipe
    if method.enable is not None:
        method.enable(pipe.transformer)
    gen = Generator(model, method.speca)
    reqs = [replace(r, num_inference_steps=method.steps) if method.steps else r for r in requests]
    try:
        with count_block_flops(pipe.transformer) as flops:
            t0 = time.perf_counter()
            samples = gen.generate(reqs, batch_size=method.batch)
            wall = time.perf_counter() - t0
    finally:
        gen.close()
        if method.enable is not None:
            pipe.transformer.disable_cache()
    denoise = sum(s.stats.seconds_denoise for s in samples[::method.batch])
    return {"samples": samples, "flops": flops["flops"], "wall": wall, "denoise": denoise}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", choices=["speca", "all"], default="all")
    parser.add_argument("--out", default="bench/results/caching.md")
    args = parser.parse_args(argv)

    model = load_pipeline(ModelConfig(model=args.model, device="cpu"))
    specs = world.eval_specs(args.prompts)
    requests = [SampleRequest(prompt=s.prompt, seed=world.EVAL_SEED_BASE + i, num_inference_steps=args.steps)
                for i, s in enumerate(specs)]
    reference = run_method(model, Method("no cache", "reference"), requests)
    methods = speca_methods() + ([] if args.only == "speca" else diffusers_methods())
    results = [("no cache", "reference", reference)]
    for m in methods:
        print(f"[bench.caching] {m.name}", flush=True)
        results.append((m.name, m.family, run_method(model, m, requests)))
    # The trivial baseline: fewer steps at about SpeCa default's compute.
    default = next(r for n, _, r in results if n == "SpeCa lean tau0=0.05")
    few = max(1, round(args.steps * default["flops"] / reference["flops"]))
    results.append((f"fewer steps ({few})", "baseline", run_method(model, Method("few", "baseline", steps=few),
                                                                   requests)))

    rows = []
    for name, family, r in results:
        samples = r["samples"]
        adh = scorer.accuracy([scorer.score(s.frames, s.request.prompt) for s in samples])
        full = [s.stats.full_steps + s.stats.spec_rejected for s in samples] if family == "speca" else [0]
        rows.append({
            "method": name, "family": family,
            "flops_speedup": reference["flops"] / r["flops"],
            "wall_speedup": reference["denoise"] / r["denoise"],
            "psnr": float(np.mean([psnr(s.frames, ref.frames) for s, ref in zip(samples, reference["samples"])])),
            "ssim": float(np.mean([ssim(s.frames, ref.frames) for s, ref in zip(samples, reference["samples"])])),
            "adherence_all": adh["all"], **{f"adh_{k}": v for k, v in adh.items() if k != "all"},
            "cache_mb": max(s.stats.cache_bytes for s in samples) / 1e6,
            "full_steps_min": min(full), "full_steps_max": max(full), "full_steps_mean": float(np.mean(full)),
            "distinct_patterns": len({s.stats.step_pattern for s in samples}) if family == "speca" else None,
        })
    write_report(rows, args, Path(args.out))


def write_report(rows: list[dict], args, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    lines = [
        "# Caching methods on the bundled tiny model",
        "",
        f"Command: `python -m bench.caching --prompts {args.prompts} --steps {args.steps} --only {args.only}`  ",
        f"Machine: {platform.machine()} CPU, {torch.get_num_threads()} torch threads, torch {torch.__version__}; "
        "fp32. One process, same prompts and seeds for every method; PSNR/SSIM against the uncached clips.",
        "",
        "| method | FLOPs speedup | wall speedup | PSNR dB | SSIM | adherence (all 4) | cache MB | full steps min/mean/max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = "inf" if math.isinf(r["psnr"]) else f"{r['psnr']:.1f}"
        lines.append(f"| {r['method']} | {r['flops_speedup']:.2f}x | {r['wall_speedup']:.2f}x | {p} | {r['ssim']:.3f} | "
                     f"{100 * r['adherence_all']:.0f}% | {r['cache_mb']:.2f} | "
                     + (f"{r['full_steps_min']}/{r['full_steps_mean']:.1f}/{r['full_steps_max']} |"
                        if r["family"] == "speca" else "n/a |"))
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
