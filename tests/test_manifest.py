"""Manifest rows: validated up front, bad ones set aside with the field and the reason."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import FLOW_SCHEMA, ResolveStage, manifest_files, read_and_check
from pipeline.config import InvalidRequest, with_token_budget
from pipeline.loading import read_model_info
from pipeline.storage import Storage

INFO = read_model_info("bundled")
LIMITS = with_token_budget(INFO.limits, INFO.defaults)
P = "a red circle moving quickly left on a blue background"


def _stream(files, output, overwrite=False, rows_per_batch=2, limits=LIMITS):
    """The two streaming stages of jobs.manifest, called as Ray Data calls them (without Ray)."""
    stage = ResolveStage(output, None, overwrite)
    out = []
    for unit in files.units:
        units = {k: [v] for k, v in unit.items()}
        for batch in read_and_check(units, files.storage.fs, INFO, limits, rows_per_batch):
            assert batch.schema == FLOW_SCHEMA
            out += stage(batch).to_pylist()
    return out


def check(rows: list[dict], limits=LIMITS) -> tuple[list[dict], list[dict]]:
    """Rows through both stages from a Parquet file in memory: (requests to generate, rejected rows)."""
    import uuid

    keys = list(dict.fromkeys(["prompt", *(k for r in rows for k in r)]))  # a file without it is refused whole
    storage = Storage(f"memory://manifests-{uuid.uuid4().hex}")
    storage.write_parquet("m.parquet", pa.table({k: [r.get(k) for r in rows] for k in keys}))
    flow = _stream(manifest_files(storage.url_for("m.parquet")), f"memory://out-{uuid.uuid4().hex}", limits=limits)
    return ([{**r["request"], "extra": json.loads(r["extra_json"])} for r in flow if r["kind"] == "todo"],
            [r for r in flow if r["kind"] == "rejected"])


def test_rows_resolve_defaults_ids_and_carry_extra_columns():
    todo, rejected = check([{"prompt": P, "seed": 3, "team": "vision"},
                            {"prompt": P, "seed": 4, "num_inference_steps": 8}])
    assert not rejected and len(todo) == 2
    a, b = todo
    assert (a["height"], a["num_frames"], a["num_inference_steps"]) == (32, 17, 50)
    assert b["num_inference_steps"] == 8 and a["id"] != b["id"]
    assert a["extra"] == {"team": "vision"} and b["extra"] == {"team": None}  # a null cell: carried as null
    assert check([{"prompt": P, "seed": 3}])[0][0]["id"] == a["id"]  # stable


@pytest.mark.parametrize("row,field", [
    ({"seed": 1}, "prompt"),
    ({"prompt": "  "}, "prompt"),
    ({"prompt": P, "seed": "abc"}, "seed"),
    ({"prompt": P, "seed": 1.5}, "seed"),
    ({"prompt": P, "height": 30}, "height"),
    ({"prompt": P, "num_frames": 16}, "num_frames"),
    ({"prompt": P, "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": P, "guidance_scale": "high"}, "guidance_scale"),
    ({"prompt": 7}, "prompt"),
])
def test_bad_rows_are_rejected_with_the_field(row, field):
    # One row per file: a column of mixed types would not be Parquet (check_row sees each cell as written).
    todo, _ = check([{"prompt": P}])
    assert len(todo) == 1
    todo, [r] = check([row])
    assert not todo and (r["row"], r["field"]) == (0, field) and field in r["error"]
    assert {k: v for k, v in json.loads(r["row_json"]).items() if v is not None} == row  # as written


@pytest.mark.parametrize("row,field,hint", [
    ({"prompt": P, "id": "x" * 300}, "id", "1 to 128 characters"),
    ({"prompt": P, "id": "clip\x00.mp4"}, "id", "A-Z a-z 0-9"),
    ({"prompt": P, "id": "../escape"}, "id", "starting with a letter or digit"),
    ({"prompt": P, "id": "a b"}, "id", "A-Z a-z 0-9"),
    ({"prompt": P, "height": 1024, "width": 1024, "num_frames": 257}, "height/width/num_frames", "--max-tokens"),
    ({"prompt": P, "num_inference_steps": 10**6}, "num_inference_steps", "<= 1000"),
])
def test_rows_that_could_only_fail_late_are_rejected(row, field, hint):
    todo, [r] = check([{"prompt": P, "id": "ok-1.a_b"}, row])
    assert [t["id"] for t in todo] == ["ok-1.a_b"]
    assert (r["row"], r["field"]) == (1, field) and hint in r["error"]


def test_token_budget_defaults_to_the_model_size_and_can_be_raised():
    d = INFO.defaults
    assert LIMITS.max_tokens == (d.height // 4) * (d.width // 4) * ((d.num_frames - 1) // 4 + 1) == 320
    big = {"prompt": P, "height": 64, "width": 64}  # 4x the default tokens
    assert check([big])[1][0]["field"] == "height/width/num_frames"
    raised = with_token_budget(INFO.limits, INFO.defaults, 4 * 320)
    assert check([big], raised)[0][0]["height"] == 64
    assert check([big], INFO.limits)[0]  # no budget unless one is given
    with pytest.raises(InvalidRequest, match="max_tokens"):
        with_token_budget(INFO.limits, INFO.defaults, 0)


def test_duplicate_ids_first_row_wins():
    todo, rejected = check([{"prompt": P, "id": "x"}, {"prompt": P, "id": "x"}])
    assert len(todo) == 1 and not rejected  # the same video twice: one sample
    todo, rejected = check([{"prompt": P, "id": "x"}, {"prompt": P, "id": "x", "seed": 9}, {"prompt": P, "id": "y"}])
    assert [t["id"] for t in todo] == ["x", "y"] and todo[0]["seed"] == 0
    assert [(r["row"], r["field"]) for r in rejected] == [(1, "id")] and "row 0" in rejected[0]["error"]
    # Rows equal only after defaults are filled in are the same sample too.
    todo, rejected = check([{"prompt": P, "id": "x"}, {"prompt": P, "id": "x", "num_inference_steps": 50}])
    assert len(todo) == 1 and not rejected


def test_read_file_folder_and_prefix_in_stream_order(tmp_path):
    t1 = pa.table({"prompt": [P, P, ""], "seed": [1, 2, 3]})
    t2 = pa.table({"prompt": [P, P], "seed": [3, 1], "note": ["x", "y"]})
    (tmp_path / "m").mkdir()
    pq.write_table(t1, tmp_path / "m" / "part-0.parquet", row_group_size=2)  # two row groups
    pq.write_table(t2, tmp_path / "m" / "part-1.parquet")
    one = manifest_files(str(tmp_path / "m" / "part-0.parquet"))
    assert one.num_rows == 3 and [u["first_row"] for u in one.units] == [0, 2]
    folder = manifest_files(str(tmp_path / "m"))
    assert folder.num_rows == 5 and [u["first_row"] for u in folder.units] == [0, 2, 3]
    assert manifest_files(str(tmp_path / "m" / "part-")).units == folder.units
    rows = _stream(folder, str(tmp_path / "out"))
    assert [(r["kind"], r["row"]) for r in rows] == [("todo", 0), ("todo", 1), ("rejected", 2), ("todo", 3)]
    assert [r["request"]["seed"] for r in rows if r["kind"] == "todo"] == [1, 2, 3]
    assert json.loads(rows[3]["extra_json"]) == {"note": "x"} and rows[2]["field"] == "prompt"
    # Row 4 repeats row 0's content (seed 1): the same derived id, the same sample, dropped (above).
    with pytest.raises(FileNotFoundError, match="no Parquet manifest"):
        manifest_files(str(tmp_path / "nothing"))


def test_done_rows_are_counted_not_passed_on(tmp_path):
    from pipeline.stats import SampleStats, to_table
    from pipeline.writer import stats_path, video_path, write_commit

    storage = Storage(str(tmp_path / "m"))
    storage.write_parquet("p.parquet", pa.table({"prompt": [P, P, P], "seed": [1, 2, 3]}))
    files = manifest_files(storage.url_for("p.parquet"))
    first = _stream(files, str(tmp_path / "out"))
    done = next(r for r in first if r["kind"] == "todo")
    out = Storage(str(tmp_path / "out"))
    req = done["request"]
    stats = SampleStats(**{k: req[k] for k in ("id", "prompt", "seed", "height", "width", "num_frames",
                                                "num_inference_steps", "guidance_scale", "true_cfg_scale")})
    out.write_bytes(video_path(stats.id), b"mp4")
    out.write_parquet(stats_path(stats.id), to_table([stats]))
    write_commit(out, "batch-1", [stats])
    again = _stream(files, str(tmp_path / "out"), rows_per_batch=3)
    assert [r["kind"] for r in again] == ["todo", "todo", "resumed"] and again[-1]["count"] == 1
    assert done["id"] not in {r["id"] for r in again}
    assert [r["kind"] for r in _stream(files, str(tmp_path / "out"), overwrite=True)] == ["todo"] * 3


def test_manifest_on_memory_fs_without_prompt_column():
    st = Storage("memory://manifests")
    st.write_parquet("bad.parquet", pa.table({"text": [P]}))
    with pytest.raises(InvalidRequest, match="no 'prompt' column"):
        manifest_files("memory://manifests/bad.parquet")
