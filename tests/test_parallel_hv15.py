"""Sequence parallelism (Ulysses 2, ring 2) on the tiny HunyuanVideo 1.5, gloo on 127.0.0.1, against one process.

One `spawn_local` launch of 2 ranks runs every scenario under both layouts; the single-process
results come from this process. The tiny 1.5 transformer has 2 heads and 2 dual-stream blocks; 24 x
40 x 9 frames is 180 video tokens; the two prompts pad their 12 Qwen and 16 ByT5 tokens differently
(one has quoted text, the other none), and the model puts each sample's valid text tokens first.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hv15_tiny
from speca import SpeCaConfig

PROMPTS = ['the sign says "OPEN" on a blue background', "a red circle"]
STEPS = 6
INF = math.inf
# The default preset's checks (the last block's and the first block's on the real latent, each on a token
# subset: one draw over the whole clip, each rank running its shard's part), every draft accepted...
SUBSET_INF = SpeCaConfig(cache="lean", warmup_steps=2, max_spec=3, tau0=INF, tau_min=INF, verify_tokens=0.125,
                         verify_first=True)
MODULE_INF = SpeCaConfig(cache="module", warmup_steps=2, max_spec=3, tau0=INF, tau_min=INF)
# ... and at a threshold calibrated at run time between the two samples' first draft errors, so they decide apart.
SCENARIOS = ["plain", "subset_tau", "module_tau"]
PRELOAD = ["pipeline.loading", "diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5",
           "diffusers.models.transformers.transformer_hunyuan_video15",
           "diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15",
           "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl", "transformers.models.t5.modeling_t5"]
TILE = dict(tile_sample_min_height=16, tile_sample_min_width=16, tile_latent_min_height=4, tile_latent_min_width=4)


def speca_config(name: str, taus: dict) -> SpeCaConfig | None:
    base = {"subset": SUBSET_INF, "module": MODULE_INF}.get(name.split("_")[0])
    if base is None:
        return None
    return base if name.endswith("_inf") else base.replace(tau0=taus[name], tau_min=taus[name], beta=1.0)


def run_scenario(pipe, name: str, taus: dict, sp=None) -> dict:
    """Latents (CFG through the guider), step patterns and errors of one scenario (sp: this rank's)."""
    from speca import apply_speca, disable_speca

    config = speca_config(name, taus)
    session = None
    if config is not None:
        reducers = dict(error_reduce=sp.error_reduce, token_layout=lambda: sp.layout) if sp is not None else {}
        session = apply_speca(pipe, config, **reducers)
    try:
        pipe.guider = pipe.guider.new(guidance_scale=6.0, enabled=True)
        out = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(i) for i in range(2)],
                   height=hv15_tiny.HEIGHT, width=hv15_tiny.WIDTH, num_frames=9, num_inference_steps=STEPS,
                   output_type="latent").frames
        stats = session.stats() if session is not None else []
        return {"latents": out, "patterns": [s.step_pattern for s in stats], "errors": [s.errors for s in stats]}
    finally:
        if session is not None:
            disable_speca(pipe)


def _decode(pipe, latents, group=None):
    from pipeline.parallel.vae import parallel_decode

    pipe.vae.enable_tiling(**TILE)
    try:
        return parallel_decode(pipe.vae, latents, group)
    finally:
        pipe.vae.disable_tiling()


def _worker(rank: int, world: int, model_dir: str, taus: dict) -> dict:
    import torch.distributed as dist

    from pipeline.config import ModelConfig
    from pipeline.loading import load_pipeline
    from pipeline.parallel import ParallelConfig, disable_sequence_parallel, enable_sequence_parallel

    pipe = load_pipeline(ModelConfig(model=model_dir, device="cpu")).pipe
    results = {"runs": {}}
    for u, r in ((2, 1), (1, 2)):
        sp = enable_sequence_parallel(pipe, ParallelConfig(ulysses_degree=u, ring_degree=r))
        for name in SCENARIOS:
            results["runs"][(u, r, name)] = run_scenario(pipe, name, taus, sp)
        disable_sequence_parallel(pipe)
    video, share = _decode(pipe, results["runs"][(2, 1, "plain")]["latents"], dist.group.WORLD)
    results["video"], results["tiles"] = video, share.tiles
    results["hooks_left"] = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in pipe.transformer.modules())
    results["engine"] = _engine(ModelConfig(model=model_dir, device="cpu"), ParallelConfig(ulysses_degree=2))
    return results


def _engine(model_config, parallel=None, model=None) -> dict:
    """The batch job's engine with the default SpeCa preset: frames (rank 0), step patterns, whether it holds a
    text encoder (under sequence parallelism only rank 0 does, and broadcasts the prompts' embeddings)."""
    from pipeline.config import SampleRequest
    from pipeline.generate import Generator

    speca = SpeCaConfig.from_name("default")
    gen = Generator(model, speca) if parallel is None else Generator.load(model_config, speca, parallel)
    try:
        samples = gen.generate([SampleRequest(prompt=p, seed=i) for i, p in enumerate(PROMPTS)], batch_size=2)
    finally:
        gen.close()
    return {"frames": [s.frames for s in samples], "patterns": [s.stats.step_pattern for s in samples],
            "text_encoder": gen.model.pipe.text_encoder is not None}


@pytest.fixture(scope="module")
def taus(hv15_model) -> dict:
    out = {}
    for name in ("subset_tau", "module_tau"):
        first = [errors[0] for errors in run_scenario(hv15_model.pipe, name.replace("_tau", "_inf"), {})["errors"]]
        assert abs(first[0] - first[1]) > 1e-3 * max(first), (name, first)  # far apart next to rank-to-rank noise
        out[name] = (first[0] + first[1]) / 2
    return out


@pytest.fixture(scope="module")
def ranks(hv15_model_dir, taus) -> list[dict]:
    from pipeline.parallel import spawn_local

    return spawn_local(_worker, 2, 2, str(hv15_model_dir), taus, timeout=400, preload=PRELOAD)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_ulysses_and_ring_match_one_process(hv15_model, taus, ranks):
    """Every scenario on both layouts: the ranks' latents are identical and within 1e-5 (relative to the
    latents' scale) of one process; SpeCa's step patterns equal one process's and its errors agree to 1e-4."""
    mask = hv15_model.pipe.encode_prompt(prompt=PROMPTS, device="cpu", batch_size=2)[1]
    assert mask.sum(1).tolist()[0] != mask.sum(1).tolist()[1] and not mask.all()  # padded, of different lengths
    reference = {name: run_scenario(hv15_model.pipe, name, taus) for name in SCENARIOS}
    for name in ("subset_tau", "module_tau"):  # the calibrated thresholds split the samples at their first draft
        assert sorted(p[2] for p in reference[name]["patterns"]) == ["R", "S"], reference[name]["patterns"]
    assert set(ranks[0]["runs"]) == {(u, r, n) for u, r in ((2, 1), (1, 2)) for n in SCENARIOS}
    for key, res in ranks[0]["runs"].items():
        ref = reference[key[2]]
        assert torch.equal(ranks[1]["runs"][key]["latents"], res["latents"]), f"{key}: ranks disagree"
        assert ranks[1]["runs"][key]["patterns"] == res["patterns"], f"{key}: ranks decided differently"
        assert _rel(res["latents"], ref["latents"]) <= 1e-5, (key, _rel(res["latents"], ref["latents"]))
        assert res["patterns"] == ref["patterns"], key
        for errs, ref_errs in zip(res["errors"], ref["errors"]):
            assert errs == pytest.approx(ref_errs, rel=1e-4), key


def test_tile_parallel_decode_matches_one_process(hv15_model, ranks):
    """The 1.5 VAE's tiles spread over 2 ranks and gathered on rank 0 equal one process's tiled decode."""
    latents = ranks[0]["runs"][(2, 1, "plain")]["latents"]
    video, share = _decode(hv15_model.pipe, latents)
    assert ranks[1]["video"] is None and ranks[0]["tiles"] == [4, 4] and share.tiles == [8]
    assert _rel(ranks[0]["video"], video) <= 1e-5
    assert all(r["hooks_left"] == 0 for r in ranks)


def test_engine_ranks_share_rank_0s_prompts_and_match_one_process(hv15_model, ranks):
    """Generator over 2 ranks (Ulysses) with the default SpeCa preset: rank 1 loads no text encoder and gets
    rank 0's embeddings; the frames equal one process's within 1 grey level, the step patterns exactly."""
    alone = _engine(None, model=hv15_model)
    lead, other = ranks[0]["engine"], ranks[1]["engine"]
    assert (lead["text_encoder"], other["text_encoder"]) == (True, False)
    assert other["frames"] == [None, None] and lead["patterns"] == other["patterns"] == alone["patterns"]
    for mine, theirs in zip(lead["frames"], alone["frames"]):
        assert mine.shape == (9, hv15_tiny.HEIGHT, hv15_tiny.WIDTH, 3)
        assert np.abs(mine.astype(int) - theirs.astype(int)).max() <= 1
