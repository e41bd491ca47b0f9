"""Probe (GPU): dQ by atomic adds inside the dK/dV kernel, one kernel, against the separate dQ kernel.

    python scripts/atomic_dq_probe.py --variant vanilla --D 128 --configs 64,128,8,3 64,64,4,3
    TRITON_INTERPRET=1 python scripts/atomic_dq_probe.py --cpu --S 96 --D 16 --variant causal   # checks dQ only

FlashAttention-2 computes dQ in the dK/dV loop with atomic adds, so that the scores and dO·Vᵀ are computed
once per tile pair instead of once in each kernel. This probe takes the generated backward of a variant at
B4 H32 S{S} D{D}, records the launches of one step, and adds to the generated dK/dV kernel's text, after each
dS, `dQ_tile = dSᵀ·K` and an atomic add of it (times the softmax scale) into a float32 [rows, D] buffer per
score matmul. It prints the dQ kernel's time, the dK/dV kernel's and the one kernel's (do_bench medians; the
one kernel's includes zeroing its dQ buffers), for the default dK/dV tiles and each --configs entry
(BLOCK_M,BLOCK_N,warps,stages), then the relative error of each atomic dQ against the buffers the dQ kernel
wrote (one of them is the dQ: the smallest error). A measurement, not a feature: the text patch is fitted
to today's generated code.
"""
import argparse
import re

import torch
import triton
import triton.testing

import flashlight
from flashlight.compiler import runtime
from flashlight.harness import variant_registry as vr


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="vanilla")
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--S", type=int, default=4096)
    ap.add_argument("--cpu", action="store_true", help="B1 H2 float32 on the CPU (Triton's interpreter): dQ check only")
    ap.add_argument("--configs", nargs="*", default=[])
    a = ap.parse_args()
    dev = "cpu" if a.cpu else "cuda"
    v = vr.get(a.variant)
    shape = v.shape(B=1 if a.cpu else 4, H=2 if a.cpu else 32, Sq=a.S, Sk=a.S, D=a.D)
    x = v.make_inputs(shape, torch.float32 if a.cpu else torch.bfloat16, dev, requires_grad=True)
    wrt = [x[n] for n in v.learnable]
    fn = flashlight.compile(v.bind(shape), choose_faster=False)
    out = fn(**x)
    g = torch.randn_like(out)
    torch.autograd.grad(out, wrt, g)
    region = [r for r in runtime._REGISTRY.values() if r.backward_source is not None][-1]

    launches, real = [], region._launcher

    def recording(kernel, grid, tensors, scalars, constexprs, options):
        launches.append((kernel, grid, list(tensors), list(scalars), dict(constexprs), dict(options)))
        return real(kernel, grid, tensors, scalars, constexprs, options)
    region._launcher = recording
    torch.autograd.grad(fn(**x), wrt, g)
    region._launcher = real
    dq_l = next(r for r in launches if "_bwd_dq_" in r[0].__name__)
    dkv_l = next(r for r in launches if "_bwd_dkv_" in r[0].__name__)

    src = region.backward_source.source
    head, dkv = src[:src.index("@triton.jit")], src[src.index("@triton.jit\ndef flashlight_bwd_dkv"):]
    bmms = list(dict.fromkeys(re.findall(r"(t_\w+) = tl\.dot\((x\d+), (x\d+),", dkv)))   # Sᵀ = K·Qᵀ
    scale = re.search(r"is this times ([0-9.e-]+)", dkv)
    scale = scale.group(1) if scale else "1.0"
    widths = []
    dkv = dkv.replace("BLOCK_M: tl.constexpr, BLOCK_N", ", ".join(f"dqacc{j}_ptr" for j in range(len(bmms))) +
                      ", BLOCK_M: tl.constexpr, BLOCK_N", 1)
    for j, (t, k_tile, _) in enumerate(bmms):
        d = re.search(rf"{k_tile} = tl\.load\([^\n]*offs_(d\d+)\[None, :\]", dkv).group(1)
        width = int(re.search(rf"offs_{d} = tl\.arange\(0, (\d+)\)", dkv).group(1))
        widths.append(width)
        for line in reversed(list(re.finditer(rf"\n(\s+)ds_{t[2:]} = [^\n]*\n", dkv))):   # every loop body
            ind = line.group(1)
            add = (f"{ind}dq_{t[2:]} = tl.dot(tl.trans(ds_{t[2:]}).to({k_tile}.dtype), {k_tile}, "
                   f"input_precision=DOT_PRECISION)\n"
                   f"{ind}tl.atomic_add(dqacc{j}_ptr + row[:, None] * {width} + offs_{d}[None, :], dq_{t[2:]} * {scale}, "
                   f"mask=mask_m[:, None], sem='relaxed')\n")
            dkv = dkv[:line.end()] + add + dkv[line.end():]
    dkv = dkv.replace("def flashlight_bwd_dkv_", "def probe_bwd_dkv_", 1)
    mod = runtime.load_source(head + dkv, "probe_bwd_dkv")
    fused = getattr(mod, next(n for n in dir(mod) if n.startswith("probe_bwd_dkv_")))
    rows = region.ks.batch * region.ks.M
    dqs = [torch.zeros(rows, w, device=dev, dtype=torch.float32) for w in widths]

    def launch(rec, kernel=None, extra=(), cfg=None):
        k, grid, tensors, scalars, ce, op = rec
        if cfg:   # the dK/dV kernel's grid: key tiles times programs per key tile
            bm, bn, w, s = cfg
            grid = (triton.cdiv(region.backward_source.N, bn) * (grid[0] // triton.cdiv(region.backward_source.N, ce["BLOCK_N"])),)
            ce, op = {"BLOCK_M": bm, "BLOCK_N": bn}, {"num_warps": w, "num_stages": s}
        (kernel or k)[grid](*tensors, *scalars, *extra, **ce, **op)

    def separate(cfg=None):
        launch(dq_l)
        launch(dkv_l, cfg=cfg)

    def together(cfg=None):
        for t in dqs:
            t.zero_()
        launch(dkv_l, fused, dqs, cfg)

    print(torch.cuda.get_device_name() if not a.cpu else "cpu", a.variant, f"D{a.D} S{a.S}",
          "dK/dV tiles", dkv_l[4], dkv_l[5], "dQ tiles", dq_l[4], dq_l[5])
    for cfg in ([] if a.cpu else [None]) + [tuple(int(c) for c in s.split(",")) for s in a.configs]:
        try:
            both = triton.testing.do_bench(lambda: separate(cfg), rep=300, return_mode="median")
            dq = triton.testing.do_bench(lambda: launch(dq_l), rep=300, return_mode="median")
            one = triton.testing.do_bench(lambda: together(cfg), rep=300, return_mode="median")
            print(f"  dK/dV tiles {cfg or 'default'}: dQ kernel {dq:.3f} + dK/dV {both - dq:.3f} = {both:.3f} ms; "
                  f"one kernel with atomic dQ {one:.3f} ms ({one / both:.2f}x)", flush=True)
        except Exception as e:
            print(f"  dK/dV tiles {cfg}: failed ({type(e).__name__}: {str(e)[:200]})")
    separate()
    together()
    for j, t in enumerate(dqs):
        errs = [((b.float().reshape(-1) - t.reshape(-1)).abs().max() / b.float().abs().max()).item()
                for b in dq_l[2] if b.numel() == t.numel()]
        print(f"  atomic dQ {j}: smallest relative error against the dQ kernel's buffers {min(errs):.2e}")


if __name__ == "__main__":
    main()
