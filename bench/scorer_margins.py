"""How far uncached clips sit from the tiny world's scorer thresholds, and how far a verdict's deciding measure moves
when the clip barely changes: the margin `bench.caching`'s structural-failure rule uses.

World v2 (the bundled model; `bench/results/scorer_margins_v2.md`): for every attribute (count, colour, shape,
motion, background), `scorer_v2.verdict_gaps` gives the distance of the clip's deciding measure from the threshold
that would turn the verdict. Uncached clips on calibration prompts are generated again with fewer plain steps (no
caching method involved); over the pairs that stay close (PSNR >= 32 dB, the floor's mean), the shift of each
measure (the change in gap, or both gaps added where the verdict turned) is the scorer's noise. Its maximum,
rounded up, is the margin `scorer_v2.MARGINS` states; a verdict flip on a clip whose uncached measure is within it
is the scorer's, not the method's.

    python -m bench.scorer_margins --out bench/results/scorer_margins_v2.md

World v1 (`--model pipeline/tiny/model_v1`; `bench/results/scorer_margins.md`): the two shape measures behind the
verdict (`scorer.Estimate.fill` and `.skew`) on the uncached evaluation clips and under SpeCa presets.

    python -m bench.scorer_margins --model pipeline/tiny/model_v1 --presets default,subset --out bench/results/scorer_margins.md
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.config import ModelConfig
from pipeline.generate import Generator
from pipeline.loading import load_pipeline, resolve_model_path
from pipeline.quality import psnr
from pipeline.tiny import scorer, scorer_v2
from pipeline.tiny.worlds import world_of
from speca import SpeCaConfig

from .caching import calibration_requests, evaluation_requests

NEAR = 0.01  # world v1: a shape measure this close to its threshold is "on the threshold"
CLOSE_DB = 32.0  # world v2: a pair of clips this close (PSNR) is the same clip by the quality floor's mean


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled", help="'bundled' (world v2) or a model folder of world v1 or v2")
    parser.add_argument("--prompts", type=int, default=48, help="held-out prompts (default: 48)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default: 50)")
    parser.add_argument("--fewer-steps", default="45,40",
                        help="world v2: the plain step counts whose clips perturb the uncached ones (default: 45,40)")
    parser.add_argument("--presets", default="default,subset", help="world v1: SpeCa presets, comma-separated")
    parser.add_argument("--out", default="bench/results/scorer_margins_v2.md")
    parser.add_argument("--render", action="store_true",
                        help="world v2: rewrite the report (--out) from its JSON against the current MARGINS; runs nothing")
    args = parser.parse_args(argv)
    if args.render:
        return render_v2(json.loads(Path(args.out).with_suffix(".json").read_text()), Path(args.out))
    w = world_of(resolve_model_path(args.model))
    if w.scorer is scorer_v2:
        return v2_margins(args, w)
    if w.scorer is not scorer:
        parser.error(f"--model is a world {w.name} model; the margins are for worlds v1 and v2")
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        SpeCaConfig.from_name(p)  # a bad name fails here, before any compute
    v1_margins(args, w, presets)


def _generate(model, requests) -> list:
    gen = Generator(model)
    try:
        return gen.generate(requests, batch_size=8)
    finally:
        gen.close()


def measure_shifts(ref: dict[str, float], ref_right: dict[str, bool], new: dict[str, float],
                   new_right: dict[str, bool]) -> dict[str, float]:
    """Per attribute, how far the deciding measure moved between two clips, from their gaps: the change in gap,
    or both gaps added where the verdict turned (the measure crossed its threshold)."""
    return {a: ref[a] + new[a] if ref_right[a] != new_right[a] else abs(ref[a] - new[a]) for a in ref}


def v2_margins(args, w) -> None:
    counts = [int(n) for n in args.fewer_steps.split(",") if n]
    model = load_pipeline(ModelConfig(model=args.model, device="cpu"))
    evaluation = {r.prompt for r in evaluation_requests(w, args.prompts, args.steps)}
    requests = calibration_requests(w, args.prompts, args.steps, evaluation)
    print(f"[bench.scorer_margins] no cache on {len(requests)} calibration clips", flush=True)
    ref = _generate(model, requests)
    judged = [(scorer_v2.verdict_gaps(s.frames, r.prompt), scorer_v2.score(s.frames, r.prompt))
              for s, r in zip(ref, requests)]
    pairs = []
    for n in counts:
        print(f"[bench.scorer_margins] {n} steps", flush=True)
        out = _generate(model, [replace(r, num_inference_steps=n) for r in requests])
        for i, (s, r) in enumerate(zip(out, ref)):
            prompt = requests[i].prompt
            gaps, right = scorer_v2.verdict_gaps(s.frames, prompt), scorer_v2.score(s.frames, prompt)
            pairs.append({"steps": n, "clip": i, "psnr": psnr(s.frames, r.frames),
                          "shift": measure_shifts(*judged[i], gaps, right),
                          "turned": [a for a in right if right[a] != judged[i][1][a]]})
    data = {"command": (f"python -m bench.scorer_margins --prompts {args.prompts} --steps {args.steps} "
                        f"--fewer-steps {args.fewer_steps} --out {args.out}"),
            "model": args.model, "steps": args.steps, "fewer_steps": counts,
            "prompts": [r.prompt for r in requests], "uncached_gaps": [g for g, _ in judged], "pairs": pairs}
    Path(args.out).with_suffix(".json").write_text(json.dumps(data, indent=1))
    render_v2(data, Path(args.out))


def render_v2(data: dict, out: Path) -> None:
    """The v2 report from its JSON, judged against the margins `scorer_v2.MARGINS` states now."""
    pairs, gaps, counts = data["pairs"], data["uncached_gaps"], data["fewer_steps"]
    close = [p for p in pairs if p["psnr"] >= CLOSE_DB]
    lines = ["# The v2 scorer's margins: how far a verdict's deciding measure moves when the clip barely changes", "",
             f"Command: `{data['command']}`  ",
             f"Model: `{data['model']}` (world v2), {len(gaps)} held-out calibration prompts of `bench.caching` (none "
             f"an evaluation prompt), {data['steps']} steps; perturbed by {', '.join(map(str, counts))} plain steps.",
             "",
             "Deciding measures (`scorer_v2.verdict_gaps`; a scene's is its closest object's): count and colour, the "
             "share of frames that would have to change for a colour's piece count (median over frames) to change; "
             "shape, the best shape's mean IoU lead over the runner-up; motion, px per frame (at 32 px) to the "
             "nearest of the still, axis and pace thresholds; background, the background colour's border share lead.",
             "",
             f"Close pairs: PSNR >= {CLOSE_DB:.0f} dB to the uncached clip (**{len(close)} of {len(pairs)}**). A "
             "measure's shift: the change in its gap, or both gaps added where the verdict turned. The stated margin "
             "(`scorer_v2.MARGINS`) is to be at least the largest shift of a close pair: a verdict flip on a clip "
             "whose uncached measure is within it is the scorer's noise, not the method's.", "",
             "| attribute | close pairs' shift median / p90 / max | stated margin | covers the max | uncached clips "
             "within the margin | verdicts turned in close pairs | of them, uncached measure within the margin |",
             "|---|---|---|---|---|---|---|"]
    for a in scorer_v2.ATTRIBUTES:
        x = np.array([p["shift"][a] for p in close if math.isfinite(p["shift"][a])] or [0.0])
        margin = scorer_v2.MARGINS[a]
        turned = [p for p in close if a in p["turned"]]
        lines.append(f"| {a} | {np.median(x):.3f} / {np.percentile(x, 90):.3f} / {x.max():.3f} | {margin} | "
                     f"{'yes' if margin >= x.max() else '**no**'} | {sum(g[a] < margin for g in gaps)} of {len(gaps)} | "
                     f"{len(turned)} | {sum(gaps[p['clip']][a] < margin for p in turned)} |")
    lines += ["", "PSNR of the perturbed clips to the uncached ones (median / min): " + "; ".join(
        f"{n} steps {np.median([p['psnr'] for p in pairs if p['steps'] == n]):.1f} / "
        f"{min(p['psnr'] for p in pairs if p['steps'] == n):.1f} dB" for n in counts), ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))


def v1_margins(args, w, presets: list[str]) -> None:
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
             f"Command: `python -m bench.scorer_margins --model {args.model} --presets {args.presets} --out {args.out}`  ",
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
