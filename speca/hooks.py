"""SpeCa as diffusers hooks on any registered transformer family (no fork, no model names here).

A root hook on the transformer runs each call as at most two passes of the model's own
forward, each on a sub-batch of rows:
  1. a draft pass for the samples that speculate: every block is replaced by its draft except
     the verified block, which runs for real on the drafted input; its real and drafted image
     streams give each sample's error, and the step controller accepts or rejects per sample;
  2. a full pass for the samples on a full step plus the rejected ones (rollback: the rejected
     step itself is recomputed, not the next one); block hooks record the features the drafts
     are built from.
Samples never mix: a sample's result in a batch equals its result alone.

CFG keeps one decision per sample either way it is run: as separate calls
(`cache_context("cond")` then `"uncond"`) the first context to reach a step decides and the
others follow; as one concatenated batch, the family maps rows to samples and a sample's
rows share one error and one decision. Every context keeps its own feature cache.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .config import SpeCaConfig
from .controller import SampleRecord, StepController, error_from_partials, error_partials
from .forecast import NewtonForecaster
from .flops import block_flops
from .registry import BlockSpec, FamilySpec, TokenSubset, family_for, token_subset

_ROOT_HOOK = "speca_root"
_BLOCK_HOOK = "speca_block"
_NO_CONTEXT = "default"  # calls made outside any `cache_context` (e.g. DiTPipeline) share this state
_PREDICTION = "prediction"  # the forecaster's key for the model's output (the draft gate's lookback)


class _ContextState(BaseState):
    """Per cache-context state: its step counter and its feature cache."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.forecaster: NewtonForecaster | None = None


class _ContextStates(StateManager):
    """diffusers' per-context state manager; calls outside a cache context get a default one."""

    def current(self):
        return self._context

    def get_state(self) -> _ContextState:
        name = self._context.name if self._context is not None else _NO_CONTEXT
        if name not in self._state_cache:
            self._state_cache[name] = self._state_cls()
        return self._state_cache[name]

    def states(self) -> list[_ContextState]:
        return list(self._state_cache.values())

    def state_of(self, name: str) -> _ContextState:
        return self._state_cache[name]


@dataclass
class SampleSpeCaStats:
    """SpeCa's per-sample result for the stats record."""

    step_pattern: str
    full_steps: int
    accepted: int
    rejected: int
    errors: list[float]
    thresholds: list[float]
    compute_ratio: float
    cache_bytes: int

    @classmethod
    def from_record(cls, rec: SampleRecord, cache_bytes: int) -> "SampleSpeCaStats":
        return cls(rec.step_pattern, rec.full_steps, rec.accepted, rec.rejected, list(rec.errors),
                   list(rec.thresholds), rec.compute_ratio, cache_bytes)


@dataclass
class _Segment:
    """Consecutive rows of a pass that share one feature cache (one cache context's)."""

    forecaster: NewtonForecaster
    rows: torch.Tensor  # the rows' index in that cache's batch


@dataclass
class _Pass:
    """One pass of the model's forward in flight, handed to the block hooks through `_ActivePass`."""

    mode: str  # "draft" or "full"
    segments: list[_Segment]  # the pass's rows, in order: one segment per cache context in it
    step: int
    checks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (drafted, real) per check
    blocks: float = 0.0  # blocks executed, a token-subset run counted as its share of a block's FLOPs
    checking: bool = True  # False: a context that never decides (a follower under cfg_branches="leader") runs no check

    def record(self, key: str, value: torch.Tensor) -> None:
        start = 0
        for seg in self.segments:
            seg.forecaster.update(key, seg.rows, self.step, value[start:start + len(seg.rows)])
            start += len(seg.rows)

    def draft(self, key: str, shrink: float = 1.0) -> torch.Tensor:
        parts = [seg.forecaster.predict(key, seg.rows, self.step, shrink) for seg in self.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class _ActivePass:
    """The slot the root hook fills for the duration of one pass (None: hooks pass straight
    through); made per `apply_speca` and handed to each hook, never stored on the session."""

    def __init__(self) -> None:
        self.current: _Pass | None = None


class SpeCaSession:
    """One SpeCa-enabled transformer: config, family, per-sample controller, per-context state."""

    def __init__(self, transformer, config: SpeCaConfig, family: FamilySpec, scheduler=None,
                 error_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 token_layout: Callable[[], object] | None = None):
        self.config = config
        self.family = family
        self.scheduler = scheduler
        self.error_reduce = error_reduce
        self.token_layout = token_layout
        self.transformer = transformer
        self.guidance_scale: float | None = None
        self.blocks = family.iter_blocks(transformer)
        self.num_blocks = len(self.blocks)
        last = family.block_lists[-1]
        num_last = len(getattr(transformer, last))
        if not -num_last <= config.verify_block < num_last:
            raise ValueError(f"SpeCaConfig.verify_block={config.verify_block} is out of range for the "
                             f"{num_last} blocks of {family.name}'s {last}")
        self.verify_index = self.num_blocks - num_last + config.verify_block % num_last  # in all blocks
        blocks_after = self.num_blocks - 1 - self.verify_index
        self.verify_first = config.verify_first and self.verify_index != 0
        if config.signal == "prediction" and (family.head is None or self.verify_index != self.num_blocks - 1):
            raise ValueError(f"SpeCaConfig.signal='prediction' needs the verified block to be the last one "
                             f"(verify_block=-1) of a family with an output head; {family.name}: "
                             f"{'no head' if family.head is None else f'block {self.verify_index}'}")
        # Blocks a draft pass executes: the verified one, (lean cache) those after it, the first one
        # when it is verified too.
        self.draft_blocks = 1 + (blocks_after if config.cache == "lean" else 0) + int(self.verify_first)
        if config.verify_tokens < 1:
            self.draft_blocks -= 1 + int(self.verify_first)  # the checks run on a token subset instead
            checked = [self.verify_index] + ([0] if self.verify_first else [])
            for i in checked:
                if self.blocks[i][1].subset is None:
                    raise ValueError(f"SpeCaConfig.verify_tokens={config.verify_tokens}: {family.name}'s block "
                                     f"{type(self.blocks[i][0]).__name__} has no token-subset rule; use 1")
        self.states = _ContextStates(_ContextState)
        self.controller: StepController | None = None
        self.leader: str | None = None
        self.followers: dict[str, dict] = {}  # other cache contexts -> the arguments of their last call
        self.pending: dict[tuple[str, int], tuple[dict, torch.Tensor]] = {}  # joint CFG: (context, step) -> output
        self.num_steps_override: int | None = None
        self.last_stats: list[SampleSpeCaStats] = []
        self.peak_cache_bytes = 0
        self._handles: list = []  # forward hooks of the per-module cache, removed on disable

    def begin(self, num_steps: int) -> None:
        """Set the number of denoising steps for a custom loop (pipelines need not call this)."""
        self.num_steps_override = int(num_steps)

    def set_guidance_scale(self, scale: float | None) -> None:
        """The true-CFG scale of the generations to come (the pipeline does not tell its transformer).
        With `cfg_branches="guided"` checks measure the guided prediction `uncond + scale * (cond -
        uncond)`, the one the sampler steps with; None: no true CFG."""
        self.guidance_scale = None if scale is None else float(scale)

    def num_steps(self, context) -> int:
        if context is not None and context.num_inference_steps:
            return int(context.num_inference_steps)
        if self.num_steps_override:
            return self.num_steps_override
        if self.scheduler is not None and getattr(self.scheduler, "timesteps", None) is not None:
            return len(self.scheduler.timesteps)
        raise RuntimeError("SpeCa needs the number of denoising steps for its threshold schedule: apply it to the "
                           "pipeline (apply_speca(pipe, ...)), or call session.begin(num_steps) before the loop")

    def finish(self) -> None:
        """The one reset: keep the finished generation's per-sample stats, drop every cache."""
        if self.controller is not None:
            self.last_stats = self.stats()
        self.controller = None
        self.leader = None
        self.followers = {}
        self.pending = {}
        self.peak_cache_bytes = 0
        for st in self.states.states():
            st.reset()

    def stats(self) -> list[SampleSpeCaStats]:
        """Per-sample stats of the last finished generation (or of the one in flight)."""
        if self.controller is not None:
            return [SampleSpeCaStats.from_record(r, self.peak_cache_bytes) for r in self.controller.records]
        return list(self.last_stats)

    def cache_bytes(self) -> int:
        return sum(st.forecaster.nbytes() for st in self.states.states() if st.forecaster is not None)

    def _layout(self, local_tokens: int):
        """The shard layout of the forward in flight (None in one process), checked against the tokens seen."""
        if self.token_layout is None:
            return None
        layout = self.token_layout()
        if layout is None or layout.local != local_tokens:
            raise RuntimeError(f"SpeCa: the sequence-parallel layout ({layout}) does not hold this rank's "
                               f"{local_tokens} image tokens")
        return layout

    def token_subset(self, local_tokens: int, device) -> TokenSubset:
        """The token-subset check's tokens on this rank (the same draw on every rank)."""
        layout = self._layout(local_tokens)
        if layout is None:
            return token_subset(local_tokens, self.config.verify_tokens, device=device)
        return token_subset(layout.total, self.config.verify_tokens, layout.world, layout.rank, layout.local, device)

    def check_pair(self, drafted: torch.Tensor, real: torch.Tensor, block_input: torch.Tensor, args: dict,
                   last: bool, subset: TokenSubset | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What a check compares, over this rank's real image tokens (a token subset's, when given): a
        verified block's drafted and real output, or (signal "delta") update, output minus `block_input`,
        or (signal "prediction", the last block) the model's prediction, its output head on them."""
        if self.config.signal == "delta":
            drafted, real = drafted - block_input, real - block_input
        elif self.config.signal == "prediction" and last:
            drafted, real = (self.family.head(self.transformer, x, args) for x in (drafted, real))
        if subset is not None:
            return drafted[:, subset.real], real[:, subset.real]
        layout = self._layout(drafted.shape[1])
        if layout is not None:
            return drafted[:, :layout.valid], real[:, :layout.valid]
        return drafted, real


def _sample_partials(session: SpeCaSession, checks: list[tuple[torch.Tensor, torch.Tensor]], row_samples: list[int],
                     row_contexts: list[str]) -> tuple[list[int], torch.Tensor]:
    """Per-sample error partials (S, 2 per check) of a draft pass whose rows belong to `row_samples`.

    A sample's rows (a concatenated CFG batch, or joint CFG's cond and uncond rows) share one error:
    of the guided prediction (`cfg_branches="guided"`, rows of the "cond" and "uncond" contexts),
    otherwise their partials summed.
    """
    samples = sorted(set(row_samples))
    rows = {(c, s): i for i, (c, s) in enumerate(zip(row_contexts, row_samples))}
    cond_name, uncond_name = session.family.cfg_contexts
    guided = session.config.cfg_branches == "guided" and all((cond_name, s) in rows and (uncond_name, s) in rows
                                                             for s in samples)
    if session.config.cfg_branches == "guided" and not guided and len(set(row_contexts)) > 1:
        raise RuntimeError(f"SpeCa cfg_branches='guided': the CFG calls ran in cache contexts "
                           f"{sorted(set(row_contexts))}, not {session.family.name}'s {cond_name!r} / "
                           f"{uncond_name!r}; the guided prediction needs both")
    if guided and session.guidance_scale is None:
        raise RuntimeError("SpeCa cfg_branches='guided' needs the CFG scale: call session.set_guidance_scale(scale) "
                           "before generating (the batch job's engine does)")
    out = []
    for drafted, real in checks:
        if guided:
            cond = torch.tensor([rows[cond_name, s] for s in samples], device=drafted.device)
            uncond = torch.tensor([rows[uncond_name, s] for s in samples], device=drafted.device)
            w = session.guidance_scale
            drafted, real = ((x[uncond] + w * (x[cond] - x[uncond])) for x in (drafted, real))
            out.append(error_partials(drafted, real, session.config.metric))
            continue
        partials = error_partials(drafted, real, session.config.metric)
        index = torch.tensor([samples.index(s) for s in row_samples], device=partials.device)
        out.append(partials.new_zeros((len(samples), 2)).index_add_(0, index, partials))
    return samples, torch.cat(out, dim=1)


@torch.compiler.disable
def _decide(session: SpeCaSession, step: int, speculate: list[bool], row_samples: list[int], row_contexts: list[str],
            checks: list[tuple[torch.Tensor, torch.Tensor]]) -> list[bool]:
    """The data-dependent accept/reject, kept out of any compiled region: each sample's error (the
    largest of its checks'), its partial sums added over every rank first."""
    samples, partials = _sample_partials(session, checks, row_samples, row_contexts)
    if session.error_reduce is not None:
        partials = session.error_reduce(partials)
    c = session.config
    scales = c.check_scales(step, session.controller.num_steps, partials.shape[1] // 2)
    errors = error_from_partials(partials, c.metric, scales)
    return session.controller.decide(step, speculate, dict(zip(samples, errors)))


@torch.compiler.disable
def _lookback(session: SpeCaSession, step: int, full_out: torch.Tensor, full_rows: list[int], contexts: list,
              row_sample: list[int], batch: int) -> None:
    """The draft gate's signal, at a full step: each row's prediction drafted from its earlier full steps
    against the real one, the error divided by the draft's remainder factor; a sample's rows (its CFG
    branches) summed, over every rank; then the real prediction joins the forecaster's nodes."""
    metric = session.config.metric
    power = 2 if metric == "rel_l2" else 1
    sums: dict[int, torch.Tensor] = {}
    for i, (_, state, _) in enumerate(contexts):
        pos = [j for j, r in enumerate(full_rows) if i * batch <= r < (i + 1) * batch]
        if not pos:
            continue
        rows = torch.tensor([full_rows[j] - i * batch for j in pos])
        real = full_out[torch.tensor(pos, device=full_out.device)]
        forecaster = state.forecaster
        if forecaster.has(_PREDICTION):
            factor = forecaster.remainder_factor(rows, step)
            partials = error_partials(forecaster.predict(_PREDICTION, rows, step), real, metric).cpu()
            for j, f in zip(pos, factor.tolist()):
                if not math.isnan(f):
                    b = row_sample[full_rows[j]]
                    row = partials[pos.index(j)] * torch.tensor([1.0 / f ** power, 1.0], dtype=torch.float64)
                    sums[b] = sums[b] + row if b in sums else row
        forecaster.update(_PREDICTION, rows, step, real)
    if not sums:
        return
    samples = sorted(sums)
    partials = torch.stack([sums[b] for b in samples])
    if session.error_reduce is not None:
        partials = session.error_reduce(partials.to(full_out.device)).cpu()
    session.controller.note_lookback(step, {b: (float(p[0]), float(p[1])) for b, p in zip(samples, partials)})


def _samples_per_call(rows: list[int], row_sample: list[int], batch: int) -> list[int]:
    """Each sample once per context whose call `rows` cover: a concatenated CFG batch's rows of one sample
    are one call's worth of compute for it, as each context's call counts one call in the total."""
    return [b for _, b in sorted({(r // batch, row_sample[r]) for r in rows})]


def _check_same(args: dict, expected: dict, context: str, step: int) -> None:
    """Joint CFG ran this call already at the leader's call: refuse if its arguments are not those it assumed."""
    for key, value in expected.items():
        got = args.get(key)
        same = (torch.equal(got, value) if isinstance(value, torch.Tensor) and isinstance(got, torch.Tensor)
                else got is value or (not isinstance(got, torch.Tensor) and got == value))
        if not same:
            raise RuntimeError(f"SpeCa joint CFG: the {context!r} call at step {step} got another "
                               f"{key!r} than its previous call and the leading context's call (the latent, timestep "
                               f"and guidance must be the leader's, the text arguments fixed); use cfg_branches='leader'")


class _SpeCaRootHook(ModelHook):
    _is_stateful = True

    def __init__(self, session: SpeCaSession, active: _ActivePass):
        super().__init__()
        self.session = session
        self.active = active
        self.state_manager = session.states  # found by diffusers' `cache_context`, which sets its context
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module):
        self._signature = inspect.signature(module.forward)
        return module

    def reset_state(self, module):
        self.session.finish()
        return module

    def new_forward(self, module, *args, **kwargs):
        s = self.session
        call = self._signature.bind(*args, **kwargs)
        call.apply_defaults()
        a = dict(call.arguments)
        return_dict = a.pop("return_dict")
        batch = a["hidden_states"].shape[0]
        sample_of = s.family.samples(module, a, batch) if s.family.samples is not None else list(range(batch))
        num_samples = max(sample_of) + 1

        context = self.state_manager.current()
        name = context.name if context is not None else _NO_CONTEXT
        st = self.state_manager.get_state()
        num_steps = s.num_steps(context)
        if st.step >= num_steps:  # a new generation in a loop that never reset the hooks
            s.finish()
        if st.step == 0 and (s.controller is None or s.leader == name):
            s.finish()
            s.controller = StepController(s.config, num_samples, num_steps)
            s.leader = name
        if len(s.controller.records) != num_samples:
            raise ValueError(f"SpeCa: batch size changed from {len(s.controller.records)} to {num_samples} samples "
                             f"within a generation")
        step = st.step
        st.step += 1
        if st.forecaster is None:
            st.forecaster = NewtonForecaster(s.config.order, batch)
        ctrl = s.controller
        if name != s.leader:
            s.followers[name] = a
        done = s.pending.pop((name, step), None)
        if done is not None:  # joint CFG computed this call at the leader's call
            _check_same(a, *done[:1], name, step)
            ctrl.count_blocks(list(range(num_samples)), 0, s.num_blocks)
            return self._result(done[1], return_dict)

        leader = step not in ctrl.decisions
        # Joint CFG: the leading context's call runs every other context's too, in one batch, so one check
        # sees all of a sample's branches; the others' calls then get their rows.
        contexts = [(name, st, a)]
        if leader and s.config.cfg_branches != "leader":
            contexts += [(other, s.states.state_of(other), {**a, **{k: v for k, v in fa.items()
                                                                      if k in s.family.branch_args}})
                         for other, fa in s.followers.items()]
        joint = self._stack([c[2] for c in contexts], batch)
        row_sample = sample_of * len(contexts)
        row_context = [c[0] for c in contexts for _ in range(batch)]
        speculate, accepted = (ctrl.plan(step), None) if leader else ctrl.decisions[step]
        rows = range(len(row_sample))
        draft_rows = [r for r in rows if speculate[row_sample[r]] and (leader or accepted[row_sample[r]])]
        out = None
        # Under cfg_branches="leader" only the leading context's checks decide: a follower's call runs no check
        # block and keeps no check nodes (its drafts are the leader's verdict applied to its own cache).
        keeps_checks = name == s.leader or s.config.cfg_branches != "leader"
        if leader and not keeps_checks:
            raise RuntimeError(f"SpeCa cfg_branches='leader': context {name!r} reached step {step} before the "
                               f"leading context {s.leader!r}; the CFG calls must come in the same order every step")
        if draft_rows:
            draft_out, checks, blocks = self._pass(module, joint, "draft", draft_rows, step, contexts, batch,
                                                   leader)
            ctrl.count_blocks(_samples_per_call(draft_rows, row_sample, batch), blocks, 0)
            if leader:
                accepted = _decide(s, step, speculate, [row_sample[r] for r in draft_rows],
                                   [row_context[r] for r in draft_rows], checks)
            out = torch.empty((len(row_sample), *draft_out.shape[1:]), dtype=draft_out.dtype, device=draft_out.device)
            out[torch.tensor(draft_rows, device=out.device)] = draft_out
        elif leader:
            accepted = ctrl.decide(step, speculate, {})
        full_rows = [r for r in rows if not (speculate[row_sample[r]] and accepted[row_sample[r]])]
        if full_rows:
            full_out, _, blocks = self._pass(module, joint, "full", full_rows, step, contexts, batch,
                                             keeps_checks)
            if s.config.draft_gate < math.inf:
                _lookback(s, step, full_out, full_rows, contexts, row_sample, batch)
            for _, state, _ in contexts:
                state.forecaster.commit(step)
            ctrl.count_blocks(_samples_per_call(full_rows, row_sample, batch), blocks, 0)
            if out is None:
                out = full_out
            else:
                out[torch.tensor(full_rows, device=out.device)] = full_out
        ctrl.count_blocks(list(range(num_samples)), 0, s.num_blocks)
        for i, (other, _, expected) in enumerate(contexts[1:], start=1):
            s.pending[other, step] = (expected, out[i * batch:(i + 1) * batch])
        s.peak_cache_bytes = max(s.peak_cache_bytes, s.cache_bytes())
        return self._result(out[:batch], return_dict)

    @staticmethod
    def _result(out: torch.Tensor, return_dict: bool):
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _stack(self, calls: list[dict], batch: int) -> dict:
        """One call's arguments for several contexts' calls: batched arguments concatenated (one row that
        the model broadcasts over the batch, e.g. a single negative prompt's embedding, repeated)."""
        if len(calls) == 1:
            return calls[0]
        out = dict(calls[0])
        for k in self.session.family.batched_args:
            values = [c.get(k) for c in calls]
            if all(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] in (1, batch) for v in values):
                out[k] = torch.cat([v.expand(batch, *v.shape[1:]) for v in values])
        return out

    def _pass(self, module, a: dict, mode: str, rows: list[int], step: int, contexts: list, batch: int,
              checking: bool) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], float]:
        """The model's forward on `rows` of the (joint) batch; row r is row r % batch of context r // batch.
        `checking`: the pass runs the checks (a draft pass) or keeps their nodes (a full pass)."""
        kwargs = dict(a)
        total = batch * len(contexts)
        if len(rows) != total:
            index = torch.tensor(rows, device=a["hidden_states"].device)
            for k in self.session.family.batched_args:
                v = kwargs.get(k)
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == total:
                    kwargs[k] = v.index_select(0, index.to(v.device))
        segments = []
        for i, (_, state, _) in enumerate(contexts):
            mine = [r - i * batch for r in rows if i * batch <= r < (i + 1) * batch]
            if mine:
                segments.append(_Segment(state.forecaster, torch.tensor(mine)))
        current = _Pass(mode, segments, step, checking=checking)
        self.active.current = current
        try:
            out = self.fn_ref.original_forward(**kwargs, return_dict=False)[0]
        finally:
            self.active.current = None
        return out, current.checks, current.blocks


class _SpeCaBlockHook(ModelHook):
    def __init__(self, session: SpeCaSession, active: _ActivePass, index: int, spec: BlockSpec):
        super().__init__()
        self.config = session.config
        self.session = session
        self.active = active
        self.spec = spec
        self.prefix = f"block{index}"  # position among all blocks, in execution order
        self.is_verify = index == session.verify_index
        self.is_first_check = index == 0 and session.verify_first
        self.before_verify = index < session.verify_index
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module):
        self._signature = inspect.signature(module.forward)
        return module

    def new_forward(self, module, *args, **kwargs):
        p = self.active.current
        original = self.fn_ref.original_forward
        if p is None:
            return original(*args, **kwargs)
        spec = self.spec
        call = self._signature.bind(*args, **kwargs)
        call.apply_defaults()
        streams = {name: call.arguments[name] for name in spec.streams}
        image = spec.image

        def run(replaced: dict | None = None, cost: float = 1.0):
            p.blocks += cost
            if replaced is None:
                return original(*args, **kwargs)
            b = inspect.BoundArguments(self._signature, {**call.arguments, **replaced})
            return original(*b.args, **b.kwargs)

        def run_subset(replaced: dict | None = None) -> tuple[TokenSubset, torch.Tensor, torch.Tensor]:
            """The block on the check's token subset: (the subset, its image stream in, its image stream out);
            counted as the whole subset's share of the whole block's FLOPs."""
            full = {**call.arguments, **(replaced or {})}
            video, text = full[image], sum(full[n].shape[1] for n in spec.streams if n != image)
            sub = self.session.token_subset(video.shape[1], video.device)
            args = spec.subset(full, sub)
            total = video.shape[1] if self.session.token_layout is None else self.session.token_layout().total
            share = block_flops(video.shape[-1], sub.drawn + text) / block_flops(video.shape[-1], total + text)
            return sub, args[image], spec.unpack(run(args, share))[image]

        lean = self.config.cache == "lean"
        subset = self.config.verify_tokens < 1
        if p.mode == "full":
            if lean and self.is_verify:
                for name, value in streams.items():
                    p.record(f"in.{name}", value)
                out = run()
                p.record("out", spec.unpack(out)[image])
                if subset and p.checking:
                    p.record("sub.out", run_subset()[2])
                return out
            if lean and self.is_first_check:
                out = run()
                if not p.checking:
                    return out
                if subset:
                    p.record("first.sub", run_subset()[2])
                else:
                    p.record("first.out", spec.unpack(out)[image])
                return out
            return run()
        # Draft pass.
        if lean:
            if self.is_first_check and p.checking:  # the real latent through the first block, against its draft
                if subset:
                    sub, x, real = run_subset()
                    p.checks.append(self.session.check_pair(p.draft("first.sub"), real, x, call.arguments, False, sub))
                else:
                    real = run()
                    p.checks.append(self.session.check_pair(p.draft("first.out"), spec.unpack(real)[image],
                                                            streams[image], call.arguments, False))
                return spec.pack(streams)
            if self.before_verify:
                return spec.pack(streams)  # skipped: re-drafted at the verified block
            if not self.is_verify:
                return run()
            drafted_in = {name: p.draft(f"in.{name}") for name in spec.streams}
            if subset:
                if p.checking:
                    sub, x, real = run_subset(drafted_in)
                    p.checks.append(self.session.check_pair(p.draft("sub.out"), real, x, call.arguments, True, sub))
                shrink = self.config.shrink(p.step, self.session.controller.num_steps)
                return spec.pack({**drafted_in, image: p.draft("out", shrink)})
            real = run(drafted_in)
            p.checks.append(self.session.check_pair(p.draft("out"), spec.unpack(real)[image], drafted_in[image],
                                                    call.arguments, True))
            return real
        drafted = spec.redraft(module, streams, call.arguments, lambda key: p.draft(f"{self.prefix}.{key}"))
        if not (self.is_verify or self.is_first_check):
            return spec.pack(drafted)
        real = run()
        p.checks.append(self.session.check_pair(drafted[image], spec.unpack(real)[image], streams[image],
                                                call.arguments, self.is_verify))
        return real


def _capture_hooks(active: _ActivePass, block, index: int, spec: BlockSpec) -> list:
    """Forward hooks that store module outputs (before their gates) during full passes."""

    def recorder(keys):
        def hook(_module, _inputs, output):
            p = active.current
            if p is not None and p.mode == "full":
                for key, value in zip(keys, output if isinstance(output, tuple) else (output,)):
                    p.record(f"block{index}.{key}", value)
        return hook

    return [block.get_submodule(name).register_forward_hook(recorder(keys)) for name, keys in spec.captures.items()]


def _transformer(target):
    return getattr(target, "transformer", target)


def apply_speca(target, config: SpeCaConfig | None = None, *,
                error_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                token_layout: Callable[[], object] | None = None) -> SpeCaSession:
    """Enable SpeCa on a pipeline or transformer of a registered family; returns the session.

    Families: HunyuanVideo, FLUX, DiT (see `speca.registry.supported()`); anything else is
    refused before any hook is added. `error_reduce` receives the per-row error partial sums
    (B, 2) and returns them summed over every rank that holds a shard of the tokens (sequence
    parallelism), so all ranks decide alike. `token_layout()` gives the shard layout of the forward
    in flight (`pipeline.parallel.ShardLayout`: `total`, `world`, `rank`, `local` tokens per rank,
    the first `valid` of them real), so errors leave padding out and a token-subset check draws
    one subset for the whole clip.

    Example:
        >>> session = apply_speca(pipe, SpeCaConfig.from_name("default"))
        >>> video = pipe(prompt="a red circle moving quickly left on a blue background", ...).frames
        >>> session.stats()[0].step_pattern  # e.g. 'FFFSSSRSS...'
        >>> disable_speca(pipe)
    """
    transformer = _transformer(target)
    family = family_for(transformer)
    if getattr(transformer, "_speca_session", None) is not None:
        raise RuntimeError("SpeCa is already enabled on this transformer; call disable_speca() first")
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError("a diffusers cache (enable_cache) is active on this transformer; disable it before SpeCa")
    if family.check is not None:
        family.check(transformer)
    config = config or SpeCaConfig()
    session = SpeCaSession(transformer, config, family, getattr(target, "scheduler", None), error_reduce,
                           token_layout)
    active = _ActivePass()  # the root hook's pass in flight, read by the block and capture hooks
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_SpeCaRootHook(session, active), _ROOT_HOOK)
    for i, (block, spec) in enumerate(session.blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_SpeCaBlockHook(session, active, i, spec),
                                                                        _BLOCK_HOOK)
        if config.cache == "module":
            session._handles += _capture_hooks(active, block, i, spec)
    transformer._speca_session = session
    return session


def disable_speca(target) -> None:
    """Remove SpeCa; the transformer's forward is the original again."""
    transformer = _transformer(target)
    session = getattr(transformer, "_speca_session", None)
    if session is None:
        return
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(_ROOT_HOOK, recurse=False)
    for block, _ in session.blocks:
        HookRegistry.check_if_exists_or_initialize(block).remove_hook(_BLOCK_HOOK, recurse=False)
    for h in session._handles:
        h.remove()
    registry.invalidate_child_registries_cache()
    session.finish()
    transformer._speca_session = None


def get_session(target) -> SpeCaSession | None:
    return getattr(_transformer(target), "_speca_session", None)
