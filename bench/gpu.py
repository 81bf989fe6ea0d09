"""Time SpeCa on the real-size HunyuanVideo transformer: full step, speculative step, cache memory.

    python -m bench.gpu [--sizes 544x960x61,720x1280x129] [--repeats 3] [--budget-s 420]
    python -m bench.gpu --family hunyuan_video15   # HunyuanVideo 1.5 (8.3B), 480x848x121 and 720x1280x121
    python -m bench.gpu --scaled-down   # tiny config, small sizes, CPU, float32: seconds

On one H100 (80 GB) the default run fits an 8-minute slot: the 420 s budget leaves time for
start-up and the last call. The 720p per-module cache (~117 GB) cannot fit and is reported OOM.

Why: `speca/flops.py` says a speculative step costs one block of a full step (1/60 on the 13B
model) and `estimate_cache_bytes` says how much memory each cache granularity holds; this checks
both on a device at the token counts a real generation has.

How: diffusers' `HunyuanVideoTransformer3DModel` with its default config (the 13B model: 20
double + 40 single-stream blocks, 24 heads x 128) is built directly on the device in `--dtype`,
with random weights (the values do not change the speed). Each size is height x width x frames
in pixels: latent 16 x ((F - 1) / 4 + 1) x H/8 x W/8, with 256 text tokens, batch 1, no CFG.
`--family hunyuan_video15`: `HunyuanVideo15Transformer3DModel` at its defaults (8.3B: 54 dual-stream
blocks, 16 heads x 128), latent 65 x ((F - 1) / 4 + 1) x H/16 x W/16 (latents, condition latents and
mask, zero for t2v), 1000 Qwen + 256 ByT5 text tokens and 729 zeroed image tokens (one CFG call).
Per size:
  1. full step: one transformer forward; a warm-up call, then the median of `--repeats`;
  2. SpeCa through the project's adapter, per cache granularity ("lean", "module"): order 1,
     thresholds at inf (every draft is accepted), so the step pattern is
     F F S S.. F: two full steps fill the cache, a speculative warm-up step, `--repeats`
     speculative steps (draft + verification of the last single-stream block), then the full
     step `max_spec` forces. Reported: the median speculative step and the median full step
     under SpeCa (each without its first call), next to the analytic FLOPs of both;
  3. cache memory per granularity: the session's cache bytes, the allocator's growth over the
     run (CUDA only) and `estimate_cache_bytes`.
Times are CUDA events on a GPU and wall clock elsewhere. An out-of-memory is recorded as "OOM"
for that measurement (a cache whose estimate exceeds the free device memory is not tried). No
measurement starts once the `--budget-s` (counted from the start of `main`) would run out; the
results (`--out`, JSON, and the same path with .md) are rewritten after every measurement, so a
run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import diffusers
import torch
from diffusers import HunyuanVideo15Transformer3DModel, HunyuanVideoTransformer3DModel

from speca import SpeCaConfig, apply_speca, disable_speca
from speca import hunyuan_video, hunyuan_video15
from speca.flops import num_blocks, speculative_fraction, step_flops, video_tokens

CACHES = ("lean", "module")
ORDER = 1  # first-order drafts: two full steps give every cached feature its full history
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# diffusers' own test config for this model, with two blocks of each kind so the cache has depth.
TINY_CONFIG = {"in_channels": 4, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 10,
               "num_layers": 2, "num_single_layers": 2, "num_refiner_layers": 1, "patch_size": 1, "patch_size_t": 1,
               "text_embed_dim": 16, "pooled_projection_dim": 8, "rope_axes_dim": (2, 4, 4)}
# HunyuanVideo 1.5 shrunk the same way: 4 dual-stream blocks, 4 latent channels (x2 + mask in).
TINY_15 = {"in_channels": 9, "out_channels": 4, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 4,
           "num_refiner_layers": 1, "text_embed_dim": 16, "text_embed_2_dim": 8, "image_embed_dim": 8,
           "rope_axes_dim": (2, 2, 4), "task_type": "t2v"}


@dataclass(frozen=True)
class Family:
    """A transformer this bench can build: class, SpeCa family module, VAE stride, text lengths (real, tiny)."""

    cls: type
    speca: object  # the speca family module (estimate_cache_bytes)
    vae_spatial: int
    text: tuple[int, ...]  # text-stream parts, real model
    tiny_text: tuple[int, ...]
    tiny: dict
    sizes: str


FAMILIES = {
    "hunyuan_video": Family(HunyuanVideoTransformer3DModel, hunyuan_video, 8, (256,), (16,), TINY_CONFIG,
                            "544x960x61,720x1280x129"),
    "hunyuan_video15": Family(HunyuanVideo15Transformer3DModel, hunyuan_video15, 16, (1000, 256, 729), (8, 4, 4),
                              TINY_15, "480x848x121,720x1280x121"),
}


@dataclass(frozen=True)
class Setup:
    """What a run measures unless the command line says otherwise."""

    model_config: dict  # overrides of diffusers' defaults ({} = the 13B model)
    sizes: str
    text_tokens: int
    device: str
    dtype: str
    out: str


REAL = Setup({}, "544x960x61,720x1280x129", 256, "cuda", "bfloat16", "bench/results/gpu.json")
SCALED_DOWN = Setup(TINY_CONFIG, "64x64x9,128x128x17", 16, "cpu", "float32", "bench/results/gpu_scaled_down.json")


@dataclass(frozen=True)
class Size:
    """A video size in pixels; the VAE compresses 8x in space and 4x in time."""

    height: int
    width: int
    frames: int

    @classmethod
    def parse(cls, text: str) -> Size:
        try:
            height, width, frames = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"size {text!r} is not HEIGHTxWIDTHxFRAMES, e.g. 544x960x61") from None
        if height % 16 or width % 16 or (frames - 1) % 4 or min(height, width, frames) < 1:
            raise ValueError(f"size {text!r}: height and width must be multiples of 16, frames 4k + 1")
        return cls(height, width, frames)

    def __str__(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"

    def latent(self, channels: int, spatial: int = 8) -> tuple[int, int, int, int]:
        return channels, (self.frames - 1) // 4 + 1, self.height // spatial, self.width // spatial


class Budget:
    """Seconds left before the run stops starting measurements."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


def build_transformer(model_config: dict, device: torch.device, dtype: torch.dtype, cls: type =
                      HunyuanVideoTransformer3DModel):
    """Randomly initialised, created on `device` in `dtype` (13B parameters never touch host memory)."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**model_config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def make_inputs(model, size: Size, text_tokens: int | tuple[int, ...]) -> dict:
    """The transformer's keyword arguments for one sample, all but the timestep (as the pipeline passes them)."""
    cfg, device, dtype = model.config, model.device, model.dtype
    if isinstance(model, HunyuanVideo15Transformer3DModel):  # text: (Qwen, ByT5, image) tokens, all valid but image
        mllm, glyph, image = text_tokens
        return {"hidden_states": torch.randn(1, *size.latent(cfg.in_channels, 16), device=device, dtype=dtype),
                "encoder_hidden_states": torch.randn(1, mllm, cfg.text_embed_dim, device=device, dtype=dtype),
                "encoder_attention_mask": torch.ones(1, mllm, device=device, dtype=dtype),
                "encoder_hidden_states_2": torch.randn(1, glyph, cfg.text_embed_2_dim, device=device, dtype=dtype),
                "encoder_attention_mask_2": torch.ones(1, glyph, device=device, dtype=dtype),
                "image_embeds": torch.zeros(1, image, cfg.image_embed_dim, device=device, dtype=dtype)}
    text_tokens = text_tokens[0] if isinstance(text_tokens, tuple) else text_tokens
    inputs = {"hidden_states": torch.randn(1, *size.latent(cfg.in_channels), device=device, dtype=dtype),
              "encoder_hidden_states": torch.randn(1, text_tokens, cfg.text_embed_dim, device=device, dtype=dtype),
              "encoder_attention_mask": torch.ones(1, text_tokens, device=device, dtype=torch.long),
              "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, device=device, dtype=dtype)}
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((1,), 6.0 * 1000, device=device, dtype=dtype)  # the pipeline's default
    return inputs


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes: CUDA events on a GPU, wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def after_warmup(times: list[float]) -> float | None:
    """Median of the calls after the first (the first alone if nothing followed)."""
    return statistics.median(times[1:] or times) if times else None


def release(device: torch.device) -> None:
    """Free what a finished (or failed) measurement left behind."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_base(device: torch.device) -> int | None:
    """Bytes allocated now, with the peak counter restarted from here (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def grown(device: torch.device, base: int | None, peak: bool = False) -> int | None:
    """Allocated (or peak allocated) bytes above `base`."""
    if base is None:
        return None
    now = torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
    return now - base


def measure_full(model, inputs: dict, repeats: int, budget: Budget, estimate_s: float) -> dict:
    """A warm-up forward, then up to `repeats` timed ones (no SpeCa)."""
    device = model.device
    step = dict(inputs, timestep=torch.full((1,), 500.0, device=device, dtype=model.dtype))
    base = memory_base(device)
    times: list[float] = []
    for _ in range(1 + repeats):
        if not budget.allows(times[-1] if times else estimate_s):
            break
        times.append(timed(lambda: model(**step, return_dict=False), device))
    if not times:
        return {"status": "skipped (budget)"}
    return {"status": "ok", "warmup_s": times[0], "times_s": times[1:], "median_s": after_warmup(times),
            "peak_working_bytes": grown(device, base, peak=True)}


def measure_speca(model, inputs: dict, cache: str, repeats: int, budget: Budget, full_s: float,
                  cache_estimate: int) -> dict:
    """Drive a SpeCa session through F F S (1 + repeats times) F and time each step."""
    device = model.device
    warmup = ORDER + 1
    config = SpeCaConfig(order=ORDER, cache=cache, tau0=math.inf, tau_min=math.inf, warmup_steps=warmup,
                         max_spec=1 + repeats)
    num_steps = warmup + 1 + repeats + 1
    timesteps = torch.linspace(1000.0, 0.0, num_steps + 1)[:-1].to(device, model.dtype)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    if free is not None and cache_estimate > free:
        return {"status": "OOM", "note": f"not tried: cache estimate {cache_estimate / 1e9:.1f} GB > "
                                         f"{free / 1e9:.1f} GB free"}
    base = memory_base(device)
    session = apply_speca(model, config)
    session.begin(num_steps)
    times: list[float] = []
    try:
        for step, t in enumerate(timesteps):
            speculative = warmup <= step < num_steps - 1
            spec_times = times[warmup:]
            if not budget.allows(spec_times[-1] if speculative and spec_times else full_s):
                break
            times.append(timed(partial(model, **inputs, timestep=t.view(1), return_dict=False), device))
        if not times:
            return {"status": "skipped (budget)"}
        result = {"pattern": session.stats()[0].step_pattern, "step_times_s": times,
                  "draft_blocks": session.draft_blocks, "cache_bytes": session.cache_bytes(),
                  "cache_bytes_estimate": cache_estimate, "cache_bytes_allocated": grown(device, base),
                  "peak_working_bytes": grown(device, base, peak=True)}
    finally:
        disable_speca(model)
    by_kind = {kind: [s for c, s in zip(result["pattern"], times) if c == kind] for kind in "FS"}
    result["full_step_s"] = after_warmup(by_kind["F"])
    result["spec_step_s"] = after_warmup(by_kind["S"])
    result["status"] = "ok" if by_kind["S"] else "incomplete (budget)"
    return result


def guarded(measure: Callable[[], dict]) -> dict:
    """One measurement; a failure is recorded in the results (out-of-memory as "OOM") so the rest still run."""
    try:
        return measure()
    except torch.OutOfMemoryError:
        return {"status": "OOM"}
    except Exception as e:  # noqa: BLE001 - a one-shot device run records it and goes on
        print(f"measurement failed: {type(e).__name__}: {e}", file=sys.stderr)
        return {"status": "error", "error": f"{type(e).__name__}: {e}"}


def measure_size(model, row: dict, size: Size, text_parts: tuple[int, ...], repeats: int, budget: Budget,
                 flops_per_s: float | None, save: Callable[[], None], family: Family = FAMILIES["hunyuan_video"]
                 ) -> None:
    """Fill `row` with every measurement at one size, calling `save` after each.

    `flops_per_s` (measured at an earlier size) sizes the budget check before the first call.
    """
    device = model.device
    cfg = model.config
    latent = size.latent(cfg.in_channels, family.vae_spatial)
    video = video_tokens(cfg, *latent[1:])
    text_tokens = sum(text_parts)
    tokens = video + text_tokens
    flops_full = step_flops(cfg, tokens)
    row.update(size=str(size), latent=list(latent), video_tokens=video, text_tokens=text_tokens,
               flops_full=flops_full, full_step={}, speca={})
    inputs = make_inputs(model, size, text_parts)
    estimate_s = flops_full / flops_per_s if flops_per_s else 0.0
    full = guarded(lambda: measure_full(model, inputs, repeats, budget, estimate_s))
    release(device)
    row["full_step"] = full
    save()
    for cache in CACHES:
        if full["status"] != "ok":
            row["speca"][cache] = {"status": full["status"]}
            continue
        estimate = family.speca.estimate_cache_bytes(cfg, SpeCaConfig(order=ORDER, cache=cache), video, text_tokens,
                                                     dtype_bytes=model.dtype.itemsize)
        res = guarded(partial(measure_speca, model, inputs, cache, repeats, budget, full["median_s"], estimate))
        release(device)
        if "pattern" in res:
            res["flops_spec"] = flops_full * speculative_fraction(num_blocks(cfg), res["draft_blocks"])
            res["flops_ratio"] = res["flops_spec"] / flops_full
            res["time_ratio"] = res["spec_step_s"] / full["median_s"] if res["spec_step_s"] is not None else None
        row["speca"][cache] = res
        save()


def gb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.3f} MB"


def seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.3f} s" if s >= 1 else f"{s * 1e3:.1f} ms"


def render_table(rows: list[dict]) -> str:
    header = ("size", "tokens", "full step", "cache", "SpeCa full step", "speculative step", "time spec/full",
              "FLOPs spec/full", "pattern", "cache (session)", "cache (allocator)", "cache (estimate)")
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for row in rows:
        full = row["full_step"]
        full_cell = seconds(full.get("median_s")) if full["status"] == "ok" else full["status"]
        for cache, res in row["speca"].items():
            if "pattern" not in res:
                cells = [res["status"]] + ["-"] * 7
            else:
                ratio = res["time_ratio"]
                cells = [seconds(res["full_step_s"]), seconds(res["spec_step_s"]),
                         "-" if ratio is None else f"{ratio:.4f}", f"{res['flops_ratio']:.4f}",
                         f"`{res['pattern']}`", gb(res["cache_bytes"]), gb(res["cache_bytes_allocated"]),
                         gb(res["cache_bytes_estimate"])]
            lines.append(f"| {row['size']} | {row['video_tokens']} + {row['text_tokens']} | {full_cell} | {cache} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(results: dict) -> str:
    m = results["model"]
    blocks = (f"{m['num_layers']} double + {m['num_single_layers']} single-stream blocks"
              if m.get("num_single_layers") is not None else f"{m['num_layers']} dual-stream blocks")
    verified = "the last single-stream block" if m.get("num_single_layers") is not None else "the last block"
    notes = [f"- {row['size']} {name}: {res[key]}" for row in results["rows"]
             for name, res in [("full step", row["full_step"]), *row["speca"].items()]
             for key in ("note", "error") if key in res]
    timing = "CUDA events" if results["device_type"] == "cuda" else "wall clock"
    lines = [
        f"# bench.gpu on {results['device']} (torch {results['torch']}, diffusers {results['diffusers']})",
        "",
        f"Command: `{results['command']}`  ",
        (f"Model: {results.get('class', 'HunyuanVideoTransformer3DModel')}, {blocks}, "
         f"{m['num_attention_heads']} heads x {m['attention_head_dim']}, {m['parameters']:,} "
         f"parameters, random weights, {results['dtype']}. Batch 1, no CFG.  "),
        (f"Times: {timing}, median of up to {results['repeats']} calls after a warm-up call. SpeCa: order {ORDER}, "
         f"thresholds inf (every draft accepted), verified block = {verified}; FLOPs from "
         f"`speca/flops.py`. Elapsed {results['elapsed_s']:.0f} s of a {results['budget_s']:.0f} s budget."),
        "",
        render_table(results["rows"]),
        *([""] + notes if notes else []),
    ]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(render_markdown(results))


def main(argv: list[str] | None = None) -> dict:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaled-down", action="store_true",
                        help="a tiny 2 + 2 block config at small sizes, on CPU in float32 unless told otherwise")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="hunyuan_video",
                        help="hunyuan_video (13B, default) or hunyuan_video15 (8.3B; sizes 480x848x121,720x1280x121)")
    parser.add_argument("--sizes", help=f"comma-separated HEIGHTxWIDTHxFRAMES (default {REAL.sizes}; "
                                        f"scaled down {SCALED_DOWN.sizes})")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the warm-up, per measurement")
    parser.add_argument("--device", help=f"default {REAL.device} ({SCALED_DOWN.device} scaled down)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help=f"default {REAL.dtype} ({SCALED_DOWN.dtype} scaled down)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no measurement that would end later than this many seconds after start")
    parser.add_argument("--out", help=f"JSON results; the table goes next to it as .md (default {REAL.out}; "
                                      f"scaled down {SCALED_DOWN.out})")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    setup = SCALED_DOWN if args.scaled_down else REAL
    family = FAMILIES[args.family]
    device = torch.device(args.device or setup.device)
    dtype = DTYPES[args.dtype or setup.dtype]
    default_sizes = setup.sizes if args.scaled_down or args.family == "hunyuan_video" else family.sizes
    sizes = [Size.parse(s) for s in (args.sizes or default_sizes).split(",")]
    out = Path(args.out or (setup.out if args.family == "hunyuan_video" else
                            setup.out.replace("results/gpu", f"results/gpu_{args.family}", 1)))
    budget = Budget(args.budget_s - (time.perf_counter() - start))
    text_parts = family.tiny_text if args.scaled_down else family.text

    model = build_transformer(family.tiny if args.scaled_down else setup.model_config, device, dtype, family.cls)
    results = {
        "command": " ".join(["python -m bench.gpu", *argv]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "device_type": device.type, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "class": family.cls.__name__,
        "dtype": str(dtype).removeprefix("torch."), "scaled_down": args.scaled_down, "repeats": args.repeats,
        "budget_s": args.budget_s, "elapsed_s": 0.0,
        "model": {**{k: model.config.get(k) for k in ("num_layers", "num_single_layers", "num_attention_heads",
                                                       "attention_head_dim", "patch_size", "patch_size_t")},
                  "parameters": sum(p.numel() for p in model.parameters())},
        "rows": [],
    }

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - start
        write_results(results, out)

    flops_per_s = None
    with torch.no_grad():
        for size in sizes:
            row: dict = {}
            results["rows"].append(row)
            measure_size(model, row, size, text_parts, args.repeats, budget, flops_per_s, save, family)
            if row["full_step"]["status"] == "ok":
                flops_per_s = row["flops_full"] / row["full_step"]["median_s"]
    print(render_table(results["rows"]))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return results


if __name__ == "__main__":
    main()
