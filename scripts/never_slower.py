"""Where Inductor's unfused code beats the fused kernel, flashlight runs Inductor's (GPU benchmark).

    python scripts/never_slower.py            # forward calls
    python scripts/never_slower.py --train    # training steps: forward, then every input's gradient

Programs at sizes where a call is mostly host time or the head dim is odd: plain softmax attention at
head dim 40 (B2 H12 S1000), an MLA-like head dim 192 with values of 128 (B1 H16 S1024), Evoformer's
gated row attention with pair bias (B1, 16 MSA rows, H8 S256 D32), causal at B4 H32 S1024 D64 and at
B2 H16 S2048 D128 — each
through torch.compile (Inductor), flashlight's fused kernel alone (`choose_faster=False`) and flashlight
as it runs by default (its first call times both and keeps the faster). Prints ms per call (the lowest of three
medians of triton.testing.do_bench: host-bound calls drift with the machine's load; forward, bf16), the first call's seconds (compile, and timing), which path the
default runs, and the max abs error against float64 (with --train: per step, and the largest error of
the gradients, relative to the largest float64 gradient of each input).
"""
import argparse
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
    yield "causal B2 H16 S2048 D128", causal, (r(2, 16, 2048, 128), r(2, 16, 2048, 128), r(2, 16, 2048, 128))


def training_step(fn, args):
    """A training step of fn: forward, then the gradient of every input from a fixed output gradient."""
    g = torch.randn_like(fn(*args))
    return lambda: torch.autograd.grad(fn(*args), args, g), g


def grad_error(got, ref):
    return max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, ref))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="time training steps (forward and backward)")
    train = parser.parse_args().train
    print(torch.cuda.get_device_name(), torch.__version__, "training steps" if train else "forward calls")
    print("(the first call of the default times both; what it saw is in the last column)")
    print(f"{'case':36s} {'backend':22s} {'ms':>8s} {'first call s':>12s} {'max err':>12s}  runs")
    for name, fn, args in cases():
        if train:
            args = tuple(a.requires_grad_() for a in args)
            ref_args = [a.detach().double().requires_grad_() for a in args]
        ref = fn(*[a.detach().double() for a in args])
        for label, make in (("torch.compile", lambda: torch.compile(fn)),
                            ("flashlight fused only", lambda: flashlight.compile(fn, choose_faster=False)),
                            ("flashlight (default)", lambda: flashlight.compile(fn))):
            torch._dynamo.reset()
            compiled = make()
            t = time.perf_counter()
            if train:
                step, g = training_step(compiled, args)
                out = step()
                ref = torch.autograd.grad(fn(*ref_args), ref_args, g.double())
            else:
                step = lambda: compiled(*args)  # noqa: E731
                out = step()
            torch.cuda.synchronize()
            first = time.perf_counter() - t
            ms = min(triton.testing.do_bench(step, rep=100, return_mode="median") for _ in range(3))
            runs = ""
            if label.startswith("flashlight"):
                rep = backend.last_report
                runs = "fused" if rep.fused else "Inductor"
                runs += "".join(f" | {n}" for n in rep.notes if "Inductor" in n) + "".join(
                    f" | {x.reason}" for x in rep.regions if x.reason)
            err = grad_error(out, ref) if train else (out.double() - ref).abs().max().item()
            print(f"{name:36s} {label:22s} {ms:8.3f} {first:12.1f} {err:12.2e}  {runs}", flush=True)


if __name__ == "__main__":
    main()
