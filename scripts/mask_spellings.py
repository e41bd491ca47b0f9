"""One mask written the ways model files write it, timed side by side (GPU benchmark).

    python scripts/mask_spellings.py [--B 4 --H 16 --S 2048 --D 64 --window 32]

GQA (4 query heads per KV head), tanh soft-capping at 50, a causal window of `window` keys, written as
`torch.where(keep, s, -inf)`, as `torch.where(keep, s, torch.finfo(s.dtype).min)` (HF transformers'
spelling) and as `masked_fill(~keep, -1e9)`; each through flashlight, torch.compile (Inductor) and, for
reference, FlexAttention with the same mask as a block mask built once. Prints ms per call (median of
triton.testing.do_bench) and the max abs error against the -inf version in float64.
"""
import argparse

import torch
import triton.testing
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flashlight


def make(fill_kind, window, groups):
    def attn(q, k, v):
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        s = torch.tanh(s / 50.0) * 50.0
        i = torch.arange(q.shape[-2], device=q.device)[:, None]
        j = torch.arange(k.shape[-2], device=q.device)[None, :]
        keep = (j <= i) & (i - j < window)
        if fill_kind == "-inf":
            s = torch.where(keep, s, float("-inf"))
        elif fill_kind == "finfo.min":
            s = torch.where(keep, s, torch.finfo(s.dtype).min)
        else:
            s = s.masked_fill(~keep, -1e9)
        return torch.softmax(s, dim=-1) @ v
    return attn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("B", 4), ("H", 16), ("S", 2048), ("D", 64), ("window", 32)):
        ap.add_argument(f"--{name}", type=int, default=default)
    a = ap.parse_args()
    groups = 4
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(a.B, a.H, a.S, a.D, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(a.B, a.H // groups, a.S, a.D, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    ref = make("-inf", a.window, groups)(q.double(), k.double(), v.double())
    print(f"B{a.B} H{a.H} (KV heads {a.H // groups}) S{a.S} D{a.D}, causal window {a.window}, softcap 50, bf16")
    print(f"{'mask spelling':12s} {'backend':14s} {'ms':>8s} {'max abs err':>12s}")
    for kind in ("-inf", "finfo.min", "-1e9"):
        fn = make(kind, a.window, groups)
        for backend, compile_ in (("flashlight", flashlight.compile), ("torch.compile", torch.compile)):
            torch._dynamo.reset()   # one compiled entry per code object: no spelling runs another's graph
            compiled = compile_(fn)
            out = compiled(q, k, v)
            ms = triton.testing.do_bench(lambda: compiled(q, k, v), rep=200, return_mode="median")
            err = (out.double() - ref).abs().max().item()
            print(f"{kind:12s} {backend:14s} {ms:8.3f} {err:12.2e}", flush=True)

    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & (qi - kj < a.window)

    def softcap(score, b, h, qi, kj):
        return torch.tanh(score / 50.0) * 50.0
    bm = create_block_mask(mask_mod, None, None, a.S, a.S, device="cuda")
    flex = torch.compile(flex_attention)
    call = lambda: flex(q, k, v, score_mod=softcap, block_mask=bm, enable_gqa=True)  # noqa: E731
    out = call()
    ms = triton.testing.do_bench(call, rep=200, return_mode="median")
    print(f"{'block mask':12s} {'flex':14s} {ms:8.3f} {(out.double() - ref).abs().max().item():12.2e}")


if __name__ == "__main__":
    main()
