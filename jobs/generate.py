"""The batch job: a Parquet manifest in; MP4s, per-sample stats and a run record out.

    python -m jobs.generate --manifest s3://bucket/prompts.parquet --output s3://bucket/run-42
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.generate ...
    python -m jobs.generate ... --score [--reference URL]    # then the scoring stage (jobs.score)

With no Ray address (no --address, no RAY_ADDRESS) a local Ray is started on 127.0.0.1.
Outputs under --output: videos/<id>.mp4, stats/<id>.parquet (one row per sample), errors/
(rejected manifest rows, failed samples) and run.json (config, model, versions, counts, time).
Rerunning the same command resumes: only samples without a committed stats row are generated.

Exit status: 0 every valid row done; 1 some samples failed after every attempt; 2 bad
arguments or unreachable storage; 3 all valid rows done but some manifest rows were rejected.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa

from pipeline.config import InvalidRequest
from pipeline.generate import (
    add_model_arguments,
    model_config_from_args,
    speca_config_from_args,
)
from pipeline.loading import read_model_info
from pipeline.parallel.config import ParallelConfig
from pipeline.stats import STATS_SCHEMA, SampleStats
from pipeline.storage import Storage, StorageError
from pipeline.video_io import VideoEncoding
from pipeline.writer import write_failure

from . import score as score_stage
from .manifest import ManifestEntry, read_manifest
from .replica import Replica, failure_stats

EXAMPLE_MANIFEST = Path(__file__).resolve().parent / "data" / "example_prompts.parquet"
NAMESPACE = "speca-video"


@dataclass
class Work:
    """A batch of manifest entries and how often it was tried."""

    entries: list[ManifestEntry]
    attempts: int = 0
    errors: list[str] = field(default_factory=list)

    def payload(self) -> list[dict]:
        return [{"request": asdict(e.request), "extra": e.extra} for e in self.entries]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("data")
    io.add_argument("--manifest", default=str(EXAMPLE_MANIFEST),
                    help="Parquet file, folder or prefix on any fsspec URL (default: the bundled example)")
    io.add_argument("--output", default="./outputs", help="output folder or fsspec URL (default: ./outputs)")
    io.add_argument("--storage-options", type=json.loads, default=None,
                    help='JSON for the fsspec filesystem, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'')
    io.add_argument("--overwrite", action="store_true", help="regenerate samples that are already done")
    run = parser.add_argument_group("execution")
    run.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    run.add_argument("--replicas", type=int, default=1, help="model replicas R")
    run.add_argument("--ranks-per-replica", type=int, default=1,
                     help="ranks K per replica (sequence parallel; 1 = plain)")
    run.add_argument("--gpus-per-rank", type=float, default=None,
                     help="GPUs per rank (default: 1 if the cluster has GPUs, else 0)")
    run.add_argument("--cpus-per-rank", type=float, default=1.0, help="CPUs per rank")
    run.add_argument("--batch-size", type=int, default=4, help="samples with equal shape/steps denoised together")
    run.add_argument("--max-attempts", type=int, default=3, help="tries per sample before it is recorded as failed")
    run.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for replica resources")
    run.add_argument("--fps", type=int, default=0, help="MP4 frame rate (default: the model's)")
    run.add_argument("--crf", type=int, default=VideoEncoding.crf, help="x264 quality (0 = lossless)")
    add_model_arguments(parser)
    parser.add_argument("--score", action="store_true",
                        help="after generating, run the scoring stage on the output (see python -m jobs.score --help)")
    score_stage.add_score_arguments(parser)
    return parser


def _parallel_for(args, info) -> ParallelConfig:
    """Degrees for K ranks per replica: given ones must multiply to K; default all-Ulysses, else ring."""
    k = args.ranks_per_replica
    if (args.ulysses_degree, args.ring_degree) == (1, 1) and k > 1:
        heads = int(info.transformer_config["num_attention_heads"])
        parallel = ParallelConfig(ulysses_degree=k) if heads % k == 0 else ParallelConfig(ring_degree=k)
    else:
        parallel = ParallelConfig(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree)
    parallel.check_world(k)
    parallel.check(int(info.transformer_config["num_attention_heads"]))
    return parallel


def _versions() -> dict:
    import diffusers
    import ray
    import torch
    import transformers

    rev = None
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "ray": ray.__version__, "code_revision": rev}


def _done_ids(storage: Storage) -> set[str]:
    """Ids whose stats row is committed with status ok (failed ones are retried on resume)."""
    done = set()
    for rel in storage.list("stats"):
        if rel.endswith(".parquet"):
            table = storage.read_parquet(rel)
            if table.num_rows and table.column("status")[0].as_py() == "ok":
                done.add(Path(rel).stem)
    return done


def _batches(entries: list[ManifestEntry], batch_size: int) -> list[Work]:
    groups: dict[tuple, list[ManifestEntry]] = {}
    for e in entries:
        groups.setdefault(e.request.batch_key(), []).append(e)
    return [Work(g[i:i + batch_size]) for g in groups.values() for i in range(0, len(g), batch_size)]


def _init_ray(address: str | None) -> bool:
    """Connect to Ray; returns True when this call started a local Ray (to shut down after)."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
        return False
    # A laptop run: on loopback (see jobs/__init__.py); a new local Ray turns on token auth by itself.
    ray.init(namespace=NAMESPACE, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
    return True


class ReplicaPool:
    """R replicas, each in its own STRICT_PACK placement group of K bundles; restarts dead ones."""

    def __init__(self, args, model: dict, speca: dict | None, parallel: dict, run_tag: str):
        import ray
        from ray.util.placement_group import placement_group

        self.args, self.model, self.speca, self.parallel = args, model, speca, parallel
        gpus = args.gpus_per_rank
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        self.bundle = {"CPU": args.cpus_per_rank, **({"GPU": gpus} if gpus else {})}
        self.gpus = gpus
        self.names = [f"replica-{run_tag}-{i}" for i in range(args.replicas)]
        self.groups = [placement_group([self.bundle] * args.ranks_per_replica, strategy="STRICT_PACK")
                       for _ in range(args.replicas)]
        try:
            ray.get([pg.ready() for pg in self.groups], timeout=args.ready_timeout)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"timed out after {args.ready_timeout:.0f}s waiting for {args.replicas} replica(s) of "
                f"{args.ranks_per_replica} x {self.bundle} on one node each; cluster has {ray.cluster_resources()}. "
                f"Lower --replicas / --ranks-per-replica or add nodes") from None
        self.actors = [self._start(i) for i in range(args.replicas)]
        self.placements = ray.get([a.info.remote() for a in self.actors])  # waits for the models to load
        for i, p in enumerate(self.placements):
            print(f"[jobs.generate] replica {i}: {p['ranks']} rank(s) on node {p['node_ip']} "
                  f"({p['node_id'][:8]}), {p['device']}", file=sys.stderr, flush=True)

    def _start(self, i: int):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_cls = ray.remote(Replica)
        return actor_cls.options(
            name=self.names[i], num_cpus=self.args.cpus_per_rank, num_gpus=self.gpus, max_concurrency=2,
            max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                self.groups[i], placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
        ).remote(self.model, self.speca, self.args.output, self.args.storage_options, self.args.fps, self.args.crf,
                 self.parallel, self.bundle)

    def restart(self, i: int) -> None:
        import ray

        try:
            ray.kill(self.actors[i], no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.actors[i] = self._start(i)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            ray.kill(a, no_restart=True)
        for pg in self.groups:
            remove_placement_group(pg)


class Progress:
    """A progress line on stderr when counts change (and at least every `quiet` seconds)."""

    def __init__(self, total: int, skipped: int, rejected: int, every: float = 5.0, quiet: float = 60.0):
        self.total, self.skipped, self.rejected, self.every, self.quiet = total, skipped, rejected, every, quiet
        self.done = self.failed = 0
        self.start = self.last = time.monotonic()

    def update(self, done: int = 0, failed: int = 0, force: bool = False) -> None:
        self.done += done
        self.failed += failed
        now = time.monotonic()
        if not (force or done or failed or now - self.last >= self.quiet):
            return
        self.last = now
        finished = self.done + self.failed
        rate = self.done / max(now - self.start, 1e-9) * 3600
        left = self.total - finished
        eta = left / (rate / 3600) if rate > 0 else float("inf")
        eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "--:--:--"
        print(f"[jobs.generate] done {self.done + self.skipped}/{self.total + self.skipped} "
              f"(resumed {self.skipped}) failed {self.failed} rejected {self.rejected} | "
              f"{rate:.1f} samples/h | ETA {eta_s}", file=sys.stderr, flush=True)


class Scheduler:
    """Driver side: keeps two batches in flight per replica, retries work a dead replica held."""

    def __init__(self, args, storage: Storage, info, progress: Progress):
        self.args, self.storage, self.info, self.progress = args, storage, info, progress
        self.queue: deque[Work] = deque()
        self.inflight: dict = {}  # ObjectRef -> (replica index, Work)
        self.failed: list[SampleStats] = []
        self.placements: list[dict] = []

    def run(self, work: list[Work], model_config, speca, parallel: ParallelConfig) -> None:
        import ray

        self.queue.extend(work)
        pool = ReplicaPool(self.args, asdict(model_config), speca.to_dict() if speca else None, asdict(parallel),
                           run_tag=str(os.getpid()))
        self.placements = pool.placements
        try:
            while self.queue or self.inflight:
                self._submit(pool)
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=self.progress.every)
                for ref in ready:
                    self._collect(pool, ref)
                self.progress.update()
        finally:
            pool.shutdown()

    def _submit(self, pool: ReplicaPool) -> None:
        for i, actor in enumerate(pool.actors):
            while self.queue and sum(1 for r, _ in self.inflight.values() if r == i) < 2:
                work = self.queue.popleft()
                work.attempts += 1
                self.inflight[actor.run.remote(work.payload())] = (i, work)

    def _collect(self, pool: ReplicaPool, ref) -> None:
        import ray

        i, work = self.inflight.pop(ref)
        try:
            self.progress.update(done=len(ray.get(ref)))
        except ray.exceptions.RayActorError as e:
            # The replica process died: restart it and retry everything it held.
            held = [r for r, (j, _) in self.inflight.items() if j == i]
            lost = [work] + [self.inflight.pop(r)[1] for r in held]
            print(f"[jobs.generate] replica {i} died; restarting it and retrying "
                  f"{sum(len(w.entries) for w in lost)} sample(s)", file=sys.stderr, flush=True)
            pool.restart(i)
            for w in lost:
                self._retry_or_fail(w, f"replica died: {e}")
        except ray.exceptions.RayTaskError as e:
            self._retry_or_fail(work, str(e.cause if e.cause is not None else e))

    def _retry_or_fail(self, work: Work, error: str) -> None:
        work.errors.append(error)
        if work.attempts < self.args.max_attempts:
            self.queue.append(work)
            return
        for e in work.entries:
            stats = failure_stats(e.request, f"failed {work.attempts} attempt(s); last: {error}", self.info.model,
                                  e.extra)
            write_failure(self.storage, stats)
            self.failed.append(stats)
        self.progress.update(failed=len(work.entries))


def run(args) -> int:
    started = time.time()
    try:
        model_config = model_config_from_args(args)
        speca = speca_config_from_args(args)
        info = read_model_info(model_config.model)
        storage = Storage(args.output, args.storage_options)
        storage.check()
        manifest = read_manifest(args.manifest, info, args.storage_options)
        if args.replicas < 1 or args.ranks_per_replica < 1 or args.batch_size < 1 or args.max_attempts < 1:
            raise InvalidRequest("replicas/ranks-per-replica/batch-size/max-attempts",
                                 (args.replicas, args.ranks_per_replica, args.batch_size, args.max_attempts),
                                 "must all be >= 1")
        parallel = _parallel_for(args, info)
        if args.score:  # fail before generating anything, not after
            score_stage.vbench_env.check_weights(score_stage.parse_dimensions(args.dimensions))
    except (InvalidRequest, ValueError, StorageError, FileNotFoundError, score_stage.vbench_env.VBenchSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if manifest.rejected:
        storage.write_parquet("errors/manifest.parquet", manifest.errors_table())
        for r in manifest.rejected[:10]:
            print(f"[jobs.generate] rejected manifest row {r.row}: {r.error}", file=sys.stderr)
    done = set() if args.overwrite else _done_ids(storage)
    todo = [e for e in manifest.entries if e.request.id not in done]
    skipped = len(manifest.entries) - len(todo)
    progress = Progress(len(todo), skipped, len(manifest.rejected))
    print(f"[jobs.generate] {len(manifest.entries)} valid rows ({skipped} already done, "
          f"{len(manifest.rejected)} rejected) from {manifest.source} -> {storage.url}", file=sys.stderr, flush=True)

    scheduler = Scheduler(args, storage, info, progress)
    if todo:
        started_ray = _init_ray(args.address)
        try:
            scheduler.run(_batches(todo, args.batch_size), model_config, speca, parallel)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    failed = scheduler.failed
    progress.update(force=True)
    if failed:
        table = pa.Table.from_pylist([asdict(s) for s in failed], schema=STATS_SCHEMA)
        storage.write_parquet("errors/failed.parquet", table)

    wall = time.time() - started
    generated = progress.done
    record = {
        "manifest": manifest.source, "output": storage.url, "model": info.model,
        "config": {"model": asdict(model_config), "speca": speca.to_dict() if speca else None,
                   "replicas": args.replicas, "ranks_per_replica": args.ranks_per_replica,
                   "parallel": asdict(parallel),
                   "batch_size": args.batch_size, "max_attempts": args.max_attempts, "fps": args.fps,
                   "crf": args.crf, "overwrite": args.overwrite},
        "versions": _versions(),
        "counts": {"rows_valid": len(manifest.entries), "rows_rejected": len(manifest.rejected),
                   "resumed_done": skipped, "generated": generated, "failed": len(failed)},
        "replicas": scheduler.placements,
        "wall_seconds": wall, "samples_per_hour": generated / wall * 3600 if wall > 0 else 0.0,
    }
    storage.write_bytes("run.json", (json.dumps(record, indent=2) + "\n").encode())
    print(_summary(record), file=sys.stderr)
    status = 1 if failed else (3 if manifest.rejected else 0)
    if args.score and generated + skipped > 0:
        scored = score_stage.run(argparse.Namespace(**{**vars(args), "run": args.output, "prepare_env": False}))
        status = status or scored
    return status


def _summary(record: dict) -> str:
    c = record["counts"]
    rows = [("valid manifest rows", c["rows_valid"]), ("rejected rows (errors/manifest.parquet)", c["rows_rejected"]),
            ("already done (resumed)", c["resumed_done"]), ("generated now", c["generated"]),
            ("failed (errors/failed.parquet)", c["failed"]),
            ("wall time", f"{record['wall_seconds']:.1f} s"), ("throughput", f"{record['samples_per_hour']:.1f} samples/h")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "jobs.generate summary", "-" * (width + 14)] +
                     [f"{k.ljust(width)}  {v}" for k, v in rows] + [f"output: {record['output']}", ""])


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
