"""SpeCa on diffusers' FLUX (`FluxTransformer2DModel`, `FluxPipeline`), tiny random components, CPU.

Components follow diffusers' own FLUX pipeline tests (tiny CLIP, T5, VAE), with tokenizers
built offline. 16x16 images are 64 packed image tokens; prompts are 8 T5 tokens.
"""

import pytest
import torch

from speca import SpeCaConfig, disable_speca
from speca import flux as flux_family
from speca_tester import SpeCaFamilyTests

PROMPTS = ["a red cat", "a dog on grass", "a blue cat sitting", "a green dog"]
WORDS = sorted({w for p in PROMPTS for w in p.split()})
SIZE, TEXT = 16, 8


@pytest.fixture(scope="module")
def flux_pipe():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(0)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    clip_tok = CLIPTokenizer(vocab={w: i for i, w in enumerate([*specials, *"abcdefghijklmnopqrstuvwxyz",
                                                                 *(c + "</w>" for c in "abcdefghijklmnopqrstuvwxyz")])},
                             merges=[], bos_token=specials[0], eos_token=specials[1], pad_token=specials[1],
                             unk_token=specials[1], model_max_length=77)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tok), hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, projection_dim=32, bos_token_id=0,
                                        eos_token_id=1, pad_token_id=1, max_position_embeddings=77))
    t5_tok = T5Tokenizer(vocab=[(w, 0.0) for w in ["<pad>", "</s>", "<unk>", *("\u2581" + w for w in WORDS)]],
                         extra_ids=0, model_max_length=512)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=clip, tokenizer=clip_tok,
                        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer)
    for m in (clip, t5, transformer, vae):
        m.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TestSpeCaFlux(SpeCaFamilyTests):
    IMAGE_TOKENS = (SIZE // 2) ** 2  # the tiny VAE does not downsample; FLUX packs 2x2 latents per token
    TEXT_TOKENS = TEXT
    REFERENCE = flux_family.REFERENCE

    @pytest.fixture
    def pipe(self, flux_pipe):
        yield flux_pipe
        disable_speca(flux_pipe)

    def _call(self, pipe, idx, cfg=False, **kw):
        extra = dict(negative_prompt=[""] * len(idx), true_cfg_scale=3.0) if cfg else {}
        return pipe(prompt=[PROMPTS[i] for i in idx], generator=[torch.Generator().manual_seed(i) for i in idx],
                    height=SIZE, width=SIZE, num_inference_steps=self.STEPS, max_sequence_length=TEXT, **extra,
                    **kw).images

    def run(self, pipe, idx, cfg=False):
        return self._call(pipe, idx, cfg, output_type="latent")

    def decoded(self, pipe, idx):
        return self._call(pipe, idx, output_type="np")

    def image_stream(self, block_output):
        return block_output[1]  # FLUX blocks return (encoder_hidden_states, hidden_states)

    def verified_block(self, transformer):
        return transformer.single_transformer_blocks[-1]

    def estimate_cache_bytes(self, transformer, cfg, samples, true_cfg):
        return flux_family.estimate_cache_bytes(transformer.config, cfg, self.IMAGE_TOKENS, TEXT, batch=samples,
                                                dtype_bytes=4, contexts=2 if true_cfg else 1)


def test_flops_check_value():
    """FLUX.1-dev, 1024x1024, 512 text tokens, 50 steps: 3719.5 TFLOPs (TaylorSeer / SpeCa tables)."""
    dev = dict(num_attention_heads=24, attention_head_dim=128, num_layers=19, num_single_layers=38)
    tokens = flux_family.image_tokens(1024, 1024) + 512
    assert tokens == 4096 + 512
    assert 50 * flux_family.step_flops(dev, tokens) == pytest.approx(3719.5e12, rel=0.01)


def test_cfg_passes_share_one_decision(flux_pipe, monkeypatch):
    """With true CFG (two calls per step), the cond pass decides and the uncond pass follows it."""
    from speca import apply_speca
    from speca.controller import StepController

    original = StepController.decide
    monkeypatch.setattr(StepController, "decide", lambda c, step, spec, errors: original(
        c, step, spec, {b: (float("inf") if (b, step) == (1, 4) else e) for b, e in errors.items()}))
    rows = []
    handle = flux_pipe.transformer.transformer_blocks[0].ff.register_forward_hook(
        lambda m, i, o: rows.append(o.shape[0]))
    session = apply_speca(flux_pipe, SpeCaConfig(tau0=float("inf"), tau_min=float("inf"), warmup_steps=2,
                                                 max_spec=8))
    try:
        TestSpeCaFlux()._call(flux_pipe, [0, 1], cfg=True, output_type="latent")
    finally:
        handle.remove()
        disable_speca(flux_pipe)
    assert [s.step_pattern[4] for s in session.stats()] == ["S", "R"]
    # Full passes only: 2 warm-up steps x 2 calls x 2 rows, then step 4's cond and uncond passes on sample 1 alone.
    assert rows == [2, 2, 2, 2, 1, 1]


def test_ip_adapter_attention_is_refused():
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    from speca import apply_speca

    t = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=[4, 4, 8])
    t.transformer_blocks[0].attn.processor = FluxIPAdapterAttnProcessor(32, 32)
    with pytest.raises(ValueError, match=r"IP-Adapter attention \(transformer_blocks\[0\]\)"):
        apply_speca(t, SpeCaConfig())
    assert getattr(t, "_speca_session", None) is None


def test_same_decisions_and_result_under_torch_compile():
    """SpeCa inside `torch.compile` (the accept/reject is excluded from compiled regions): same step
    patterns and the same output as eager, on a transformer driven by a plain Euler loop."""
    import torch._dynamo
    from diffusers import FluxTransformer2DModel

    from speca import apply_speca

    torch.manual_seed(0)
    t = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2, attention_head_dim=16,
                               num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                               axes_dims_rope=[4, 4, 8]).eval()
    x, enc, pooled = torch.randn(2, 16, 4), torch.randn(2, 8, 32), torch.randn(2, 32)
    ids = dict(img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    cfg = SpeCaConfig(cache="module", tau0=0.2, tau_min=0.05, warmup_steps=2, max_spec=3)

    @torch.no_grad()
    def generate():
        session = apply_speca(t, cfg)
        session.begin(6)
        h = x.clone()
        for i in range(6):
            v = t(hidden_states=h, encoder_hidden_states=enc, pooled_projections=pooled,
                  timestep=torch.full((2,), 1 - i / 6), return_dict=False, **ids)[0]
            h = h - v / 6
        patterns = [s.step_pattern for s in session.stats()]
        disable_speca(t)
        return h, patterns

    eager, eager_patterns = generate()
    torch._dynamo.reset()
    t.compile(backend="eager")
    try:
        compiled, compiled_patterns = generate()
    finally:
        torch._dynamo.reset()
    assert "S" in "".join(eager_patterns)
    assert compiled_patterns == eager_patterns
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
