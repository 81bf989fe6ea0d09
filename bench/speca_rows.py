"""SpeCa's rows in `bench.caching`: the presets, their strengths and one ablation row per option.

`speca_methods()` is the interface the benchmark calls; `DEFAULT_KEY` names the row its goals judge.
"""

from __future__ import annotations

import math

from bench.method import Method
from speca import SpeCaConfig

REFERENCE_THRESHOLDS = (0.25, 0.5, 1.0)  # the paper's preset at three tau0
# The default preset as it was tuned on the bundled model v1 (until 2026-12-06): a full-token check of the last
# block's output on the cond branch alone, 3 warm-up steps, threshold 0.006 -> 0.096.
V1_DEFAULT = SpeCaConfig(order=1, cache="lean", tau0=0.006, beta=16.0, signal="output", cfg_branches="leader",
                         verify_tokens=1.0, warmup_steps=3, max_spec=8)
SPECA_ABLATIONS = [  # (key, what changes against the default preset, SpeCaConfig changes)
    ("no-gate", "no curvature gate (the default's per-sample signal from its full steps' own predictions)",
     dict(draft_gate=math.inf)),
    ("no-first-block", "no first-block check on the real latent (the default's per-sample difficulty signal)",
     dict(verify_first=False)),
    ("full-check", "the checks on every video token (the default checks 1/8 of them; no shrink: the stream after a "
     "full-token check is the verified block's real output, not a draft)", dict(verify_tokens=1.0, draft_shrink=1.0)),
    ("lenient-late", "a threshold 16x looser at the end than at the start, not 10x (the v1-tuned schedule's shape)",
     dict(beta=16.0)),
    ("beta-8", "a threshold 8x looser at the end than at the start, not 10x", dict(beta=8.0)),
    ("paper-schedule", "the paper's threshold direction, lenient early and strict late (0.05 -> 0.025)",
     dict(tau0=0.05, beta=0.5, tau_min=0.02)),
    ("pooled-cfg", "both CFG branches in one pass and their errors pooled (the default checks the cond branch, "
     "which decides for both)", dict(cfg_branches="pooled")),
    ("guided-cfg", "both CFG branches in one pass, the check on the guided prediction (thresholds x10: the "
     "prediction's error, amplified by the CFG scale)", "guided"),
    ("no-shrink", "Newton's draft for the output all run, not shrunk halfway toward the last full step's from 40% of "
     "the run", dict(draft_shrink=1.0)),
    ("no-late-scale", "the first-block check held to the threshold all run, not 2x it from 40% of the run",
     dict(verify_first_scale=1.0)),
    ("previous", "no shrink and the first-block check at 1.5x from 40% of the run (the default until the shrink came "
     "on 2026-12-07)", dict(draft_shrink=1.0, verify_first_scale=1.5)),
    ("no-early-hold", "no full step held after a draft rejected in the first 30% of the run (the hold came into the "
     "default on 2026-12-06)", dict(reject_hold=0)),
    ("hold-all-run", "a full step held after every rejected draft, not only in the first 30% of the run",
     dict(reject_hold_until=1.0)),
    ("delta", "checks the verified block's own update, not its output (thresholds x6: errors undiluted)", "delta"),
    ("floor", "accumulated-error floor: a run of drafts ends when its errors sum to 0.05", dict(max_error_sum=0.05)),
    ("order-2", "order-2 drafts", dict(order=2)),
]

DEFAULT_KEY = "speca-default"  # the default preset at batch 8; "-b1" at batch 1


def _ablation(default: SpeCaConfig, changes) -> SpeCaConfig:
    """An ablation's config; options whose errors read on another scale move the thresholds with them."""
    if changes == "guided":
        return default.replace(cfg_branches="guided", signal="prediction", tau0=default.tau0 * 10)
    if changes == "delta":
        return default.replace(signal="delta", tau0=default.tau0 * 6)
    return default.replace(**changes)


def speca_methods() -> list[Method]:
    """The default preset at four strengths and alone, the default as tuned on v1, the paper's method at three
    thresholds, and one ablation row per option (each changes one thing against the default)."""
    d = SpeCaConfig.from_name("default")
    out = [Method("SpeCa default", "speca", DEFAULT_KEY, d),
           Method("SpeCa default, batch 1", "speca", DEFAULT_KEY + "-b1", d, batch=1)]
    for factor, name in ((0.5, "strict"), (1.5, "fast"), (2.0, "faster")):
        cfg = d.replace(tau0=d.tau0 * factor)
        out.append(Method(f"SpeCa default, {name} (thresholds x{factor})", "speca", f"{DEFAULT_KEY}-{name}", cfg))
    out.append(Method("SpeCa default as tuned on v1 (until 2026-12-06)", "speca", "speca-v1-default", V1_DEFAULT,
                      ablation="the default as tuned on the bundled model v1 (full-token check, 3 warm-up steps, "
                               "0.006 -> 0.096)"))
    for tau0 in REFERENCE_THRESHOLDS:
        cfg = SpeCaConfig.from_name("reference", tau0=tau0)
        out.append(Method(f"SpeCa reference (the paper's method) tau0={tau0}", "speca", f"speca-reference-{tau0}", cfg,
                          ablation="the paper's method (authors' HunyuanVideo settings)" if tau0 == 1.0 else None))
    for key, label, changes in SPECA_ABLATIONS:
        out.append(Method(f"SpeCa default, {label}", "speca", f"speca-ablate-{key}", _ablation(d, changes),
                          ablation=label))
    return out
