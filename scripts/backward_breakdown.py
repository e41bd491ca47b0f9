"""Where the time of a fused forward+backward goes, and how the tiles change it (GPU).

    python scripts/backward_breakdown.py --variant causal --configs default 64,64,4,2 128,32,4,3/32,128,4,3
    python scripts/backward_breakdown.py --variant vanilla --D 128 --flex
    python scripts/backward_breakdown.py --variant vanilla --D 128 --forward --configs default 128,64,4,3

Prints, per backward tile config (BLOCK_M, BLOCK_N, num_warps, num_stages for both kernels, or
dQ-kernel/dK,dV-kernel; "default": the compiler's choice), the median fwd+bwd time
(triton.testing.do_bench), then a per-kernel CUDA time table of one fwd+bwd step under torch.profiler
for the first config: the forward kernel, the row step's PyTorch ops, the dQ and dK/dV kernels.
--forward: the configs are the forward kernel's tiles, timed on a forward without gradients.
--flex: the same time and table for FlexAttention, its block mask built once before (the runner's way).
--project: the attention output goes through a [Dv, Dv] projection inside the compiled function, as in
a model (the output is then not returned, so the training forward may save it instead of its accumulator).
--dtype: the inputs' dtype (float32 tiles run at torch's float32 matmul precision, as in a float32 model).
--inductor: also time the same step through plain torch.compile (Inductor, no fusion) and eagerly.
Each timed step also prints the step's peak memory above what was allocated before it, and its host and
GPU time per step over steps launched back to back.
"""
import argparse

import torch
import triton.testing

import flashlight
from flashlight.harness import variant_registry as vr


def tiles(spec):
    def one(text):
        bm, bn, w, st = (int(t) for t in text.split(","))
        return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": w, "num_stages": st}
    parts = spec.split("/")
    return one(parts[0]) if len(parts) == 1 else {"dq": one(parts[0]), "dkv": one(parts[1])}


def back_to_back(step, n=30):
    """(host ms per step, GPU ms per step) over n steps launched back to back, without do_bench's cache
    flush between them: where the host takes longer than the GPU, the GPU waits for it."""
    import time
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(n):
        step()
    host = (time.perf_counter() - t0) * 1e3 / n
    end.record()
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / n


def kernel_table(step):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    print(f"  one step, {total / 1e3:.3f} ms of GPU time:")
    for e in events[:12]:
        print(f"  {e.device_time_total / 1e3:8.3f} ms  x{e.count:<3d} {e.key[:90]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="causal")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--configs", nargs="+", default=["default"])
    ap.add_argument("--forward", action="store_true", help="tile the forward kernel; time forward only")
    ap.add_argument("--flex", action="store_true", help="also time and profile FlexAttention")
    ap.add_argument("--project", action="store_true", help="follow attention by a projection, as a model")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--inductor", action="store_true", help="also time torch.compile (Inductor) and eager")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    v = vr.get(a.variant)
    shape = v.shape(B=a.B, H=a.H, Sq=a.S, Sk=a.S, D=a.D)
    x = v.make_inputs(shape, dtype, "cuda", requires_grad=not a.forward)
    wrt = [x[n] for n in v.learnable]
    flops = (1.0 if a.forward else 3.5) * v.flops(shape)
    what = "fwd" if a.forward else "fwd+bwd"

    project = torch.randn(shape.Dv, shape.Dv, device="cuda", dtype=dtype) / shape.Dv**0.5

    def model(fn):
        return (lambda **inputs: fn(**inputs) @ project) if a.project else fn

    def peak_mb(step):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    def stepper(fn):
        if a.forward:
            return lambda: fn(**x)
        g = torch.randn_like(fn(**x))
        return lambda: torch.autograd.grad(fn(**x), wrt, g)

    for i, c in enumerate(a.configs):
        torch._dynamo.reset()
        config = None if c == "default" else tiles(c) if a.forward else {"backward": tiles(c)}
        fn = flashlight.compile(model(v.bind(shape)), config=config, choose_faster=False)
        step = stepper(fn)
        step()
        ms = triton.testing.do_bench(step, rep=200, return_mode="median")
        host, gpu = back_to_back(step)
        print(f"{a.variant} D{a.D} {a.dtype} {'fwd' if a.forward else 'bwd'} tiles {c}: {what} {ms:.3f} ms, "
              f"{flops / ms / 1e9:.0f} TFLOP/s (fused launches {flashlight.counters['fused_launches']}, "
              f"backward {flashlight.counters['fused_backward_launches']}), "
              f"peak {peak_mb(step):.0f} MB; back to back: host {host:.3f} ms, GPU {gpu:.3f} ms per step", flush=True)
        if i == 0:
            kernel_table(step)
            if not a.forward:  # the training forward alone: the same kernel with its saves
                ms = triton.testing.do_bench(lambda: fn(**x), rep=200, return_mode="median")
                print(f"  training forward alone {ms:.3f} ms", flush=True)
    if a.inductor:
        for name, fn in (("torch.compile", torch.compile(model(v.bind(shape)))), ("eager", model(v.bind(shape)))):
            step = stepper(fn)
            step()
            ms = triton.testing.do_bench(step, rep=200, return_mode="median")
            host, gpu = back_to_back(step)
            print(f"{a.variant} D{a.D} {a.dtype} {name}: {what} {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s, "
                  f"peak {peak_mb(step):.0f} MB; back to back: host {host:.3f} ms, GPU {gpu:.3f} ms per step", flush=True)
    if a.flex:
        from torch.nn.attention.flex_attention import flex_attention
        compiled = torch.compile(flex_attention)
        prep = v.flex_prepare(x, shape)
        step = stepper(model(lambda **inputs: v.flex(inputs, shape, attention=compiled, prep=prep)))
        step()
        ms = triton.testing.do_bench(step, rep=200, return_mode="median")
        host, gpu = back_to_back(step)
        print(f"{a.variant} D{a.D} flex: {what} {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s, "
              f"peak {peak_mb(step):.0f} MB; back to back: host {host:.3f} ms, GPU {gpu:.3f} ms per step", flush=True)
        kernel_table(step)


if __name__ == "__main__":
    main()
