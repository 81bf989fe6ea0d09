"""Tuning SpeCa presets on calibration prompts: any SpeCa configs, one table of speed and quality.

    python -m bench.speca_sweep --prompts 96 --out bench/results/speca_tuning_v2.md \\
        "default" "v1-default" "w9=default+warmup_steps=9" "leader=default+cfg_branches=leader"

Each config is `name=preset+field=value,field=value` (`preset` alone names itself; `v1-default` is the
default as tuned on the bundled model v1). Every config runs on the same held-out calibration prompts
and seeds (never an evaluation prompt of `bench.caching`), batch 8, against the uncached clips: FLOPs
speedup (SpeCa's own count, which `tests/test_speca_hunyuan.py` checks against the counted FLOPs), mean /
p10 / worst PSNR, clips under 26 dB, structural failures (`bench.caching.structural_failures`) and the
full steps per sample. Presets are picked here; `bench.caching` then judges them on the evaluation prompts.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bench.caching import (calibration_requests, clear_verdicts, describe_model, evaluation_requests,
                           structural_failures)
from bench.caching_report import FLOOR_MEAN_DB, FLOOR_WORST_DB
from bench.speca_rows import V1_DEFAULT
from pipeline.config import ModelConfig
from pipeline.generate import Generator
from pipeline.loading import load_pipeline, resolve_model_path
from pipeline.quality import psnr
from pipeline.tiny.worlds import world_of
from speca import SpeCaConfig


def parse_config(spec: str) -> tuple[str, SpeCaConfig]:
    """`name=preset+field=value,...` -> (name, config); values are JSON (`inf` allowed)."""
    name, _, body = spec.partition("=") if "=" in spec.split("+")[0] else (spec, "", spec)
    preset, _, changes = body.partition("+")
    base = V1_DEFAULT if preset == "v1-default" else SpeCaConfig.from_name(preset)
    fields = {}
    for item in filter(None, changes.split(",")):
        key, _, value = item.partition("=")
        try:
            fields[key] = math.inf if value == "inf" else json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value  # a word: cfg_branches=pooled
    return name, base.replace(**fields)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m bench.speca_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", help="name=preset+field=value,... (see above)")
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--prompts", type=int, default=96, help="calibration prompts (default: 96)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default="bench/results/speca_tuning_v2.md")
    args = parser.parse_args(argv)
    try:
        configs = [parse_config(c) for c in args.configs]
    except (ValueError, TypeError) as e:
        parser.error(str(e))
    model = load_pipeline(ModelConfig(model=args.model, device="cpu"))
    w = world_of(resolve_model_path(args.model))
    evaluation = {r.prompt for r in evaluation_requests(w, 48, args.steps)}
    requests = calibration_requests(w, args.prompts, args.steps, evaluation)
    reference = Generator(model).generate(requests)
    ref_verdicts = [w.score(s.frames, s.request.prompt) for s in reference]
    ref_clear = clear_verdicts(w, reference)
    rows = []
    for name, config in configs:
        gen = Generator(model, config)
        try:
            samples = gen.generate(requests)
        finally:
            gen.close()
        psnrs = np.array([psnr(s.frames, r.frames) for s, r in zip(samples, reference)])
        failures, _ = structural_failures([r.prompt for r in requests], psnrs.tolist(),
                                          [w.score(s.frames, s.request.prompt) for s in samples], ref_verdicts,
                                          ref_clear)
        full = [s.stats.full_steps + s.stats.spec_rejected for s in samples]
        row = {"name": name, "config": config.to_dict(),
               "speedup": 1 / float(np.mean([s.stats.flops_ratio for s in samples])),
               "mean": float(np.mean(np.minimum(psnrs, 100))), "p10": float(np.percentile(psnrs, 10, method="lower")),
               "worst": float(psnrs.min()), "under_26": int((psnrs < FLOOR_WORST_DB).sum()),
               "failures": len(failures), "full_steps": [min(full), float(np.mean(full)), max(full)],
               "psnr_all": psnrs.tolist()}
        rows.append(row)
        print(f"[bench.speca_sweep] {name}: {row['speedup']:.2f}x, mean {row['mean']:.1f}, worst {row['worst']:.1f}",
              flush=True)
    write_report(rows, {"command": "python -m bench.speca_sweep " + " ".join(argv), "model": describe_model(model),
                        "prompts": [r.prompt for r in requests], "steps": args.steps}, Path(args.out))


def write_report(rows: list[dict], meta: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    default = SpeCaConfig().to_dict()
    lines = [f"# SpeCa configs on {len(meta['prompts'])} calibration prompts", "",
             f"Command: `{meta['command']}`  ", f"Model: {meta['model']}  ",
             f"{meta['steps']} steps, batch 8, held-out calibration prompts (none of them an evaluation prompt of "
             f"`bench.caching`). Floor: mean >= {FLOOR_MEAN_DB:.0f} dB and worst >= {FLOOR_WORST_DB:.0f} dB. "
             f"Per-sample PSNRs: `{out.with_suffix('.json').name}`.", "",
             "| config | changes from SpeCaConfig() | FLOPs speedup | PSNR mean | p10 | worst | clips < 26 dB | "
             "structural failures | full steps min/mean/max | above the floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        changes = ", ".join(f"{k}={v}" for k, v in r["config"].items() if default[k] != v) or "none"
        above = r["mean"] >= FLOOR_MEAN_DB and r["worst"] >= FLOOR_WORST_DB
        lo, mean, hi = r["full_steps"]
        lines.append(f"| {r['name']} | {changes} | {r['speedup']:.2f}x | {r['mean']:.1f} | {r['p10']:.1f} | "
                     f"{r['worst']:.1f} | {r['under_26']} | {r['failures']} | {lo}/{mean:.1f}/{hi} | "
                     f"{'yes' if above else 'no'} |")
    analysis = out.with_name(out.stem + "_analysis.md")
    if analysis.exists():  # the reading, written by hand after the run
        lines += ["", analysis.read_text().strip()]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
