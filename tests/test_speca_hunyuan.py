"""SpeCa on the real diffusers HunyuanVideo classes (bundled tiny model, fp32, CPU)."""

import math
import re

import pytest
import torch

from speca import SpeCaConfig, apply_speca, disable_speca
from speca.controller import StepController

PROMPTS = ["a red circle moving left on a blue background", "a green square moving up on a black background",
           "a white triangle standing still on a red background", "a yellow circle moving down on a green background"]
STEPS = 12
TEMPLATE = {"template": "{}", "crop_start": 0}


def run(pipe, idx, cfg=False):
    """Latents for prompts/seeds `idx`, through diffusers' own HunyuanVideoPipeline.__call__."""
    extra = dict(negative_prompt="", true_cfg_scale=4.0) if cfg else {}
    return pipe(prompt=[PROMPTS[i] for i in idx], generator=[torch.Generator().manual_seed(i) for i in idx],
                height=32, width=32, num_frames=17, num_inference_steps=STEPS, prompt_template=TEMPLATE,
                max_sequence_length=16, output_type="latent", **extra).frames


@pytest.fixture
def forced(monkeypatch):
    """Force rejections by (sample identity, step); `forced.batch` maps batch rows to identities."""

    class Forcing:
        batch: list[int] = []
        reject: set[tuple[int, int]] = set()

    original = StepController.decide

    def decide(self, step, speculate, errors):
        errors = {b: (math.inf if (Forcing.batch[b], step) in Forcing.reject else e) for b, e in errors.items()}
        return original(self, step, speculate, errors)

    monkeypatch.setattr(StepController, "decide", decide)
    return Forcing


@pytest.mark.parametrize("cache", ["lean", "module"])
@pytest.mark.parametrize("cfg", [False, True])
def test_threshold_zero_reproduces_uncached(tiny_pipe, cache, cfg):
    base = run(tiny_pipe, [0, 1], cfg)
    session = apply_speca(tiny_pipe, SpeCaConfig(cache=cache, tau0=0.0, tau_min=0.0, min_spec=0, warmup_steps=1))
    out = run(tiny_pipe, [0, 1], cfg)
    assert (out - base).abs().max().item() <= 1e-6
    assert [s.step_pattern for s in session.stats()] == ["F" + "R" * (STEPS - 1)] * 2


def test_unbounded_threshold_is_fixed_interval_taylorseer(tiny_pipe, monkeypatch):
    """tau = inf with max run N: full steps every N + 1, equal to diffusers' TaylorSeer hook on the
    same modules and the same full steps (its schedule is patched to ours; the draft is its own)."""
    from diffusers import TaylorSeerCacheConfig
    from diffusers.hooks import taylorseer_cache

    n = 3
    session = apply_speca(tiny_pipe, SpeCaConfig(cache="module", order=1, tau0=math.inf, tau_min=math.inf,
                                                 warmup_steps=2, max_spec=n))
    ours = run(tiny_pipe, [0, 1])
    pattern = session.stats()[0].step_pattern
    assert pattern == "FF" + ("SSSF" * 3)[:STEPS - 2]
    disable_speca(tiny_pipe)

    full_steps = {i for i, c in enumerate(pattern) if c == "F"}

    def should_compute(self):
        state = self.state_manager.get_state()
        state.current_step += 1
        return state.current_step in full_steps, state

    monkeypatch.setattr(taylorseer_cache.TaylorSeerCacheHook, "_measure_should_compute", should_compute)
    last = len(tiny_pipe.transformer.single_transformer_blocks) - 1
    ids = [r"^transformer_blocks\.\d+\.(attn|ff|ff_context)$",
           rf"^single_transformer_blocks\.(?!{last}\.)\d+\.proj_out$"]  # the verified block runs for real
    tiny_pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval=n + 1, disable_cache_before_step=2,
                                                             max_order=1, taylor_factors_dtype=torch.float32,
                                                             cache_identifiers=ids))
    try:
        theirs = run(tiny_pipe, [0, 1])
    finally:
        tiny_pipe.transformer.disable_cache()
    assert not torch.equal(ours, run(tiny_pipe, [0, 1]))  # caching did change the result
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("cache", ["lean", "module"])
def test_batch_with_mixed_decisions_equals_alone(tiny_pipe, forced, cache):
    cfg = SpeCaConfig(cache=cache, tau0=math.inf, tau_min=math.inf, warmup_steps=2, max_spec=4)
    forced.reject = {(1, 3), (3, 3), (3, 4), (2, 7)}
    rows_seen = []  # rows of every full pass, seen by a module that only full passes run
    session = apply_speca(tiny_pipe, cfg)
    hook = tiny_pipe.transformer.transformer_blocks[0].ff.register_forward_hook(
        lambda m, i, o: rows_seen.append((session.step, o.shape[0])))
    try:
        forced.batch = [0, 1, 2, 3]
        batch = run(tiny_pipe, [0, 1, 2, 3])
        patterns = [s.step_pattern for s in session.stats()]
        rows_in_batch = list(rows_seen)
        alone = []
        for i in range(4):
            forced.batch = [i]
            alone.append(run(tiny_pipe, [i]))
            assert session.stats()[0].step_pattern == patterns[i]
    finally:
        hook.remove()
    assert patterns[1][3] == "R" and patterns[3][3:5] == "RR" and patterns[2][7] == "R" and patterns[0][3] == "S"
    assert len(set(patterns)) > 1
    # Step 3: samples 1 and 3 were rolled back, so the full pass ran on a sub-batch of 2 rows.
    assert (3, 2) in rows_in_batch and (4, 1) in rows_in_batch
    for step in range(STEPS):
        full = [p[step] in "FR" for p in patterns]
        assert sum(r for s, r in rows_in_batch if s == step) == sum(full)
    for i in range(4):
        rel = ((batch[i] - alone[i][0]).abs().max() / alone[i].abs().max()).item()
        assert rel <= 1e-5


def test_rollback_recomputes_the_rejected_step(tiny_pipe, forced):
    forced.batch = [0]
    forced.reject = {(0, 5)}
    session = apply_speca(tiny_pipe, SpeCaConfig(tau0=math.inf, tau_min=math.inf, warmup_steps=2, max_spec=8))
    out = run(tiny_pipe, [0])
    pattern = session.stats()[0].step_pattern
    assert pattern[:7] == "FFSSSRS"  # step 5 itself is recomputed in full, step 6 speculates again
    forced.reject = {(0, 5), (0, 6)}
    out2 = run(tiny_pipe, [0])
    assert session.stats()[0].step_pattern[:8] == "FFSSSRRS"
    assert not torch.equal(out, out2)  # the decision at step 6 changed the result


def test_cfg_passes_share_one_decision(tiny_pipe, forced):
    forced.batch = [0, 1]
    forced.reject = {(1, 4)}
    seen = []
    session = apply_speca(tiny_pipe, SpeCaConfig(tau0=math.inf, tau_min=math.inf, warmup_steps=2, max_spec=8))
    hook = tiny_pipe.transformer.transformer_blocks[0].ff.register_forward_hook(
        lambda m, i, o: seen.append((session.step, o.shape[0])))
    try:
        run(tiny_pipe, [0, 1], cfg=True)
    finally:
        hook.remove()
    assert [s.step_pattern[4] for s in session.stats()] == ["S", "R"]
    assert seen.count((4, 1)) == 2  # the cond and the uncond pass both recomputed only sample 1
    assert seen.count((0, 2)) == 2


@pytest.mark.parametrize("cache", ["lean", "module"])
def test_stats_invariants_and_flops_ratio(tiny_pipe, cache):
    session = apply_speca(tiny_pipe, SpeCaConfig(cache=cache, tau0=0.05, tau_min=0.01, warmup_steps=2, max_spec=4))
    run(tiny_pipe, [0, 1, 2])
    nb = session.num_blocks
    for s in session.stats():
        assert re.fullmatch("[FSR]+", s.step_pattern) and len(s.step_pattern) == STEPS
        assert s.full_steps + s.accepted + s.rejected == STEPS
        assert len(s.errors) == len(s.thresholds) == s.accepted + s.rejected
        expected = (s.full_steps * nb + s.accepted * 1 + s.rejected * (nb + 1)) / (STEPS * nb)
        assert s.compute_ratio == pytest.approx(expected)
        assert s.cache_bytes > 0


def test_cache_bytes_lean_is_smaller(tiny_pipe):
    sizes = {}
    for cache in ("lean", "module"):
        session = apply_speca(tiny_pipe, SpeCaConfig(cache=cache))
        run(tiny_pipe, [0])
        sizes[cache] = session.stats()[0].cache_bytes
        disable_speca(tiny_pipe)
    assert sizes["lean"] * 2 < sizes["module"]


def test_disable_restores_bit_identical_output(tiny_pipe):
    base = run(tiny_pipe, [0, 1], cfg=True)
    apply_speca(tiny_pipe, SpeCaConfig())
    cached = run(tiny_pipe, [0, 1], cfg=True)
    disable_speca(tiny_pipe)
    assert not torch.equal(cached, base)
    assert torch.equal(run(tiny_pipe, [0, 1], cfg=True), base)
    with pytest.raises(RuntimeError, match="already enabled"):
        apply_speca(tiny_pipe, SpeCaConfig())
        apply_speca(tiny_pipe, SpeCaConfig())


@pytest.mark.parametrize("cache", ["lean", "module"])
def test_cache_bytes_estimate_matches_the_cache(tiny_pipe, cache):
    from speca.hunyuan_video import estimate_cache_bytes

    cfg = SpeCaConfig(cache=cache, order=2)
    session = apply_speca(tiny_pipe, cfg)
    run(tiny_pipe, [0, 1, 2], cfg=True)
    measured = session.stats()[0].cache_bytes
    estimate = estimate_cache_bytes(tiny_pipe.transformer.config, cfg, video_tokens=5 * 8 * 8, text_tokens=16,
                                    batch=3, dtype_bytes=4, contexts=2)
    assert measured == estimate


def test_lean_cache_fits_720p_in_a_few_gb():
    from speca.hunyuan_video import estimate_cache_bytes

    real = dict(num_attention_heads=24, attention_head_dim=128, num_layers=20, num_single_layers=40)
    tokens = dict(video_tokens=33 * 45 * 80, text_tokens=256, dtype_bytes=2)  # 720x1280, 129 frames, bf16
    lean = estimate_cache_bytes(real, SpeCaConfig(cache="lean"), **tokens)
    module = estimate_cache_bytes(real, SpeCaConfig(cache="module"), **tokens)
    assert 2e9 < lean < 4e9  # ~2.9 GB
    assert 50e9 < module  # ~117 GB: per-module caching needs tens of GB or more
