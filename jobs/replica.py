"""A generation replica: one model instance (an engine) that turns batches into committed samples.

The replica is the Ray Data `map_batches` stage of the job, an actor pool of R replicas, each
actor running two calls at a time. One lock serialises denoising, so while batch n+1 denoises,
batch n is MP4-encoded and uploaded on the other thread: the accelerator does not wait for
storage. A call returns only once every sample of its batch is durably committed (videos, stats,
then the batch's commit record), so the driver never counts a sample done too early.

Failures: Ray Data restarts a replica whose process died and retries the calls it held. The
replicas count attempts per batch in the job's `Ledger` actor (a retried call is not told its
attempt number), so a batch that fails, kills its replica or overruns the per-batch time limit
(the replica then exits, to be restarted) is retried and, after `max_attempts`, recorded failed.

With K > 1 ranks the replica actor is rank 0: it starts K - 1 `RankWorker` actors in the other
bundles of its placement group, forms a torch.distributed group with them (gloo on CPU, NCCL on
GPUs) and hands every batch to all ranks, which denoise it together (sequence parallel); only
rank 0 decodes and writes. The workers are owned by the replica, so they die with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import traceback

import pyarrow as pa
import ray

from pipeline.config import ModelConfig, SampleRequest
from pipeline.generate import Generator
from pipeline.stats import SampleStats
from pipeline.storage import Storage
from pipeline.video_io import VideoEncoding
from pipeline.writer import commit_path, write_commit, write_failure, write_sample
from speca import SpeCaConfig

from .manifest import ROW_SCHEMA


class Ledger:
    """The job's shared memory (a plain actor): attempts and errors per batch, replicas, events."""

    def __init__(self):
        self.errors: dict[str, list[str]] = {}
        self.attempts: dict[str, int] = {}
        self.replicas: dict[str, tuple[int, dict]] = {}  # actor id -> (index, placement)
        self.events: list[str] = []

    def register(self, actor_id: str, info: dict) -> int:
        if actor_id in self.replicas:
            index, old = self.replicas[actor_id]
            self.events.append(f"replica {index} died (pid {old['pid']}); restarted as pid {info['pid']}, "
                               "retrying the batches it held")
        else:
            index = len(self.replicas)
        self.replicas[actor_id] = (index, info)
        return index

    def begin(self, batch_id: str) -> tuple[int, list[str]]:
        """Count one more attempt; an earlier attempt that left no error died with its replica."""
        n = self.attempts[batch_id] = self.attempts.get(batch_id, 0) + 1
        errors = self.errors.setdefault(batch_id, [])
        if len(errors) < n - 1:
            errors.append("replica died")
        return n, list(errors)

    def note(self, batch_id: str, error: str, event: str | None = None) -> None:
        self.errors.setdefault(batch_id, []).append(error)
        if event:
            self.events.append(event)

    def placements(self) -> list[dict]:
        return [info for _, info in sorted(self.replicas.values(), key=lambda x: x[0])]

    def drain_events(self) -> list[str]:
        events, self.events = self.events, []
        return events


class RankWorker:
    """Rank r > 0 of a sequence-parallel replica: denoises what rank 0 hands it, writes nothing."""

    def __init__(self, model: dict, speca: dict | None, parallel: dict, rank: int, init_method: str):
        self.generator = _load_rank(model, speca, parallel, rank, init_method)

    def generate(self, requests: list[dict]) -> int:
        self.generator.generate([SampleRequest(**r) for r in requests], batch_size=len(requests))
        return len(requests)


def _load_rank(model: dict, speca: dict | None, parallel: dict, rank: int, init_method: str) -> Generator:
    from pipeline.parallel import ParallelConfig, create_groups, init_distributed

    pcfg = ParallelConfig(**parallel)
    config = ModelConfig(**model)
    if pcfg.world_size > 1:
        init_distributed(rank, pcfg.world_size, init_method, device=config.resolve_device())
        return Generator.load(config, SpeCaConfig(**speca) if speca else None, pcfg, create_groups(pcfg))
    return Generator.load(config, SpeCaConfig(**speca) if speca else None)


class Replica:
    """Engine side of the batch job: the Ray Data UDF, ROW_SCHEMA batches in and out."""

    def __init__(self, model: dict, speca: dict | None, output: str, storage_options: dict | None, fps: int,
                 crf: int, parallel: dict, rank_resources: dict, ledger, max_attempts: int, time_limit: float):
        world = parallel["ulysses_degree"] * parallel["ring_degree"]
        init_method = f"tcp://{_node_ip()}:{_free_port()}"
        self.workers = [_start_worker(model, speca, parallel, rank, init_method, rank_resources)
                        for rank in range(1, world)]
        self.generator = _load_rank(model, speca, parallel, 0, init_method)
        self.storage = Storage(output, storage_options)
        self.encoding = VideoEncoding(fps=fps or self.generator.model.info.defaults.fps, crf=crf)
        self.ledger, self.max_attempts, self.time_limit = ledger, max_attempts, time_limit
        self._denoise = threading.Lock()
        info = self.info()
        self.index = ray.get(ledger.register.remote(ray.get_runtime_context().get_actor_id(), info))
        print(f"[jobs.generate] replica {self.index}: {info['ranks']} rank(s) on node {info['node_ip']} "
              f"({info['node_id'][:8]}), {info['device']}", file=sys.stderr, flush=True)

    def info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_ip": _node_ip(),
                "node_id": ray.get_runtime_context().get_node_id(), "device": self.generator.model.device,
                "ranks": 1 + len(self.workers)}

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Generate the "todo" rows (grouped by shape and steps), pass the others through."""
        out, groups = [], {}
        for row in batch.to_pylist():
            if row["kind"] != "todo":
                out.append(row)
                continue
            req = SampleRequest(**json.loads(row["request_json"]))
            groups.setdefault(req.batch_key(), []).append((row, req))
        for group in groups.values():
            out += self._commit(group)
        return pa.Table.from_pylist(out, schema=ROW_SCHEMA)

    def _commit(self, group: list[tuple[dict, SampleRequest]]) -> list[dict]:
        batch_id = hashlib.sha256("\n".join(sorted(r.id for _, r in group)).encode()).hexdigest()[:32]
        while True:
            attempt, errors = ray.get(self.ledger.begin.remote(batch_id))
            if attempt > self.max_attempts:
                error = f"failed {attempt - 1} attempt(s); last: {errors[-1]}"
                stats = [failure_stats(req, error, self.generator.model.info.model, json.loads(row["extra_json"]))
                         for row, req in group]
                for s in stats:
                    write_failure(self.storage, s)
                return _done_rows(group, write_commit(self.storage, batch_id, stats), "failed", batch_id)
            try:
                stats = self._generate(group, batch_id)
            except Exception as e:  # noqa: BLE001 - recorded, retried, then the batch fails
                ray.get(self.ledger.note.remote(batch_id, "".join(traceback.format_exception_only(e)).strip()))
                continue
            return _done_rows(group, write_commit(self.storage, batch_id, stats), "ok", batch_id)

    def _generate(self, group: list[tuple[dict, SampleRequest]], batch_id: str) -> list[SampleStats]:
        requests = [req for _, req in group]
        with self._denoise:  # the time limit starts once the batch holds the model
            timer = self._deadline(batch_id, len(requests))
            try:
                peers = [w.generate.remote([json.loads(row["request_json"]) for row, _ in group])
                         for w in self.workers]
                samples = self.generator.generate(requests, batch_size=len(requests))
                ray.get(peers)
            except BaseException:
                timer.cancel()
                raise
        try:
            committed = []
            for (row, _), sample in zip(group, samples):
                sample.stats.extra_json = row["extra_json"]
                committed.append(write_sample(self.storage, sample, self.encoding))
            return committed
        finally:
            timer.cancel()

    def _deadline(self, batch_id: str, n: int) -> threading.Timer:
        """Past the time limit, record it and end this process: Ray restarts it and retries."""
        def expire():
            message = f"exceeded the batch time limit of {self.time_limit:g} s"
            with contextlib.suppress(Exception):
                ray.get(self.ledger.note.remote(batch_id, message, f"replica {self.index} {message} on a batch of "
                                                f"{n} sample(s); restarting it"), timeout=10)
            os._exit(1)

        timer = threading.Timer(self.time_limit, expire)
        timer.daemon = True
        timer.start()
        return timer


def _done_rows(group, committed: list[dict], kind: str, batch_id: str) -> list[dict]:
    return [{**row, "kind": kind, "request_json": None, "stats_json": json.dumps(stats, default=str),
             "error": stats["error"], "commit": commit_path(batch_id)} for (row, _), stats in zip(group, committed)]


def _start_worker(model: dict, speca: dict | None, parallel: dict, rank: int, init_method: str, resources: dict):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return ray.remote(RankWorker).options(
        num_cpus=resources.get("CPU", 1), num_gpus=resources.get("GPU", 0),
        scheduling_strategy=PlacementGroupSchedulingStrategy(
            ray.util.get_current_placement_group(), placement_group_bundle_index=rank),
    ).remote(model, speca, parallel, rank, init_method)


def _free_port() -> int:
    from pipeline.parallel import free_port

    return free_port()  # on this node; rank 0 binds it when the group forms


def _node_ip() -> str:
    try:
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray
        return "127.0.0.1"


def failure_stats(request: SampleRequest, error: BaseException | str, model: str, extra: dict) -> SampleStats:
    """The stats row of a sample that failed on every attempt."""
    message = error if isinstance(error, str) else "".join(traceback.format_exception_only(error)).strip()
    return SampleStats(
        id=request.id, prompt=request.prompt, seed=request.seed, height=request.height, width=request.width,
        num_frames=request.num_frames, num_inference_steps=request.num_inference_steps,
        guidance_scale=float(request.guidance_scale), true_cfg_scale=float(request.true_cfg_scale),
        status="failed", error=message, model=model, extra_json=json.dumps(extra, default=str, sort_keys=True))
