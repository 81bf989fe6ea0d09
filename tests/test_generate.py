"""Single-process generation on the bundled model, written to real storage and read back."""

import numpy as np
import pytest

from pipeline.config import SampleRequest
from pipeline.generate import Generator, main
from pipeline.stats import from_table
from pipeline.storage import Storage
from pipeline.quality import psnr
from pipeline.video_io import VideoEncoding, decode_mp4
from pipeline.writer import stats_path, video_path, write_sample

PROMPT = "a red circle moving quickly left on a blue background"
STEPS = 6


def test_generate_to_s3_and_read_back(tiny_model, s3_bucket, s3_endpoint):
    gen = Generator(tiny_model)
    [sample] = gen.generate([SampleRequest(prompt=PROMPT, seed=7, num_inference_steps=STEPS)])
    storage = Storage(f"{s3_bucket}/run", storage_options={"endpoint_url": s3_endpoint})
    stats = write_sample(storage, sample, VideoEncoding(fps=8))

    video = decode_mp4(storage.read_bytes(video_path(sample.request.id)))
    assert video.frames.shape == (17, 32, 32, 3)
    assert video.fps == 8
    assert video.metadata["prompt"] == PROMPT and video.metadata["seed"] == "7"
    assert video.metadata["id"] == sample.request.id
    assert psnr(video.frames, sample.frames) > 20  # yuv420p, crf 12, 32x32: 23 dB on noise-like frames

    [row] = from_table(storage.read_parquet(stats_path(sample.request.id)))
    assert (row.id, row.prompt, row.seed) == (sample.request.id, PROMPT, 7)
    assert (row.height, row.width, row.num_frames, row.num_inference_steps) == (32, 32, 17, STEPS)
    assert row.step_pattern == "F" * STEPS and row.full_steps == STEPS and row.method == "none"
    assert row.flops_ratio == 1.0 and row.flops > 0
    assert row.status == "ok" and row.video == stats.video and row.video.startswith("s3://")
    assert row.seconds_denoise > 0 and row.seconds_encode > 0 and row.seconds_upload > 0
    assert row.peak_memory_bytes > 0


def test_deterministic_for_a_seed_and_batch_equals_alone(tiny_model):
    gen = Generator(tiny_model)
    reqs = [SampleRequest(prompt=PROMPT, seed=s, num_inference_steps=STEPS) for s in (1, 2)]
    batch = gen.generate(reqs, batch_size=2)
    assert batch[0].stats.batch_size == 2
    alone = [gen.generate([r], batch_size=1)[0] for r in reqs]
    for b, a in zip(batch, alone):
        assert np.abs(b.frames.astype(int) - a.frames.astype(int)).max() <= 1
    assert np.abs(batch[0].frames.astype(int) - batch[1].frames.astype(int)).max() > 10  # seeds matter


def test_cli_writes_local_folder(tmp_path, capsys):
    out = tmp_path / "videos-out"
    code = main(["--prompt", PROMPT, "--prompt", "a green square moving quickly up on a black background",
                 "--seed", "3", "--seed", "4", "--num-inference-steps", "4", "--speca", "off", "--output", str(out)])
    assert code == 0
    mp4s = sorted(p.name for p in (out / "videos").iterdir())
    stats = sorted(p.name for p in (out / "stats").iterdir())
    assert len(mp4s) == 2 and [m[:-4] for m in mp4s] == [s[:-8] for s in stats]
    assert decode_mp4(out / "videos" / mp4s[0]).frames.shape == (17, 32, 32, 3)


@pytest.mark.parametrize("flag,value,field", [("--height", "30", "height"), ("--num-frames", "16", "num_frames"),
                                              ("--num-inference-steps", "0", "num_inference_steps")])
def test_cli_rejects_bad_input_naming_the_field(tmp_path, capsys, flag, value, field):
    code = main(["--prompt", PROMPT, flag, value, "--output", str(tmp_path)])
    assert code == 2
    assert f"{field}={value}" in capsys.readouterr().err
    assert not (tmp_path / "videos").exists()


def test_speca_fills_the_stats_record(tiny_model):
    from speca import SpeCaConfig

    plain = Generator(tiny_model).generate([SampleRequest(prompt=PROMPT, seed=1, num_inference_steps=20)])[0].stats
    gen = Generator(tiny_model, SpeCaConfig(warmup_steps=2, max_spec=4, tau0=float("inf"), tau_min=float("inf")))
    try:
        s = gen.generate([SampleRequest(prompt=PROMPT, seed=1, num_inference_steps=20)])[0].stats
    finally:
        gen.close()
    assert s.method == "speca" and s.step_pattern.startswith("FFSSSSF")
    assert s.full_steps + s.spec_accepted + s.spec_rejected == 20 and s.spec_accepted > 10
    assert 0 < s.flops_ratio < 0.5 and s.flops == pytest.approx(plain.flops * s.flops_ratio)
    assert len(s.spec_errors) == s.spec_accepted + s.spec_rejected and s.cache_bytes > 0
    assert "speca" in s.config_json and '"max_spec": 4' in s.config_json
