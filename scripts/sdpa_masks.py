"""F.scaled_dot_product_attention given a mask, as transformers' default attention calls it (GPU benchmark).

    python scripts/sdpa_masks.py [--train] [--only NAME]
    python scripts/sdpa_masks.py --mha [--train]     # nn.MultiheadAttention with masks

Masks passed as tensors: causal as a [1, 1, S, S] boolean (transformers passes the causal mask itself once
there is padding), a sliding window of 1024 (Mistral, Gemma 2), padding as [B, 1, 1, S] (BERT), packed
documents as [B, 1, S, S]. Each runs through PyTorch's SDPA kernels (eager; they read a mask whole, or fall
back to the math), torch.compile (Inductor, which keeps the SDPA call) and flashlight (which traces a masked
call as its math and fuses it; `choose_faster=False`: the fused kernel itself). Prints ms per call (median of
triton.testing.do_bench; with --train, forward and the gradients of q, k, v), bf16, and the largest error of
the output (and gradients) relative to the largest value of float64 SDPA (its math backend).
"""
import argparse
import copy

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashlight


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def cases():
    def idx(S):
        return torch.arange(S, device="cuda")[:, None], torch.arange(S, device="cuda")[None, :]
    i, j = idx(4096)
    yield "causal, [1, 1, S, S] bool", (4, 32, 4096, 64), (j <= i)[None, None]
    yield "window 1024, [1, 1, S, S] bool", (2, 16, 4096, 128), ((j <= i) & (i - j < 1024))[None, None]
    pad = torch.ones(8, 1024, dtype=torch.bool, device="cuda")
    pad[::2, -256:] = False
    yield "padding, [B, 1, 1, S] bool", (8, 12, 1024, 64), pad[:, None, None, :]
    doc = torch.arange(4096, device="cuda") * 8 // 4096
    yield "documents, [B, 1, S, S] bool", (4, 32, 4096, 64), \
        (doc[:, None] == doc[None, :]).expand(4, 1, 4096, 4096).contiguous()
    # float masks: added to the scores (-inf or finfo.min where removed)
    yield "causal, [S, S] float -inf", (4, 32, 4096, 64), \
        torch.nn.Transformer.generate_square_subsequent_mask(4096, device="cuda", dtype=torch.bfloat16)
    window = (j <= i) & (i - j < 1024)
    lowest = torch.finfo(torch.bfloat16).min
    yield "window 1024, [1, 1, S, S] finfo.min", (2, 16, 4096, 128), \
        torch.zeros(1, 1, 4096, 4096, device="cuda", dtype=torch.bfloat16).masked_fill(~window, lowest)


def mha_cases():
    """nn.MultiheadAttention (batch_first, need_weights=False, as nn.TransformerEncoderLayer calls it): its SDPA
    call gets the float causal mask of generate_square_subsequent_mask, the padding mask, or both merged."""
    B, S, E = 4, 2048, 1024
    causal = torch.nn.Transformer.generate_square_subsequent_mask(S, device="cuda", dtype=torch.bfloat16)
    pad = torch.zeros(B, S, dtype=torch.bool, device="cuda")
    pad[::2, -512:] = True
    yield "MHA causal float mask", (B, S, E), {"attn_mask": causal}
    yield "MHA key_padding_mask", (B, S, E), {"key_padding_mask": pad}
    yield "MHA causal + key_padding", (B, S, E), {"attn_mask": causal, "key_padding_mask": pad}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", action="store_true", help="time forward and backward")
    ap.add_argument("--only", default="", help="the cases whose name contains this")
    ap.add_argument("--mha", action="store_true", help="nn.MultiheadAttention with masks instead")
    ap.add_argument("--backends", default="eager,compile,flashlight", help="of eager, compile, flashlight")
    args = ap.parse_args()
    train, wanted = args.train, args.backends.split(",")
    if args.mha:
        return main_mha(train, args.only, wanted)
    print(torch.cuda.get_device_name(), torch.__version__, "forward+backward" if train else "forward", "bf16")
    print(f"{'mask':32s} {'backend':22s} {'ms':>8s} {'max err':>9s}")
    for name, (B, H, S, D), mask in cases():
        if args.only not in name:
            continue
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        grad = torch.randn_like(q)
        refs = []
        for b in range(B):   # float64 math, one batch row at a time
            x = [t[b:b + 1].double().requires_grad_(train) for t in (q, k, v)]
            with sdpa_kernel([SDPBackend.MATH]):
                m = mask[b:b + 1] if mask.dim() == 4 and mask.shape[0] > 1 else mask
                out = sdpa(*x, m if m.dtype == torch.bool else m.double())
            refs.append([out.detach()] + (list(torch.autograd.grad(out, x, grad[b:b + 1].double())) if train else []))
            del out, x
        ref = [torch.cat(parts) for parts in zip(*refs)]
        del refs
        if train:
            q, k, v = (t.requires_grad_() for t in (q, k, v))
        for label, fn in backends(sdpa, "SDPA (eager)", wanted):
            def step():
                out = fn(q, k, v, mask)
                return [out, *torch.autograd.grad(out, (q, k, v), grad)] if train else [out]
            measure(name, label, step, ref)


def main_mha(train, only, wanted):
    print(torch.cuda.get_device_name(), torch.__version__, "forward+backward" if train else "forward", "bf16")
    print(f"{'case':32s} {'backend':22s} {'ms':>8s} {'max err':>9s}")
    for name, (B, S, E), masks in mha_cases():
        if only not in name:
            continue
        torch.manual_seed(0)
        mha = torch.nn.MultiheadAttention(E, 16, batch_first=True, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(B, S, E, device="cuda", dtype=torch.bfloat16, requires_grad=train)
        grad = torch.randn_like(x)
        ref_mha = copy.deepcopy(mha).double()
        x64 = x.detach().double().requires_grad_(train)
        m64 = {k: (m.double() if m.is_floating_point() else m) for k, m in masks.items()}
        with sdpa_kernel([SDPBackend.MATH]):
            out = ref_mha(x64, x64, x64, need_weights=False, **m64)[0]
        ref = [out.detach()] + ([torch.autograd.grad(out, x64, grad.double())[0]] if train else [])
        del out, x64

        def call(x):
            return mha(x, x, x, need_weights=False, **masks)[0]

        for label, fn in backends(call, "eager", wanted):
            def step():
                out = fn(x)
                return [out, *torch.autograd.grad(out, x, grad)] if train else [out]
            measure(name, label, step, ref)


def backends(fn, eager_label, wanted):
    """(label, callable) of each wanted backend: fn itself, torch.compile's, flashlight's fused kernels."""
    for label, backend, make in ((eager_label, "eager", lambda: fn),
                                 ("torch.compile", "compile", lambda: torch.compile(fn)),
                                 ("flashlight", "flashlight", lambda: flashlight.compile(fn, choose_faster=False))):
        if backend in wanted:
            torch._dynamo.reset()
            yield label, make()


def measure(name, label, step, ref):
    """One printed row: ms per step (median of do_bench), the largest error against the float64 `ref`, and
    NOT FUSED where flashlight's step launched no fused kernel."""
    try:
        launches = flashlight.counters["fused_launches"]
        got = step()
        err = max(((a.double() - r).abs().max() / r.abs().max()).item() for a, r in zip(got, ref))
        del got
        fused = "" if label != "flashlight" or flashlight.counters["fused_launches"] > launches else "  NOT FUSED"
        ms = triton.testing.do_bench(step, rep=200, return_mode="median")
        print(f"{name:32s} {label:22s} {ms:8.3f} {err:9.1e}{fused}", flush=True)
    except torch.OutOfMemoryError:
        print(f"{name:32s} {label:22s} {'out of memory':>18s}", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
