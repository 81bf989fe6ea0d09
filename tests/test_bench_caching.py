"""bench.caching end to end on the bundled model: 2 prompts, 10 steps, a handful of methods."""

from __future__ import annotations

import json
import math

import pytest

from bench import caching
from pipeline.tiny import world

SPECA = ["speca-default-lean-0.05-b8", "speca-default-lean-0.1-b8"]
WORKING = [*SPECA, "magcache-0.06", "pab-2-branch", "fastercache-2-branch"]
FAILING = "fastercache-cfg"  # FasterCache's CFG cache cannot run with CFG as two calls: an error row
PROMPTS, STEPS = 2, 10


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("caching") / "caching.md"
    caching.main(["--prompts", str(PROMPTS), "--steps", str(STEPS), "--repeats", "1", "--calibration-prompts", "1",
                  "--only", ",".join([*WORKING, FAILING]), "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    return out, out.read_text(), data, {r["key"]: r for r in data["rows"]}


def test_writes_markdown_json_and_png(report):
    out, md, _, rows = report
    png = out.with_name("caching_pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert md.startswith("# Caching methods on the bundled tiny model")
    assert f"Command: `python -m bench.caching --prompts {PROMPTS} --steps {STEPS}" in md
    assert "Machine: " in md
    assert set(rows) == {"reference", *WORKING, FAILING}
    for key in rows:
        assert f"`{key}`" in md


def test_reference_row_renders_as_the_baseline(report):
    _, md, _, rows = report
    assert rows["reference"]["kind"] == "reference" and rows["reference"]["full_steps"] is None
    assert "| no cache | `reference` | 1.00x | 1.00x | inf (identical) | 1.000 |" in md


def test_uncached_runs_reproduce_exactly_and_a_cached_run_does_not(tiny_model):
    """The reference row compares the uncached clips with themselves, which shows nothing. What makes every
    other row's PSNR and SSIM a measure of its method is that a second, separate uncached run gives the
    same clips (inf dB, SSIM 1), while a run with caching gives different ones."""
    from pipeline.config import SampleRequest
    from speca import SpeCaConfig

    requests = [SampleRequest(prompt=world.eval_specs(1)[0].prompt, seed=world.EVAL_SEED_BASE, num_inference_steps=6)]
    ref = caching.Method("no cache", "reference", "reference")
    speca = caching.Method("SpeCa, every draft accepted", "speca", "speca-inf",
                           SpeCaConfig(tau0=math.inf, tau_min=math.inf, warmup_steps=2, max_spec=3), batch=1)
    first = caching.run_method(tiny_model, ref, requests)
    again = caching.make_row(ref, caching.run_method(tiny_model, ref, requests), first, [1.0], [1.0])
    cached = caching.make_row(speca, caching.run_method(tiny_model, speca, requests), first, [1.0], [1.0])
    assert math.isinf(again["psnr"]) and again["ssim"] == pytest.approx(1.0)
    assert again["flops_speedup"] == pytest.approx(1.0)
    assert math.isfinite(cached["psnr"]) and cached["ssim"] < 1.0
    assert cached["full_steps"] == [3] and cached["flops_speedup"] > 1.5  # FF SSS F: 3 full steps of 6


def test_every_method_skips_work_and_stays_close(report):
    _, _, _, rows = report
    for key in WORKING:
        r = rows[key]
        assert r["error"] is None, key
        assert r["flops_speedup"] > 1.0, key
        assert math.isfinite(r["psnr"]) and r["psnr"] > 15.0, key
        assert 0.0 < r["ssim"] < 1.0, key
        assert 0.0 < r["flicker"] <= 1.0, key
        assert r["wall_speedup"] > 0 and len(r["denoise_seconds"]) == 1, key
    assert rows["magcache-0.06"]["cache_mb"] > 0 and rows["pab-2-branch"]["cache_mb"] > 0


def test_speca_full_step_distribution(report):
    _, md, _, rows = report
    for key in SPECA:
        r = rows[key]
        assert len(r["full_steps"]) == PROMPTS and all(1 <= n < STEPS for n in r["full_steps"])
        assert (r["full_steps_min"], r["full_steps_max"]) == (min(r["full_steps"]), max(r["full_steps"]))
        assert f"`{key}` | {r['flops_speedup']:.2f}x |" in md
        assert f"{r['full_steps_min']}/{r['full_steps_mean']:.1f}/{r['full_steps_max']} |" in md
    assert rows["magcache-0.06"]["full_steps"] is None


def test_failing_hook_is_an_error_row(report):
    _, md, _, rows = report
    error = rows[FAILING]["error"]
    assert error and error.startswith("RuntimeError")
    assert f"| `{FAILING}` | error: RuntimeError" in md


def test_mag_cache_calibrated_on_other_prompts(report):
    _, md, data, _ = report
    ratios = data["mag_ratios"]
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(0.5 < x < 2.0 for x in ratios)
    eval_prompts = {s.prompt for s in world.eval_specs(PROMPTS)}
    assert len(data["calibration_prompts"]) == 1 and not set(data["calibration_prompts"]) & eval_prompts
    assert f"{ratios[1]:.4f}" in md


def test_goals_are_computed_from_the_rows(report):
    _, md, _, rows = report
    ok = [r for r in rows.values() if r["error"] is None]

    def best(rs):
        fit = [r["flops_speedup"] for r in rs if r["psnr"] >= 30.0]
        return max(fit) if fit else None

    speca = best([r for r in ok if r["kind"] == "speca"])
    families = {r["family"] for r in rows.values() if r["kind"] == "diffusers"}
    assert families == {"magcache", "pab", "fastercache"}
    beaten = []
    for family in families:
        hook = best([r for r in ok if r["family"] == family])
        line = next(ln for ln in md.splitlines() if ln.startswith(f"| {caching.FAMILIES[family]} |"))
        if hook is None:
            assert "no row reaches it" in line
            beaten.append(speca is not None)
        else:
            assert f"| {hook:.2f}x (" in line
            assert (f"| {speca / hook:.2f} |" if speca else "| n/a |") in line
            beaten.append(speca is not None and speca / hook >= 1.25)
    goal1 = speca is not None and all(beaten)
    goal1_line = next(ln for ln in md.splitlines() if ln.startswith("Goal 1: at PSNR >= 30 dB"))
    assert goal1_line.endswith("**met**." if goal1 else "**NOT met**.")
    if speca is not None:
        assert f"SpeCa's best at >= 30 dB: {speca:.2f}x" in md

    batch8 = [r for r in ok if r["kind"] == "speca" and r["batch"] == 8]
    goal2 = bool(batch8) and all(r["full_steps_min"] < r["full_steps_max"] for r in batch8)
    goal2_line = next(ln for ln in md.splitlines() if ln.startswith("Goal 2: batch-8 SpeCa"))
    assert ("**met**" if goal2 else "**NOT met**") in goal2_line
    assert ("## Analysis" in md) == (not (goal1 and goal2))


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 40.0), (1.5, 35.0), (1.4, 30.0), (2.0, 35.0), (3.0, 20.0)]
    assert caching.pareto_front(pts) == [(1.0, 40.0), (2.0, 35.0), (3.0, 20.0)]


def test_only_selects_by_key_family_and_wildcard():
    methods = caching.speca_methods() + caching.diffusers_methods(STEPS, lambda: [1.0] * STEPS)
    assert {m.key for m in caching.select(methods, "pab")} == {"pab-2", "pab-3", "pab-4", "pab-2-branch",
                                                                "pab-3-branch", "pab-4-branch"}
    assert [m.key for m in caching.select(methods, "magcache-0.06, fbc-*")] == ["fbc-0.05", "fbc-0.1", "fbc-0.2",
                                                                                 "magcache-0.06"]
    assert len(caching.select(methods, "all")) == len(methods)
    assert caching.select(methods, "nothing-like-this") == []


def test_pab_state_is_shared_by_cfg_branches_and_the_wrapper_splits_it(tiny_model):
    """diffusers 0.42.1 bug the bench works around: PAB keeps one state for both CFG calls of a step."""
    from diffusers import PyramidAttentionBroadcastConfig

    from pipeline.config import SampleRequest
    from pipeline.generate import Generator

    pipe, steps = tiny_model.pipe, 4
    pipe.transformer.enable_cache(PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
        current_timestep_callback=lambda: pipe.current_timestep))
    [(module, hook), *_] = [(m, h) for m in pipe.transformer.modules() if getattr(m, "_diffusers_hook", None) is not None
                            for h in m._diffusers_hook.hooks.values() if hasattr(h, "state")]
    seen = []
    handle = module.register_forward_pre_hook(lambda *_: seen.append(hook.state.iteration))
    request = SampleRequest(prompt="a red circle moving left on a blue background", seed=0, num_inference_steps=steps)
    try:
        Generator(tiny_model).generate([request], batch_size=1)
        assert seen == list(range(2 * steps))  # as shipped: one counter, advanced by cond and uncond
        seen.clear()
        with caching.per_branch_state(pipe.transformer):
            Generator(tiny_model).generate([request], batch_size=1)
        assert seen == [i for i in range(steps) for _ in range(2)]  # each branch counts its own steps
    finally:
        handle.remove()
        pipe.transformer.disable_cache()
