"""A generation replica: one model instance (an engine) that turns batches into committed samples.

The replica is a threaded Ray actor (two calls at a time). One lock serialises denoising, so
while batch n+1 denoises, batch n is MP4-encoded and uploaded on the other thread: the
accelerator does not wait for storage. A call returns only once every sample of its batch is
durably committed (video, then stats), so the driver never counts a sample done too early.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import traceback
from dataclasses import asdict

from pipeline.config import ModelConfig, SampleRequest
from pipeline.generate import Generator
from pipeline.stats import SampleStats
from pipeline.storage import Storage
from pipeline.video_io import VideoEncoding
from pipeline.writer import write_sample
from speca import SpeCaConfig


class Replica:
    """Engine side of the batch job (wrapped with `ray.remote` by the driver)."""

    def __init__(self, model: dict, speca: dict | None, output: str, storage_options: dict | None, fps: int,
                 crf: int):
        self.generator = Generator.load(ModelConfig(**model), SpeCaConfig(**speca) if speca else None)
        self.storage = Storage(output, storage_options)
        self.encoding = VideoEncoding(fps=fps or self.generator.model.info.defaults.fps, crf=crf)
        self._denoise = threading.Lock()

    def info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_ip": _node_ip(),
                "device": self.generator.model.device}

    def run(self, batch: list[dict]) -> list[dict]:
        """Generate and commit a batch; items are {"request": {...}, "extra": {...}}; returns stats rows."""
        requests = [SampleRequest(**item["request"]) for item in batch]
        with self._denoise:
            samples = self.generator.generate(requests, batch_size=len(requests))
        rows = []
        for item, sample in zip(batch, samples):
            sample.stats.extra_json = json.dumps(item.get("extra", {}), default=str, sort_keys=True)
            rows.append(asdict(write_sample(self.storage, sample, self.encoding)))
        return rows


def _node_ip() -> str:
    try:
        import ray

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
