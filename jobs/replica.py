"""A generation replica: one model instance (an engine) that turns batches into committed samples.

The replica is a threaded Ray actor (two calls at a time). One lock serialises denoising, so
while batch n+1 denoises, batch n is MP4-encoded and uploaded on the other thread: the
accelerator does not wait for storage. A call returns only once every sample of its batch is
durably committed (video, then stats), so the driver never counts a sample done too early.

With K > 1 ranks the replica actor is rank 0: it starts K - 1 `RankWorker` actors in the other
bundles of its placement group, forms a torch.distributed group with them (gloo on CPU, NCCL on
GPUs) and hands every batch to all ranks, which denoise it together (sequence parallel); only
rank 0 decodes and writes. The workers are owned by the replica, so they die with it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import traceback
from dataclasses import asdict

import ray

from pipeline.config import ModelConfig, SampleRequest
from pipeline.generate import Generator
from pipeline.stats import SampleStats
from pipeline.storage import Storage
from pipeline.video_io import VideoEncoding
from pipeline.writer import write_sample
from speca import SpeCaConfig


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
    """Engine side of the batch job (wrapped with `ray.remote` by the driver)."""

    def __init__(self, model: dict, speca: dict | None, output: str, storage_options: dict | None, fps: int,
                 crf: int, parallel: dict | None = None, rank_resources: dict | None = None):
        parallel = parallel or {"ulysses_degree": 1, "ring_degree": 1}
        world = parallel["ulysses_degree"] * parallel["ring_degree"]
        init_method = f"tcp://{_node_ip()}:{_free_port()}"
        self.workers = [_start_worker(model, speca, parallel, rank, init_method, rank_resources or {})
                        for rank in range(1, world)]
        self.generator = _load_rank(model, speca, parallel, 0, init_method)
        self.storage = Storage(output, storage_options)
        self.encoding = VideoEncoding(fps=fps or self.generator.model.info.defaults.fps, crf=crf)
        self._denoise = threading.Lock()

    def info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_ip": _node_ip(),
                "node_id": ray.get_runtime_context().get_node_id(), "device": self.generator.model.device,
                "ranks": 1 + len(self.workers)}

    def run(self, batch: list[dict]) -> list[dict]:
        """Generate and commit a batch; items are {"request": {...}, "extra": {...}}; returns stats rows."""
        requests = [SampleRequest(**item["request"]) for item in batch]
        with self._denoise:
            peers = [w.generate.remote([item["request"] for item in batch]) for w in self.workers]
            samples = self.generator.generate(requests, batch_size=len(requests))
            ray.get(peers)
        rows = []
        for item, sample in zip(batch, samples):
            sample.stats.extra_json = json.dumps(item.get("extra", {}), default=str, sort_keys=True)
            rows.append(asdict(write_sample(self.storage, sample, self.encoding)))
        return rows


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
