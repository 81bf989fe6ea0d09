"""SpeCa on the real diffusers HunyuanVideo classes (bundled tiny model, fp32, CPU)."""

import math
import re

import pytest
import torch

from speca import SpeCaConfig, apply_speca, disable_speca
from speca.controller import StepController
from speca_tester import SpeCaFamilyTests

PROMPTS = ["a red circle moving quickly left on a blue background",
           "a green square moving quickly up on a black background",
           "a white triangle standing still on a red background",
           "a yellow circle moving quickly down on a green background"]
STEPS = 12
TEMPLATE = {"template": "{}", "crop_start": 0}


def run(pipe, idx, cfg=False):
    """Latents for prompts/seeds `idx`, through diffusers' own HunyuanVideoPipeline.__call__."""
    extra = dict(negative_prompt="", true_cfg_scale=4.0) if cfg else {}
    return pipe(prompt=[PROMPTS[i] for i in idx], generator=[torch.Generator().manual_seed(i) for i in idx],
                height=32, width=32, num_frames=17, num_inference_steps=STEPS, prompt_template=TEMPLATE,
                max_sequence_length=16, output_type="latent", **extra).frames


def step_counter(transformer, calls_per_step: int = 1):
    """(hook handle, current step) from counting transformer calls (2 per step with true CFG)."""
    calls = []
    handle = transformer.register_forward_pre_hook(lambda m, a: calls.append(None))
    return handle, lambda: (len(calls) - 1) // calls_per_step


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


JOINT = {"cfg_branches": "guided", "signal": "prediction"}  # every CFG branch in one pass, the guided prediction


@pytest.mark.parametrize("cache,checks", [("lean", {}), ("module", {}), ("lean", {"verify_tokens": 0.25}),
                                          ("lean", {"verify_tokens": 0.25, **JOINT})])
@pytest.mark.parametrize("cfg", [False, True])
def test_threshold_zero_reproduces_uncached(tiny_pipe, cache, checks, cfg):
    """Within 1e-6 of the latents' scale; 1e-5 with joint CFG, which runs both branches as one batch, whose
    matmuls round differently from two calls'."""
    base = run(tiny_pipe, [0, 1], cfg)
    session = apply_speca(tiny_pipe, SpeCaConfig(cache=cache, tau0=0.0, tau_min=0.0, min_spec=0, warmup_steps=1,
                                                 **checks))
    session.set_guidance_scale(4.0 if cfg else None)
    out = run(tiny_pipe, [0, 1], cfg)
    tolerance = 1e-5 if cfg and checks.get("cfg_branches", "leader") != "leader" else 1e-6
    assert (out - base).abs().max().item() <= tolerance * base.abs().max().item()
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


SUBSET = {"verify_tokens": 0.25, "verify_first": True}  # both checks on a quarter of the video tokens


@pytest.mark.parametrize("cache,checks", [("lean", {}), ("module", {}), ("lean", SUBSET)])
def test_batch_with_mixed_decisions_equals_alone(tiny_pipe, forced, cache, checks):
    cfg = SpeCaConfig(cache=cache, tau0=math.inf, tau_min=math.inf, warmup_steps=2, max_spec=4, **checks)
    forced.reject = {(1, 3), (3, 3), (3, 4), (2, 7)}
    rows_seen = []  # rows of every full pass, seen by a module that only full passes run (not a checked block)
    session = apply_speca(tiny_pipe, cfg)
    counter, step = step_counter(tiny_pipe.transformer)
    hook = tiny_pipe.transformer.transformer_blocks[1].ff.register_forward_hook(
        lambda m, i, o: rows_seen.append((step(), o.shape[0])))
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
        counter.remove()
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
    counter, step = step_counter(tiny_pipe.transformer, calls_per_step=2)
    hook = tiny_pipe.transformer.transformer_blocks[0].ff.register_forward_hook(
        lambda m, i, o: seen.append((step(), o.shape[0])))
    try:
        run(tiny_pipe, [0, 1], cfg=True)
    finally:
        hook.remove()
        counter.remove()
    assert [s.step_pattern[4] for s in session.stats()] == ["S", "R"]
    assert seen.count((4, 1)) == 2  # the cond and the uncond pass both recomputed only sample 1
    assert seen.count((0, 2)) == 2


@pytest.mark.parametrize("cache", ["lean", "module"])
def test_stats_invariants_and_flops_ratio(tiny_pipe, cache):
    """The compute SpeCa reports equals the block executions that really ran, counted in batch rows
    by hooks on every block's attention (it runs only when its block runs for real)."""
    session = apply_speca(tiny_pipe, SpeCaConfig(cache=cache, tau0=0.05, tau_min=0.01, warmup_steps=2, max_spec=4))
    t = tiny_pipe.transformer
    blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
    rows = []
    handles = [b.attn.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["hidden_states"].shape[0]),
                                                with_kwargs=True) for b in blocks]
    try:
        run(tiny_pipe, [0, 1, 2])
    finally:
        for h in handles:
            h.remove()
    stats = session.stats()
    for s in stats:
        assert re.fullmatch("[FSR]+", s.step_pattern) and len(s.step_pattern) == STEPS
        assert s.full_steps + s.accepted + s.rejected == STEPS
        assert len(s.errors) == len(s.thresholds) == s.accepted + s.rejected
        assert s.cache_bytes > 0
    assert any(s.accepted for s in stats) and any(s.full_steps + s.rejected > 2 for s in stats)
    executed = sum(rows) / (len(blocks) * STEPS)  # in samples' worth of full steps
    assert sum(s.compute_ratio for s in stats) == pytest.approx(executed, rel=1e-9)


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
    apply_speca(tiny_pipe, SpeCaConfig())
    with pytest.raises(RuntimeError, match="already enabled"):
        apply_speca(tiny_pipe, SpeCaConfig())


@pytest.mark.parametrize("cache,gate,checks", [("lean", math.inf, {}), ("module", math.inf, {}), ("lean", 1e9, {}),
                                               ("lean", math.inf, {"verify_first": True, "verify_tokens": 0.5})])
def test_cache_bytes_estimate_matches_the_cache(tiny_pipe, cache, gate, checks):
    """The estimate from the config alone equals the bytes the hooks held (with a draft gate: the prediction too;
    with token-subset checks under cfg_branches="leader": the check nodes in the cond context only, as the uncond
    call runs no check)."""
    from speca.hunyuan_video import estimate_cache_bytes

    cfg = SpeCaConfig(cache=cache, order=2, draft_gate=gate, **checks)
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


def test_flops_on_the_real_config():
    from speca.hunyuan_video import speculative_step_flops, step_flops

    real = dict(num_attention_heads=24, attention_head_dim=128, num_layers=20, num_single_layers=40, mlp_ratio=4.0)
    # 480x640, 65 frames: 17 x 30 x 40 = 20,400 video tokens + 256 text; 50 steps.
    assert 50 * step_flops(real, 20_400 + 256) == pytest.approx(29_773e12, rel=0.01)  # LinCa's table: 29,773 TFLOPs
    assert speculative_step_flops(real, 20_656) / step_flops(real, 20_656) == pytest.approx(1 / 60)  # 1 of 60 blocks


class TestSpeCaHunyuanShared(SpeCaFamilyTests):
    """The shared family checks the tests above do not already make, on the bundled model."""

    IMAGE_TOKENS = 5 * 8 * 8  # 17 frames x 32 x 32 -> 5 x 8 x 8 latents, patch 1
    TEXT_TOKENS = 16
    REFERENCE = SpeCaConfig.from_name("reference")
    # Already checked above with the same meaning (threshold 0, batch vs alone, rollback, cache estimate).
    test_threshold_zero_reproduces_uncached = None
    test_batch_with_mixed_decisions_equals_alone = None
    test_rollback_recomputes_the_rejected_step = None
    test_cache_bytes_estimate_matches_the_cache = None

    @pytest.fixture
    def pipe(self, tiny_pipe):
        return tiny_pipe

    def _call(self, pipe, idx, output_type):
        return pipe(prompt=[PROMPTS[i] for i in idx], generator=[torch.Generator().manual_seed(i) for i in idx],
                    height=32, width=32, num_frames=17, num_inference_steps=self.STEPS, prompt_template=TEMPLATE,
                    max_sequence_length=16, output_type=output_type).frames

    def run(self, pipe, idx, cfg=False):
        return self._call(pipe, idx, "latent")

    def decoded(self, pipe, idx):
        return self._call(pipe, idx, "np")

    def image_stream(self, block_output):
        return block_output[0]  # HunyuanVideo blocks return (hidden_states, encoder_hidden_states)

    def verified_block(self, transformer):
        return transformer.single_transformer_blocks[-1]


def _check_errors(pipe, config, perturb_at=None):
    """SpeCa's check errors over a run of accepted drafts; with `perturb_at`, the latent is replaced by
    fresh noise after that step, as if the trajectory had left the one the drafts extrapolate."""
    def callback(_pipe, i, _t, tensors):
        if i == perturb_at:
            return {"latents": torch.randn(tensors["latents"].shape, generator=torch.Generator().manual_seed(99))}
        return {}

    session = apply_speca(pipe, config)
    try:
        pipe(prompt=[PROMPTS[0]], generator=[torch.Generator().manual_seed(0)], height=32, width=32, num_frames=17,
             num_inference_steps=STEPS, prompt_template=TEMPLATE, max_sequence_length=16, output_type="latent",
             callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
        return session.stats()[0].errors
    finally:
        disable_speca(pipe)


@pytest.mark.parametrize("verify_tokens", [1.0, 0.25])
def test_first_block_check_sees_the_real_latent(tiny_pipe, verify_tokens):
    """The paper's last-block check compares drafts with drafts: a latent that left the drafted trajectory
    leaves its error unchanged. The first-block check runs on the real latent and sees it (on a token
    subset too)."""
    always = dict(tau0=math.inf, tau_min=math.inf, warmup_steps=3, max_spec=STEPS, verify_tokens=verify_tokens)
    plain = SpeCaConfig(**always)
    first = SpeCaConfig(verify_first=True, **always)
    # Steps 0-2 run in full; the drafts from step 3 on are all accepted; the latent is replaced after step 3.
    assert _check_errors(tiny_pipe, plain, perturb_at=3) == pytest.approx(_check_errors(tiny_pipe, plain), rel=1e-9)
    calm, moved = _check_errors(tiny_pipe, first), _check_errors(tiny_pipe, first, perturb_at=3)
    assert moved[0] == pytest.approx(calm[0], rel=1e-9)  # step 3: before the change
    assert moved[1] > 3 * calm[1]  # step 4: the first block's input is the new latent


def test_first_block_check_scale_applies_from_its_share(tiny_pipe):
    """`verify_first_scale` divides the first-block check's reading from `verify_first_scale_from` of the run
    on: with a latent that left the drafted trajectory, a huge scale from step 6 of 12 leaves the steps before
    as the first block read them and the steps after as the last block's check alone reads them."""
    always = dict(tau0=math.inf, tau_min=math.inf, warmup_steps=3, max_spec=STEPS)
    plain = _check_errors(tiny_pipe, SpeCaConfig(**always), perturb_at=3)
    first = _check_errors(tiny_pipe, SpeCaConfig(verify_first=True, **always), perturb_at=3)
    late = _check_errors(tiny_pipe, SpeCaConfig(verify_first=True, verify_first_scale=1e9, verify_first_scale_from=0.5,
                                                **always), perturb_at=3)
    assert late[:3] == pytest.approx(first[:3], rel=1e-9)  # steps 3-5 (drafts from step 3 on)
    assert late[3:] == pytest.approx(plain[3:], rel=1e-9)
    assert min(f / p for f, p in zip(first[3:], plain[3:])) > 1.5  # the first block's reading decided there


def test_draft_shrink_moves_the_output_not_the_check(tiny_pipe):
    """`draft_shrink` pulls the stream the output head gets at a speculative step toward the last full step's
    (0: that stream itself, 0.5: halfway to Newton's draft), while the check still reads Newton's draft; from
    `draft_shrink_from` of the run on only."""
    def head_inputs(shrink, start=0.0):
        seen = []
        handle = tiny_pipe.transformer.norm_out.register_forward_pre_hook(lambda m, a: seen.append(a[0].clone()))
        session = apply_speca(tiny_pipe, SpeCaConfig(tau0=math.inf, tau_min=math.inf, warmup_steps=3, max_spec=STEPS,
                                                     verify_tokens=0.25, draft_shrink=shrink,
                                                     draft_shrink_from=start))
        try:
            run(tiny_pipe, [0])
            return seen, session.stats()[0]
        finally:
            disable_speca(tiny_pipe)
            handle.remove()

    (reuse, stats0), (half, stats_half), (newton, stats1) = (head_inputs(s) for s in (0.0, 0.5, 1.0))
    assert stats0.step_pattern == "FFF" + "S" * (STEPS - 3)
    # Step 3, the first draft (from full steps 1 and 2): the same latent in, so the same check reading.
    assert stats0.errors[0] == pytest.approx(stats1.errors[0], rel=1e-9)
    assert stats_half.errors[0] == pytest.approx(stats1.errors[0], rel=1e-9)
    assert torch.allclose(reuse[3], reuse[2], atol=1e-6)
    assert torch.allclose(half[3], (reuse[3] + newton[3]) / 2, atol=1e-5)
    assert (newton[3] - reuse[3]).abs().max() > 100 * 1e-5  # the draft did move the stream
    late, _ = head_inputs(0.0, start=0.5)  # from step 6 of 12 on
    assert all(torch.equal(late[i], newton[i]) for i in range(6))
    assert torch.allclose(late[6], late[2], atol=1e-6)  # the last full step is still step 2


def test_delta_signal_is_not_diluted_by_the_residual_stream(tiny_pipe):
    """Same drafts, same differences; the delta signal divides by the block's update, which is smaller
    than the stream it is added to, so its errors are larger at every speculative step."""
    always = dict(tau0=math.inf, tau_min=math.inf, warmup_steps=3, max_spec=STEPS)
    output = _check_errors(tiny_pipe, SpeCaConfig(signal="output", **always))
    delta = _check_errors(tiny_pipe, SpeCaConfig(signal="delta", **always))
    assert len(output) == len(delta) == STEPS - 3
    assert all(d > 1.5 * o > 0 for o, d in zip(output, delta))


@pytest.mark.parametrize(("verify_first", "high"), [(False, 1.5), (True, 1.75)])
def test_token_subset_check_reads_like_the_full_check(tiny_pipe, verify_first, high):
    """A quarter of the video tokens through the verified block(s) gives errors at most 20% under the full
    check's (reading low would accept drafts the full check rejects) and at most `high` times it at every step
    of a run of drafts, growing along the run as the full check's do. On the bundled v2 the last-block check
    reads 1.01-1.03x the full one; with the first-block check too (an ablation, in no preset) 1.17-1.62x: the
    first block's error over-reads on a quarter of the tokens, which only makes the check stricter."""
    always = dict(tau0=math.inf, tau_min=math.inf, warmup_steps=3, max_spec=STEPS, verify_first=verify_first)
    full = _check_errors(tiny_pipe, SpeCaConfig(**always))
    subset = _check_errors(tiny_pipe, SpeCaConfig(verify_tokens=0.25, **always))
    assert len(full) == len(subset) == STEPS - 3
    assert all(0.8 * f < s < high * f for f, s in zip(full, subset)), (full, subset)
    assert subset == sorted(subset) and full == sorted(full)


def test_token_subset_check_costs_its_share(tiny_pipe):
    """Same step pattern, cheaper checks: the compute SpeCa reports matches the FLOPs that hooks count in
    the blocks (bench.caching's counter: linear layers and attention calls), within 3%."""
    from bench.caching import count_block_flops

    always = dict(tau0=math.inf, tau_min=math.inf, warmup_steps=2, max_spec=4)
    with count_block_flops(tiny_pipe.transformer) as uncached:
        run(tiny_pipe, [0, 1])
    spent, patterns = {}, {}
    for share in (1.0, 0.25):
        session = apply_speca(tiny_pipe, SpeCaConfig(verify_tokens=share, **always))
        with count_block_flops(tiny_pipe.transformer) as counted:
            run(tiny_pipe, [0, 1])
        stats = session.stats()
        disable_speca(tiny_pipe)
        patterns[share] = [s.step_pattern for s in stats]
        spent[share] = sum(s.compute_ratio for s in stats) / len(stats)
        assert spent[share] == pytest.approx(counted["flops"] / uncached["flops"], rel=0.03)
    assert patterns[1.0] == patterns[0.25]
    full_steps = patterns[1.0][0].count("F") / STEPS
    assert full_steps < spent[0.25] < spent[1.0]


def test_token_subset_check_is_refused_where_it_cannot_run(tiny_pipe):
    with pytest.raises(ValueError, match="SpeCaConfig.verify_tokens=0.5"):
        SpeCaConfig(verify_tokens=0.5, cache="module")
    with pytest.raises(ValueError, match="SpeCaConfig.verify_tokens=0"):
        SpeCaConfig(verify_tokens=0.0)


def _joint_errors(pipe, scale, **config) -> list[list[float]]:
    session = apply_speca(pipe, SpeCaConfig(tau0=math.inf, tau_min=math.inf, warmup_steps=2, max_spec=3, **config))
    session.set_guidance_scale(scale)
    try:
        run(pipe, [0, 1], cfg=True)
        return [s.errors for s in session.stats()]
    finally:
        disable_speca(pipe)


def test_joint_cfg_checks_the_guided_prediction(tiny_pipe):
    """Every draft accepted, so the trajectory is the same whatever is checked. At CFG scale 1 the guided
    prediction is the cond branch's, so joint CFG reads what the leader's own check reads; at 0, the
    uncond branch's, which the leader never checks; at the run's scale, the draft errors both branches
    make are amplified, not averaged."""
    leader = _joint_errors(tiny_pipe, None, signal="prediction")
    cond = _joint_errors(tiny_pipe, 1.0, **JOINT)
    uncond = _joint_errors(tiny_pipe, 0.0, **JOINT)
    guided = _joint_errors(tiny_pipe, 4.0, **JOINT)
    pooled = _joint_errors(tiny_pipe, 4.0, **{**JOINT, "cfg_branches": "pooled"})
    for lead, c, u, g, p in zip(leader, cond, uncond, guided, pooled):
        assert len(lead) == len(c) > 0 and c == pytest.approx(lead, rel=1e-4)
        assert all(abs(x - y) > 1e-3 * y for x, y in zip(u, lead))
        assert all(min(x, y) < z < max(x, y) for x, y, z in zip(c, u, p))  # pooled: between the two
        assert all(z > max(x, y) for x, y, z in zip(c, u, g))


def test_joint_cfg_runs_each_step_once_and_shares_its_decision(tiny_pipe, forced):
    """One transformer pass per step for both branches (the uncond call computes nothing), the
    rolled-back sample's branches both recomputed, and each sample as alone."""
    forced.batch = [0, 1]
    forced.reject = {(1, 4)}
    passes = []
    session = apply_speca(tiny_pipe, SpeCaConfig(tau0=math.inf, tau_min=math.inf, warmup_steps=2, max_spec=8,
                                                 **JOINT))
    session.set_guidance_scale(4.0)
    counter, step = step_counter(tiny_pipe.transformer, calls_per_step=2)
    hook = tiny_pipe.transformer.transformer_blocks[0].ff.register_forward_hook(
        lambda m, i, o: passes.append((step(), o.shape[0])))
    try:
        batch = run(tiny_pipe, [0, 1], cfg=True)
        patterns = [s.step_pattern for s in session.stats()]
        forced.batch = [1]
        alone = run(tiny_pipe, [1], cfg=True)
        assert session.stats()[0].step_pattern == patterns[1]
    finally:
        hook.remove()
        counter.remove()
    assert [p[4] for p in patterns] == ["S", "R"]
    assert passes[:2] == [(0, 2), (0, 2)]  # step 0: no branch's arguments known yet, two calls
    assert (1, 4) in passes and passes.count((4, 2)) == 1  # step 4: sample 1's cond and uncond rows, one pass
    assert ((batch[1] - alone[0]).abs().max() / alone.abs().max()).item() <= 1e-5


def test_joint_cfg_refuses_a_branch_with_other_inputs(tiny_pipe):
    """The uncond call was run at the cond call, from the cond call's latent: another latent is refused."""
    transformer = tiny_pipe.transformer
    session = apply_speca(transformer, SpeCaConfig(warmup_steps=1, cfg_branches="pooled"))
    session.begin(4)
    embeds, pooled, mask = tiny_pipe.encode_prompt(prompt=PROMPTS[:1], prompt_template=TEMPLATE,
                                                   max_sequence_length=16, device="cpu")
    x = torch.randn(1, transformer.config.in_channels, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    args = dict(timestep=torch.tensor([900.0]), encoder_hidden_states=embeds, encoder_attention_mask=mask,
                pooled_projections=pooled, guidance=torch.tensor([6000.0]), return_dict=False)
    with torch.no_grad():
        for i in range(2):
            with transformer.cache_context("cond"):
                transformer(hidden_states=x, **args)
            with transformer.cache_context("uncond"):
                if i == 1:
                    with pytest.raises(RuntimeError, match="'uncond' call at step 1 got another 'hidden_states'"):
                        transformer(hidden_states=x + 1, **args)
                else:
                    transformer(hidden_states=x, **args)


def test_leader_cfg_refuses_a_follower_that_comes_first(tiny_pipe):
    """Under cfg_branches='leader' the uncond call runs no check and keeps no check nodes, so an uncond call that
    reaches a step before the cond call (the leading context) is refused rather than deciding without them."""
    transformer = tiny_pipe.transformer
    session = apply_speca(transformer, SpeCaConfig(warmup_steps=1, verify_first=True, verify_tokens=0.5))
    session.begin(4)
    embeds, pooled, mask = tiny_pipe.encode_prompt(prompt=PROMPTS[:1], prompt_template=TEMPLATE,
                                                   max_sequence_length=16, device="cpu")
    x = torch.randn(1, transformer.config.in_channels, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    args = dict(hidden_states=x, timestep=torch.tensor([900.0]), encoder_hidden_states=embeds,
                encoder_attention_mask=mask, pooled_projections=pooled, guidance=torch.tensor([6000.0]),
                return_dict=False)
    with torch.no_grad():
        for name in ("cond", "uncond"):
            with transformer.cache_context(name):
                transformer(**args)
        with transformer.cache_context("uncond"), pytest.raises(RuntimeError, match="'uncond' reached step 1 before"):
            transformer(**args)


def test_check_options_are_refused_where_they_cannot_run(tiny_pipe):
    with pytest.raises(ValueError, match="signal='prediction' needs the verified block to be the last one"):
        apply_speca(tiny_pipe, SpeCaConfig(signal="prediction", verify_block=0))
    with pytest.raises(ValueError, match="cfg_branches='both' is invalid"):
        SpeCaConfig(cfg_branches="both")
    apply_speca(tiny_pipe, SpeCaConfig(warmup_steps=1, **JOINT))  # and no set_guidance_scale
    with pytest.raises(RuntimeError, match="cfg_branches='guided' needs the CFG scale"):
        run(tiny_pipe, [0], cfg=True)


def test_draft_gate_decides_per_sample_and_alike_in_a_batch(tiny_pipe, monkeypatch):
    """The gate reads each sample's curvature over both CFG calls at every full step, without touching the
    result; at a middle reading it keeps steps full that the (unbounded) checks would draft, differently
    per sample, and each sample's steps and latents in the batch equal its own run's; near zero every step
    runs in full, equal to the uncached run."""
    notes, readings = [], {}
    original = StepController.note_lookback

    def note(self, step, partials):
        original(self, step, partials)
        notes.append(step)
        readings.update({(step, b): self.curvature(b) for b in partials})

    monkeypatch.setattr(StepController, "note_lookback", note)
    idx = [0, 1, 2]
    base = run(tiny_pipe, idx, cfg=True)
    cfg = SpeCaConfig(tau0=math.inf, tau_min=math.inf, warmup_steps=3, max_spec=4)
    session = apply_speca(tiny_pipe, cfg)
    ungated = run(tiny_pipe, idx, cfg=True)
    open_patterns = [s.step_pattern for s in session.stats()]
    disable_speca(tiny_pipe)
    session = apply_speca(tiny_pipe, cfg.replace(draft_gate=1e9))  # reads, never blocks
    assert torch.equal(run(tiny_pipe, idx, cfg=True), ungated)
    assert [s.step_pattern for s in session.stats()] == open_patterns
    full = [i for i, c in enumerate(open_patterns[0]) if c == "F" and i >= 2]  # two full steps before: a lookback
    assert notes == [i for i in full for _ in range(2)]  # the cond call's, then the uncond call's

    values = sorted(readings.values())
    # Between two middle readings, where they lie furthest apart: clear of the batch's rounding.
    k = max(range(len(values) // 4, 3 * len(values) // 4), key=lambda j: values[j + 1] / values[j])
    disable_speca(tiny_pipe)
    session = apply_speca(tiny_pipe, cfg.replace(draft_gate=(values[k] * values[k + 1]) ** 0.5))
    batch = run(tiny_pipe, idx, cfg=True)
    patterns = [s.step_pattern for s in session.stats()]
    assert patterns != open_patterns and len(set(patterns)) > 1
    for i in idx:
        alone = run(tiny_pipe, [i], cfg=True)
        assert session.stats()[0].step_pattern == patterns[i]
        # 5e-5: true CFG (scale 4) amplifies the rounding that differs between batch sizes.
        assert ((batch[i] - alone[0]).abs().max() / alone.abs().max()).item() <= 5e-5

    disable_speca(tiny_pipe)
    session = apply_speca(tiny_pipe, cfg.replace(draft_gate=1e-9))
    out = run(tiny_pipe, idx, cfg=True)
    assert [s.step_pattern for s in session.stats()] == ["F" * STEPS] * 3
    assert (out - base).abs().max().item() <= 1e-6 * base.abs().max().item()
