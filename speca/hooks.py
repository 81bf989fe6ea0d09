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
class _Pass:
    """One pass of the model's forward in flight, handed to the block hooks through `_ActivePass`."""

    mode: str  # "draft" or "full"
    rows: torch.Tensor  # batch rows in this pass (the forecaster's row index)
    step: int
    forecaster: NewtonForecaster
    checks: list[torch.Tensor] = field(default_factory=list)  # (B, 2) error partials per verified block
    blocks: float = 0.0  # blocks executed, a token-subset run counted as its share of a block's FLOPs

    def record(self, key: str, value: torch.Tensor) -> None:
        self.forecaster.update(key, self.rows, self.step, value)

    def draft(self, key: str) -> torch.Tensor:
        return self.forecaster.predict(key, self.rows, self.step)


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
        self.num_steps_override: int | None = None
        self.last_stats: list[SampleSpeCaStats] = []
        self.peak_cache_bytes = 0
        self._handles: list = []  # forward hooks of the per-module cache, removed on disable

    def begin(self, num_steps: int) -> None:
        """Set the number of denoising steps for a custom loop (pipelines need not call this)."""
        self.num_steps_override = int(num_steps)

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

    def error_partials(self, drafted: torch.Tensor, real: torch.Tensor, block_input: torch.Tensor,
                       subset: TokenSubset | None = None) -> torch.Tensor:
        """Error partial sums of a verified block over this rank's real image tokens (of a token
        subset's, when given): of its output, or (signal "delta") of its update, output minus `block_input`."""
        if self.config.signal == "delta":
            drafted, real = drafted - block_input, real - block_input
        if subset is not None:
            drafted, real = drafted[:, subset.real], real[:, subset.real]
        else:
            layout = self._layout(drafted.shape[1])
            if layout is not None:
                drafted, real = drafted[:, :layout.valid], real[:, :layout.valid]
        return error_partials(drafted, real, self.config.metric)


@torch.compiler.disable
def _decide(session: SpeCaSession, step: int, speculate: list[bool], row_samples: list[int],
            partials: torch.Tensor) -> list[bool]:
    """The data-dependent accept/reject, kept out of any compiled region.

    `partials` has one row per drafted batch row; rows of one sample (a concatenated CFG batch)
    are summed first, so the sample gets one error over all its rows.
    """
    if session.error_reduce is not None:
        partials = session.error_reduce(partials)
    samples = sorted(set(row_samples))
    index = torch.tensor([samples.index(s) for s in row_samples], device=partials.device)
    per_sample = partials.new_zeros((len(samples), partials.shape[1])).index_add_(0, index, partials)
    errors = error_from_partials(per_sample, session.config.metric)
    return session.controller.decide(step, speculate, dict(zip(samples, errors)))


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
        leader = step not in ctrl.decisions
        speculate, accepted = (ctrl.plan(step), None) if leader else ctrl.decisions[step]
        draft_rows = [r for r in range(batch) if speculate[sample_of[r]] and (leader or accepted[sample_of[r]])]
        out = None
        if draft_rows:
            draft_out, partials, blocks = self._pass(module, a, "draft", draft_rows, step, st.forecaster, batch)
            ctrl.count_blocks(sorted({sample_of[r] for r in draft_rows}), blocks, 0)
            if leader:
                accepted = _decide(s, step, speculate, [sample_of[r] for r in draft_rows], partials)
            out = torch.empty((batch, *draft_out.shape[1:]), dtype=draft_out.dtype, device=draft_out.device)
            out[torch.tensor(draft_rows, device=out.device)] = draft_out
        elif leader:
            accepted = ctrl.decide(step, speculate, {})
        full_rows = [r for r in range(batch) if not (speculate[sample_of[r]] and accepted[sample_of[r]])]
        if full_rows:
            full_out, _, blocks = self._pass(module, a, "full", full_rows, step, st.forecaster, batch)
            st.forecaster.commit(step)
            ctrl.count_blocks(sorted({sample_of[r] for r in full_rows}), blocks, 0)
            if out is None:
                out = full_out
            else:
                out[torch.tensor(full_rows, device=out.device)] = full_out
        ctrl.count_blocks(list(range(num_samples)), 0, s.num_blocks)
        s.peak_cache_bytes = max(s.peak_cache_bytes, s.cache_bytes())
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _pass(self, module, a: dict, mode: str, rows: list[int], step: int, forecaster: NewtonForecaster,
              batch: int) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        kwargs = dict(a)
        if len(rows) != batch:
            index = torch.tensor(rows, device=a["hidden_states"].device)
            for k in self.session.family.batched_args:
                v = kwargs.get(k)
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
                    kwargs[k] = v.index_select(0, index.to(v.device))
        current = _Pass(mode, torch.tensor(rows), step, forecaster)
        self.active.current = current
        try:
            out = self.fn_ref.original_forward(**kwargs, return_dict=False)[0]
        finally:
            self.active.current = None
        return out, torch.cat(current.checks, dim=1) if current.checks else None, current.blocks


class _SpeCaBlockHook(ModelHook):
    def __init__(self, session: SpeCaSession, active: _ActivePass, index: int, spec: BlockSpec):
        super().__init__()
        self.config = session.config
        self.session = session
        self.active = active
        self.measure = session.error_partials
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
                if subset:
                    p.record("sub.out", run_subset()[2])
                return out
            if lean and self.is_first_check:
                out = run()
                if subset:
                    p.record("first.sub", run_subset()[2])
                else:
                    p.record("first.out", spec.unpack(out)[image])
                return out
            return run()
        # Draft pass.
        if lean:
            if self.is_first_check:  # the real latent through the first block, against its draft
                if subset:
                    sub, x, real = run_subset()
                    p.checks.append(self.measure(p.draft("first.sub"), real, x, sub))
                else:
                    real = run()
                    p.checks.append(self.measure(p.draft("first.out"), spec.unpack(real)[image], streams[image]))
                return spec.pack(streams)
            if self.before_verify:
                return spec.pack(streams)  # skipped: re-drafted at the verified block
            if not self.is_verify:
                return run()
            drafted_in = {name: p.draft(f"in.{name}") for name in spec.streams}
            if subset:
                sub, x, real = run_subset(drafted_in)
                p.checks.append(self.measure(p.draft("sub.out"), real, x, sub))
                return spec.pack({**drafted_in, image: p.draft("out")})
            real = run(drafted_in)
            p.checks.append(self.measure(p.draft("out"), spec.unpack(real)[image], drafted_in[image]))
            return real
        drafted = spec.redraft(module, streams, call.arguments, lambda key: p.draft(f"{self.prefix}.{key}"))
        if not (self.is_verify or self.is_first_check):
            return spec.pack(drafted)
        real = run()
        p.checks.append(self.measure(drafted[image], spec.unpack(real)[image], streams[image]))
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
