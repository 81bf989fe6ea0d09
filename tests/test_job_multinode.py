"""The batch job on a two-node Ray cluster (ray.cluster_utils, both nodes on 127.0.0.1)."""

import json

from jobs.generate import main
from pipeline.storage import Storage
from test_job import FAST, _manifest, _rows


def test_replicas_spread_over_two_nodes(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    assert cluster.address.startswith("127.0.0.1:")  # loopback only
    try:
        manifest = _manifest(Storage(str(tmp_path / "in")), _rows(4))
        code = main(["--manifest", manifest, "--output", str(tmp_path / "out"), "--replicas", "2",
                     "--address", cluster.address, *FAST])
        assert code == 0
        run = json.loads((tmp_path / "out" / "run.json").read_text())
        assert len({r["node_id"] for r in run["replicas"]}) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
