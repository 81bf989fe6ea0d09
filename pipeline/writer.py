"""Commit one generated sample to storage: MP4 first, then its stats row.

Layout under the output URL:
    videos/<id>.mp4       the clip, prompt / seed / id / step pattern in its metadata
    stats/<id>.parquet    one `SampleStats` row
A sample counts as done only when its stats file exists; the stats are written after the video,
each write atomic, so a crash between the two leaves a video that the next run overwrites.
"""

from __future__ import annotations

import time

from .stats import SampleStats, to_table
from .storage import Storage
from .video_io import VideoEncoding, encode_mp4


def video_path(sample_id: str) -> str:
    return f"videos/{sample_id}.mp4"


def stats_path(sample_id: str) -> str:
    return f"stats/{sample_id}.parquet"


def write_sample(storage: Storage, sample, encoding: VideoEncoding) -> SampleStats:
    """Encode and upload `sample` (a GeneratedSample), then commit its stats; returns the stats."""
    r, stats = sample.request, sample.stats
    t0 = time.perf_counter()
    data = encode_mp4(sample.frames, metadata={
        "title": r.prompt, "prompt": r.prompt, "seed": str(r.seed), "id": r.id, "model": stats.model,
        "step_pattern": stats.step_pattern}, encoding=encoding)
    t1 = time.perf_counter()
    storage.write_bytes(video_path(r.id), data)
    t2 = time.perf_counter()
    stats.seconds_encode, stats.seconds_upload = t1 - t0, t2 - t1
    stats.video = storage.url_for(video_path(r.id))
    storage.write_parquet(stats_path(r.id), to_table([stats]))
    return stats



def write_failure(storage: Storage, stats: SampleStats) -> None:
    """Record a sample that failed for good (status 'failed', error set); a rerun retries it."""
    storage.write_parquet(stats_path(stats.id), to_table([stats]))
