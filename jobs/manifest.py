"""Prompt manifests: Parquet in, validated sample requests out, bad rows set aside with a reason.

Schema (one row per video):
    prompt               string, required, non-empty
    id                   string, optional; default: a stable hash of the row's content
    seed                 integer, optional (default 0)
    height, width        integers, optional (default: the model's)
    num_frames           integer 4k+1, optional
    num_inference_steps  integer >= 1, optional
    guidance_scale       number, optional (embedded guidance)
    true_cfg_scale       number, optional (> 1 turns on true CFG)
    negative_prompt      string, optional
Any other column is carried, untouched, into the stats row's `extra_json`.

A manifest is a Parquet file, a folder or a prefix of Parquet files, on any fsspec URL. Rows are
validated up front against the model's size rules; a bad row (missing or empty prompt, wrong
type, impossible size, an id reused for different content) becomes an error record and the rest
of the run goes on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import InvalidRequest, SampleRequest
from pipeline.loading import ModelInfo
from pipeline.storage import Storage

KNOWN_COLUMNS = ("prompt", "id", "seed", "height", "width", "num_frames", "num_inference_steps", "guidance_scale",
                 "true_cfg_scale", "negative_prompt")
_INT_FIELDS = ("seed", "height", "width", "num_frames", "num_inference_steps")
_FLOAT_FIELDS = ("guidance_scale", "true_cfg_scale")

ERRORS_SCHEMA = pa.schema([("row", pa.int64()), ("id", pa.string()), ("field", pa.string()),
                           ("error", pa.string()), ("row_json", pa.string())])


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
class Manifest:
    entries: list[ManifestEntry]
    rejected: list[RejectedRow]
    source: str

    def errors_table(self) -> pa.Table:
        return pa.Table.from_pylist([
            {"row": r.row, "id": r.id, "field": r.field, "error": r.error,
             "row_json": json.dumps(r.values, default=str, sort_keys=True)} for r in self.rejected],
            schema=ERRORS_SCHEMA)


def read_table(url: str, storage_options: dict | None = None) -> pa.Table:
    """Read every Parquet file at `url` (a file, a folder or a prefix), in path order."""
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
    # Files may differ in optional columns: unify them (missing ones become nulls).
    tables = [pq.read_table(f, filesystem=fs) for f in files]
    return pa.concat_tables(tables, promote_options="permissive")


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


def parse_rows(rows: list[dict], info: ModelInfo, source: str = "<rows>") -> Manifest:
    """Validate manifest rows against a model; see the module docstring for the rules."""
    entries: list[ManifestEntry] = []
    rejected: list[RejectedRow] = []
    for i, row in enumerate(rows):
        try:
            if "prompt" not in row or row["prompt"] is None:
                raise InvalidRequest("prompt", None, "is required")
            values = {k: _coerce(k, row.get(k)) for k in KNOWN_COLUMNS if k in row}
            values = {k: v for k, v in values.items() if v is not None}
            values.setdefault("seed", 0)
            req = SampleRequest(**values).resolve(info.defaults)
            req.validate(info.limits)
        except InvalidRequest as e:
            rid = row.get("id") if isinstance(row.get("id"), str) else None
            rejected.append(RejectedRow(i, rid, e.field, str(e), row))
            continue
        extra = {k: v for k, v in row.items() if k not in KNOWN_COLUMNS}
        entries.append(ManifestEntry(req, i, extra))

    # An id names one video: reused with identical content it is one sample; reused with other
    # content, every row carrying it is rejected (we cannot know which one was meant).
    by_id: dict[str, list[ManifestEntry]] = {}
    for e in entries:
        by_id.setdefault(e.request.id, []).append(e)
    kept = []
    for e in entries:
        group = by_id[e.request.id]
        if len({g.request for g in group}) > 1:
            rejected.append(RejectedRow(e.row, e.request.id, "id", f"id={e.request.id!r} is invalid: used by rows "
                                        f"{[g.row for g in group]} with different content", rows[e.row]))
        elif group[0] is e:
            kept.append(e)
    rejected.sort(key=lambda r: r.row)
    return Manifest(kept, rejected, source)


def read_manifest(url: str, info: ModelInfo, storage_options: dict | None = None) -> Manifest:
    table = read_table(url, storage_options)
    if "prompt" not in table.column_names:
        raise InvalidRequest("prompt", None, f"the manifest at {url} has no 'prompt' column "
                                             f"(columns: {table.column_names})")
    return parse_rows(table.to_pylist(), info, source=url)
