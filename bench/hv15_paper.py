"""HunyuanVideo 1.5 on the real configs, on paper: FLOPs, SpeCa cache, communication and memory per rank.

    python -m bench.hv15_paper [--ranks 1,2,4,8] [--batch 1] [--out bench/results/hv15_paper.md]

No GPU is lent to this project's sessions, so this is arithmetic, not a measurement: the 480p and
720p t2v checkpoints (`hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v` / `-720p_t2v`)
at their defaults, 121 frames x 50 steps with CFG (the guider's cond and uncond calls: two
transformer passes a step), bf16, one replica of K ranks (Ulysses K: 16 heads allow up to 16).

* Parameter counts: diffusers' / transformers' real classes built on the meta device, at diffusers'
  defaults for the 1.5 transformer and VAE (which are the 8.3B model's) and the public configs of
  the Qwen2.5-VL-7B text model and ByT5-small (the glyph encoder's 1472-wide base).
* FLOPs per pass: `speca.hunyuan_video15.step_flops` over video + 1985 text tokens (1000 Qwen, 256
  ByT5, 729 zeroed image tokens: every block attends over them, padding included).
* SpeCa's cache: `speca.hunyuan_video15.estimate_cache_bytes` for the default preset, both CFG
  contexts, this rank's video tokens.
* Communication per pass: `pipeline.parallel.comm.transformer_comm_bytes` (Ulysses K; bytes each rank sends).
* Activations: an estimate, a few token x hidden tensors and the MLP's 4x (as bench.replica_model).
* Time: a lower bound, the FLOPs at `--tflops` per GPU (default 700, as anchors.md's 1.0 figure) with
  perfect scaling; real runs lose to attention efficiency, communication and the VAE.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "hv15_paper.md"
GB = 1e9
SIZES = {"480p": (480, 848), "720p": (720, 1280)}
FRAMES, STEPS, CALLS = 121, 50, 2  # frames, steps, transformer passes per step (CFG)
# Qwen2.5-VL-7B-Instruct's text model and google/byt5-small's encoder (public configs).
QWEN = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152064)
BYT5 = dict(d_model=1472, d_ff=3584, d_kv=64, num_layers=12, num_heads=6, vocab_size=384,
            feed_forward_proj="gated-gelu")


def parameters() -> tuple[dict[str, int], dict]:
    """Parameter counts of the four parts (meta device, no weights) and the transformer config."""
    import torch
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import Qwen2_5_VLTextModel, T5Config, T5EncoderModel
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig

    with torch.device("meta"):
        parts = {"transformer": HunyuanVideo15Transformer3DModel(), "vae": AutoencoderKLHunyuanVideo15(),
                 "qwen": Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(**QWEN)), "byt5": T5EncoderModel(T5Config(**BYT5))}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items()}, dict(parts["transformer"].config)


def model(ranks: list[int], batch: int, tflops: float) -> dict:
    from pipeline.parallel.comm import transformer_comm_bytes
    from speca import SpeCaConfig
    from speca import hunyuan_video15 as family
    from speca.flops import hidden_size

    params, tconfig = parameters()
    text = family.text_tokens()
    hidden = hidden_size(tconfig)
    preset = SpeCaConfig.from_name("default")
    weights = {k: 2 * v for k, v in params.items()}
    rows = []
    for name, (height, width) in SIZES.items():
        video = family.video_tokens(tconfig, (FRAMES - 1) // 4 + 1, height // 16, width // 16)
        flops_pass = family.step_flops(tconfig, video + text)
        flops_video = flops_pass * STEPS * CALLS
        for k in ranks:
            local = math.ceil(video / k)
            cache = family.estimate_cache_bytes(tconfig, preset, local, text, batch=batch, contexts=CALLS,
                                                clip_tokens=video)
            activations = batch * 2 * (local + text) * hidden * (4 * 2 + 6)
            comm = transformer_comm_bytes(tconfig, video, text, ulysses_degree=k, batch=batch).total if k > 1 else 0
            common = weights["transformer"] + weights["vae"] + cache + activations
            rows.append({
                "size": name, "height": height, "width": width, "video_tokens": video, "text_tokens": text,
                "ranks": k, "tokens_per_rank": local, "pflops_per_pass": flops_pass / 1e15,
                "pflops_per_video": flops_video * batch / 1e15,
                "seconds_lower_bound": flops_video * batch / (k * tflops * 1e12),
                "cache_gb": cache / GB, "activations_gb": activations / GB, "comm_gb_per_pass": comm / GB,
                "rank0_gb": (common + weights["qwen"] + weights["byt5"]) / GB, "other_ranks_gb": common / GB,
            })
    return {"params": params, "weights_gb": {k: v / GB for k, v in weights.items()}, "batch": batch,
            "tflops": tflops, "preset": preset.to_dict(), "rows": rows,
            "transformer": {k: tconfig[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim",
                                                    "patch_size", "mlp_ratio")}}


def render(r: dict, command: str) -> str:
    p, w = r["params"], r["weights_gb"]
    t = r["transformer"]
    lines = [
        "# HunyuanVideo 1.5 on the real configs, on paper",
        "",
        f"Command: `{command}`  ",
        "No GPU was lent: every figure is arithmetic on the real classes' sizes (see `bench/hv15_paper.py`), not a "
        "measurement.",
        "",
        f"Transformer: {p['transformer'] / 1e9:.2f} B parameters, {t['num_layers']} dual-stream blocks, "
        f"{t['num_attention_heads']} heads x {t['attention_head_dim']}, patch {t['patch_size']}. Text encoders: "
        f"Qwen2.5-VL-7B text {p['qwen'] / 1e9:.2f} B + ByT5 {p['byt5'] / 1e9:.2f} B (rank 0 only). VAE "
        f"{p['vae'] / 1e9:.2f} B. bf16 weights: transformer {w['transformer']:.1f} GB, text {w['qwen'] + w['byt5']:.1f}"
        f" GB, VAE {w['vae']:.2f} GB.",
        "",
        f"{FRAMES} frames x {STEPS} steps with CFG ({CALLS} passes a step), batch {r['batch']}, SpeCa's default preset "
        "(lean cache, both CFG contexts), Ulysses over K ranks. Time: the FLOPs at "
        f"{r['tflops']:.0f} TFLOP/s per GPU, perfect scaling, no SpeCa (a lower bound for the uncached run).",
        "",
        "| size | video + text tokens | K | PFLOP a pass | PFLOP a video | s a video, >= | SpeCa cache GB | "
        "activations GB | GB sent per rank a pass | rank 0 GB | ranks 1..K-1 GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["rows"]:
        lines.append(f"| {x['size']} ({x['width']}x{x['height']}) | {x['video_tokens']:,} + {x['text_tokens']:,} | "
                     f"{x['ranks']} | {x['pflops_per_pass']:.2f} | {x['pflops_per_video']:.0f} | "
                     f"{x['seconds_lower_bound']:.0f} | {x['cache_gb']:.2f} | {x['activations_gb']:.2f} | "
                     f"{x['comm_gb_per_pass']:.1f} | {x['rank0_gb']:.1f} | "
                     + (f"{x['other_ranks_gb']:.1f} |" if x["ranks"] > 1 else "- |"))
    lines += [
        "",
        "Rank 0 holds the text encoders and encodes each batch's prompts once (the other ranks get the embeddings); "
        "the VAE's decode (tiled, tiles spread over the ranks) is not in the peak here: its tiles are decoded after "
        "denoising, when the transformer's activations are free.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hv15_paper", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2,4,8", help="replica sizes K (comma-separated; default 1,2,4,8)")
    parser.add_argument("--batch", type=int, default=1, help="samples per batch (default: 1)")
    parser.add_argument("--tflops", type=float, default=700.0, help="TFLOP/s per GPU for the time bound")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report; a .json twin is written beside it")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    ranks = [int(k) for k in args.ranks.split(",")]
    if min(ranks) < 1 or args.batch < 1 or any(16 % k for k in ranks):
        print("error: ranks must divide the 16 heads, batch >= 1", file=sys.stderr)
        return 2
    result = model(ranks, args.batch, args.tflops)
    command = " ".join(["python -m bench.hv15_paper", *argv])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(result, command))
    out.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=2) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
