"""The bundled model's world, its weight-free scorer, and the trainer's smoke mode."""

import numpy as np
import pytest

from pipeline.tiny import scorer, world


def test_world_is_deterministic_and_in_bounds():
    a, b = world.render(world.sample_spec(123)), world.render(world.sample_spec(123))
    assert np.array_equal(a, b) and a.shape == (world.NUM_FRAMES, world.HEIGHT, world.WIDTH, 3)
    assert not np.array_equal(a, world.render(world.sample_spec(124)))
    for seed in range(200):  # the shape never leaves the frame: its visible area stays constant
        spec = world.sample_spec(seed)
        frames = world.render(spec).astype(float)
        fg, bg = np.asarray(world.COLORS[spec.color], float), np.asarray(world.COLORS[spec.background], float)
        cover = ((frames - bg) @ (fg - bg) / ((fg - bg) @ (fg - bg))).sum(axis=(1, 2))
        assert cover.min() > 0.95 * cover.max() and cover.min() > 30  # anti-aliased diagonals vary ~4%


def test_prompt_grammar_round_trip_and_errors():
    for combo in world.all_attribute_combinations():
        shape, color, background, motion = combo
        parsed = world.parse_prompt(world.make_prompt(shape, color, background, motion))
        assert parsed == {"shape": shape, "color": color, "background": background, "motion": motion}
    with pytest.raises(ValueError, match="grammar"):
        world.parse_prompt("a purple hexagon dancing")
    assert set(" ".join(world.make_prompt(*c) for c in world.all_attribute_combinations()).split()) == \
        set(world.vocabulary())


def test_training_split_never_draws_held_out_pairs():
    drawn = {(s.color, s.shape) for s in (world.sample_spec(i) for i in range(3000))}
    assert not drawn & world.HELD_OUT_PAIRS
    assert len(drawn) == 6 * 3 - len(world.HELD_OUT_PAIRS)
    evals = world.eval_specs(48)
    assert sum((s.color, s.shape) in world.HELD_OUT_PAIRS for s in evals) >= 16  # every third, at least
    assert {s.motion for s in evals} == set(world.MOTIONS)


def test_scorer_on_ground_truth_clips():
    results = [scorer.score(world.render(s), s.prompt) for s in
               [world.sample_spec(10_000 + i) for i in range(300)] + world.eval_specs(48)]
    acc = scorer.accuracy(results)
    assert all(acc[a] >= 0.98 for a in scorer.ATTRIBUTES), acc


def test_shape_measures_of_ground_truth_clips_are_clear_of_their_thresholds():
    """The shape measures `Estimate` exposes (which bench.scorer_margins reads) are filled in, and a
    rendered clip, unlike some decoded ones, is never on a threshold."""
    from bench.scorer_margins import NEAR

    estimates = [(scorer.estimate(world.render(s)), s.shape) for s in world.eval_specs(48)]
    for e, shape in estimates:
        assert e.shape == shape and np.isfinite([e.fill, e.skew]).all(), (e, shape)
    assert min(e.shape_margin for e, _ in estimates) > 2 * NEAR
    assert scorer.estimate(np.zeros((4, 16, 16, 3), np.uint8)).shape_margin == float("inf")


def test_scorer_catches_wrong_attributes():
    spec = world.sample_spec(5, shape="circle", color="red", background="blue", motion="left")
    frames = world.render(spec)
    assert scorer.score(frames, spec.prompt) == dict.fromkeys(scorer.ATTRIBUTES, True)
    wrong = world.make_prompt("square", "green", "white", "right")
    assert scorer.score(frames, wrong) == dict.fromkeys(scorer.ATTRIBUTES, False)
    assert scorer.score(frames[::-1], spec.prompt)["motion"] is False  # played backwards: moving right
    blank = np.zeros_like(frames)
    assert not any(scorer.score(blank, spec.prompt).values())


def test_trainer_smoke_mode_writes_a_loadable_model(tmp_path):
    from pipeline.config import ModelConfig, SampleRequest
    from pipeline.generate import Generator
    from pipeline.loading import load_pipeline
    from pipeline.tiny import train

    out = tmp_path / "model"
    train.main(["--smoke", "--workdir", str(tmp_path / "work"), "--output", str(out)])
    assert (out / "README.md").read_text().startswith("# tiny-hunyuanvideo")
    gen = Generator(load_pipeline(ModelConfig(model=str(out), device="cpu")))
    [sample] = gen.generate([SampleRequest(prompt="a red circle moving quickly left on a blue background",
                                           num_inference_steps=2)])
    assert sample.frames.shape == (17, 32, 32, 3)


def test_new_transformer_keeps_the_vae_and_starts_the_transformer_fresh(tmp_path, capsys):
    import pytest
    import torch
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    from pipeline.tiny import train
    from pipeline.tiny.build import BUNDLED_MODEL_DIR, BUNDLED_RECIPE, RECIPES

    with pytest.raises(SystemExit):
        train.main(["--smoke", "--new-transformer", "--workdir", str(tmp_path / "bad")])
    assert "--new-transformer needs --init-from" in capsys.readouterr().err

    out = tmp_path / "model"
    train.main(["--smoke", "--init-from", str(BUNDLED_MODEL_DIR), "--new-transformer",
                "--workdir", str(tmp_path / "work"), "--output", str(out)])
    vae, bundled_vae = (AutoencoderKLHunyuanVideo.from_pretrained(d / "vae") for d in (out, BUNDLED_MODEL_DIR))
    assert vae.config.scaling_factor == bundled_vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), bundled_vae.state_dict().values()))
    new, bundled = (HunyuanVideoTransformer3DModel.from_pretrained(d / "transformer") for d in (out, BUNDLED_MODEL_DIR))
    assert new.config.num_attention_heads == RECIPES[BUNDLED_RECIPE].transformer["num_attention_heads"]
    # Three smoke steps from the seeded init cannot land on the trained weights.
    w, w0 = new.proj_out.weight, bundled.proj_out.weight
    assert (w - w0).abs().max() > 1e-2


def test_init_from_a_model_of_another_world_is_refused_before_any_work(tmp_path, capsys):
    """The default recipe is the bundled model's (v2); continuing v1 needs --recipe v1, not a silent world swap."""
    import pytest

    from pipeline.tiny import train
    from pipeline.tiny.build import V1_MODEL_DIR

    with pytest.raises(SystemExit):
        train.main(["--smoke", "--init-from", str(V1_MODEL_DIR), "--workdir", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert "trained on world v1" in err and "--recipe v1" in err and "(given: --recipe v2)" in err
    assert not (tmp_path / "work").exists()


def test_transformer_from_starts_the_new_transformer_from_a_trained_one(tmp_path, capsys):
    """The CLI path of `--transformer-from`: a few smoke steps away from the trained transformer, not the init."""
    import pytest
    from diffusers import HunyuanVideoTransformer3DModel

    from pipeline.tiny import train
    from pipeline.tiny.build import BUNDLED_MODEL_DIR, RECIPES, build_pipeline
    from weight_distance import l1_distance

    with pytest.raises(SystemExit):
        train.main(["--smoke", "--init-from", str(BUNDLED_MODEL_DIR), "--transformer-from", str(BUNDLED_MODEL_DIR),
                    "--workdir", str(tmp_path / "bad")])
    assert "--transformer-from starts the --new-transformer" in capsys.readouterr().err

    out = tmp_path / "model"
    train.main(["--smoke", "--init-from", str(BUNDLED_MODEL_DIR), "--new-transformer",
                "--transformer-from", str(BUNDLED_MODEL_DIR), "--workdir", str(tmp_path / "work"), "--output", str(out)])
    assert "transformer warm-started from" in capsys.readouterr().out
    new, trained = (HunyuanVideoTransformer3DModel.from_pretrained(d / "transformer") for d in (out, BUNDLED_MODEL_DIR))
    fresh = build_pipeline(0, RECIPES["v2"]).transformer
    dist = {name: l1_distance(new, m) for name, m in (("trained", trained), ("fresh", fresh))}
    assert 0 < dist["trained"] < dist["fresh"] / 10, dist


def test_decoder_fine_tuning_leaves_the_encoder_and_the_transformer_as_they_were(tmp_path, capsys):
    """--vae-decoder-steps moves only the decoder, so the latents the transformer was trained on stay valid."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    from pipeline.tiny import train
    from pipeline.tiny.build import BUNDLED_MODEL_DIR

    with pytest.raises(SystemExit):
        train.main(["--smoke", "--vae-decoder-steps", "2", "--workdir", str(tmp_path / "bad")])
    assert "--vae-decoder-steps fine-tunes the decoder of an --init-from model" in capsys.readouterr().err

    out = tmp_path / "model"
    train.main(["--smoke", "--init-from", str(BUNDLED_MODEL_DIR), "--vae-decoder-steps", "3", "--dit-steps", "0",
                "--workdir", str(tmp_path / "work"), "--output", str(out)])
    tuned, source = (AutoencoderKLHunyuanVideo.from_pretrained(d / "vae") for d in (out, BUNDLED_MODEL_DIR))
    assert tuned.config.scaling_factor == source.config.scaling_factor
    a, b = tuned.state_dict(), source.state_dict()
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved), sorted(moved)[:5]
    assert any(k.startswith("decoder.") for k in moved)
    t, t0 = (HunyuanVideoTransformer3DModel.from_pretrained(d / "transformer") for d in (out, BUNDLED_MODEL_DIR))
    assert all(torch.equal(x, y) for x, y in zip(t.state_dict().values(), t0.state_dict().values()))


def test_text_lr_trains_the_llama_on_the_states_the_pipeline_reads(tmp_path):
    """--text-lr trains the Llama on exactly the states generation reads; without it, and for CLIP, nothing moves."""
    import json

    import torch
    from transformers import CLIPTextModel, LlamaModel

    from pipeline.tiny import train, world_v2
    from pipeline.tiny.build import BUNDLED_MODEL_DIR, RECIPES, build_pipeline
    from weight_distance import l1_distance

    recipe = RECIPES["v2"]
    pipe = build_pipeline(0, recipe)
    prompts = [world_v2.sample_scene(seed).prompt for seed in range(6)]
    read, tokens = train.encode_prompts(pipe, prompts, recipe), train.tokenize_prompts(pipe, prompts, recipe)
    for p in [*prompts, ""]:
        ids, mask = tokens[p]
        torch.testing.assert_close(train.llama_states(pipe.text_encoder, ids[None], mask[None])[0], read[p][0],
                                   rtol=0, atol=1e-6)
        assert torch.equal(mask.bool(), read[p][2].bool())

    def run(name: str, *extra: str):
        out = tmp_path / name
        train.main(["--smoke", "--init-from", str(BUNDLED_MODEL_DIR), "--workdir", str(tmp_path / f"work-{name}"),
                    "--output", str(out), *extra])
        return {d: cls.from_pretrained(out / d) for d, cls in (("text_encoder", LlamaModel),
                                                                 ("text_encoder_2", CLIPTextModel))}

    source = {d: cls.from_pretrained(BUNDLED_MODEL_DIR / d) for d, cls in (("text_encoder", LlamaModel),
                                                                            ("text_encoder_2", CLIPTextModel))}
    trained, frozen = run("trained", "--text-lr", "1e-3"), run("frozen")
    assert l1_distance(trained["text_encoder"], source["text_encoder"]) > 0
    assert l1_distance(trained["text_encoder_2"], source["text_encoder_2"]) == 0
    assert all(l1_distance(frozen[d], source[d]) == 0 for d in source)

    with pytest.raises(SystemExit, match="trained with --text-lr"):  # a resume must keep the choice
        train.main(["--smoke", "--init-from", str(BUNDLED_MODEL_DIR), "--workdir", str(tmp_path / "work-trained")])

    # --text-pretrain-steps: the Llama is pretrained once, then frozen under the transformer; a rerun resumes.
    pretrained = run("pretrained", "--text-pretrain-steps", "3")
    assert l1_distance(pretrained["text_encoder"], source["text_encoder"]) > 0
    assert l1_distance(pretrained["text_encoder_2"], source["text_encoder_2"]) == 0
    again = run("pretrained", "--text-pretrain-steps", "3")
    assert l1_distance(again["text_encoder"], pretrained["text_encoder"]) == 0
    stages = [json.loads(line)["stage"] for line in (tmp_path / "work-pretrained" / "log.jsonl").open()]
    assert stages.count("text") == 3 and stages.count("dit") == 3, stages


def _phrase_locality(text_encoder, pipe, recipe) -> float:
    """How much the second object's words move when the first object's colour changes, relative to how much the
    first object's own words move (a random Llama mixes every earlier word in: ~0.8)."""
    import torch

    from pipeline.tiny import train

    base = "a red circle moving quickly left and a blue square moving slowly up on a green background"
    prompts = [base, base.replace("red", "yellow")]
    tokens = train.tokenize_prompts(pipe, prompts, recipe)
    with torch.no_grad():
        a, b = (train.llama_states(text_encoder, *(t[None] for t in tokens[p]))[0] for p in prompts)
    words = base.split()
    first = [words.index(w) + 1 for w in ("circle", "moving", "quickly", "left")]  # token 0 is <s>
    second = [i + 1 for i, w in enumerate(words) if w in ("square", "slowly", "up")]
    move = lambda idx: float((a[idx] - b[idx]).norm(dim=-1).mean() / b[idx].norm(dim=-1).mean())
    return move(second) / move(first)


def test_text_pretraining_binds_each_word_to_its_own_object(tmp_path):
    """Each token's target is its own phrase's words; a short pretraining makes the second object's words all but
    deaf to the first object's colour, which a random Llama mixes in."""
    from dataclasses import replace

    from pipeline.tiny import train
    from pipeline.tiny.build import RECIPES, build_pipeline

    recipe = RECIPES["v2"]
    pipe = build_pipeline(0, recipe)
    prompt = "a red circle moving quickly left and a blue square standing still on a green background"
    target, valid = train._phrase_targets(pipe, [prompt], recipe.max_sequence_length)
    words = prompt.split()
    assert valid[0].tolist() == [False] + [True] * len(words) + [False] * (recipe.max_sequence_length - len(words) - 1)
    ids = lambda ws: sorted(pipe.tokenizer.convert_tokens_to_ids(ws))
    on = lambda i: sorted(target[0, i].nonzero().flatten().tolist())
    assert on(words.index("left") + 1) == ids(words[:7]) and on(words.index("red") + 1) == ids(words[:7])
    assert on(words.index("square") + 1) == ids(words[7:13])
    assert on(len(words)) == ids(["a", "green", "background"])

    before = _phrase_locality(pipe.text_encoder, pipe, recipe)
    cfg = replace(train.TrainConfig(), text_pretrain_steps=100, text_pretrain_batch=32)
    train.pretrain_text_encoder(pipe, cfg, recipe, train._Checkpoint(tmp_path), lambda rec: None, every=10**6)
    after = _phrase_locality(pipe.text_encoder, pipe, recipe)
    assert before > 0.5 and after < 0.2, (before, after)
