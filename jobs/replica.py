"""A generation replica: one model over K ranks that turns batches into committed samples.

Each replica is a `Replica` actor of the job's Ray Data `map_batches` stage (an actor pool of R).
It holds one STRICT_PACK placement group of K bundles and the ranks running in it: an `Engine`
(rank 0: denoises, decodes, writes) and K - 1 `RankWorker`s that denoise with it (sequence
parallel; gloo on CPU, NCCL on GPUs). The driver creates the groups and starts the first ranks
(so models load while Ray Data starts); each replica claims a group and its ranks through the
job's `Ledger`, and replaces the ranks when they die. The replica actor itself holds no
resources and imports no torch: it only dispatches and commits.

The engine runs two calls at a time. One lock serialises denoising, so while batch n+1
denoises, batch n is MP4-encoded and uploaded on the other thread: the accelerator does not wait
for storage. A call returns only once every sample of its batch is durably committed (videos,
stats), and the replica then writes the batch's commit record; only then does the row go on to
the driver, so it never counts a sample done too early.

Failures: the replica counts attempts per batch in the `Ledger`. A batch whose ranks die (a
killed process, or the engine ending itself when a batch overruns the per-batch time limit) has
its ranks restarted in the same placement group and is retried; a batch that raises is retried;
after `max_attempts` its samples are recorded failed. A replica process that dies itself is
restarted by Ray Data, which retries its calls.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict

import pyarrow as pa
import ray

from pipeline.config import ModelConfig, SampleRequest
from pipeline.stats import SampleStats
from pipeline.storage import Storage
from pipeline.video_io import VideoEncoding
from pipeline.writer import commit_path, write_commit, write_failure, write_sample

from .manifest import ROW_SCHEMA


class Ledger:
    """The job's shared memory (a plain actor): placement groups, attempts and errors per batch, events."""

    def __init__(self, groups: list, ranks: list[tuple]):
        self.groups, self.ranks = groups, ranks  # ranks[i]: (engine, peers) now running in groups[i]
        self.claims: dict[int, tuple[str, object]] = {}  # group index -> (replica actor id, handle)
        self.info: dict[int, dict] = {}
        self.errors: dict[str, list[str]] = {}
        self.attempts: dict[str, int] = {}
        self.started_rows = 0  # samples whose first attempt has begun (ResolveStage keeps a bounded lead)
        self.events: list[str] = []

    def claim(self, actor_id: str, handle) -> tuple[int, object, tuple]:
        """A placement group and its ranks for a replica: its own again after a restart, else a free one."""
        for i, (owner, _) in self.claims.items():
            if owner == actor_id:
                return i, self.groups[i], self.ranks[i]
        free = [i for i in range(len(self.groups)) if i not in self.claims]
        if not free:  # a replica that died while starting is replaced by a new actor
            free = [i for i, (_, h) in self.claims.items() if not _alive(h)]
        if not free:
            raise RuntimeError(f"all {len(self.groups)} placement groups are held by live replicas")
        self.claims[free[0]] = (actor_id, handle)
        return free[0], self.groups[free[0]], self.ranks[free[0]]

    def set_ranks(self, index: int, ranks: tuple) -> None:
        self.ranks[index] = ranks

    def register(self, index: int, info: dict) -> None:
        self.info[index] = info

    def begin(self, batch_id: str, samples: int) -> tuple[int, list[str]]:
        """Count one more attempt; an earlier attempt that left no error died with its ranks."""
        n = self.attempts[batch_id] = self.attempts.get(batch_id, 0) + 1
        if n == 1:
            self.started_rows += samples
        errors = self.errors.setdefault(batch_id, [])
        if len(errors) < n - 1:
            errors.append("replica died")
        return n, list(errors)

    def started(self) -> int:
        return self.started_rows

    def note(self, batch_id: str, error: str, event: str | None = None) -> None:
        self.errors.setdefault(batch_id, []).append(error)
        if event:
            self.events.append(event)

    def event(self, event: str) -> None:
        self.events.append(event)

    def placements(self) -> dict[int, dict]:
        return dict(self.info)

    def drain_events(self) -> list[str]:
        events, self.events = self.events, []
        return events


def _alive(handle) -> bool:
    try:
        ray.get(handle.__ray_ready__.remote(), timeout=10)
        return True
    except Exception:  # noqa: BLE001 - dead, or not answering
        return False


class RankWorker:
    """Rank r > 0 of a sequence-parallel replica: denoises what rank 0 hands it, writes nothing."""

    def __init__(self, model: dict, speca: dict | None, parallel: dict, rank: int, init_method: str):
        self.generator = _load_rank(model, speca, parallel, rank, init_method)

    def generate(self, requests: list[dict]) -> int:
        self.generator.generate([SampleRequest(**r) for r in requests], batch_size=len(requests))
        return len(requests)


def _load_rank(model: dict, speca: dict | None, parallel: dict, rank: int, init_method: str):
    # Imported here: torch and diffusers load in the rank processes only, so a replica actor
    # starts in a second and its ranks start loading sooner.
    from pipeline.generate import Generator
    from pipeline.parallel import ParallelConfig, create_groups, init_distributed
    from speca import SpeCaConfig

    pcfg = ParallelConfig(**parallel)
    config = ModelConfig(**model)
    if pcfg.world_size > 1:
        init_distributed(rank, pcfg.world_size, init_method, device=config.resolve_device())
        return Generator.load(config, SpeCaConfig(**speca) if speca else None, pcfg, create_groups(pcfg))
    return Generator.load(config, SpeCaConfig(**speca) if speca else None)


class Engine:
    """Rank 0 of a replica: denoises with its peers, then encodes and writes each sample."""

    def __init__(self, model: dict, speca: dict | None, parallel: dict, init_method: str, peers: list,
                 output: str, storage_options: dict | None, fps: int, crf: int, ledger, time_limit: float):
        self.peers = peers
        self.generator = _load_rank(model, speca, parallel, 0, init_method)
        self.storage = Storage(output, storage_options)
        self.encoding = VideoEncoding(fps=fps or self.generator.model.info.defaults.fps, crf=crf)
        self.ledger, self.time_limit = ledger, time_limit
        self._denoise = threading.Lock()

    def info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_ip": _node_ip(),
                "node_id": ray.get_runtime_context().get_node_id(), "device": self.generator.model.device,
                "ranks": 1 + len(self.peers)}

    def run(self, batch: list[dict], batch_id: str, label: str) -> list[dict]:
        """Generate and write a batch of {"request", "extra_json"}; returns the stats rows."""
        requests = [SampleRequest(**item["request"]) for item in batch]
        with self._denoise:  # the time limit starts once the batch holds the model
            timer = self._deadline(batch_id, label, len(requests))
            try:
                peers = [w.generate.remote([item["request"] for item in batch]) for w in self.peers]
                samples = self.generator.generate(requests, batch_size=len(requests))
                ray.get(peers)
            except BaseException:
                timer.cancel()
                raise
        try:
            committed = []
            for item, sample in zip(batch, samples):
                sample.stats.extra_json = item["extra_json"]
                committed.append(write_sample(self.storage, sample, self.encoding))
            return [asdict(s) for s in committed]
        finally:
            timer.cancel()

    def _deadline(self, batch_id: str, label: str, n: int) -> threading.Timer:
        """Past the time limit, record it and end this process: the replica restarts its ranks."""
        def expire():
            message = f"exceeded the batch time limit of {self.time_limit:g} s"
            with contextlib.suppress(Exception):
                ray.get(self.ledger.note.remote(batch_id, message, f"{label} {message} on a batch of {n} "
                                                "sample(s); restarting its ranks"), timeout=10)
            os._exit(1)

        timer = threading.Timer(self.time_limit, expire)
        timer.daemon = True
        timer.start()
        return timer


@ray.remote(num_cpus=0)
def _rendezvous() -> str:
    from pipeline.parallel import free_port

    return f"tcp://{_node_ip()}:{free_port()}"  # on the group's node; rank 0 binds it when the group forms


def start_ranks(group, bundle: dict, engine_args: dict) -> tuple:
    """Start a replica's K ranks in its placement group (without waiting for them to load)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    def place(rank: int) -> dict:
        return {"num_cpus": bundle.get("CPU", 1), "num_gpus": bundle.get("GPU", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=rank)}

    a = engine_args
    world = a["parallel"]["ulysses_degree"] * a["parallel"]["ring_degree"]
    init_method = "" if world == 1 else ray.get(
        _rendezvous.options(scheduling_strategy=place(0)["scheduling_strategy"]).remote())
    peers = [ray.remote(RankWorker).options(max_restarts=0, **place(rank)).remote(
        a["model"], a["speca"], a["parallel"], rank, init_method) for rank in range(1, world)]
    engine = ray.remote(Engine).options(max_concurrency=2, max_restarts=0, **place(0)).remote(
        init_method=init_method, peers=peers, **a)
    return engine, peers


class Replica:
    """The Ray Data UDF: ROW_SCHEMA batches in and out, generated on this replica's ranks."""

    def __init__(self, engine_args: dict, bundle: dict, ledger, max_attempts: int):
        self.engine_args, self.bundle, self.ledger, self.max_attempts = engine_args, bundle, ledger, max_attempts
        self.storage = Storage(engine_args["output"], engine_args["storage_options"])
        self.model_name = engine_args["model"]["model"]
        ctx = ray.get_runtime_context()
        self.index, self.group, (self.engine, self.peers) = ray.get(
            ledger.claim.remote(ctx.get_actor_id(), ctx.current_actor))
        self.label = f"replica {self.index}"
        self._lock = threading.Lock()
        self.generation = 0
        try:
            info = ray.get(self.engine.info.remote())  # the driver started the ranks: wait for the model
        except ray.exceptions.RayActorError:  # they died before this replica (re)started
            info = self._start_ranks()
        self._register(info)
        print(f"[jobs.generate] {self.label}: {info['ranks']} rank(s) on node {info['node_ip']} "
              f"({info['node_id'][:8]}), {info['device']}", file=sys.stderr, flush=True)

    def _register(self, info: dict) -> None:
        """Report where the ranks run and when they could take a batch (`ready_at`, this machine's clock).

        run.json keeps it per replica; a benchmark cannot read it from the replica's log line, which Ray
        forwards to the driver with a delay of its own.
        """
        ray.get(self.ledger.register.remote(self.index, {**info, "ready_at": time.time()}))

    def _start_ranks(self) -> dict:
        for actor in [self.engine, *self.peers]:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.engine, self.peers = start_ranks(self.group, self.bundle, self.engine_args)
        ray.get(self.ledger.set_ranks.remote(self.index, (self.engine, self.peers)))
        return ray.get(self.engine.info.remote())

    def _restart_ranks(self, generation: int) -> None:
        """Replace ranks that died (once, however many calls saw them die)."""
        with self._lock:
            if generation != self.generation:
                return
            self._register(self._start_ranks())
            self.generation += 1

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
        items = [{"request": json.loads(row["request_json"]), "extra_json": row["extra_json"]} for row, _ in group]
        while True:
            attempt, errors = ray.get(self.ledger.begin.remote(batch_id, len(group)))
            if attempt > self.max_attempts:
                error = f"failed {attempt - 1} attempt(s); last: {errors[-1]}"
                stats = [failure_stats(req, error, self.model_name, json.loads(row["extra_json"]))
                         for row, req in group]
                for s in stats:
                    write_failure(self.storage, s)
                return _done_rows(group, write_commit(self.storage, batch_id, stats), "failed", batch_id)
            generation = self.generation
            try:
                rows = ray.get(self.engine.run.remote(items, batch_id, self.label))
            except ray.exceptions.RayActorError:
                ray.get(self.ledger.event.remote(f"{self.label} died; restarting its ranks and retrying "
                                                 f"{len(items)} sample(s)"))
                self._restart_ranks(generation)
                continue
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if e.cause is not None else e
                ray.get(self.ledger.note.remote(batch_id, "".join(traceback.format_exception_only(cause)).strip()))
                continue
            stats = [SampleStats(**r) for r in rows]
            return _done_rows(group, write_commit(self.storage, batch_id, stats), "ok", batch_id)


def _done_rows(group, committed: list[dict], kind: str, batch_id: str) -> list[dict]:
    return [{**row, "kind": kind, "request_json": None, "stats_json": json.dumps(stats, default=str),
             "error": stats["error"], "commit": commit_path(batch_id)} for (row, _), stats in zip(group, committed)]


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
