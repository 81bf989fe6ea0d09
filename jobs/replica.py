"""A generation replica: one model over K ranks, an actor of the job's Ray Data actor pool.

`map_replicas` turns a dataset of FLOW_SCHEMA blocks into committed samples with
`map_batches(Replica, compute=ActorPoolStrategy(min_size, max_size))`. Every replica actor gets a
STRICT_PACK placement group of its own, made when Ray Data creates the actor (`ray_remote_args_fn`,
as vLLM's Ray Data example and `ray.data.llm` do), and holds bundle 0 itself, so Ray Data sees
one rank's CPUs and GPUs per replica and scales the pool from min to max as the cluster allows: a
node that joins gets a replica, one that leaves has its replica restarted elsewhere. The actor is
rank 0 (it encodes the prompts, denoises, decodes its share of the VAE tiles, writes the outputs)
and starts the K - 1 `RankWorker`s in the other bundles; they share its fate (Ray kills actors
whose owner dies).

Ray's mechanisms do the recovery: Ray Data creates the actors with `max_restarts=-1` and
`max_task_retries=-1`, so a replica whose process dies is restarted in its placement group (with
new ranks) and its in-flight batches are retried. A replica ends its own process when a batch
goes wrong in a way it cannot undo in-process: a rank died, the batch raised (the ranks may be
stuck in a collective), or it held the replica past the batch time limit. What Ray does not give
is an end: a batch that kills every replica it lands on would be retried for ever, and Ray's
`max_task_retries` would fail the whole dataset (or, with `max_errored_blocks`, drop the batch
without a trace). So each batch's attempts are counted on the output storage (`AttemptLog`,
written before the work starts, so that a killed process still counts); past `max_attempts` the
samples are committed as failed, naming the last attempt's error.

Two calls run at a time: one lock serialises the transformer (text and denoising), so while
batch n + 1 denoises, batch n is decoded (a one-rank replica; with several ranks the decode's
gather shares their process group, so it stays under the lock), MP4-encoded and uploaded on the
other thread. A call returns only once its batch's videos, stats files and commit record are
written; only then do the rows go on to the driver, so it never counts a sample done too early.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import pyarrow as pa
import ray

from pipeline.config import ModelConfig, SampleRequest
from pipeline.parallel.config import ParallelConfig
from pipeline.stats import SampleStats
from pipeline.storage import Storage
from pipeline.writer import commit_path, write_commit, write_failure, write_sample

from .manifest import FLOW_SCHEMA


@dataclass(frozen=True)
class ReplicaConfig:
    """What every replica is built from; the driver validates it and records it in run.json.

    Args:
        model, speca, parallel: the generation engine's configs (`parallel.world_size` ranks = K).
        rank_resources: one rank's Ray resources, one placement-group bundle ({"CPU": 1, "GPU": 1}).
        output, storage_options: where samples are committed.
        batch_size: samples with equal shape and steps denoised together (the engine's batching rule).
        fps, crf: MP4 encoding (fps 0: the model's).
        batch_time_limit: seconds a batch may hold its replica before the replica is restarted.
        max_attempts: attempts at a batch before its samples are committed as failed.
        run: this run's tag (its attempt records are apart from other runs').
    """

    model: ModelConfig
    speca: object  # speca.SpeCaConfig | None (speca is imported in the rank processes only)
    parallel: ParallelConfig
    rank_resources: dict
    output: str
    storage_options: dict | None
    batch_size: int
    fps: int
    crf: int
    batch_time_limit: float
    max_attempts: int
    run: str


def map_replicas(ds, config: ReplicaConfig, replicas: tuple[int, int]):
    """`ds` through an actor pool of `replicas` = (min, max) replicas; returns (dataset, placement groups made).

    The one place that uses `ray_remote_args_fn` (deprecated in Ray 2.60, removal announced for
    2.64; `ray.data.llm` builds its groups the same way): Ray Data calls it for every actor it
    creates, so every replica, including one the pool adds when a node joins, gets its own group.
    The driver removes the groups that are left when the run ends.

    Where Ray falls short: Ray Data 2.60's HighMemoryIssueDetector also calls the function, at the
    start and every 30 s, to read the memory request; each call would make a group that no replica
    uses and that holds K GPUs until the run ends (it starved the job of CPUs on 2-core test runs).
    The detector is turned off for the job (DataContext.issue_detectors_config); tests/test_job.py
    checks that a run makes one group per replica.
    """
    import ray.data
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    groups = []

    def own_group() -> dict:
        group = placement_group([config.rank_resources] * config.parallel.world_size, strategy="STRICT_PACK")
        groups.append(group)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)}

    resources = dict(config.rank_resources)
    out = ds.map_batches(
        Replica, batch_format="pyarrow", batch_size=config.batch_size, fn_constructor_kwargs={"config": config},
        num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0), resources=resources or None,
        compute=ray.data.ActorPoolStrategy(min_size=replicas[0], max_size=replicas[1],
                                           max_concurrent_calls_per_actor=2, enable_true_multi_threading=True),
        ray_remote_args_fn=own_group)
    detectors = out.context.issue_detectors_config  # the context this dataset runs with
    detectors.detectors = [d for d in detectors.detectors if d.__name__ != "HighMemoryIssueDetector"]
    return out, groups


def _load_rank(config: ReplicaConfig, rank: int, init_method: str):
    # Imported here: torch and diffusers load in the rank processes only.
    from pipeline.generate import Generator
    from pipeline.parallel import init_distributed

    if config.parallel.world_size > 1:
        init_distributed(rank, config.parallel.world_size, init_method, device=config.model.resolve_device())
    return Generator.load(config.model, config.speca, config.parallel)


class RankWorker:
    """Rank r > 0 of a replica: denoises its shard and decodes its VAE tiles in step with rank 0."""

    def __init__(self, config: ReplicaConfig, rank: int, init_method: str):
        self.config = config
        self.generator = _load_rank(config, rank, init_method)

    def generate(self, requests: list[SampleRequest]) -> int:
        self.generator.generate(requests, batch_size=self.config.batch_size)
        return len(requests)


@dataclass
class Attempts:
    """One batch's attempts so far, as recorded on the output storage (see the module docstring)."""

    number: int
    errors: list[str]


class AttemptLog:
    """`commits/<batch>.<run>.attempts.json` on the output storage: attempts begun, errors seen.

    Beside the batch's commit record (readers of commits/ take only .parquet), deleted once the
    batch is committed; the run's tag keeps a crashed earlier run's count out.
    """

    def __init__(self, storage: Storage, run: str):
        self.storage, self.run = storage, run

    def _path(self, batch_id: str) -> str:
        return f"{commit_path(batch_id).removesuffix('.parquet')}.{self.run}.attempts.json"

    def _read(self, batch_id: str) -> Attempts:
        try:
            return Attempts(**json.loads(self.storage.read_bytes(self._path(batch_id))))
        except FileNotFoundError:
            return Attempts(0, [])

    def begin(self, batch_id: str) -> Attempts:
        """Count one more attempt; an earlier attempt that left no error died with its process."""
        seen = self._read(batch_id)
        errors = seen.errors + ["replica died"] * (seen.number - len(seen.errors))
        now = Attempts(seen.number + 1, errors)
        self.storage.write_bytes(self._path(batch_id), json.dumps(asdict(now)).encode())
        return now

    def fail(self, batch_id: str, error: str) -> None:
        seen = self._read(batch_id)
        self.storage.write_bytes(self._path(batch_id), json.dumps(
            {"number": seen.number, "errors": seen.errors[:seen.number - 1] + [error]}).encode())

    def end(self, batch_id: str) -> None:
        self.storage.delete(self._path(batch_id), missing_ok=True)


class Replica:
    """The Ray Data UDF (rank 0 of a replica): FLOW_SCHEMA blocks in, their "todo" rows committed."""

    def __init__(self, config: ReplicaConfig):
        from pipeline.generate import SampleOrigin
        from pipeline.parallel import free_port
        from pipeline.video_io import VideoEncoding
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.config = config
        ctx = ray.get_runtime_context()
        self.id = ctx.get_actor_id()[:12]  # kept across restarts, like the placement group
        self.node_id = ctx.get_node_id()
        self.storage = Storage(config.output, config.storage_options)
        self.attempts = AttemptLog(self.storage, config.run)
        group, world = get_current_placement_group(), config.parallel.world_size
        init_method = f"tcp://{ray.util.get_node_ip_address()}:{free_port()}" if world > 1 else ""
        resources = dict(config.rank_resources)
        place = dict(num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0), resources=resources)
        self.peers = [ray.remote(RankWorker).options(
            max_restarts=0, scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=r),
            **place).remote(config, r, init_method) for r in range(1, world)]
        with self._guard(None, [p.__ray_ready__.remote() for p in self.peers], time_limit=None):
            self.generator = _load_rank(config, 0, init_method)
        self.origin = SampleOrigin(node_id=self.node_id, replica=self.id)
        self.encoding = VideoEncoding(fps=config.fps or self.generator.model.info.defaults.fps, crf=config.crf)
        self._model = threading.Lock()
        self.ready_at = time.time()  # when it could take a batch (this machine's clock): run.json keeps it
        restarted = " (restarted)" if ctx.was_current_actor_reconstructed else ""
        print(f"[jobs.generate] replica {self.id}: {world} rank(s) on node {ray.util.get_node_ip_address()} "
              f"({self.node_id[:8]}), {self.generator.model.device}{restarted}", file=sys.stderr, flush=True)

    def __del__(self):
        """Ray Data let this replica go (the pool shrank, or the run ended): free its placement group."""
        from ray.util import get_current_placement_group, remove_placement_group

        with contextlib.suppress(Exception):
            remove_placement_group(get_current_placement_group())

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Generate and commit the "todo" rows; the others pass through to the driver."""
        rows = batch.to_pylist()
        todo = [r for r in rows if r["kind"] == "todo"]
        out = [r for r in rows if r["kind"] != "todo"]
        if todo:
            out += self._commit(todo)
        return pa.Table.from_pylist(out, schema=FLOW_SCHEMA)

    def _commit(self, todo: list[dict]) -> list[dict]:
        batch_id = hashlib.sha256("\n".join(sorted(r["id"] for r in todo)).encode()).hexdigest()[:32]
        requests = [SampleRequest(**r["request"]) for r in todo]
        attempt = self.attempts.begin(batch_id)
        if attempt.number > self.config.max_attempts:
            error = f"failed {attempt.number - 1} attempt(s); last: {attempt.errors[-1]}"
            stats = [SampleStats.of(r, status="failed", error=error, model=self.config.model.model,
                                    extra_json=row["extra_json"], node_id=self.node_id, replica=self.id,
                                    attempt=attempt.number - 1) for r, row in zip(requests, todo)]
            for s in stats:
                write_failure(self.storage, s)
            return self._done(todo, batch_id, stats, "failed")
        label = f"batch {batch_id[:8]} ({len(todo)} sample(s), attempt {attempt.number})"
        generate = dict(batch_size=self.config.batch_size, extra_json=[r["extra_json"] for r in todo],
                        origin=replace(self.origin, attempt=attempt.number))
        with contextlib.ExitStack() as guarded:  # the time limit runs from taking the model to the commit
            try:
                with self._model:  # text and denoising (and, with several ranks, decode): a batch at a time
                    peers = [p.generate.remote(requests) for p in self.peers]
                    guarded.enter_context(self._guard(batch_id, peers, self.config.batch_time_limit))
                    if self.peers:  # the decode's gather shares the process group with denoising: in turn
                        samples = self.generator.generate(requests, **generate)
                        ray.get(peers)
                    else:
                        denoised = self.generator.denoise(requests, **generate)
                if not self.peers:  # one rank: decode while the next batch denoises
                    samples = [s for batch in denoised for s in self.generator.finish(batch)]
                stats = [write_sample(self.storage, s, self.encoding) for s in samples]
            except Exception as e:  # noqa: BLE001 - anything; Ray retries the batch on a fresh process
                self._die(batch_id, "".join(traceback.format_exception_only(e)).strip(), label)
                raise  # not reached: _die ends the process
        return self._done(todo, batch_id, stats, "ok")

    def _done(self, todo: list[dict], batch_id: str, stats: list[SampleStats], kind: str) -> list[dict]:
        committed = write_commit(self.storage, batch_id, stats)
        self.attempts.end(batch_id)
        return [{**row, "kind": kind, "request": None, "stats": record, "error": record["error"],
                 "commit": commit_path(batch_id), "ready_at": self.ready_at} for row, record in zip(todo, committed)]

    def _die(self, batch_id: str | None, error: str, label: str) -> None:
        """Record why, then end this process: Ray restarts the replica (new ranks) and retries its batches."""
        if batch_id is not None:
            with contextlib.suppress(Exception):
                self.attempts.fail(batch_id, error)
        print(f"[jobs.generate] replica {self.id}: {label}: {error}; restarting the replica", file=sys.stderr,
              flush=True)
        os._exit(1)

    @contextlib.contextmanager
    def _guard(self, batch_id: str | None, peers: list, time_limit: float | None) -> Iterator[None]:
        """While the block runs: a rank that dies, or the time limit passing, ends this process (`_die`).

        Rank 0 cannot see a dead peer from inside a collective (gloo may wait, NCCL does), so a
        thread watches the peers' calls and the clock.
        """
        done = threading.Event()
        end = None if time_limit is None else time.monotonic() + time_limit
        label = "starting" if batch_id is None else f"batch {batch_id[:8]}"

        def watch() -> None:
            pending = list(peers)
            while not done.is_set():
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    self._die(batch_id, f"exceeded the batch time limit of {time_limit:g} s", label)
                wait = 1.0 if left is None else min(left, 1.0)
                if not pending:
                    done.wait(wait)
                    continue
                ready, pending = ray.wait(pending, num_returns=1, timeout=wait)
                for ref in ready:
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001 - a rank died or raised: the group is unusable
                        cause = getattr(e, "cause", None) or e
                        self._die(batch_id, "a rank failed: " + "".join(traceback.format_exception_only(cause)).strip(),
                                  label)

        thread = threading.Thread(target=watch, daemon=True, name=f"guard {label}")
        thread.start()
        try:
            yield
        finally:
            done.set()
