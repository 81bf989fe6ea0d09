"""SpeCa on diffusers' HunyuanVideo 1.5 (`HunyuanVideo15Transformer3DModel`, `HunyuanVideo15Pipeline`), CPU.

The tiny random 1.5 pipeline of `tests/hv15_tiny.py`, loaded once per session through
`pipeline.loading`: 2 dual-stream blocks, 24 x 40 x 9 frames = 180 video tokens, 12 Qwen + 16 ByT5 +
4 image tokens of text. Prompts with quoted text give ByT5 glyph tokens; CFG runs through the
pipeline's guider (cond and uncond calls), or is off (one call per step, as CFG-distilled checkpoints).
"""

import math

import pytest
import torch

import hv15_tiny
from speca import SpeCaConfig, apply_speca, disable_speca
from speca import hunyuan_video15 as family
from speca.controller import StepController
from speca_tester import SpeCaFamilyTests

PROMPTS = ['the sign says "OPEN" on a blue background', "a red circle moving left", "a green dog on the background",
           'a white "STOP" sign']
# The default preset's two checks, each on 1/8 of the video tokens: the last block's, and the first block's on
# the real latent.
DEFAULT_CHECKS = {"verify_tokens": 0.125, "verify_first": True}


def call(pipe, idx, cfg=False, steps=8, **kw):
    pipe.guider = pipe.guider.new(guidance_scale=6.0, enabled=cfg)
    return pipe(prompt=[PROMPTS[i] for i in idx], generator=[torch.Generator().manual_seed(i) for i in idx],
                height=hv15_tiny.HEIGHT, width=hv15_tiny.WIDTH, num_frames=9, num_inference_steps=steps, **kw).frames


class TestSpeCaHunyuanVideo15(SpeCaFamilyTests):
    IMAGE_TOKENS = hv15_tiny.VIDEO_TOKENS
    TEXT_TOKENS = hv15_tiny.TEXT_TOKENS
    REFERENCE = SpeCaConfig.from_name("reference")

    @pytest.fixture
    def pipe(self, hv15_model):
        yield hv15_model.pipe
        disable_speca(hv15_model.pipe)

    def run(self, pipe, idx, cfg=False):
        return call(pipe, idx, cfg, self.STEPS, output_type="latent")

    def decoded(self, pipe, idx):
        return call(pipe, idx, steps=self.STEPS, output_type="np")

    def image_stream(self, block_output):
        return block_output[0]  # 1.5's blocks return (hidden_states, encoder_hidden_states)

    def verified_block(self, transformer):
        return transformer.transformer_blocks[-1]

    def estimate_cache_bytes(self, transformer, cfg, samples, true_cfg):
        return family.estimate_cache_bytes(transformer.config, cfg, self.IMAGE_TOKENS, self.TEXT_TOKENS, batch=samples,
                                           dtype_bytes=4, contexts=2 if true_cfg else 1)


@pytest.fixture
def pipe(hv15_model):
    yield hv15_model.pipe
    disable_speca(hv15_model.pipe)


def test_quoted_prompts_have_glyph_tokens(pipe):
    """The prompts these tests use do reach the ByT5 stream: quoted text gives unmasked glyph tokens."""
    _, _, _, glyph_mask = pipe.encode_prompt(prompt=PROMPTS, device="cpu", batch_size=len(PROMPTS))
    assert [int(m.sum()) > 0 for m in glyph_mask] == [True, False, False, True]


@pytest.mark.parametrize("cfg", [False, True])
def test_default_checks_at_threshold_zero_equal_no_speca(pipe, cfg):
    """The default preset's checks (token subsets, the first block's too) at threshold 0 reject every draft:
    within 1e-5 of the latents' scale of no SpeCa, a quoted prompt in the batch."""
    base = call(pipe, [0, 1], cfg, output_type="latent")
    session = apply_speca(pipe, SpeCaConfig(tau0=0.0, tau_min=0.0, min_spec=0, warmup_steps=1, **DEFAULT_CHECKS))
    out = call(pipe, [0, 1], cfg, output_type="latent")
    assert [s.step_pattern for s in session.stats()] == ["F" + "R" * 7] * 2
    assert (out - base).abs().max().item() <= 1e-5 * base.abs().max().item()


def test_default_preset_runs_and_an_accepting_threshold_saves_compute(pipe):
    """The default preset runs on 1.5 (its subset checks need the family's token-subset rule); a threshold and a
    curvature gate that accept every draft (this random model's trajectories bend more than the gate allows)
    save compute and change the output."""
    base = call(pipe, [0, 3], True, output_type="latent")
    session = apply_speca(pipe, SpeCaConfig.from_name("default"))
    call(pipe, [0, 3], True, output_type="latent")
    assert all(s.step_pattern.startswith("FFF") and len(s.step_pattern) == 8 for s in session.stats())
    disable_speca(pipe)
    session = apply_speca(pipe, SpeCaConfig.from_name("default", tau0=math.inf, tau_min=math.inf,
                                                             draft_gate=math.inf))
    out = call(pipe, [0, 3], True, output_type="latent")
    stats = session.stats()
    assert all(s.accepted > 0 and s.compute_ratio < 0.75 for s in stats)
    assert (out - base).abs().max().item() > 1e-3 * base.abs().max().item()


def test_cond_and_uncond_calls_share_one_decision(pipe, monkeypatch):
    """The guider's cond call decides, its uncond call follows: a rejection of sample 1 at step 4 recomputes
    sample 1 alone in both calls."""
    original = StepController.decide
    monkeypatch.setattr(StepController, "decide", lambda c, step, spec, errors: original(
        c, step, spec, {b: (math.inf if (b, step) == (1, 4) else e) for b, e in errors.items()}))
    rows, contexts = [], []
    t = pipe.transformer
    handles = [t.transformer_blocks[0].ff.register_forward_hook(lambda m, i, o: rows.append(o.shape[0])),
               t.register_forward_pre_hook(lambda m, a: contexts.append(
                   t._speca_session.states.current().name))]
    session = apply_speca(pipe, SpeCaConfig(tau0=math.inf, tau_min=math.inf, warmup_steps=2, max_spec=8))
    try:
        call(pipe, [0, 1], True, output_type="latent")
    finally:
        for h in handles:
            h.remove()
    assert contexts[:2] == ["pred_cond", "pred_uncond"] and len(contexts) == 16
    assert [s.step_pattern[4] for s in session.stats()] == ["S", "R"]
    # Full passes only: 2 warm-up steps x 2 calls x 2 rows, then step 4's cond and uncond passes on sample 1 alone.
    assert rows == [2, 2, 2, 2, 1, 1]


def test_flops_and_cache_of_the_real_configs():
    """480p and 720p t2v x 121 frames x 50 steps with CFG (two calls per step): 54 blocks of 2048 wide over
    video + 1985 text tokens (1000 Qwen + 256 ByT5 + 729 image, padding included)."""
    real = dict(num_attention_heads=16, attention_head_dim=128, num_layers=54, patch_size=1, patch_size_t=1,
                mlp_ratio=4.0)
    text = family.text_tokens()
    for (h, w), video, pflops in (((480, 848), 49290, 144.18), ((720, 1280), 111600, 632.47)):
        assert family.video_tokens(real, 31, h // 16, w // 16) == video
        n, d = video + text, 2048
        assert family.step_flops(real, n) == 54 * (24 * n * d * d + 4 * n * n * d)
        assert 50 * 2 * family.step_flops(real, n) / 1e15 == pytest.approx(pflops, rel=1e-3)
    lean = family.estimate_cache_bytes(real, SpeCaConfig(cache="lean", order=1), 111600, text, contexts=2)
    assert lean == 2 * (2 * 111600 + text) * 2048 * 2 * 2  # 3.7 GB at 720p, bf16, both CFG contexts


def test_token_subset_rule_follows_the_tokens(pipe):
    """The family's token-subset rule on a real call of the verified block: run on the video tokens in reverse
    order, the block's video output is its full output reversed (the rotary rows follow the tokens, the padded
    text-only mask stays whole); with the rotary rows left in place it is not."""
    from speca.registry import TokenSubset

    calls = []
    block = pipe.transformer.transformer_blocks[-1]
    handle = block.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)) if not calls else None,
                                             with_kwargs=True)
    try:
        call(pipe, [0, 1], steps=1, output_type="latent")
    finally:
        handle.remove()
    args, kwargs = calls[0]
    names = ["hidden_states", "encoder_hidden_states", "temb", "attention_mask", "freqs_cis"]
    bound = {**dict(zip(names, args)), **kwargs}
    assert bound["attention_mask"].shape == (2, hv15_tiny.TEXT_TOKENS) and not bound["attention_mask"].all()
    n = bound["hidden_states"].shape[1]
    backwards = torch.arange(n - 1, -1, -1)
    everything = torch.ones(n, dtype=torch.bool)
    sub = TokenSubset(backwards, everything, backwards, everything, n)
    rule = family.FAMILY.blocks[type(block)].subset
    with torch.no_grad():
        full = block(**bound)[0]
        reordered = block(**rule(bound, sub))[0]
        stale = block(**{**rule(bound, sub), "freqs_cis": bound["freqs_cis"]})[0]
    assert torch.allclose(reordered, full.flip(1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stale, full.flip(1), rtol=1e-3, atol=1e-4)


def _guided_errors(pipe, scale, branches="guided") -> list[list[float]]:
    session = apply_speca(pipe, SpeCaConfig(tau0=math.inf, tau_min=math.inf, warmup_steps=2, max_spec=3,
                                            cfg_branches=branches, signal="prediction"))
    session.set_guidance_scale(scale)
    try:
        call(pipe, [0, 1], True, output_type="latent")
        return [s.errors for s in session.stats()]
    finally:
        disable_speca(pipe)


def test_guided_check_pairs_the_guiders_calls(pipe):
    """The guider's calls run in contexts `pred_cond` / `pred_uncond`: the guided check finds them. Every draft is
    accepted, so the trajectory is the same whatever is checked: at scale 1 the guided prediction is the cond
    branch's, what the leader's own check reads; at 6 it is neither that nor both branches' errors pooled."""
    leader = _guided_errors(pipe, None, "leader")
    pooled = _guided_errors(pipe, 6.0, "pooled")
    cond = _guided_errors(pipe, 1.0)
    guided = _guided_errors(pipe, 6.0)
    for lead, p, c, g in zip(leader, pooled, cond, guided):
        assert len(lead) == len(p) == len(c) == len(g) > 0
        assert c == pytest.approx(lead, rel=1e-4)
        assert all(abs(x - y) > 1e-3 * y and abs(x - z) > 1e-3 * z for x, y, z in zip(g, p, lead))
