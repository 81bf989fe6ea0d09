"""Build the tiny HunyuanVideo from the real diffusers / transformers classes.

The components are exactly those of `hunyuanvideo-community/HunyuanVideo` (3D causal VAE, dual-
and single-stream transformer with token refiner, Llama and CLIP text encoders, flow-matching
scheduler), only small. `build_pipeline` gives seeded random weights; `pipeline.tiny.train` trains
them; `save` writes the diffusers layout that `pipeline.loading.load_pipeline` reads back through
the same `from_pretrained` path as real weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLHunyuanVideo,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
)
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from . import BUNDLED_MODEL_DIR, V1_MODEL_DIR, world, world_v2  # noqa: F401  (the committed models' folders)
BUNDLED_RECIPE = "v2"

TRANSFORMER_CONFIG = dict(
    in_channels=16, out_channels=16, num_attention_heads=8, attention_head_dim=16, num_layers=2,
    num_single_layers=4, num_refiner_layers=1, mlp_ratio=4.0, patch_size=1, patch_size_t=1,
    qk_norm="rms_norm", guidance_embeds=False, text_embed_dim=64, pooled_projection_dim=32,
    rope_theta=256.0, rope_axes_dim=(4, 6, 6),
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
    block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=4, scaling_factor=1.0,
    spatial_compression_ratio=4, temporal_compression_ratio=4, mid_block_add_attention=True,
)
FLOW_SHIFT = 3.0

# The tiny text encoders know only the world's grammar, so prompts go in without the real
# model's 95-token system template. Generation reads these from generation_config.json.
GENERATION_DEFAULTS = {
    "height": world.HEIGHT,
    "width": world.WIDTH,
    "num_frames": world.NUM_FRAMES,
    "num_inference_steps": 50,
    "guidance_scale": 1.0,
    "true_cfg_scale": 4.0,
    "negative_prompt": "",
    "max_sequence_length": 16,
    "prompt_template": {"template": "{}", "crop_start": 0},
    "fps": 8,
    "vae_framewise": False,
}



@dataclass(frozen=True)
class Recipe:
    """One version of the bundled model: its world, architecture and generation defaults.

    Args:
        name: "v2" (the bundled default: the harder world, HunyuanVideo's proportions) or "v1" (the first
            bundled model, `model_v1`: one object, 2 + 4 blocks).
        vocabulary: every word its prompts use (the word-level tokenizers' vocabulary).
        sample: a training clip's spec from a seed (anything with a `.prompt`).
        render: uint8 frames (T, H, W, 3) of a spec.
        transformer: `HunyuanVideoTransformer3DModel` keyword arguments.
        vae: `AutoencoderKLHunyuanVideo` keyword arguments.
        llama_layers: depth of the frozen random Llama. The pipeline reads `hidden_states[-3]`, which for two
            layers is the word embeddings (no word order); from three layers on they are contextual.
        max_sequence_length: text tokens the pipeline keeps.
        true_cfg_scale: the default true CFG scale written to generation_config.json.
        about: the world and its prompt grammar in a sentence or two, for the model card.
    """

    name: str
    vocabulary: Callable[[], list[str]]
    sample: Callable[[int], object]
    render: Callable[[object], np.ndarray]
    transformer: dict
    llama_layers: int
    max_sequence_length: int
    about: str
    height: int = world.HEIGHT
    width: int = world.WIDTH
    num_frames: int = world.NUM_FRAMES
    vae: dict = field(default_factory=lambda: VAE_CONFIG)
    true_cfg_scale: float = GENERATION_DEFAULTS["true_cfg_scale"]

    def generation_defaults(self) -> dict:
        # "world" tells the score stage and the benches which scorer reads this model's clips (absent: v1).
        return {**GENERATION_DEFAULTS, "height": self.height, "width": self.width, "num_frames": self.num_frames,
                "max_sequence_length": self.max_sequence_length, "true_cfg_scale": self.true_cfg_scale,
                "world": self.name}


RECIPES = {
    "v1": Recipe("v1", world.vocabulary, world.sample_spec, world.render, TRANSFORMER_CONFIG, llama_layers=2,
                 max_sequence_length=16, about=(
                     "one shape (circle, square, triangle) in one of six colours moving left, right, up, down or "
                     "standing still over a plain background of another colour. Prompts follow the grammar "
                     "`a <colour> <shape> moving <direction> on a <colour> background` (or `standing still`).")),
    # HunyuanVideo's proportions: twice as many single- as double-stream blocks (20 + 40 there), 12 here, so
    # verifying one block costs 1/12 of a step; prompts of up to three objects need 24 tokens. Patches of 2 x 2
    # latent pixels as HunyuanVideo's, over a 2x VAE: the same 5 x 8 x 8 tokens as a 4x VAE with patch 1, but
    # latents that keep the textures (periods of 3 to 6 px) a 4x VAE blurs away, so there is detail to generate.
    "v2": Recipe("v2", world_v2.vocabulary, world_v2.sample_scene, world_v2.render,
                 {**TRANSFORMER_CONFIG, "num_attention_heads": 6, "num_layers": 4, "num_single_layers": 8,
                  "patch_size": 2},
                 vae={**VAE_CONFIG, "spatial_compression_ratio": 2}, llama_layers=4, max_sequence_length=32,
                 # The guidance scale HunyuanVideo samples with (6, embedded there): trajectories curve enough
                 # that 25 plain steps keep a median 29.6 dB to 50 (34.2 at CFG 4); adherence about the same.
                 true_cfg_scale=6.0, about=(
                     "world v2 (`pipeline/tiny/world_v2.py`): 1 to 3 objects, each its own colour, shape and "
                     "motion (slowly or quickly left, right, up, down, or standing still), crossing, with per-seed "
                     "striped, checked or ringed textures on the background and the objects. Prompts name every "
                     "object in drawing order: `a red circle moving quickly left and a blue square standing still "
                     "on a green background`.")),
}

_LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
_CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def _word_tokenizer(words: list[str], specials: list[str], template: str, **tokens) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=tokens["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)


def build_tokenizers(
        recipe: Recipe = RECIPES[BUNDLED_RECIPE]) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """Word-level tokenizers over the world's vocabulary, built offline."""
    words = recipe.vocabulary()
    llama = _word_tokenizer(words, _LLAMA_SPECIALS, "<s> $A", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>")
    clip = _word_tokenizer(words, _CLIP_SPECIALS, "<|startoftext|> $A <|endoftext|>", unk_token="<|endoftext|>",
                           bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                           model_max_length=77)
    return llama, clip


def build_pipeline(seed: int = 0, recipe: Recipe = RECIPES[BUNDLED_RECIPE]) -> HunyuanVideoPipeline:
    """A tiny HunyuanVideo pipeline with seeded random weights (fp32, CPU)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizers(recipe)
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=recipe.llama_layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id,
        pad_token_id=tokenizer_2.pad_token_id))
    vae = AutoencoderKLHunyuanVideo(**recipe.vae)
    transformer = HunyuanVideoTransformer3DModel(**recipe.transformer)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    for m in (text_encoder, text_encoder_2, vae, transformer):
        m.eval().requires_grad_(False)
    return pipe


def save(pipe: HunyuanVideoPipeline, path: str | Path, card: str | None = None,
         recipe: Recipe = RECIPES[BUNDLED_RECIPE]) -> None:
    """Write the diffusers layout plus generation defaults (and a model card)."""
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "generation_config.json").write_text(json.dumps(recipe.generation_defaults(), indent=2) + "\n")
    if card is not None:
        (path / "README.md").write_text(card)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random-weight HunyuanVideo in diffusers layout.")
    parser.add_argument("--output", required=True,
                        help="target folder (never the bundled model's by default: these weights are untrained)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=BUNDLED_RECIPE,
                        help=f"model version (default: {BUNDLED_RECIPE}, the bundled model's)")
    args = parser.parse_args()
    recipe = RECIPES[args.recipe]
    save(build_pipeline(args.seed, recipe), args.output, recipe=recipe)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
