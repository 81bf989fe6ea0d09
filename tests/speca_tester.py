"""Shared SpeCa checks for one model family, run on a tiny randomly initialised diffusers pipeline.

A family's test file subclasses `SpeCaFamilyTests`, provides a `pipe` fixture (SpeCa removed
after each test) and the few facts below, each taken from diffusers' documented behaviour,
not from SpeCa's family spec, so a wrong spec fails here.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import speca.hooks
from speca import SpeCaConfig, apply_speca, disable_speca
from speca.controller import StepController

INF = math.inf
CHECKS = {"verify_first": True, "signal": "delta"}  # the checks the paper's method lacks


class SpeCaFamilyTests:
    STEPS = 8
    IMAGE_TOKENS: int  # tokens of the image stream at the test size
    TEXT_TOKENS: int  # tokens of the text stream (0 when the family has none)

    def run(self, pipe, idx: list[int], cfg: bool = False) -> torch.Tensor:
        """Latents for sample identities `idx` through the family's diffusers pipeline."""
        raise NotImplementedError

    def image_stream(self, block_output) -> torch.Tensor:
        """The image stream of the verified block's output, by diffusers' return order."""
        raise NotImplementedError

    def verified_block(self, transformer) -> torch.nn.Module:
        raise NotImplementedError

    def estimate_cache_bytes(self, transformer, cfg: SpeCaConfig, samples: int, true_cfg: bool) -> int:
        raise NotImplementedError

    def decoded(self, pipe, idx: list[int]):
        """Decoded images (numpy, values in [0, 1]) for `idx`."""
        raise NotImplementedError

    REFERENCE: SpeCaConfig | None = None  # the authors' settings for the family, if any
    ATTENTION = "attn"  # the attention submodule of every block: it runs only when the block really runs

    @pytest.fixture
    def forced(self, monkeypatch):
        """Force rejections by (sample identity, step); `forced.batch` maps sample indices to identities."""

        class Forcing:
            batch: list[int] = []
            reject: set[tuple[int, int]] = set()

        original = StepController.decide

        def decide(ctrl, step, speculate, errors):
            errors = {b: (INF if (Forcing.batch[b], step) in Forcing.reject else e) for b, e in errors.items()}
            return original(ctrl, step, speculate, errors)

        monkeypatch.setattr(StepController, "decide", decide)
        return Forcing

    @pytest.mark.parametrize("cache", ["lean", "module"])
    @pytest.mark.parametrize("cfg", [False, True])
    @pytest.mark.parametrize("checks", [{}, CHECKS])
    def test_threshold_zero_reproduces_uncached(self, pipe, cache, cfg, checks):
        base = self.run(pipe, [0, 1], cfg)
        session = apply_speca(pipe, SpeCaConfig(cache=cache, tau0=0.0, tau_min=0.0, warmup_steps=1, **checks))
        out = self.run(pipe, [0, 1], cfg)
        assert [s.step_pattern for s in session.stats()] == ["F" + "R" * (self.STEPS - 1)] * 2
        assert (out - base).abs().max().item() <= 1e-5

    @pytest.mark.parametrize("cache,cfg,checks", [("lean", False, {}), ("module", False, {}), ("module", True, {}),
                                                  ("lean", True, CHECKS), ("module", False, CHECKS)])
    def test_batch_with_mixed_decisions_equals_alone(self, pipe, forced, cache, cfg, checks):
        forced.reject = {(1, 3), (2, 3), (2, 4), (0, 5)}
        session = apply_speca(pipe, SpeCaConfig(cache=cache, tau0=INF, tau_min=INF, warmup_steps=2, max_spec=4,
                                                **checks))
        forced.batch = [0, 1, 2]
        batch = self.run(pipe, [0, 1, 2], cfg)
        patterns = [s.step_pattern for s in session.stats()]
        assert [p[3] for p in patterns] == ["S", "R", "R"] and patterns[2][4] == "R" and patterns[0][5] == "R"
        assert len(set(patterns)) == 3
        for i in range(3):
            forced.batch = [i]
            alone = self.run(pipe, [i], cfg)
            assert session.stats()[0].step_pattern == patterns[i]
            rel = ((batch[i] - alone[0]).abs().max() / alone.abs().max()).item()
            assert rel <= 1e-5, (i, rel)

    def test_rollback_recomputes_the_rejected_step(self, pipe, forced):
        """The transformer's output at a rejected step is the real one for that step's input; at an
        accepted step it is a draft (differs), so the check itself can fail."""
        transformer = pipe.transformer
        seen = []
        handle = transformer.register_forward_hook(
            lambda m, args, kwargs, out: seen.append((args, dict(kwargs), (out[0] if isinstance(out, tuple)
                                                                           else out.sample).clone())),
            with_kwargs=True)
        forced.batch, forced.reject = [0], {(0, 4)}
        session = apply_speca(pipe, SpeCaConfig(tau0=INF, tau_min=INF, warmup_steps=2, max_spec=8))
        try:
            self.run(pipe, [0])
        finally:
            handle.remove()
        pattern = session.stats()[0].step_pattern
        assert pattern[:6] == "FFSSRS"  # step 4 recomputed in full, step 5 speculates again
        disable_speca(pipe)
        with torch.no_grad():
            for step, expect_real in ((4, True), (3, False)):
                args, kwargs, out = seen[step]
                kwargs = {**kwargs, "return_dict": False}
                real = transformer(*args, **kwargs)[0]
                gap = (out - real).abs().max().item() / real.abs().max().item()
                assert (gap <= 1e-5) == expect_real, (step, gap)

    @pytest.mark.parametrize("cache", ["lean", "module"])
    def test_verification_measures_the_image_tokens(self, pipe, monkeypatch, cache):
        measured = []  # (real tensor SpeCa measured, the verified block's latest image stream) per check
        streams = []
        original = speca.hooks.error_partials

        def spy(drafted, real, metric):
            measured.append((real, streams[-1]))
            return original(drafted, real, metric)

        monkeypatch.setattr(speca.hooks, "error_partials", spy)

        def on_block(module, inputs, output):
            streams.append(self.image_stream(output))

        session = apply_speca(pipe, SpeCaConfig(cache=cache, tau0=INF, tau_min=INF, warmup_steps=2, max_spec=8))
        handle = self.verified_block(pipe.transformer).register_forward_hook(on_block)
        try:
            self.run(pipe, [0, 1])
        finally:
            handle.remove()
        assert session.stats()[0].step_pattern == "FF" + "S" * (self.STEPS - 2)
        assert len(measured) == self.STEPS - 2
        assert self.IMAGE_TOKENS != self.TEXT_TOKENS
        for real, image in measured:
            assert real.shape[1] == self.IMAGE_TOKENS
            assert torch.equal(real, image)

    def test_module_draft_with_the_real_outputs_is_the_block(self, pipe):
        """Each block spec's redraft, fed the block's own captured module outputs, rebuilds its output."""
        family = speca.registry.family_for(pipe.transformer)
        calls = []
        handles = [block.register_forward_pre_hook(
            lambda m, args, kwargs: calls.append((m, args, dict(kwargs))) if len(calls) < 64 else None,
            with_kwargs=True) for block, _ in family.iter_blocks(pipe.transformer)]
        try:
            self.run(pipe, [0])
        finally:
            for h in handles:
                h.remove()
        specs = {id(b): spec for b, spec in family.iter_blocks(pipe.transformer)}
        checked = set()
        with torch.no_grad():
            for block, args, kwargs in calls:
                if id(block) in checked:
                    continue
                checked.add(id(block))
                spec = specs[id(block)]
                captured = {}

                def grab(keys):
                    def hook(_m, _i, out):
                        captured.update(zip(keys, out if isinstance(out, tuple) else (out,)))
                    return hook

                hs = [block.get_submodule(n).register_forward_hook(grab(k)) for n, k in spec.captures.items()]
                try:
                    real = spec.unpack(block(*args, **kwargs))
                finally:
                    for h in hs:
                        h.remove()
                bound = inspect.signature(block.forward).bind(*args, **kwargs)
                bound.apply_defaults()
                streams = {n: bound.arguments[n] for n in spec.streams}
                drafted = spec.redraft(block, streams, bound.arguments, captured.__getitem__)
                for name in spec.streams:
                    assert torch.allclose(drafted[name], real[name], rtol=1e-5, atol=1e-6), (type(block), name)
        assert len(checked) == len(specs)

    @pytest.mark.parametrize("cache,first", [("lean", False), ("module", False), ("lean", True)])
    def test_cache_bytes_estimate_matches_the_cache(self, pipe, cache, first):
        cfg = SpeCaConfig(cache=cache, order=2, verify_first=first)
        session = apply_speca(pipe, cfg)
        self.run(pipe, [0, 1, 2], cfg=True)
        assert session.stats()[0].cache_bytes == self.estimate_cache_bytes(pipe.transformer, cfg, 3, True) > 0

    def test_pipeline_end_to_end_with_speca(self, pipe):
        """Decoded images through the pipeline; the compute SpeCa reports matches the attention rows
        that actually ran (counted by hooks, independently of SpeCa's bookkeeping)."""
        base = self.decoded(pipe, [0, 1])
        session = apply_speca(pipe, SpeCaConfig(tau0=INF, tau_min=INF, warmup_steps=2, max_spec=3))
        blocks = speca.registry.family_for(pipe.transformer).iter_blocks(pipe.transformer)
        rows = []
        handles = [b.get_submodule(self.ATTENTION).register_forward_pre_hook(
            lambda m, args, kwargs: rows.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
            with_kwargs=True) for b, _ in blocks]
        batch_rows = []
        handles.append(pipe.transformer.register_forward_pre_hook(
            lambda m, args, kwargs: batch_rows.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
            with_kwargs=True))
        try:
            images = self.decoded(pipe, [0, 1])
        finally:
            for h in handles:
                h.remove()
        assert images.shape == base.shape and images.min() >= 0 and images.max() <= 1
        stats = session.stats()
        assert [s.step_pattern for s in stats] == [("FF" + "SSSF" * self.STEPS)[:self.STEPS]] * 2
        assert 0 < abs(images - base).max()
        blocks_run = sum(rows) / (sum(batch_rows) * len(blocks))  # share of the uncached block executions
        assert stats[0].compute_ratio == pytest.approx(blocks_run, rel=1e-9)
        assert blocks_run < 0.75

    def test_reference_settings_run(self, pipe):
        if self.REFERENCE is None:
            pytest.skip("no reference settings for this family")
        session = apply_speca(pipe, self.REFERENCE)
        out = self.run(pipe, [0, 1])
        assert torch.isfinite(out).all()
        w = self.REFERENCE.warmup_steps
        for s in session.stats():  # warm-up in full, then min_spec drafts accepted unchecked
            assert s.step_pattern.startswith("F" * w + "S" * self.REFERENCE.min_spec), s.step_pattern
