"""Host time per call at a tiny shape (GPU benchmark): where a fused launch spends its microseconds.

    python scripts/launch_overhead.py [--train]
    python scripts/launch_overhead.py --direct-ab causal:1024 document_mask:4096 evoformer gqa:1024

At B1 H1 S128 D64 the kernels take a few microseconds, so back-to-back calls measure the host side:
the torch.compile'd function (dynamo guards, Inductor's wrapper), the flashlight op's dispatch, the
compiled region (config, stride arguments, output allocation) and Triton's launcher alone, beside
compiled FlexAttention and SDPA. With --train, a training step (forward and backward) and each of its
pieces: the training forward op and the backward's kernels (op, region method). Prints microseconds per call.

--direct-ab: training steps of variants at B4 H32 (Evoformer: B1, 16 MSA rows, H4 S256 D32) in one
process, with the compiled regions' direct launches (flashlight/compiler/launch.py) on and off for
alternate blocks of 100 back-to-back steps; prints the median ms per step of each. Host time moves from
run to run; alternating within one process keeps both sides under the same conditions.
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
        "launched directly (launch.py)": lambda: region._launcher(
            kernel, (1,), [q, k, v, out], args, {n: cfg[n] for n in ("BLOCK_M", "BLOCK_N")},
            {n: cfg[n] for n in cfg if n not in ("BLOCK_M", "BLOCK_N")}),
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
    method = region.backward

    def recording(*a):   # one call's arguments
        calls["backward"] = a
        return method(*a)
    region.backward = recording
    step()
    del region.backward   # the class's method again
    inputs, row_saved, rows, grad_out, needs = calls["backward"]
    key = region.key
    flex = torch.compile(flex_attention)
    return {
        "flashlight training step": step,
        "flashlight forward (compiled fn)": lambda: fused(q, k, v),
        "fused_attention_train op": lambda: torch.ops.flashlight.fused_attention_train(inputs, key),
        "CompiledRegion forward": lambda: region.__class__.__call__(region, inputs),
        "fused_attention_backward op": lambda: torch.ops.flashlight.fused_attention_backward(
            inputs, row_saved, rows, grad_out, needs, key),
        "CompiledRegion.backward": lambda: region.backward(inputs, row_saved, rows, grad_out, needs),
        "flex training step": lambda: torch.autograd.grad(flex(q, k, v), (q, k, v), g),
        "flex forward": lambda: flex(q, k, v),
    }


def direct_ab(cases, blocks=6, steps=100):
    from flashlight.harness import variant_registry as vr

    print(torch.cuda.get_device_name(), torch.__version__)
    for case in cases:
        name, _, S = case.partition(":")
        v = vr.get(name)
        shape = (v.shape(B=1, H=4, Sq=256, Sk=256, D=32) if name == "evoformer" else
                 v.shape(B=4, H=32, Sq=int(S or 1024), Sk=int(S or 1024), D=64))
        x = v.make_inputs(shape, torch.bfloat16, "cuda", requires_grad=True)
        wrt = [x[n] for n in v.learnable]
        torch._dynamo.reset()
        runtime._REGISTRY.clear()
        fn = flashlight.compile(v.bind(shape), choose_faster=False)
        g = torch.randn_like(fn(**x))

        def step():
            return torch.autograd.grad(fn(**x), wrt, g)
        for _ in range(20):
            step()
        regions = list(runtime._REGISTRY.values())
        ms = {True: [], False: []}
        for _ in range(blocks):
            for direct in (True, False):
                for r in regions:
                    r._launcher.direct = direct
                ms[direct].append(per_call_us(step, steps) / 1e3)
        med = {k: sorted(t)[len(t) // 2] for k, t in ms.items()}
        print(f"{name:14s} {shape.Sq:5d}: ms/step direct {med[True]:.3f}, Triton's usual launch {med[False]:.3f} "
              f"({sum(r._launcher.direct_launches for r in regions)} direct launches)", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true")
    ap.add_argument("--direct-ab", nargs="+", metavar="VARIANT[:S]")
    a = ap.parse_args()
    if a.direct_ab:
        return direct_ab(a.direct_ab)
    q, k, v = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    rows = training_rows(q, k, v) if a.train else forward_rows(q, k, v)
    print(torch.cuda.get_device_name(), torch.__version__)
    for name, fn in rows.items():
        print(f"{name:34s} {per_call_us(fn):7.1f} us/call", flush=True)


if __name__ == "__main__":
    main()
