"""Where Inductor's unfused code beats the fused kernel, flashlight runs Inductor's (GPU benchmark).

    python scripts/never_slower.py

Programs at sizes where a call is mostly host time or the head dim is odd: plain softmax attention at
head dim 40 (B2 H12 S1000), an MLA-like head dim 192 with values of 128 (B1 H16 S1024), Evoformer's
gated row attention with pair bias (B1, 16 MSA rows, H8 S256 D32), causal at B4 H32 S1024 D64 — each
through torch.compile (Inductor), flashlight's fused kernel alone (`choose_faster=False`) and flashlight
as it runs by default (its first call times both and keeps the faster). Prints ms per call (the lowest of three
medians of triton.testing.do_bench: host-bound calls drift with the machine's load; forward, bf16), the first call's seconds (compile, and timing), which path the
default runs, and the max abs error against float64.
"""
import time

import torch
import triton.testing

import flashlight
from flashlight.compiler import backend


def plain(q, k, v):
    return torch.softmax(q @ k.mT * q.shape[-1] ** -0.5, -1) @ v


def causal(q, k, v):
    i = torch.arange(q.shape[-2], device=q.device)[:, None]
    j = torch.arange(k.shape[-2], device=q.device)[None, :]
    return torch.softmax((q @ k.mT * q.shape[-1] ** -0.5).masked_fill(j > i, float("-inf")), -1) @ v


def evoformer(q, k, v, bias, gate):
    s = q @ k.mT * q.shape[-1] ** -0.5 + bias
    return torch.sigmoid(gate) * (torch.softmax(s, -1) @ v)


def cases():
    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
    yield "head dim 40, B2 H12 S1000", plain, (r(2, 12, 1000, 40), r(2, 12, 1000, 40), r(2, 12, 1000, 40))
    yield "MLA-like D192 Dv128, B1 H16 S1024", causal, (r(1, 16, 1024, 192), r(1, 16, 1024, 192), r(1, 16, 1024, 128))
    yield "evoformer B1 N16 H8 S256 D32", evoformer, (r(1, 16, 8, 256, 32), r(1, 16, 8, 256, 32), r(1, 16, 8, 256, 32),
                                                      r(1, 1, 8, 256, 256), r(1, 16, 8, 256, 32))
    yield "causal B4 H32 S1024 D64", causal, (r(4, 32, 1024, 64), r(4, 32, 1024, 64), r(4, 32, 1024, 64))


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    print("(the first call of the default times both; what it saw is in the last column)")
    print(f"{'case':36s} {'backend':22s} {'ms':>8s} {'first call s':>12s} {'max abs err':>12s}  runs")
    for name, fn, args in cases():
        ref = fn(*[a.double() for a in args])
        for label, make in (("torch.compile", lambda: torch.compile(fn)),
                            ("flashlight fused only", lambda: flashlight.compile(fn, choose_faster=False)),
                            ("flashlight (default)", lambda: flashlight.compile(fn))):
            torch._dynamo.reset()
            compiled = make()
            t = time.perf_counter()
            out = compiled(*args)
            torch.cuda.synchronize()
            first = time.perf_counter() - t
            ms = min(triton.testing.do_bench(lambda: compiled(*args), rep=100, return_mode="median") for _ in range(3))
            runs = ""
            if label.startswith("flashlight"):
                rep = backend.last_report
                runs = "fused" if rep.fused else "Inductor"
                runs += "".join(f" | {n}" for n in rep.notes if "Inductor" in n) + "".join(
                    f" | {x.reason}" for x in rep.regions if x.reason)
            err = (out.double() - ref).abs().max().item()
            print(f"{name:36s} {label:22s} {ms:8.3f} {first:12.1f} {err:12.2e}  {runs}", flush=True)


if __name__ == "__main__":
    main()
