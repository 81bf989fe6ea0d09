"""SpeCa on diffusers' class-conditional DiT (`DiTTransformer2DModel`, `DiTPipeline`), tiny random
components, CPU. Components follow diffusers' own DiT pipeline test; 8x8 latents in 2x2
patches are 16 tokens. DiTPipeline runs CFG as one concatenated batch `[x, x]` / `[y, null]`.
"""

import pytest
import torch

from speca import SpeCaConfig, apply_speca, disable_speca, get_session
from speca import dit as dit_family
from speca.controller import StepController
from speca_tester import SpeCaFamilyTests

LABELS = [0, 1, 2, 1]  # sample identity -> class id (samples 1 and 3 share a class, not a seed)
ID2LABEL = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 2: "great white shark"}


@pytest.fixture(scope="module")
def dit_pipe():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    # num_embeds_ada_norm=1000: DiTPipeline passes class 1000 as its "no class" label for CFG.
    transformer = DiTTransformer2DModel(sample_size=8, num_layers=3, patch_size=2, attention_head_dim=8,
                                        num_attention_heads=2, in_channels=4, out_channels=8, attention_bias=True,
                                        activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
                                        norm_type="ada_norm_zero", norm_elementwise_affine=False)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, sample_size=8)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(), id2label=ID2LABEL)
    transformer.eval()  # class-label dropout is on in training mode
    vae.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


class TestSpeCaDiT(SpeCaFamilyTests):
    IMAGE_TOKENS = (8 // 2) ** 2
    TEXT_TOKENS = 0
    REFERENCE = dit_family.REFERENCE
    ATTENTION = "attn1"

    @pytest.fixture
    def pipe(self, dit_pipe):
        yield dit_pipe
        disable_speca(dit_pipe)

    def _call(self, pipe, idx, cfg, output_type):
        return pipe(class_labels=[LABELS[i] for i in idx], generator=[torch.Generator().manual_seed(i) for i in idx],
                    num_inference_steps=self.STEPS, guidance_scale=4.0 if cfg else 1.0, output_type=output_type).images

    def run(self, pipe, idx, cfg=False):
        return self._call(pipe, idx, cfg, "pt")  # DiTPipeline always decodes: images in [0, 1]

    def decoded(self, pipe, idx):
        return self._call(pipe, idx, True, "np")

    def image_stream(self, block_output):
        return block_output  # a DiT block returns its one stream

    def verified_block(self, transformer):
        return transformer.transformer_blocks[-1]

    def estimate_cache_bytes(self, transformer, cfg, samples, true_cfg):
        return dit_family.estimate_cache_bytes(transformer.config, cfg, rows=samples * (2 if true_cfg else 1),
                                               dtype_bytes=4)


def test_flops_check_value():
    """DiT-XL/2 at 256x256 (32x32 latents, patch 2): 118.6 GFLOPs (the DiT paper counts multiply-adds)."""
    xl = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32, patch_size=2)
    assert dit_family.image_tokens(xl) == 256
    assert dit_family.step_flops(xl) / 2 == pytest.approx(118.6e9, rel=0.01)


def test_cfg_rows_of_a_sample_share_one_decision(dit_pipe, monkeypatch):
    """CFG in one batch: 2 samples are 4 rows; rejecting sample 1 recomputes its cond and uncond rows only,
    and its error is one number over both rows."""
    original = StepController.decide
    errors_seen = {}

    def decide(c, step, spec, errors):
        errors_seen[step] = dict(errors)
        return original(c, step, spec, {b: (float("inf") if (b, step) == (1, 4) else e) for b, e in errors.items()})

    monkeypatch.setattr(StepController, "decide", decide)
    full_rows = []
    pre = dit_pipe.transformer.transformer_blocks[0].attn1.register_forward_pre_hook(
        lambda m, args: full_rows.append(args[0].shape[0]))
    session = apply_speca(dit_pipe, SpeCaConfig(tau0=float("inf"), tau_min=float("inf"), warmup_steps=2,
                                                max_spec=8))
    try:
        dit_pipe(class_labels=[0, 1], generator=[torch.Generator().manual_seed(i) for i in range(2)],
                 num_inference_steps=8, guidance_scale=4.0, output_type="pt")
    finally:
        pre.remove()
        disable_speca(dit_pipe)
    stats = session.stats()
    assert len(stats) == 2 and [s.step_pattern[4] for s in stats] == ["S", "R"]
    assert all(set(e) <= {0, 1} for e in errors_seen.values())  # one error per sample, not per row
    # Block 0's attention runs in full passes only (lean cache): 2 warm-up steps on all 4 rows, then
    # sample 1's two rows at step 4.
    assert full_rows == [4, 4, 2]


def test_cfg_pairing_only_for_a_cfg_batch(dit_pipe):
    t = dit_pipe.transformer
    x = torch.randn(2, 4, 8, 8)
    pair = torch.cat([x, x])
    assert dit_family.cfg_samples(t, dict(hidden_states=pair, class_labels=torch.tensor([3, 5, 1000, 1000])), 4) \
        == [0, 1, 0, 1]
    # Unconditional samples without CFG (null labels, different latents) are separate samples.
    assert dit_family.cfg_samples(t, dict(hidden_states=torch.randn(2, 4, 8, 8),
                                          class_labels=torch.tensor([1000, 1000])), 2) == [0, 1]
    assert dit_family.cfg_samples(t, dict(hidden_states=torch.cat([x, torch.randn(2, 4, 8, 8)]),
                                          class_labels=torch.tensor([3, 5, 1000, 1000])), 4) == [0, 1, 2, 3]


def test_dit_blocks_with_cross_attention_are_refused():
    from diffusers import DiTTransformer2DModel

    t = DiTTransformer2DModel(sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2,
                              in_channels=4, out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
    t.transformer_blocks[0].norm_type = "ada_norm"
    with pytest.raises(ValueError, match=r"transformer_blocks\[0\] has norm_type='ada_norm'"):
        apply_speca(t, SpeCaConfig())
    assert getattr(t, "_speca_session", None) is None


def test_token_subset_check_is_refused_without_a_subset_rule(dit_pipe):
    with pytest.raises(ValueError, match="verify_tokens=0.5: DiT's block BasicTransformerBlock has no token-subset"):
        apply_speca(dit_pipe, SpeCaConfig(verify_tokens=0.5))
    assert get_session(dit_pipe) is None
