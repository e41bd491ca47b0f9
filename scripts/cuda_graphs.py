"""Per-call time with and without CUDA graphs (GPU benchmark): torch.compile(mode="reduce-overhead").

    python scripts/cuda_graphs.py [--variants vanilla,causal,document_mask,evoformer] [--B 4 --H 32 --S 1024 --D 64]

At short sequences a call spends about as long on the host as its kernels take on the GPU. With
mode="reduce-overhead" Inductor records the compiled graph, the fused kernels included, as a CUDA graph
and replays it. For each variant (library variants, `variants/`), forward and forward+backward: ms per
call (median of triton.testing.do_bench) for flashlight and compiled FlexAttention (its block mask built
once, outside the call), each in the default mode and with CUDA graphs. Every output is checked against
a float64 eager reference, with new inputs (new document ids, for the masks that read them) on every
check, so a replayed graph that kept stale tile tables would show as an error.
"""
import argparse

import torch
import triton.testing
from torch.nn.attention.flex_attention import flex_attention

import flashlight
from flashlight.harness import variant_registry as vr


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="vanilla,causal,document_mask,evoformer")
    for name, default in (("B", 4), ("H", 32), ("S", 1024), ("D", 64)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, f"B{a.B} H{a.H} S{a.S} D{a.D} bf16")
    print(f"{'variant':14s} {'mode':7s} {'backend':11s} {'graphs':>6s} {'ms':>8s} {'max rel err':>12s}")
    for name in a.variants.split(","):
        v = vr.get(name)
        # documents of random lengths, new with every seed: tile tables that change between calls
        shape = v.shape(a.B, a.H, a.S, a.S, a.D, **({"equal": False} if "equal" in v.defaults else {}))
        if name == "evoformer":   # at its own size (the runner's shape=msa): B1 H4 S256 D32, 16 MSA rows
            shape = v.shape(1, 4, 256, 256, 32)
        for train in (False, True):
            seeds = iter(range(1, 10**6))
            fresh = lambda: v.make_inputs(shape, torch.bfloat16, "cuda", requires_grad=train, seed=next(seeds))  # noqa: E731
            for backend in ("flashlight", "flex"):
                for graphs in (False, True):
                    torch._dynamo.reset()
                    mode = "reduce-overhead" if graphs else None
                    if backend == "flashlight":
                        compiled = flashlight.compile(v.bind(shape), mode=mode, choose_faster=False)
                        call = lambda x: compiled(**x)  # noqa: E731
                    else:
                        attention = torch.compile(flex_attention, mode=mode)
                        call = lambda x: v.flex(x, shape, attention=attention, prep=prep)  # noqa: E731

                    def step(x):
                        out = call(x)
                        if train:
                            wrt = [x[n] for n in v.learnable]
                            return out, torch.autograd.grad(out, wrt, torch.ones_like(out))
                        return out.clone(), None   # a replayed graph reuses its output memory

                    worst = 0.0
                    for _ in range(3):   # new inputs each time: the graph must not keep stale tile tables
                        x = fresh()
                        prep = v.flex_prepare(x, shape)
                        out, grads = step(x)
                        ref_x = {n: t.detach().double().requires_grad_(train) if t.is_floating_point() else t
                                 for n, t in x.items()}
                        ref = v.bind(shape)(**ref_x)
                        worst = max(worst, rel_err(out, ref))
                        if train:
                            want = torch.autograd.grad(ref, [ref_x[n] for n in v.learnable], torch.ones_like(ref))
                            worst = max(worst, *(rel_err(g, w) for g, w in zip(grads, want)))
                    ms = triton.testing.do_bench(lambda: step(x), rep=200, return_mode="median")
                    print(f"{name:14s} {'fwdbwd' if train else 'fwd':7s} {backend:11s} {str(graphs):>6s} "
                          f"{ms:8.3f} {worst:12.2e}", flush=True)


if __name__ == "__main__":
    main()
