"""Where one replica's time and memory go on the real config, before and after issue 32 (on paper).

    python -m bench.replica_model [--ranks 8] [--batch 1] [--encode-sample] [--out bench/results/replica_model.md]

Why: on a GPU cluster, with SpeCa making denoising several times faster, everything around it
(text encoding, VAE decode, MP4 encode and upload) shows; a rank-0-only decode left 7 of 8 GPUs
idle. No GPU is lent to this project's sessions, so this is a model: seconds per stage and peak
memory per rank for one replica of K H100s at HunyuanVideo's 720p x 129 frames x 50 steps with
SpeCa's default, from

* FLOPs and sizes computed here: `speca.hunyuan_video.step_flops` / `estimate_cache_bytes`,
  parameter counts of diffusers' / transformers' real classes built on the meta device (the
  HunyuanVideo transformer and VAE at diffusers' defaults, which are the real model's; the Llama
  and CLIP text encoders at the configs of `hunyuanvideo-community/HunyuanVideo`), and the VAE's
  tile count from its own tiling rule (`pipeline/parallel/vae.py` runs the same decode);
* published per-stage figures (each cited in `SOURCES`, copied from
  /work/shared/reference/anchors.md): xDiT's 8-H100 latency, sglang's tiled-decode timings,
  the text encoders' per-prompt time, LinCa's SpeCa latency-to-FLOPs ratio;
* SpeCa's default FLOPs speedup projected to 60 blocks, as measured by `bench.caching`
  (bench/results/caching_v1.json on the bundled v1 model, caching_v2_first_look.json on v2).

"Before" is the replica as it was (every rank encodes the prompts and holds the text encoders,
rank 0 decodes every VAE tile); "after" is this change (rank 0 encodes once and broadcasts, the
other ranks hold no text encoder, the tiles are spread over the K ranks and gathered on rank 0).
Encode + upload run on the replica's second thread while the next batch denoises, so they are
listed but are not on the accelerators' critical path. `--encode-sample` times our own MP4
encoder (`pipeline.video_io.encode_mp4`, default settings) on this machine's CPU at 720p x 129.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "replica_model.md"
GB = 1e9

HEIGHT, WIDTH, FRAMES, STEPS, TEXT_TOKENS = 720, 1280, 129, 50, 256
SOURCES = {
    "xdit": "xDiT, HunyuanVideo 1280x720x129, 50 steps, Ulysses on 8 H100: 338 s end to end, of which ~310 s "
            "denoising (anchors.md, 'Multi-GPU latency' and 'Where a replica's time goes')",
    "sglang": "sglang PR #36012: tiled VAE decode of 848x480x77 in 5.7 s on one rank, 1.65 s spread over 4 "
              "(anchors.md)",
    "text": "HunyuanVideo's text encoders on an H100: Llama ~14 GB, CLIP 0.23 GB, ~0.3 s per prompt (anchors.md)",
    "linca": "LinCa paper table, SpeCa on HunyuanVideo: 5.23x FLOPs / 4.20x latency (anchors.md)",
    "paper": "SpeCa paper abstract: 6.1x on HunyuanVideo (anchors.md)",
}
XDIT_DENOISE_S = 310.0
SGLANG = {"pixels": 848 * 480 * 77, "one_rank_s": 5.7, "four_ranks_s": 1.65}
TEXT_S_PER_PROMPT = 0.3
LINCA_LATENCY_PER_FLOPS = 4.20 / 5.23
# hunyuanvideo-community/HunyuanVideo text_encoder (LlamaModel) and text_encoder_2 (CLIPTextModel) configs.
LLAMA = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128320)
CLIP = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            vocab_size=49408, max_position_embeddings=77)


def parameters() -> dict[str, int]:
    """Parameter counts of the real model's four parts, built on the meta device (no weights)."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    with torch.device("meta"):
        parts = {"transformer": HunyuanVideoTransformer3DModel(), "vae": AutoencoderKLHunyuanVideo(),
                 "llama": LlamaModel(LlamaConfig(**LLAMA)), "clip": CLIPTextModel(CLIPTextConfig(**CLIP))}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}, parts["transformer"].config, \
        parts["vae"]


def vae_tiles(vae, height: int, width: int, frames: int) -> int:
    """Decoder calls of diffusers' tiled + framewise decode at this size (its own loop bounds)."""
    s, t = vae.spatial_compression_ratio, vae.temporal_compression_ratio
    h, w, f = height // s, width // s, (frames - 1) // t + 1
    temporal = len(range(0, f, vae.tile_sample_stride_num_frames // t))
    spatial = len(range(0, h, vae.tile_sample_stride_height // s)) * len(range(0, w, vae.tile_sample_stride_width // s))
    return temporal * spatial


def speca_speedups() -> dict[str, float]:
    """SpeCa default's FLOPs speedup at 60 blocks, as bench.caching measured it on each bundled model."""
    out = {}
    for name, path in (("v1", "caching_v1.json"), ("v2", "caching_v2_first_look.json")):
        rows = json.loads((ROOT / "bench" / "results" / path).read_text())["rows"]
        out[name] = next(r["flops_speedup_60"] for r in rows if r["key"] == "speca-default")
    return out


def encode_seconds() -> float:
    """Our MP4 encoder (default settings) on a 720p x 129 clip of smooth gradients, on this CPU."""
    import numpy as np

    from pipeline.video_io import VideoEncoding, encode_mp4

    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    frames = np.stack([np.stack([(x + 4 * i) % 256, (y + 2 * i) % 256, (x + y) // 8 % 256], -1)
                       for i in range(FRAMES)]).astype(np.uint8)
    t0 = time.perf_counter()
    encode_mp4(frames, encoding=VideoEncoding(fps=24))
    return time.perf_counter() - t0


def model(ranks: int, batch: int, encode_s: float | None) -> dict:
    from speca import SpeCaConfig
    from speca.hunyuan_video import estimate_cache_bytes, step_flops, video_tokens

    params, tconfig, vae = parameters()
    tokens = video_tokens(tconfig, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    per_rank_tokens = math.ceil(tokens / ranks)
    speedups = speca_speedups()
    flops_step = step_flops(tconfig, tokens + TEXT_TOKENS)

    # Time, seconds per batch of `batch` samples (denoising and decode scale with the batch).
    denoise_plain = XDIT_DENOISE_S * 8 / ranks * batch  # xDiT's scaling to 8 is ~linear from 4 (cluster/README)
    speca_wall = {k: v * LINCA_LATENCY_PER_FLOPS for k, v in speedups.items()}
    denoise = {k: denoise_plain / v for k, v in speca_wall.items()}
    denoise["paper"] = denoise_plain / (6.1 * LINCA_LATENCY_PER_FLOPS)
    one_rank_decode = SGLANG["one_rank_s"] * (HEIGHT * WIDTH * FRAMES) / SGLANG["pixels"] * batch
    overhead = SGLANG["four_ranks_s"] / (SGLANG["one_rank_s"] / 4) - 1  # gather + imbalance at 4 ranks
    tiles = vae_tiles(vae, HEIGHT, WIDTH, FRAMES)
    decode_after = one_rank_decode * math.ceil(tiles / ranks) / tiles * (1 + overhead)
    text = TEXT_S_PER_PROMPT * batch
    time_rows = {}
    for key, d in denoise.items():
        before = {"text": text, "denoise": d, "decode": one_rank_decode}
        after = {"text": text, "denoise": d, "decode": decode_after}
        time_rows[key] = {"before": before, "after": after,
                          "share_before": (text + one_rank_decode) / sum(before.values()),
                          "share_after": (text + decode_after) / sum(after.values())}

    # Memory per rank, bytes (bf16 weights and activations).
    weights = {k: 2 * v for k, v in params.items()}
    cache = estimate_cache_bytes(tconfig, SpeCaConfig.from_name("default"), per_rank_tokens, TEXT_TOKENS, batch=batch,
                                 clip_tokens=tokens)
    hidden = int(tconfig["num_attention_heads"]) * int(tconfig["attention_head_dim"])
    activations = batch * 2 * (per_rank_tokens + TEXT_TOKENS) * hidden * (4 * 2 + 6)  # MLP 4x in and out + a few
    decoded_video = batch * 2 * 3 * FRAMES * HEIGHT * WIDTH
    tile_out = batch * 2 * 3 * (vae.tile_sample_min_num_frames + 1) * vae.tile_sample_min_height ** 2
    tile_peak = batch * 2 * 128 * (vae.tile_sample_min_num_frames + 1) * vae.tile_sample_min_height ** 2 * 3
    all_tiles = tiles * tile_out
    common = weights["transformer"] + weights["vae"] + cache + activations
    text_enc = weights["llama"] + weights["clip"]
    memory = {
        "before": {"rank 0": common + text_enc + all_tiles + tile_peak + decoded_video,
                   "ranks 1..K-1": common + text_enc},
        "after": {"rank 0": common + text_enc + all_tiles + tile_peak + decoded_video,
                  "ranks 1..K-1": common + math.ceil(tiles / ranks) * tile_out + tile_peak},
    }
    return {"ranks": ranks, "batch": batch, "tokens": tokens, "tokens_per_rank": per_rank_tokens,
            "step_pflops": flops_step / 1e15, "speca_flops_speedup_60": speedups,
            "speca_wall_speedup": {**speca_wall, "paper": 6.1 * LINCA_LATENCY_PER_FLOPS},
            "denoise_plain_s": denoise_plain, "decode_one_rank_s": one_rank_decode, "decode_overhead": overhead,
            "vae_tiles": tiles, "time": time_rows, "encode_s_measured_here": encode_s,
            "params": params, "weights_gb": {k: v / GB for k, v in weights.items()},
            "memory_parts_gb": {"speca_cache": cache / GB, "activations": activations / GB,
                                "decoded_tiles": all_tiles / GB, "tile_peak": tile_peak / GB,
                                "decoded_video": decoded_video / GB},
            "memory_gb": {k: {r: v / GB for r, v in d.items()} for k, d in memory.items()}}


def render(r: dict, command: str, machine: dict) -> str:
    k, b = r["ranks"], r["batch"]
    lines = [
        "# One replica's time and memory on the real config, before and after issue 32 (a model, on paper)",
        "",
        f"Command: `{command}`  ",
        f"Computed on {machine['platform']} ({machine['cpu_count']} CPUs, load average {machine['load'][0]:.1f}); "
        "no GPU was lent, so every GPU figure below is arithmetic on the cited sources, not a measurement.",
        "",
        f"Replica: {k} H100s (Ulysses {k}), HunyuanVideo {WIDTH}x{HEIGHT} x {FRAMES} frames, {STEPS} steps, "
        f"embedded guidance (one transformer pass a step), batch {b}, SpeCa default, bf16. "
        f"{r['tokens']:,} video tokens ({r['tokens_per_rank']:,} per rank) + {TEXT_TOKENS} text tokens; "
        f"one full step is {r['step_pflops']:.1f} PFLOP (`speca.hunyuan_video.step_flops`).",
        "",
        "## Seconds per batch",
        "",
        "| SpeCa speedup used | denoise s | text s | decode s before (rank 0 only) | decode s after "
        f"({r['vae_tiles']} tiles over {k} ranks) | text + decode share before | after |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {"v1": f"our default, {r['speca_flops_speedup_60']['v1']:.2f}x FLOPs at 60 blocks (v1)",
              "v2": f"our default, {r['speca_flops_speedup_60']['v2']:.2f}x FLOPs at 60 blocks (v2 first look)",
              "paper": "the paper's 6.1x"}
    for key, row in r["time"].items():
        lines.append(f"| {labels[key]} -> {r['speca_wall_speedup'][key]:.2f}x wall | {row['after']['denoise']:.1f} | "
                     f"{row['after']['text']:.1f} | {row['before']['decode']:.1f} | {row['after']['decode']:.1f} | "
                     f"{row['share_before']:.1%} | {row['share_after']:.1%} |")
    enc = r["encode_s_measured_here"]
    lines += [
        "",
        "How each figure is made:",
        f"- denoise: xDiT's ~{XDIT_DENOISE_S:.0f} s of uncached denoising on 8 H100s [xdit], scaled to {k} ranks and "
        f"batch {b} ({r['denoise_plain_s']:.0f} s), divided by SpeCa's wall speedup = its FLOPs speedup x "
        f"{LINCA_LATENCY_PER_FLOPS:.2f} (SpeCa's latency / FLOPs speedup on HunyuanVideo [linca]).",
        f"- decode before: sglang's one-rank tiled decode [sglang] scaled by pixels to {WIDTH}x{HEIGHT}x{FRAMES}: "
        f"{r['decode_one_rank_s']:.1f} s on rank 0 while {k - 1} GPUs wait. After: the busiest rank's "
        f"{math.ceil(r['vae_tiles'] / k)} of {r['vae_tiles']} tiles (diffusers' tiling: 256-pixel tiles, stride 192, "
        f"16-frame tiles, stride 12), plus the {r['decode_overhead']:.0%} that sglang's 4-rank run lost to "
        "gathering and imbalance [sglang].",
        f"- text: ~{TEXT_S_PER_PROMPT} s a prompt [text]; the same before and after (the other ranks waited for "
        "their own encode before, they wait for rank 0's broadcast now): this change saves memory here, not time.",
        "- encode + upload: on the replica's second thread, hidden behind the next batch's denoising. Our encoder "
        + (f"took {enc:.1f} s for one {WIDTH}x{HEIGHT}x{FRAMES} clip on this machine's CPU (default settings: "
           "libx264 medium, crf 12), well under a batch's denoising" if enc is not None else "was not timed "
           "(--encode-sample)") + "; an S3 upload of the ~5-20 MB clip is ~0.1-0.5 s.",
        "",
        "Not done (see the issue): decoding batch n while batch n + 1 denoises. Decode runs under the model lock, "
        "because the tiles' gather and the transformer's collectives share one process group; overlapping "
        "them would need a second group and stream per rank.",
        "",
        "## Peak memory per rank, GB",
        "",
        "| part | GB | held by |",
        "|---|---|---|",
    ]
    w, m = r["weights_gb"], r["memory_parts_gb"]
    lines += [
        f"| transformer weights ({r['params']['transformer'] / 1e9:.2f} B params) | {w['transformer']:.1f} | every rank |",
        f"| VAE weights ({r['params']['vae'] / 1e9:.2f} B) | {w['vae']:.2f} | every rank |",
        f"| Llama text encoder ({r['params']['llama'] / 1e9:.2f} B) + CLIP ({r['params']['clip'] / 1e9:.2f} B) | "
        f"{w['llama'] + w['clip']:.1f} | before: every rank; after: rank 0 |",
        f"| SpeCa lean cache (`estimate_cache_bytes`, this rank's tokens) | {m['speca_cache']:.2f} | every rank |",
        f"| transformer activations (est: a few token x hidden tensors, MLP 4x) | {m['activations']:.2f} | every rank |",
        f"| decoded VAE tiles before blending | {m['decoded_tiles']:.1f} | rank 0 (after: the others hold 1/{k} each) |",
        f"| one tile's decoder activations (est: 3 maps of 128 channels at full resolution) | {m['tile_peak']:.2f} | "
        "the rank decoding it |",
        f"| the blended video | {m['decoded_video']:.2f} | rank 0 |",
        "",
        "| | rank 0 | ranks 1..K-1 |",
        "|---|---|---|",
    ]
    for when in ("before", "after"):
        mem = r["memory_gb"][when]
        lines.append(f"| {when} | {mem['rank 0']:.1f} | {mem['ranks 1..K-1']:.1f} |")
    lines += [
        "",
        "Every rank stays under 80 GB before and after; the change frees the text encoders "
        f"({w['llama'] + w['clip']:.1f} GB) on {k - 1} of {k} ranks, room for a larger batch or the per-module cache.",
        "",
        "## Sources",
        "",
    ]
    lines += [f"- [{key}] {text}" for key, text in SOURCES.items()]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replica_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=8, help="ranks (H100s) per replica (default: 8)")
    parser.add_argument("--batch", type=int, default=1, help="samples per batch (default: 1)")
    parser.add_argument("--encode-sample", action="store_true",
                        help="time our MP4 encoder on one 720p x 129 clip on this CPU (a few seconds)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report; a .json twin is written beside it")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if args.ranks < 1 or args.batch < 1:
        print("error: --ranks and --batch must be >= 1", file=sys.stderr)
        return 2
    machine = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "load": os.getloadavg()}
    result = model(args.ranks, args.batch, encode_seconds() if args.encode_sample else None)
    command = " ".join(["python -m bench.replica_model", *argv])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(result, command, machine))
    out.with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine, **result}, indent=2)
                                        + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
