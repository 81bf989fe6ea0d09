"""Check and time the sequence-parallel attention kernels on one device (no process group needed).

    python -m bench.parallel_attention [--skip-timing]

1. Correctness of `attention_with_lse` + the log-sum-exp merge the ring uses: queries against
   key chunks (a masked-padding chunk, a chunk fully masked for one sample, a padded text
   chunk) merged, against one float32 softmax over all keys; float32 and bfloat16.
2. The processor at degree 1 on a randomly initialised small HunyuanVideo transformer in the
   device's dtype: output equal to the original processor's.
3. Timing at HunyuanVideo 720p x 129 frames (118,800 video + 256 text tokens, 24 heads x 128,
   bf16): one ring chunk at ring degree 8, and one Ulysses attention at degree 8, per block.
Prints the device it ran on; CPU runs skip the timing.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pipeline.parallel import attention
from pipeline.parallel.attention import _LseMerge, attention_with_lse


def check_merge(device: str, dtype: torch.dtype) -> float:
    g = torch.Generator(device="cpu").manual_seed(0)
    b, h, nq, d = 2, 3, 517, 128
    sizes = [300, 301, 256]
    q = torch.randn(b, h, nq, d, generator=g).to(device, dtype)
    ks = [torch.randn(b, h, n, d, generator=g).to(device, dtype) for n in sizes]
    vs = [torch.randn(b, h, n, d, generator=g).to(device, dtype) for n in sizes]
    masks = [torch.ones(b, n, dtype=torch.bool, device=device) for n in sizes]
    masks[0][:, -17:] = False  # padding at the end of a video chunk
    masks[1][1] = False  # a chunk with no valid key for sample 1
    masks[2][0, 10:] = False  # padded text
    masks[2][1, 3:] = False
    merge = _LseMerge()
    for k, v, m in zip(ks, vs, masks):
        merge.add(*attention_with_lse(q, k, v, m))
    ref = F.scaled_dot_product_attention(q.float(), torch.cat(ks, 2).float(), torch.cat(vs, 2).float(),
                                         attn_mask=torch.cat(masks, 1)[:, None, None, :])
    return (merge.out - ref).abs().max().item()


def check_processor(device: str, dtype: torch.dtype) -> float:
    from diffusers import HunyuanVideoTransformer3DModel

    from pipeline.parallel import ParallelConfig, disable_sequence_parallel, enable_sequence_parallel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, num_attention_heads=4,
                                           attention_head_dim=32, num_layers=2, num_single_layers=2,
                                           num_refiner_layers=1, patch_size=2, text_embed_dim=64,
                                           pooled_projection_dim=32, rope_axes_dim=(8, 12, 12),
                                           guidance_embeds=False).to(device, dtype).eval()
    x = torch.randn(2, 16, 5, 12, 14, device=device, dtype=dtype)
    text = torch.randn(2, 24, 64, device=device, dtype=dtype)
    mask = torch.ones(2, 24, device=device, dtype=torch.long)
    mask[1, 7:] = 0
    kw = dict(hidden_states=x, timestep=torch.tensor([500, 500], device=device), encoder_hidden_states=text,
              encoder_attention_mask=mask, pooled_projections=torch.randn(2, 32, device=device, dtype=dtype),
              return_dict=False)
    with torch.no_grad():
        base = model(**kw)[0]
        enable_sequence_parallel(model, ParallelConfig())
        ours = model(**kw)[0]
        disable_sequence_parallel(model)
    return (ours.float() - base.float()).abs().max().item()


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def timing(device: str) -> None:
    dt = torch.bfloat16
    n, t, h, d, p = 118_800, 256, 24, 128, 8
    chunk = n // p + 1  # 14,851 with padding: ring degree 8 pads 118,800 to 118,808
    q = torch.randn(1, h, chunk + t, d, device=device, dtype=dt)
    k = torch.randn(1, h, chunk, d, device=device, dtype=dt)
    v = torch.randn_like(k)
    mask = torch.ones(1, chunk, dtype=torch.bool, device=device)
    mask[:, -1] = False
    print(f"ring chunk (ring degree 8): q {chunk + t} x k {chunk}, 24 heads")
    print(f"  attention_with_lse, masked        {timed(lambda: attention_with_lse(q, k, v, mask)):8.2f} ms")
    print(f"  attention_with_lse, no mask       {timed(lambda: attention_with_lse(q, k, v, None)):8.2f} ms")
    print(f"  F.sdpa (bool mask), no lse        "
          f"{timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])):8.2f} ms")
    print(f"  x 8 chunks per block: ~{8 * timed(lambda: attention_with_lse(q, k, v, mask)):.0f} ms "
          f"(cuDNN used: {attention._CUDNN_OK})")
    bias = attention._mask_bias(mask, dt, align=16).expand(1, h, chunk + t, chunk)
    print(f"  memory-efficient kernel, masked   "
          f"{timed(lambda: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True)):8.2f} ms")
    hu = h // p  # Ulysses degree 8: all tokens, 3 heads
    q = torch.randn(1, hu, n + t, d, device=device, dtype=dt)
    mask = torch.ones(1, n + t, dtype=torch.bool, device=device)
    mask[:, -100:] = False
    print(f"Ulysses degree 8: {n + t} tokens, 3 heads, F.sdpa with the text mask "
          f"{timed(lambda: F.scaled_dot_product_attention(q, q, q, attn_mask=mask[:, None, None, :])):8.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}")
    for dtype in (torch.float32, torch.bfloat16):
        print(f"merge of chunks vs one softmax, {dtype}: max abs err {check_merge(device, dtype):.2e} "
              f"(cuDNN used: {attention._CUDNN_OK})")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"processor at degree 1 vs original, {dtype}: max abs diff {check_processor(device, dtype):.2e}")
    if device == "cuda" and not args.skip_timing:
        timing(device)


if __name__ == "__main__":
    main()
