"""Sequence-parallel joint attention for HunyuanVideo's double- and single-stream blocks (1.0 and 1.5).

`SequenceParallelAttnProcessor` replaces `HunyuanVideoAttnProcessor2_0` and 1.5's
`HunyuanVideo15AttnProcessor2_0` (same call signature, same projections, norms and RoPE). It expects what `shard.enable_sequence_parallel`'s hooks
give every block: this rank's contiguous shard of the (padded) video tokens, the full text
tokens, the rotary table of the local shard, and the attention mask in the padded global
layout `[all video tokens incl. padding; text tokens]` (padding and padded text are False).

Per attention call, with U = ulysses_degree, R = ring_degree, n local video tokens:
  * Ulysses (U > 1): video q/k/v go from sequence-sharded (n tokens, H heads) to head-sharded
    (U*n tokens, H/U heads) in one all-to-all; text q/k/v, replicated, just take the local
    heads. Afterwards one all-to-all brings the video output back, one all-gather collects
    the text output's heads.
  * Ring (R > 1): the U*n-token key/value blocks travel round the ring ranks with
    send/recv (overlapped with the attention on the block in hand); text keys/values are on
    every rank already, so they are a local chunk and never sent. Chunks are merged with the
    log-sum-exp (online softmax) rule; the text queries' chunks are merged in a fixed order
    so the replicated text stream stays bitwise identical on every rank.
  * Both: Ulysses inside each group of U consecutive ranks, the ring across groups.
Without the ring, attention goes through diffusers' `dispatch_attention_fn` with the
processor's `_attention_backend` (so `set_attention_backend` still applies); the ring needs
each chunk's log-sum-exp, which `attention_with_lse` takes from PyTorch's fused kernels:
flash on CPU, cuDNN on CUDA in bf16/fp16 (3x the memory-efficient kernel's speed with a mask
on an H200, see bench/parallel_attention.py), memory-efficient otherwise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from .distributed import ParallelGroups

# --- attention on one key/value chunk, with its log-sum-exp ------------------------------


def _mask_bias(key_mask: torch.Tensor, dtype: torch.dtype, align: int = 1) -> torch.Tensor:
    """(B, Nk) bool -> (B, 1, 1, Nk) additive bias; storage padded to `align` columns for CUDA kernels."""
    b, nk = key_mask.shape
    padded = -(-nk // align) * align
    bias = torch.zeros(b, 1, 1, padded, dtype=dtype, device=key_mask.device)
    bias[..., :nk].masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    return bias[..., :nk]


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention and its log-sum-exp; layout (B, H, N, D), `key_mask` (B, Nk) bool.

    Returns (out in q's dtype, lse in float32 of shape (B, H, Nq)). A sample whose keys are
    all masked gets out = 0 and lse = -inf, so it weighs nothing when chunks are merged.
    """
    if q.device.type == "cpu":
        bias = None if key_mask is None else _mask_bias(key_mask, q.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias)
    elif q.device.type == "cuda":
        out, lse = _cuda_attention_lse(q, k, v, key_mask)
    else:  # portable fallback: math in float32, in query tiles
        outs, lses = [], []
        scale = q.shape[-1] ** -0.5
        for qt in q.split(1024, dim=2):
            s = (qt.float() @ k.float().transpose(-1, -2)) * scale
            if key_mask is not None:
                s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
            lse_t = s.logsumexp(-1)
            outs.append((s - lse_t[..., None]).exp().nan_to_num(0.0) @ v.float())
            lses.append(lse_t)
        out, lse = torch.cat(outs, 2).to(q.dtype), torch.cat(lses, 2)
    lse = lse.float()
    if key_mask is not None:
        valid = key_mask.any(-1)[:, None, None]
        lse = torch.where(valid, lse, float("-inf"))
        out = torch.where(valid[..., None], out, 0)
    return out, lse


_CUDNN_OK: bool | None = None  # None: not tried yet; False: failed once, not tried again


def _cuda_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN attention (bf16/fp16) where it runs, else the memory-efficient kernel; both give the lse."""
    global _CUDNN_OK
    b, h, nq = q.shape[:3]
    bias = None if key_mask is None else _mask_bias(key_mask, q.dtype, align=16).expand(b, h, nq, key_mask.shape[1])
    if q.dtype in (torch.bfloat16, torch.float16) and _CUDNN_OK is not False:
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q.contiguous(), k.contiguous(), v.contiguous(), bias, True)[:2]  # cuDNN needs contiguous inputs
            _CUDNN_OK = True
            return out, lse.reshape(b, h, nq)  # (B, H, Nq, 1) on newer torch
        except RuntimeError:  # no cuDNN attention for this build / GPU / shape
            _CUDNN_OK = False
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)[:2]
    return out, lse[..., :nq]  # its lse rows are padded to a multiple of 32


class _LseMerge:
    """Running softmax merge of attention chunks: out = sum_j exp(lse_j - lse) out_j (float32)."""

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = out.float(), lse
            return
        new = torch.logaddexp(self.lse, lse)
        safe = torch.where(torch.isinf(new), 0.0, new)
        self.out = self.out * (self.lse - safe).exp()[..., None] + out.float() * (lse - safe).exp()[..., None]
        self.lse = new


# --- Ulysses: sequence-sharded <-> head-sharded ------------------------------------------


def _seq_to_heads(x: torch.Tensor, u: int, group) -> torch.Tensor:
    """(S, B, n, H, D) sharded by tokens -> (S, B, u*n, H/u, D) sharded by heads (one all-to-all)."""
    s, b, n, h, d = x.shape
    send = x.reshape(s, b, n, u, h // u, d).permute(3, 0, 1, 2, 4, 5).contiguous()  # (u, S, B, n, h/u, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(s, b, u * n, h // u, d)


def _heads_to_seq(x: torch.Tensor, u: int, group) -> torch.Tensor:
    """(B, u*n, H/u, D) sharded by heads -> (B, n, H, D) sharded by tokens (one all-to-all)."""
    b, un, hu, d = x.shape
    send = x.reshape(b, u, un // u, hu, d).transpose(0, 1).contiguous()  # (u, B, n, H/u, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, un // u, u * hu, d)


def all_gather_tensor(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    """All-gather into one tensor (dim 0 concatenated), by whichever name this torch has."""
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(output, input, group=group)


def _gather_heads(x: torch.Tensor, u: int, group) -> torch.Tensor:
    """(B, T, H/u, D) -> (B, T, H, D): every rank's heads, in rank order (one all-gather)."""
    b, t, hu, d = x.shape
    recv = torch.empty((u * b, t, hu, d), dtype=x.dtype, device=x.device)  # gloo wants dim 0 concatenated
    all_gather_tensor(recv, x.contiguous(), group=group)
    return recv.view(u, b, t, hu, d).permute(1, 2, 0, 3, 4).reshape(b, t, u * hu, d)


# --- ring ---------------------------------------------------------------------------------


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
                   video_key_mask: torch.Tensor, text_key_mask: torch.Tensor, num_text: int,
                   groups: ParallelGroups) -> torch.Tensor:
    """Attention of [video block; text] queries over all video blocks of the ring plus the text.

    Layout (B, H, N, D). `q` holds this ring rank's video block then the `num_text` text
    queries; `k`/`v` this rank's video block; `video_key_mask` (B, R * block) covers every
    block (False on padding); `text_key_mask` (B, T).
    """
    r, me = groups.config.ring_degree, groups.ring_rank
    block = k.shape[2]
    nv = q.shape[2] - num_text
    video, text_parts = _LseMerge(), {}
    out, lse = attention_with_lse(q, k_text, v_text, text_key_mask)  # the text chunk: local
    video.add(out[:, :, :nv], lse[..., :nv])
    text_parts[-1] = (out[:, :, nv:], lse[..., nv:])
    kv = torch.stack([k, v]).contiguous()
    nxt, prv = groups.ring_ranks[(me + 1) % r], groups.ring_ranks[(me - 1) % r]
    for step in range(r):
        src = (me - step) % r  # whose block is in hand
        reqs, incoming = [], None
        if step < r - 1:
            incoming = torch.empty_like(kv)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv, nxt, groups.ring),
                                           dist.P2POp(dist.irecv, incoming, prv, groups.ring)])
        out, lse = attention_with_lse(q, kv[0], kv[1], video_key_mask[:, src * block:(src + 1) * block])
        video.add(out[:, :, :nv], lse[..., :nv])
        text_parts[src] = (out[:, :, nv:], lse[..., nv:])
        for req in reqs:
            req.wait()
        if incoming is not None:
            kv = incoming
    text = _LseMerge()
    for src in range(-1, r):  # fixed order on every rank: identical text outputs
        text.add(*text_parts[src])
    return torch.cat([video.out, text.out], dim=2).to(q.dtype)


# --- the processor ----------------------------------------------------------------------


class SequenceParallelAttnProcessor:
    """Drop-in for `HunyuanVideoAttnProcessor2_0` on sequence-sharded video tokens (see module doc)."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        g = self.groups
        u, r, p = g.config.ulysses_degree, g.config.ring_degree, g.world_size
        if encoder_hidden_states is None:
            raise RuntimeError("SequenceParallelAttnProcessor handles joint video+text attention only")
        b, n, _ = hidden_states.shape
        t = encoder_hidden_states.shape[1]
        if attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.shape[-1] != n * p + t:
            raise RuntimeError(f"sequence-parallel attention expects a bool mask over {n * p} padded video + {t} text "
                               f"tokens, got {None if attention_mask is None else tuple(attention_mask.shape)}: "
                               f"was the transformer entered through enable_sequence_parallel's hooks?")
        key_mask = attention_mask.reshape(b, -1)

        # 1. Projections and QK norms, as the original processor does them.
        if attn.add_q_proj is None:  # single-stream block: one projection over [video; text]
            joint = torch.cat([hidden_states, encoder_hidden_states], dim=1)
            q, k, v = (proj(joint).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            (q, q_t), (k, k_t), (v, v_t) = (x.split([n, t], dim=1) for x in (q, k, v))
        else:  # double-stream block: separate text projections
            q, k, v = (proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            q_t, k_t, v_t = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                             for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                q_t = attn.norm_added_q(q_t)
            if attn.norm_added_k is not None:
                k_t = attn.norm_added_k(k_t)

        # 2. RoPE on the local video tokens only.
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)

        # 3. Ulysses: heads for tokens; text keeps the local heads.
        if u > 1:
            q, k, v = _seq_to_heads(torch.stack([q, k, v]), u, g.ulysses)
            hs = slice(g.ulysses_rank * attn.heads // u, (g.ulysses_rank + 1) * attn.heads // u)
            q_t, k_t, v_t = q_t[:, :, hs], k_t[:, :, hs], v_t[:, :, hs]

        # 4. Attention of [video; text] queries over all video tokens and the text.
        if r == 1:
            out = dispatch_attention_fn(torch.cat([q, q_t], 1), torch.cat([k, k_t], 1), torch.cat([v, v_t], 1),
                                        attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend)
        else:
            q_all = torch.cat([q, q_t], 1).transpose(1, 2)
            out = ring_attention(q_all, k.transpose(1, 2), v.transpose(1, 2), k_t.transpose(1, 2),
                                 v_t.transpose(1, 2), key_mask[:, :n * p], key_mask[:, n * p:], t, g).transpose(1, 2)
        out, out_t = out.split([out.shape[1] - t, t], dim=1)

        # 5. Back to tokens-sharded video, all heads of the text.
        if u > 1:
            out = _heads_to_seq(out, u, g.ulysses)
            out_t = _gather_heads(out_t, u, g.ulysses)
        hidden_states = out.flatten(2, 3).to(q.dtype)
        encoder_hidden_states = out_t.flatten(2, 3).to(q.dtype)

        # 6. Output projections.
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states
