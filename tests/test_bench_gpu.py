"""bench/gpu.py end to end on its scaled-down config (CPU, float32, a few seconds)."""

import json

import pytest
import torch

from bench import gpu
from speca import SpeCaConfig, estimate_cache_bytes
from speca.forecast import NewtonForecaster

# The scaled-down sizes by hand: latent frames (F - 1) / 4 + 1, H/8 x W/8, patch 1 (one token per latent pixel).
VIDEO_TOKENS = {"64x64x9": 3 * 8 * 8, "128x128x17": 5 * 16 * 16}
TEXT_TOKENS = 16
BLOCKS = 2 + 2  # double + single in the scaled-down config
REPEATS = 2


def run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "gpu.json"
    gpu.main(["--scaled-down", "--device", "cpu", "--repeats", str(REPEATS), "--out", str(out), *extra])
    return json.loads(out.read_text())


def test_scaled_down_run_reports_times_cache_and_flops(tmp_path):
    results = run(tmp_path)
    assert results["device"] == "CPU" and results["dtype"] == "float32"
    assert [row["size"] for row in results["rows"]] == list(VIDEO_TOKENS)
    md = (tmp_path / "gpu.md").read_text()
    assert "CPU" in md and all(size in md for size in VIDEO_TOKENS)
    for row in results["rows"]:
        video = VIDEO_TOKENS[row["size"]]
        assert (row["video_tokens"], row["text_tokens"]) == (video, TEXT_TOKENS)
        full = row["full_step"]
        assert full["status"] == "ok" and len(full["times_s"]) == REPEATS and full["median_s"] > 0
        cache_bytes = {}
        for cache in ("lean", "module"):
            res = row["speca"][cache]
            assert res["status"] == "ok", (row["size"], cache, res)
            # Two warm-up full steps, a speculative warm-up, REPEATS timed speculative steps, the forced full step.
            assert res["pattern"] == "FF" + "S" * (1 + REPEATS) + "F"
            assert res["spec_step_s"] > 0 and res["full_step_s"] > 0
            # The session's cache against the closed-form estimate (float32: 4 bytes), computed here from
            # the hand-counted tokens. Tolerance 1%: both count the same tensors, so they should agree exactly.
            estimate = estimate_cache_bytes(gpu.TINY_CONFIG, SpeCaConfig(order=1, cache=cache), video, TEXT_TOKENS,
                                            dtype_bytes=4)
            assert res["cache_bytes_estimate"] == estimate
            assert res["cache_bytes"] == pytest.approx(estimate, rel=0.01)
            assert res["cache_bytes_allocated"] is None  # the allocator's figure is CUDA-only
            cache_bytes[cache] = res["cache_bytes"]
            # One verified block of four runs in a speculative step.
            assert res["flops_spec"] < row["flops_full"]
            assert res["flops_ratio"] == pytest.approx(1 / BLOCKS)
        assert cache_bytes["lean"] < cache_bytes["module"]


def test_no_budget_skips_every_measurement_and_still_writes(tmp_path):
    results = run(tmp_path, "--budget-s", "0")
    statuses = {row["full_step"]["status"] for row in results["rows"]}
    statuses |= {res["status"] for row in results["rows"] for res in row["speca"].values()}
    assert len(results["rows"]) == len(VIDEO_TOKENS) and statuses == {"skipped (budget)"}
    assert "skipped (budget)" in (tmp_path / "gpu.md").read_text()


def test_oom_is_recorded_and_the_next_measurements_run(tmp_path, monkeypatch):
    original = NewtonForecaster.update

    def update(self, key, rows, step, value):
        if key.startswith("block"):  # only the per-module cache records block features
            raise torch.OutOfMemoryError("simulated")
        return original(self, key, rows, step, value)

    monkeypatch.setattr(NewtonForecaster, "update", update)
    results = run(tmp_path, "--repeats", "1")
    for row in results["rows"]:
        assert row["speca"]["module"] == {"status": "OOM"}
        # SpeCa was removed after each OOM: the next size's lean run enables it again.
        assert row["speca"]["lean"]["status"] == "ok"


def test_sizes_must_fit_the_vae_and_patches():
    assert str(gpu.Size.parse("720x1280x129")) == "720x1280x129"
    assert gpu.Size.parse("544x960x61").latent(16) == (16, 16, 68, 120)
    for bad in ("544x960x60", "540x960x61", "544x960"):
        with pytest.raises(ValueError):
            gpu.Size.parse(bad)
