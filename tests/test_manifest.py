"""Manifest rows: validated up front, bad ones set aside with the field and the reason."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.manifest import parse_rows, read_manifest
from pipeline.config import InvalidRequest
from pipeline.loading import read_model_info
from pipeline.storage import Storage

INFO = read_model_info("bundled")
P = "a red circle moving left on a blue background"


def test_rows_resolve_defaults_ids_and_carry_extra_columns():
    m = parse_rows([{"prompt": P, "seed": 3, "team": "vision"}, {"prompt": P, "seed": 4, "num_inference_steps": 8}],
                   INFO)
    assert not m.rejected and len(m.entries) == 2
    a, b = m.entries
    assert (a.request.height, a.request.num_frames, a.request.num_inference_steps) == (32, 17, 50)
    assert b.request.num_inference_steps == 8 and a.request.id != b.request.id
    assert a.extra == {"team": "vision"} and b.extra == {}
    assert parse_rows([{"prompt": P, "seed": 3}], INFO).entries[0].request.id == a.request.id  # stable


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
    m = parse_rows([{"prompt": P}, row], INFO)
    assert len(m.entries) == 1 and len(m.rejected) == 1
    r = m.rejected[0]
    assert (r.row, r.field) == (1, field) and field in r.error
    table = m.errors_table()
    assert table.num_rows == 1 and table.column("field")[0].as_py() == field


def test_duplicate_ids():
    same = parse_rows([{"prompt": P, "id": "x"}, {"prompt": P, "id": "x"}], INFO)
    assert len(same.entries) == 1 and not same.rejected  # the same video twice: one sample
    clash = parse_rows([{"prompt": P, "id": "x"}, {"prompt": P, "id": "x", "seed": 9}, {"prompt": P, "id": "y"}], INFO)
    assert [e.request.id for e in clash.entries] == ["y"]
    assert [(r.row, r.field) for r in clash.rejected] == [(0, "id"), (1, "id")]


def test_read_file_folder_and_prefix(tmp_path):
    t1 = pa.table({"prompt": [P, P], "seed": [1, 2]})
    t2 = pa.table({"prompt": [P], "seed": [3], "note": ["x"]})
    (tmp_path / "m").mkdir()
    pq.write_table(t1, tmp_path / "m" / "part-0.parquet")
    pq.write_table(t2, tmp_path / "m" / "part-1.parquet")
    assert len(read_manifest(str(tmp_path / "m" / "part-0.parquet"), INFO).entries) == 2
    folder = read_manifest(str(tmp_path / "m"), INFO)
    assert [e.request.seed for e in folder.entries] == [1, 2, 3] and folder.entries[2].extra == {"note": "x"}
    assert len(read_manifest(str(tmp_path / "m" / "part-"), INFO).entries) == 3
    with pytest.raises(FileNotFoundError, match="no Parquet manifest"):
        read_manifest(str(tmp_path / "nothing"), INFO)


def test_manifest_on_memory_fs_without_prompt_column():
    st = Storage("memory://manifests")
    st.write_parquet("bad.parquet", pa.table({"text": [P]}))
    with pytest.raises(InvalidRequest, match="no 'prompt' column"):
        read_manifest("memory://manifests/bad.parquet", INFO)
