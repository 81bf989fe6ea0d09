"""bench/hv15_paper.py: HunyuanVideo 1.5's real sizes on paper, from the real classes and the family's formulas."""

import json

import pytest

from bench import hv15_paper
from speca import SpeCaConfig
from speca import hunyuan_video15 as family


def test_report(tmp_path):
    out = tmp_path / "hv15.md"
    assert hv15_paper.main(["--ranks", "1,8", "--out", str(out)]) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    assert 8.2e9 < r["params"]["transformer"] < 8.4e9  # "8.3B"
    assert 6.9e9 < r["params"]["qwen"] < 7.2e9 and 0.2e9 < r["params"]["byt5"] < 0.25e9
    rows = {(x["size"], x["ranks"]): x for x in r["rows"]}
    assert (rows["480p", 1]["video_tokens"], rows["720p", 1]["video_tokens"]) == (49_290, 111_600)
    one, eight = rows["720p", 1], rows["720p", 8]
    # The default preset's lean cache, both CFG contexts, this rank's tokens: the family's own estimate.
    expected = family.estimate_cache_bytes({"num_attention_heads": 16, "attention_head_dim": 128, "out_channels": 32,
                                            "patch_size": 1, "patch_size_t": 1},
                                           SpeCaConfig.from_name("default"), 13_950, 1985, contexts=2,
                                           clip_tokens=111_600)
    assert eight["tokens_per_rank"] == 13_950 and eight["cache_gb"] == pytest.approx(expected / 1e9, rel=1e-12)
    assert one["pflops_per_video"] == pytest.approx(632.47, rel=1e-4)  # 100 passes of 54 blocks over 113,585 tokens
    assert eight["seconds_lower_bound"] == pytest.approx(one["seconds_lower_bound"] / 8)
    # Only rank 0 holds the text encoders; more ranks, less cache and activations on each.
    text = r["weights_gb"]["qwen"] + r["weights_gb"]["byt5"]
    assert eight["rank0_gb"] - eight["other_ranks_gb"] == pytest.approx(text)
    assert eight["rank0_gb"] < one["rank0_gb"] < 80
    md = out.read_text()
    assert "| 720p (1280x720) | 111,600 + 1,985 | 8 |" in md and "8.33 B parameters" in md
    assert hv15_paper.main(["--ranks", "3", "--out", str(out)]) == 2  # 3 does not divide the 16 heads


def test_gpu_bench_runs_the_15_family_scaled_down(tmp_path):
    """`bench.gpu --family hunyuan_video15` (what a lent GPU runs at 480p / 720p x 121) on its scaled-down config:
    full and speculative steps timed, and its cache estimate is the bytes the session held."""
    from bench import gpu

    out = tmp_path / "gpu.json"
    gpu.main(["--scaled-down", "--family", "hunyuan_video15", "--device", "cpu", "--repeats", "1", "--sizes",
              "64x64x9", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["class"] == "HunyuanVideo15Transformer3DModel" and results["model"]["num_layers"] == 4
    [row] = results["rows"]
    assert (row["video_tokens"], row["text_tokens"]) == (3 * 4 * 4, 8 + 4 + 4)  # 16x VAE: 4 x 4 latents
    for cache in ("lean", "module"):
        res = row["speca"][cache]
        assert res["status"] == "ok" and res["pattern"] == "FFSSF"
        assert res["cache_bytes_estimate"] == pytest.approx(res["cache_bytes"], rel=0.01)
        assert res["flops_ratio"] == pytest.approx(res["draft_blocks"] / 4)
    assert "4 dual-stream blocks" in (tmp_path / "gpu.md").read_text()
