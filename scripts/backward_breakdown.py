"""Where the time of a fused forward+backward goes, and how the backward's tiles change it (GPU).

    python scripts/backward_breakdown.py --variant causal --configs default 64,64,4,2 128,32,4,3/32,128,4,3

Prints, per backward tile config (BLOCK_M, BLOCK_N, num_warps, num_stages for both kernels, or
dQ-kernel/dK,dV-kernel; "default": the compiler's choice), the median fwd+bwd time
(triton.testing.do_bench), then a per-kernel CUDA time table of one fwd+bwd step under torch.profiler
for the first config: the forward kernel, the row step's PyTorch ops, the dQ and dK/dV kernels.
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="causal")
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--configs", nargs="+", default=["default"])
    a = ap.parse_args()
    v = vr.get(a.variant)
    shape = v.shape(B=a.B, H=a.H, Sq=a.S, Sk=a.S, D=a.D)
    x = v.make_inputs(shape, torch.bfloat16, "cuda", requires_grad=True)
    wrt = [x[n] for n in v.learnable]
    flops = 3.5 * v.flops(shape)
    for i, c in enumerate(a.configs):
        torch._dynamo.reset()
        fn = flashlight.compile(v.bind(shape), config={"backward": tiles(c)} if c != "default" else None)
        out = fn(**x)
        g = torch.randn_like(out)

        def step():
            return torch.autograd.grad(fn(**x), wrt, g)
        step()
        ms = triton.testing.do_bench(step, rep=200, return_mode="median")
        print(f"{a.variant} bwd tiles {c}: fwd+bwd {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s "
              f"(fused backward launches {flashlight.counters['fused_backward_launches']})", flush=True)
        if i == 0:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
            total = sum(e.device_time_total for e in events)
            print(f"  one step, {total / 1e3:.3f} ms of GPU time:")
            for e in events[:12]:
                print(f"  {e.device_time_total / 1e3:8.3f} ms  x{e.count:<3d} {e.key[:90]}")


if __name__ == "__main__":
    main()
