"""Model v2's build and training recipe: word order reaches the transformer, HunyuanVideo's proportions, and the
trainer's smoke run of the v2 recipe (VAE fine-tuned from a trained one) gives a loadable model."""

import json

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo

from pipeline.tiny.build import BUNDLED_MODEL_DIR, GENERATION_DEFAULTS, RECIPES, V1_MODEL_DIR, build_pipeline
from weight_distance import l1_distance

# The same words, colours swapped between the two objects: a bag of words cannot tell them apart.
PROMPT = "a red circle standing still and a blue square moving slowly left on a green background"
SWAPPED = "a blue circle standing still and a red square moving slowly left on a green background"


def _states_and_output(recipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    pipe = build_pipeline(0, recipe)
    emb, pooled, mask = pipe.encode_prompt(prompt=[prompt], prompt_template=GENERATION_DEFAULTS["prompt_template"],
                                           device="cpu", max_sequence_length=recipe.max_sequence_length)
    x = torch.randn(1, 16, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=emb,
                           encoder_attention_mask=mask, pooled_projections=torch.zeros_like(pooled),
                           return_dict=False)[0]
    return emb[0, mask[0].bool()], out


def test_word_order_reaches_the_transformer_in_v2_only():
    for name, changes in (("v1", False), ("v2", True)):
        (ea, oa), (eb, ob) = (_states_and_output(RECIPES[name], p) for p in (PROMPT, SWAPPED))
        rel = float((oa - ob).norm() / oa.norm())
        # The token "circle" sits at the same position in both prompts, after a different colour.
        circle = 3
        if changes:
            assert (ea[circle] - eb[circle]).abs().max() > 1e-2
            assert rel > 1e-5, rel
        else:  # v1 reads the word embeddings: the swapped prompt is the same set of rows, the output the same
            torch.testing.assert_close(ea[circle], eb[circle], atol=1e-6, rtol=0)
            assert rel < 1e-6, rel


def test_v2_has_hunyuanvideos_proportions():
    cfg = RECIPES["v2"].transformer
    assert cfg["num_layers"] + cfg["num_single_layers"] >= 12 and cfg["num_single_layers"] >= cfg["num_layers"]
    assert sum(cfg["rope_axes_dim"]) == cfg["attention_head_dim"]
    pipe = build_pipeline(0, RECIPES["v2"])
    assert pipe.text_encoder.config.num_hidden_layers >= 3
    assert len(pipe.transformer.single_transformer_blocks) == cfg["num_single_layers"]
    longest = ("a red circle moving quickly left and a blue square moving slowly right and "
               "a green triangle moving quickly down on a white background")
    assert len(pipe.tokenizer(longest).input_ids) <= RECIPES["v2"].max_sequence_length


def test_v2_smoke_training_in_two_runs_fine_tunes_a_vae_then_trains_a_transformer(tmp_path):
    """The split a long run takes across sessions: --vae-only, then --init-from that folder --new-transformer."""
    from pipeline.config import ModelConfig, SampleRequest
    from pipeline.generate import Generator
    from pipeline.loading import load_pipeline
    from pipeline.tiny import train

    stage, out = tmp_path / "vae-stage", tmp_path / "model"
    train.main(["--smoke", "--recipe", "v2", "--vae-from", str(BUNDLED_MODEL_DIR), "--vae-only",
                "--workdir", str(tmp_path / "w1"), "--output", str(stage)])
    assert (stage / "vae").is_dir() and not (stage / "transformer").exists()
    assert "no transformer yet" in (stage / "README.md").read_text()
    tuned, source = (AutoencoderKLHunyuanVideo.from_pretrained(d / "vae") for d in (stage, BUNDLED_MODEL_DIR))
    fresh = build_pipeline(0, RECIPES["v2"]).vae
    dist = {name: l1_distance(tuned, m) for name, m in (("source", source), ("fresh", fresh))}
    assert 0 < dist["source"] < dist["fresh"] / 10, dist  # a few steps away from the trained VAE, not the init

    train.main(["--smoke", "--recipe", "v2", "--init-from", str(stage), "--new-transformer",
                "--workdir", str(tmp_path / "w2"), "--output", str(out)])
    written = json.loads((out / "generation_config.json").read_text())
    assert written["max_sequence_length"] == 32 and written["world"] == "v2"
    assert written["true_cfg_scale"] == 6.0  # HunyuanVideo's guidance; v1 keeps 4
    assert json.loads((V1_MODEL_DIR / "generation_config.json").read_text())["true_cfg_scale"] == 4.0
    assert "world v2" in (out / "README.md").read_text()
    kept = AutoencoderKLHunyuanVideo.from_pretrained(out / "vae")
    assert kept.config.scaling_factor == tuned.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(kept.state_dict().values(), tuned.state_dict().values()))
    gen = Generator(load_pipeline(ModelConfig(model=str(out), device="cpu")))
    [sample] = gen.generate([SampleRequest(prompt=PROMPT, num_inference_steps=2)])
    assert sample.frames.shape == (17, 32, 32, 3)


def test_warm_start_spreads_a_patch_1_transformer_over_patch_2():
    """On a latent that is constant over each 2x2 patch the warm-started patch-2 transformer gives the patch-1
    one's prediction on the pooled latent, repeated over the patch: nothing but the patching changed."""
    from diffusers import HunyuanVideoTransformer3DModel

    from pipeline.tiny.build import TRANSFORMER_CONFIG
    from pipeline.tiny.train import warm_start_transformer

    torch.manual_seed(0)
    small = HunyuanVideoTransformer3DModel(**TRANSFORMER_CONFIG).eval()
    for p in small.parameters():  # the seeded init zeroes the output projection; any weights will do
        p.data.normal_(0, 0.2)
    big = HunyuanVideoTransformer3DModel(**{**TRANSFORMER_CONFIG, "patch_size": 2}).eval()
    assert warm_start_transformer(big, small) == ["x_embedder.proj.weight", "proj_out.weight", "proj_out.bias"]
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 16, 3, 4, 4, generator=g)
    text = dict(timestep=torch.tensor([400.0]), encoder_hidden_states=torch.randn(1, 5, 64, generator=g),
                encoder_attention_mask=torch.ones(1, 5), pooled_projections=torch.randn(1, 32, generator=g),
                return_dict=False)
    with torch.no_grad():
        want = small(hidden_states=z, **text)[0].repeat_interleave(2, 3).repeat_interleave(2, 4)
        got = big(hidden_states=z.repeat_interleave(2, 3).repeat_interleave(2, 4), **text)[0]
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    other = HunyuanVideoTransformer3DModel(**{**TRANSFORMER_CONFIG, "num_layers": 1})
    with pytest.raises(ValueError, match="transformer_blocks.1"):  # the source has a block more
        warm_start_transformer(other, small)


def test_binding_gap_measures_the_prompts_pull_on_the_bundled_v2_and_skips_one_object_worlds():
    from bench.tiny_model import binding_gap
    from pipeline.config import ModelConfig
    from pipeline.loading import load_pipeline
    from pipeline.tiny.worlds import world_of

    v2 = load_pipeline(ModelConfig(model=str(BUNDLED_MODEL_DIR)))
    gap = binding_gap(v2, world_of(v2.info.path), 6, sigmas=(0.95,), draws=1)
    assert gap["clips"] == 3  # eval scenes 3-5 have two objects each
    row = gap["by_sigma"]["0.95"]
    # A trained model predicts far worse flows for another clip's prompt; ignoring prompts would give 0.
    assert row["other_gain"] > 0.2, row
    assert abs(row["rebound_gain"]) < row["other_gain"], row
    v1 = load_pipeline(ModelConfig(model=str(V1_MODEL_DIR)))
    assert binding_gap(v1, world_of(v1.info.path), 6) is None
