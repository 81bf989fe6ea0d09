"""The scoring stage: VBench, fidelity to an uncached reference, and the run's evaluation report.

    python -m jobs.score --run ./outputs [--reference ./outputs-nocache] [--dimensions temporal_flickering]
    python -m jobs.generate ... --score [--reference URL] [--dimensions ...]    # as the job's second stage
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.score --run s3://bucket/run-42

It reads the run's run.json, stats/ and videos/ (any fsspec URL) and writes into the run folder:
  report/index.html, report/report.md   readable without a server; videos linked relatively
  report/*.png                          step allocation, per-step acceptance, speed vs quality
  report/scores.json, scores.parquet    per-sample and aggregate scores, machine-readable
  report/vbench_eval_results.json       vbench's own result file (mean and per-video value per dimension)

VBench runs the real `vbench` package in a virtualenv of its own (its pins clash with
diffusers): built once on first use, or beforehand with `--prepare-env` (see jobs/vbench_env.py
for offline clusters). Weights come from $VBENCH_CACHE_DIR; a dimension whose weights are
missing fails before any work, listing the files needed. Only temporal_flickering needs none.

Fidelity (with --reference: the same manifest and seeds generated with --speca off): per-video
PSNR and SSIM, per frame in [0, 1] then averaged, as the caching papers report them.
Weight-free extras: VBench's temporal-flickering formula computed here on the decoded frames, and
the tiny model's adherence scorer when the run used the bundled model.

Exit status: 0 scored; 1 scoring failed (vbench error); 2 bad arguments, unreachable storage,
not a run folder, or missing VBench weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.loading import bundled_model_dir
from pipeline.stats import SampleStats, from_table, read_stats
from pipeline.storage import Storage, StorageError
from pipeline.tiny.worlds import World, world_of
from pipeline.video_io import decode_mp4
from pipeline.writer import video_path

from . import vbench_env
from .report import ReportInputs, fidelity_rows, fmt, run_rows, write_report
from .strips import frame_strip
from .vbench_scores import aggregate

DEFAULT_DIMENSIONS = ("temporal_flickering",)
DEFAULT_GALLERY = 48


class ScoreError(Exception):
    """The stage cannot score this run; the message names what is wrong."""


def add_score_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by `jobs.score` and `jobs.generate --score`."""
    group = parser.add_argument_group("scoring")
    group.add_argument("--reference", default=None,
                       help="an uncached run (same manifest and seeds, --speca off) to measure fidelity against")
    group.add_argument("--dimensions", default=",".join(DEFAULT_DIMENSIONS),
                       help="comma-separated VBench dimensions, or 'none' to skip VBench "
                            f"(default: {','.join(DEFAULT_DIMENSIONS)}; all of {', '.join(vbench_env.DIMENSIONS)} "
                            "except the six that need VBench's own prompts)")
    group.add_argument("--vbench-env", default=None,
                       help="VBench virtualenv folder, built there if missing "
                            f"(default: $SPECA_VBENCH_ENV or {vbench_env.default_env_dir()})")
    group.add_argument("--vbench-device", default="cpu", help="device for vbench's models (cpu or cuda)")
    group.add_argument("--gallery", type=int, default=DEFAULT_GALLERY,
                       help="how many clips the report shows as frame strips, worst first (lowest PSNR to the "
                            "reference, else lowest VBench score, else lowest temporal-flickering score); "
                            f"0 for none (default: {DEFAULT_GALLERY})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="./outputs", help="the run folder or fsspec URL (default: ./outputs)")
    parser.add_argument("--storage-options", type=json.loads, default=None,
                        help='JSON for the fsspec filesystem, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    parser.add_argument("--prepare-env", action="store_true",
                        help="only build the VBench environment (for images and offline clusters), then exit")
    add_score_arguments(parser)
    return parser


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_dimensions(text: str) -> list[str]:
    if text.strip().lower() in ("", "none"):
        return []
    dims = [d.strip() for d in text.split(",") if d.strip()]
    vbench_env.check_dimensions(dims)
    return list(dict.fromkeys(dims))


def _open_run(url: str, options: dict | None, what: str) -> tuple[Storage, dict, list[SampleStats]]:
    storage = Storage(url, options)
    try:
        storage.check()
    except StorageError as e:
        raise ScoreError(f"{what} {url}: storage unreachable ({e})") from e
    if not storage.exists("run.json"):
        raise ScoreError(f"{what} {url}: not a run folder (no run.json); run `python -m jobs.generate --output {url}` "
                         "first")
    record = json.loads(storage.read_bytes("run.json"))
    samples = [s for s in from_table(read_stats(storage)) if s.status == "ok"]
    if not samples:
        raise ScoreError(f"{what} {url}: no generated samples (stats/ holds no ok rows)")
    return storage, record, sorted(samples, key=lambda s: s.id)


def _read_video(storage: Storage, sample_id: str, what: str) -> bytes:
    try:
        return storage.read_bytes(video_path(sample_id))
    except FileNotFoundError as e:
        raise ScoreError(f"{what} {storage.url}: sample {sample_id!r} has stats but no video at "
                         f"{video_path(sample_id)}") from e


def _adherence(w: World, frames: np.ndarray, prompt: str) -> dict[str, float]:
    try:
        result = w.score(frames, prompt)
    except ValueError:  # prompt outside the tiny world's grammar
        return {}
    return {**{f"adherence_{k}": float(v) for k, v in result.items()}, "adherence_all": float(all(result.values()))}


def _reference_href(run_url: str, reference_url: str) -> str | None:
    """Where the report (at <run>/report/) finds the reference's videos: relative for local folders, else the URL
    when a browser can open it (http), else None (s3:// links do not open in a browser)."""
    if "://" not in run_url and "://" not in reference_url:
        return os.path.relpath(Path(reference_url).resolve() / "videos", Path(run_url).resolve() / "report")
    if reference_url.startswith(("http://", "https://")):
        return reference_url.rstrip("/") + "/videos"
    return None


def _device_seconds(s: SampleStats, ranks: int) -> float:
    """Accelerator (or CPU process) seconds one video cost: its batch's text, denoise and decode wall time times the
    ranks that ran it, shared by the batch's samples."""
    return (s.seconds_text + s.seconds_denoise + s.seconds_decode) * ranks / max(s.batch_size, 1)


def score_run(args) -> dict:
    """Score one run; returns the summary written to report/scores.json."""
    from pipeline.quality import psnr, ssim, temporal_flickering  # torch: the job's driver imports this module

    if args.gallery < 0:
        raise ScoreError(f"--gallery {args.gallery}: expected 0 (no gallery) or a positive number of clips")
    dims = parse_dimensions(args.dimensions)
    vbench_env.check_weights(dims)  # before any download or environment build
    storage, record, samples = _open_run(args.run, args.storage_options, "--run")
    reference = None
    if args.reference:
        ref_storage, _, ref_samples = _open_run(args.reference, args.storage_options, "--reference")
        reference = (ref_storage, {s.id: s for s in ref_samples})
        for s in samples:
            r = reference[1].get(s.id)
            if r is None:
                raise ScoreError(f"--reference {args.reference}: sample {s.id!r} is not in the reference run")
            if (r.prompt, r.seed) != (s.prompt, s.seed):
                raise ScoreError(f"--reference: sample {s.id!r} differs from the run (prompt/seed "
                                 f"{(r.prompt, r.seed)} vs {(s.prompt, s.seed)}); the reference must use the same "
                                 "manifest and seeds")
        cached_refs = sorted(r.id for r in ref_samples if r.method != "none")
        if cached_refs:
            _log(f"[jobs.score] warning: reference samples {cached_refs[:5]} were generated with caching; fidelity is "
                 "then measured against a cached run")
    lpips_missing = vbench_env.missing_lpips_weights() if reference is not None else []
    want_lpips = reference is not None and not lpips_missing
    python = None
    if dims or want_lpips:
        python = vbench_env.ensure_env(Path(args.vbench_env or vbench_env.default_env_dir()), log=_log)

    world = world_of(bundled_model_dir()) if record.get("model") == "bundled" else None
    ranks = int((record.get("config") or {}).get("ranks_per_replica") or 1)
    rows = []
    strips, ref_strips = {}, {}  # JPEG bytes per id; a few KB each, written only for the clips the gallery shows
    with tempfile.TemporaryDirectory(prefix="speca-score-") as tmp:
        videos, ref_videos = Path(tmp) / "videos", Path(tmp) / "reference"
        videos.mkdir()
        ref_videos.mkdir()
        started = time.time()
        for i, s in enumerate(samples):
            data = _read_video(storage, s.id, "--run")
            (videos / f"{s.id}.mp4").write_bytes(data)
            frames = decode_mp4(data).frames
            row = {"id": s.id, "prompt": s.prompt, "seed": s.seed, "method": s.method,
                   "num_inference_steps": s.num_inference_steps, "step_pattern": s.step_pattern,
                   "full_steps_used": s.full_steps + s.spec_rejected, "spec_accepted": s.spec_accepted,
                   "flops_speedup": 1.0 / s.flops_ratio if s.flops_ratio > 0 else math.nan,
                   "seconds_denoise": s.seconds_denoise, "device_seconds": _device_seconds(s, ranks),
                   "peak_memory_bytes": s.peak_memory_bytes, "cache_bytes": s.cache_bytes,
                   "flicker": temporal_flickering(frames)}
            strips[s.id] = frame_strip(frames)
            if reference is not None:
                ref_data = _read_video(reference[0], s.id, "--reference")
                (ref_videos / f"{s.id}.mp4").write_bytes(ref_data)
                ref_frames = decode_mp4(ref_data).frames
                if ref_frames.shape != frames.shape:
                    raise ScoreError(f"--reference: video {s.id!r} is {ref_frames.shape}, the run's is {frames.shape}")
                row["psnr"], row["ssim"] = psnr(frames, ref_frames), ssim(frames, ref_frames)
                row["identical_to_reference"] = bool(math.isinf(row["psnr"]))
                ref_strips[s.id] = frame_strip(ref_frames)
            if world is not None:
                row.update(_adherence(world, frames, s.prompt))
                if reference is not None and "adherence_all" in row:
                    row["reference_adherence_all"] = _adherence(world, ref_frames, s.prompt)["adherence_all"]
            rows.append(row)
            if (i + 1) % 10 == 0 or i + 1 == len(samples):
                _log(f"[jobs.score] decoded and measured {i + 1}/{len(samples)} videos ({time.time() - started:.0f} s)")
        vbench_result = {}
        if dims:
            vbench_result = vbench_env.run_vbench(python, videos, {f"{s.id}.mp4": s.prompt for s in samples}, dims,
                                                  Path(tmp) / "work", device=args.vbench_device, log=_log)
        scores = pd.DataFrame(rows)
        if vbench_result:
            # vbench's own result file, with its temporary video paths replaced by the run's.
            raw = {d: [mean, [{**v, "video_path": video_path(Path(v["video_path"]).stem)} for v in per_video]]
                   for d, (mean, per_video) in vbench_result.items()}
            storage.write_bytes("report/vbench_eval_results.json", (json.dumps(raw, indent=2) + "\n").encode())
        if want_lpips:
            _log(f"[jobs.score] LPIPS on {len(samples)} video pairs")
            lpips = vbench_env.run_lpips(python, [(s.id, str(videos / f"{s.id}.mp4"), str(ref_videos / f"{s.id}.mp4"))
                                                  for s in samples], Path(tmp) / "lpips", device=args.vbench_device,
                                         log=_log)
            scores["lpips"] = [lpips[i] for i in scores["id"]]
        means = {}
        for dim in dims:
            per_video = {Path(v["video_path"]).stem: v["video_results"] for v in vbench_result[dim][1]}
            scores[f"vbench_{dim}"] = [per_video.get(i, math.nan) for i in scores["id"]]
            means[dim] = float(vbench_result[dim][0])
        summary = _summary(args, record, scores, means, reference is not None, lpips_missing)
        report_dir = Path(tmp) / "report"
        inputs = ReportInputs(strips=strips, reference_strips=ref_strips, gallery=args.gallery,
                              reference_videos_href=_reference_href(args.run, args.reference) if args.reference
                              else None)
        written = write_report(scores, summary, report_dir, inputs)
        for name in written:
            storage.write_bytes(f"report/{name}", (report_dir / name).read_bytes())
    scores_json = json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n"
    storage.write_bytes("report/scores.json", scores_json.encode())
    storage.write_parquet("report/scores.parquet", pa.Table.from_pandas(scores, preserve_index=False))
    return summary


def _jsonable(v):
    """Strict JSON: numpy scalars as Python numbers, non-finite floats as null (see identical_to_reference)."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _finite(values) -> list[float]:
    """The videos that differ from the reference (identical ones have infinite PSNR)."""
    return [x for x in values if math.isfinite(x)]


def _finite_stat(values, stat) -> float | None:
    v = _finite(values)
    return float(stat(v)) if v else None


def _summary(args, record: dict, scores: pd.DataFrame, means: dict[str, float], has_reference: bool,
             lpips_missing: list[str]) -> dict:
    config = record.get("config") or {}
    total_flops_speedup = float(len(scores) / np.sum(1.0 / scores["flops_speedup"]))
    device = sorted({str(p.get("device")) for p in record.get("replicas") or [] if p.get("device")})
    run = {"output": record.get("output", args.run), "model": record.get("model"), "samples": len(scores),
           "speca": "on" if config.get("speca") else "off",
           "FLOPs speedup (run)": total_flops_speedup,
           "FLOPs saved": 1.0 - 1.0 / total_flops_speedup,
           "mean steps in full": float(scores["full_steps_used"].mean()),
           "steps per sample": int(scores["num_inference_steps"].max()),
           "device": ", ".join(device) or "unknown",
           "device seconds per video (mean)": float(scores["device_seconds"].mean()),
           "device seconds per video (p90)": float(scores["device_seconds"].quantile(0.9)),
           "peak memory per rank (max)": int(scores["peak_memory_bytes"].max()),
           "SpeCa cache per batch (max)": int(scores["cache_bytes"].max()),
           "samples per hour": record.get("samples_per_hour"), "wall seconds": record.get("wall_seconds"),
           "reference": args.reference or "none"}
    summary = {"run": run, "config": config, "per_sample": scores.to_dict(orient="records")}
    if means:
        agg = aggregate(means)
        summary["vbench"] = {**agg.to_dict(), "means": means, "vbench_version": vbench_env.VBENCH_VERSION}
    if has_reference:
        identical = bool(np.isinf(scores["psnr"]).all())
        summary["fidelity"] = {
            "PSNR dB (mean over videos)": "identical" if identical else _finite_stat(scores["psnr"].tolist(), np.mean),
            "PSNR dB (p10)": "identical" if identical else float(np.percentile(scores["psnr"], 10)),
            "PSNR dB (worst video)": "identical" if identical else float(scores["psnr"].min()),
            "SSIM (mean over videos)": float(scores["ssim"].mean()),
            "SSIM (worst video)": float(scores["ssim"].min()),
            "videos identical to the reference": int(np.isinf(scores["psnr"]).sum()),
            "all identical": identical,
            "LPIPS (mean over videos)": (float(scores["lpips"].mean()) if "lpips" in scores else
                                         "not computed: weights not provisioned (" + "; ".join(lpips_missing) + ")"),
        }
    summary["weight_free"] = {"temporal flickering (ours, mean)": float(scores["flicker"].mean())}
    if "adherence_all" in scores:
        summary["weight_free"].update({c.removeprefix("adherence_") + " adherence": float(scores[c].mean())
                                       for c in scores.columns if c.startswith("adherence_")})
    return summary


def run(args) -> int:
    try:
        if args.prepare_env:
            python = vbench_env.ensure_env(Path(args.vbench_env or vbench_env.default_env_dir()), log=_log)
            _log(f"[jobs.score] VBench environment ready: {python}")
            return 0
        summary = score_run(args)
    except (ScoreError, vbench_env.VBenchSetupError, StorageError) as e:
        _log(f"[jobs.score] error: {e}")
        return 2
    except RuntimeError as e:
        _log(f"[jobs.score] scoring failed: {e}")
        return 1
    _log(_print_summary(summary))
    return 0


def _print_summary(summary: dict) -> str:
    rows = run_rows(summary)
    if "vbench" in summary:
        vb = summary["vbench"]
        rows += [(f"VBench {d}", f"{vb['means'][d]:.4f}") for d in vb["ran"]]
        rows.append((f"VBench Quality{' (partial)' if vb['partial'] else ''}", fmt(vb["quality"], "pct")))
    rows += fidelity_rows(summary)
    width = max(len(k) for k, _ in rows)
    lines = ["", "jobs.score summary", "-" * (width + 14)] + [f"{k.ljust(width)}  {v}" for k, v in rows]
    return "\n".join([*lines, f"report: {summary['run']['output']}/report/index.html"])


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
