"""Generation in one process: requests in, frames and stats out; and the one-off CLI.

    python -m pipeline.generate --prompt "a red circle moving quickly left on a blue background" --output ./outputs
    torchrun --nproc-per-node 4 -m pipeline.generate --ulysses-degree 2 --ring-degree 2 --prompt ... --output ...

`Generator` is the engine (model + SpeCa + sequence parallelism) used by the CLI here and by
the Ray job's replicas. It batches samples that share shape, steps and guidance, seeds each
sample's noise with its own CPU generator (so a sample's video does not depend on its batch or
device), and times every stage for the stats record. Writing the outputs is a step of its own
(`pipeline.writer.write_sample`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from speca import SpeCaConfig, apply_speca, disable_speca

from .cli import add_model_arguments, model_config_from_args, parallel_config_from_args, speca_config_from_args
from .config import InvalidRequest, ModelConfig, SampleRequest
from .loading import LoadedModel, load_pipeline
from .parallel.config import ParallelConfig
from .parallel.vae import DecodeShare, parallel_decode
from .stats import SampleStats


@dataclass
class GeneratedSample:
    request: SampleRequest  # resolved: every field set
    frames: np.ndarray | None  # (T, H, W, 3) uint8; None on ranks > 0 of a sequence-parallel group
    stats: SampleStats


@dataclass
class DenoisedBatch:
    """A batch between `Generator.denoise` and `Generator.finish`: its latents and its stats so far."""

    indices: list[int]  # positions in the requests given
    requests: list[SampleRequest]
    latents: torch.Tensor
    fields: list[dict]  # per sample: the SampleStats fields the denoising knows (pattern, FLOPs, seconds, ...)


@dataclass(frozen=True)
class SampleOrigin:
    """Where samples are made, for their stats rows: the Ray job's replicas set it; empty elsewhere."""

    node_id: str = ""
    replica: str = ""
    attempt: int = 1


class Generator:
    """A loaded model with optional SpeCa and sequence parallelism; turns requests into frames and stats.

    It owns batching (`_batches`: equal `batch_key`, at most `batch_size`) and builds each sample's
    stats row. Under sequence parallelism every rank runs `generate` on the same requests (the
    collectives keep them in step): rank 0 encodes the prompts and broadcasts the embeddings (the
    other ranks hold no text encoder), every rank denoises its shard of the tokens and decodes its
    share of the VAE tiles, and rank 0 gathers the video; the other ranks return frames=None.
    """

    def __init__(self, model: LoadedModel, speca: SpeCaConfig | None = None, parallel=None):
        self.model = model
        self.speca = speca
        self.parallel = parallel
        self.lead = parallel is None or parallel.rank == 0
        reducers = dict(error_reduce=parallel.error_reduce, token_layout=lambda: parallel.layout) if parallel else {}
        self.session = apply_speca(model.pipe, speca, **reducers) if speca is not None else None

    @classmethod
    def load(cls, model_config: ModelConfig = ModelConfig(), speca: SpeCaConfig | None = None,
             parallel: ParallelConfig = ParallelConfig(), groups=None) -> "Generator":
        """Load the model; with a parallel config of world size > 1, shard it over the process group.

        Ranks other than 0 load no text encoders: rank 0 encodes every batch's prompts for them.
        """
        sp = None
        if parallel.world_size > 1:
            from .parallel import create_groups, enable_sequence_parallel

            groups = groups if groups is not None else create_groups(parallel)
            model = load_pipeline(model_config, text_encoders=groups.rank == 0)
            sp = enable_sequence_parallel(model.pipe, parallel, groups)
        else:
            model = load_pipeline(model_config)
        return cls(model, speca, sp)

    def close(self) -> None:
        if self.session is not None:
            disable_speca(self.model.pipe)
            self.session = None

    def prepare(self, requests: list[SampleRequest]) -> list[SampleRequest]:
        """Resolve defaults and validate every request before any model work."""
        info = self.model.info
        resolved = []
        for r in requests:
            rr = r.resolve(info.defaults)
            rr.validate(info.limits)
            resolved.append(rr)
        return resolved

    def config_record(self) -> dict:
        return {"model": asdict(self.model.config), "speca": self.speca.to_dict() if self.speca else None,
                "dtype": str(self.model.dtype).removeprefix("torch."), "device": self.model.device,
                "parallel": asdict(self.parallel.config) if self.parallel else None}

    def generate(self, requests: list[SampleRequest], batch_size: int = 8, extra_json: list[str] | None = None,
                 origin: SampleOrigin = SampleOrigin()) -> list[GeneratedSample]:
        """Generate every request; samples that can share a batch are batched up to `batch_size`.

        `extra_json[i]` (manifest columns we do not interpret) and `origin` go into the stats rows.
        """
        out: dict[int, GeneratedSample] = {}
        for batch in self._denoised(requests, batch_size, extra_json, origin):
            out.update(zip(batch.indices, self.finish(batch)))
        return [out[i] for i in range(len(out))]

    def denoise(self, requests: list[SampleRequest], batch_size: int = 8, extra_json: list[str] | None = None,
                origin: SampleOrigin = SampleOrigin()) -> list["DenoisedBatch"]:
        """The first phase of `generate` (text and denoising: the transformer's part) for every batch.

        `finish` decodes them; between the two the model is free for the next batch's denoising,
        so a single-process replica decodes batch n while batch n + 1 denoises.
        """
        return list(self._denoised(requests, batch_size, extra_json, origin))

    def _denoised(self, requests, batch_size, extra_json, origin) -> Iterator["DenoisedBatch"]:
        resolved = self.prepare(requests)
        extras = extra_json if extra_json is not None else ["{}"] * len(resolved)
        for idx in _batches(resolved, batch_size):
            yield self._denoise_batch(idx, [resolved[i] for i in idx], [extras[i] for i in idx], origin)

    def _encode_text(self, batch: list[SampleRequest]) -> dict:
        """The batch's prompt embeddings as `pipe()` keywords (the negative prompts' too, with CFG); encoded on
        rank 0, broadcast to the others."""
        pipe, defaults, family = self.model.pipe, self.model.info.defaults, self.model.info.family
        text = None
        if self.lead:
            text = family.encode(pipe, [r.prompt for r in batch], defaults, self.model.device)
            if batch[0].true_cfg_scale > 1:
                negative = family.encode(pipe, [r.negative_prompt for r in batch], defaults, self.model.device)
                text.update({f"negative_{k}": v for k, v in negative.items()})
        if self.parallel is not None and self.parallel.groups.world is not None:
            from .parallel import broadcast_tensors

            text = broadcast_tensors(text, self.parallel.groups.world, self.model.device)
        return text

    @torch.no_grad()
    def _denoise_batch(self, indices: list[int], batch: list[SampleRequest], extras: list[str],
                       origin: SampleOrigin) -> "DenoisedBatch":
        pipe, info = self.model.pipe, self.model.info
        family = info.family
        first = batch[0]
        device = self.model.device
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(device)

        t0 = time.perf_counter()
        text = self._encode_text(batch)
        cfg = "negative_prompt_embeds" in text
        if self.session is not None:  # joint CFG checks the guided prediction, so it needs the scale
            self.session.set_guidance_scale(first.true_cfg_scale if cfg else None)
        t1 = time.perf_counter()
        latents = pipe(
            **text, height=first.height, width=first.width, num_frames=first.num_frames,
            num_inference_steps=first.num_inference_steps,
            generator=[torch.Generator("cpu").manual_seed(r.seed) for r in batch],
            output_type="latent", return_dict=False, **family.call_kwargs(pipe, first, info.defaults, cfg),
        )[0]
        t2 = time.perf_counter()

        speca_stats = self.session.stats() if self.session is not None else None  # this batch's, read now
        tokens = family.video_tokens(info.transformer_config, latents.shape) + family.text_tokens(pipe, text)
        full_flops = family.step_flops(info.transformer_config, tokens) * first.num_inference_steps * (2 if cfg else 1)
        fields = []
        for i, r in enumerate(batch):
            if speca_stats is not None:
                st = speca_stats[i]
                method = dict(method="speca", step_pattern=st.step_pattern, full_steps=st.full_steps,
                              spec_accepted=st.accepted, spec_rejected=st.rejected, spec_errors=st.errors,
                              spec_thresholds=st.thresholds, flops_ratio=st.compute_ratio, cache_bytes=st.cache_bytes)
            else:
                method = dict(step_pattern="F" * r.num_inference_steps, full_steps=r.num_inference_steps)
            fields.append(dict(**method, flops=full_flops * method.get("flops_ratio", 1.0), batch_size=len(batch),
                               seconds_text=t1 - t0, seconds_denoise=t2 - t1, node_id=origin.node_id,
                               replica=origin.replica, attempt=origin.attempt, extra_json=extras[i]))
        return DenoisedBatch(indices, batch, latents, fields)

    @torch.no_grad()
    def finish(self, batch: "DenoisedBatch") -> list[GeneratedSample]:
        """The second phase: decode a denoised batch (tiles over the ranks) and build its stats rows."""
        device = self.model.device
        t0 = time.perf_counter()
        frames, share = self.decode(batch.latents)
        seconds = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated(device) if device.startswith("cuda")
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        config_json = json.dumps(self.config_record(), sort_keys=True)
        results = []
        for i, (r, fields) in enumerate(zip(batch.requests, batch.fields)):
            s = SampleStats.of(
                r, **fields, seconds_decode=seconds, peak_memory_bytes=int(peak), rank_decode_tiles=share.tiles,
                rank_seconds_decode=share.seconds, rank_peak_memory_bytes=share.peak_memory_bytes,
                model=self.model.info.model, config_json=config_json)
            s.check()
            results.append(GeneratedSample(request=r, frames=None if frames is None else frames[i], stats=s))
        return results

    def decode(self, latents: torch.Tensor) -> tuple[np.ndarray | None, DecodeShare]:
        """Latents -> uint8 frames (B, T, H, W, 3) on rank 0 (None elsewhere), tiles spread over the ranks."""
        pipe = self.model.pipe
        z = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor
        video, share = parallel_decode(pipe.vae, z, self.parallel.groups.world if self.parallel else None)
        if video is None:
            return None, share
        video = (video.float().clamp(-1, 1) + 1) * 127.5
        return video.round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy(), share


def _batches(requests: list[SampleRequest], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped by batch key, in first-seen order, at most `batch_size` per batch."""
    if batch_size < 1:
        raise InvalidRequest("batch_size", batch_size, "must be >= 1")
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(r.batch_key(), []).append(i)
    for idx in groups.values():
        for start in range(0, len(idx), batch_size):
            yield idx[start:start + batch_size]


def main(argv: list[str] | None = None) -> int:
    from .storage import Storage
    from .video_io import VideoEncoding
    from .writer import write_sample

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.generate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several videos)")
    parser.add_argument("--output", required=True, help="output folder or fsspec URL (file://, s3://, memory://)")
    parser.add_argument("--seed", type=int, action="append", help="seed per prompt (repeat; default 0, 1, 2, ...)")
    for name in ("height", "width", "num-frames", "num-inference-steps"):
        parser.add_argument(f"--{name}", type=int, help="default: the model's")
    parser.add_argument("--guidance-scale", type=float, help="embedded guidance (default: the model's)")
    parser.add_argument("--true-cfg-scale", type=float, help="true CFG scale, > 1 turns it on (default: the model's)")
    parser.add_argument("--negative-prompt", help="negative prompt for true CFG (default: the model's)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples denoised together")
    parser.add_argument("--fps", type=int, help="MP4 frame rate (default: the model's)")
    parser.add_argument("--crf", type=int, default=VideoEncoding.crf, help="x264 quality, 0 = lossless")
    add_model_arguments(parser)
    args = parser.parse_args(argv)

    seeds = args.seed or list(range(len(args.prompt)))
    if len(seeds) != len(args.prompt):
        parser.error(f"--seed given {len(seeds)} times for {len(args.prompt)} prompts")
    try:
        requests = [SampleRequest(prompt=p, seed=s, height=args.height, width=args.width, num_frames=args.num_frames,
                                  num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                                  true_cfg_scale=args.true_cfg_scale, negative_prompt=args.negative_prompt)
                    for p, s in zip(args.prompt, seeds)]
        model_config = model_config_from_args(args)
        speca = speca_config_from_args(args)
        parallel = parallel_config_from_args(args)
        if parallel.world_size > 1:  # under torchrun: one process per rank
            from .parallel import init_from_env

            device = init_from_env()
            parallel.check_world(int(os.environ["WORLD_SIZE"]))
            if model_config.device == "auto":
                model_config = replace(model_config, device=str(device))
        storage = Storage(args.output)
        storage.check()
        gen = Generator.load(model_config, speca, parallel)
        requests = gen.prepare(requests)
        encoding = VideoEncoding(fps=args.fps or gen.model.info.defaults.fps, crf=args.crf)
    except (InvalidRequest, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not gen.lead:  # a sequence-parallel rank > 0: denoise and decode in step with rank 0, write nothing
        gen.generate(requests, batch_size=args.batch_size)
        return 0
    print(f"generating {len(requests)} video(s) with {gen.model.info.model} on {gen.model.device} "
          f"(SpeCa: {args.speca}, ranks: {parallel.world_size})", file=sys.stderr)
    for sample in gen.generate(requests, batch_size=args.batch_size):
        stats = write_sample(storage, sample, encoding)
        print(f"{stats.video}  steps {stats.step_pattern}  FLOPs x{1 / stats.flops_ratio:.2f} less  "
              f"denoise {stats.seconds_denoise:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
