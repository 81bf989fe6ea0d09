"""SpeCa's HunyuanVideo 1.5 family: diffusers' `HunyuanVideo15Transformer3DModel` (8.3B: 54 dual-stream blocks).

Only dual-stream blocks, each taking and returning `(hidden_states, encoder_hidden_states)` (video
first), the same MMDiT shape as 1.0's dual-stream blocks: the verified block is the last one by
default and the checked stream the video tokens. The text stream every block sees is built by the
model's forward from three inputs, valid tokens first and padding after: Qwen2.5-VL text, ByT5 glyph
text and (zeroed, masked for t2v) image embeds; blocks get a text-only padding mask (B, text) that
their attention extends over the video tokens. CFG runs through the pipeline's guider as separate
cond and uncond calls (cache contexts `pred_cond` / `pred_uncond`), which the core pairs by step; a
CFG-distilled checkpoint makes one call per step.
"""

from __future__ import annotations

from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15TransformerBlock

from .blocks import dual_stream_spec
from .config import SpeCaConfig
from .flops import step_flops, video_tokens  # noqa: F401  (this family's, by name)
from .hunyuan_video import head, subset_rule
from .registry import FamilySpec, register

TEXT_ARGS = ("encoder_hidden_states", "encoder_attention_mask", "encoder_hidden_states_2", "encoder_attention_mask_2")

FAMILY = register(FamilySpec(
    name="HunyuanVideo 1.5",
    model_class=HunyuanVideo15Transformer3DModel,
    block_lists=("transformer_blocks",),
    blocks={HunyuanVideo15TransformerBlock: dual_stream_spec(subset=subset_rule("freqs_cis"))},
    batched_args=("hidden_states", "timestep", "timestep_r", *TEXT_ARGS, "image_embeds"),
    branch_args=TEXT_ARGS,
    head=head,
    cfg_contexts=("pred_cond", "pred_uncond"),
))


def text_tokens(mllm_tokens: int = 1000, glyph_tokens: int = 256, image_tokens: int = 729) -> int:
    """Text-stream tokens every block attends over (padding included): the pipeline's defaults are 1000
    Qwen2.5-VL tokens (after its 108 template tokens are cropped), 256 ByT5 tokens and 729 image tokens."""
    return mllm_tokens + glyph_tokens + image_tokens


def estimate_cache_bytes(transformer_config, config: SpeCaConfig, video_tokens: int, text_tokens: int,
                         batch: int = 1, dtype_bytes: int = 2, contexts: int = 1,
                         clip_tokens: int | None = None) -> int:
    """Feature-cache bytes SpeCa holds for a batch (per rank under sequence parallelism: the rank's video
    tokens; with a draft gate the whole clip's in `clip_tokens`); `contexts` = 2 with CFG. The layout is the
    hooks' (`FamilySpec.cache_bytes`)."""
    return FAMILY.cache_bytes(transformer_config, config, video_tokens, text_tokens, batch, dtype_bytes, contexts,
                              clip_tokens)
