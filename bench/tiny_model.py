"""Score the bundled tiny model: adherence on held-out prompts, speed, feature smoothness.

    python -m bench.tiny_model [--model bundled] [--prompts 48] [--out bench/results/tiny_model.md]

1. Adherence: the 48 held-out evaluation clips (`world.eval_specs`: seeds never used in training,
   every third one forced to a (colour, shape) pair never seen together, the rest drawn freely, so
   25 of the 48 are such pairs) are generated with full compute (no caching) at the model's
   default settings and scored by the weight-free scorer. The scorer
   is also run on the ground-truth clips and on their VAE reconstructions, which cap what
   generation can reach.
2. Speed: wall seconds to generate one clip at the default settings, no cache and SpeCa default.
3. Feature smoothness (decides SpeCa's defaults): relative L1 error of the last single-stream
   block's output forecast k steps ahead from two full steps k0 apart, first order vs plain reuse,
   early / mid / late in sampling.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelConfig, SampleRequest
from pipeline.generate import Generator
from pipeline.quality import psnr
from pipeline.loading import load_pipeline
from pipeline.tiny import scorer, world


def adherence(gen: Generator, n: int) -> dict:
    specs = world.eval_specs(n)
    requests = [SampleRequest(prompt=s.prompt, seed=world.EVAL_SEED_BASE + i) for i, s in enumerate(specs)]
    samples = gen.generate(requests, batch_size=8)
    generated = [scorer.score(s.frames, s.request.prompt) for s in samples]
    truth = [world.render(s) for s in specs]
    vae = gen.model.pipe.vae
    recon = []
    with torch.no_grad():
        for i in range(0, len(truth), 8):
            x = torch.from_numpy(np.stack(truth[i:i + 8])).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3).to(vae.device)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            recon += list(((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy())
    vae_psnr = float(np.mean([psnr(a, b, per_frame=False) for a, b in zip(truth, recon)]))
    held = [(s.color, s.shape) in world.HELD_OUT_PAIRS for s in specs]
    return {
        "n": n,
        "generated": scorer.accuracy(generated),
        "generated_held_out_pairs": scorer.accuracy([r for r, h in zip(generated, held) if h]),
        "ground_truth": scorer.accuracy([scorer.score(f, s.prompt) for f, s in zip(truth, specs)]),
        "vae_reconstruction": scorer.accuracy([scorer.score(f, s.prompt) for f, s in zip(recon, specs)]),
        "vae_psnr_db": vae_psnr,
        "samples": samples,
    }


def speed(model, repeats: int = 3) -> dict:
    from speca import SpeCaConfig

    req = [SampleRequest(prompt=world.eval_specs(1)[0].prompt, seed=1)]
    out = {}
    for name, cfg in (("no_cache", None), ("speca_default", SpeCaConfig.from_name("default"))):
        gen = Generator(model, cfg)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            gen.generate(req)
            times.append(time.perf_counter() - t)
        gen.close()
        out[name] = float(np.median(times))
    return out


@torch.no_grad()
def smoothness(model, prompts: int = 8, steps: int = 50) -> dict:
    """Forecast error of the last block's output (cond pass), order 1 vs order 0."""
    pipe = model.pipe
    defaults = model.info.defaults
    block = pipe.transformer.single_transformer_blocks[-1]
    feats: list[torch.Tensor] = []

    def hook(_m, _i, out):
        feats.append(out[0].detach().clone())

    handle = block.register_forward_hook(hook)
    try:
        specs = world.eval_specs(prompts)
        pipe(prompt=[s.prompt for s in specs], generator=[torch.Generator().manual_seed(i) for i in range(prompts)],
             height=defaults.height, width=defaults.width, num_frames=defaults.num_frames, num_inference_steps=steps,
             prompt_template=defaults.prompt_template, max_sequence_length=defaults.max_sequence_length,
             output_type="latent")  # no CFG: one pass per step, so feats[i] is step i
    finally:
        handle.remove()
    f = torch.stack(feats)  # (steps, B, N, D)

    def rel(a, b):
        return float(((a - b).abs().sum(dim=(1, 2)) / b.abs().sum(dim=(1, 2))).mean())

    table = {}
    for k0 in (1, 3):
        for phase, base in (("early", 5), ("mid", 22), ("late", 40)):
            for k in (1, 3, 6):
                t0, t1, t = base - k0, base, base + k
                first = f[t1] + (f[t1] - f[t0]) / k0 * k
                table[f"k0={k0} {phase} k={k}"] = {"order1": rel(first, f[t]), "order0": rel(f[t1], f[t])}
    return table


def render_markdown(model_name: str, adh: dict, spd: dict, smooth: dict, command: str) -> str:
    def row(name, acc):
        return f"| {name} | " + " | ".join(f"{100 * acc[a]:.1f}%" for a in (*scorer.ATTRIBUTES, "all")) + " |"

    lines = [
        "# Bundled tiny model: scores",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, CPU (`{platform.processor() or 'n/a'}`), "
        f"torch {torch.__version__}. Model: `{model_name}`.",
        "",
        f"## Adherence on {adh['n']} held-out prompts (full compute, default settings)",
        "",
        "| clips | " + " | ".join(scorer.ATTRIBUTES) + " | all four |",
        "|---|" + "---|" * (len(scorer.ATTRIBUTES) + 1),
        row("generated", adh["generated"]),
        row("generated, held-out (colour, shape) pairs only", adh["generated_held_out_pairs"]),
        row("ground truth (scorer check)", adh["ground_truth"]),
        row("VAE reconstruction of ground truth", adh["vae_reconstruction"]),
        "",
        f"VAE reconstruction PSNR on these clips: {adh['vae_psnr_db']:.1f} dB.",
        "",
        "## Speed (one clip, default settings, median of 3, same process)",
        "",
        f"- no cache: {spd['no_cache']:.2f} s; SpeCa default: {spd['speca_default']:.2f} s "
        f"({spd['no_cache'] / spd['speca_default']:.2f}x).",
        "",
        "## Feature smoothness (last single-stream block output, relative L1 of the forecast)",
        "",
        "Forecast k steps past a full step from two full steps k0 apart; first order | plain reuse. "
        "Early / mid / late = steps 5 / 22 / 40 of 50.",
        "",
        "| k0, phase | k=1 | k=3 | k=6 |",
        "|---|---|---|---|",
    ]
    for k0 in (1, 3):
        for phase in ("early", "mid", "late"):
            cells = [f"{smooth[f'k0={k0} {phase} k={k}']['order1']:.3f} / {smooth[f'k0={k0} {phase} k={k}']['order0']:.3f}"
                     for k in (1, 3, 6)]
            lines.append(f"| k0={k0} {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--out", default="bench/results/tiny_model.md")
    parser.add_argument("--videos", help="also write the generated clips as MP4 to this folder")
    parser.add_argument("--device", default="cpu", help="cpu (the reported figures) or cuda (a quick check)")
    args = parser.parse_args(argv)

    model = load_pipeline(ModelConfig(model=args.model, device=args.device))
    adh = adherence(Generator(model), args.prompts)
    spd = speed(model)
    smooth = smoothness(model)
    command = "python -m bench.tiny_model" + (f" --model {args.model}" if args.model != "bundled" else "")
    md = render_markdown(args.model, adh, spd, smooth, command)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    samples = adh.pop("samples")
    out.with_suffix(".json").write_text(json.dumps({"adherence": adh, "speed": spd, "smoothness": smooth}, indent=2))
    if args.videos:
        from pipeline.storage import Storage
        from pipeline.video_io import VideoEncoding
        from pipeline.writer import write_sample

        storage = Storage(args.videos)
        for s in samples:
            write_sample(storage, s, VideoEncoding(fps=model.info.defaults.fps))
    print(md)


if __name__ == "__main__":
    main()
