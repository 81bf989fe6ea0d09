"""What the engine must know about a pipeline family, found from `model_index.json`'s `_class_name`.

Two families: HunyuanVideo (`HunyuanVideoPipeline`, the bundled tiny model) and HunyuanVideo 1.5
(`HunyuanVideo15Pipeline`, `hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v` / `-720p_t2v`).
A family gives:
  * its defaults from the model's own configs (size, frames, steps, flow shift, CFG scale), before a
    folder's `generation_config.json` overrides them;
  * how the pipeline loads (without its text encoders on sequence-parallel ranks > 0) and is prepared;
  * how a batch's prompts become `pipe()` keywords (`encode`; the negative prompt's keywords are the same
    names with `negative_` in front) and the keywords of the denoising call (`call_kwargs`);
  * the text tokens every transformer block sees, and FLOPs per step (`speca`'s family module).

The request fields mean the same in both: `true_cfg_scale` > 1 runs CFG as two transformer calls per step
(1.0's true CFG; 1.5's `ClassifierFreeGuidance` guider, whose scale it sets), otherwise one call per step
(1.5's CFG-distilled checkpoints); `guidance_scale` is 1.0's embedded guidance and must stay 1 on 1.5,
which has none.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: reading a model's configs (`pipeline.loading.read_model_info`) needs no torch
    import torch

Reader = Callable[[str], dict | None]  # file in the model folder -> its JSON (None when absent)


class PipelineFamily:
    name = ""
    pipeline_class = ""  # diffusers class name in model_index.json
    text_modules = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
    embedded_guidance = True  # whether `guidance_scale` means anything to the model

    def defaults(self, read: Reader, transformer: dict, vae: dict) -> dict:
        """GenerationDefaults fields from the model's configs (generation_config.json overrides them)."""
        scheduler = read("scheduler/scheduler_config.json") or {}
        return {"flow_shift": float(scheduler["shift"])} if "shift" in scheduler else {}

    def load(self, path: str, dtype, text_encoders: bool = True):
        import diffusers

        without = {} if text_encoders else dict.fromkeys(self.text_modules)
        return getattr(diffusers, self.pipeline_class).from_pretrained(path, torch_dtype=dtype, **without)

    def prepare(self, pipe, defaults) -> None:
        """After loading: settings the defaults ask for."""

    def encode(self, pipe, prompts: list[str], defaults, device) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def call_kwargs(self, pipe, request, defaults, cfg: bool) -> dict:
        """`pipe()` keywords of a batch's denoising call besides text, size, steps and generators."""
        raise NotImplementedError

    def text_tokens(self, pipe, text: dict[str, torch.Tensor]) -> int:
        """Text tokens (padding included) that every transformer block attends over."""
        raise NotImplementedError

    def step_flops(self, transformer_config: dict, tokens: int) -> float:
        raise NotImplementedError

    def video_tokens(self, transformer_config: dict, latent_shape) -> int:
        from speca.flops import video_tokens

        return video_tokens(transformer_config, *latent_shape[2:])


class HunyuanVideo(PipelineFamily):
    name = "HunyuanVideo"
    pipeline_class = "HunyuanVideoPipeline"

    def prepare(self, pipe, defaults) -> None:
        if not defaults.vae_framewise:
            pipe.vae.use_framewise_encoding = False
            pipe.vae.use_framewise_decoding = False

    def encode(self, pipe, prompts, defaults, device):
        kwargs = dict(max_sequence_length=defaults.max_sequence_length, device=device)
        if defaults.prompt_template is not None:
            kwargs["prompt_template"] = defaults.prompt_template
        embeds, pooled, mask = pipe.encode_prompt(prompt=prompts, **kwargs)
        return dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled, prompt_attention_mask=mask)

    def call_kwargs(self, pipe, request, defaults, cfg):
        template = defaults.prompt_template
        return dict(guidance_scale=request.guidance_scale,
                    **({"true_cfg_scale": request.true_cfg_scale} if cfg else {}),
                    **({"prompt_template": template} if template is not None else {}))

    def text_tokens(self, pipe, text):
        return text["prompt_embeds"].shape[1]

    def step_flops(self, transformer_config, tokens):
        from speca.hunyuan_video import step_flops

        return step_flops(transformer_config, tokens)


class HunyuanVideo15(PipelineFamily):
    """HunyuanVideo 1.5 t2v: Qwen2.5-VL text (a chat template, its first `text_crop_start` tokens cropped,
    padded to `max_sequence_length`), ByT5 glyph text (quoted text in the prompt, padded to
    `glyph_max_length`) and `image_tokens` zeroed image embeds, all seen by every block."""

    name = "HunyuanVideo 1.5"
    pipeline_class = "HunyuanVideo15Pipeline"
    embedded_guidance = False

    def defaults(self, read, transformer, vae):
        from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

        guider = read("guider/guider_config.json") or {}
        scale = float(guider.get("guidance_scale", 6.0)) if guider.get("enabled", True) else 1.0
        # The pipeline's own default size: its 16:9 bucket at the transformer's target size (480p: 480 x 848).
        processor = HunyuanVideo15ImageProcessor(vae_scale_factor=int(vae.get("spatial_compression_ratio", 16)))
        height, width = processor.calculate_default_height_width(9, 16, int(transformer.get("target_size", 640)))
        return {**super().defaults(read, transformer, vae), "height": height, "width": width, "num_frames": 121,
                "num_inference_steps": 50, "guidance_scale": 1.0, "true_cfg_scale": scale, "max_sequence_length": 1000}

    def prepare(self, pipe, defaults) -> None:
        fix_batched_vae_attention(pipe.vae)
        for attr, value in (("tokenizer_max_length", defaults.max_sequence_length),
                            ("prompt_template_encode_start_idx", defaults.text_crop_start),
                            ("tokenizer_2_max_length", defaults.glyph_max_length),
                            ("vision_num_semantic_tokens", defaults.image_tokens)):
            if value is not None:
                setattr(pipe, attr, int(value))

    def encode(self, pipe, prompts, defaults, device):
        embeds, mask, embeds_2, mask_2 = pipe.encode_prompt(prompt=prompts, device=device, dtype=pipe.transformer.dtype,
                                                            batch_size=len(prompts))
        return dict(prompt_embeds=embeds, prompt_embeds_mask=mask, prompt_embeds_2=embeds_2,
                    prompt_embeds_mask_2=mask_2)

    def call_kwargs(self, pipe, request, defaults, cfg):
        # The guider runs CFG (a cond and an uncond call per step, each in its own cache context); disabled,
        # one call per step, as CFG-distilled checkpoints run.
        pipe.guider = pipe.guider.new(guidance_scale=float(request.true_cfg_scale), enabled=cfg)
        return {}

    def text_tokens(self, pipe, text):
        glyph = text["prompt_embeds_2"].shape[1]
        return text["prompt_embeds"].shape[1] + glyph + int(pipe.vision_num_semantic_tokens)

    def step_flops(self, transformer_config, tokens):
        from speca.flops import step_flops

        return step_flops(transformer_config, tokens)


FAMILIES = {f.pipeline_class: f for f in (HunyuanVideo(), HunyuanVideo15())}


def family_named(class_name: str | None) -> PipelineFamily:
    """The family of a `model_index.json` `_class_name` (None: an older folder without one, HunyuanVideo)."""
    if class_name is None:
        return FAMILIES["HunyuanVideoPipeline"]
    if class_name not in FAMILIES:
        raise ValueError(f"pipeline {class_name!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[class_name]


def fix_batched_vae_attention(vae) -> int:
    """Let diffusers 0.42.1's `AutoencoderKLHunyuanVideo15` decode (and encode) a batch of 2 or more.

    Its mid-block attention builds a (B, L, L) causal mask for (B, 1, L, C) queries; SDPA broadcasts the
    mask as (1, B, L, L) and fails ("output with shape [2, 1, L, L] doesn't match the broadcast shape
    [2, 2, L, L]"). The mask is the same for every sample, so each attention block's mask builder is
    given, on the instance, a (L, L) mask that broadcasts over batch and heads. Returns the blocks fixed.
    """
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import HunyuanVideo15AttnBlock

    fixed = 0
    for module in vae.modules():
        if isinstance(module, HunyuanVideo15AttnBlock) and "prepare_causal_attention_mask" not in vars(module):
            build = type(module).prepare_causal_attention_mask
            module.prepare_causal_attention_mask = (
                lambda n_frame, n_hw, dtype, device, batch_size=None, build=build: build(n_frame, n_hw, dtype, device))
            fixed += 1
    return fixed
