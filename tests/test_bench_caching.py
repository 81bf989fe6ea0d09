"""bench.caching end to end on the bundled model: 2 prompts, 10 steps, a handful of methods."""

from __future__ import annotations

import json
import math

import pytest

from bench import caching, caching_report, flop_count, peers, speca_rows
from bench.method import FAMILIES, Method, select
from pipeline.loading import bundled_model_dir
from pipeline.tiny.worlds import world_of
from speca import SpeCaConfig

SPECA = ["speca-default", "speca-default-b1", "speca-reference-1.0"]
MAG, PAB, FASTER, FEWER = "magcache-0.12-k3-r0.2", "pab-2-100-800-branch", "fastercache-3-901-branch", "fewer-steps-6"
WORKING = [*SPECA, MAG, PAB, FASTER, FEWER]
FAILING = "fastercache-cfg"  # FasterCache's CFG cache cannot run with CFG as two calls: an error row
PROMPTS, STEPS = 2, 10
WORLD = world_of(bundled_model_dir())


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
    assert "| no cache | `reference` | 1.00x | 1.00x | 1.00x | inf | inf | inf | 0 | 1.000 | 1.000 | 0 |" in md


def test_uncached_runs_reproduce_exactly_and_a_cached_run_does_not(tiny_model):
    """The reference row compares the uncached clips with themselves, which shows nothing. What makes every
    other row's PSNR and SSIM a measure of its method is that a second, separate uncached run gives the
    same clips (inf dB, SSIM 1), while a run with caching gives different ones."""
    from pipeline.config import SampleRequest

    requests = [SampleRequest(prompt=WORLD.eval_set(1)[0].prompt, seed=WORLD.eval_seed_base, num_inference_steps=6)]
    ref = Method("no cache", "reference", "reference")
    speca = Method("SpeCa, every draft accepted", "speca", "speca-inf",
                           SpeCaConfig(tau0=math.inf, tau_min=math.inf, warmup_steps=2, max_spec=3), batch=1)
    first = caching.run_method(tiny_model, ref, requests)
    again = caching.make_row(ref, caching.run_method(tiny_model, ref, requests), first, [1.0], [1.0])
    cached = caching.make_row(speca, caching.run_method(tiny_model, speca, requests), first, [1.0], [1.0])
    assert math.isinf(again["psnr"]) and again["ssim"] == pytest.approx(1.0)
    assert again["flops_speedup"] == pytest.approx(1.0) and again["flops_speedup_60"] == pytest.approx(1.0)
    assert again["failures"] == []
    for f in cached["failures"]:  # each one is under the PSNR bar or judged otherwise than the uncached clip
        assert f["psnr"] < caching_report.FAILURE_PSNR_DB or f["flipped"]
    assert math.isfinite(cached["psnr"]) and cached["ssim"] < 1.0
    assert cached["full_steps"] == [3] and cached["flops_speedup"] > 1.5  # FF SSS F: 3 full steps of 6


def test_every_method_skips_work_and_stays_close(report):
    _, _, _, rows = report
    for key in WORKING:
        r = rows[key]
        assert r["error"] is None, key
        assert r["flops_speedup"] > 1.0, key
        assert math.isfinite(r["psnr"]) and r["psnr"] > 10.0, key  # the paper's preset: ~13 dB at 10 steps
        assert r["psnr_worst"] <= r["psnr_p10"] <= r["psnr"] and len(r["psnr_all"]) == PROMPTS, key
        assert 0.0 < r["ssim_worst"] <= r["ssim"] < 1.0, key
        assert 0.0 < r["flicker"] <= 1.0, key
        assert r["wall_speedup"] > 0 and len(r["denoise_seconds"]) == 1, key
    assert rows[MAG]["cache_mb"] > 0 and rows[PAB]["cache_mb"] > 0


def test_speca_full_step_distribution(report):
    _, md, _, rows = report
    for key in SPECA:
        r = rows[key]
        assert len(r["full_steps"]) == PROMPTS and all(1 <= n < STEPS for n in r["full_steps"])
        # Full steps from the per-sample stats against the step pattern (a rolled-back draft is recomputed in full).
        assert r["full_steps"] == [p.count("F") + p.count("R") for p in r["patterns"]], key
        assert f"`{key}` | {r['flops_speedup']:.2f}x |" in md
        assert f"{r['full_steps_min']}/{r['full_steps_mean']:.1f}/{r['full_steps_max']} |" in md
    assert rows[MAG]["full_steps"] is None


def test_failing_hook_is_an_error_row(report):
    _, md, _, rows = report
    error = rows[FAILING]["error"]
    assert error and error.startswith("RuntimeError")
    assert f"| `{FAILING}` | error: RuntimeError" in md


def test_mag_cache_calibrated_on_other_prompts(report):
    _, md, data, _ = report
    ratios = data["mag_ratios"]
    assert len(ratios) == STEPS and ratios[0] == 1.0 and all(0.5 < x < 2.0 for x in ratios)
    eval_prompts = {s.prompt for s in WORLD.eval_set(PROMPTS)}
    assert len(data["calibration_prompts"]) == 1 and not set(data["calibration_prompts"]) & eval_prompts
    assert f"{ratios[1]:.4f}" in md


def test_goals_are_computed_from_the_rows(report):
    """The goal lines against the issue's definitions, recomputed here from the rows: the default preset (when
    above the floor) >= 1.25x every peer family's best row above the floor at both depths; the default above the
    floor at >= 2.5x, with no structural failure and wall >= 80% of FLOPs; batch 8 and 1 alike."""
    _, md, _, rows = report
    ok = [r for r in rows.values() if r["error"] is None]

    def fit(r):
        return r["psnr"] >= 32.0 and min(r["psnr_all"]) >= 26.0

    default, alone = rows["speca-default"], rows["speca-default-b1"]
    lines = md.splitlines()
    for n, (key, where) in enumerate([("flops_speedup", "at the model's depth"),
                                      ("flops_speedup_60", "projected to 60 blocks")]):
        def best(rs):
            return max((r[key] for r in rs if fit(r)), default=None)

        ours = default[key] if fit(default) else None
        beaten = []
        goal = lines.index(next(ln for ln in lines if ln.startswith(f"Goal 1{'ab'[n]}, FLOPs {where}")))
        for family in ("fewer-steps", "magcache", "fastercache", "pab"):
            peer = best([r for r in ok if r["family"] == family])
            line = next(ln for ln in lines[goal:] if ln.startswith(f"| {FAMILIES[family]} |"))
            if peer is None:
                assert "no row above the floor" in line
                beaten.append(ours is not None)
            else:
                assert f"| {peer:.2f}x (" in line
                assert (f"| {ours / peer:.2f} |" if ours else "| n/a |") in line
                beaten.append(ours is not None and ours / peer >= 1.25)
        assert ("**met**" if ours is not None and all(beaten) else "**NOT met**") in lines[goal]
        assert (f"The default: {ours:.2f}x" if ours else "The default: not above the floor") in lines[goal]

    goal2 = next(ln for ln in lines if ln.startswith("Goal 2, the default preset"))
    met = (fit(default) and default["flops_speedup"] >= 2.5 and not default["failures"]
           and default["wall_speedup"] / default["flops_speedup"] >= 0.8)
    assert ("**met**" if met else "**NOT met**") in goal2 and f"{len(default['failures'])} failures;" in goal2
    goal3 = next(ln for ln in lines if ln.startswith("Goal 3, batch 8 and batch 1"))
    same = sum(a == b for a, b in zip(default["patterns"], alone["patterns"]))
    assert same == PROMPTS  # the equivalence itself (tests/test_speca_* check it numerically too)
    assert f"**met** ({same} of {PROMPTS} samples)" in goal3


def test_projection_to_60_blocks_follows_the_step_patterns(report):
    """The FLOPs hooks and `projected_fraction` against the controller's own record: at 60 blocks a
    full step costs 60 blocks, an accepted draft the verified block(s), a rejected one both."""
    _, _, _, rows = report
    for key in SPECA:
        r = rows[key]
        config = SpeCaConfig.from_name("default" if key.startswith("speca-default") else "reference")
        checks = 1 + int(config.verify_first)  # the last block, and the first when it is checked too

        def projected(check_cost: float) -> float:
            cost = sum(p.count("F") * 60 + (p.count("S") + p.count("R")) * checks * check_cost + p.count("R") * 60
                       for p in r["patterns"])
            return 60 * sum(len(p) for p in r["patterns"]) / cost

        if config.verify_tokens == 1:
            assert r["flops_speedup_60"] == pytest.approx(projected(1.0), rel=0.02), key
        else:  # a token-subset check costs more than its share of a block (the text tokens, every token's keys and
            # values), at most a block (within the 2% the projection leaves out, as above)
            assert projected(1.0) / 1.02 < r["flops_speedup_60"] < projected(config.verify_tokens), key
        assert r["flops_speedup_60"] > r["flops_speedup"], key  # the check's cost shrinks with depth
    few = rows[FEWER]
    assert few["flops_speedup"] == pytest.approx(STEPS / 6, rel=1e-6)
    assert few["flops_speedup_60"] == pytest.approx(few["flops_speedup"], rel=1e-6)  # no block is a fixed cost


def test_projected_fraction_keeps_fixed_blocks_and_scales_the_rest():
    ref = [10.0] * 6
    assert flop_count.projected_fraction([5.0] * 6, ref, [5] * 6, 5) == pytest.approx(0.5)  # whole steps skipped
    first_always = [10.0] + [2.0] * 5  # one block at every call, the others at a fifth of the calls
    ran = [10] + [2] * 5
    assert flop_count.projected_fraction(first_always, ref, ran, 10, depth=6) == pytest.approx(sum(first_always) / 60)
    deep = flop_count.projected_fraction(first_always, ref, ran, 10, depth=60)
    assert 0.2 < deep < sum(first_always) / 60  # the fixed block weighs 1/60 there, not 1/6
    # A check on a token subset runs at every call for a fraction of a block's FLOPs: still a fixed cost.
    subset = [3.0] + [2.0] * 5
    assert flop_count.projected_fraction(subset, ref, ran, 10, depth=60) == pytest.approx((0.3 + 59 * 0.2) / 60)
    # Runs alone (batch 1) make more calls than the batched reference; only the method's own calls count.
    assert flop_count.projected_fraction(first_always, ref, [20] + [4] * 5, 20, depth=60) == pytest.approx(deep)


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 40.0), (1.5, 35.0), (1.4, 30.0), (2.0, 35.0), (3.0, 20.0)]
    assert caching_report.pareto_front(pts) == [(1.0, 40.0), (2.0, 35.0), (3.0, 20.0)]


def test_only_selects_by_key_family_and_wildcard():
    methods = speca_rows.speca_methods() + peers.diffusers_methods(STEPS, lambda: [1.0] * STEPS)
    assert [m.key for m in select(methods, "speca-default*")][:2] == ["speca-default", "speca-default-b1"]
    pab = [m.key for m in methods if m.family == "pab"]
    assert len(pab) > 1 and [m.key for m in select(methods, "pab")] == pab  # a family name selects the family
    fbc = [m.key for m in methods if m.key.startswith("fbc-")]
    assert [m.key for m in select(methods, f"{MAG}, fbc-*")] == [*fbc, MAG]  # in catalogue order, each once
    assert len(select(methods, "all")) == len(methods)
    assert select(methods, "nothing-like-this") == []


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
    request = SampleRequest(prompt="a red circle moving quickly left on a blue background", seed=0,
                            num_inference_steps=steps)
    try:
        Generator(tiny_model).generate([request], batch_size=1)
        assert seen == list(range(2 * steps))  # as shipped: one counter, advanced by cond and uncond
        seen.clear()
        with peers.per_branch_state(pipe.transformer):
            Generator(tiny_model).generate([request], batch_size=1)
        assert seen == [i for i in range(steps) for _ in range(2)]  # each branch counts its own steps
    finally:
        handle.remove()
        pipe.transformer.disable_cache()


def test_calibration_prompt_set_avoids_the_evaluation_prompts(tmp_path):
    out = tmp_path / "tuning.md"
    caching.main(["--prompts", "2", "--steps", "4", "--prompt-set", "calibration", "--only", "speca-default",
                  "--out", str(out)])
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["prompt_set"] == "calibration" and len(data["prompt_list"]) == 2
    assert not set(data["prompt_list"]) & {s.prompt for s in WORLD.eval_set(2)}
    assert "held-out calibration prompts" in out.read_text()


def test_render_rewrites_the_report_from_its_json(report, tmp_path):
    out, md, _, _ = report
    copy = tmp_path / "caching.md"
    copy.with_suffix(".json").write_text(out.with_suffix(".json").read_text())
    copy.with_name("caching_analysis.md").write_text("Written after the run.")
    caching.main(["--render", "--out", str(copy)])
    again = copy.read_text()
    assert "## Analysis" in again and "Written after the run." in again  # a reading beside the report, met or not
    assert [ln for ln in again.splitlines() if ln.startswith("| ")] == [ln for ln in md.splitlines()
                                                                        if ln.startswith("| ")]


def test_a_turned_verdict_fails_only_where_the_uncached_clip_was_clear():
    """The structural-failure rule on rendered world v2 clips: a duplicated object turns the count wrong on a clip
    whose uncached count was clear (a failure, whatever its PSNR); the same turn on a clip whose uncached count was
    on its threshold (a duplicate in 8 of 17 frames, one more frame turns it) is the scorer's noise, counted apart;
    a right verdict turning right, or a wrong one staying wrong, is no failure."""
    import dataclasses

    import numpy as np

    from pipeline.quality import psnr
    from pipeline.tiny import scorer_v2, world_v2

    scene = world_v2.sample_scene(5, objects=[{"color": "red", "shape": "circle", "motion": "right",
                                               "pace": "quickly"}], background="black")
    o = dataclasses.replace(scene.objects[0], radius=5.0)
    scene = dataclasses.replace(scene, objects=(o,))
    clean = world_v2.render(scene)
    doubled = world_v2.render(dataclasses.replace(scene, objects=(o, dataclasses.replace(
        o, start=(o.start[0], o.start[1] - 13)))))
    on_threshold = np.concatenate([doubled[:8], clean[8:]])  # count right, a frame from turning
    turned = np.concatenate([doubled[:9], clean[9:]])
    uncached = [clean, on_threshold, clean, clean]
    cached = [doubled, turned, clean, clean]
    ref_verdicts = [scorer_v2.score(f, scene.prompt) for f in uncached]
    assert all(v["count"] for v in ref_verdicts)
    # PSNRs given, so that the verdicts alone decide the first three; the last clip fails on PSNR alone.
    failures, near = caching.structural_failures(
        [f"clip {i}" for i in range(4)], [40.0, 40.0, 40.0, caching_report.FAILURE_PSNR_DB - 1],
        [scorer_v2.score(f, scene.prompt) for f in cached], ref_verdicts,
        [scorer_v2.clear(f, scene.prompt) for f in uncached])
    assert [(f["prompt"], f["flipped"]) for f in failures] == [("clip 0", ["count"]), ("clip 3", [])]
    assert near == 1
    assert psnr(doubled, clean) < caching_report.FAILURE_PSNR_DB < psnr(turned, on_threshold)  # as generated
