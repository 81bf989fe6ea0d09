"""A tiny randomly initialised HunyuanVideo 1.5 pipeline from diffusers' real classes, built offline.

Components as HunyuanVideo 1.5's, shrunk: a 3-layer Qwen2.5-VL text model with a word-level tokenizer
(`tokenizers`) and a chat template whose system turn is one token (so 2 tokens are cropped, as the
real template's 108), ByT5 (the real byte tokenizer, a 1-layer T5 encoder) for quoted glyph text, a
3-block 1.5 VAE (4x space, 4x time, 4 latent channels) and a 2-block 1.5 transformer (2 heads x 8).
`save` writes it as a diffusers folder with a generation_config.json that shortens the text
(12 Qwen + 16 ByT5 + 4 image tokens) and the clip (24 x 40 x 9 frames: 180 video tokens, 8 steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = "a an the red blue green white circle square dog cat moving left right up on background sign says".split()
SPECIALS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'system' %}<|system|> "
                 "{% else %}<|user|> {{ m['content'] }} {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GENERATION = {"num_frames": 9, "num_inference_steps": 8, "max_sequence_length": 12, "text_crop_start": 2,
              "glyph_max_length": 16, "image_tokens": 4, "fps": 8}
HEIGHT, WIDTH = 24, 40  # the pipeline's 16:9 bucket at target_size 32 with a 4x VAE
VIDEO_TOKENS = (HEIGHT // 4) * (WIDTH // 4) * 3
TEXT_TOKENS = 12 + 16 + 4


def build(seed: int = 0):
    """The pipeline (fp32, CPU, eval), with the short text lengths of GENERATION set on it."""
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import ByT5Tokenizer, PreTrainedTokenizerFast, Qwen2_5_VLTextModel, T5Config, T5EncoderModel
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", unk_token="<unk>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}))
    byt5_tokenizer = ByT5Tokenizer()
    byt5 = T5EncoderModel(T5Config(vocab_size=len(byt5_tokenizer), d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                   num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKLHunyuanVideo15(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8),
                                      layers_per_block=1, spatial_compression_ratio=4, temporal_compression_ratio=4,
                                      scaling_factor=1.0)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(2, 2, 4),
        target_size=32, task_type="t2v")
    pipe = HunyuanVideo15Pipeline(text_encoder=qwen, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=byt5,
                                  tokenizer_2=byt5_tokenizer, guider=ClassifierFreeGuidance(guidance_scale=6.0))
    pipe.tokenizer_max_length = GENERATION["max_sequence_length"]
    pipe.prompt_template_encode_start_idx = GENERATION["text_crop_start"]
    pipe.tokenizer_2_max_length = GENERATION["glyph_max_length"]
    pipe.vision_num_semantic_tokens = GENERATION["image_tokens"]
    for m in (qwen, byt5, vae, transformer):
        m.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(folder: Path, seed: int = 0) -> Path:
    """The tiny pipeline as a diffusers folder (what `--model` takes)."""
    folder = Path(folder)
    build(seed).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    return folder
