"""bench.cache_dit_peer on the bundled model: FLOPs counting, no state across generations, exact disable.

Needs the `bench` extra (`pip install -e .[bench]`, cache-dit 1.5.3). The CI test command installs only
`.[test]`, so there this module is skipped.
"""

from __future__ import annotations

import contextlib
import os
import types

import numpy as np
import pytest

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # before cache_dit is first imported
cache_dit = pytest.importorskip("cache_dit")

from bench import caching  # noqa: E402
from bench.flop_count import count_block_flops  # noqa: E402
from bench.cache_dit_peer import BLOCK_LISTS, CacheDitSetting, cache_bytes, cached_calls, disable  # noqa: E402
from pipeline.generate import Generator  # noqa: E402
from pipeline.tiny.worlds import world_of  # noqa: E402

STEPS = 10
CACHING = CacheDitSetting("cache-dit DBCache F1B0 t=0.2", "cachedit-test", Fn=1, Bn=0, threshold=0.2, warmup=2)


@pytest.fixture(scope="module")
def requests(tiny_model):
    w = world_of(tiny_model.info.path)
    return caching.calibration_requests(w, 2, STEPS, {s.prompt for s in w.eval_set(8)})


@pytest.fixture
def pipe(tiny_model):
    """The bundled pipeline, handed back to the rest of the suite as it came even if a test fails midway."""
    transformer = tiny_model.pipe.transformer
    order = list(transformer._modules)
    yield tiny_model.pipe
    disable(tiny_model.pipe)  # also drops what a bare cache_dit.disable_cache left
    children = dict(transformer._modules)
    transformer._modules.clear()
    transformer._modules.update((name, children[name]) for name in order)


def generate(model, requests, batch_size: int = 8) -> list:
    gen = Generator(model)
    try:
        return gen.generate(requests, batch_size=batch_size)
    finally:
        gen.close()


def frames(samples) -> list[np.ndarray]:
    return [s.frames for s in samples]


def block_calls(transformer):
    """Calls of every block of each list, counted with our own forward pre-hooks."""
    counts = dict.fromkeys(BLOCK_LISTS, 0)
    handles = []
    for name in BLOCK_LISTS:
        for block in getattr(transformer, name):
            def hook(module, args, name=name):
                counts[name] += 1
            handles.append(block.register_forward_pre_hook(hook))
    return counts, handles


def counted(model, requests):
    """One generation: FLOPs of all blocks and of each block list (count_block_flops on that list alone),
    and the block calls our own hooks saw."""
    transformer = model.pipe.transformer
    counts, handles = block_calls(transformer)
    try:
        with contextlib.ExitStack() as stack:
            total = stack.enter_context(count_block_flops(transformer))
            per_list = {name: stack.enter_context(count_block_flops(types.SimpleNamespace(
                transformer_blocks=getattr(transformer, name), single_transformer_blocks=[])))
                for name in BLOCK_LISTS}
            samples = generate(model, requests)
    finally:
        for h in handles:
            h.remove()
    return samples, total["flops"], {name: c["flops"] for name, c in per_list.items()}, counts


def test_block_flops_follow_the_blocks_cache_dit_skips(tiny_model, pipe, requests):
    ref, ref_total, ref_lists, ref_calls = counted(tiny_model, requests)
    assert ref_total == pytest.approx(sum(ref_lists.values()), rel=1e-12)
    calls = 2 * STEPS  # true CFG: cond and uncond call per step, both prompts in one batch
    assert ref_calls == {name: calls * len(getattr(pipe.transformer, name)) for name in BLOCK_LISTS}

    never = CacheDitSetting("cache-dit t=0", "cachedit-never", threshold=0.0, warmup=0)
    never.enable(pipe, STEPS)
    try:
        same, never_total, _, never_calls = counted(tiny_model, requests)
        assert {name: c for name, (c, _) in cached_calls(pipe).items()} == dict.fromkeys(BLOCK_LISTS, 0)
    finally:
        never.disable(pipe)
    assert never_total == ref_total and never_calls == ref_calls
    assert all(np.array_equal(a, b) for a, b in zip(frames(same), frames(ref)))

    CACHING.enable(pipe, STEPS)
    try:
        _, total, _, block_counts = counted(tiny_model, requests)
        reported = cached_calls(pipe)
    finally:
        CACHING.disable(pipe)
    expected_flops = 0.0
    for name in BLOCK_LISTS:
        n = len(getattr(pipe.transformer, name))
        cached, executed = reported[name]
        assert executed == calls and 0 < cached < calls
        skipped = cached * (n - CACHING.Fn - CACHING.Bn)  # blocks a cached call leaves out, per cache-dit's stats
        assert block_counts[name] == calls * n - skipped  # what our hooks saw run
        expected_flops += ref_lists[name] * (1 - skipped / (calls * n))  # every block of a list costs the same
    assert total == pytest.approx(expected_flops, rel=1e-9)
    assert total < 0.9 * ref_total


def test_cache_state_does_not_leak_across_generations(tiny_model, pipe, requests):
    uncached = generate(tiny_model, requests)
    CACHING.enable(pipe, STEPS)
    try:
        first = generate(tiny_model, requests)
        first_calls = cached_calls(pipe)
        second = generate(tiny_model, requests)
        second_calls = cached_calls(pipe)
    finally:
        CACHING.disable(pipe)
    assert all(c > 0 for c, _ in first_calls.values())
    assert not any(np.array_equal(a, b) for a, b in zip(frames(first), frames(uncached)))  # it did cache
    assert second_calls == first_calls
    assert all(np.array_equal(a, b) for a, b in zip(frames(second), frames(first)))


def snapshot(pipe) -> dict:
    """What an exact restore must give back: the transformer's and block lists' attributes (by identity),
    its children's order, the pipeline class's __call__."""
    transformer = pipe.transformer
    return {"transformer": dict(vars(transformer)), "children": list(transformer._modules),
            **{name: dict(vars(getattr(transformer, name))) for name in BLOCK_LISTS}, "call": type(pipe).__call__}


def same_state(a: dict, b: dict) -> bool:
    return (a["children"] == b["children"] and a["call"] is b["call"]
            and all(a[k].keys() == b[k].keys() and all(a[k][x] is b[k][x] for x in a[k])
                    for k in ("transformer", *BLOCK_LISTS)))


def test_disable_restores_the_pipeline_exactly(tiny_model, pipe, requests):
    before = generate(tiny_model, requests)
    state = snapshot(pipe)
    setting = CacheDitSetting("cache-dit TaylorSeer", "cachedit-ts", threshold=0.2, warmup=4, taylorseer_order=1)
    setting.enable(pipe, STEPS)
    try:
        generate(tiny_model, requests)
        assert type(pipe).__call__ is not state["call"] and cache_bytes(pipe) > 0
    finally:
        setting.disable(pipe)
    assert same_state(snapshot(pipe), state)
    assert cache_bytes(pipe) == 0
    after = generate(tiny_model, requests)
    assert all(np.array_equal(a, b) for a, b in zip(frames(after), frames(before)))


def test_cache_dit_disable_leaves_state_that_ours_removes(tiny_model, pipe, requests):
    """cache-dit 1.5.3's own disable: children reordered, a bound forward on the instance, stats on the lists."""
    transformer = pipe.transformer
    generate(tiny_model, requests[:1])  # the pipeline's own first-call attributes (hook registry) are in place
    state = snapshot(pipe)
    CACHING.enable(pipe, STEPS)
    generate(tiny_model, requests[:1])
    cache_dit.disable_cache(pipe)
    leftover = snapshot(pipe)
    assert leftover["children"][-2:] == ["single_transformer_blocks", "transformer_blocks"]  # the bug, as shipped
    assert state["children"] != leftover["children"]
    assert vars(transformer)["forward"].__func__ is type(transformer).forward
    assert all("_cached_steps" in leftover[name] for name in BLOCK_LISTS)
    children = dict(transformer._modules)  # the order put back by hand, then the same run through ours
    transformer._modules.clear()
    transformer._modules.update((name, children[name]) for name in state["children"])
    CACHING.enable(pipe, STEPS)
    generate(tiny_model, requests[:1])
    CACHING.disable(pipe)
    assert same_state(snapshot(pipe), state)  # the fix


def test_diffusers_first_block_cache_runs_the_same_after_cache_dit(tiny_model, pipe, requests):
    from diffusers import FirstBlockCacheConfig

    def first_block_cache():
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
        try:
            return generate(tiny_model, requests)
        finally:
            pipe.transformer.disable_cache()

    before = first_block_cache()
    CACHING.enable(pipe, STEPS)
    try:
        generate(tiny_model, requests)
    finally:
        CACHING.disable(pipe)
    after = first_block_cache()
    assert all(np.array_equal(a, b) for a, b in zip(frames(after), frames(before)))


def test_cache_bytes_are_the_residual_buffers(tiny_model, pipe, requests):
    """Plain DBCache keeps per block list and CFG branch: the Fn residual and the Bn residual of the video
    tokens, the Bn residual of the text tokens (all (batch, tokens, hidden) float32)."""
    CACHING.enable(pipe, STEPS)
    try:
        assert cache_bytes(pipe) == 0  # contexts are made by the first pipe call
        gen = Generator(tiny_model)
        shapes = {}

        def record(module, args, out) -> None:
            shapes.setdefault("io", (out[0].shape, out[1].shape))

        handle = pipe.transformer.transformer_blocks[0].register_forward_hook(record)
        try:
            gen.generate(requests)
        finally:
            handle.remove()
        held = cache_bytes(pipe)
    finally:
        CACHING.disable(pipe)
    video, text = shapes["io"]
    per_branch = 2 * video.numel() * 4 + text.numel() * 4
    assert held == len(BLOCK_LISTS) * 2 * per_branch


def test_bad_settings_fail_before_compute(pipe):
    with pytest.raises(ValueError, match="key"):
        CacheDitSetting("x", "Bad Key")
    with pytest.raises(ValueError, match="threshold"):
        CacheDitSetting("x", "x", threshold=-1)
    with pytest.raises(ValueError, match="Fn \\+ Bn"):
        CacheDitSetting("x", "x", Fn=3, Bn=2).enable(pipe, STEPS)  # 5 > the bundled model's 4 double blocks
    assert getattr(pipe.transformer, "_context_manager", None) is None
