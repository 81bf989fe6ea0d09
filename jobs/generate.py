"""The batch job: a Parquet manifest in; MP4s, per-sample stats and a run record out.

    python -m jobs.generate --manifest s3://bucket/prompts.parquet --output s3://bucket/run-42
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.generate ...
    python -m jobs.generate ... --score [--reference URL]    # then the scoring stage (jobs.score)

With no Ray address (no --address, no RAY_ADDRESS) a local Ray is started on 127.0.0.1.
Outputs under --output: videos/<id>.mp4, stats/<id>.parquet (one row per sample), commits/ and
index/ (the same rows per batch, for cheap resume), errors/ (rejected manifest rows, failed
samples) and run.json (config, model, versions, counts, time). Rerunning the same command
resumes: only samples without a committed stats row and video are generated.

On Ray Data: the manifest is streamed (row groups read, rows checked and ids resolved in
manifest order, jobs/manifest.py), split into one block per batch, generation is `map_batches` over an actor pool
of R replicas (each in its own STRICT_PACK placement group of K ranks, jobs/replica.py), and the
driver only consumes the committed rows: counts, errors/, the index, progress, run.json.

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
import uuid
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from pipeline.config import InvalidRequest, with_token_budget
from pipeline.generate import (
    add_model_arguments,
    model_config_from_args,
    speca_config_from_args,
)
from pipeline.loading import read_model_info
from pipeline.parallel.config import ParallelConfig
from pipeline.stats import STATS_SCHEMA
from pipeline.storage import Storage, StorageError
from pipeline.video_io import VideoEncoding
from pipeline.writer import write_index

from . import score as score_stage
from .manifest import ERRORS_SCHEMA, manifest_dataset, manifest_files
from .replica import Ledger, Replica, start_ranks

EXAMPLE_MANIFEST = Path(__file__).resolve().parent / "data" / "example_prompts.parquet"
NAMESPACE = "speca-video"
INDEX_ROWS, INDEX_SECONDS = 10_000, 300.0  # the driver compacts commit records this often


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
    run.add_argument("--batch-time-limit", type=float, default=10800.0,
                     help="seconds a batch may hold a replica (denoise + commit) before the replica is restarted "
                          "and the batch retried (default: 3 h)")
    run.add_argument("--max-tokens", type=int, default=None,
                     help="latent tokens per sample a row may ask for (default: the model's default size)")
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


class ReplicaPlacementError(RuntimeError):
    """The cluster cannot hold the replicas asked for."""


def _placement_groups(args, bundle: dict) -> list:
    """R STRICT_PACK groups of K bundles, ready, or ReplicaPlacementError saying what is missing."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    groups = [placement_group([bundle] * args.ranks_per_replica, strategy="STRICT_PACK")
              for _ in range(args.replicas)]
    try:
        ray.get([pg.ready() for pg in groups], timeout=args.ready_timeout)
    except ray.exceptions.GetTimeoutError:
        for pg in groups:
            remove_placement_group(pg)
        raise ReplicaPlacementError(
            f"timed out after {args.ready_timeout:.0f}s waiting for {args.replicas} replica(s) of "
            f"{args.ranks_per_replica} x {bundle} on one node each; cluster has {ray.cluster_resources()}. "
            f"Lower --replicas / --ranks-per-replica or add nodes") from None
    return groups


class Progress:
    """A progress line on stderr when counts change (at most every `every` s, at least every `quiet` s)."""

    def __init__(self, rows: int, every: float = 5.0, quiet: float = 60.0):
        self.rows, self.every, self.quiet = rows, every, quiet
        self.done = self.failed = self.resumed = self.rejected = 0
        self.start = self.last = time.monotonic()
        self.changed = False

    def update(self, done: int = 0, failed: int = 0, resumed: int = 0, rejected: int = 0,
               force: bool = False) -> None:
        self.done += done
        self.failed += failed
        self.resumed += resumed
        self.rejected += rejected
        self.changed |= bool(done or failed or resumed or rejected)
        now = time.monotonic()
        if not (force or (self.changed and now - self.last >= self.every) or now - self.last >= self.quiet):
            return
        self.last, self.changed = now, False
        seen = self.done + self.failed + self.resumed + self.rejected
        rate = self.done / max(now - self.start, 1e-9) * 3600
        left = max(self.rows - seen, 0)
        eta = time.strftime("%H:%M:%S", time.gmtime(left / (rate / 3600))) if rate > 0 else "--:--:--"
        print(f"[jobs.generate] rows {seen}/{self.rows}: done {self.done} resumed {self.resumed} "
              f"failed {self.failed} rejected {self.rejected} | {rate:.1f} samples/h | ETA {eta}",
              file=sys.stderr, flush=True)


class Collector:
    """Driver side: what the pipeline hands back (counts, errors, failures), and the index it writes."""

    def __init__(self, storage: Storage, progress: Progress):
        self.storage, self.progress = storage, progress
        self.rejected: list[dict] = []
        self.failed: list[dict] = []
        self.resumed = self.generated = 0
        self.run_tag, self.seq = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}", 0
        self.pending: list[dict] = []
        self.pending_commits: list[str] = []
        self.flushed = time.monotonic()

    def add(self, batch: pa.Table) -> None:
        counts = {"done": 0, "failed": 0, "resumed": 0, "rejected": 0}
        for r in batch.to_pylist():
            kind = r["kind"]
            if kind == "resumed":
                counts["resumed"] += r["count"]
            elif kind == "rejected":
                counts["rejected"] += 1
                self.rejected.append({k: r[k] for k in ERRORS_SCHEMA.names})
                if len(self.rejected) <= 10:
                    print(f"[jobs.generate] rejected manifest row {r['row']}: {r['error']}", file=sys.stderr)
            else:  # ok / failed: committed by a replica
                stats = json.loads(r["stats_json"])
                self.pending.append(stats)
                self.pending_commits.append(r["commit"])
                if kind == "ok":
                    counts["done"] += 1
                else:
                    counts["failed"] += 1
                    self.failed.append({k: stats[k] for k in STATS_SCHEMA.names})
        self.resumed += counts["resumed"]
        self.generated += counts["done"]
        self.progress.update(**counts)
        if len(self.pending) >= INDEX_ROWS or time.monotonic() - self.flushed >= INDEX_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Compact the commit records seen so far into one index part (see pipeline/writer.py)."""
        self.flushed = time.monotonic()
        if self.pending:
            write_index(self.storage, self.run_tag, self.seq, self.pending, self.pending_commits)
            self.seq += 1
            self.pending, self.pending_commits = [], []


def _placements(groups: list, loaded: dict[int, dict]) -> list[dict]:
    """Where each replica is: its group's node, and what its rank 0 reported once loaded."""
    import ray
    from ray.util.placement_group import placement_group_table

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    out = []
    for i, pg in enumerate(groups):
        node = placement_group_table(pg)["bundles_to_node_id"][0]
        out.append({"node_id": node, "node_ip": ips.get(node), "loaded": i in loaded, **loaded.get(i, {})})
    return out


def _split(ds, rows: int):
    """`ds.repartition(target_num_rows_per_block=rows)`, its tasks taking no CPU slot.

    Ray 2.60's `repartition` takes no resource arguments, so its tasks ask for 1 CPU, which the
    replicas' placement groups may all hold (K = 2 on 2 cores, or 1-CPU nodes): the job would wait
    forever. Its logical operator does carry `ray_remote_args`; this sets them (tested by every
    job test whose replicas fill the cluster: K = 2, two 1-CPU nodes).
    """
    split = ds.repartition(target_num_rows_per_block=rows)
    object.__setattr__(split._logical_plan.dag, "ray_remote_args", {"num_cpus": 0})
    return split


def _generate(args, files, info, limits, model_config, speca, parallel: ParallelConfig,
              collector: Collector) -> list[dict]:
    """Run the Ray Data pipeline to the end; returns the replicas' placements."""
    import ray
    import ray.data
    from ray.util.placement_group import remove_placement_group

    gpus = args.gpus_per_rank
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    bundle = {"CPU": args.cpus_per_rank, **({"GPU": gpus} if gpus else {})}
    groups = _placement_groups(args, bundle)
    engine_args = {"model": asdict(model_config), "speca": speca.to_dict() if speca else None,
                   "parallel": asdict(parallel), "output": args.output, "storage_options": args.storage_options,
                   "fps": args.fps, "crf": args.crf, "time_limit": args.batch_time_limit}
    ledger = ray.remote(Ledger).options(num_cpus=0, name=f"ledger-{os.getpid()}", namespace=NAMESPACE).remote(
        groups, [None] * len(groups))
    engine_args["ledger"] = ledger
    # The ranks load their models while Ray Data starts its stages; each replica claims a group.
    ray.get([ledger.set_ranks.remote(i, start_ranks(pg, bundle, engine_args)) for i, pg in enumerate(groups)])
    rows = manifest_dataset(files, info, limits, args.output, args.storage_options, args.overwrite, ledger,
                            lead=max(8192, 64 * args.batch_size * args.replicas))
    # One block per batch, so that every batch is a task of its own, for any replica (a bigger
    # block would be one task, its batches run in turn on one replica). The replica actors hold
    # no resources themselves: their ranks run in the placement groups.
    batches = _split(rows, args.batch_size)
    generated = batches.map_batches(
        Replica, batch_format="pyarrow", batch_size=args.batch_size, num_cpus=0,
        compute=ray.data.ActorPoolStrategy(size=args.replicas, max_concurrent_calls_per_actor=2,
                                           enable_true_multi_threading=True),
        fn_constructor_kwargs={"engine_args": engine_args, "bundle": bundle, "ledger": ledger,
                               "max_attempts": args.max_attempts})

    def events() -> None:
        for event in ray.get(ledger.drain_events.remote()):
            print(f"[jobs.generate] {event}", file=sys.stderr, flush=True)

    try:
        for batch in generated.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
            collector.add(batch)
            events()
        events()
        return _placements(groups, ray.get(ledger.placements.remote()))
    finally:
        collector.flush()
        ray.kill(ledger)
        for pg in groups:
            remove_placement_group(pg)


def run(args) -> int:
    started = time.time()
    try:
        model_config = model_config_from_args(args)
        speca = speca_config_from_args(args)
        info = read_model_info(model_config.model)
        limits = with_token_budget(info.limits, info.defaults, args.max_tokens)
        if args.replicas < 1 or args.ranks_per_replica < 1 or args.batch_size < 1 or args.max_attempts < 1:
            raise InvalidRequest("replicas/ranks-per-replica/batch-size/max-attempts",
                                 (args.replicas, args.ranks_per_replica, args.batch_size, args.max_attempts),
                                 "must all be >= 1")
        if not args.batch_time_limit > 0:
            raise InvalidRequest("batch-time-limit", args.batch_time_limit, "must be > 0 seconds")
        storage = Storage(args.output, args.storage_options)
        storage.check()
        files = manifest_files(args.manifest, args.storage_options)
        parallel = _parallel_for(args, info)
        if args.score:  # fail before generating anything, not after
            score_stage.vbench_env.check_weights(score_stage.parse_dimensions(args.dimensions))
    except (InvalidRequest, ValueError, StorageError, FileNotFoundError, score_stage.vbench_env.VBenchSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"[jobs.generate] manifest {files.source}: {files.num_rows} rows in {len(files.units)} row group(s) "
          f"-> {storage.url}", file=sys.stderr, flush=True)
    collector = Collector(storage, Progress(files.num_rows))
    started_ray = _init_ray(args.address)
    try:
        placements = _generate(args, files, info, limits, model_config, speca, parallel, collector)
    except ReplicaPlacementError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    collector.progress.update(force=True)
    if collector.rejected:
        storage.write_parquet("errors/manifest.parquet",
                              pa.Table.from_pylist(sorted(collector.rejected, key=lambda r: r["row"]),
                                                   schema=ERRORS_SCHEMA))
    if collector.failed:
        storage.write_parquet("errors/failed.parquet", pa.Table.from_pylist(collector.failed, schema=STATS_SCHEMA))

    wall = time.time() - started
    generated, failed, rejected, skipped = (collector.generated, len(collector.failed), len(collector.rejected),
                                            collector.resumed)
    record = {
        "manifest": files.source, "output": storage.url, "model": info.model,
        "config": {"model": asdict(model_config), "speca": speca.to_dict() if speca else None,
                   "replicas": args.replicas, "ranks_per_replica": args.ranks_per_replica,
                   "parallel": asdict(parallel),
                   "batch_size": args.batch_size, "max_attempts": args.max_attempts, "fps": args.fps,
                   "crf": args.crf, "overwrite": args.overwrite, "max_tokens": limits.max_tokens,
                   "max_steps": limits.max_steps, "batch_time_limit": args.batch_time_limit},
        "versions": _versions(),
        "counts": {"rows_valid": generated + failed + skipped, "rows_rejected": rejected,
                   "resumed_done": skipped, "generated": generated, "failed": failed},
        "replicas": placements,
        "wall_seconds": wall, "samples_per_hour": generated / wall * 3600 if wall > 0 else 0.0,
    }
    storage.write_bytes("run.json", (json.dumps(record, indent=2) + "\n").encode())
    print(_summary(record), file=sys.stderr)
    status = 1 if failed else (3 if rejected else 0)
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
