"""bench/replica_model.py: its tile count is diffusers' own, and its report holds the figures it computed."""

import json

import torch

from bench import replica_model


def test_tile_count_is_the_number_of_decoder_calls_diffusers_makes():
    """The formula against a real tiled + framewise decode (the bundled VAE, tiles scaled down 16x)."""
    from diffusers import AutoencoderKLHunyuanVideo

    from pipeline.loading import bundled_model_dir

    vae = AutoencoderKLHunyuanVideo.from_pretrained(bundled_model_dir() / "vae").eval()
    vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=12,
                      tile_sample_stride_width=12)
    vae.use_framewise_decoding = True
    height, width, frames = 40, 56, 25  # 20 x 28 latents (stride 6: 4 x 5 tiles), 7 latent frames (stride 3: 3)
    calls = []
    handle = vae.decoder.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        vae.decode(torch.zeros(1, 16, 7, height // 2, width // 2), return_dict=False)
    handle.remove()
    assert replica_model.vae_tiles(vae, height, width, frames) == len(calls) == 60


def test_report(tmp_path):
    out = tmp_path / "model.md"
    assert replica_model.main(["--ranks", "8", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["vae_tiles"] == 308 and report["tokens"] == 118_800  # 720p x 129 at diffusers' default tiles
    assert 12.5e9 < report["params"]["transformer"] < 13e9
    after, before = report["memory_gb"]["after"], report["memory_gb"]["before"]
    # Only rank 0 holds the text encoders now: the other ranks lose exactly their weights.
    text = report["weights_gb"]["llama"] + report["weights_gb"]["clip"]
    assert before["ranks 1..K-1"] - after["ranks 1..K-1"] > 0.9 * text and after["rank 0"] == before["rank 0"]
    row = report["time"]["v1"]
    assert row["after"]["decode"] < row["before"]["decode"] / 5 and row["share_after"] < row["share_before"]
    md = out.read_text()
    assert f"| {row['share_before']:.1%} | {row['share_after']:.1%} |" in md and "[sglang]" in md
