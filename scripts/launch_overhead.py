"""Host time per call at a tiny shape (GPU benchmark): where a fused launch spends its microseconds.

    python scripts/launch_overhead.py

At B1 H1 S128 D64 the kernels take a few microseconds, so back-to-back calls measure the host side:
the torch.compile'd function (dynamo guards, Inductor's wrapper), the flashlight op's dispatch, the
compiled region (config, stride arguments, output allocation) and Triton's launcher alone, beside
compiled FlexAttention and SDPA. Prints microseconds per call.
"""
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flashlight.compiler import runtime


def attn(q, k, v):
    return torch.softmax(q @ k.mT * 0.125, -1) @ v


def per_call_us(fn, n=2000):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fused = torch.compile(attn, backend="flashlight")
    fused(q, k, v)
    region = next(iter(runtime._REGISTRY.values()))
    flex = torch.compile(flex_attention)
    flex(q, k, v)
    cfg, args = region.launch_config(q.device), region.launch_args([q, k, v])
    out = torch.empty(region.ks.out_shape, device="cuda", dtype=q.dtype)
    kernel = getattr(region._kernel, region.ks.name)
    rows = {
        "flashlight, torch.compile'd fn": lambda: fused(q, k, v),
        "flashlight op call": lambda: torch.ops.flashlight.fused_attention([q, k, v], region.key),
        "CompiledRegion call": lambda: region([q, k, v]),
        "Triton launch alone": lambda: kernel[(1,)](q, k, v, out, *args, **cfg),
        "flex, torch.compile'd": lambda: flex(q, k, v),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    }
    print(torch.cuda.get_device_name(), torch.__version__)
    for name, fn in rows.items():
        print(f"{name:32s} {per_call_us(fn):7.1f} us/call")


if __name__ == "__main__":
    main()
