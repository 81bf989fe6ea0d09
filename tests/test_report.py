"""The report page on its own: frame strips, a 2,000-sample run in headless Chromium, numbers for people.

The report of a real reference + SpeCa run is checked in test_score.py; here the score table is
built directly (stats rows alone), so a large run costs seconds.
"""

import io
import re
import shutil
import subprocess
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from jobs.report import ReportInputs, strip_name, write_report
from jobs.strips import MIN_HEIGHT, frame_strip, strip_frames

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
COLOURS = np.array([[230, 20, 20], [20, 200, 40], [30, 60, 230], [240, 220, 30], [200, 40, 200], [20, 200, 210],
                    [250, 250, 250], [10, 10, 10], [128, 128, 128]], np.uint8)


def chromium_dom(tmp_path, url: str) -> str:
    assert CHROMIUM, "needs Debian's chromium on PATH (the README's test command installs it)"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([CHROMIUM, *flags, "--dump-dom", url], check=True, capture_output=True, text=True,
                          timeout=120).stdout


def test_strip_shows_evenly_spaced_frames_in_time_order():
    frames = np.repeat(COLOURS[:, None, None, :], 32, axis=1).repeat(32, axis=2)  # 9 flat frames, 32 x 32
    picked = strip_frames(len(frames))
    assert picked[0] == 0 and picked[-1] == len(frames) - 1 and len(picked) == 5
    strip = np.asarray(Image.open(io.BytesIO(frame_strip(frames))).convert("RGB")).astype(int)
    h = strip.shape[0]
    assert h >= MIN_HEIGHT and h % 32 == 0  # enlarged by whole pixels
    tile = (strip.shape[1] - 2 * (len(picked) - 1)) // len(picked)
    assert tile == h  # square frames stay square
    for k, i in enumerate(picked):
        centre = strip[h // 2, k * (tile + 2) + tile // 2]
        assert np.abs(centre - COLOURS[i].astype(int)).max() <= 12, (k, i, centre)
    short = frame_strip(frames[:2])  # fewer frames than the strip holds: each shown once
    assert Image.open(io.BytesIO(short)).width == 2 * h + 2
    big = np.zeros((3, 720, 1280, 3), np.uint8)
    assert Image.open(io.BytesIO(frame_strip(big))).height < 720  # large clips are shrunk
    with pytest.raises(ValueError, match="uint8"):
        frame_strip(frames.astype(np.float32))


def _large_run(n: int) -> tuple[pd.DataFrame, dict]:
    rng = np.random.default_rng(7)
    psnr = rng.uniform(18.0, 48.0, n)
    psnr[rng.choice(n, 20, replace=False)] = np.inf  # some identical to the reference
    scores = pd.DataFrame({
        "id": [f"sample-{i:05d}" for i in range(n)], "prompt": [f"prompt {i} <b>not bold</b>" for i in range(n)],
        "seed": np.arange(n), "method": "speca", "num_inference_steps": 50,
        "step_pattern": ["".join(rng.choice(list("FFSSSR"), 50)) for _ in range(n)],
        "full_steps_used": rng.integers(8, 30, n), "spec_accepted": rng.integers(10, 40, n),
        "flops_speedup": rng.uniform(1.5, 3.5, n), "seconds_denoise": rng.uniform(0.5, 3, n),
        "device_seconds": rng.uniform(0.5, 3, n), "flicker": rng.uniform(0.9, 1.0, n), "psnr": psnr,
        "ssim": rng.uniform(0.5, 1.0, n), "adherence_all": rng.uniform(0, 1, n) > 0.05})
    speedup = float(n / np.sum(1.0 / scores["flops_speedup"]))
    summary = {"run": {"output": "/runs/large", "model": "bundled", "samples": n, "speca": "on",
                       "FLOPs speedup (run)": speedup, "FLOPs saved": 1 - 1 / speedup,
                       "mean steps in full": float(scores["full_steps_used"].mean()), "steps per sample": 50,
                       "device": "cpu", "device seconds per video (mean)": float(scores["device_seconds"].mean()),
                       "device seconds per video (p90)": float(scores["device_seconds"].quantile(0.9)),
                       "samples per hour": 1234.5678, "wall seconds": 5831.123456, "reference": "/runs/ref"},
               "config": {"model": {"model": "bundled", "device": "auto"},
                          "speca": {"tau0": 0.05, "beta": 0.5, "order": 1}, "batch_size": 8},
               "fidelity": {"PSNR dB (mean over videos)": float(np.mean(psnr[np.isfinite(psnr)])),
                            "PSNR dB (worst video)": float(psnr.min()), "SSIM (mean over videos)": 0.81234567},
               "weight_free": {"temporal flickering (ours, mean)": 0.9512345}}
    return scores, summary


def test_two_thousand_samples_render_light_and_sort_in_the_page(tmp_path):
    n = 2000
    scores, summary = _large_run(n)
    strip = frame_strip(np.repeat(COLOURS[:, None, None, :], 16, axis=1).repeat(16, axis=2))
    inputs = ReportInputs(strips={i: strip for i in scores["id"]}, reference_strips={i: strip for i in scores["id"]},
                          gallery=48, reference_videos_href="../../ref/videos")
    out = tmp_path / "report"
    written = write_report(scores, summary, out, inputs)
    strips = [w for w in written if w.startswith("strips/")]
    assert len(strips) == 2 * 48 and len(list((out / "strips").iterdir())) == 2 * 48  # only the gallery's
    page = (out / "index.html").read_text()
    assert len(page) < 3_000_000 and page.count("<img") == 2 * 48 + 4
    assert "<b>not bold</b>" not in page  # prompts are escaped

    worst = scores.sort_values(["psnr", "id"]).reset_index(drop=True)
    started = time.monotonic()
    dom = chromium_dom(tmp_path, (out / "index.html").resolve().as_uri())
    assert time.monotonic() - started < 60
    cards = re.findall(r'<div class="card[^"]*" id="g(\d+)" data-id="([^"]+)"', dom)
    assert [int(r) for r, _ in cards] == list(range(1, 49))
    assert [i for _, i in cards] == list(worst["id"][:48])
    first_card = dom[dom.index('id="g1"'):dom.index('id="g2"')]
    assert f'src="{strip_name(worst["id"][0])}"' in first_card
    assert f'src="{strip_name(worst["id"][0], reference=True)}"' in first_card
    assert "of 2,000 samples to look at first" in dom

    def table_ids(d: str) -> list[str]:
        body = d[d.index('<table id="samples"'):]
        body = body[:body.index("</table>")]
        return re.findall(r'<a href="[^"]*">(sample-\d+)</a>', body)

    assert "rows 1-100 of 2,000 (page 1 of 20)" in dom
    assert table_ids(dom) == list(worst["id"][:100])
    # Sorting and paging run in the page; the hash makes the view linkable.
    by_speedup = scores.sort_values("flops_speedup", ascending=False)["id"]
    dom = chromium_dom(tmp_path, (out / "index.html").resolve().as_uri() + "#sort=-flops_speedup&page=3")
    assert "rows 201-300 of 2,000 (page 3 of 20)" in dom
    assert table_ids(dom) == list(by_speedup[200:300])
    # Identical-to-reference clips have infinite PSNR: best, so last when sorting ascending.
    dom = chromium_dom(tmp_path, (out / "index.html").resolve().as_uri() + "#sort=psnr&page=20")
    assert table_ids(dom)[-20:] == sorted(scores.loc[np.isinf(scores["psnr"]), "id"])
    assert dom.count("<td>identical</td>") == 20


def test_numbers_are_formatted_for_people(tmp_path):
    scores, summary = _large_run(60)
    out = tmp_path / "report"
    write_report(scores, summary, out, ReportInputs(gallery=10))
    for name in ("index.html", "report.md"):
        text = (out / name).read_text()
        visible = re.sub(r"<script.*?</script>", "", text, flags=re.S)
        raw = re.findall(r"\d+\.\d{5,}", visible)
        assert raw == [], (name, raw[:5])
        assert "tau0" in visible and "speca.beta" in visible  # the config as a table of settings
        for shown in (f"{summary['run']['FLOPs speedup (run)']:.2f}x", "97.2 min", "1,234.6 per hour"):
            assert shown in visible, (name, shown)
    md = (out / "report.md").read_text()
    look = md[md.index("## Look at these first"):md.index("## Run and cost")]
    worst = scores.sort_values(["psnr", "id"])["id"].iloc[0]
    assert look.index(worst) < min(look.index(i) for i in scores["id"] if i != worst and i in look)
    assert "<img" not in md and "10 of 60 samples" in md


def test_without_a_reference_the_lowest_vbench_score_leads(tmp_path):
    scores, summary = _large_run(30)
    scores = scores.drop(columns=["psnr", "ssim"])
    del summary["fidelity"]
    rng = np.random.default_rng(3)
    scores["vbench_subject_consistency"] = rng.uniform(0.8, 1.0, len(scores))
    strip = frame_strip(np.zeros((4, 32, 32, 3), np.uint8))
    out = tmp_path / "report"
    write_report(scores, summary, out, ReportInputs(strips={i: strip for i in scores["id"]}, gallery=5))
    page = (out / "index.html").read_text()
    cards = re.findall(r'<div class="card[^"]*" id="g\d+" data-id="([^"]+)"', page)
    assert cards == list(scores.sort_values("vbench_subject_consistency")["id"][:5])
    assert "lowest VBench subject consistency first" in page
    first = page[page.index('id="g1"'):page.index('id="g2"')]
    assert first.count("<img") == 1 and "reference" not in first
