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
  quality         per-sample PSNR to the uncached clips (mean, p10, worst; clips under 26 dB) and SSIM
                  (mean, worst), structural failures (`failure_rule`: a clip under 25 dB, or a scorer verdict
                  turned from right to wrong where the uncached clip was clear of the threshold by the
                  scorer's stated margin), VBench temporal flickering and adherence.
  cache memory    SpeCa: its own peak feature-cache bytes per batch; the peers: the peak bytes of
                  the tensors their states hold.
  full steps      SpeCa: the distribution over samples of steps run in full (rejected drafts count).

The goals (issue 31): the default preset is above the floor (mean PSNR >= 32 dB and worst clip >= 26 dB)
at >= 2.5x FLOPs at the model's depth, with no structural failure and a wall speedup >= 80% of its
FLOPs speedup, and its FLOPs speedup is >= 1.25x each peer family's best row above the floor, at both
depths; batch 8 and batch 1 give the same step patterns.
Writes the markdown report (--out), the JSON next to it and speedup-vs-PSNR plots
(<out stem>_pareto.png). The report states the goals and whether the rows meet them.

Where things are: this module runs a method and makes its row (the CLI); `bench.method` the Method
record and `--only`; `bench.speca_rows` SpeCa's rows; `bench.peers` the peers' rows and what they need
(MagCache's calibration, per-branch hook state, hook cache bytes); `bench.flop_count` the FLOPs counter
and the 60-block projection; `bench.caching_report` the goals, the markdown and the plots.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import sys
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import torch
from diffusers import __version__ as diffusers_version

from bench import cache_dit_peer
from bench.caching_report import FAILURE_PSNR_DB, PSNR_CAP_DB, write_report
from bench.flop_count import count_block_flops, projected_fraction
from bench.method import Method, select
from bench.peers import (
    calibrate_mag_cache,
    cache_dit_methods,
    diffusers_methods,
    fewer_steps_methods,
    per_branch_state,
    track_hook_cache_bytes,
)
from bench.speca_rows import speca_methods
from pipeline.config import ModelConfig, SampleRequest
from pipeline.generate import Generator
from pipeline.loading import load_pipeline, resolve_model_path
from pipeline.quality import psnr, ssim, temporal_flickering
from pipeline.tiny.worlds import World, world_of

CALIBRATION_SEED_OFFSET = 500_000  # calibration clips draw their seeds from the evaluation seeds + this on


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


def clear_verdicts(w: World, samples) -> list[dict[str, bool]]:
    """Per (uncached) clip and attribute: is the deciding measure clear of its threshold by the scorer's stated
    margin (world v2: `scorer_v2.clear`)? A scorer that states no margin (world v1's) counts every verdict clear."""
    clear = getattr(w.scorer, "clear", None)
    return [clear(s.frames, s.request.prompt) if clear else dict.fromkeys(w.scorer.ATTRIBUTES, True) for s in samples]


def structural_failures(prompts: list[str], psnrs: list[float], mine: list[dict[str, bool]],
                        ref_verdicts: list[dict[str, bool]], ref_clear: list[dict[str, bool]]) -> tuple[list[dict], int]:
    """The clips that fail structurally (`failure_rule`), each with its PSNR and the verdicts that count, and how
    many clips had a verdict turned from right to wrong on a threshold (the uncached clip within the margin)."""
    failures, on_threshold = [], 0
    for prompt, p, v, rv, c in zip(prompts, psnrs, mine, ref_verdicts, ref_clear):
        turned = sorted(a for a in v if rv[a] and not v[a])
        flipped = [a for a in turned if c[a]]
        on_threshold += len(turned) > len(flipped)
        if p < FAILURE_PSNR_DB or flipped:
            failures.append({"prompt": prompt, "psnr": p, "flipped": flipped})
    return failures, on_threshold


def failure_rule(w: World) -> str:
    """The structural-failure rule in words, with the margins it uses (for the report)."""
    rule = (f"a clip under {FAILURE_PSNR_DB:.0f} dB to its uncached clip, or a scorer verdict that turns from right "
            "(on the uncached clip) to wrong")
    margins = getattr(w.scorer, "MARGINS", None)
    if margins is None:
        return rule + f" (world {w.name}'s scorer states no margin: every such verdict counts)"
    return (rule + " where the uncached clip's deciding measure is clear of its threshold by the scorer's stated "
            f"margin (world {w.name}: " + ", ".join(f"{a} {m}" for a, m in margins.items())
            + "; `bench/results/scorer_margins_v2.md`). A verdict turned on a clip within the margin is the "
            "scorer's noise, counted apart as 'on a threshold'")


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
    ref_clear = reference.get("clear") or clear_verdicts(w, reference["samples"])
    mine = verdicts(w, samples)
    failures, on_threshold = structural_failures([s.request.prompt for s in samples], psnrs, mine, ref_verdicts,
                                                 ref_clear)
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
        "flips_on_threshold": on_threshold,
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
    reference["clear"] = clear_verdicts(w, reference["samples"])
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
        "failure_rule": failure_rule(w),
    }
    write_report(rows, meta, Path(args.out))


if __name__ == "__main__":
    main()
