"""The Ray batch job end to end, on 127.0.0.1 only: real Ray (token auth), moto S3, real MP4s.

Ray here gets 4 logical CPUs on the 2 cores: a replica's ranks hold one each, and Ray Data's read
and repartition tasks need one besides (jobs.generate gives a local Ray of its own the same).
"""

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest
from ray.util import placement_group_table

from jobs.generate import NAMESPACE, main
from pipeline.parallel import free_port
from pipeline.stats import COMMIT_SCHEMA, SampleStats, done_ids, from_table, read_stats, to_table
from pipeline.storage import Storage
from pipeline.video_io import decode_mp4
from pipeline.writer import commit_path, stats_path, video_path, write_commit, write_index

P = ["a red circle moving quickly left on a blue background",
     "a green square moving quickly up on a black background",
     "a white triangle standing still on a red background",
     "a yellow circle moving quickly down on a green background"]
FAST = ["--speca", "default", "--batch-size", "2"]


def _manifest(storage: Storage, rows: list[dict], name="prompts.parquet") -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))  # every column, missing cells null
    storage.write_parquet(name, pa.table({k: [r.get(k) for r in rows] for k in keys}))
    return storage.url_for(name)


def _rows(n, steps=3):
    return [{"prompt": P[i % 4], "seed": i, "num_inference_steps": steps, "team": f"t{i}"} for i in range(n)]


def _outputs(storage: Storage):
    stats = [s for p in storage.list("stats") for s in from_table(storage.read_parquet(p))]
    videos = storage.list("videos")
    return stats, videos


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray on 127.0.0.1 (token auth, 4 logical CPUs) shared by this module's in-process job runs."""
    import ray

    ray.init(num_cpus=4, namespace=NAMESPACE, include_dashboard=False)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")  # loopback only
    yield
    ray.shutdown()


def kill_when(out, process: str, stats: int, found: dict, timeout: float = 300) -> threading.Thread:
    """A thread that SIGKILLs the Ray worker process titled `ray::<process>...` in the middle of a batch.

    That is: once `stats` samples are committed and a batch has begun (its attempt record is in
    commits/) without being committed yet, so the kill is certain to hit work in flight.
    """
    import psutil

    def in_flight() -> bool:
        if not (out / "stats").exists() or len(list((out / "stats").iterdir())) < stats:
            return False
        return any(p.name.endswith(".attempts.json") for p in (out / "commits").iterdir())

    def killer():
        deadline = time.time() + timeout
        while time.time() < deadline:
            if in_flight():
                for p in psutil.process_iter(["cmdline"]):
                    if (p.info["cmdline"] or [""])[0].startswith(f"ray::{process}"):
                        found["pid"] = p.pid
                        os.kill(p.pid, signal.SIGKILL)
                        return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def ray_head(tmp_path):
    """A real Ray head on 127.0.0.1 with token auth, stopped afterwards."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16), "OMP_NUM_THREADS": "1"}
    port, dash = free_port(), free_port()
    subprocess.run(["ray", "start", "--head", "--num-cpus", "4", "--node-ip-address", "127.0.0.1",
                    "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    try:
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_ray_job_submit_with_manifest_and_outputs_on_s3(ray_head, s3_bucket, s3_endpoint):
    env, dashboard = ray_head
    storage = Storage(f"{s3_bucket}/data", storage_options={"endpoint_url": s3_endpoint})
    rows = _rows(3) + [{"prompt": "", "seed": 1}, {"prompt": P[0], "height": 30}]
    manifest = _manifest(storage, rows)
    out_url = f"{s3_bucket}/run-1"
    runtime_env = {"env_vars": {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                                          "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")}}
    runtime_env["env_vars"]["OMP_NUM_THREADS"] = "1"
    for _ in range(10):  # a just-started head can answer before its job agent is up
        proc = subprocess.run(
            ["ray", "job", "submit", "--address", dashboard, "--runtime-env-json", json.dumps(runtime_env), "--",
             sys.executable, "-m", "jobs.generate", "--manifest", manifest, "--output", out_url,
             "--storage-options", json.dumps({"endpoint_url": s3_endpoint}), *FAST],
            env=env, capture_output=True, text=True, timeout=600)
        log = proc.stdout + proc.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(3)
    assert "rejected rows (errors/manifest.parquet)  2" in log, log[-3000:]
    out = Storage(out_url, storage_options={"endpoint_url": s3_endpoint})
    stats, videos = _outputs(out)
    assert sorted(s.id for s in stats) == sorted(v[len("videos/"):-4] for v in videos)
    assert len(stats) == 3 and all(s.status == "ok" for s in stats)
    assert sorted(json.loads(s.extra_json)["team"] for s in stats) == ["t0", "t1", "t2"]
    for v in videos:
        assert decode_mp4(out.read_bytes(v)).frames.shape == (17, 32, 32, 3)
    errors = out.read_parquet("errors/manifest.parquet").to_pylist()
    assert sorted((e["row"], e["field"]) for e in errors) == [(3, "prompt"), (4, "height")]
    run = json.loads(out.read_bytes("run.json"))
    assert run["counts"] == {"rows_valid": 3, "rows_rejected": 2, "resumed_done": 0, "generated": 3, "failed": 0,
                             "committed_on_a_retry": 0}
    assert run["versions"]["ray"] and run["config"]["speca"]["cache"] == "lean"
    [replica] = run["replicas"]
    assert {s.replica for s in stats} == {replica["replica"]} and {s.node_id for s in stats} == {replica["node_id"]}


def test_killed_replica_is_restarted_and_nothing_is_lost_or_duplicated(local_ray, tmp_path):
    out = tmp_path / "out"
    manifest = _manifest(Storage(str(tmp_path / "in")), _rows(6, steps=20))  # a second or more a batch
    killed = {}
    thread = kill_when(out, "MapWorker(MapBatches(Replica))", 2, killed)
    before = set(placement_group_table())
    code = main(["--manifest", manifest, "--output", str(out), "--batch-size", "1", "--speca", "off"])
    thread.join(timeout=5)
    # One placement group for the one replica, kept across its restart (jobs/replica.py map_replicas: Ray
    # Data calls ray_remote_args_fn more often than it creates actors unless its memory detector is off).
    assert len(set(placement_group_table()) - before) == 1
    assert code == 0 and "pid" in killed
    stats, videos = _outputs(Storage(str(out)))
    assert len(stats) == 6 == len(videos) == len({s.id for s in stats}) and all(s.status == "ok" for s in stats)
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["generated"] == 6 and run["counts"]["failed"] == 0
    # Ray restarted the same replica actor (same id, new process) and retried the batches it held.
    assert run["counts"]["committed_on_a_retry"] >= 1 and max(s.attempt for s in stats) == 2
    assert len({s.replica for s in stats}) == 1
    assert not [p for p in Storage(str(out)).list("commits") if p.endswith(".attempts.json")]


def test_rerun_generates_only_what_is_missing(local_ray, tmp_path):
    out = tmp_path / "out"
    manifest = _manifest(Storage(str(tmp_path / "in")), _rows(4))
    args = ["--manifest", manifest, "--output", str(out), *FAST]
    assert main(args) == 0
    stats_files = sorted((out / "stats").iterdir())
    video_files = sorted((out / "videos").iterdir())
    kept = {p: p.stat().st_mtime_ns for p in video_files[2:]}
    # An interrupted run: one sample never committed, one crashed between its video and its stats.
    stats_files[0].unlink()
    video_files[0].unlink()
    stats_files[1].unlink()
    assert main(args) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["resumed_done"] == 2 and run["counts"]["generated"] == 2
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # done videos were not rewritten
    stats, videos = _outputs(Storage(str(out)))
    assert len(stats) == 4 == len(videos) == len({s.id for s in stats})
    assert main(args + ["--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["counts"]["generated"] == 4


def test_k2_replica_matches_k1_and_a_killed_rank_1_has_its_batch_retried(local_ray, tmp_path):
    """K=2 gloo: the decode split over both ranks (16-pixel tiles: 9 a clip), videos equal to K=1's."""
    import numpy as np

    manifest = _manifest(Storage(str(tmp_path / "in")), _rows(4, steps=6))  # steps 3+ speculate
    common = ["--manifest", manifest, "--crf", "0", "--vae-tile-size", "16", *FAST]
    assert main(common + ["--output", str(tmp_path / "k1")]) == 0
    killed = {}
    thread = kill_when(tmp_path / "k2", "RankWorker", 1, killed)
    assert main(common + ["--output", str(tmp_path / "k2"), "--ranks-per-replica", "2"]) == 0
    thread.join(timeout=5)
    assert "pid" in killed
    a, b = Storage(str(tmp_path / "k1")), Storage(str(tmp_path / "k2"))
    sa = {s.id: s for s in _outputs(a)[0]}
    sb = {s.id: s for s in _outputs(b)[0]}
    assert set(sa) == set(sb) and len(sa) == 4
    for i in sa:
        assert sa[i].step_pattern == sb[i].step_pattern
        assert sa[i].rank_decode_tiles == [9] and sb[i].rank_decode_tiles == [5, 4]  # each rank's share
        fa = decode_mp4(a.read_bytes(f"videos/{i}.mp4")).frames.astype(int)
        fb = decode_mp4(b.read_bytes(f"videos/{i}.mp4")).frames.astype(int)
        assert np.abs(fa - fb).max() <= 2  # latents agree to 1e-5 (tests/test_parallel.py), tiles to 1e-5
    run = json.loads((tmp_path / "k2" / "run.json").read_text())
    assert run["replicas"][0]["ranks"] == 2 and run["counts"]["committed_on_a_retry"] >= 1
    assert max(s.attempt for s in sb.values()) == 2  # the batch rank 1 died in, retried by Ray on a new replica


def test_hostile_rows_are_rejected_up_front_and_the_rest_finishes(local_ray, tmp_path):
    hostile = [{"prompt": P[0], "id": "x" * 300}, {"prompt": P[1], "id": "clip\x00.mp4"},
               {"prompt": P[2], "height": 1024, "width": 1024, "num_frames": 257},
               {"prompt": P[3], "num_inference_steps": 10**6}]
    out = tmp_path / "out"
    manifest = _manifest(Storage(str(tmp_path / "in")), _rows(2) + hostile)
    started = time.monotonic()
    assert main(["--manifest", manifest, "--output", str(out), *FAST]) == 3
    took = time.monotonic() - started
    errors = Storage(str(out)).read_parquet("errors/manifest.parquet").to_pylist()
    assert [(e["row"], e["field"]) for e in errors] == [
        (2, "id"), (3, "id"), (4, "height/width/num_frames"), (5, "num_inference_steps")]
    assert "\x00" in json.loads(errors[1]["row_json"])["id"]  # the row as it was, for the user to fix
    stats, videos = _outputs(Storage(str(out)))
    assert sorted(s.seed for s in stats) == [0, 1] and all(s.status == "ok" for s in stats) and len(videos) == 2
    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"rows_valid": 2, "rows_rejected": 4, "resumed_done": 0, "generated": 2, "failed": 0,
                             "committed_on_a_retry": 0}
    assert run["config"]["max_tokens"] == 320 and run["config"]["max_steps"] == 1000
    assert took < 300  # nothing ran the hostile rows (one of them alone used to take over 10 minutes)


def test_replicas_the_cluster_cannot_hold_fail_after_the_ready_timeout_naming_what_is_missing(local_ray, tmp_path,
                                                                                             capfd):
    out = tmp_path / "out"
    manifest = _manifest(Storage(str(tmp_path / "in")), _rows(1))
    code = main(["--manifest", manifest, "--output", str(out), "--gpus-per-rank", "1", "--ready-timeout", "3"])
    err = capfd.readouterr().err
    assert code == 2 and "no 1 replica(s) of 1 x {'CPU': 1.0, 'GPU': 1.0} on one node each were ready after 3 s" in err
    assert not (out / "videos").exists() and not (out / "run.json").exists()


def test_batch_over_the_time_limit_restarts_the_replica_then_is_recorded_failed(local_ray, tmp_path):
    out = tmp_path / "out"
    manifest = _manifest(Storage(str(tmp_path / "in")), _rows(1, steps=300))  # seconds on this model
    code = main(["--manifest", manifest, "--output", str(out), "--speca", "off", "--batch-time-limit", "0.5",
                 "--max-attempts", "2"])
    assert code == 1
    [failed] = Storage(str(out)).read_parquet("errors/failed.parquet").to_pylist()
    assert failed["status"] == "failed" and failed["num_inference_steps"] == 300 and failed["attempt"] == 2
    assert failed["error"] == "failed 2 attempt(s); last: exceeded the batch time limit of 0.5 s"
    stats, videos = _outputs(Storage(str(out)))
    assert [s.status for s in stats] == ["failed"] and videos == []
    assert json.loads((out / "run.json").read_text())["counts"]["failed"] == 1


def _commit_batches(storage: Storage, batches: list[list[SampleStats]]) -> None:
    """What a replica writes per batch (videos, stats files, then the commit record), minus the model."""
    for i, batch in enumerate(batches):
        for s in batch:
            storage.write_bytes(video_path(s.id), b"mp4")
            storage.write_parquet(stats_path(s.id), to_table([s]))
        write_commit(storage, f"batch-{i}", batch)


def _stats(i: int, status: str = "ok") -> SampleStats:
    return SampleStats(id=f"s{i:03d}", prompt=P[i % 4], seed=i, height=32, width=32, num_frames=17,
                       num_inference_steps=3, guidance_scale=1.0, true_cfg_scale=1.0, status=status)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_stats_reader_reads_one_object_per_batch(kind, tmp_path, request, monkeypatch):
    if kind == "s3":
        storage = Storage(f"{request.getfixturevalue('s3_bucket')}/run",
                          {"endpoint_url": request.getfixturevalue("s3_endpoint")})
    else:
        storage = Storage(str(tmp_path / "run"))
    batches = [[_stats(4 * b + j) for j in range(4)] for b in range(5)]  # 20 samples, 5 batches
    _commit_batches(storage, batches)
    # The driver compacts the first three records into an index part, a later run fails s001 again,
    # a sample from before commit records has only its stats file, s002's video and s003's stats are gone.
    rows = [r for b in range(3) for r in commit_table_rows(storage, f"batch-{b}")]
    write_index(storage, "run-a", 0, rows, [commit_path(f"batch-{b}") for b in range(3)])
    _commit_batches(storage, [[_stats(1, "failed")]])  # batch-0 again: a newer record for s001
    legacy = _stats(99)
    storage.write_bytes(video_path(legacy.id), b"mp4")
    storage.write_parquet(stats_path(legacy.id), to_table([legacy]))
    storage.delete(video_path("s002"))
    storage.delete(stats_path("s003"))

    reads: list[str] = []
    real = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda rel: reads.append(rel) or real(rel))
    table = read_stats(storage)
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert sorted(by_id) == sorted({f"s{i:03d}" for i in range(20)} - {"s003"} | {"s099"})
    assert by_id["s001"]["status"] == "failed" and by_id["s000"]["status"] == "ok"
    assert table.schema == COMMIT_SCHEMA and by_id["s099"]["committed_at"] is None
    # index part + 3 records (batch-0 rewritten, batch-3, batch-4) + the one uncovered stats file
    assert sorted(reads) == sorted(["index/run-a-000000.parquet", "commits/batch-0.parquet",
                                    "commits/batch-3.parquet", "commits/batch-4.parquet", "stats/s099.parquet"])
    done = done_ids(storage)
    assert done == set(by_id) - {"s001", "s002"}


def commit_table_rows(storage: Storage, batch: str) -> list[dict]:
    return storage.read_parquet(commit_path(batch)).to_pylist()
