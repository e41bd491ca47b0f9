"""Host time per call at a tiny shape (GPU benchmark): where a fused launch spends its microseconds.

    python scripts/launch_overhead.py [--train]

At B1 H1 S128 D64 the kernels take a few microseconds, so back-to-back calls measure the host side:
the torch.compile'd function (dynamo guards, Inductor's wrapper), the flashlight op's dispatch, the
compiled region (config, stride arguments, output allocation) and Triton's launcher alone, beside
compiled FlexAttention and SDPA. With --train, a training step (forward and backward) and each of its
pieces: the training forward op, the backward's row step (op, region method, the compiled step alone)
and its kernels (op, region method). Prints microseconds per call.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

import flashlight
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


def forward_rows(q, k, v):
    fused = flashlight.compile(attn, choose_faster=False)   # the fused path, never swapped
    fused(q, k, v)
    region = next(iter(runtime._REGISTRY.values()))
    flex = torch.compile(flex_attention)
    flex(q, k, v)
    cfg, args = region.launch_config(q.device), region.launch_args([q, k, v])
    out = torch.empty(region.ks.out_shape, device="cuda", dtype=q.dtype)
    kernel = getattr(region._kernel, region.ks.name)
    return {
        "flashlight, torch.compile'd fn": lambda: fused(q, k, v),
        "flashlight op call": lambda: torch.ops.flashlight.fused_attention([q, k, v], region.key),
        "CompiledRegion call": lambda: region([q, k, v]),
        "Triton launch alone": lambda: kernel[(1,)](q, k, v, out, *args, **cfg),
        "flex, torch.compile'd": lambda: flex(q, k, v),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
    }


def training_rows(q, k, v):
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    g = torch.randn_like(q)
    fused = flashlight.compile(attn, choose_faster=False)   # the fused path, never swapped
    calls = {}

    def step():
        return torch.autograd.grad(fused(q, k, v), (q, k, v), g)
    fused(q, k, v)   # compiles: the region is registered
    region = next(r for r in runtime._REGISTRY.values() if r.backward_source is not None)
    for name in ("rows", "backward"):   # record one call's arguments of each backward method
        method = getattr(region, name)

        def recording(*a, _m=method, _n=name):
            calls[_n] = a
            return _m(*a)
        setattr(region, name, recording)
    step()
    del region.rows, region.backward   # the class's methods again
    inputs, saved, grad_out, needs = calls["rows"]
    _, row_saved, rows, _, _ = calls["backward"]
    key = region.key
    compiled_step = region.row_step(inputs, saved, grad_out, tuple(bool(n) for n in needs))
    flex = torch.compile(flex_attention)
    return {
        "flashlight training step": step,
        "flashlight forward (compiled fn)": lambda: fused(q, k, v),
        "fused_attention_train op": lambda: torch.ops.flashlight.fused_attention_train(inputs, key),
        "CompiledRegion forward": lambda: region.__class__.__call__(region, inputs),
        "fused_attention_rows op": lambda: torch.ops.flashlight.fused_attention_rows(inputs, saved, grad_out,
                                                                                    needs, key),
        "CompiledRegion.rows": lambda: region.rows(inputs, saved, grad_out, needs),
        "compiled row step alone": lambda: compiled_step(inputs, saved, grad_out),
        "fused_attention_backward op": lambda: torch.ops.flashlight.fused_attention_backward(
            inputs, row_saved, rows, grad_out, needs, key),
        "CompiledRegion.backward": lambda: region.backward(inputs, row_saved, rows, grad_out, needs),
        "flex training step": lambda: torch.autograd.grad(flex(q, k, v), (q, k, v), g),
        "flex forward": lambda: flex(q, k, v),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true")
    a = ap.parse_args()
    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rows = training_rows(q, k, v) if a.train else forward_rows(q, k, v)
    print(torch.cuda.get_device_name(), torch.__version__)
    for name, fn in rows.items():
        print(f"{name:34s} {per_call_us(fn):7.1f} us/call", flush=True)


if __name__ == "__main__":
    main()
