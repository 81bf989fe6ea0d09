"""Train the bundled tiny HunyuanVideo on the moving-shapes world.

On 2 CPU cores: about 40 minutes of VAE and 90 of transformer; `--device cuda` takes minutes.

Stages, each checkpointed so an interrupted run resumes where it stopped:
  1. VAE on single frames (cheap warm-up of the spatial path);
  2. VAE on full clips (time axis, fresh warm-up and cosine decay);
  3. latent scaling factor, then a pool of encoded training clips;
  (optional) the Llama pretrained on which words belong to one object (`--text-pretrain-steps`);
  4. transformer by flow matching (x_t = (1 - s) x0 + s * noise, target noise - x0, timestep
     s * 1000, matching `FlowMatchEulerDiscreteScheduler`; s drawn with the sampler's flow shift),
     10% prompt dropout for CFG, EMA.
The text encoders stay at their seeded random init unless the Llama is pretrained first or trained
with the transformer (`--text-lr`). `--smoke` runs a few steps of each stage.

    python -m pipeline.tiny.train --workdir /tmp/tiny-train --output /tmp/tiny-model

The bundled model (recipe v2) was not trained in one such run but in a chain of them, each
warm-started from the last; its model card lists the commands.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..quality import psnr
from . import world
from .build import (
    BUNDLED_RECIPE,
    FLOW_SHIFT,
    GENERATION_DEFAULTS,
    RECIPES,
    Recipe,
    build_pipeline,
    save,
)
from .worlds import world_of


@dataclass
class TrainConfig:
    seed: int = 0
    vae_frame_steps: int = 1000
    vae_frame_batch: int = 16
    vae_clip_steps: int = 1300
    vae_clip_batch: int = 4
    vae_lr: float = 1.5e-3
    vae_clip_lr: float = 1.0e-3
    vae_kl_weight: float = 3e-5
    vae_fg_weight: float = 5.0
    vae_decoder_steps: int = 0
    vae_decoder_lr: float = 5e-4
    latent_pool: int = 4096
    dit_steps: int = 4000
    dit_batch: int = 24
    dit_lr: float = 1e-3
    dit_ema: float = 0.998
    dit_fg_weight: float = 1.0
    text_lr: float = 0.0
    text_pretrain_steps: int = 0
    text_pretrain_batch: int = 64
    text_pretrain_lr: float = 3e-3
    prompt_dropout: float = 0.1
    sigma_uniform: float = 0.5
    sigma_shift: float = FLOW_SHIFT
    threads: int = 2

    @classmethod
    def smoke(cls) -> "TrainConfig":
        return cls(vae_frame_steps=2, vae_frame_batch=2, vae_clip_steps=2, vae_clip_batch=1, latent_pool=8,
                   dit_steps=3, dit_batch=4)


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def _sample_sigma(cfg: "TrainConfig", gen: torch.Generator) -> torch.Tensor:
    """Noise levels as sampling visits them: logit-normal mixed with uniform, then the flow shift.

    A plain logit-normal almost never draws sigma > 0.95, yet those first steps fix the
    background and the shape's colour; without them the model ignores the prompt there.
    """
    n = cfg.dit_batch
    u = torch.where(torch.rand(n, generator=gen) < cfg.sigma_uniform, torch.rand(n, generator=gen),
                    torch.sigmoid(torch.randn(n, generator=gen)))
    return cfg.sigma_shift * u / (1 + (cfg.sigma_shift - 1) * u)


def _clips(rng: random.Random, n: int, num_frames: int, recipe: Recipe) -> tuple[torch.Tensor, list[str]]:
    """n training clips of the recipe's world as (n, 3, T, H, W) in [-1, 1] plus their prompts."""
    specs = [recipe.sample(rng.randrange(world.EVAL_SEED_BASE)) for _ in range(n)]
    frames = np.stack([recipe.render(s, num_frames=num_frames) for s in specs])
    x = torch.from_numpy(frames).float().div(127.5).sub(1.0).permute(0, 4, 1, 2, 3).contiguous()
    return x, [s.prompt for s in specs]


def _foreground(x: torch.Tensor) -> torch.Tensor:
    """Pixels of the shapes: they differ from the clip's median (background) colour by more than a texture
    does (world v2's move a colour by at most 28 of 255). (N, 1, T, H, W)."""
    bg = x.flatten(2).median(dim=2).values[:, :, None, None, None]
    return ((x - bg).abs().amax(dim=1, keepdim=True) > 0.25).float()


def latent_foreground(x: torch.Tensor, spatial: int, temporal: int) -> torch.Tensor:
    """The shape's footprint on the causal latent grid (any pixel of the shape in a latent cell).

    Latent frame 0 sees frame 0; latent frame k sees frames (k-1)*temporal+1 .. k*temporal.
    """
    fg = _foreground(x)
    first, rest = fg[:, :, :1], fg[:, :, 1:]
    rest = F.max_pool3d(rest, kernel_size=(temporal, 1, 1))
    return F.max_pool3d(torch.cat([first, rest], dim=2), kernel_size=(1, spatial, spatial))


def _vae_loss(vae, x: torch.Tensor, cfg: TrainConfig) -> tuple[torch.Tensor, float]:
    posterior = vae.encode(x).latent_dist
    z = posterior.sample()
    rec = vae.decode(z).sample
    # Weight the shape's pixels up so small flat coloured regions are not traded away for the background.
    weight = 1.0 + (cfg.vae_fg_weight - 1.0) * _foreground(x)
    err = rec - x
    rec_loss = (weight * (err.abs() + err.pow(2))).mean()
    kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
    return rec_loss + cfg.vae_kl_weight * kl, psnr(rec.detach(), x, data_range=2.0, per_frame=False)


class _Checkpoint:
    """Small resumable state: a stage name, a step, and module/optimizer state dicts."""

    def __init__(self, workdir: Path, device: str = "cpu"):
        self.path = workdir / "checkpoint.pt"
        self.device = device

    def load(self) -> dict | None:
        return torch.load(self.path, weights_only=False, map_location=self.device) if self.path.exists() else None

    def save(self, state: dict) -> None:
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)


def train_vae_stage(vae, cfg: TrainConfig, recipe: Recipe, stage: str, ckpt: _Checkpoint, log, every: int,
                    device: str) -> None:
    """One VAE stage: `vae_frame` (single frames), `vae_clip` (full clips), or `vae_decoder` (full clips, the
    encoder frozen: the latents a trained transformer learned stay where they are, only their decoding improves)."""
    frames, steps, batch, lr = {
        "vae_frame": (1, cfg.vae_frame_steps, cfg.vae_frame_batch, cfg.vae_lr),
        "vae_clip": (recipe.num_frames, cfg.vae_clip_steps, cfg.vae_clip_batch, cfg.vae_clip_lr),
        "vae_decoder": (recipe.num_frames, cfg.vae_decoder_steps, cfg.vae_clip_batch, cfg.vae_decoder_lr),
    }[stage]
    vae.train().requires_grad_(stage != "vae_decoder")
    if stage == "vae_decoder":
        for m in (vae.post_quant_conv, vae.decoder):
            m.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = 0
    state = ckpt.load()
    if state and state["stage"] == stage:
        vae.load_state_dict(state["vae"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    rng = random.Random(f"{cfg.seed}-{stage}-{start}")
    bar = tqdm(range(start, steps), desc=stage, initial=start, total=steps, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, lr, warmup=max(1, steps // 20))
        x, _ = _clips(rng, batch, frames, recipe)
        loss, rec_psnr = _vae_loss(vae, x.to(device), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{rec_psnr:.1f}")
        log({"stage": stage, "step": step, "loss": loss.item(), "psnr": rec_psnr})
        if (step + 1) % every == 0 or step + 1 == steps:
            ckpt.save({"stage": stage, "step": step + 1, "vae": vae.state_dict(), "opt": opt.state_dict()})
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(pipe, cfg: TrainConfig, recipe: Recipe,
                rescale: bool = True) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Encode a pool of training clips (posterior means) and their latent foreground masks.

    Sets the VAE's scaling factor unless `rescale` is off.
    """
    rng = random.Random(f"{cfg.seed}-pool")
    latents, masks, prompts = [], [], []
    for i in tqdm(range(0, cfg.latent_pool, 32), desc="encode", mininterval=5):
        x, p = _clips(rng, min(32, cfg.latent_pool - i), recipe.num_frames, recipe)
        latents.append(pipe.vae.encode(x.to(pipe.device)).latent_dist.mean)
        masks.append(latent_foreground(x, pipe.vae.config.spatial_compression_ratio,
                                       pipe.vae.config.temporal_compression_ratio).to(pipe.device))
        prompts += p
    z = torch.cat(latents)
    if rescale:
        pipe.vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return z * pipe.vae.config.scaling_factor, torch.cat(masks), prompts


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str],
                   recipe: Recipe) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out = {}
    template = GENERATION_DEFAULTS["prompt_template"]
    for p in sorted(set(prompts) | {""}):
        emb, pooled, mask = pipe.encode_prompt(prompt=[p], prompt_template=template, device=pipe.device,
                                               max_sequence_length=recipe.max_sequence_length)
        out[p] = (emb[0], pooled[0], mask[0])
    return out


def _llama_tokens(pipe, prompts: list[str], recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama token ids and attention masks, as `encode_prompt` tokenizes prompts (no template)."""
    t = pipe.tokenizer(prompts, max_length=recipe.max_sequence_length, padding="max_length", truncation=True,
                       return_tensors="pt")
    return t.input_ids.to(pipe.device), t.attention_mask.to(pipe.device)


def tokenize_prompts(pipe, prompts: list[str], recipe: Recipe) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Token ids and attention mask per distinct prompt (and the empty one, for prompt dropout)."""
    keys = sorted(set(prompts) | {""})
    ids, mask = _llama_tokens(pipe, keys, recipe)
    return {k: (ids[i], mask[i]) for i, k in enumerate(keys)}


def llama_states(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The states the pipeline reads: `hidden_states[-3]` (diffusers' `num_hidden_layers_to_skip=2`)."""
    return text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-3]


def _phrase_targets(pipe, prompts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the words of its own phrase (a phrase starts at each article: "a red circle moving quickly left
    and", "a blue square standing still on", "a green background") as a multi-hot over the vocabulary, and which
    tokens have one (not `<s>` or padding). (N, length, vocab), (N, length)."""
    vocab = len(pipe.tokenizer)
    targets, valid = torch.zeros(len(prompts), length, vocab), torch.zeros(len(prompts), length, dtype=torch.bool)
    for n, prompt in enumerate(prompts):
        words = prompt.split()
        ids = pipe.tokenizer.convert_tokens_to_ids(words)
        phrase = np.cumsum([w in ("a", "an") for w in words])
        for i in range(min(len(words), length - 1)):
            targets[n, i + 1, [t for t, ph in zip(ids, phrase) if ph == phrase[i]]] = 1.0
            valid[n, i + 1] = True
    return targets, valid


def pretrain_text_encoder(pipe, cfg: TrainConfig, recipe: Recipe, ckpt: _Checkpoint, log, every: int) -> None:
    """Teach the Llama what HunyuanVideo's pretrained one knows and a random one does not: which words belong to
    one object. From the states the pipeline reads, a linear head predicts every word of each token's own phrase
    (the one it ends, for its last words), so an object's shape and motion words carry its colour and not the
    other objects'. The transformer sees text tokens without positions (no RoPE on them), so that binding must
    come from these states. The head is thrown away; the CLIP encoder stays as it is."""
    te = pipe.text_encoder
    head = torch.nn.Linear(te.config.hidden_size, len(pipe.tokenizer)).to(pipe.device)
    te.train().requires_grad_(True)
    params = [*te.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.text_pretrain_lr, betas=(0.9, 0.99), weight_decay=0.01)
    start = 0
    state = ckpt.load()
    if state and state["stage"] == "text":
        te.load_state_dict(state["text"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    rng = random.Random(f"{cfg.seed}-text-{start}")
    steps = cfg.text_pretrain_steps
    bar = tqdm(range(start, steps), desc="text", initial=start, total=steps, mininterval=5)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, cfg.text_pretrain_lr, warmup=max(1, steps // 20))
        prompts = [recipe.sample(rng.randrange(world.EVAL_SEED_BASE)).prompt for _ in range(cfg.text_pretrain_batch)]
        target, valid = _phrase_targets(pipe, prompts, recipe.max_sequence_length)
        logits = head(llama_states(te, *_llama_tokens(pipe, prompts, recipe)))
        loss = F.binary_cross_entropy_with_logits(logits[valid], target[valid].to(pipe.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log({"stage": "text", "step": step, "loss": loss.item()})
        if (step + 1) % every == 0 or step + 1 == steps:
            ckpt.save({"stage": "text", "step": step + 1, "text": te.state_dict(), "head": head.state_dict(),
                       "opt": opt.state_dict()})
    te.eval().requires_grad_(False)


def train_transformer(pipe, cfg: TrainConfig, recipe: Recipe, z: torch.Tensor, fg: torch.Tensor, prompts: list[str],
                      ckpt: _Checkpoint, log, every: int) -> None:
    """Flow matching; latents under the shape weigh `dit_fg_weight` times the background's.

    Shape and motion live in a few latent pixels; an unweighted loss is dominated by the
    background and the shape's colour, which the model gets right long before the geometry.
    With `text_lr` the Llama trains too: the transformer sees text tokens without positions (no
    RoPE on them), so which motion word belongs to which object must come from the Llama's
    states, and a random Llama mixes a phrase's words with every word before it.
    """
    model = pipe.transformer
    text = encode_prompts(pipe, prompts, recipe)
    modules = {"model": model, "text": pipe.text_encoder} if cfg.text_lr > 0 else {"model": model}
    emas = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()}
    tokens = tokenize_prompts(pipe, prompts, recipe) if "text" in modules else None
    model.train().requires_grad_(True)
    groups, peaks = [{"params": list(model.parameters())}], [cfg.dit_lr]
    if tokens is not None:
        pipe.text_encoder.requires_grad_(True)
        groups.append({"params": list(pipe.text_encoder.parameters())})
        peaks.append(cfg.text_lr)
    opt = torch.optim.AdamW(groups, lr=cfg.dit_lr, betas=(0.9, 0.99), weight_decay=0.01)
    start = 0
    state = ckpt.load()
    if state and state["stage"] == "dit":
        if ("text" in state) != (tokens is not None):
            raise SystemExit(f"the checkpoint in {ckpt.path.parent} was trained with{'out' if 'text' not in state else ''}"
                             " --text-lr; resume it the same way or use a new --workdir")
        for k, m in modules.items():
            m.load_state_dict(state[k])
            emas[k].load_state_dict(state["ema" if k == "model" else f"ema_{k}"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + start)
    rng = random.Random(f"{cfg.seed}-dit-{start}")
    bar = tqdm(range(start, cfg.dit_steps), desc="transformer", initial=start, total=cfg.dit_steps, mininterval=5)
    for step in bar:
        for g, peak in zip(opt.param_groups, peaks):
            g["lr"] = _lr(step, cfg.dit_steps, peak, warmup=100 if cfg.dit_steps > 200 else 1)
        idx = torch.randint(len(z), (cfg.dit_batch,), generator=gen)
        x0 = z[idx.to(z.device)]
        keys = ["" if rng.random() < cfg.prompt_dropout else prompts[i] for i in idx.tolist()]
        pooled = torch.stack([text[k][1] for k in keys])
        if tokens is None:
            emb = torch.stack([text[k][0] for k in keys])
            mask = torch.stack([text[k][2] for k in keys])
        else:
            mask = torch.stack([tokens[k][1] for k in keys])
            emb = llama_states(pipe.text_encoder, torch.stack([tokens[k][0] for k in keys]), mask)
        sigma = _sample_sigma(cfg, gen).to(z.device)
        noise = torch.randn(x0.shape, generator=gen).to(z.device)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = model(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=emb,
                     encoder_attention_mask=mask, pooled_projections=pooled, return_dict=False)[0]
        weight = 1.0 + (cfg.dit_fg_weight - 1.0) * fg[idx.to(z.device)]
        loss = (weight * (pred - (noise - x0)).pow(2)).mean() / weight.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        decay = min(cfg.dit_ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, m in modules.items():
                for pe, pm in zip(emas[k].parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log({"stage": "dit", "step": step, "loss": loss.item()})
        if (step + 1) % every == 0 or step + 1 == cfg.dit_steps:
            ckpt.save({"stage": "dit", "step": step + 1, "opt": opt.state_dict(),
                       **{k: m.state_dict() for k, m in modules.items()},
                       **{("ema" if k == "model" else f"ema_{k}"): e.state_dict() for k, e in emas.items()}})
    for k, m in modules.items():
        m.load_state_dict(emas[k].state_dict())
        m.eval().requires_grad_(False)


@torch.no_grad()
def warm_start_transformer(model, source) -> list[str]:
    """Copy a trained transformer's weights into `model`, which may have a larger patch.

    Every tensor whose shape matches is copied. The patch embedding and the output projection of a
    patch-1 source are spread over the larger patch: the embedding averages the patch's latent pixels
    through the source's projection, the output gives each of them the source's prediction. The blocks,
    the text path and the timestep path carry over unchanged. Returns the names converted this way.
    """
    p, pt = model.config.patch_size, model.config.patch_size_t
    patch = (source.config.patch_size, source.config.patch_size_t)
    if patch not in {(1, 1), (p, pt)}:
        raise ValueError(f"can warm-start from a patch-1 transformer or one of this patch (size {p}, time {pt}), "
                         f"not one of size {patch[0]}, time {patch[1]}")
    target, converted = model.state_dict(), []
    for name, w in source.state_dict().items():
        if name not in target:
            raise ValueError(f"the source transformer has {name!r}, which this recipe's has not: a different "
                             f"architecture (only the patch may differ)")
        if target[name].shape == w.shape:
            target[name] = w
        elif name == "x_embedder.proj.weight":  # (D, C, 1, 1, 1) -> (D, C, pt, p, p)
            target[name] = w.expand(-1, -1, pt, p, p) / (pt * p * p)
            converted.append(name)
        elif name in ("proj_out.weight", "proj_out.bias"):  # rows c -> c * pt * p * p + k (unpatchify's order)
            target[name] = w.repeat_interleave(pt * p * p, dim=0)
            converted.append(name)
        else:
            raise ValueError(f"{name!r} is {tuple(w.shape)} in the source transformer, "
                             f"{tuple(target[name].shape)} here")
    model.load_state_dict(target)
    return converted


def _text_encoders_note(cfg: TrainConfig, init_from: str | None) -> str:
    source = f"{init_from}'s" if init_from else "their seeded random init"
    done = [f"pretrained {cfg.text_pretrain_steps} steps on which words belong to one object"] * bool(
        cfg.text_pretrain_steps) + [f"trained with the transformer (peak lr {cfg.text_lr:g})"] * (cfg.text_lr > 0)
    if not done:
        return f"The text encoders are {init_from}'s, unchanged" if init_from else \
            "The text encoders are frozen at their seeded random init"
    return f"The text encoders start from {source}; the Llama is then " + " and ".join(done) + ", CLIP unchanged"


MODEL_CARD = """# tiny-hunyuanvideo (moving shapes)

A test and demo model, **not a video generator**. It has the exact component classes of
HunyuanVideo in diffusers (`AutoencoderKLHunyuanVideo`, `HunyuanVideoTransformer3DModel` with token
refiner, {num_layers} double- and {num_single_layers} single-stream blocks, `LlamaModel` ({llama_layers} layers)
and `CLIPTextModel` text encoders, `FlowMatchEulerDiscreteScheduler`), at about {params_m:.2f}M
parameters, trained in this repository on a procedural world ({recipe}), {frames} frames of {height}x{width}:
{about}

Held out of training: the (colour, shape) pairs {held_out} and all seeds >= {eval_seed}.

## Training
`python -m pipeline.tiny.train --recipe {recipe} --device {device}` (seed {seed}, {minutes:.1f} minutes wall on
{device_name}):
```json
{config}
```
VAE reconstruction after training: {vae_psnr:.1f} dB PSNR on 32 held-out clips.
{text_encoders}; word-level tokenizers built offline.

## Use
Loaded like real weights (`HunyuanVideoPipeline.from_pretrained`); `generation_config.json` holds
the defaults it needs (size, true CFG {cfg_scale} with an empty negative prompt, a plain prompt
template, VAE framewise decoding off).

## Scores
{scores}
"""


VAE_ONLY_CARD = """# tiny-hunyuanvideo {recipe}: VAE stage only (work in progress)

The VAE and its latent scaling factor are trained (reconstruction {psnr:.1f} dB PSNR on 32 held-out
clips); there is no transformer yet. Continue with
`python -m pipeline.tiny.train --recipe {recipe} --init-from <this folder> --new-transformer`.

```json
{config}
```
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/tiny-train", help="checkpoints and logs (resumes from here)")
    parser.add_argument("--output", default=None, help="where to save the trained pipeline (diffusers layout)")
    parser.add_argument("--smoke", action="store_true", help="a few steps of every stage, for CI")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--device", default="cpu", help="cpu (the reference: ~2 hours on 2 cores) or cuda (minutes)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=BUNDLED_RECIPE,
                        help=f"model version (default {BUNDLED_RECIPE}): v2, the bundled model's (world v2, 4 + 8 "
                             "blocks, 4-layer Llama, 2x VAE and 2x2 patches), or v1, the first bundled model's "
                             "(pipeline/tiny/model_v1: one object, 2 + 4 blocks)")
    parser.add_argument("--vae-from", help="a trained model folder whose VAE starts the VAE stages (fine-tuning it "
                                           "on this recipe's world instead of training from the seeded init)")
    parser.add_argument("--init-from", help="a trained model folder: skip the VAE, continue its transformer (or see --new-transformer)")
    parser.add_argument("--new-transformer", action="store_true",
                        help="with --init-from: keep its VAE, text encoders and scaling, but train a transformer "
                             "of the recipe's architecture from its seeded init")
    parser.add_argument("--transformer-from",
                        help="with --new-transformer: start it from this trained model folder's transformer, whose "
                             "patch may be smaller (patch 1): its blocks carry over, its patch embedding and output "
                             "projection are spread over the recipe's patch")
    parser.add_argument("--vae-only", action="store_true",
                        help="stop after the VAE stages and the latent scaling factor; --output then holds the "
                             "trained VAE with the seeded transformer, for `--init-from ... --new-transformer` later "
                             "(a long run split across sessions or machines)")
    parser.add_argument("--vae-frame-steps", type=int, help="override the single-frame VAE steps")
    parser.add_argument("--vae-clip-steps", type=int, help="override the full-clip VAE steps")
    parser.add_argument("--vae-decoder-steps", type=int,
                        help="with --init-from: first fine-tune the VAE's decoder for this many full-clip steps, its "
                             "encoder frozen, so the latents the transformer learned stay valid (default 0)")
    parser.add_argument("--dit-steps", type=int, help="override the transformer steps")
    parser.add_argument("--dit-lr", type=float, help="override the transformer peak learning rate")
    parser.add_argument("--text-lr", type=float,
                        help="train the Llama text encoder with the transformer at this peak learning rate "
                             "(default 0: it stays as it is); the CLIP encoder stays frozen")
    parser.add_argument("--text-pretrain-steps", type=int,
                        help="before the transformer, teach the Llama which words belong to one object (each "
                             "token's state predicts its phrase's words; see pretrain_text_encoder) for this many "
                             "steps (default 0); the transformer then reads the pretrained, frozen Llama")
    parser.add_argument("--dit-fg-weight", type=float,
                        help="loss weight of latents under the shape relative to the background (default 1)")
    args = parser.parse_args(argv)
    if args.new_transformer and not args.init_from:
        parser.error("--new-transformer needs --init-from (a model whose VAE and text encoders to keep)")
    if args.transformer_from and not args.new_transformer:
        parser.error("--transformer-from starts the --new-transformer of an --init-from model; give both")
    if args.vae_from and args.init_from:
        parser.error("--vae-from starts the VAE stages, which --init-from skips; give one of them")
    if args.vae_decoder_steps and not args.init_from:
        parser.error("--vae-decoder-steps fine-tunes the decoder of an --init-from model; give --init-from")
    recipe = RECIPES[args.recipe]
    trained_on = world_of(args.init_from).name if args.init_from else recipe.name
    if trained_on != recipe.name:
        parser.error(f"--init-from {args.init_from} was trained on world {trained_on}; "
                     f"continue it with --recipe {trained_on} (given: --recipe {recipe.name})")

    cfg = TrainConfig.smoke() if args.smoke else TrainConfig()
    overrides = ("vae_frame_steps", "vae_clip_steps", "vae_decoder_steps", "dit_steps", "dit_lr", "dit_fg_weight",
                 "text_lr", "text_pretrain_steps")
    cfg = replace(cfg, **{k: getattr(args, k) for k in overrides if getattr(args, k) is not None})
    torch.set_num_threads(cfg.threads)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = _Checkpoint(workdir, args.device)
    log_file = open(workdir / "log.jsonl", "a")
    t0 = time.time()

    def log(rec: dict) -> None:
        log_file.write(json.dumps(rec) + "\n")
        log_file.flush()

    if args.init_from:
        # Keep a trained model's VAE, text encoders and scaling; continue its transformer or start a new one.
        from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

        fresh = {}
        if args.new_transformer:  # handed in, so a folder saved by --vae-only (no transformer) loads too
            torch.manual_seed(cfg.seed)
            fresh["transformer"] = HunyuanVideoTransformer3DModel(**recipe.transformer)
            if args.transformer_from and not ckpt.path.exists():  # a resume loads its checkpoint instead
                source = HunyuanVideoTransformer3DModel.from_pretrained(Path(args.transformer_from) / "transformer")
                converted = warm_start_transformer(fresh["transformer"], source)
                print(f"transformer warm-started from {args.transformer_from} (converted: {', '.join(converted)})")
        pipe = HunyuanVideoPipeline.from_pretrained(args.init_from, **fresh).to(args.device)
        for m in (pipe.vae, pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
            m.eval().requires_grad_(False)
        if not (workdir / "vae.pt").exists():  # on a resume it may hold the fine-tuned decoder
            torch.save(pipe.vae.state_dict(), workdir / "vae.pt")
    else:
        pipe = build_pipeline(cfg.seed, recipe).to(args.device)
        if args.vae_from and not ckpt.load():
            from diffusers import AutoencoderKLHunyuanVideo

            trained = AutoencoderKLHunyuanVideo.from_pretrained(Path(args.vae_from) / "vae")
            pipe.vae.load_state_dict(trained.state_dict())
    state = ckpt.load()
    stage = state["stage"] if state else (("vae_decoder" if cfg.vae_decoder_steps else "dit") if args.init_from
                                          else "vae_frame")
    if stage == "vae_decoder":
        pipe.vae.load_state_dict(torch.load(workdir / "vae.pt", map_location=args.device))
        train_vae_stage(pipe.vae, cfg, recipe, "vae_decoder", ckpt, log, args.checkpoint_every, args.device)
        torch.save(pipe.vae.state_dict(), workdir / "vae.pt")
        stage = "dit"
    if stage == "vae_frame":
        train_vae_stage(pipe.vae, cfg, recipe, "vae_frame", ckpt, log, args.checkpoint_every, args.device)
        torch.save(pipe.vae.state_dict(), workdir / "vae_frame.pt")
        stage = "vae_clip"
    if stage == "vae_clip":
        train_vae_stage(pipe.vae, cfg, recipe, "vae_clip", ckpt, log, args.checkpoint_every, args.device)
        torch.save(pipe.vae.state_dict(), workdir / "vae.pt")
    else:
        pipe.vae.load_state_dict(torch.load(workdir / "vae.pt", map_location=args.device))

    train_dit = not args.vae_only and cfg.dit_steps > 0
    if train_dit or not args.init_from:  # the latent pool; from scratch it also sets the VAE's scaling factor
        z, fg, prompts = encode_pool(pipe, cfg, recipe, rescale=not args.init_from)
    with torch.no_grad():
        x, _ = _clips(random.Random(f"{cfg.seed}-val"), 32, recipe.num_frames, recipe)
        x = x.to(args.device)
        rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        vae_psnr = psnr(rec, x, data_range=2.0, per_frame=False)
    log({"stage": "vae_eval", "psnr": vae_psnr, "scaling_factor": pipe.vae.config.scaling_factor})
    print(f"VAE reconstruction {vae_psnr:.2f} dB; latent scaling factor {pipe.vae.config.scaling_factor:.4f}")
    if args.vae_only:
        if args.output:
            pipe.register_modules(transformer=None)  # untrained: not worth its megabytes
            save(pipe, args.output, recipe=recipe, card=VAE_ONLY_CARD.format(recipe=recipe.name, psnr=vae_psnr,
                                                                             config=json.dumps(asdict(cfg), indent=2)))
            print(f"saved the VAE stage to {args.output}")
        return

    if cfg.text_pretrain_steps and (workdir / "text.pt").exists():  # a resume of the transformer stage
        pipe.text_encoder.load_state_dict(torch.load(workdir / "text.pt", map_location=args.device))
    elif cfg.text_pretrain_steps:
        pretrain_text_encoder(pipe, cfg, recipe, ckpt, log, args.checkpoint_every)
        torch.save(pipe.text_encoder.state_dict(), workdir / "text.pt")
    if train_dit:
        train_transformer(pipe, cfg, recipe, z, fg, prompts, ckpt, log, args.checkpoint_every)
    minutes = (time.time() - t0) / 60
    if args.output:
        card = MODEL_CARD.format(
            num_layers=pipe.transformer.config.num_layers, num_single_layers=pipe.transformer.config.num_single_layers,
            params_m=sum(p.numel() for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
                         for p in m.parameters()) / 1e6,
            frames=recipe.num_frames, height=recipe.height, width=recipe.width, recipe=recipe.name,
            about=recipe.about, llama_layers=recipe.llama_layers,
            held_out=", ".join(f"{c} {s}" for c, s in sorted(world.HELD_OUT_PAIRS)), eval_seed=world.EVAL_SEED_BASE,
            seed=cfg.seed, device=args.device, minutes=minutes,
            device_name=(torch.cuda.get_device_name() if args.device.startswith("cuda")
                         else f"CPU, {cfg.threads} threads"), config=json.dumps(asdict(cfg), indent=2),
            vae_psnr=vae_psnr, cfg_scale=recipe.true_cfg_scale,
            text_encoders=_text_encoders_note(cfg, args.init_from),
            scores="Run `python -m bench.tiny_model` to score this model; its figures are pasted here.")
        save(pipe, args.output, card=card, recipe=recipe)
        print(f"saved the trained pipeline to {args.output} after {minutes:.1f} minutes")


if __name__ == "__main__":
    main()
