"""Score the bundled tiny model: adherence on held-out prompts, realism, speed, feature smoothness.

    python -m bench.tiny_model [--model bundled] [--prompts 48] [--out bench/results/tiny_model.md]

The model's world (v1 or v2, `world` in its generation_config.json) picks the evaluation set and
the weight-free scorer.
1. Adherence: the held-out evaluation clips (`world.eval_specs` / `world_v2.eval_scenes`: seeds
   never used in training, every third one forced to a (colour, shape) pair never seen together)
   are generated with full compute (no caching) at the model's default settings and scored, split
   into clips whose (colour, shape) pairs were all seen in training and clips with a held-out pair.
   The scorer is also run on the ground-truth clips and on their VAE reconstructions, which cap
   what generation can reach.
2. Realism (how unforgiving the model is to cutting compute, as real HunyuanVideo is): the same
   prompts and seeds with half the steps and no caching, PSNR to the full-step clip per sample;
   the median and the spread (p90 - p10) say how hard samples are and how much they differ.
3. Speed: wall seconds to generate one clip at the default settings, no cache and SpeCa default.
4. Binding, teacher-forced (worlds with several objects): the flow-matching loss with each clip's own
   prompt against its rebound prompt (each object's shape and motion handed to the next object) and
   another clip's prompt, at the noise levels where sampling lays out the objects.
5. Feature smoothness (decides SpeCa's defaults): relative L1 error of the last single-stream
   block's output forecast k steps ahead from two full steps k0 apart, first order vs plain reuse,
   early / mid / late in sampling.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelConfig, SampleRequest
from pipeline.generate import Generator
from pipeline.loading import load_pipeline
from pipeline.quality import psnr
from pipeline.tiny.worlds import World, world_of


def _requests(w: World, n: int, steps: int | None = None) -> tuple[list, list[SampleRequest]]:
    specs = w.eval_set(n)
    extra = {"num_inference_steps": steps} if steps else {}
    return specs, [SampleRequest(prompt=s.prompt, seed=w.eval_seed_base + i, **extra) for i, s in enumerate(specs)]


def _clip_tensor(clips: list[np.ndarray]) -> torch.Tensor:
    """uint8 clips (T, H, W, 3) as the VAE's input: (N, 3, T, H, W) in [-1, 1]."""
    return torch.from_numpy(np.stack(clips)).float().div(127.5).sub(1).permute(0, 4, 1, 2, 3)


def adherence(gen: Generator, w: World, n: int) -> dict:
    specs, requests = _requests(w, n)
    scorer = w.scorer
    samples = gen.generate(requests, batch_size=8)
    generated = [scorer.score(s.frames, s.request.prompt) for s in samples]
    truth = [w.render(s) for s in specs]
    vae = gen.model.pipe.vae
    recon = []
    with torch.no_grad():
        for i in range(0, len(truth), 8):
            x = _clip_tensor(truth[i:i + 8]).to(vae.device)
            y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
            recon += list(((y + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy())
    vae_psnr = float(np.mean([psnr(a, b, per_frame=False) for a, b in zip(truth, recon)]))
    held = [w.held_out(s) for s in specs]
    counts = [w.num_objects(s) for s in specs]
    verdicts = getattr(scorer, "object_verdicts", None)  # worlds with several objects say how each one failed
    binding = None
    if verdicts and max(counts) > 1:
        objects = [v for smp, c in zip(samples, counts) if c > 1 for v in verdicts(smp.frames, smp.request.prompt)]
        binding = {"clips": sum(c > 1 for c in counts), "objects": len(objects),
                   **{a: dict(Counter(v[a] for v in objects).most_common()) for a in ("motion", "shape")}}
    return {
        "n": n,
        "attributes": list(scorer.ATTRIBUTES),
        "generated": scorer.accuracy(generated),
        "generated_seen_pairs": scorer.accuracy([r for r, h in zip(generated, held) if not h]),
        "generated_held_out_pairs": scorer.accuracy([r for r, h in zip(generated, held) if h]),
        "n_held_out_pairs": int(sum(held)),
        # One row per object count: a world's hard scenes (several objects to bind) hide in the all-clips mean.
        "generated_by_objects": {
            k: {"n": counts.count(k), **scorer.accuracy([r for r, c in zip(generated, counts) if c == k])}
            for k in sorted(set(counts))},
        "binding": binding,
        "ground_truth": scorer.accuracy([scorer.score(f, s.prompt) for f, s in zip(truth, specs)]),
        "vae_reconstruction": scorer.accuracy([scorer.score(f, s.prompt) for f, s in zip(recon, specs)]),
        "vae_psnr_db": vae_psnr,
        "samples": samples,
    }


def realism(gen: Generator, w: World, full: list, n: int, steps: int) -> dict:
    """PSNR of each clip at `steps` plain steps to the same prompt and seed at the default steps (no caching)."""
    _, requests = _requests(w, n, steps)
    fewer = gen.generate(requests, batch_size=8)
    per = [psnr(f.frames, s.frames) for f, s in zip(full, fewer)]
    finite = [v for v in per if np.isfinite(v)]
    p10, p50, p90 = (float(np.percentile(finite, q)) for q in (10, 50, 90))
    return {"steps": steps, "full_steps": int(full[0].request.num_inference_steps), "n": n, "median_db": p50,
            "mean_db": float(np.mean(finite)), "p10_db": p10, "p90_db": p90, "spread_db": p90 - p10,
            "worst_db": float(min(finite)), "identical": len(per) - len(finite), "per_sample_db": per}


def speed(model, w: World, repeats: int = 3) -> dict:
    from speca import SpeCaConfig

    req = [SampleRequest(prompt=w.eval_set(1)[0].prompt, seed=1)]
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
def smoothness(model, w: World, prompts: int = 8, steps: int = 50) -> dict:
    """Forecast error of the last block's output (cond pass), order 1 vs order 0."""
    pipe = model.pipe
    defaults = model.info.defaults
    block = pipe.transformer.single_transformer_blocks[-1]
    feats: list[torch.Tensor] = []

    def hook(_m, _i, out):
        feats.append(out[0].detach().clone())

    handle = block.register_forward_hook(hook)
    try:
        specs = w.eval_set(prompts)
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


@torch.no_grad()
def binding_gap(model, w: World, n: int, sigmas: tuple[float, ...] = (0.99, 0.95, 0.9, 0.8),
                draws: int = 2) -> dict | None:
    """Does the transformer use which words belong to which object? None for a world of one object.

    A model that reads the prompt as a bag of words predicts the same flow for the rebound prompt as for
    the true one; one that binds loses about what the shapes and motions are worth. Sampling-free, so
    it moves with training where the per-object counts (a few dozen objects) are coarse.
    """
    specs = [s for s in w.eval_set(n) if w.rebound_prompt and w.num_objects(s) > 1
             and w.rebound_prompt(s) != s.prompt]
    if not specs:
        return None
    pipe, defaults = model.pipe, model.info.defaults
    prompts = {"own": [s.prompt for s in specs], "rebound": [w.rebound_prompt(s) for s in specs],
               "other": [specs[i - 1].prompt for i in range(len(specs))]}
    text = {k: pipe.encode_prompt(prompt=v, prompt_template=defaults.prompt_template, device=pipe.device,
                                  max_sequence_length=defaults.max_sequence_length) for k, v in prompts.items()}
    x = _clip_tensor([w.render(s) for s in specs])
    vae = pipe.vae
    z = torch.cat([vae.encode(c.to(vae.device, vae.dtype)).latent_dist.mean for c in x.split(8)])
    z = z.to(pipe.transformer.dtype) * vae.config.scaling_factor
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for sigma in sigmas:
        losses = {k: torch.zeros(len(specs)) for k in prompts}
        for _ in range(draws):
            noise = torch.randn(z.shape, generator=gen).to(z.device, z.dtype)
            xt = (1 - sigma) * z + sigma * noise
            for k, (emb, pooled, mask) in text.items():
                for i in range(0, len(specs), 8):
                    sl = slice(i, i + 8)
                    pred = pipe.transformer(hidden_states=xt[sl], timestep=torch.full((xt[sl].shape[0],), sigma * 1000,
                                            device=z.device), encoder_hidden_states=emb[sl],
                                            encoder_attention_mask=mask[sl], pooled_projections=pooled[sl],
                                            return_dict=False)[0]
                    losses[k][sl] += (pred - (noise[sl] - z[sl])).float().pow(2).mean(dim=(1, 2, 3, 4)).cpu() / draws
        own = float(losses["own"].mean())
        gain = {k: float(losses[k].mean()) / own - 1 for k in ("rebound", "other")}
        rows[f"{sigma:g}"] = {"own_loss": own, "rebound_gain": gain["rebound"], "other_gain": gain["other"],
                              "binding_share": gain["rebound"] / gain["other"] if gain["other"] > 0 else float("nan"),
                              "rebound_worse_share": float((losses["rebound"] > losses["own"]).float().mean())}
    return {"clips": len(specs), "draws": draws, "by_sigma": rows}


def _binding_gap_lines(gap: dict | None) -> list[str]:
    if not gap:
        return []
    return [f"## Binding, teacher-forced ({gap['clips']} held-out clips with several objects, {gap['draws']} noise "
            "draws each)", "",
            "Flow-matching loss of the conditional prediction with the clip's own prompt, and how much more with its "
            "rebound prompt (each object's shape and motion handed to the next object, colours in place) and with "
            "another clip's prompt. Binding share = the rebound prompt's gain / the other prompt's: 0 for a model "
            "that reads the prompt as a bag of words.", "",
            "| sigma | own prompt | rebound prompt | another clip's prompt | binding share | rebound worse for |",
            "|---|---|---|---|---|---|",
            *(f"| {s} | {r['own_loss']:.4f} | +{100 * r['rebound_gain']:.1f}% | +{100 * r['other_gain']:.1f}% | "
              f"{r['binding_share']:.3f} | {100 * r['rebound_worse_share']:.0f}% of clips |"
              for s, r in gap["by_sigma"].items()), ""]


def _binding_lines(binding: dict | None) -> list[str]:
    if not binding:
        return []
    return [f"Per object, in the {binding['clips']} generated clips with several objects ({binding['objects']} "
            "objects asked for; \"another object's\" motion is a binding error):", "",
            *(f"- {a}: " + ", ".join(f"{k} {v}" for k, v in binding[a].items()) for a in ("motion", "shape")), ""]


def render_markdown(model_name: str, w: World, adh: dict, real: dict, spd: dict, smooth: dict, command: str,
                    gap: dict | None = None) -> str:
    attributes = adh["attributes"]

    def row(name, acc):
        return f"| {name} | " + " | ".join(f"{100 * acc[a]:.1f}%" for a in (*attributes, "all")) + " |"

    lines = [
        "# Bundled tiny model: scores",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, CPU (`{platform.processor() or 'n/a'}`), "
        f"torch {torch.__version__}. Model: `{model_name}` (world {w.name}).",
        "",
        f"## Adherence on {adh['n']} held-out prompts and seeds (full compute, default settings)",
        "",
        "| clips | " + " | ".join(attributes) + " | all |",
        "|---|" + "---|" * (len(attributes) + 1),
        row("generated", adh["generated"]),
        row(f"generated, (colour, shape) pairs seen in training ({adh['n'] - adh['n_held_out_pairs']} clips)",
            adh["generated_seen_pairs"]),
        row(f"generated, with a held-out (colour, shape) pair ({adh['n_held_out_pairs']} clips)",
            adh["generated_held_out_pairs"]),
        *(row(f"generated, {k} object{'s' * (k > 1)} ({acc['n']} clips)", acc)
          for k, acc in adh["generated_by_objects"].items() if len(adh["generated_by_objects"]) > 1),
        row("ground truth (scorer check)", adh["ground_truth"]),
        row("VAE reconstruction of ground truth", adh["vae_reconstruction"]),
        "",
        f"VAE reconstruction PSNR on these clips: {adh['vae_psnr_db']:.1f} dB.",
        "",
        *_binding_lines(adh["binding"]),
        *_binding_gap_lines(gap),
        f"## Realism: {real['steps']} plain steps against {real['full_steps']} (no caching, same prompts and seeds)",
        "",
        f"PSNR of each clip to its {real['full_steps']}-step clip: median {real['median_db']:.1f} dB, "
        f"p10 {real['p10_db']:.1f}, p90 {real['p90_db']:.1f} (spread {real['spread_db']:.1f} dB), worst "
        f"{real['worst_db']:.1f}, mean {real['mean_db']:.1f}; {real['identical']} identical. For scale: on real "
        "HunyuanVideo published caching at ~2.2x keeps ~33 dB (see shared/reference/anchors.md).",
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
    parser.add_argument("--realism-steps", type=int, default=25,
                        help="plain steps compared with the default steps for realism (default: 25)")
    parser.add_argument("--out", default="bench/results/tiny_model.md")
    parser.add_argument("--videos", help="also write the generated clips as MP4 to this folder")
    parser.add_argument("--device", default="cpu", help="cpu (the reported figures) or cuda (a quick check)")
    args = parser.parse_args(argv)

    model = load_pipeline(ModelConfig(model=args.model, device=args.device))
    w = world_of(model.info.path)
    gen = Generator(model)
    adh = adherence(gen, w, args.prompts)
    real = realism(gen, w, adh["samples"], args.prompts, args.realism_steps)
    gap = binding_gap(model, w, args.prompts)
    spd = speed(model, w)
    smooth = smoothness(model, w)
    command = "python -m bench.tiny_model" + "".join(
        f" --{dest.replace('_', '-')} {getattr(args, dest)}" for dest in ("model", "prompts", "realism_steps", "out")
        if getattr(args, dest) != parser.get_default(dest))
    md = render_markdown(args.model, w, adh, real, spd, smooth, command, gap)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    samples = adh.pop("samples")
    out.with_suffix(".json").write_text(json.dumps({"world": w.name, "adherence": adh, "realism": real, "speed": spd,
                                                    "binding_gap": gap, "smoothness": smooth}, indent=2))
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
