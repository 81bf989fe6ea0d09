"""The model-agnostic SpeCa core: draft, decision rule, error partials, FLOPs, config."""

import math

import pytest
import torch

from speca import PRESETS, SpeCaConfig
from speca.controller import StepController, error_from_partials, error_partials
from speca.flops import block_flops, speculative_step_flops, step_flops
from speca.forecast import NewtonForecaster


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_draft_is_exact_on_polynomials_with_uneven_gaps(order):
    torch.manual_seed(order)
    coeffs = torch.randn(order + 1, 3, 5, 4, dtype=torch.float64)  # per-sample polynomial in the step

    def f(step):
        return sum(coeffs[i] * float(step) ** i for i in range(order + 1))

    fc = NewtonForecaster(order, batch_size=3)
    histories = {0: [0, 1, 3, 4, 9, 11], 1: [0, 2, 3, 7, 12], 2: [1, 2, 6, 8]}  # per-sample full steps, >= 4 each
    for step in range(13):
        rows = [b for b, h in histories.items() if step in h]
        if rows:
            fc.update("x", torch.tensor(rows), step, f(step)[rows])
            fc.commit(step)
    target = 15
    got = fc.predict("x", torch.tensor([0, 1, 2]), target)
    assert torch.allclose(got, f(target), rtol=1e-9, atol=1e-9)


def test_first_order_is_taylorseer():
    """Order 1 equals TaylorSeer: F + (F - F_prev) / D * k."""
    fc = NewtonForecaster(1, batch_size=1)
    a, b = torch.randn(1, 8), torch.randn(1, 8)
    fc.update("x", torch.tensor([0]), 2, a)
    fc.commit(2)
    fc.update("x", torch.tensor([0]), 5, b)
    fc.commit(5)
    expected = b + (b - a) / 3 * 4
    assert torch.allclose(fc.predict("x", torch.tensor([0]), 9), expected, atol=1e-6)


def test_order_zero_is_reuse_and_missing_history_falls_back():
    fc = NewtonForecaster(2, batch_size=2)
    v = torch.randn(2, 4)
    fc.update("x", torch.tensor([0, 1]), 0, v)
    fc.commit(0)
    # Only one full step so far: the draft is plain reuse whatever the order.
    assert torch.equal(fc.predict("x", torch.tensor([1, 0]), 5), v[[1, 0]])
    with pytest.raises(KeyError, match="no cached value"):
        fc.predict("y", torch.tensor([0]), 1)


def test_controller_schedule_rules():
    cfg = SpeCaConfig(warmup_steps=2, min_spec=1, max_spec=3, tau0=0.5, beta=0.5, tau_min=0.1, final_full_steps=2)
    c = StepController(cfg, batch_size=2, num_steps=12)
    patterns = []
    for step in range(12):
        spec = c.plan(step)
        # sample 0 always has a tiny error; sample 1 always a huge one
        c.decide(step, spec, {b: (0.0 if b == 0 else 10.0) for b in range(2) if spec[b]})
    patterns = [r.step_pattern for r in c.records]
    assert patterns[0] == "FFSSSFSSSFFF"  # warm-up, max_spec=3 forces F, last 2 forced full
    # sample 1: its first speculative step is within min_spec (accepted unchecked), then rejected
    assert patterns[1] == "FFSRSRSRSRFF"
    assert c.records[1].thresholds[0] == pytest.approx(max(0.5 * 0.5 ** (2 / 12), 0.1))
    assert len(c.records[1].errors) == patterns[1].count("S") + patterns[1].count("R")


@pytest.mark.parametrize("tau,expected", [(0.0, "FRRRRR"), (math.inf, "FSSFSS")])
def test_threshold_extremes(tau, expected):
    c = StepController(SpeCaConfig(warmup_steps=1, tau0=tau, tau_min=tau, max_spec=2), 1, 6)
    for step in range(6):
        spec = c.plan(step)
        c.decide(step, spec, {0: 0.0} if spec[0] else {})
    assert c.records[0].step_pattern == expected


@pytest.mark.parametrize("metric", ["rel_l1", "rel_l2", "rel_l1_elementwise"])
def test_error_partials_add_up_across_token_shards(metric):
    torch.manual_seed(0)
    d, r = torch.randn(3, 40, 8), torch.randn(3, 40, 8)
    whole = error_from_partials(error_partials(d, r, metric), metric)
    shards = sum(error_partials(d[:, i:i + 10], r[:, i:i + 10], metric) for i in range(0, 40, 10))
    assert error_from_partials(shards, metric) == pytest.approx(whole, rel=1e-12)
    if metric == "rel_l1":
        assert whole[0] == pytest.approx(((d[0] - r[0]).abs().sum() / r[0].abs().sum()).item())


REAL = dict(num_attention_heads=24, attention_head_dim=128, num_layers=20, num_single_layers=40, mlp_ratio=4.0,
            patch_size=2, patch_size_t=1)


def test_flops_on_the_real_config():
    # 480x640, 65 frames: 17 x 30 x 40 = 20,400 video tokens + 256 text; 50 steps.
    total = 50 * step_flops(REAL, 20_400 + 256)
    assert total == pytest.approx(29_773e12, rel=0.01)  # LinCa's table: 29,773 TFLOPs
    assert speculative_step_flops(REAL, 20_656) / step_flops(REAL, 20_656) == pytest.approx(1 / 60)
    assert block_flops(3072, 1000) == 24 * 1000 * 3072**2 + 4 * 1000**2 * 3072


@pytest.mark.parametrize("kwargs,field", [
    (dict(order=5), "order"), (dict(cache="disk"), "cache"), (dict(metric="l3"), "metric"),
    (dict(beta=0.0), "beta"), (dict(tau0=-1.0), "tau0"), (dict(max_spec=0), "max_spec"),
    (dict(min_spec=9, max_spec=8), "min_spec"), (dict(warmup_steps=-1), "warmup_steps"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SpeCaConfig.{field}="):
        SpeCaConfig(**kwargs)


def test_presets():
    ref = SpeCaConfig.from_name("reference")
    assert (ref.order, ref.warmup_steps, ref.tau0, ref.beta, ref.tau_min, ref.min_spec, ref.max_spec) == \
        (1, 1, 1.0, 0.1, 0.1, 4, 12)
    assert SpeCaConfig.from_name("default", tau0=0.3).tau0 == 0.3
    assert set(PRESETS) >= {"reference", "default"}
    with pytest.raises(ValueError, match="unknown SpeCa preset"):
        SpeCaConfig.from_name("fastest")
