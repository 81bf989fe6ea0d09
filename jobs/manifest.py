"""Prompt manifests: Parquet in, streamed through validation, bad rows set aside with a reason.

Schema (one row per video):
    prompt               string, required, non-empty
    id                   string, optional (1-128 of A-Z a-z 0-9 . _ -); default: a stable hash of the content
    seed                 integer, optional (default 0)
    height, width        integers, optional (default: the model's)
    num_frames           integer 4k+1, optional
    num_inference_steps  integer in [1, 1000], optional
    guidance_scale       number, optional (embedded guidance)
    true_cfg_scale       number, optional (> 1 turns on true CFG)
    negative_prompt      string, optional
Any other column is carried, untouched, into the stats row's `extra_json`.

A manifest is a Parquet file, a folder or a prefix of Parquet files, on any fsspec URL. It is
never held whole: `manifest_dataset` streams it (Ray Data `read_parquet`, file order kept) into
one `ValidateStage` actor, which checks each row against the model's size rules and token
budget before any compute. A bad row (missing or empty prompt, wrong type, impossible or too
large a size, too many steps, an id that is not a valid object name) becomes a "rejected" row
naming the field; the rest of the run goes on. Ids name one video: a row repeating an earlier
row's id with the same content is the same sample (dropped); with other content it is rejected,
naming the earlier row (the first row wins, since a stream cannot take back what it has let
through). Rows already done in the output (see `pipeline.stats.done_ids`) are counted, not
passed on. Rows are typed Arrow (FLOW_SCHEMA: the request and the stats as structs), turned back
into `SampleRequest` / `SampleStats` where they are used.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import InvalidRequest, ModelLimits, SampleRequest
from pipeline.loading import ModelInfo
from pipeline.stats import COMMIT_SCHEMA, done_ids
from pipeline.storage import Storage

KNOWN_COLUMNS = ("prompt", "id", "seed", "height", "width", "num_frames", "num_inference_steps", "guidance_scale",
                 "true_cfg_scale", "negative_prompt")
_INT_FIELDS = ("seed", "height", "width", "num_frames", "num_inference_steps")
_FLOAT_FIELDS = ("guidance_scale", "true_cfg_scale")

ERRORS_SCHEMA = pa.schema([("row", pa.int64()), ("id", pa.string()), ("field", pa.string()),
                           ("error", pa.string()), ("row_json", pa.string())])

# A resolved `SampleRequest` as an Arrow struct (rows carry it typed, not as JSON).
REQUEST_TYPE = pa.struct([("prompt", pa.string()), ("seed", pa.int64()), ("id", pa.string()),
                          ("height", pa.int64()), ("width", pa.int64()), ("num_frames", pa.int64()),
                          ("num_inference_steps", pa.int64()), ("guidance_scale", pa.float64()),
                          ("true_cfg_scale", pa.float64()), ("negative_prompt", pa.string())])

# The rows that flow from validation through the replicas to the driver. kind: "todo" (request,
# extra_json: the manifest columns we do not interpret, stored as the stats row's extra_json),
# "rejected" (field, error, row_json: the row as it was, for the user), "resumed" (`count` rows
# already done); the replicas turn "todo" into "ok" or "failed" (stats: the commit record's row,
# commit: the record's path, ready_at: when the replica could first take a batch).
FLOW_SCHEMA = pa.schema([("kind", pa.string()), ("row", pa.int64()), ("id", pa.string()), ("count", pa.int64()),
                         ("request", REQUEST_TYPE), ("extra_json", pa.string()), ("field", pa.string()),
                         ("error", pa.string()), ("row_json", pa.string()), ("stats", pa.struct(list(COMMIT_SCHEMA))),
                         ("commit", pa.string()), ("ready_at", pa.float64())])


@dataclass
class ManifestEntry:
    request: SampleRequest  # resolved and validated
    row: int  # position in the manifest (0-based, in file order)
    extra: dict = field(default_factory=dict)


@dataclass
class RejectedRow:
    row: int
    id: str | None
    field: str
    error: str
    values: dict


@dataclass
class ManifestFiles:
    """Where a manifest's Parquet files are, found from their footers alone (no rows read)."""

    storage: Storage
    units: list[dict]  # {"path", "row_group", "first_row"}: one per row group, in manifest order
    num_rows: int
    source: str


def manifest_files(url: str, storage_options: dict | None = None) -> ManifestFiles:
    """The Parquet files at `url` (a file, a folder or a prefix); every one must have a prompt column."""
    storage = Storage(url, storage_options)
    fs, path = storage.fs, storage.root
    if fs.isfile(path):
        files = [path]
    else:
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
        if not files:  # a prefix such as s3://bucket/prompts- matching several files
            files = sorted(p for p in fs.glob(path + "*") if p.endswith(".parquet") and fs.isfile(p))
    if not files:
        raise FileNotFoundError(f"no Parquet manifest at {url}")
    units, rows = [], 0
    for f in files:
        meta = pq.ParquetFile(f, filesystem=fs).metadata
        if "prompt" not in meta.schema.names:
            raise InvalidRequest("prompt", None, f"the manifest file {f} has no 'prompt' column "
                                                 f"(columns: {meta.schema.names})")
        for g in range(meta.num_row_groups):
            units.append({"path": f, "row_group": g, "first_row": rows})
            rows += meta.row_group(g).num_rows
    return ManifestFiles(storage, units, rows, url)


def _coerce(name: str, value):
    """Python value of a manifest cell, or raise InvalidRequest naming the column."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if name in _INT_FIELDS:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise InvalidRequest(name, value, "must be an integer")
        return int(value)
    if name in _FLOAT_FIELDS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidRequest(name, value, "must be a number")
        return float(value)
    if not isinstance(value, str):
        raise InvalidRequest(name, value, "must be a string")
    return value


def check_row(row: dict, i: int, info: ModelInfo, limits: ModelLimits) -> ManifestEntry | RejectedRow:
    """Row `i` as a resolved, validated entry, or its rejection naming the field."""
    try:
        if "prompt" not in row or row["prompt"] is None:
            raise InvalidRequest("prompt", None, "is required")
        values = {k: _coerce(k, row.get(k)) for k in KNOWN_COLUMNS if k in row}
        values = {k: v for k, v in values.items() if v is not None}
        values.setdefault("seed", 0)
        req = SampleRequest(**values).resolve(info.defaults)
        req.validate(limits)
    except InvalidRequest as e:
        rid = row.get("id") if isinstance(row.get("id"), str) else None
        return RejectedRow(i, rid, e.field, str(e), row)
    return ManifestEntry(req, i, {k: v for k, v in row.items() if k not in KNOWN_COLUMNS})


class FirstRowWins:
    """Remembers each id's first row: a repeat is dropped, a clash rejected (module docstring)."""

    def __init__(self):
        self.first: dict[str, tuple[bytes, int]] = {}  # id -> (digest of the request, row)

    def check(self, request: dict, row: int) -> str | None:
        """None for a new id; "repeat" for the same content again; else the clash's error."""
        sample_id = request["id"]
        digest = hashlib.blake2b(json.dumps(request, sort_keys=True).encode(), digest_size=16).digest()
        seen = self.first.setdefault(sample_id, (digest, row))
        if seen[1] == row:
            return None
        if seen[0] == digest:
            return "repeat"
        return f"id={sample_id!r} is invalid: row {seen[1]} already uses it for different content"


def _rejected(row: int, sample_id: str | None, field: str, error: str, values: dict) -> dict:
    return {"kind": "rejected", "row": row, "id": sample_id, "count": 1, "field": field, "error": error,
            "row_json": json.dumps(values, default=str, sort_keys=True)}


def _flow_row(got: ManifestEntry | RejectedRow) -> dict:
    if isinstance(got, RejectedRow):
        return _rejected(got.row, got.id, got.field, got.error, got.values)
    return {"kind": "todo", "row": got.row, "id": got.request.id, "count": 1, "request": asdict(got.request),
            "extra_json": json.dumps(got.extra, default=str, sort_keys=True)}


def read_and_check(units: dict, filesystem, info: ModelInfo, limits: ModelLimits, rows_per_batch: int):
    """Ray Data stage: read row groups, check each row on its own (Ray Data fuses it into ResolveStage)."""
    for path, group, first in zip(units["path"], units["row_group"], units["first_row"]):
        i = int(first)
        for batch in pq.ParquetFile(str(path), filesystem=filesystem).iter_batches(
                batch_size=rows_per_batch, row_groups=[int(group)]):
            out = []
            for row in batch.to_pylist():
                out.append(_flow_row(check_row(row, i, info, limits)))
                i += 1
            yield pa.Table.from_pylist(out, schema=FLOW_SCHEMA)


class ResolveStage:
    """Ray Data stage, ONE actor, rows in manifest order: first row wins per id; done rows counted.

    One actor because first-row-wins needs every id in file order; it is a dict lookup a row. (Were
    its process to die, Ray Data would restart it with an empty memory of ids: only a repeated id
    after that point could slip through, to be overwritten by its later row.)
    """

    def __init__(self, output: str, storage_options: dict | None, overwrite: bool):
        self.ids = FirstRowWins()
        self.done = set() if overwrite else done_ids(Storage(output, storage_options))

    def __call__(self, batch: pa.Table) -> pa.Table:
        out, resumed = [], 0
        for r in batch.to_pylist():
            if r["kind"] == "todo":
                clash = self.ids.check(r["request"], r["row"])
                if clash == "repeat":
                    continue
                if clash is not None:
                    r = _rejected(r["row"], r["id"], "id", clash, {**r["request"], **json.loads(r["extra_json"])})
                elif r["id"] in self.done:
                    resumed += 1
                    continue
            out.append(r)
        if resumed:
            out.append({"kind": "resumed", "row": -1, "count": resumed})
        return pa.Table.from_pylist(out, schema=FLOW_SCHEMA)


def manifest_dataset(files: ManifestFiles, info: ModelInfo, limits: ModelLimits, output: str,
                     storage_options: dict | None, overwrite: bool, rows_per_batch: int = 1024):
    """The manifest as a streaming Ray Data dataset of FLOW_SCHEMA rows, in manifest order.

    The units are the files' row groups, listed from their footers in the driver (so every row
    knows its number). Not `read_parquet`: its listing task takes a CPU slot, which the
    replicas may all hold; these stages take none (num_cpus=0), being light. How far they run
    ahead of the replicas is Ray Data's backpressure (see jobs/generate.py).
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    # Rows flow on as 256 KiB blocks (some hundreds of rows), not 128 MiB ones: a replica starts
    # on the first rows of a 10^6-row row group at once.
    ctx.target_max_block_size = 1 << 18
    units = ray.data.from_items(files.units, override_num_blocks=max(1, min(len(files.units), 1000)))
    checked = units.map_batches(
        read_and_check, batch_format="numpy", batch_size=1, num_cpus=0,
        fn_kwargs={"filesystem": files.storage.fs, "info": info, "limits": limits, "rows_per_batch": rows_per_batch})
    return checked.map_batches(
        ResolveStage, batch_format="pyarrow", batch_size=rows_per_batch, compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0, fn_constructor_kwargs={"output": output, "storage_options": storage_options,
                                           "overwrite": overwrite})
