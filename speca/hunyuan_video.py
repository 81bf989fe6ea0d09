"""SpeCa on diffusers' `HunyuanVideoTransformer3DModel`, through diffusers hooks (no fork).

A root hook on the transformer runs each call as at most two passes of the model's own
forward, each on a sub-batch:
  1. a draft pass for the samples that speculate: every block is replaced by its draft except
     the verified block, which runs for real on the drafted input; its real and drafted outputs
     give each sample's error, and the step controller accepts or rejects per sample;
  2. a full pass for the samples on a full step plus the rejected ones (rollback: the rejected
     step itself is recomputed, not the next one); block hooks record the features the drafts
     are built from.
Samples never mix: a sample's result in a batch equals its result alone.

With true CFG (`cache_context("cond")` then `"uncond"`), the first context to reach a step
decides and the others follow, so a sample's cond and uncond passes share one decision.
Every context keeps its own feature cache.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from .config import SpeCaConfig
from .controller import SampleRecord, StepController, error_from_partials, error_partials
from .forecast import NewtonForecaster

_ROOT_HOOK = "speca_root"
_BLOCK_HOOK = "speca_block"
_BATCHED_ARGS = ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "pooled_projections",
                 "timestep", "guidance")


class _ContextState:
    """Per cache-context state: its step counter and its feature cache."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.forecaster: NewtonForecaster | None = None


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


class SpeCaSession:
    """Shared state of one SpeCa-enabled transformer: config, controller, current pass."""

    def __init__(self, transformer, config: SpeCaConfig, scheduler=None,
                 error_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 valid_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.config = config
        self.scheduler = scheduler
        self.error_reduce = error_reduce
        self.valid_tokens = valid_tokens
        self.num_double = len(transformer.transformer_blocks)
        self.num_single = len(transformer.single_transformer_blocks)
        self.num_blocks = self.num_double + self.num_single
        if not -self.num_single <= config.verify_block < self.num_single:
            raise ValueError(f"SpeCaConfig.verify_block={config.verify_block} is out of range for "
                             f"{self.num_single} single-stream blocks")
        self.verify_index = self.num_double + config.verify_block % self.num_single  # in all blocks
        blocks_after = self.num_blocks - 1 - self.verify_index
        # Blocks a draft pass executes: the verified one, plus (lean cache) those after it.
        self.draft_blocks = 1 + (blocks_after if config.cache == "lean" else 0)
        self.controller: StepController | None = None
        self.leader: str | None = None
        self.num_steps_override: int | None = None
        self.last_stats: list[SampleSpeCaStats] = []
        self.peak_cache_bytes = 0
        self.contexts: dict[str, _ContextState] = {}
        # The pass in flight, read by the block hooks.
        self.mode: str | None = None  # None (pass through), "draft" or "full"
        self.rows: torch.Tensor | None = None
        self.step = 0
        self.forecaster: NewtonForecaster | None = None
        self.partials: torch.Tensor | None = None
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
        """Close the current generation: keep its per-sample stats, drop every cache."""
        if self.controller is not None:
            self.last_stats = [SampleSpeCaStats.from_record(r, self.peak_cache_bytes) for r in self.controller.records]
        self.controller = None
        self.leader = None
        self.peak_cache_bytes = 0
        for st in self.contexts.values():
            st.reset()

    def stats(self) -> list[SampleSpeCaStats]:
        """Per-sample stats of the last finished generation (or of the one in flight)."""
        if self.controller is not None:
            return [SampleSpeCaStats.from_record(r, self.peak_cache_bytes) for r in self.controller.records]
        return list(self.last_stats)

    def cache_bytes(self) -> int:
        return sum(st.forecaster.nbytes() for st in self.contexts.values() if st.forecaster is not None)

    # Feature cache access for the block hooks.
    def record(self, key: str, value: torch.Tensor) -> None:
        self.forecaster.update(key, self.rows, self.step, value)

    def draft(self, key: str) -> torch.Tensor:
        return self.forecaster.predict(key, self.rows, self.step)

    def measure(self, drafted: torch.Tensor, real: torch.Tensor) -> None:
        """Error partial sums of the verified block over this rank's real video tokens."""
        if self.valid_tokens is not None:
            drafted, real = self.valid_tokens(drafted), self.valid_tokens(real)
        self.partials = error_partials(drafted, real, self.config.metric)


class _ContextTracker(StateManager):
    """diffusers sets the pipeline's cache context on every StateManager of a stateful hook."""

    def current(self):
        return self._context


class _SpeCaRootHook(ModelHook):
    _is_stateful = True

    def __init__(self, session: SpeCaSession):
        super().__init__()
        self.session = session
        self.context_tracker = _ContextTracker(_ContextState)
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

        context = self.context_tracker.current()
        name = context.name if context is not None else "default"
        st = s.contexts.setdefault(name, _ContextState())
        num_steps = s.num_steps(context)
        if st.step >= num_steps:  # a new generation in a loop that never reset the hooks
            st.reset()
        if st.step == 0 and (s.controller is None or s.leader == name):
            s.finish()
            s.controller = StepController(s.config, batch, num_steps)
            s.leader = name
        if len(s.controller.records) != batch:
            raise ValueError(f"SpeCa: batch size changed from {len(s.controller.records)} to {batch} within a generation")
        step = st.step
        st.step += 1
        if st.forecaster is None:
            st.forecaster = NewtonForecaster(s.config.order, batch)

        ctrl = s.controller
        leader = step not in ctrl.decisions
        speculate, accepted = (ctrl.plan(step), None) if leader else ctrl.decisions[step]
        draft_rows = [b for b in range(batch) if speculate[b] and (leader or accepted[b])]
        out = None
        if draft_rows:
            draft_out = self._pass(module, a, "draft", draft_rows, step, st.forecaster, batch)
            ctrl.count_blocks(draft_rows, s.draft_blocks, 0)
            if leader:
                partials = s.partials if s.error_reduce is None else s.error_reduce(s.partials)
                errors = error_from_partials(partials, s.config.metric)
                accepted = ctrl.decide(step, speculate, dict(zip(draft_rows, errors)))
            out = torch.empty((batch, *draft_out.shape[1:]), dtype=draft_out.dtype, device=draft_out.device)
            out[torch.tensor(draft_rows, device=out.device)] = draft_out
        elif leader:
            accepted = ctrl.decide(step, speculate, {})
        full_rows = [b for b in range(batch) if not (speculate[b] and accepted[b])]
        if full_rows:
            full_out = self._pass(module, a, "full", full_rows, step, st.forecaster, batch)
            st.forecaster.commit(step)
            ctrl.count_blocks(full_rows, s.num_blocks, 0)
            if out is None:
                out = full_out
            else:
                out[torch.tensor(full_rows, device=out.device)] = full_out
        ctrl.count_blocks(list(range(batch)), 0, s.num_blocks)
        s.peak_cache_bytes = max(s.peak_cache_bytes, s.cache_bytes())
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)

    def _pass(self, module, a: dict, mode: str, rows: list[int], step: int, forecaster, batch: int) -> torch.Tensor:
        s = self.session
        kwargs = dict(a)
        if len(rows) != batch:
            index = torch.tensor(rows, device=a["hidden_states"].device)
            for k in _BATCHED_ARGS:
                v = kwargs.get(k)
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch:
                    kwargs[k] = v.index_select(0, index.to(v.device))
        s.mode, s.rows, s.step, s.forecaster, s.partials = mode, torch.tensor(rows), step, forecaster, None
        try:
            return self.fn_ref.original_forward(**kwargs, return_dict=False)[0]
        finally:
            s.mode = None


class _SpeCaBlockHook(ModelHook):
    def __init__(self, session: SpeCaSession, index: int, double: bool):
        super().__init__()
        self.session = session
        self.index = index  # position among all blocks (double first, then single)
        self.double = double
        self.prefix = f"block{index}"
        self.is_verify = index == session.verify_index
        self.before_verify = index < session.verify_index

    def new_forward(self, module, hidden_states, encoder_hidden_states, temb, *args, **kwargs):
        s = self.session
        original = self.fn_ref.original_forward
        if s.mode is None:
            return original(hidden_states, encoder_hidden_states, temb, *args, **kwargs)
        lean = s.config.cache == "lean"
        if s.mode == "full":
            if lean and self.is_verify:
                s.record("in.h", hidden_states)
                s.record("in.e", encoder_hidden_states)
                out = original(hidden_states, encoder_hidden_states, temb, *args, **kwargs)
                s.record("out.h", out[0])
                return out
            return original(hidden_states, encoder_hidden_states, temb, *args, **kwargs)
        # Draft pass.
        if lean:
            if self.before_verify:
                return hidden_states, encoder_hidden_states  # skipped: re-drafted at the verified block
            if not self.is_verify:
                return original(hidden_states, encoder_hidden_states, temb, *args, **kwargs)
            real = original(s.draft("in.h"), s.draft("in.e"), temb, *args, **kwargs)
            s.measure(s.draft("out.h"), real[0])
            return real
        drafted = self._draft_block(module, hidden_states, encoder_hidden_states, temb)
        if not self.is_verify:
            return drafted
        real = original(hidden_states, encoder_hidden_states, temb, *args, **kwargs)
        s.measure(drafted[0], real[0])
        return real

    def _draft_block(self, module, hidden, enc, temb):
        """The block with its attention and MLP outputs drafted; gates and residuals are real."""
        s, p = self.session, self.prefix
        if self.double:
            _, gate_msa, _, _, gate_mlp = module.norm1(hidden, emb=temb)
            _, c_gate_msa, _, _, c_gate_mlp = module.norm1_context(enc, emb=temb)
            hidden = hidden + s.draft(f"{p}.attn") * gate_msa.unsqueeze(1)
            enc = enc + s.draft(f"{p}.attn_context") * c_gate_msa.unsqueeze(1)
            hidden = hidden + gate_mlp.unsqueeze(1) * s.draft(f"{p}.ff")
            enc = enc + c_gate_mlp.unsqueeze(1) * s.draft(f"{p}.ff_context")
            return hidden, enc
        text_len = enc.shape[1]
        joint = torch.cat([hidden, enc], dim=1)
        _, gate = module.norm(joint, emb=temb)
        joint = gate.unsqueeze(1) * s.draft(f"{p}.proj_out") + joint
        return joint[:, :-text_len], joint[:, -text_len:]


def _capture_hooks(session: SpeCaSession, block, index: int, double: bool) -> list:
    """Forward hooks that store module outputs (before their gates) during full passes."""

    def recorder(*keys):
        def hook(_module, _inputs, output):
            if session.mode == "full":
                for key, value in zip(keys, output if isinstance(output, tuple) else (output,)):
                    session.record(f"block{index}.{key}", value)
        return hook

    if double:
        return [block.attn.register_forward_hook(recorder("attn", "attn_context")),
                block.ff.register_forward_hook(recorder("ff")),
                block.ff_context.register_forward_hook(recorder("ff_context"))]
    return [block.proj_out.register_forward_hook(recorder("proj_out"))]


def _resolve(target):
    transformer = getattr(target, "transformer", target)
    if not (hasattr(transformer, "transformer_blocks") and hasattr(transformer, "single_transformer_blocks")):
        raise TypeError(f"SpeCa's HunyuanVideo adapter needs a HunyuanVideoTransformer3DModel or a pipeline holding "
                        f"one, got {type(target).__name__}")
    return transformer, getattr(target, "scheduler", None)


def apply_speca(target, config: SpeCaConfig | None = None, *,
                error_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
                valid_tokens: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SpeCaSession:
    """Enable SpeCa on a HunyuanVideo pipeline or transformer; returns the session (stats, begin()).

    `error_reduce` receives the per-sample error partial sums (B, 2) and returns them summed
    over every rank that holds a shard of the tokens (sequence parallelism), so all ranks
    decide alike. `valid_tokens` maps a rank's local video-token tensor (B, N_local, D) to its
    real tokens, dropping any padding a sequence-parallel split added.

    Example:
        >>> session = apply_speca(pipe, SpeCaConfig.from_name("default"))
        >>> video = pipe(prompt="a red circle moving left on a blue background", ...).frames
        >>> session.stats()[0].step_pattern  # e.g. 'FFFSSSRSS...'
        >>> disable_speca(pipe)
    """
    transformer, scheduler = _resolve(target)
    if getattr(transformer, "_speca_session", None) is not None:
        raise RuntimeError("SpeCa is already enabled on this transformer; call disable_speca() first")
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError("a diffusers cache (enable_cache) is active on this transformer; disable it before SpeCa")
    config = config or SpeCaConfig()
    session = SpeCaSession(transformer, config, scheduler, error_reduce, valid_tokens)
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_SpeCaRootHook(session), _ROOT_HOOK)
    blocks = [(b, True) for b in transformer.transformer_blocks] + [(b, False) for b in transformer.single_transformer_blocks]
    for i, (block, double) in enumerate(blocks):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(_SpeCaBlockHook(session, i, double), _BLOCK_HOOK)
        if config.cache == "module":
            session._handles += _capture_hooks(session, block, i, double)
    transformer._speca_session = session
    return session


def disable_speca(target) -> None:
    """Remove SpeCa; the transformer's forward is the original again."""
    transformer, _ = _resolve(target)
    session = getattr(transformer, "_speca_session", None)
    if session is None:
        return
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.remove_hook(_ROOT_HOOK, recurse=False)
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        HookRegistry.check_if_exists_or_initialize(block).remove_hook(_BLOCK_HOOK, recurse=False)
    for h in session._handles:
        h.remove()
    registry.invalidate_child_registries_cache()
    session.finish()
    transformer._speca_session = None


def get_session(target) -> SpeCaSession | None:
    transformer, _ = _resolve(target)
    return getattr(transformer, "_speca_session", None)


def estimate_cache_bytes(transformer_config: dict, config: SpeCaConfig, video_tokens: int, text_tokens: int,
                         batch: int = 1, dtype_bytes: int = 2, contexts: int = 1) -> int:
    """Feature-cache bytes SpeCa holds for a batch (per rank under sequence parallelism, pass the
    rank's video tokens). `contexts` = 2 with true CFG (cond and uncond keep separate caches).

    lean:   (order + 1) x [stream into the verified block (video + text) + stream out of it (video)]
    module: (order + 1) x [per double block: attention and MLP outputs of both streams;
                           per single block: the output projection over video + text]
    """
    hidden = int(transformer_config["num_attention_heads"]) * int(transformer_config["attention_head_dim"])
    if config.cache == "lean":
        tokens = 2 * video_tokens + text_tokens
    else:
        tokens = (int(transformer_config["num_layers"]) * 2 * (video_tokens + text_tokens)
                  + int(transformer_config["num_single_layers"]) * (video_tokens + text_tokens))
    return (config.order + 1) * tokens * hidden * batch * dtype_bytes * contexts
