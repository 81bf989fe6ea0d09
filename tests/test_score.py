"""The scoring stage: real vbench (its own virtualenv) on a real run, the report in headless Chromium.

The first run builds the VBench environment (pip, a few minutes; reused afterwards, see
jobs/vbench_env.py). Chromium comes from Debian's `chromium` package (the README's test command
installs it).
"""

import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs import score, vbench_env
from jobs.generate import main as generate
from jobs.vbench_scores import NORMALIZE, aggregate
from pipeline.quality import psnr, temporal_flickering
from pipeline.video_io import decode_mp4
from pipeline.loading import bundled_model_dir
from pipeline.tiny.worlds import world_of

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_aggregate_follows_vbench_definition():
    means = {d: lo + 0.75 * (hi - lo) for d, (lo, hi) in NORMALIZE.items()}  # every dimension at 75% of its range
    means["dynamic_degree"] = 0.2
    full = aggregate(means)
    # Quality: six dimensions at 0.75 with weight 1, dynamic degree 0.2 with weight 0.5.
    quality = (6 * 0.75 + 0.5 * 0.2) / 6.5
    assert full.quality == pytest.approx(quality, abs=1e-9)
    assert full.semantic == pytest.approx(0.75, abs=1e-9)
    assert full.total == pytest.approx((4 * quality + 0.75) / 5, abs=1e-9)
    assert not full.partial and full.missing == []

    partial = aggregate({"temporal_flickering": 0.97})
    assert partial.partial and partial.total is None and partial.semantic is None
    assert partial.quality == pytest.approx((0.97 - 0.6293) / (1.0 - 0.6293), abs=1e-9)
    assert partial.ran == ["temporal_flickering"] and len(partial.missing) == 15
    with pytest.raises(ValueError, match="not VBench dimensions"):
        aggregate({"sharpness": 1.0})


def test_missing_weights_fail_fast_with_the_file_list(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "empty-cache"))
    code = score.main(["--run", str(tmp_path / "no-run-here"), "--dimensions", "temporal_flickering,subject_consistency",
                       "--vbench-env", str(tmp_path / "env")])
    err = capsys.readouterr().err
    assert code == 2
    # The weights are checked first: the message is about them, not the (missing) run.
    assert "dino_model/dino_vitbase16_pretrain.pth" in err and "facebookresearch_dino_main" in err
    assert "no run.json" not in err
    assert not (tmp_path / "env").exists()  # no environment was built

    # As the job's second stage it refuses before generating anything.
    out = tmp_path / "out"
    code = generate(["--output", str(out), "--score", "--dimensions", "motion_smoothness"])
    assert code == 2 and not (out / "videos").exists()
    assert "amt_model/amt-s.pth" in capsys.readouterr().err


def test_unsupported_and_unknown_dimensions_are_named(tmp_path, capsys):
    assert score.main(["--run", str(tmp_path), "--dimensions", "color"]) == 2
    assert "['color']" in capsys.readouterr().err
    assert score.main(["--run", str(tmp_path), "--dimensions", "temporal_flicker"]) == 2
    assert "temporal_flicker" in capsys.readouterr().err


def test_not_a_run_folder(tmp_path, capsys):
    assert score.main(["--run", str(tmp_path), "--dimensions", "none"]) == 2
    assert "no run.json" in capsys.readouterr().err


@pytest.fixture(scope="module")
def scored_runs(tmp_path_factory, local_ray):
    """An uncached reference run and a SpeCa run of the same manifest, scored as the job's second stage.

    VBENCH_CACHE_DIR is an empty folder: temporal flickering needs no weights, LPIPS is not provisioned.
    """
    root = tmp_path_factory.mktemp("runs")
    env = pytest.MonkeyPatch()
    env.setenv("VBENCH_CACHE_DIR", str(root / "vbench-cache"))
    w = world_of(bundled_model_dir())
    specs = w.eval_set(3)
    manifest = root / "prompts.parquet"
    pq.write_table(pa.table({"id": [f"clip-{i}" for i in range(3)], "prompt": [s.prompt for s in specs],
                             "seed": [w.eval_seed_base + i for i in range(3)]}), manifest)
    ref, run = root / "reference", root / "speca"
    common = ["--manifest", str(manifest), "--batch-size", "3", "--crf", "0"]
    assert generate([*common, "--output", str(ref), "--speca", "off"]) == 0
    assert generate([*common, "--output", str(run), "--speca", "default", "--score", "--reference", str(ref),
                     "--dimensions", "temporal_flickering"]) == 0
    yield ref, run
    env.undo()


def test_report_files_and_vbench_scores(scored_runs):
    _, run = scored_runs
    report = run / "report"
    for name in ("index.html", "report.md", "scores.json", "scores.parquet", "steps_histogram.png",
                 "acceptance_per_step.png", "speedup_vs_quality.png", "quality_vs_steps.png"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    summary = json.loads((report / "scores.json").read_text())
    vb = summary["vbench"]
    assert vb["partial"] is True and vb["ran"] == ["temporal_flickering"] and vb["total"] is None
    assert vb["semantic"] is None and 0.0 < vb["means"]["temporal_flickering"] <= 1.0
    scores = pq.read_table(report / "scores.parquet").to_pandas()
    assert sorted(scores["id"]) == ["clip-0", "clip-1", "clip-2"]
    assert scores["vbench_temporal_flickering"].notna().all()
    assert vb["means"]["temporal_flickering"] == pytest.approx(scores["vbench_temporal_flickering"].mean(), abs=1e-9)
    raw = json.loads((report / "vbench_eval_results.json").read_text())["temporal_flickering"]
    assert {v["video_path"]: v["video_results"] for v in raw[1]} == {
        f"videos/{i}.mp4": x for i, x in zip(scores["id"], scores["vbench_temporal_flickering"])}
    # Our weight-free formula on PyAV-decoded frames agrees with vbench's (OpenCV decoding).
    np.testing.assert_allclose(scores["flicker"], scores["vbench_temporal_flickering"], atol=2e-3)
    assert "partial" in (report / "report.md").read_text().lower()


def test_fidelity_to_reference(scored_runs):
    ref, run = scored_runs
    summary = json.loads((run / "report" / "scores.json").read_text())
    fid = summary["fidelity"]
    assert fid["all identical"] is False
    assert 20.0 < fid["PSNR dB (mean over videos)"] < 80.0
    assert 0.5 < fid["SSIM (mean over videos)"] < 1.0
    per_sample = {r["id"]: r for r in summary["per_sample"]}
    assert all(r["full_steps_used"] < r["num_inference_steps"] for r in per_sample.values())  # SpeCa skipped work

    # The reference against itself: identical, and the report says so.
    assert score.main(["--run", str(ref), "--reference", str(ref), "--dimensions", "none"]) == 0
    own = json.loads((ref / "report" / "scores.json").read_text())
    assert own["fidelity"]["all identical"] is True and own["fidelity"]["videos identical to the reference"] == 3
    assert all(math.isinf(p) for p in pq.read_table(ref / "report" / "scores.parquet").column("psnr").to_pylist())
    assert "identical" in (ref / "report" / "report.md").read_text()


def test_flicker_formula():
    still = np.full((5, 8, 8, 3), 100, np.uint8)
    assert temporal_flickering(still) == 1.0
    blink = still.copy()
    blink[1::2] = 151  # every adjacent pair differs by 51 everywhere
    assert temporal_flickering(blink) == pytest.approx((255 - 51) / 255)


def test_report_renders_in_headless_chromium(scored_runs, tmp_path):
    assert CHROMIUM, "needs Debian's chromium on PATH (the README's test command installs it)"
    ref, run = scored_runs
    report = run / "report"
    page = (report / "index.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400"]
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", page], check=True, capture_output=True, timeout=120)
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[0] >= 2000 and img.std() > 10  # not a blank page
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count("<table") >= 5
    assert "temporal_flickering" in dom and 'href="../videos/clip-0.mp4"' in dom
    for src in ("steps_histogram.png", "acceptance_per_step.png", "speedup_vs_quality.png", "quality_vs_steps.png"):
        assert f"src=\"{src}\"" in dom and (report / src).is_file()

    # The gallery leads with the clip furthest from the reference, measured here from the videos themselves.
    ids = [f"clip-{i}" for i in range(3)]
    fidelity = {i: psnr(decode_mp4((run / "videos" / f"{i}.mp4").read_bytes()).frames,
                        decode_mp4((ref / "videos" / f"{i}.mp4").read_bytes()).frames) for i in ids}
    cards = re.findall(r'<div class="card[^"]*" id="g(\d+)" data-id="([^"]+)"', dom)
    assert [i for _, i in cards] == sorted(ids, key=fidelity.get)
    first = dom[dom.index('id="g1"'):dom.index('id="g2"')]
    worst = cards[0][1]
    assert f"PSNR {fidelity[worst]:.2f} dB" in first
    strips = re.findall(r'<a href="([^"]+)"><img src="([^"]+)"', first)
    assert len(strips) == 2  # this run's strip and the reference's, each linking its video
    (run_video, run_strip), (ref_video, ref_strip) = strips
    assert (report / run_video).resolve() == (run / "videos" / f"{worst}.mp4").resolve()
    assert (report / ref_video).resolve() == (ref / "videos" / f"{worst}.mp4").resolve()
    # Each strip shows its own clip: its first tile matches the clip's first frame (JPEG, enlarged by whole pixels).
    for strip, root in ((run_strip, run), (ref_strip, ref)):
        frame = decode_mp4((root / "videos" / f"{worst}.mp4").read_bytes()).frames[0].astype(int)
        tiles = np.asarray(Image.open(report / strip).convert("RGB")).astype(int)
        scale = tiles.shape[0] // frame.shape[0]
        tile = tiles[:frame.shape[0] * scale, :frame.shape[1] * scale][::scale, ::scale]
        assert np.abs(tile - frame).mean() < 8, strip
    pattern = re.search(r'aria-label="step pattern ([FSR]+)"', first).group(1)
    stats = pq.read_table(run / "stats").to_pandas().set_index("id")
    assert pattern == stats.loc[worst, "step_pattern"]


_RANDOM_LPIPS_WEIGHTS = """
import os, sys, torch, torchvision
root = sys.argv[1]
os.makedirs(os.path.join(root, "lpips", "hub", "checkpoints"))
torch.manual_seed(0)
torch.save(torchvision.models.alexnet().state_dict(),
           os.path.join(root, "lpips", "hub", "checkpoints", "alexnet-owt-7be5be79.pth"))
os.environ["TORCH_HOME"] = os.path.join(root, "lpips")
from pyiqa.archs.lpips_arch import LPIPS
torch.save(LPIPS(pretrained=False).state_dict(), os.path.join(root, "lpips", "LPIPS_v0.1_alex-df73285e.pth"))
"""


def test_lpips_when_its_weights_are_provisioned(scored_runs, tmp_path, monkeypatch):
    """The real weights cannot be downloaded here: random ones in the same files check the plumbing."""
    ref, run = (Path(shutil.copytree(p, tmp_path / p.name)) for p in scored_runs)
    cache = tmp_path / "vbench-cache"
    python = vbench_env.ensure_env(vbench_env.default_env_dir())
    subprocess.run([str(python), "-c", _RANDOM_LPIPS_WEIGHTS, str(cache)], check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=300)
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(cache))
    assert vbench_env.missing_lpips_weights() == []

    assert score.main(["--run", str(run), "--reference", str(ref), "--dimensions", "none"]) == 0
    lpips = pq.read_table(run / "report" / "scores.parquet").column("lpips").to_pylist()
    assert len(lpips) == 3 and all(math.isfinite(v) and v != 0.0 for v in lpips)
    fid = json.loads((run / "report" / "scores.json").read_text())["fidelity"]
    assert fid["LPIPS (mean over videos)"] == pytest.approx(np.mean(lpips), abs=1e-9)

    assert score.main(["--run", str(ref), "--reference", str(ref), "--dimensions", "none"]) == 0
    assert pq.read_table(ref / "report" / "scores.parquet").column("lpips").to_pylist() == [0.0, 0.0, 0.0]


def test_lpips_not_provisioned_is_said(scored_runs):
    fid = json.loads((scored_runs[1] / "report" / "scores.json").read_text())["fidelity"]
    assert fid["LPIPS (mean over videos)"].startswith("not computed: weights not provisioned")
    assert "LPIPS_v0.1_alex-df73285e.pth" in fid["LPIPS (mean over videos)"]
