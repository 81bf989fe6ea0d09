"""Communication volume of sequence parallelism: the formula, and a counter to check it.

Bytes SENT BY ONE RANK for one full transformer forward (one denoising step; true CFG runs
two), counted as the payload leaving the rank for other ranks (an all-to-all over G ranks
sends (G-1)/G of its input, an all-gather sends its input to G-1 ranks, a ring step sends
the key/value block once). With

    U = ulysses_degree, R = ring_degree, P = U * R, h = H / U heads per rank,
    n = ceil(N / P) video tokens per rank (padded), T text tokens, L = double + single blocks,
    D head dim, s bytes per element, B batch, C = p_t * p * p * out_channels (output channels),

per block (one joint attention):
    Ulysses all-to-all   (U-1) * B * n * h * D * s * 4     q, k, v to heads + output back
    Ulysses text gather  (U-1) * B * T * h * D * s         text output heads to every rank
    ring                 (R-1) * B * (U*n) * h * D * s * 2  k, v blocks round the ring
and once per forward:
    output gather        (P-1) * B * n * C * s              after proj_out
    total = L * (all-to-all + text gather + ring) + output gather.
Text keys/values are replicated, so the ring never sends them. SpeCa adds one all_reduce of
B x 2 float64 per speculative step (not included), and a speculative step runs only the
blocks it executes (lean: the blocks from the verified one on; module: the verified one).

HunyuanVideo (H = 24, D = 128, L = 20 + 40, C = 64, bf16), B = 1, GB (1e9 bytes) sent per rank
per transformer forward (`step_comm_bytes`; 50 steps of true CFG: x 100):

  720x1280, 129 frames: N = 33 x 45 x 80 = 118,800 video tokens, T = 256 text tokens
    U x R     total   all-to-all  text gather    ring   output gather
    2 x 1     43.85       43.79        0.047     0.00          0.0076
    1 x 2     43.80        0.00        0.000    43.79          0.0076
    4 x 1     32.93       32.85        0.071     0.00          0.0114
    1 x 4     65.70        0.00        0.000    65.69          0.0114
    2 x 2     43.85       21.90        0.047    21.90          0.0114
    8 x 1     19.26       19.16        0.083     0.00          0.0133
    1 x 8     76.65        0.00        0.000    76.64          0.0133
    4 x 2     27.46       16.42        0.071    10.95          0.0133
    2 x 4     43.85       10.95        0.047    32.85          0.0133

  544x960, 61 frames: N = 16 x 34 x 60 = 32,640 video tokens, T = 256 text tokens
    U x R     total   all-to-all  text gather    ring   output gather
    2 x 1     12.08       12.03        0.047     0.00          0.0021
    1 x 2     12.03        0.00        0.000    12.03          0.0021
    4 x 1      9.10        9.02        0.071     0.00          0.0031
    1 x 4     18.05        0.00        0.000    18.05          0.0031
    2 x 2     12.08        6.02        0.047     6.02          0.0031
    8 x 1      5.35        5.26        0.083     0.00          0.0037
    1 x 8     21.06        0.00        0.000    21.06          0.0037
    4 x 2      7.59        4.51        0.071     3.01          0.0037
    2 x 4     12.08        3.01        0.047     9.02          0.0037

Per rank, Ulysses sends 4 (U-1)/U of its share N/U of the activations per block, so its
volume falls with the degree; the ring sends 2 (R-1)/R of ALL keys/values per block, so its
volume grows towards 2 N H D s, but it overlaps with the attention on the block in hand. At
degree 8, Ulysses' 19.3 GB per 720p forward is ~50 ms at NVLink's ~400 GB/s, next to ~7 s
of compute per step (xDiT: 338 s for 50 steps on 8 H100s). Prefer Ulysses within a node
(U must divide the 24 heads: 2, 3, 4, 6, 8, 12, 24) and the ring across nodes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass(frozen=True)
class CommBytes:
    """Bytes one rank sends in one transformer forward, by kind (see the module docstring)."""

    all_to_all: int
    text_gather: int
    ring: int
    output_gather: int

    @property
    def total(self) -> int:
        return self.all_to_all + self.text_gather + self.ring + self.output_gather


def step_comm_bytes(*, heads: int, head_dim: int, blocks: int, video_tokens: int, text_tokens: int,
                    ulysses_degree: int = 1, ring_degree: int = 1, dtype_bytes: int = 2, batch: int = 1,
                    out_channels: int = 64) -> CommBytes:
    """The module docstring's formula; `out_channels` is p_t * p * p * out_channels of the model."""
    u, r = ulysses_degree, ring_degree
    p = u * r
    if heads % u:
        raise ValueError(f"ulysses_degree={u} does not divide heads={heads}")
    n = -(-video_tokens // p)
    h = heads // u
    unit = batch * h * head_dim * dtype_bytes  # one token, the local heads
    return CommBytes(all_to_all=blocks * (u - 1) * n * unit * 4,
                     text_gather=blocks * (u - 1) * text_tokens * unit,
                     ring=blocks * (r - 1) * u * n * unit * 2,
                     output_gather=(p - 1) * batch * n * out_channels * dtype_bytes)


def transformer_comm_bytes(transformer_config, video_tokens: int, text_tokens: int, ulysses_degree: int = 1,
                           ring_degree: int = 1, dtype_bytes: int = 2, batch: int = 1) -> CommBytes:
    """`step_comm_bytes` with the shape numbers read from a HunyuanVideo (1.0 or 1.5) transformer config."""
    from speca.flops import num_blocks

    c = transformer_config
    return step_comm_bytes(heads=c["num_attention_heads"], head_dim=c["attention_head_dim"],
                           blocks=num_blocks(c), video_tokens=video_tokens,
                           text_tokens=text_tokens, ulysses_degree=ulysses_degree, ring_degree=ring_degree,
                           dtype_bytes=dtype_bytes, batch=batch,
                           out_channels=c["patch_size_t"] * c["patch_size"] ** 2 * c["out_channels"])


# --- counting what actually goes through torch.distributed -------------------------------


@dataclass
class CommCounter:
    """Bytes this rank sent, by torch.distributed function, with the module docstring's convention."""

    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def add(self, op: str, nbytes: int) -> None:
        self.sent[op] += int(nbytes)
        self.calls[op] += 1


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _size(group) -> int:
    return dist.get_world_size(group)


@contextmanager
def count_comm() -> Iterator[CommCounter]:
    """Count the bytes this rank sends through torch.distributed while the block runs.

    Wraps `all_to_all_single`, `all_gather_single` / `all_gather_into_tensor` / `all_gather`
    (counted together as "all_gather"), `batch_isend_irecv` (its isend ops, as "isend") and
    `all_reduce` on the `torch.distributed` module: code that looks them up there at call
    time, as this package does, is counted. They are restored afterwards. (`isend` itself is
    not wrapped: `P2POp` accepts only the original function.) all_reduce is counted as a ring
    all-reduce, 2 (G-1)/G of the tensor.
    """
    counter = CommCounter()
    saved = {}

    def wrap(name, count):
        original = getattr(dist, name, None)
        if original is None:  # all_gather_single is newer than torch 2.6
            return
        saved[name] = original

        def wrapper(*args, **kwargs):
            count(*args, **kwargs)
            return original(*args, **kwargs)

        setattr(dist, name, wrapper)

    def a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **_):
        g = _size(group)
        if input_split_sizes:
            row = _nbytes(input) // max(input.shape[0], 1)
            own = input_split_sizes[dist.get_rank(group)] * row
            counter.add("all_to_all_single", _nbytes(input) - own)
        else:
            counter.add("all_to_all_single", _nbytes(input) * (g - 1) // g)

    def gather_into(output, input, group=None, **_):
        counter.add("all_gather", _nbytes(input) * (_size(group) - 1))

    def gather_list(tensor_list, tensor, group=None, **_):
        counter.add("all_gather", _nbytes(tensor) * (_size(group) - 1))

    def p2p_batch(ops):
        for op in ops:
            if getattr(op.op, "__name__", "") == "isend":
                counter.add("isend", _nbytes(op.tensor))

    def reduce(tensor, op=None, group=None, **_):
        g = _size(group)
        counter.add("all_reduce", 2 * _nbytes(tensor) * (g - 1) // g)

    wrap("all_to_all_single", a2a)
    wrap("all_gather_single", gather_into)
    wrap("all_gather_into_tensor", gather_into)
    wrap("all_gather", gather_list)
    wrap("batch_isend_irecv", p2p_batch)
    wrap("all_reduce", reduce)
    try:
        yield counter
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)
