"""SpeCa's rows in `bench.caching`: the presets, their strengths and one ablation row per option.

`speca_methods()` is the interface the benchmark calls; `DEFAULT_KEY` names the row its goals judge.
"""

from __future__ import annotations

from bench.method import Method
from speca import SpeCaConfig

REFERENCE_THRESHOLDS = (0.25, 0.5, 1.0)  # the paper's preset at three tau0
SPECA_ABLATIONS = [  # (key, what changes against the default preset, SpeCaConfig changes)
    ("paper-schedule", "the paper's threshold direction, lenient early and strict late (0.05 -> 0.025; the "
     "previous default)", dict(tau0=0.05, beta=0.5, tau_min=0.02)),
    ("first-block", "also checks the first block on the real latent (thresholds x2: its errors are larger)",
     dict(verify_first=True, tau0=0.012)),
    ("delta", "checks the verified block's own update, not its output (thresholds x6: errors undiluted)",
     dict(signal="delta", tau0=0.036)),
    ("floor", "accumulated-error floor: a run of drafts ends when its errors sum to 0.05", dict(max_error_sum=0.05)),
    ("order-2", "order-2 drafts", dict(order=2)),
    ("subset", "the check on a quarter of the video tokens (cheaper verification)", dict(verify_tokens=0.25)),
    ("first-block-subset", "the first-block check too, both on a quarter of the video tokens (thresholds x2)",
     dict(verify_first=True, verify_tokens=0.25, tau0=0.012)),
]

DEFAULT_KEY = "speca-default"  # the default preset at batch 8; "-b1" at batch 1


def speca_methods() -> list[Method]:
    """The default preset at three strengths and alone, the subset preset at two, the paper's method
    at three thresholds, and one ablation row per option the default adds to the paper's method."""
    d = SpeCaConfig.from_name("default")
    out = [Method("SpeCa default", "speca", DEFAULT_KEY, d),
           Method("SpeCa default, batch 1", "speca", DEFAULT_KEY + "-b1", d, batch=1)]
    for factor, name in ((0.5, "strict"), (1.5, "fast"), (2.0, "faster")):
        cfg = d.replace(tau0=d.tau0 * factor)
        out.append(Method(f"SpeCa default, {name} (thresholds x{factor})", "speca", f"{DEFAULT_KEY}-{name}", cfg))
    s = SpeCaConfig.from_name("subset")
    out.append(Method("SpeCa subset preset (the check on 1/8 of the video tokens)", "speca", "speca-subset", s))
    out.append(Method("SpeCa subset preset, strict (thresholds x0.8)", "speca", "speca-subset-strict",
                      s.replace(tau0=s.tau0 * 0.8)))
    for tau0 in REFERENCE_THRESHOLDS:
        cfg = SpeCaConfig.from_name("reference", tau0=tau0)
        out.append(Method(f"SpeCa reference (the paper's method) tau0={tau0}", "speca", f"speca-reference-{tau0}", cfg,
                          ablation="the paper's method (authors' HunyuanVideo settings)" if tau0 == 1.0 else None))
    for key, label, changes in SPECA_ABLATIONS:
        out.append(Method(f"SpeCa default, {label}", "speca", f"speca-ablate-{key}", d.replace(**changes),
                          ablation=label))
    return out
