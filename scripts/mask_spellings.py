"""One mask written the ways model files write it, timed side by side (GPU benchmark).

    python scripts/mask_spellings.py [--B 4 --H 16 --groups 4 --S 2048 --D 64 --window 32] [--train]

GQA (`groups` query heads per KV head), tanh soft-capping at 50, a causal window of `window` keys, written
as `torch.where(keep, s, -inf)`, as `torch.where(keep, s, torch.finfo(s.dtype).min)` (HF transformers'
spelling), as `masked_fill(~keep, -1e9)`, with the fill as `torch.tensor(finfo.min)` (GPT-J), as a bias
built from `torch.ones(S, S, dtype=torch.bool).tril()` (scaled_dot_product_attention's documented math), as
the log of a 0/1 mask (Mistral's reference), and as tensors passed in: transformers' eager mask (a [B, 1, S, S]
tensor of 0 / finfo.min added to the scores), a [B, 1, S, S] boolean tensor, and the added mask again
with two equal mask tensors taking turns (every call classifies its tiles again: what classification
costs). Each runs through flashlight and torch.compile (Inductor); FlexAttention runs the same mask as a
block mask built once, for reference. Prints ms per call (median of triton.testing.do_bench; with
`--train`, forward and backward) and the max abs error of the output against the -inf version in float64.
"""
import argparse

import torch
import triton.testing
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flashlight


def make(fill_kind, window, groups):
    def attn(q, k, v, mask=None):
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        s = torch.tanh(s / 50.0) * 50.0
        if fill_kind == "added tensor":
            s = s + mask
        elif fill_kind == "bool tensor":
            s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
        elif fill_kind == "ones(bool).tril() bias":   # scaled_dot_product_attention's documented math
            ones = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device)
            keep = ones.tril(diagonal=0) & ~ones.tril(diagonal=-window)
            s = s + torch.zeros_like(keep, dtype=s.dtype).masked_fill(keep.logical_not(), float("-inf"))
        elif fill_kind == "log of a 0/1 mask":       # Mistral's reference
            ones = torch.full((s.shape[-2], s.shape[-1]), 1, dtype=s.dtype, device=s.device)
            s = s + torch.log(torch.triu(torch.tril(ones, diagonal=0), diagonal=-(window - 1)))
        else:
            i = torch.arange(q.shape[-2], device=q.device)[:, None]
            j = torch.arange(k.shape[-2], device=q.device)[None, :]
            keep = (j <= i) & (i - j < window)
            if fill_kind == "-inf":
                s = torch.where(keep, s, float("-inf"))
            elif fill_kind == "finfo.min":
                s = torch.where(keep, s, torch.finfo(s.dtype).min)
            elif fill_kind == "torch.tensor(finfo.min)":   # GPT-J's and CodeGen's mask value
                s = torch.where(keep, s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype).to(s.device))
            else:
                s = s.masked_fill(~keep, -1e9)
        return torch.softmax(s, dim=-1) @ v
    return attn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("B", 4), ("H", 16), ("groups", 4), ("S", 2048), ("D", 64), ("window", 32)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--train", action="store_true", help="time forward and backward")
    a = ap.parse_args()
    groups, dt = a.groups, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(a.B, a.H, a.S, a.D, device="cuda", dtype=dt, generator=g)
    k, v = (torch.randn(a.B, a.H // groups, a.S, a.D, device="cuda", dtype=dt, generator=g) for _ in range(2))
    i, j = torch.arange(a.S, device="cuda")[:, None], torch.arange(a.S, device="cuda")[None, :]
    keep = ((j <= i) & (i - j < a.window)).expand(a.B, 1, a.S, a.S).contiguous()
    masks = {"added tensor": torch.zeros(a.B, 1, a.S, a.S, device="cuda", dtype=dt).masked_fill(
        ~keep, torch.finfo(dt).min), "bool tensor": keep}
    exact = make("-inf", a.window, groups)   # float64, one batch row at a time (S4096 fits)
    ref = torch.cat([exact(q[b:b + 1].double(), k[b:b + 1].double(), v[b:b + 1].double()) for b in range(a.B)])
    grad = torch.randn_like(q)
    if a.train:
        q, k, v = (x.requires_grad_() for x in (q, k, v))

    def bench(call):
        def step():
            out = call()
            if a.train:
                torch.autograd.grad(out, (q, k, v), grad)
            return out
        out = step()
        return triton.testing.do_bench(step, rep=200, return_mode="median"), (out.double() - ref).abs().max().item()

    print(f"B{a.B} H{a.H} (KV heads {a.H // groups}) S{a.S} D{a.D}, causal window {a.window}, softcap 50, "
          f"bf16, {'forward+backward' if a.train else 'forward'}")
    print(f"{'mask spelling':24s} {'backend':14s} {'ms':>8s} {'max abs err':>12s}")
    spellings = ("-inf", "finfo.min", "-1e9", "torch.tensor(finfo.min)", "ones(bool).tril() bias", "log of a 0/1 mask",
                 "added tensor", "bool tensor", "added, new tensor each call")
    for kind in spellings:
        fn = make(kind.replace(", new tensor each call", " tensor"), a.window, groups)
        mask = masks.get(kind)
        turns = [masks["added tensor"], masks["added tensor"].clone()] if "each call" in kind else [mask]
        fused = lambda f: flashlight.compile(f, choose_faster=False)   # noqa: E731  (the fused kernel itself)
        for backend, compile_ in (("flashlight", fused), ("torch.compile", torch.compile)):
            torch._dynamo.reset()   # one compiled entry per code object: no spelling runs another's graph
            compiled = compile_(fn)
            n = iter(range(10**9))
            ms, err = bench(lambda: compiled(q, k, v, turns[next(n) % len(turns)]))
            print(f"{kind:24s} {backend:14s} {ms:8.3f} {err:12.2e}", flush=True)

    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & (qi - kj < a.window)

    def softcap(score, b, h, qi, kj):
        return torch.tanh(score / 50.0) * 50.0
    bm = create_block_mask(mask_mod, None, None, a.S, a.S, device="cuda")
    flex = torch.compile(flex_attention)
    ms, err = bench(lambda: flex(q, k, v, score_mod=softcap, block_mask=bm, enable_gqa=True))
    print(f"{'block mask':24s} {'flex':14s} {ms:8.3f} {err:12.2e}")


if __name__ == "__main__":
    main()
