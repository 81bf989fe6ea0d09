"""Throughput of the Ray batch job on the bundled model, for R = 1, 2, ... replicas.

    python -m bench.pipeline [--replicas 1,2] [--samples 48] [--steps N] [--batch-size 4]
                             [--workdir DIR] [--out bench/results/pipeline.md]

Why: `jobs.generate` overlaps a replica's VAE decode (one rank), MP4 encode and upload (one
thread) with the next batch's text + denoising (the other thread, under a lock), and scales by
adding replicas. This measures both on
this machine: samples per hour for each R, and how much of the work outside denoising was hidden.

How: for each R, N held-out prompts of the bundled model's world (its `eval_set`, unseen seeds) are
written to a Parquet manifest and `python -m jobs.generate --replicas R` runs as a subprocess
(a fresh local Ray on 127.0.0.1 per R; RAY_ADDRESS is ignored) with outputs in a local folder,
the job's default model and SpeCa settings. Each R runs once, in the order given, in this one
invocation, so the speedup is a ratio measured side by side.

What is reported, per R:
* samples/h from the job's run.json (generated / wall_seconds; wall includes Ray start and model
  load), from this script's own clock around the process, and steady state: generated / (last
  sample committed - all replicas ready). Startup = process launch until every replica could take
  a batch (`ready_at` in run.json, each replica's own clock; split at the job's first log line:
  imports + manifest, then Ray start + model load); commit times are the stats files' modification times.
* stage sums from the run's stats (`pipeline.stats.read_stats`). Text, denoise and decode are batch stages (every sample of a
  batch carries the batch's time), so they are summed once per batch; encode and upload are per
  sample. Busy share of the denoise lock per replica = sum(denoise) / (R x window), for the
  steady window and for the job's whole wall time.
* overlap: serial = every stage's time summed; had nothing overlapped, R x window >= serial.
  hidden = serial - R x window is how much of it ran concurrently (a lower bound: untimed work
  such as the stats write and Ray dispatch also sits in the window). Decode, encode and upload run
  on the second thread (K = 1, as here); text encoding runs under the lock with denoising.

Writes the markdown report (--out) and a JSON twin next to it (same name, .json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.stats import read_stats
from pipeline.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "pipeline.md"
READY_LINE = re.compile(r"\[jobs\.generate\] replica ([0-9a-f]+): ")  # printed once a replica has loaded its model
START_LINE = re.compile(r"\[jobs\.generate\] manifest ")  # manifest found, Ray about to start
BATCH_STAGES = ("text", "denoise", "decode")  # shared by the samples of a batch
LOCKED_STAGES = ("text", "denoise")  # under the model lock
OVERLAPPABLE = ("decode", "encode", "upload")  # outside it (one rank a replica): beside the next batch's denoising
SAMPLE_STAGES = ("encode", "upload")  # per sample


def _replica_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"replica counts must be >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=_replica_list, default=[1, 2],
                        help="comma-separated replica counts R, run in this order (default: 1,2)")
    parser.add_argument("--samples", type=int, default=48, help="prompts in the manifest, per R (default: 48)")
    parser.add_argument("--steps", type=int, default=None,
                        help="num_inference_steps column of the manifest (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=4, help="the job's --batch-size (default: 4)")
    parser.add_argument("--workdir", default=None,
                        help="keep manifests, job outputs and logs here (default: a temp folder, removed)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per job run (default: 1800)")
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help="markdown report; the JSON goes next to it (default: bench/results/pipeline.md)")
    return parser


def write_manifest(path: Path, n: int, steps: int | None) -> Path:
    """N held-out prompts of the bundled model's world with their evaluation seeds."""
    from pipeline.loading import bundled_model_dir
    from pipeline.tiny.worlds import world_of

    w = world_of(bundled_model_dir())
    specs = w.eval_set(n)
    columns = {"prompt": [s.prompt for s in specs], "seed": [w.eval_seed_base + i for i in range(n)]}
    if steps is not None:
        columns["num_inference_steps"] = [steps] * n
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def run_job(manifest: Path, output: Path, replicas: int, batch_size: int, timeout: float) -> dict:
    """Run the job as a subprocess; returns its exit code and the times (time.time()) of its milestones."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # always a fresh local Ray on loopback
    cmd = [sys.executable, "-m", "jobs.generate", "--manifest", str(manifest), "--output", str(output),
           "--replicas", str(replicas), "--batch-size", str(batch_size)]
    log_path = output.parent / f"{output.name}.log"
    ready: set[str] = set()  # replicas whose loaded line was seen
    started = None
    launched = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        try:
            for line in proc.stdout:  # stamped as they arrive
                now = time.time()
                log.write(line)
                m = READY_LINE.search(line)
                if m:
                    ready.add(m.group(1))
                elif started is None and START_LINE.search(line):
                    started = now
                if now - launched > timeout:
                    raise subprocess.TimeoutExpired(cmd, timeout)
            code = proc.wait(timeout=max(1.0, timeout - (time.time() - launched)))
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    exited = time.time()
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"jobs.generate --replicas {replicas} exited with {code}; log {log_path}:\n{tail}")
    if started is None or len(ready) != replicas:
        raise RuntimeError(f"saw {len(ready)} of {replicas} replica-ready lines (start line: {started is not None}) "
                           f"in {log_path}")
    return {"command": cmd, "launched": launched, "started": started, "exited": exited, "log": str(log_path)}


def analyse(output: Path, replicas: int, times: dict) -> dict:
    """Throughput, stage sums, busy share and overlap of one job run (see the module docstring)."""
    record = json.loads((output / "run.json").read_text())
    rows = read_stats(Storage(str(output))).to_pylist()
    files = [output / "stats" / f"{r['id']}.parquet" for r in rows]
    ok = [r for r in rows if r["status"] == "ok"]
    generated = record["counts"]["generated"]
    if not ok or len(ok) != generated:
        raise RuntimeError(f"{output}: {len(ok)} ok stats rows but run.json says {generated} generated")
    commits = sorted(f.stat().st_mtime for f in files)
    launched, exited = times["launched"], times["exited"]
    # When the last replica could take a batch, by its own clock: its log line reaches the driver later.
    ready = max(r["ready_at"] for r in record["replicas"])
    window = commits[-1] - ready
    process_wall = exited - launched
    wall = record["wall_seconds"]

    stages = {s: sum(r[f"seconds_{s}"] / r["batch_size"] for r in ok) for s in BATCH_STAGES}
    stages.update({s: sum(r[f"seconds_{s}"] for r in ok) for s in SAMPLE_STAGES})
    denoise = stages["denoise"]
    locked = sum(stages[s] for s in LOCKED_STAGES)
    outside = sum(v for s, v in stages.items() if s != "denoise")
    serial = denoise + outside
    capacity = replicas * window  # replica-seconds in the steady window
    hidden = max(0.0, serial - capacity)
    overlappable = sum(stages[s] for s in OVERLAPPABLE)
    return {
        "replicas": replicas,
        "generated": generated,
        "failed": record["counts"]["failed"],
        "batch_size": record["config"]["batch_size"],
        "num_inference_steps": sorted({r["num_inference_steps"] for r in ok}),
        "method": sorted({r["method"] for r in ok}),
        "speca": record["config"]["speca"],
        "run_json": {"wall_seconds": wall, "samples_per_hour": record["samples_per_hour"]},
        "seconds": {
            "process": process_wall,
            "startup": ready - launched,  # imports, manifest, Ray start, placement groups, model loads
            "imports_and_manifest": times["started"] - launched,
            "ray_and_model_load": ready - times["started"],
            "first_commit": commits[0] - launched,
            "steady_window": window,  # all replicas ready -> last sample committed
            "teardown": exited - commits[-1],  # replicas and Ray shut down, run.json written, exit
        },
        "samples_per_hour": {
            "run_json": record["samples_per_hour"],
            "process": generated / process_wall * 3600,
            "steady_state": generated / window * 3600,
        },
        "stage_seconds": stages,
        "denoise_busy_share": {"steady_window": denoise / capacity, "run_wall": denoise / (replicas * wall)},
        "lock_busy_share": locked / capacity,  # text + denoise, under the lock
        "outside_denoise": {
            "seconds": outside,
            "share_of_serial": outside / serial,
            "share_of_replica_time_not_denoising": 1 - denoise / capacity,
        },
        "overlap": {
            "serial_seconds": serial,
            "replica_seconds": capacity,
            "hidden_seconds": hidden,
            "hidden_share_of_outside": hidden / outside if outside else 0.0,
            "hidden_share_of_overlappable": hidden / overlappable if overlappable else 0.0,
        },
        "log": times["log"],
    }


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def render(report: dict) -> str:
    m = report["machine"]
    runs = report["runs"]
    base = runs[0]
    lines = [
        "# Ray batch job throughput on the bundled model",
        "",
        f"Command: `{report['command']}`  ",
        (f"Machine: {m['platform']}, {m['cpu_count']} CPUs ({m['processor'] or m['machine']}), "
         f"{'GPU ' + m['cuda'] if m['cuda'] else 'no GPU'}, python {m['python']}, torch {m['torch']}, "
         f"OMP_NUM_THREADS={m['omp_num_threads']}.  "),
        (f"Job: {base['generated']} held-out prompts per R, batch size {base['batch_size']}, "
         f"steps {base['num_inference_steps']}, method {base['method']} (the job's default SpeCa), "
         "local output folder, a fresh local Ray per R."),
        "",
        "## Throughput",
        "",
        (f"| R | samples/h (run.json) | samples/h (process) | samples/h (steady) | speedup vs R={base['replicas']} "
         "(run.json / steady) | startup s (imports + manifest / Ray + model load) | steady window s | teardown s | load avg before |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s, sph = r["seconds"], r["samples_per_hour"]
        lines.append(
            f"| {r['replicas']} | {sph['run_json']:.0f} | {sph['process']:.0f} | {sph['steady_state']:.0f} | "
            f"{sph['run_json'] / base['samples_per_hour']['run_json']:.2f}x / "
            f"{sph['steady_state'] / base['samples_per_hour']['steady_state']:.2f}x | "
            f"{s['startup']:.1f} ({s['imports_and_manifest']:.1f} / {s['ray_and_model_load']:.1f}) | "
            f"{s['steady_window']:.1f} | {s['teardown']:.1f} | "
            f"{r['load_average_before']:.2f} |")
    lines += [
        "",
        ("run.json = generated / the job's wall time (Ray start and model load included); process = the same over "
         "this script's clock around the subprocess; steady = generated / (last commit - all replicas ready). "
         "Startup = launch until every replica has loaded its model; split at the job's first log line (manifest "
         "read, Ray not yet started). Teardown = last commit until the process exits."),
    ]
    busy = [r["replicas"] for r in runs if r["load_average_before"] >= (m["cpu_count"] or 1)]
    if busy:
        lines += ["", (f"Note: the 1-minute load average was at or above the CPU count before R = {busy}: other "
                       "processes competed for the CPUs, so these figures measure contention as much as scaling.")]
    lines += [
        "",
        "## Where replica time goes (steady window)",
        "",
        ("| R | text s | denoise s | decode s | encode s | upload s | denoise busy (window / run wall) | "
         "lock busy | outside denoise s | serial s | R x window s | hidden s | hidden / outside | "
         "hidden / (decode+encode+upload) |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        st, o = r["stage_seconds"], r["overlap"]
        lines.append(
            f"| {r['replicas']} | {st['text']:.1f} | {st['denoise']:.1f} | {st['decode']:.1f} | {st['encode']:.1f} | "
            f"{st['upload']:.1f} | {r['denoise_busy_share']['steady_window']:.0%} / "
            f"{r['denoise_busy_share']['run_wall']:.0%} | {r['lock_busy_share']:.0%} | "
            f"{r['outside_denoise']['seconds']:.1f} | {o['serial_seconds']:.1f} | {o['replica_seconds']:.1f} | "
            f"{o['hidden_seconds']:.1f} | {o['hidden_share_of_outside']:.0%} | "
            f"{o['hidden_share_of_overlappable']:.0%} |")
    lines += [
        "",
        ("Text, denoise and decode are batch stages, summed once per batch; encode and upload per sample. "
         "Busy share = denoise seconds / (R x window). Text runs under the model lock with denoising (lock busy = "
         "text + denoise over R x window); decode, encode and upload can overlap the next batch's denoising. "
         "hidden = serial - R x window, a lower bound on the work that ran concurrently (untimed work such as "
         "stats writes and Ray dispatch also sits in the window). 0 means no overlap could be shown."),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.samples < 1 or args.batch_size < 1 or (args.steps is not None and args.steps < 1):
        print("error: --samples, --batch-size and --steps must be >= 1", file=sys.stderr)
        return 2
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-pipeline-")
        workdir = Path(tmp.name)
    else:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        manifest = write_manifest(workdir / "prompts.parquet", args.samples, args.steps)
        runs = []
        for replicas in args.replicas:
            output = workdir / f"r{replicas}"
            load = os.getloadavg()[0]
            print(f"[bench.pipeline] R={replicas}: {args.samples} samples -> {output}", file=sys.stderr, flush=True)
            times = run_job(manifest, output, replicas, args.batch_size, args.timeout)
            result = analyse(output, replicas, times)
            result["load_average_before"] = load
            runs.append(result)
            print(f"[bench.pipeline] R={replicas}: {result['samples_per_hour']['run_json']:.0f} samples/h (run.json), "
                  f"{result['samples_per_hour']['steady_state']:.0f} steady, startup "
                  f"{result['seconds']['startup']:.1f} s", file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
    base = runs[0]
    for r in runs:
        r["speedup"] = {k: r["samples_per_hour"][k] / base["samples_per_hour"][k]
                        for k in ("run_json", "steady_state")}
        if tmp is not None:
            r["log"] = None  # removed with the temp folder
    report = {"command": " ".join(["python -m bench.pipeline", *argv]), "machine": machine(),
              "samples": args.samples, "baseline_replicas": base["replicas"], "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(report))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
