"""bench/pipeline.py at its smallest: R=1, 3 samples, 2 steps; its report agrees with what the job wrote."""

import argparse
import json
import os
import re

import pyarrow.parquet as pq
import pytest

from bench import pipeline as bench
from pipeline.stats import read_stats
from pipeline.storage import Storage


def test_replica_list_parsing():
    assert bench._replica_list("1, 2,4") == [1, 2, 4]
    for bad in ("0", "1,x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            bench._replica_list(bad)


def test_smallest_run_report_matches_the_job_outputs(tmp_path):
    out = tmp_path / "report.md"
    work = tmp_path / "work"
    argv = ["--replicas", "1", "--samples", "3", "--steps", "2", "--batch-size", "2",
            "--workdir", str(work), "--out", str(out)]
    assert bench.main(argv) == 0

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["machine"]["cpu_count"] == os.cpu_count()
    assert report["command"] == "python -m bench.pipeline " + " ".join(argv)
    [r] = report["runs"]
    run = json.loads((work / "r1" / "run.json").read_text())
    assert r["replicas"] == 1 and r["generated"] == 3 == run["counts"]["generated"] and r["failed"] == 0
    assert r["num_inference_steps"] == [2] and r["batch_size"] == 2

    # Throughput: as the job computed it, and consistent with its counts and wall time.
    sph = r["samples_per_hour"]
    assert sph["run_json"] == pytest.approx(run["samples_per_hour"], rel=1e-9)
    assert sph["run_json"] == pytest.approx(run["counts"]["generated"] / run["wall_seconds"] * 3600, rel=0.01)
    s = r["seconds"]
    assert sph["process"] == pytest.approx(3 / s["process"] * 3600, rel=1e-6)
    assert sph["steady_state"] == pytest.approx(3 / s["steady_window"] * 3600, rel=1e-6)
    # The process outlives the job's own clock, which outlives the steady window.
    assert 0 < s["steady_window"] < run["wall_seconds"] < s["process"]
    assert 0 < sph["process"] < sph["run_json"] < sph["steady_state"]
    assert 0 < s["startup"] < s["first_commit"] < s["process"] and s["teardown"] > 0
    assert s["imports_and_manifest"] > 0 and s["ray_and_model_load"] > 0
    assert s["imports_and_manifest"] + s["ray_and_model_load"] == pytest.approx(s["startup"], rel=1e-9)
    # Two clocks that do not share code: every commit record (the replica's time.time() when it
    # wrote the batch's record) comes after its samples' stats files were written (file mtimes,
    # which the report's commit times use) and before the job's wall clock ended.
    committed = {x["id"]: x["committed_at"] for x in read_stats(Storage(str(work / "r1"))).to_pylist()}
    mtimes = {f.stem: f.stat().st_mtime for f in (work / "r1" / "stats").glob("*.parquet")}
    assert sorted(committed) == sorted(mtimes) and len(committed) == 3
    assert all(mtimes[i] - 0.05 <= committed[i] <= mtimes[i] + 30 for i in committed)
    assert max(committed.values()) - min(committed.values()) <= s["steady_window"] + 1
    # The replica's ready_at (run.json, its own clock) opens the steady window: before its first commit.
    assert run["replicas"][0]["ready_at"] < min(committed.values())

    # Stage sums recomputed from the stats files: batch stages once per batch (2 batches: 2 + 1).
    rows = [pq.read_table(f).to_pylist()[0] for f in sorted((work / "r1" / "stats").glob("*.parquet"))]
    assert len(rows) == 3 and sorted(x["batch_size"] for x in rows) == [1, 2, 2]
    batches = {(x["seconds_denoise"], x["batch_size"]) for x in rows}
    assert len(batches) == 2
    denoise = sum(d for d, _ in batches)
    assert r["stage_seconds"]["denoise"] == pytest.approx(denoise, rel=1e-9)
    assert r["stage_seconds"]["encode"] == pytest.approx(sum(x["seconds_encode"] for x in rows), rel=1e-9)
    busy = r["denoise_busy_share"]
    assert 0 < busy["steady_window"] <= 1 and 0 < busy["run_wall"] <= 1
    assert busy["steady_window"] == pytest.approx(denoise / s["steady_window"], rel=1e-6)
    assert busy["run_wall"] == pytest.approx(denoise / run["wall_seconds"], rel=1e-6)
    assert busy["run_wall"] < busy["steady_window"]
    o = r["overlap"]
    outside = sum(r["stage_seconds"][k] for k in ("text", "decode", "encode", "upload"))
    assert r["outside_denoise"]["seconds"] == pytest.approx(outside, rel=1e-9) and outside > 0
    assert o["serial_seconds"] == pytest.approx(outside + denoise, rel=1e-9)
    assert o["hidden_seconds"] == pytest.approx(max(0.0, o["serial_seconds"] - s["steady_window"]), abs=1e-9)
    assert 0 <= o["hidden_share_of_outside"] <= 1

    md = out.read_text()
    assert (f"| 1 | {sph['run_json']:.0f} | {sph['process']:.0f} | {sph['steady_state']:.0f} | 1.00x / 1.00x | "
            f"{s['startup']:.1f} ({s['imports_and_manifest']:.1f} / {s['ray_and_model_load']:.1f}) |") in md
    assert f"{os.cpu_count()} CPUs" in md and report["command"] in md
    log = (work / "r1.log").read_text()
    assert len(set(re.findall(r"\[jobs\.generate\] replica ([0-9a-f]{12}): 1 rank", log))) == 1


def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0 and "--replicas" in capsys.readouterr().out
    assert bench.main(["--samples", "0", "--out", os.devnull]) == 2
