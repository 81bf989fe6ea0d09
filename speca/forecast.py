"""The draft: per-sample polynomial extrapolation of cached features from past full steps.

TaylorSeer forecasts a feature k steps past the last full step from finite differences. We
keep the same memory (order + 1 tensors per feature) but use Newton's divided differences over
the actual step indices of the last order + 1 full steps, so the draft is exact on polynomial
trajectories up to `order` even when SpeCa's gaps between full steps vary. At order 1 this is
TaylorSeer's first-order forecast exactly.

Every sample of a batch has its own full-step history (SpeCa decides per sample), so node times
are kept per sample and updates touch only the rows that ran in full.
"""

from __future__ import annotations

import math

import torch


class NewtonForecaster:
    """Cached divided differences for named features of a batch of samples."""

    def __init__(self, order: int, batch_size: int):
        self.order = order
        self.batch_size = batch_size
        # nodes[b, j]: step index of the j-th most recent full step of sample b (-1 = none yet).
        self.nodes = torch.full((batch_size, order + 1), -1, dtype=torch.float64)
        self._coef: dict[str, list[torch.Tensor]] = {}
        self._pending_nodes: dict[int, torch.Tensor] = {}

    def update(self, key: str, rows: torch.Tensor, step: int, value: torch.Tensor) -> None:
        """Record the real value of feature `key` at `step` for samples `rows` (value[i] <-> rows[i])."""
        old_nodes = self.nodes[rows]  # nodes before this step, shared by every key
        if key not in self._coef:
            self._coef[key] = [value.new_zeros((self.batch_size, *value.shape[1:])) for _ in range(self.order + 1)]
        coef = self._coef[key]
        new = [value]
        for i in range(self.order):
            gap = (step - old_nodes[:, i])  # f[s, t0..ti] = (f[s, t0..t(i-1)] - f[t0..ti]) / (s - ti)
            valid = old_nodes[:, i] >= 0
            scale = torch.where(valid, 1.0 / gap.clamp(min=1e-9), torch.zeros_like(gap)).to(value.device, value.dtype)
            new.append((new[i] - coef[i][rows]) * scale.view(-1, *([1] * (value.dim() - 1))))
        for i in range(self.order + 1):
            coef[i][rows] = new[i]
        self._pending_nodes[step] = rows

    def commit(self, step: int) -> None:
        """Advance the node history of the rows updated at `step` (once for all keys)."""
        rows = self._pending_nodes.pop(step, None)
        if rows is None:
            return
        shifted = torch.roll(self.nodes[rows], 1, dims=1)
        shifted[:, 0] = step
        self.nodes[rows] = shifted

    def predict(self, key: str, rows: torch.Tensor, step: int, shrink: float = 1.0) -> torch.Tensor:
        """Extrapolate feature `key` to `step` for samples `rows`; `shrink` < 1 scales the polynomial's
        i-th term by `shrink ** i`, pulling the draft toward the last full step's value."""
        if key not in self._coef:
            raise KeyError(f"SpeCa has no cached value for {key!r}: a speculative step came before any full step")
        coef = self._coef[key]
        nodes = self.nodes[rows]
        out = coef[0][rows].clone()
        weight = torch.ones(len(rows), dtype=torch.float64)
        for i in range(1, self.order + 1):
            weight = weight * (step - nodes[:, i - 1]) * shrink
            have = nodes[:, i] >= 0  # the i-th difference exists only after i + 1 full steps
            w = torch.where(have, weight, torch.zeros_like(weight)).to(out.device, out.dtype)
            out = out + coef[i][rows] * w.view(-1, *([1] * (out.dim() - 1)))
        return out

    def has(self, key: str) -> bool:
        return key in self._coef

    def remainder_factor(self, rows: torch.Tensor, step: int) -> torch.Tensor:
        """Per sample, `prod(step - node) / (order + 1)!` over the order + 1 last full steps: how a
        draft's error to `step` scales with its distance from the nodes (Newton's remainder), 1 for a
        one-step draft from consecutive full steps; NaN where a node is missing."""
        gaps = step - self.nodes[rows]
        factor = gaps.prod(dim=1) / math.factorial(self.order + 1)
        return torch.where((self.nodes[rows] >= 0).all(dim=1), factor, torch.full_like(factor, math.nan))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for c in self._coef.values() for t in c)
