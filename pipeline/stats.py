"""The per-sample stats record: one typed row per generated (or failed) sample, stored as Parquet.

Schema (`STATS_SCHEMA`):
    id, prompt, seed                 what was asked
    height, width, num_frames        output shape in pixels / frames
    num_inference_steps              denoising steps
    guidance_scale, true_cfg_scale   embedded guidance and true CFG scale
    method                           "none" (every step full) or "speca"
    full_steps                       steps run in full on schedule (pattern `F`)
    spec_accepted                    speculative steps accepted (pattern `S`)
    spec_rejected                    speculative steps rejected and recomputed in full (pattern `R`)
    step_pattern                     one letter per step, e.g. "FFFSSSRSSF..."
    spec_errors, spec_thresholds     verification error and threshold of each speculative step
    flops                            estimated transformer FLOPs spent on the sample
    flops_ratio                      flops relative to the same sample without caching
    cache_bytes                      peak SpeCa feature-cache bytes of the sample's batch
    batch_size                       samples denoised together
    seconds_text, seconds_denoise, seconds_decode, seconds_encode, seconds_upload
                                     wall seconds per stage (batch stages are shared by its samples)
    peak_memory_bytes                peak accelerator memory (CUDA) or process RSS (CPU), rank 0
    rank_decode_tiles, rank_seconds_decode, rank_peak_memory_bytes
                                     per rank of the replica (index = rank): VAE tiles it decoded, its
                                     seconds in the decode, its peak memory (the batch's, shared)
    node_id, replica, attempt        where the sample was made: Ray node id, replica id (empty outside
                                     the Ray job), and which attempt at its batch committed it
    status                           "ok" or "failed"
    error                            the failure, for failed samples
    video                            URL of the MP4
    model, config_json               model id and the full generation config, as JSON
    extra_json                       manifest columns we do not interpret, as JSON

On storage (see pipeline/writer.py): stats/<id>.parquet per sample; the same rows once more per
batch in commits/<batch>.parquet (written last: the batch's commit record), and compacted by the
job's driver into index/<run>-<n>.parquet. `read_stats` reads them all as one table with
O(batches) reads instead of one read per sample; it is the one reader of a run's stats (the job's
resume, the score stage, the benches).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields

import pyarrow as pa
import pyarrow.parquet as pq

STATS_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("seed", pa.int64()),
    ("height", pa.int32()), ("width", pa.int32()), ("num_frames", pa.int32()),
    ("num_inference_steps", pa.int32()), ("guidance_scale", pa.float64()), ("true_cfg_scale", pa.float64()),
    ("method", pa.string()), ("full_steps", pa.int32()), ("spec_accepted", pa.int32()),
    ("spec_rejected", pa.int32()), ("step_pattern", pa.string()),
    ("spec_errors", pa.list_(pa.float64())), ("spec_thresholds", pa.list_(pa.float64())),
    ("flops", pa.float64()), ("flops_ratio", pa.float64()), ("cache_bytes", pa.int64()), ("batch_size", pa.int32()),
    ("seconds_text", pa.float64()), ("seconds_denoise", pa.float64()), ("seconds_decode", pa.float64()),
    ("seconds_encode", pa.float64()), ("seconds_upload", pa.float64()), ("peak_memory_bytes", pa.int64()),
    ("rank_decode_tiles", pa.list_(pa.int32())), ("rank_seconds_decode", pa.list_(pa.float64())),
    ("rank_peak_memory_bytes", pa.list_(pa.int64())),
    ("node_id", pa.string()), ("replica", pa.string()), ("attempt", pa.int32()),
    ("status", pa.string()), ("error", pa.string()), ("video", pa.string()),
    ("model", pa.string()), ("config_json", pa.string()), ("extra_json", pa.string()),
])


@dataclass
class SampleStats:
    id: str
    prompt: str
    seed: int
    height: int
    width: int
    num_frames: int
    num_inference_steps: int
    guidance_scale: float
    true_cfg_scale: float
    method: str = "none"
    full_steps: int = 0
    spec_accepted: int = 0
    spec_rejected: int = 0
    step_pattern: str = ""
    spec_errors: list[float] = field(default_factory=list)
    spec_thresholds: list[float] = field(default_factory=list)
    flops: float = 0.0
    flops_ratio: float = 1.0
    cache_bytes: int = 0
    batch_size: int = 1
    seconds_text: float = 0.0
    seconds_denoise: float = 0.0
    seconds_decode: float = 0.0
    seconds_encode: float = 0.0
    seconds_upload: float = 0.0
    peak_memory_bytes: int = 0
    rank_decode_tiles: list[int] = field(default_factory=list)
    rank_seconds_decode: list[float] = field(default_factory=list)
    rank_peak_memory_bytes: list[int] = field(default_factory=list)
    node_id: str = ""
    replica: str = ""
    attempt: int = 1
    status: str = "ok"
    error: str | None = None
    video: str | None = None
    model: str = ""
    config_json: str = "{}"
    extra_json: str = "{}"

    @classmethod
    def of(cls, request, **fields) -> "SampleStats":
        """The record of `request` (a resolved `SampleRequest`): what was asked, then `fields`."""
        asked = {k: getattr(request, k) for k in ("id", "prompt", "seed", "height", "width", "num_frames",
                                                  "num_inference_steps")}
        return cls(**asked, guidance_scale=float(request.guidance_scale),
                   true_cfg_scale=float(request.true_cfg_scale), **fields)

    def check(self) -> None:
        """Invariants every ok record satisfies; raises ValueError when broken."""
        if self.status == "ok":
            counted = self.full_steps + self.spec_accepted + self.spec_rejected
            if counted != self.num_inference_steps or len(self.step_pattern) != self.num_inference_steps:
                raise ValueError(f"stats of {self.id}: step counts {counted} / pattern {self.step_pattern!r} do not "
                                 f"add up to {self.num_inference_steps} steps")

    @classmethod
    def from_row(cls, row: dict) -> "SampleStats":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    def extra(self) -> dict:
        return json.loads(self.extra_json or "{}")


def to_table(records: list[SampleStats]) -> pa.Table:
    return pa.Table.from_pylist([asdict(r) for r in records], schema=STATS_SCHEMA)


def from_table(table: pa.Table) -> list[SampleStats]:
    return [SampleStats.from_row(r) for r in table.to_pylist()]


STATS_DIR, COMMITS_DIR, INDEX_DIR = "stats", "commits", "index"
# A commit record's or index part's rows: the stats rows plus when their batch was committed.
COMMIT_SCHEMA = STATS_SCHEMA.append(pa.field("committed_at", pa.float64()))


def _stems(storage, folder: str, suffix: str) -> set[str]:
    return {p[len(folder) + 1:-len(suffix)] for p in storage.list(folder) if p.endswith(suffix) and "/" not in
            p[len(folder) + 1:]}


def _read_all(storage, relpaths: list[str], columns: list[str] | None) -> list[pa.Table]:
    """The files' `columns`; a column a file lacks (written before the column existed) reads as nulls."""
    import io

    def one(rel: str) -> pa.Table:
        parquet = pq.ParquetFile(io.BytesIO(storage.read_bytes(rel)))
        have = parquet.schema_arrow.names
        table = parquet.read(columns=[c for c in columns if c in have] if columns is not None else None)
        for c in columns or []:
            if c not in have:
                f = COMMIT_SCHEMA.field(c)
                table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        return table

    with ThreadPoolExecutor(16) as pool:  # object stores: latency-bound, so in parallel
        return list(pool.map(one, relpaths))


def read_stats(storage, columns: list[str] | None = None) -> pa.Table:
    """Every committed stats row of a run as one table: the latest row per id with a stats file.

    Reads index/ and commits/ (one object per batch at most) and, individually, only stats
    files that no record covers (outputs of jobs older than commit records, or a batch that
    crashed before its record). Columns: COMMIT_SCHEMA (committed_at is null for those loose
    files), or "id", `columns` and "committed_at" only, which is all that is parsed.
    """
    names = COMMIT_SCHEMA.names if columns is None else list(dict.fromkeys(["id", *columns, "committed_at"]))
    schema = pa.schema([COMMIT_SCHEMA.field(c) for c in names])
    have = _stems(storage, STATS_DIR, ".parquet")
    records = [p for d in (INDEX_DIR, COMMITS_DIR) for p in storage.list(d) if p.endswith(".parquet")]
    tables = [t for t in _read_all(storage, records, names) if t.num_rows]
    latest: dict[str, tuple[float, int, int]] = {}  # id -> (committed_at, table, row)
    for ti, t in enumerate(tables):
        for ri, (sid, at) in enumerate(zip(t.column("id").to_pylist(), t.column("committed_at").to_pylist())):
            if sid in have and (sid not in latest or at >= latest[sid][0]):
                latest[sid] = (at, ti, ri)
    rows: list[list[int]] = [[] for _ in tables]
    for _, ti, ri in latest.values():
        rows[ti].append(ri)
    parts = [t.take(r).select(names).cast(schema) for t, r in zip(tables, rows) if r]
    loose = _read_all(storage, [f"{STATS_DIR}/{i}.parquet" for i in sorted(have - latest.keys())], names[:-1])
    parts += [t.append_column("committed_at", pa.nulls(t.num_rows, pa.float64())).select(names).cast(schema)
              for t in loose]
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(parts).sort_by("id").combine_chunks()


def done_ids(storage) -> set[str]:
    """Ids committed with status ok whose video and stats are both on storage (a rerun skips them)."""
    table = read_stats(storage, ["status"])
    videos = _stems(storage, "videos", ".mp4")
    return {i for i, s in zip(table.column("id").to_pylist(), table.column("status").to_pylist())
            if s == "ok" and i in videos}
