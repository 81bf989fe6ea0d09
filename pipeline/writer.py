"""Commit generated samples to storage: MP4 first, then its stats row, then the batch's record.

Layout under the output URL:
    videos/<id>.mp4           the clip, prompt / seed / id / step pattern in its metadata
    stats/<id>.parquet        one `SampleStats` row
    commits/<batch>.parquet   the stats rows of one batch, written after all of them: its commit record
    index/<run>-<n>.parquet   commit records compacted by the job's driver (the records are then deleted)
A sample counts as done only when its stats file exists; the stats are written after the video,
each write atomic, so a crash between the two leaves a video that the next run overwrites. The
records only make finding what is done cheap (`pipeline.stats.read_stats`): they hold nothing
the stats files do not.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace

import pyarrow as pa

from .stats import COMMIT_SCHEMA, COMMITS_DIR, INDEX_DIR, STATS_DIR, SampleStats, to_table
from .storage import Storage
from .video_io import VideoEncoding, encode_mp4


def video_path(sample_id: str) -> str:
    return f"videos/{sample_id}.mp4"


def stats_path(sample_id: str) -> str:
    return f"{STATS_DIR}/{sample_id}.parquet"


def commit_path(batch_id: str) -> str:
    return f"{COMMITS_DIR}/{batch_id}.parquet"


def index_path(run_tag: str, seq: int) -> str:
    return f"{INDEX_DIR}/{run_tag}-{seq:06d}.parquet"


def write_sample(storage: Storage, sample, encoding: VideoEncoding) -> SampleStats:
    """Encode and upload `sample` (a GeneratedSample), then commit its stats; returns the stats written.

    Those are the engine's row with this step's own fields (encode and upload seconds, video URL).
    """
    r = sample.request
    t0 = time.perf_counter()
    data = encode_mp4(sample.frames, metadata={
        "title": r.prompt, "prompt": r.prompt, "seed": str(r.seed), "id": r.id, "model": sample.stats.model,
        "step_pattern": sample.stats.step_pattern}, encoding=encoding)
    t1 = time.perf_counter()
    storage.write_bytes(video_path(r.id), data)
    t2 = time.perf_counter()
    stats = replace(sample.stats, seconds_encode=t1 - t0, seconds_upload=t2 - t1,
                    video=storage.url_for(video_path(r.id)))
    storage.write_parquet(stats_path(r.id), to_table([stats]))
    return stats


def write_failure(storage: Storage, stats: SampleStats) -> None:
    """Record a sample that failed for good (status 'failed', error set); a rerun retries it."""
    storage.write_parquet(stats_path(stats.id), to_table([stats]))


def commit_table(rows: list[dict]) -> pa.Table:
    """Rows of `SampleStats` fields plus `committed_at`, as a commit record / index table."""
    return pa.Table.from_pylist(rows, schema=COMMIT_SCHEMA)


def write_commit(storage: Storage, batch_id: str, stats: list[SampleStats]) -> list[dict]:
    """Write the commit record of a batch whose stats files are all written; returns its rows."""
    at = time.time()
    rows = [{**asdict(s), "committed_at": at} for s in stats]
    storage.write_parquet(commit_path(batch_id), commit_table(rows))
    return rows


def write_index(storage: Storage, run_tag: str, seq: int, rows: list[dict], commits: list[str]) -> None:
    """Compact commit records into one index part, then delete the records it covers."""
    storage.write_parquet(index_path(run_tag, seq), commit_table(rows))
    storage.delete_many(sorted(set(commits)))
