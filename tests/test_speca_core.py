"""The model-agnostic SpeCa core: draft, decision rule, error partials, registry, config."""

import math
import re

import pytest
import torch

from speca import PRESETS, SpeCaConfig
from speca.controller import StepController, error_from_partials, error_partials
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


def test_shrink_pulls_the_draft_toward_the_last_full_value():
    """On a straight line, a draft shrunk by s lands at the share s of the way from the last full step's value
    to the line's value at the target; s = 1 is the line itself, s = 0 plain reuse."""
    slope, start = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    fc = NewtonForecaster(1, batch_size=2)
    for step in (3, 5):
        fc.update("x", torch.tensor([0, 1]), step, start + slope * step)
        fc.commit(step)
    rows, last, target = torch.tensor([0, 1]), start + slope * 5, start + slope * 11
    for s in (0.0, 0.3, 1.0):
        assert torch.allclose(fc.predict("x", rows, 11, shrink=s), last + s * (target - last), atol=1e-12)


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
    for step in range(12):
        spec = c.plan(step)
        # sample 0 always has a tiny error; sample 1 always a huge one
        c.decide(step, spec, {b: (0.0 if b == 0 else 10.0) for b in range(2) if spec[b]})
    patterns = [r.step_pattern for r in c.records]
    assert patterns[0] == "FFSSSFSSSFFF"  # warm-up, max_spec=3 forces F, last 2 forced full
    # sample 1: its first speculative step is within min_spec (accepted unchecked), then rejected
    assert patterns[1] == "FFSRSRSRSRFF"
    assert len(c.records[1].errors) == patterns[1].count("S") + patterns[1].count("R")
    taus = c.records[0].thresholds
    assert taus == sorted(taus, reverse=True) and all(0.1 <= t < 0.5 for t in taus)  # decaying, above the floor


def test_reject_hold_keeps_a_failing_sample_full():
    """After a rejected draft a sample runs `reject_hold` more steps in full; one whose drafts pass is untouched."""
    cfg = SpeCaConfig(warmup_steps=2, max_spec=3, tau0=0.5, beta=1.0, reject_hold=2)
    c = StepController(cfg, batch_size=2, num_steps=12)
    for step in range(12):
        spec = c.plan(step)
        c.decide(step, spec, {b: (0.0 if b == 0 or step > 6 else 10.0) for b in range(2) if spec[b]})
    assert [r.step_pattern for r in c.records] == ["FFSSSFSSSFSS", "FFRFFRFFSSSF"]


def test_reject_hold_applies_only_in_the_first_share_of_the_run():
    """`reject_hold_until` limits the hold to drafts rejected in the run's first share: the same failing
    sample is held after its rejections before step 6 of 12 and drafts again right after the later ones."""
    cfg = SpeCaConfig(warmup_steps=2, max_spec=3, tau0=0.5, beta=1.0, reject_hold=2, reject_hold_until=0.5)
    c = StepController(cfg, batch_size=1, num_steps=12)
    for step in range(12):
        spec = c.plan(step)
        c.decide(step, spec, {0: 10.0} if spec[0] else {})
    assert c.records[0].step_pattern == "FFRFFRFFRRRR"


def test_remainder_factor_reads_a_quadratic_alike_at_any_gap():
    """An order-1 draft of a quadratic misses by its curvature times Newton's remainder; divided by
    `remainder_factor`, the miss is the same whatever the gaps between the nodes and the target."""
    a = torch.tensor([[0.5], [-2.0]], dtype=torch.float64)
    readings = []
    for nodes, target in (([0, 1], 2), ([0, 1], 5), ([2, 6], 7), ([1, 4], 11)):
        fc = NewtonForecaster(1, batch_size=2)
        for t in nodes:
            fc.update("x", torch.tensor([0, 1]), t, a * t ** 2 + 3.0 * t)
            fc.commit(t)
        rows = torch.tensor([0, 1])
        miss = (a * target ** 2 + 3.0 * target) - fc.predict("x", rows, target)
        readings.append(miss.squeeze(1) / fc.remainder_factor(rows, target))
    assert all(torch.allclose(r, readings[0]) for r in readings) and not torch.allclose(readings[0][0], readings[0][1])
    fc = NewtonForecaster(1, batch_size=1)
    fc.update("x", torch.tensor([0]), 0, torch.zeros(1, 1))
    fc.commit(0)
    assert math.isnan(fc.remainder_factor(torch.tensor([0]), 3).item())  # one node: no order-1 draft to read


def test_draft_gate_keeps_a_bending_sample_full():
    """A sample drafts only while its last full step's lookback reads under `draft_gate`; the CFG branches'
    lookbacks at one step pool (their sums add), a later full step's replaces them."""
    c = StepController(SpeCaConfig(warmup_steps=1, tau0=math.inf, tau_min=math.inf, draft_gate=0.05), 2, 10)
    assert c.plan(0) == [False, False]
    c.decide(0, [False, False], {})
    c.note_lookback(0, {0: (0.02, 1.0), 1: (0.01, 1.0)})
    c.note_lookback(0, {0: (0.18, 1.0)})  # sample 0's other branch bends: (0.02 + 0.18) / 2 = 0.1
    assert c.plan(1) == [False, True]
    c.decide(1, [False, True], {1: 0.0})
    c.note_lookback(1, {0: (0.03, 1.0)})
    assert c.plan(2) == [True, True]
    assert c.records[0].curvature == pytest.approx([0.1, 0.03]) and c.records[1].curvature == pytest.approx([0.01])


def test_threshold_decays_geometrically_to_its_floor():
    cfg = SpeCaConfig(tau0=0.8, beta=0.25, tau_min=0.0)
    assert cfg.threshold(0, 10) == 0.8 and cfg.threshold(10, 10) == pytest.approx(0.2)  # tau0, then tau0 * beta
    assert cfg.threshold(5, 10) == pytest.approx((0.8 * 0.2) ** 0.5)  # halfway: the geometric mean
    assert cfg.replace(tau_min=0.3).threshold(10, 10) == 0.3  # the floor wins


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


@pytest.mark.parametrize("metric", ["rel_l1", "rel_l2", "rel_l1_elementwise"])
def test_error_is_relative_and_per_sample(metric):
    """A draft off by a factor (1 + e) everywhere has error |e| under every metric, whatever the
    scale; each sample gets its own error."""
    torch.manual_seed(1)
    r = torch.rand(3, 20, 4) + 0.5
    d = r * torch.tensor([1.0, 1.1, 0.7]).view(3, 1, 1)
    err = error_from_partials(error_partials(d * 1e3, r * 1e3, metric), metric)
    assert err == pytest.approx([0.0, 0.1, 0.3], abs=1e-6)


@pytest.mark.parametrize("kwargs,field", [
    (dict(order=5), "order"), (dict(cache="disk"), "cache"), (dict(metric="l3"), "metric"),
    (dict(beta=0.0), "beta"), (dict(tau0=-1.0), "tau0"), (dict(max_spec=0), "max_spec"),
    (dict(min_spec=9, max_spec=8), "min_spec"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(draft_gate=0.0), "draft_gate"), (dict(reject_hold_until=1.5), "reject_hold_until"),
    (dict(verify_first_scale=0.0), "verify_first_scale"), (dict(verify_first_scale_from=-0.1), "verify_first_scale_from"),
    (dict(draft_shrink=1.5, verify_tokens=0.5), "draft_shrink"), (dict(draft_shrink=0.5), "draft_shrink"),
    (dict(draft_shrink_from=1.5), "draft_shrink_from"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SpeCaConfig.{field}="):
        SpeCaConfig(**kwargs)


def test_presets():
    ref = SpeCaConfig.from_name("reference")
    assert (ref.order, ref.warmup_steps, ref.tau0, ref.beta, ref.tau_min, ref.min_spec, ref.max_spec) == \
        (1, 1, 1.0, 0.1, 0.1, 4, 12)
    assert SpeCaConfig.from_name("default", tau0=0.3).tau0 == 0.3
    assert set(PRESETS) == {"reference", "default"}
    with pytest.raises(ValueError, match="unknown SpeCa preset"):
        SpeCaConfig.from_name("fastest")


def test_unsupported_model_is_refused_naming_the_families():
    from speca import apply_speca

    model = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"SpeCa does not support Linear; supported families: .*DiT.*FLUX.*HunyuanVideo"):
        apply_speca(model, SpeCaConfig())
    assert not hasattr(model, "_diffusers_hook") and not hasattr(model, "_speca_session")


def test_core_modules_name_no_model():
    """`speca/` is core modules whose code names no model family, plus one module per family
    (comments and docstrings may cite sources)."""
    import ast
    import pathlib

    import speca

    root = pathlib.Path(speca.__file__).parent
    families = {p.name for p in root.glob("*.py")} & {"hunyuan_video.py", "hunyuan_video15.py", "flux.py", "dit.py"}
    assert families >= {"hunyuan_video.py", "flux.py", "dit.py"}
    for path in root.glob("*.py"):
        if path.name in families or path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                      and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        words = []
        for n in ast.walk(tree):
            if isinstance(n, ast.Name):
                words.append(n.id)
            elif isinstance(n, ast.Attribute):
                words.append(n.attr)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                words += [getattr(n, "module", None) or "", *(a.name for a in n.names)]
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
                words.append(n.value)
        text = " ".join(words).lower()
        for name in ("hunyuan", "flux", "dit"):
            assert not re.search(rf"\b{name}", text), (path.name, name)


def test_accumulated_error_floor_ends_a_run():
    """Each draft passes the threshold, but the run's summed errors reach the floor: a full step."""
    cfg = SpeCaConfig(warmup_steps=1, tau0=1.0, tau_min=1.0, max_spec=8, max_error_sum=0.1)
    ctrl = StepController(cfg, batch_size=2, num_steps=12)
    patterns = [""] * 2
    for step in range(9):
        speculate = ctrl.plan(step)
        errors = {b: (0.03 if b == 0 else 0.001) for b, s in enumerate(speculate) if s}
        ctrl.decide(step, speculate, errors)
    patterns = [r.step_pattern for r in ctrl.records]
    assert patterns[0] == "FSSSRSSSR"  # 0.03 x 3 = 0.09 < 0.1; a fourth would reach 0.12
    assert patterns[1] == "FSSSSSSSS"  # small errors never reach it


def test_beta_above_one_is_strict_early():
    cfg = SpeCaConfig(tau0=0.02, beta=4.0, tau_min=0.0)
    assert cfg.threshold(0, 50) == pytest.approx(0.02) and cfg.threshold(50, 50) == pytest.approx(0.08)
    assert cfg.threshold(10, 50) < cfg.threshold(40, 50)


@pytest.mark.parametrize("total,world", [(320, 1), (320, 3), (45, 4), (5, 4)])
def test_token_subset_shards_are_one_draw(total, world):
    """Each rank runs its shard's part of one draw over the whole clip, padded to the same slots on every
    rank, and the mask columns place every rank's slots in the padded layout: what the ranks check
    together is exactly the one-process subset."""
    from speca.registry import token_subset

    alone = token_subset(total, 0.25)
    assert alone.real.all() and alone.slots == alone.drawn == max(1, round(0.25 * total))
    local = -(-total // world)
    parts = [token_subset(total, 0.25, world, rank, local) for rank in range(world)]
    assert len({p.slots for p in parts}) == 1
    checked = torch.cat([p.local[p.real] + rank * local for rank, p in enumerate(parts)])
    assert torch.equal(checked, alone.local)
    for rank, p in enumerate(parts):
        assert torch.equal(p.columns[p.column_real], alone.local)
        assert torch.equal(p.columns.view(world, -1)[rank][p.real], p.local[p.real] + rank * local)
        assert torch.equal(p.column_real.view(world, -1)[rank], p.real)
