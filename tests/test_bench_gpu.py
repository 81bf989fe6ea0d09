"""bench/gpu.py end to end on its scaled-down config (CPU, float32, a few seconds)."""

import json
import math

import pytest
import torch

from bench import gpu
from bench.cache_memory import storage_bytes
from speca import SpeCaConfig, apply_speca, disable_speca, estimate_cache_bytes
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
            # The row's estimate is the one for this size: within 1% of the bytes the session reported holding
            # (test_cache_estimate_is_what_the_session_holds checks the estimate against the tensors themselves).
            assert res["cache_bytes_estimate"] == pytest.approx(res["cache_bytes"], rel=0.01)
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


@pytest.mark.parametrize("cache", ["lean", "module"])
def test_cache_estimate_is_what_the_session_holds(cache):
    """`estimate_cache_bytes` (what bench.gpu reports and sizes runs by) against every tensor storage a SpeCa session
    holds after drafting, counted by bench.cache_memory's rule (each storage once, through the session's own
    objects), and against the session's peak. Tolerance 1%: besides the cache the session holds only its node
    history (16 bytes here)."""
    model = gpu.build_transformer(gpu.TINY_CONFIG, torch.device("cpu"), torch.float32)
    size = gpu.Size.parse("64x64x9")
    inputs = gpu.make_inputs(model, size, TEXT_TOKENS)
    config = SpeCaConfig(order=1, cache=cache, tau0=math.inf, tau_min=math.inf, warmup_steps=2, max_spec=3)
    session = apply_speca(model, config)
    try:
        session.begin(6)
        for t in torch.linspace(1000.0, 0.0, 7)[:-1]:
            model(**inputs, timestep=t.view(1), return_dict=False)
        assert session.stats()[0].step_pattern == "FFSSSF"
        held = storage_bytes([session], max_depth=10,
                             into=lambda obj: hasattr(obj, "__dict__") and type(obj).__module__.startswith("speca."))
        peak = session.peak_cache_bytes
    finally:
        disable_speca(model)
    estimate = estimate_cache_bytes(gpu.TINY_CONFIG, config, VIDEO_TOKENS[str(size)], TEXT_TOKENS, dtype_bytes=4)
    assert held == pytest.approx(estimate, rel=0.01)
    assert peak == pytest.approx(estimate, rel=0.01)
