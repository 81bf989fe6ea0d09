"""The Ray batch job on the tiny HunyuanVideo 1.5 folder (`--model`), in process, on 127.0.0.1.

Marked `benchmark` (run with `-m benchmark`): a Ray start and one job take ~30-45 s on 2 shared cores, over
the 1.5 tests' share of the suite's time; the engine, SpeCa and sequence parallelism it drives are tested
in the default run (tests/test_hv15_pipeline.py, test_speca_hv15.py, test_parallel_hv15.py).
"""

import pyarrow as pa
import pytest

import hv15_tiny
from jobs.generate import NAMESPACE, main
from pipeline.stats import from_table
from pipeline.storage import Storage
from pipeline.video_io import decode_mp4


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray on 127.0.0.1 with 4 logical CPUs (a replica's rank and Ray Data's tasks each need one)."""
    import ray

    ray.init(num_cpus=4, namespace=NAMESPACE, include_dashboard=False)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield
    ray.shutdown()


@pytest.mark.benchmark
def test_job_on_a_hv15_folder(local_ray, hv15_model_dir, tmp_path):
    """Rows validated by the 1.5 folder's own limits (4x VAE here: multiples of 4; guidance_scale must stay 1)
    before any compute; the others become MP4s and stats rows with SpeCa's step patterns."""
    rows = [{"prompt": 'the sign says "OPEN"', "id": "glyph", "seed": 1},
            {"prompt": "a red circle moving left", "id": "plain", "seed": 2},
            {"prompt": "a cat", "id": "bad-size", "height": 30},
            {"prompt": "a cat", "id": "bad-guidance", "guidance_scale": 6.0}]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    storage = Storage(str(tmp_path / "in"))
    storage.write_parquet("prompts.parquet", pa.table({k: [r.get(k) for r in rows] for k in keys}))
    out = tmp_path / "out"
    code = main(["--manifest", storage.url_for("prompts.parquet"), "--output", str(out), "--model",
                 str(hv15_model_dir), "--speca", "default", "--batch-size", "2"])
    assert code == 3  # done, some manifest rows rejected
    result = Storage(str(out))
    errors = result.read_parquet("errors/manifest.parquet").to_pylist()
    assert {(e["id"], e["field"]) for e in errors} == {("bad-size", "height"), ("bad-guidance", "guidance_scale")}
    stats = {s.id: s for p in result.list("stats") for s in from_table(result.read_parquet(p))}
    assert set(stats) == {"glyph", "plain"}
    for s in stats.values():
        assert s.status == "ok" and s.batch_size == 2 and s.true_cfg_scale == 6.0
        assert len(s.step_pattern) == 8 and s.step_pattern.startswith("FFF") and s.model == str(hv15_model_dir)
    frames = decode_mp4(out / "videos" / "glyph.mp4").frames
    assert frames.shape == (9, hv15_tiny.HEIGHT, hv15_tiny.WIDTH, 3)
