"""The batch job on a Ray cluster of several nodes (ray.cluster_utils, every node on 127.0.0.1).

Each worker node declares 1 GPU: a logical resource (Ray schedules by it, nothing uses CUDA), so a
node holds exactly one K=1 replica, as an 8-GPU node holds 8 / K; CPUs are logical too, more than
the bundles, so that Ray Data's read and repartition tasks always find one.
"""

import json
import threading
import time

import pytest

from jobs.generate import main
from pipeline.stats import from_table
from pipeline.storage import Storage
from test_job import _manifest, _rows

HEAD = {"num_cpus": 2, "node_ip_address": "127.0.0.1"}
GPU_NODE = {"num_cpus": 2, "num_gpus": 1, "node_ip_address": "127.0.0.1"}
ARGS = ["--speca", "off", "--batch-size", "2"]


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args=HEAD)
    assert c.address.startswith("127.0.0.1:")  # loopback only
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _start(argv: list[str], address: str) -> tuple[threading.Thread, dict]:
    """jobs.generate in a thread (the main thread keeps the cluster: Ray adds nodes from it only)."""
    import ray

    from jobs.generate import NAMESPACE

    ray.init(address=address, namespace=NAMESPACE)  # jobs.generate uses the driver this thread connected
    result = {}
    thread = threading.Thread(target=lambda: result.update(code=main(argv)), daemon=True)
    thread.start()
    return thread, result


def _wait_committed(out, n: int, job: threading.Thread, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while job.is_alive() and time.time() < deadline:
        if (out / "stats").exists() and len(list((out / "stats").iterdir())) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {n} samples committed while the job ran")


def _committed(out) -> list:
    storage = Storage(str(out))
    return [s for p in storage.list("stats") for s in from_table(storage.read_parquet(p))]


def test_a_node_that_joins_mid_run_gets_a_replica(cluster, tmp_path):
    cluster.add_node(**GPU_NODE)
    out = tmp_path / "out"
    manifest = _manifest(Storage(str(tmp_path / "in")), _rows(40, steps=10))
    job, result = _start(["--manifest", manifest, "--output", str(out), "--replicas", "1-2", *ARGS], cluster.address)
    _wait_committed(out, 2, job)
    joined = cluster.add_node(**GPU_NODE)
    job.join(timeout=900)
    assert result["code"] == 0
    stats = _committed(out)
    assert len(stats) == 40 == len({s.id for s in stats}) and all(s.status == "ok" for s in stats)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["replicas"] == {"min": 1, "max": 2}
    nodes = {r["node_id"] for r in run["replicas"]}
    assert len(run["replicas"]) == 2 and joined.node_id in nodes and len(nodes) == 2
    # Every stats row names its node and replica: both nodes made some of the clips.
    by_replica = {r["replica"]: r for r in run["replicas"]}
    assert {(s.replica, s.node_id) for s in stats} == {(r, by_replica[r]["node_id"]) for r in by_replica}
    assert all(r["samples"] >= 1 for r in run["replicas"]) and sum(r["samples"] for r in run["replicas"]) == 40


def test_a_node_removed_mid_run_loses_and_duplicates_nothing(cluster, tmp_path):
    nodes = [cluster.add_node(**GPU_NODE) for _ in range(2)]
    out = tmp_path / "out"
    manifest = _manifest(Storage(str(tmp_path / "in")), _rows(16, steps=30))
    job, result = _start(["--manifest", manifest, "--output", str(out), "--replicas", "1", *ARGS], cluster.address)
    _wait_committed(out, 1, job)
    [first] = _committed(out)[:1]
    # Not graceful: the node's processes are killed, as a preempted machine's are.
    cluster.remove_node(next(n for n in nodes if n.node_id == first.node_id), allow_graceful=False)
    job.join(timeout=900)
    assert result["code"] == 0
    stats = _committed(out)
    assert len(stats) == 16 == len({s.id for s in stats}) and all(s.status == "ok" for s in stats)
    videos = Storage(str(out)).list("videos")
    assert sorted(v[len("videos/"):-4] for v in videos) == sorted(s.id for s in stats)
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["generated"] == 16 and run["counts"]["failed"] == 0
    # The same replica (Ray restarted it where its placement group went) finished on the other node.
    assert {s.node_id for s in stats} == {n.node_id for n in nodes} and len({s.replica for s in stats}) == 1
    assert {r["node_id"] for r in run["replicas"]} == {n.node_id for n in nodes}
