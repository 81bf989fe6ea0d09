"""SpeCa configuration: one frozen, validated dataclass plus named presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

CACHE_MODES = ("module", "lean")
METRICS = ("rel_l1", "rel_l2", "rel_l1_elementwise")
SIGNALS = ("output", "delta", "prediction")
CFG_BRANCHES = ("leader", "pooled", "guided")


@dataclass(frozen=True)
class SpeCaConfig:
    """How SpeCa drafts, verifies and schedules.

    Args:
        order: degree of the draft polynomial through the last `order + 1` full steps (Newton
            divided differences over the actual step gaps; 0 = plain reuse, 1 = TaylorSeer's
            first order).
        cache: `"module"` caches the attention and MLP outputs of every block (before their gates;
            speculative steps re-apply the current step's gates and residuals); `"lean"` caches only
            the residual stream entering the verified block and the stream leaving it, so memory
            does not grow with depth.
        tau0, beta, tau_min: acceptance threshold at step i of n:
            `tau(i) = max(tau0 * beta ** (i / n), tau_min)`; a draft is accepted when its error is
            strictly below `tau(i)` (so `tau0 = 0` never accepts and `inf` always does). `beta < 1`
            (the paper) is lenient early and strict late; `beta > 1` is strict while the scene's
            layout forms (early, high noise) and lenient on late detail.
        metric: per-sample error between the verified block's drafted and recomputed outputs, over
            image (video) tokens: `rel_l1` = sum|d - r| / sum|r|, `rel_l2` = ||d - r|| / ||r||,
            `rel_l1_elementwise` = mean(|d - r| / (|r| + 1e-6)) (the reference code's metric).
        signal: what the error compares. `"output"` (the paper): the verified block's drafted output
            with its real output on the drafted input. `"delta"`: the block's own update (output
            minus input), drafted vs real; the same difference over a denominator that is the
            block's update, not the residual stream it rides on, so the error is not diluted by
            the stream (whose norm is many times the update's and varies by sample and step).
            `"prediction"`: the model's prediction, its output head (final norm and projection) on the
            last block's drafted and real outputs: what the sampler steps with, where the stream's
            error understates it several times over (the verified block must be the last one).
        cfg_branches: how classifier-free guidance run as separate calls (cache contexts "cond" and
            "uncond") is checked. `"leader"`: the first context to reach a step decides for the
            sample from its own check and the others follow unchecked. Otherwise the first context's
            call also runs the others' (their text arguments with its latent, in one batch) and one
            check sees every branch: `"pooled"`, the branches' errors pooled (partial sums added);
            `"guided"`, the error of the guided prediction `uncond + scale * (cond - uncond)` (the
            session must know the scale: `SpeCaSession.set_guidance_scale`). True CFG amplifies the
            branches' draft errors, and the unconditional branch's drafts are the worse ones early.
        verify_first: also run the first block for real on the real input (the latent this step
            actually starts from) and check its drafted output there; the sample's error is the
            larger of the two checks. The last-block check alone compares drafts with drafts, so a
            self-consistent draft passes even when the latent has left the drafted trajectory;
            the first block sees that latent. Costs one more block per speculative step.
        verify_first_scale, verify_first_scale_from: from this share of the run on, the first-block check
            passes under `verify_first_scale` times the threshold (its error is divided by it before the
            larger of the two checks is taken). Past the layout, every rejection is the first block's (the
            last block's check passes those drafts), so this sets how long a late run of drafts lasts.
        verify_tokens: share of the image tokens each check runs its block on (lean cache; 1 = all).
            Below 1, a fixed spread-out subset of the image tokens (with all text tokens) goes through
            the verified block(s) on its own, at full steps too, and the check compares that subset
            function's drafted and real outputs; the stream leaving the verified block is then its
            draft. A check then costs about this share of a block instead of a whole one (less: the
            attention shrinks quadratically). Under sequence parallelism the subset is still one draw
            over the whole clip (each rank runs its shard's part), so decisions equal one process's.
            Families without a token-subset rule refuse it.
        draft_shrink: the drafted stream the model's output is built from (with a token-subset check, the
            stream leaving the verified block) takes its draft polynomial's i-th term times `draft_shrink ** i`:
            below 1 the draft is pulled from Newton's extrapolation toward the last full step's value (a damping
            in the spirit of HiCache's contraction factor, arXiv 2508.16984). First-order extrapolation over a run of drafts
            overshoots where the features' trajectory flattens; the checks still compare Newton's drafts, so what
            accepts a draft is unchanged and only what the sampler steps with moves.
        draft_shrink_from: the share of the run from which `draft_shrink` applies (Newton's draft before it):
            while the layout forms, a shrunk draft moves the latent the next checks read.
        max_error_sum: a per-sample quality floor: a speculative run ends (full step) once the
            errors accepted since the last full step, plus this one, reach this sum; small errors
            that each pass add up along a run of drafts.
        draft_gate: a per-sample curvature gate: at each full step the model's prediction is also
            drafted from the full steps before it (free: the draft of a latent-sized tensor) and
            compared with the real one, over every CFG branch; that error, divided by the draft's
            Newton remainder factor `prod(step - node) / (order + 1)!` (so it reads as a one-step draft's
            error whatever the gap), must be below this for the sample to draft before its next full
            step. It measures what the sampler steps with, where the checks (one block, residual stream,
            one branch) read several times lower while the trajectory bends (inf: no gate).
        warmup_steps: the first steps always run in full.
        reject_hold: after a rejected draft, the sample runs this many more steps in full before it
            drafts again: a sample whose drafts fail is one whose trajectory is bending, and the next
            draft, from nodes that close together, is accepted by a check that underrates it.
        reject_hold_until: the share of the run, from its start, in which `reject_hold` applies (1 = all
            of it). While a clip's layout forms, the drafts after a rejection can send it to another scene
            whose checks read as a calm clip's; later, a rejection only ends a run of drafts.
        min_spec: the first `min_spec` speculative steps after a full step are accepted without the
            check (their errors are still recorded).
        max_spec: a full step is forced after `max_spec` speculative steps in a row.
        final_full_steps: the last steps always run in full.
        verify_block: index of the verified block within the family's last block list (the
            single-stream blocks of HunyuanVideo and FLUX, DiT's blocks; -1 = the last).
    """

    order: int = 1
    cache: str = "lean"
    tau0: float = 0.006
    beta: float = 16.0
    tau_min: float = 0.0
    metric: str = "rel_l1"
    signal: str = "output"
    cfg_branches: str = "leader"
    verify_first: bool = False
    verify_first_scale: float = 1.0
    verify_first_scale_from: float = 0.0
    verify_tokens: float = 1.0
    draft_shrink: float = 1.0
    draft_shrink_from: float = 0.0
    max_error_sum: float = math.inf
    draft_gate: float = math.inf
    warmup_steps: int = 3
    reject_hold: int = 0
    reject_hold_until: float = 1.0
    min_spec: int = 0
    max_spec: int = 8
    final_full_steps: int = 0
    verify_block: int = -1

    def __post_init__(self) -> None:
        def bad(field: str, value, allowed: str) -> None:
            raise ValueError(f"SpeCaConfig.{field}={value!r} is invalid: expected {allowed}")

        if not isinstance(self.order, int) or not 0 <= self.order <= 4:
            bad("order", self.order, "an integer in 0..4")
        if self.cache not in CACHE_MODES:
            bad("cache", self.cache, f"one of {CACHE_MODES}")
        if self.metric not in METRICS:
            bad("metric", self.metric, f"one of {METRICS}")
        if self.signal not in SIGNALS:
            bad("signal", self.signal, f"one of {SIGNALS}")
        if self.cfg_branches not in CFG_BRANCHES:
            bad("cfg_branches", self.cfg_branches, f"one of {CFG_BRANCHES}")
        if not isinstance(self.verify_first, bool):
            bad("verify_first", self.verify_first, "True or False")
        v = self.verify_first_scale
        if not isinstance(v, (int, float)) or not 0 < v < math.inf:
            bad("verify_first_scale", v, "a finite number > 0")
        v = self.verify_first_scale_from
        if not isinstance(v, (int, float)) or not 0 <= v <= 1:
            bad("verify_first_scale_from", v, "a share of the run in [0, 1]")
        v = self.verify_tokens
        if not isinstance(v, (int, float)) or not 0 < v <= 1:
            bad("verify_tokens", v, "a share of the image tokens in (0, 1]")
        if v < 1 and self.cache != "lean":
            bad("verify_tokens", v, "1 with cache='module' (a token-subset check needs the lean cache)")
        v = self.draft_shrink
        if not isinstance(v, (int, float)) or not 0 <= v <= 1:
            bad("draft_shrink", v, "a number in [0, 1]")
        if v < 1 and self.verify_tokens == 1:
            bad("draft_shrink", v, "1 without a token-subset check (verify_tokens < 1): only there is the stream the "
                                   "output is built from a draft")
        v = self.draft_shrink_from
        if not isinstance(v, (int, float)) or not 0 <= v <= 1:
            bad("draft_shrink_from", v, "a share of the run in [0, 1]")
        for name in ("max_error_sum", "draft_gate"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or v <= 0:
                bad(name, v, "a number > 0 (inf: none)")
        for name in ("tau0", "tau_min"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or math.isnan(v) or v < 0:
                bad(name, v, "a number >= 0 (inf allowed)")
        if not isinstance(self.beta, (int, float)) or not 0 < self.beta < math.inf:
            bad("beta", self.beta, "a finite number > 0")
        for name in ("warmup_steps", "reject_hold", "min_spec", "final_full_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                bad(name, v, "an integer >= 0")
        v = self.reject_hold_until
        if not isinstance(v, (int, float)) or not 0 < v <= 1:
            bad("reject_hold_until", v, "a share of the run in (0, 1]")
        if not isinstance(self.max_spec, int) or self.max_spec < 1:
            bad("max_spec", self.max_spec, "an integer >= 1")
        if self.min_spec > self.max_spec:
            bad("min_spec", self.min_spec, f"at most max_spec ({self.max_spec})")
        if not isinstance(self.verify_block, int):
            bad("verify_block", self.verify_block, "an integer block index")

    def threshold(self, step: int, num_steps: int) -> float:
        return max(self.tau0 * self.beta ** (step / max(num_steps, 1)), self.tau_min)

    def check_scales(self, step: int, num_steps: int, checks: int) -> list[float] | None:
        """Per check of a draft, the multiple of the threshold it passes under (None: all 1); the first-block
        check runs first."""
        if not self.verify_first or checks < 2 or step < self.verify_first_scale_from * num_steps:
            return None
        return [self.verify_first_scale] + [1.0] * (checks - 1)

    def shrink(self, step: int, num_steps: int) -> float:
        """The draft shrink the output stream takes at `step` (1: Newton's draft)."""
        return self.draft_shrink if step >= self.draft_shrink_from * num_steps else 1.0

    def replace(self, **changes) -> "SpeCaConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "SpeCaConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown SpeCa preset {name!r}; expected one of {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, SpeCaConfig] = {
    # The authors' HunyuanVideo settings (Cache4Diffusion speca-hunyuan_video): order 1, one
    # warm-up step, tau 1.0 -> 0.1, 4..12 speculative steps, their element-wise relative L1,
    # per-module cache.
    "reference": SpeCaConfig(order=1, cache="module", tau0=1.0, beta=0.1, tau_min=0.1,
                             metric="rel_l1_elementwise", warmup_steps=1, min_spec=4, max_spec=12),
    # Our default, tuned on the bundled model v2 (12 blocks, 50 steps, CFG 6) on 192 calibration prompts of
    # bench.caching (never its evaluation prompts): bench/results/speca_tuning_v2.md. A lean cache; two checks, each
    # on 1/8 of the video tokens (plus the text tokens): the last block's drafted output against its real output,
    # and the first block run for real on the latent the step starts from (`verify_first`: a clip whose latent has
    # left the drafted trajectory fails it while its self-consistent drafts pass the first). The curvature gate
    # (`draft_gate` 0.04): a sample drafts only while its last full step's own prediction, drafted from the full
    # steps before, was within 4% per step of the real one over both CFG branches, so a clip whose trajectory still
    # bends stays full until it settles (without it, or at 0.05-0.06, calibration clips 123 and 127 fall to 18.6 and
    # 21.5 dB). The early hold (`reject_hold` 1 in the run's first 30%): a draft rejected while the layout forms is
    # followed by one more full step, since the drafts right after it can send a clip to another scene while its
    # checks read as a calm clip's (clip 159, 18.1 dB without it, lost by 8 of 11 settings of the other options).
    # The late scale (`verify_first_scale` 2 from 40% of the run): past the layout every rejection is the first
    # block's check (the last block's passes those drafts), and there a looser first check lengthens the runs of
    # drafts. The late shrink (`draft_shrink` 0.5 from 40% of the run): the drafted stream the output head gets is
    # pulled halfway from Newton's extrapolation toward the last full step's (the checks still read Newton's): over
    # a run of 6-8 drafts first-order extrapolation overshoots, and the shrunk draft buys back the detail the looser
    # check costs (at 1.5x without it clip 99 sat at 26.2 dB, at 1.75x 25.4; shrunk from the start instead of 40%,
    # clip 91's shape verdict turned). Threshold 0.012 -> 0.12 over the run (beta 10), 3 warm-up steps, runs of at
    # most 8 drafts, the cond branch deciding for both (the uncond call runs no check). On those prompts: 3.18x
    # fewer FLOPs, no clip under 26 dB (worst 26.3), mean 34.5 dB, one structural failure (a motion verdict that
    # turns under nearly every setting and the best peer, up to 45.5 dB: the scorer's). The defaults before:
    # without the shrink, the late scale at 1.5x (the previous default, 2026-12-07) 3.03x, worst 26.2, mean 35.2;
    # without the late scale too 2.83x, worst 26.7, mean 38.4; without the early hold too (until 2026-12-06) 3.03x, one clip
    # at 18.1 dB and 2 failures. Faster settings tried there each lose a clip: late scale 2.5x (26.0 dB), runs of
    # up to 10 drafts (25.6), the shrink from 30% (25.3), and, with the shrink from the start, threshold 0.014
    # (18.4), shrink 0.3 (25.0) and clip 91's shape.
    # On bench.caching's 48 evaluation prompts (run after): 3.21x, worst 29.2 dB, mean 34.4, no structural failure,
    # wall 85% of the FLOPs speedup; without the shrink 3.17x, worst 26.8, mean 32.5; the previous default 3.05x
    # (bench/results/caching.md).
    # HunyuanVideo only (the token-subset rule).
    "default": SpeCaConfig(order=1, cache="lean", tau0=0.012, beta=10.0, tau_min=0.0, metric="rel_l1",
                           signal="output", cfg_branches="leader", verify_first=True, verify_tokens=0.125,
                           draft_gate=0.04, warmup_steps=3, reject_hold=1, reject_hold_until=0.3, max_spec=8,
                           verify_first_scale=2.0, verify_first_scale_from=0.4, draft_shrink=0.5,
                           draft_shrink_from=0.4),
}
