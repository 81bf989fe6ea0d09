"""The generation CLI under torchrun: 2 ranks (gloo, 127.0.0.1) write what one process writes.

Both decode in tiles of 16 pixels (9 a clip); the two ranks split them 5 / 4 and rank 0 gathers.
"""

import os
import subprocess
import sys

import numpy as np

from pipeline.parallel import free_port
from pipeline.stats import from_table
from pipeline.storage import Storage
from pipeline.video_io import decode_mp4

ARGS = ["--prompt", "a red circle moving quickly left on a blue background",
        "--prompt", "a green square standing still on a white background",
        "--seed", "1", "--seed", "2", "--num-inference-steps", "8", "--batch-size", "2", "--crf", "0",
        "--speca", "default", "--speca-tau0", "0.05", "--vae-tile-size", "16"]  # 9 VAE tiles a clip


def _run(cmd, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd + ARGS + ["--output", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _read(out):
    st = Storage(str(out))
    stats = {s.id: s for p in st.list("stats") for s in from_table(st.read_parquet(p))}
    frames = {i: decode_mp4(st.read_bytes(f"videos/{i}.mp4")).frames for i in stats}
    return stats, frames


def test_torchrun_ulysses_matches_single_process(tmp_path):
    _run([sys.executable, "-m", "pipeline.generate"], tmp_path / "one")
    _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
          "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "pipeline.generate",
          "--ulysses-degree", "2"], tmp_path / "two")
    one_stats, one_frames = _read(tmp_path / "one")
    two_stats, two_frames = _read(tmp_path / "two")
    assert set(one_stats) == set(two_stats) and len(one_stats) == 2
    for i in one_stats:
        assert two_stats[i].step_pattern == one_stats[i].step_pattern
        assert '"ulysses_degree": 2' in two_stats[i].config_json
        assert one_stats[i].rank_decode_tiles == [9] and two_stats[i].rank_decode_tiles == [5, 4]
        assert len(two_stats[i].rank_seconds_decode) == 2 and min(two_stats[i].rank_peak_memory_bytes) > 0
        diff = np.abs(one_frames[i].astype(int) - two_frames[i].astype(int)).max()
        assert diff <= 2  # same latents within 1e-5 -> at most a rounding step apart after lossless x264
