"""The accept/reject rule and per-sample step accounting (model-agnostic).

For each sample independently, at every step:
  * `F` full step: warm-up, final steps, no full step yet, `max_spec` speculative steps in a
    row already, within `reject_hold` steps after a draft rejected in the run's first
    `reject_hold_until`, or while the curvature its last full step showed is at or above `draft_gate`;
  * otherwise speculate: draft every feature, recompute one block on the drafted input, and
    accept (`S`) when the error is below the threshold and the run's accumulated error stays
    under `max_error_sum` (or the run is still within `min_spec`);
    a rejected draft (`R`) is rolled back and the same step is recomputed in full.
Decisions are plain Python on a few scalars per sample, kept out of any compiled region.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import SpeCaConfig

FULL, ACCEPTED, REJECTED = "F", "S", "R"


def error_partials(draft: torch.Tensor, real: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-sample partial sums (numerator, denominator), shape (B, 2), in float64.

    Sums, not means, so ranks that each hold a shard of the tokens can add their partials
    (see `SpeCaSession.error_reduce`) and all reach the same decision.
    """
    d = draft.double().flatten(1)
    r = real.double().flatten(1)
    diff = d - r
    if metric == "rel_l1":
        parts = (diff.abs().sum(1), r.abs().sum(1))
    elif metric == "rel_l2":
        parts = (diff.pow(2).sum(1), r.pow(2).sum(1))
    elif metric == "rel_l1_elementwise":
        parts = ((diff.abs() / (r.abs() + 1e-6)).sum(1), torch.full_like(r[:, 0], r.shape[1]))
    else:
        raise ValueError(f"unknown metric {metric!r}")
    return torch.stack(parts, dim=1)


def error_from_partials(partials: torch.Tensor, metric: str, scales: list[float] | None = None) -> list[float]:
    """Per-sample error from (B, 2k) partials of k checks: the largest of the k ratios, each divided by its
    check's scale (its threshold's multiple) when `scales` is given."""
    num, den = partials[:, 0::2], partials[:, 1::2].clamp(min=1e-30)
    err = (num / den).sqrt() if metric == "rel_l2" else num / den
    if scales is not None:
        err = err / torch.tensor(scales, dtype=err.dtype, device=err.device)
    return err.amax(dim=1).tolist()


@dataclass
class SampleRecord:
    """What SpeCa did to one sample over one generation."""

    pattern: list[str] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)  # one per speculative step (S or R)
    thresholds: list[float] = field(default_factory=list)
    curvature: list[float] = field(default_factory=list)  # per full step with a lookback (see draft_gate)
    blocks_run: int = 0  # transformer blocks executed in full, all passes together
    blocks_total: int = 0  # blocks a no-cache run would have executed

    @property
    def step_pattern(self) -> str:
        return "".join(self.pattern)

    @property
    def full_steps(self) -> int:
        return self.pattern.count(FULL)

    @property
    def accepted(self) -> int:
        return self.pattern.count(ACCEPTED)

    @property
    def rejected(self) -> int:
        return self.pattern.count(REJECTED)

    @property
    def compute_ratio(self) -> float:
        """Share of a no-cache run's block compute that was spent (FLOPs ratio)."""
        return self.blocks_run / self.blocks_total if self.blocks_total else 1.0


class StepController:
    """Per-sample plan and decision for one generation of a batch."""

    def __init__(self, config: SpeCaConfig, batch_size: int, num_steps: int):
        self.config = config
        self.num_steps = num_steps
        self.last_full = [-1] * batch_size
        self.run = [0] * batch_size
        self.run_error = [0.0] * batch_size  # errors accepted since the last full step
        self.hold_until = [-1] * batch_size  # full steps up to this one (after a rejected draft)
        self.lookback: dict[int, tuple[int, float, float]] = {}  # sample -> (full step, error sums over branches)
        self.records = [SampleRecord() for _ in range(batch_size)]
        self.decisions: dict[int, tuple[list[bool], list[bool]]] = {}  # step -> (speculate, accepted)

    def plan(self, step: int) -> list[bool]:
        """Which samples speculate at `step` (False = full step)."""
        c = self.config
        forced = step < c.warmup_steps or step >= self.num_steps - c.final_full_steps
        return [not forced and self.last_full[b] >= 0 and self.run[b] < c.max_spec and step > self.hold_until[b]
                and self.curvature(b) < c.draft_gate for b in range(len(self.run))]

    def note_lookback(self, step: int, partials: dict[int, tuple[float, float]]) -> None:
        """A full step's lookback, per sample: the (numerator, denominator) of its prediction's draft error,
        already divided by the draft's remainder factor; every CFG branch's call at one step adds to the same
        sums."""
        for b, (num, den) in partials.items():
            at, n, d = self.lookback.get(b, (-1, 0.0, 0.0))
            self.lookback[b] = (step, num, den) if at != step else (step, n + num, d + den)
            rec = self.records[b]
            value = self.curvature(b)
            if at == step:
                rec.curvature[-1] = value
            else:
                rec.curvature.append(value)

    def curvature(self, b: int) -> float:
        """The sample's one-step draft error at its last full step with a lookback (0 before any)."""
        _, num, den = self.lookback.get(b, (-1, 0.0, 0.0))
        if den <= 0:
            return 0.0
        return (num / den) ** 0.5 if self.config.metric == "rel_l2" else num / den

    def decide(self, step: int, speculate: list[bool], errors: dict[int, float]) -> list[bool]:
        """Accept or reject each speculating sample; `errors` maps sample -> error."""
        tau = self.config.threshold(step, self.num_steps)
        accepted = []
        for b, spec in enumerate(speculate):
            if not spec:
                accepted.append(False)
                continue
            err = errors[b]
            ok = self.run[b] + 1 <= self.config.min_spec or (
                err < tau and self.run_error[b] + err < self.config.max_error_sum)
            accepted.append(ok)
            rec = self.records[b]
            rec.errors.append(err)
            rec.thresholds.append(tau)
        self.decisions[step] = (speculate, accepted)
        for b, spec in enumerate(speculate):
            if spec and accepted[b]:
                self.records[b].pattern.append(ACCEPTED)
                self.run[b] += 1
                self.run_error[b] += errors[b]
            else:
                self.records[b].pattern.append(REJECTED if spec else FULL)
                if spec and step < self.config.reject_hold_until * self.num_steps:
                    self.hold_until[b] = step + self.config.reject_hold
                self.run[b] = 0
                self.run_error[b] = 0.0
                self.last_full[b] = step
        return accepted

    def count_blocks(self, rows: list[int], run: int, total: int) -> None:
        for b in rows:
            self.records[b].blocks_run += run
            self.records[b].blocks_total += total
