"""How far the v1 model's (`pipeline/tiny/model_v1`) uncached clips sit from the shape scorer's thresholds, and which
verdicts a SpeCa preset flips.

`bench.caching` counts a clip the tiny world's scorer judges otherwise than its uncached clip as a
structural failure. This shows whether such a flip is a changed clip or a verdict on a threshold:
for every evaluation clip, the two shape measures behind the verdict (`scorer.Estimate.fill` and
`.skew`) on the uncached clip and under each preset, against the thresholds.

    python -m bench.scorer_margins --presets default,subset --out bench/results/scorer_margins.md
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from pipeline.config import ModelConfig
from pipeline.generate import Generator
from pipeline.loading import load_pipeline, resolve_model_path
from pipeline.quality import psnr
from pipeline.tiny import scorer
from pipeline.tiny.build import V1_MODEL_DIR
from pipeline.tiny.worlds import world_of
from speca import SpeCaConfig

from .caching import evaluation_requests

NEAR = 0.01  # a measure this close to its threshold is "on the threshold"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(V1_MODEL_DIR),
                        help="a model folder trained on world v1 (default: pipeline/tiny/model_v1, the first bundled model)")
    parser.add_argument("--prompts", type=int, default=48, help="held-out evaluation prompts (default: 48)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--presets", default="default,subset", help="SpeCa presets, comma-separated")
    parser.add_argument("--out", default="bench/results/scorer_margins.md")
    args = parser.parse_args(argv)
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        SpeCaConfig.from_name(p)  # a bad name fails here, before any compute
    w = world_of(resolve_model_path(args.model))
    if w.scorer is not scorer:
        parser.error(f"--model is a world {w.name} model; the margins are for world v1's shape scorer")

    model = load_pipeline(ModelConfig(model=args.model, device="cpu"))
    requests = evaluation_requests(w, args.prompts, args.steps)
    print(f"[bench.scorer_margins] no cache on {len(requests)} clips", flush=True)
    gen = Generator(model)
    ref = gen.generate(requests, batch_size=8)
    gen.close()
    ref_est = [scorer.estimate(s.frames) for s in ref]
    runs = {}
    for name in presets:
        print(f"[bench.scorer_margins] SpeCa {name}", flush=True)
        gen = Generator(model, SpeCaConfig.from_name(name))
        out = gen.generate(requests, batch_size=8)
        gen.close()
        runs[name] = [(scorer.estimate(s.frames), psnr(s.frames, r.frames)) for s, r in zip(out, ref)]

    near = [i for i, e in enumerate(ref_est) if e.shape_margin < NEAR]
    lines = ["# The v1 shape scorer's thresholds and the clips on them", "",
             f"Command: `python -m bench.scorer_margins --presets {args.presets} --out {args.out}`  ",
             f"Model: `{args.model}` (world v1), {len(requests)} held-out evaluation prompts and seeds of "
             f"`bench.caching`, {args.steps} steps.", "",
             f"Shape rule: skew > {scorer.SKEW_TRIANGLE} is a triangle; else fill > {scorer.FILL_SQUARE} is a "
             "square, else a circle (medians over frames). Distance: how far the deciding measure is from its "
             f"threshold. On a threshold: closer than {NEAR}.", "",
             f"Uncached clips on a threshold: **{len(near)} of {len(requests)}**.", "",
             "| preset | shape verdicts flipped | of them, uncached clip on a threshold | uncached distance of the "
             "flipped clips | fill shift median / p90 / max (all clips) |",
             "|---|---|---|---|---|"]
    detail = []
    summary = {}
    for name, res in runs.items():
        flips = [i for i, (e, _) in enumerate(res) if e.shape != ref_est[i].shape]
        shifts = np.array([abs(e.fill - r.fill) for (e, _), r in zip(res, ref_est)
                           if not (math.isnan(e.fill) or math.isnan(r.fill))])
        on = [i for i in flips if i in near]
        dist = ", ".join(f"{ref_est[i].shape_margin:.3f}" for i in flips) or "-"
        lines.append(f"| {name} | {len(flips)} | {len(on)} | {dist} | {np.median(shifts):.3f} / "
                     f"{np.percentile(shifts, 90):.3f} / {shifts.max():.3f} |")
        summary[name] = {"flips": flips, "on_threshold": on, "fill_shift_max": float(shifts.max())}
        for i in flips:
            e, p = res[i]
            r = ref_est[i]
            detail.append(f"- {name}: {requests[i].prompt} ({p:.1f} dB): uncached {r.shape} (fill {r.fill:.3f}, "
                          f"skew {r.skew:.3f}) -> {e.shape} (fill {e.fill:.3f}, skew {e.skew:.3f})")
    lines += ["", "## Flipped clips", "", *detail, ""]
    Path(args.out).write_text("\n".join(lines))
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"prompts": [r.prompt for r in requests], "near": near, "presets": summary,
         "uncached": [{"shape": e.shape, "fill": e.fill, "skew": e.skew} for e in ref_est]}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
