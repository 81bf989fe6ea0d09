"""Sequence parallelism (Ulysses, ring, both) on the bundled tiny HunyuanVideo, gloo on 127.0.0.1.

Each world size is one `spawn_local` launch whose ranks run every scenario under every
layout and return their results; the single-process results come from this process. The
tiny transformer has 6 heads, 4 double + 8 single blocks; 32x32x17 is 320 video tokens,
prompts are padded to 16 text tokens (the two prompts have different lengths).
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import InvalidRequest
from pipeline.parallel import ParallelConfig, ShardLayout, create_groups, spawn_local
from pipeline.parallel.comm import transformer_comm_bytes
from speca import SpeCaConfig

PROMPTS = ["a red circle moving quickly left on a blue background", "a square"]  # 11 and 3 tokens
TEMPLATE = {"template": "{}", "crop_start": 0}
STEPS = 8
INF = math.inf
# Each accepts some steps. The finite thresholds are calibrated at run time (fixture `taus`): the
# midpoint of the two samples' first draft errors under the matching every-draft-accepted config, so
# decisions depend on the error and differ between the samples whatever the model's weights.
BASE = {
    "lean_inf": SpeCaConfig(cache="lean", warmup_steps=2, max_spec=3, tau0=INF, tau_min=INF),
    "module_inf": SpeCaConfig(cache="module", warmup_steps=2, max_spec=3, tau0=INF, tau_min=INF),
    # The default preset's checks: the last block's and the first block's on the real latent, on a token subset
    # (one draw over the whole clip, each rank running its shard's part), the first one's late scale, the late draft
    # shrink, and its draft gate's lookback (summed over the ranks; a gate this high never closes, so the thresholds
    # calibrated on it decide).
    "subset_inf": SpeCaConfig(cache="lean", warmup_steps=2, max_spec=3, tau0=INF, tau_min=INF, verify_tokens=0.25,
                              verify_first=True, verify_first_scale=1.5, verify_first_scale_from=0.5, draft_gate=1e9,
                              draft_shrink=0.5, draft_shrink_from=0.5),
}
CALIBRATED_FROM = {"lean_tau": "lean_inf", "module_tau": "module_inf", "cfg_lean_tau": "cfg_lean_inf",
                   "odd_module_tau": "odd_module_inf", "subset_tau": "subset_inf", "cfg_joint_tau": "cfg_joint_inf"}
CALIBRATION = {"cfg_lean_inf": BASE["lean_inf"], "odd_module_inf": BASE["module_inf"],  # main process only
               # Both CFG branches in one pass, checked on the guided prediction over a token subset.
               "cfg_joint_inf": BASE["subset_inf"].replace(cfg_branches="guided", signal="prediction",
                                                           verify_first_scale=1.0)}
SPECA = [*BASE, *CALIBRATED_FROM]


def speca_config(name: str, taus: dict) -> SpeCaConfig:
    if name in CALIBRATED_FROM:
        base = {**BASE, **CALIBRATION}[CALIBRATED_FROM[name]]
        return base.replace(tau0=taus[name], tau_min=taus[name], beta=1.0)  # one threshold at every step
    return {**BASE, **CALIBRATION}[name]


ALL = ["plain", *SPECA, "odd", "five"]
# Ulysses degrees divide the 6 heads; 3 ranks: 320 tokens padded.
LAYOUTS = {2: [(2, 1), (1, 2)], 3: [(3, 1), (1, 3)], 4: [(2, 2), (1, 4)]}
FULL_SCENARIOS = {(2, 1), (1, 2), (2, 2)}  # the others run a subset, to keep the file fast
SUBSET = ["plain", "module_tau", "cfg_lean_tau", "subset_tau", "cfg_joint_tau", "odd", "five"]  # padded on 3 ranks
# Imported once by the launcher's forkserver, so each launch skips seconds of imports per rank.
PRELOAD = ["pipeline.loading", "diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video",
           "diffusers.models.transformers.transformer_hunyuan_video",
           "diffusers.models.autoencoders.autoencoder_kl_hunyuan_video",
           "transformers.models.llama.modeling_llama", "transformers.models.clip.modeling_clip"]
# Direct transformer loops on (frames, height, width) latents of token counts 2 and 4 do not divide.
# (2 x 2 patches: 5 x 3 x 3 and 5 x 1 x 1 tokens).
ODD_LATENT = {"odd": (5, 6, 6), "odd_module_tau": (5, 6, 6), "odd_module_inf": (5, 6, 6),
              "five": (5, 2, 2)}  # 45 and 5 tokens


def run_scenario(pipe, name: str, taus: dict, sp=None) -> dict:
    """Latents, SpeCa step patterns and cache bytes of one scenario (sp: this rank's SequenceParallel)."""
    from speca import apply_speca, disable_speca

    session = None
    if name in SPECA or name in CALIBRATION:
        reducers = dict(error_reduce=sp.error_reduce, token_layout=lambda: sp.layout) if sp is not None else {}
        target = pipe.transformer if name in ODD_LATENT else pipe
        session = apply_speca(target, speca_config(name, taus), **reducers)
        session.set_guidance_scale(4.0 if name.startswith("cfg") else None)
    try:
        if name in ODD_LATENT:
            if session is not None:
                session.begin(STEPS)
            out = _euler(pipe, ODD_LATENT[name])
        else:
            extra = dict(negative_prompt="", true_cfg_scale=4.0) if name.startswith("cfg") else {}
            out = pipe(prompt=PROMPTS, generator=[torch.Generator().manual_seed(i) for i in range(2)], height=32,
                       width=32, num_frames=17, num_inference_steps=STEPS, prompt_template=TEMPLATE,
                       max_sequence_length=16, output_type="latent", **extra).frames
        stats = session.stats() if session is not None else []
        return {"latents": out, "patterns": [s.step_pattern for s in stats], "errors": [s.errors for s in stats],
                "cache_bytes": stats[0].cache_bytes if stats else 0}
    finally:
        if session is not None:
            disable_speca(pipe.transformer)


@torch.no_grad()
def _euler(pipe, latent: tuple[int, int, int]) -> torch.Tensor:
    """A plain Euler flow loop calling the transformer directly (any latent size)."""
    embeds, pooled, mask = pipe.encode_prompt(prompt=PROMPTS, prompt_template=TEMPLATE, max_sequence_length=16,
                                              device="cpu")
    x = torch.randn((2, 16, *latent), generator=torch.Generator().manual_seed(0))
    for i in range(STEPS):
        t = 1.0 - i / STEPS
        v = pipe.transformer(hidden_states=x, timestep=torch.full((2,), t * 1000), encoder_hidden_states=embeds,
                             encoder_attention_mask=mask, pooled_projections=pooled, return_dict=False)[0]
        x = x - v / STEPS
    return x


def _worker(rank: int, world: int, taus: dict) -> dict:
    """One rank: every layout of this world size, every scenario; plus comm counts and error checks."""
    from pipeline.config import ModelConfig
    from pipeline.loading import load_pipeline
    from pipeline.parallel import count_comm, disable_sequence_parallel, enable_sequence_parallel

    pipe = load_pipeline(ModelConfig(device="cpu")).pipe
    results: dict = {"runs": {}, "comm": {}, "errors": {}}
    before = run_scenario(pipe, "plain", taus)
    processors = [b.attn.processor for b in [*pipe.transformer.transformer_blocks,
                                             *pipe.transformer.single_transformer_blocks]]
    for u, r in LAYOUTS[world]:
        sp = enable_sequence_parallel(pipe, ParallelConfig(ulysses_degree=u, ring_degree=r))
        for name in (ALL if (u, r) in FULL_SCENARIOS else SUBSET):
            if name == "plain":
                with count_comm() as counter:
                    res = run_scenario(pipe, name, taus, sp)
                results["comm"][(u, r)] = (dict(counter.sent), dict(counter.calls))
            else:
                res = run_scenario(pipe, name, taus, sp)
            results["runs"][(u, r, name)] = res
        disable_sequence_parallel(pipe)
    after = run_scenario(pipe, "plain", taus)
    results["restored"] = torch.equal(before["latents"], after["latents"]) and all(
        b.attn.processor is p for b, p in zip([*pipe.transformer.transformer_blocks,
                                              *pipe.transformer.single_transformer_blocks], processors))
    results["hooks_left"] = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in pipe.transformer.modules())
    for label, cfg in (("product", ParallelConfig(ring_degree=2 * world)),
                      ("heads", ParallelConfig(ulysses_degree=4))):  # does not divide 6 heads
        try:
            enable_sequence_parallel(pipe, cfg)
            results["errors"][label] = None
        except ValueError as e:
            results["errors"][label] = str(e)
    return results


@pytest.fixture(scope="module")
def taus(tiny_model) -> dict:
    """Each finite threshold: the midpoint of the two samples' first draft errors when every draft is accepted."""
    out = {}
    for name, source in CALIBRATED_FROM.items():
        first = [errors[0] for errors in run_scenario(tiny_model.pipe, source, {})["errors"]]
        # Far apart next to rank-to-rank noise (errors agree to 1e-4 relative), so no rank can decide otherwise.
        assert abs(first[0] - first[1]) > 1e-3 * max(first), (name, first)
        out[name] = (first[0] + first[1]) / 2
    return out


@pytest.fixture(scope="module")
def reference(tiny_model, taus) -> dict:
    return {name: run_scenario(tiny_model.pipe, name, taus) for name in ALL}


@pytest.fixture(scope="module", params=[2, 3, 4], ids=["world2", "world3", "world4"])
def world(request, taus) -> tuple[int, list[dict]]:
    return request.param, spawn_local(_worker, request.param, request.param, taus, timeout=400, preload=PRELOAD)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_matches_single_process(world, reference):
    n, ranks = world
    checked = 0
    for key, res in ranks[0]["runs"].items():
        name = key[2]
        ref = reference[name]
        for rank in ranks:
            other = rank["runs"][key]
            assert torch.equal(other["latents"], res["latents"]), f"{key}: ranks disagree"
            assert other["patterns"] == res["patterns"], f"{key}: step patterns differ between ranks"
        assert _rel(res["latents"], ref["latents"]) <= 1e-5, f"{key}: {_rel(res['latents'], ref['latents'])}"
        assert res["patterns"] == ref["patterns"], f"{key}: {res['patterns']} vs {ref['patterns']}"
        for errs, ref_errs in zip(res["errors"], ref["errors"]):  # SpeCa's errors are global, padding excluded
            assert errs == pytest.approx(ref_errs, rel=1e-4), key
        checked += 1
    assert checked == sum(len(ALL if lay in FULL_SCENARIOS else SUBSET) for lay in LAYOUTS[n])


def test_speca_scenarios_speculate(reference):
    """The SpeCa configs accept steps, and at the calibrated thresholds the two samples decide differently at
    their first draft: one accepts, one is rolled back (decisions depend on the error; passes are sub-batched)."""
    for name in SPECA:
        patterns = reference[name]["patterns"]
        assert len(patterns) == 2 and all(len(p) == STEPS and "S" in p for p in patterns), (name, patterns)
        if name in CALIBRATED_FROM:
            assert sorted(p[2] for p in patterns) == ["R", "S"], (name, patterns)


def test_padding_token_counts(world, reference):
    """Video token counts the degree does not divide: 45 and 5 on 2 and 4 ranks (5 on 4: one rank holds
    only padding), 320 and 5 on 3 ranks (where every pipeline scenario is padded)."""
    n, ranks = world
    for u, r in LAYOUTS[n]:
        for name in ("odd", "five"):
            res = ranks[0]["runs"][(u, r, name)]
            assert res["latents"].shape == reference[name]["latents"].shape
            assert _rel(res["latents"], reference[name]["latents"]) <= 1e-5


def test_cache_bytes_shrink_with_degree(world, reference):
    n, ranks = world
    checked = 0
    for (u, r, name), res in ranks[0]["runs"].items():
        if name in SPECA and name not in ODD_LATENT:
            single, local = reference[name]["cache_bytes"], res["cache_bytes"]
            if {**BASE, **CALIBRATION}[CALIBRATED_FROM.get(name, name)].draft_gate < INF:
                # The draft gate's prediction is the gathered output, whole on every rank: less than n.
                assert 1 < single / local < n, ((u, r, name), single, local)
                continue
            # Video shards shrink by n; the replicated 16 text tokens do not.
            assert 0.8 * n <= single / local <= n, ((u, r, name), single, local)
            checked += 1
    assert checked >= 2


def test_comm_count_equals_formula(world, tiny_model):
    n, ranks = world
    cfg = tiny_model.pipe.transformer.config
    for u, r in LAYOUTS[n]:
        expected = transformer_comm_bytes(cfg, video_tokens=320, text_tokens=16, ulysses_degree=u, ring_degree=r,
                                          dtype_bytes=4, batch=2)
        for rank in ranks:
            sent, _calls = rank["comm"][(u, r)]
            assert sent.get("all_to_all_single", 0) == STEPS * expected.all_to_all
            assert sent.get("isend", 0) == STEPS * expected.ring
            assert sent.get("all_gather", 0) == STEPS * (expected.text_gather + expected.output_gather)
            assert sum(sent.values()) == STEPS * expected.total > 0
            assert "all_reduce" not in sent  # no SpeCa in this run


def test_disable_restores_the_model(world):
    _, ranks = world
    for rank in ranks:
        assert rank["restored"]
        assert rank["hooks_left"] == 0


def test_bad_degrees_name_the_field(world, tiny_model):
    n, ranks = world
    for rank in ranks:
        assert "ulysses_degree * ring_degree" in rank["errors"]["product"]
        assert f"world size ({n})" in rank["errors"]["product"]
        heads = tiny_model.pipe.transformer.config.num_attention_heads
        assert "ulysses_degree" in rank["errors"]["heads"] and f"head count ({heads})" in rank["errors"]["heads"]


def test_shard_layout():
    layout = [ShardLayout(45, 4, r) for r in range(4)]
    assert [(x.local, x.start, x.valid) for x in layout] == [(12, 0, 12), (12, 12, 12), (12, 24, 12), (12, 36, 9)]
    x = torch.arange(45.0).reshape(1, 45, 1)
    parts = [x_.shard(x, 1) for x_ in layout]
    assert all(p.shape == (1, 12, 1) for p in parts)
    assert torch.equal(torch.cat(parts, 1)[:, :45], x) and not parts[3][:, 9:].any()
    assert [ShardLayout(5, 4, r).valid for r in range(4)] == [2, 2, 1, 0]


def test_config_validation():
    assert ParallelConfig(2, 3).world_size == 6
    for bad in (dict(ulysses_degree=0), dict(ring_degree=-1), dict(ulysses_degree=1.5), dict(ring_degree=True)):
        field = next(iter(bad))
        with pytest.raises(InvalidRequest, match=field) as info:
            ParallelConfig(**bad)
        assert info.value.field == field
    ParallelConfig(ulysses_degree=4).check(24)
    with pytest.raises(ValueError, match="ulysses_degree=3 is invalid: must divide the attention head count"):
        ParallelConfig(ulysses_degree=3).check(4)
    with pytest.raises(ValueError, match=r"ulysses_degree \* ring_degree"):
        create_groups(ParallelConfig(ring_degree=2))  # no process group here: only degree 1 works
    assert create_groups(ParallelConfig()).world is None


def test_init_from_env_single_rank(monkeypatch):
    from pipeline.parallel import destroy, free_port, init_from_env

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT"):
        init_from_env()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert init_from_env() == torch.device("cpu")
    try:
        assert torch.distributed.get_world_size() == 1
        groups = create_groups(ParallelConfig())
        assert groups.world is None and groups.ring_ranks == (0,)
    finally:
        destroy()
    assert not torch.distributed.is_initialized()
