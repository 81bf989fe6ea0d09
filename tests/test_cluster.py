"""The cluster configs agree with the job's CLI: entry point, flags, GPU counts."""

import shlex
from pathlib import Path

import pytest
import yaml

from jobs.generate import build_parser

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


def _entry_args(command: str) -> list[str]:
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "jobs.generate"], words[:3]
    return words[3:]


def _gpus_per_node(group: dict) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])


def test_rayjob_entrypoint_parses_and_fits_the_gpus():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    args = build_parser().parse_args(_entry_args(job["spec"]["entrypoint"]))
    assert args.manifest.startswith("s3://") and args.output.startswith("s3://")
    assert args.ulysses_degree * args.ring_degree == args.ranks_per_replica
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    per_node = {_gpus_per_node(g) for g in groups}
    total = sum(_gpus_per_node(g) * g["replicas"] for g in groups)
    assert all(n % args.ranks_per_replica == 0 for n in per_node)  # a replica fits one node
    assert args.replicas[1] * args.ranks_per_replica * args.gpus_per_rank == total
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_raycluster_autoscales_and_its_elastic_submit_fits_min_and_max_nodes():
    text = (CLUSTER / "raycluster.yaml").read_text()
    cluster = yaml.safe_load(text)
    assert cluster["kind"] == "RayCluster" and cluster["spec"]["enableInTreeAutoscaling"] is True
    groups = cluster["spec"]["workerGroupSpecs"]
    for g in groups:
        assert int(g["rayStartParams"]["num-gpus"]) == _gpus_per_node(g)
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    [submit] = [line.split(" -- ", 1)[1] for line in text.splitlines() if line.startswith("#   ray job submit")]
    args = build_parser().parse_args(_entry_args(submit))
    low, high = args.replicas
    per_node = {_gpus_per_node(g) // (args.ranks_per_replica * int(args.gpus_per_rank)) for g in groups}
    assert per_node == {8 // args.ranks_per_replica}  # a replica fits one node
    assert low == min(per_node) * sum(g["minReplicas"] for g in groups)
    assert high == min(per_node) * sum(g["maxReplicas"] for g in groups)


def test_ray_up_config_and_its_submit_command():
    text = (CLUSTER / "ray-up.yaml").read_text()
    cfg = yaml.safe_load(text)
    gpu_nodes = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_nodes and all(t["resources"]["GPU"] == 8 for t in gpu_nodes)
    comment = [line.lstrip("#").strip().rstrip("\\") for line in text.splitlines() if line.startswith("#")]
    submit = " ".join(comment[1:])
    args = build_parser().parse_args(_entry_args(submit.split(" -- ", 1)[1]))
    assert 8 % args.ranks_per_replica == 0
    low, high = args.replicas
    assert low * args.ranks_per_replica <= sum(t["min_workers"] * 8 for t in gpu_nodes)
    assert high * args.ranks_per_replica == sum(t["max_workers"] * 8 for t in gpu_nodes)


def test_runtime_env_is_offline():
    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and "HF_HOME" in env["env_vars"]


@pytest.mark.parametrize("bad", [["--replicas", "x"], ["--replicas", "3-2"], ["--replicas", "0"], ["--no-such-flag"]])
def test_parser_rejects_what_the_configs_must_not_contain(bad):
    with pytest.raises(SystemExit):
        build_parser().parse_args(bad)
