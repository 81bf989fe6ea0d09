"""Where a SpeCa preset's clips leave the uncached trajectory, and what its check said there.

    python -m bench.speca_divergence [--presets v1-default,default] [--prompts 48] [--steps 50] [--clips 4]
                                     [--out bench/results/speca_divergence.md]

On the evaluation prompts (the caching benchmark's, same seeds), for each preset:
  1. the uncached run, keeping the latent after every step (the reference trajectory);
  2. the preset's run, keeping the latent after every step and every transformer call's inputs and output;
  3. at each accepted draft, the transformer called in full on that call's own inputs: the draft's true
     error, of each CFG branch's prediction and of the guided prediction the sampler steps with
     (`uncond + scale * (cond - uncond)`), beside the error SpeCa's check read and its threshold.
The report gives, per preset, the error ratios over all accepted drafts by phase of the run, and for its
failing clips (under the floor's 26 dB; else its worst `--clips`) the step at which the latent leaves the
uncached one and the step-by-step table. `v1-default` is the default preset as it was tuned on the bundled
model v1 (`bench.speca_rows.V1_DEFAULT`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.caching import describe_model, evaluation_requests
from bench.caching_report import FLOOR_WORST_DB
from bench.speca_rows import V1_DEFAULT
from pipeline.config import ModelConfig, SampleRequest
from pipeline.generate import Generator
from pipeline.loading import load_pipeline, resolve_model_path
from pipeline.quality import psnr
from pipeline.tiny.worlds import world_of
from speca import SpeCaConfig

LEAVES = 0.01  # a latent has left the uncached trajectory once its relative L2 distance to it exceeds this
PHASES = ((0, 15, "early (steps 0-14)"), (15, 35, "middle (15-34)"), (35, 10**6, "late (35-)"))
PRESETS = {"v1-default": V1_DEFAULT, **{name: SpeCaConfig.from_name(name) for name in ("default", "reference")}}


def machine_line() -> str:
    return (f"{platform.machine()} CPU ({os.cpu_count()} cores), {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}; fp32")


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row relative L2 distance of a to b."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp(min=1e-30)


@dataclass
class Capture:
    """What one generation of a batch went through: latents after each step, each transformer call."""

    latents: list[torch.Tensor] = field(default_factory=list)  # per step, (B, ...)
    calls: list[dict] = field(default_factory=list)  # per call: {"kwargs": ..., "out": ...}


@contextlib.contextmanager
def capture(pipe):
    """Record every scheduler step's new latent and every transformer call's inputs and output."""
    cap = Capture()
    scheduler, transformer = pipe.scheduler, pipe.transformer
    step = scheduler.step

    def stepped(*args, **kwargs):
        out = step(*args, **kwargs)
        cap.latents.append((out[0] if isinstance(out, tuple) else out.prev_sample).clone())
        return out

    def before(module, args, kwargs):
        cap.calls.append({"kwargs": {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}})

    def after(module, args, kwargs, out):
        cap.calls[-1]["out"] = (out[0] if isinstance(out, tuple) else out.sample).clone()

    scheduler.step = stepped
    handles = [transformer.register_forward_pre_hook(before, with_kwargs=True),
               transformer.register_forward_hook(after, with_kwargs=True)]
    try:
        yield cap
    finally:
        del scheduler.step
        for h in handles:
            h.remove()


def run(model, requests: list[SampleRequest], config: SpeCaConfig | None, batch: int) -> list[tuple[list, Capture]]:
    """Generate in batches: (samples, capture) per batch; SpeCa is off the transformer again on return."""
    gen = Generator(model, config)
    out = []
    try:
        for start in range(0, len(requests), batch):
            with capture(model.pipe) as cap:
                out.append((gen.generate(requests[start:start + batch], batch_size=batch), cap))
    finally:
        gen.close()
    return out


@torch.no_grad()
def true_errors(transformer, cap: Capture, patterns: list[str], scale: float) -> dict[str, np.ndarray]:
    """(sample, step) arrays of the accepted drafts' true errors (NaN where the step ran in full); the
    transformer must be uncached."""
    steps = len(patterns[0])
    calls_per_step = len(cap.calls) // steps
    out = {k: np.full((len(patterns), steps), np.nan) for k in ("cond", "uncond", "guided")}
    for step in range(steps):
        rows = [b for b, p in enumerate(patterns) if p[step] == "S"]
        if not rows:
            continue
        calls = cap.calls[step * calls_per_step:(step + 1) * calls_per_step]
        full = [transformer(**{**c["kwargs"], "return_dict": False})[0] for c in calls]
        drafted = [c["out"] for c in calls]
        branches = {"cond": _rel(drafted[0], full[0])}
        if calls_per_step == 2:
            branches["uncond"] = _rel(drafted[1], full[1])
            guided = [u + scale * (c - u) for c, u in (drafted, full)]
            branches["guided"] = _rel(guided[0], guided[1])
        else:
            branches["guided"] = branches["cond"]
        for key, value in branches.items():
            out[key][rows, step] = value[rows].numpy()
    return out


def analyse(model, requests, name: str, config: SpeCaConfig, reference: list, batch: int) -> dict:
    clips = []
    for i0, (samples, cap) in zip(range(0, len(requests), batch), run(model, requests, config, batch)):
        patterns = [s.stats.step_pattern for s in samples]
        errors = true_errors(model.pipe.transformer, cap, patterns, samples[0].request.true_cfg_scale)
        latents = torch.stack(cap.latents, dim=1)  # (B, steps, ...)
        for b, s in enumerate(samples):
            ref = reference[i0 + b]
            divergence = _rel(latents[b], ref["latents"]).numpy()
            checks, thresholds = iter(s.stats.spec_errors), iter(s.stats.spec_thresholds)
            steps = []
            for t, c in enumerate(s.stats.step_pattern):
                checked = c in "SR"
                steps.append({"step": t, "pattern": c, "check": next(checks) if checked else None,
                              "threshold": next(thresholds) if checked else None,
                              **{k: (None if np.isnan(v[b, t]) else float(v[b, t])) for k, v in errors.items()},
                              "divergence": float(divergence[t])})
            leaves = next((x["step"] for x in steps if x["divergence"] > LEAVES), None)
            clips.append({"index": i0 + b, "prompt": s.request.prompt, "psnr": psnr(s.frames, ref["frames"]),
                          "pattern": s.stats.step_pattern, "flops_ratio": s.stats.flops_ratio, "leaves": leaves,
                          "steps": steps})
        print(f"[bench.speca_divergence] {name}: {min(i0 + batch, len(requests))}/{len(requests)}", flush=True)
    return {"name": name, "config": config.to_dict(), "clips": clips}


def phase_table(clips: list[dict]) -> list[dict]:
    """Over all accepted drafts, per phase: median checked error and true errors, and their ratios."""
    rows = []
    for lo, hi, label in PHASES:
        accepted = [x for c in clips for x in c["steps"] if x["pattern"] == "S" and lo <= x["step"] < hi
                    and x["check"] and x["guided"] is not None]
        if not accepted:
            continue
        check = np.array([x["check"] for x in accepted])
        guided = np.array([x["guided"] for x in accepted])
        cond = np.array([x["cond"] for x in accepted])
        uncond = np.array([np.nan if x["uncond"] is None else x["uncond"] for x in accepted])
        rows.append({"phase": label, "drafts": len(accepted), "check": float(np.median(check)),
                     "cond": float(np.median(cond)), "uncond": float(np.nanmedian(uncond)) if not np.isnan(uncond).all()
                     else None, "guided": float(np.median(guided)),
                     "guided_over_check": float(np.median(guided / check)),
                     "guided_over_check_p90": float(np.percentile(guided / check, 90)),
                     "spearman": float(_spearman(check, guided))})
    return rows


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return spearmanr(x, y).statistic if len(x) > 2 else float("nan")


def _f(v, spec=".4f") -> str:
    return "" if v is None else format(v, spec)


def write_report(results: list[dict], meta: dict, out: Path, clips: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "results": results}, indent=1))
    lines = [
        "# Where SpeCa's clips leave the uncached trajectory",
        "",
        f"Command: `{meta['command']}`  ",
        f"Model: {meta['model']}  ",
        f"Machine: {meta['machine']}. {meta['prompts']} evaluation prompts of `bench.caching` (same seeds), "
        f"{meta['steps']} steps, batch {meta['batch']}.  ",
        f"Every figure, every step of every clip: `{out.with_suffix('.json').name}`.",
        "",
        "Errors are relative (L1 for SpeCa's check, as its `rel_l1` metric reads it; L2 for the true errors). "
        "**check**: what SpeCa's check read at that step (its verified block's or its prediction's error, per its "
        "config); **cond / uncond / guided**: the accepted draft's true error, its prediction against the "
        "transformer run in full on the same inputs, per CFG branch and for the guided prediction the sampler "
        "steps with; **divergence**: the latent after the step against the uncached run's (relative L2); a clip "
        f"*leaves* the uncached trajectory at the first step where this exceeds {LEAVES}.",
        "",
    ]
    analysis = out.with_name(f"{out.stem}_analysis.md")
    if analysis.is_file():
        lines += ["## Analysis", "", f"(`{analysis.name}`, written from the run it names.)", "",
                  analysis.read_text().strip(), ""]
    for res in results:
        cl = res["clips"]
        ps = np.array([c["psnr"] for c in cl])
        lines += [f"## `{res['name']}`", "",
                  f"Config: `{json.dumps({k: v for k, v in res['config'].items()})}`  ",
                  f"FLOPs speedup {1 / np.mean([c['flops_ratio'] for c in cl]):.2f}x (SpeCa's own count); PSNR to "
                  f"the uncached clips mean {np.mean(np.minimum(ps, 100)):.1f}, p10 "
                  f"{np.percentile(ps, 10, method='lower'):.1f}, worst {ps.min():.1f} dB; "
                  f"{int((ps < FLOOR_WORST_DB).sum())} clips under {FLOOR_WORST_DB:.0f} dB.", "",
                  "Accepted drafts, medians by phase:", "",
                  "| phase | drafts | check | cond true | uncond true | guided true | guided / check | p90 | "
                  "Spearman(check, guided) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['phase']} | {r['drafts']} | {r['check']:.4f} | {r['cond']:.4f} | {_f(r['uncond'])} | "
                  f"{r['guided']:.4f} | "
                  f"{r['guided_over_check']:.1f} | {r['guided_over_check_p90']:.1f} | {r['spearman']:.2f} |"
                  for r in phase_table(cl)]
        lines.append("")
        failing = [c for c in sorted(cl, key=lambda c: c["psnr"]) if c["psnr"] < FLOOR_WORST_DB]
        shown = failing or sorted(cl, key=lambda c: c["psnr"])[:clips]
        lines += [f"{'Clips under the floor' if failing else f'Its {clips} worst clips'}:", ""]
        for c in shown:
            lines += [f"### clip {c['index']}: {c['psnr']:.1f} dB, leaves the uncached trajectory at step "
                      f"{c['leaves']}", "", f"{c['prompt']}; pattern `{c['pattern']}`", "",
                      "| step | | check | threshold | cond true | uncond true | guided true | divergence |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {x['step']} | {x['pattern']} | {_f(x['check'])} | {_f(x['threshold'])} | {_f(x['cond'])} | "
                      f"{_f(x['uncond'])} | {_f(x['guided'])} | {x['divergence']:.4f} |" for x in c["steps"]]
            lines.append("")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:40]))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m bench.speca_divergence", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--presets", default="v1-default,default",
                        help=f"comma-separated, from {sorted(PRESETS)} (default: v1-default,default)")
    parser.add_argument("--prompts", type=int, default=48, help="evaluation prompts (default: 48)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--clips", type=int, default=4, help="worst clips shown when none is under the floor")
    parser.add_argument("--out", default="bench/results/speca_divergence.md")
    args = parser.parse_args(argv)
    names = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = sorted(set(names) - set(PRESETS))
    if unknown or not names:
        parser.error(f"--presets {args.presets!r}: unknown {unknown}; expected names from {sorted(PRESETS)}")
    model = load_pipeline(ModelConfig(model=args.model, device="cpu"))
    requests = evaluation_requests(world_of(resolve_model_path(args.model)), args.prompts, args.steps)
    reference = []
    for samples, cap in run(model, requests, None, args.batch):
        latents = torch.stack(cap.latents, dim=1)
        reference += [{"frames": s.frames, "latents": latents[b]} for b, s in enumerate(samples)]
    print("[bench.speca_divergence] uncached reference done", flush=True)
    results = [analyse(model, requests, name, PRESETS[name], reference, args.batch) for name in names]
    meta = {"command": "python -m bench.speca_divergence" + (" " + " ".join(argv) if argv else ""),
            "model": describe_model(model), "machine": machine_line(), "prompts": args.prompts,
            "steps": args.steps, "batch": args.batch}
    write_report(results, meta, Path(args.out), args.clips)


if __name__ == "__main__":
    main()
