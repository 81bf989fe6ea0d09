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
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from . import world

# Where the committed model lives, inside the package so a plain install carries it.
BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "model"

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

_LLAMA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
_CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]


def _word_tokenizer(specials: list[str], template: str, **tokens) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(specials + world.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=tokens["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)


def build_tokenizers() -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """Word-level tokenizers over the world's vocabulary, built offline."""
    llama = _word_tokenizer(_LLAMA_SPECIALS, "<s> $A", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>", pad_token="<pad>")
    clip = _word_tokenizer(_CLIP_SPECIALS, "<|startoftext|> $A <|endoftext|>", unk_token="<|endoftext|>",
                           bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                           model_max_length=77)
    return llama, clip


def build_pipeline(seed: int = 0) -> HunyuanVideoPipeline:
    """A tiny HunyuanVideo pipeline with seeded random weights (fp32, CPU)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizers()
    text_encoder = LlamaModel(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    text_encoder_2 = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer_2), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id,
        pad_token_id=tokenizer_2.pad_token_id))
    vae = AutoencoderKLHunyuanVideo(**VAE_CONFIG)
    transformer = HunyuanVideoTransformer3DModel(**TRANSFORMER_CONFIG)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=FLOW_SHIFT)
    pipe = HunyuanVideoPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                scheduler=scheduler, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    for m in (text_encoder, text_encoder_2, vae, transformer):
        m.eval().requires_grad_(False)
    return pipe


def save(pipe: HunyuanVideoPipeline, path: str | Path, card: str | None = None) -> None:
    """Write the diffusers layout plus generation defaults (and a model card)."""
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    (path / "generation_config.json").write_text(json.dumps(GENERATION_DEFAULTS, indent=2) + "\n")
    if card is not None:
        (path / "README.md").write_text(card)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random-weight HunyuanVideo in diffusers layout.")
    parser.add_argument("--output", default=str(BUNDLED_MODEL_DIR), help="target folder (default: the bundled model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    save(build_pipeline(args.seed), args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
