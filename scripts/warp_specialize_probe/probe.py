"""Does Triton 3.6's automatic warp specialisation (tl.range(..., warp_specialize=True)) help attention on
Hopper? A minimal FlashAttention forward (kernels.py) loaded three ways: pointer loads, on-device tensor
descriptors, descriptors with the key loop warp-specialised; against cuDNN and flash SDPA and the current
flashlight kernel, B4 H32 S4096, D64 and D128, bf16 (GPU only; results/h200_warp_specialize_probe.txt).

    python scripts/warp_specialize_probe/probe.py
"""
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as K  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from triton.testing import do_bench  # noqa: E402

triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
B, H, S = 4, 32, 4096
for D in (64, 128):
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
    flops = 4 * B * H * S * S * D
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()
    def tf(ms): return flops / ms / 1e9
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        with sdpa_kernel(be):
            ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=50, rep=300, return_mode="median")
        print(f"D{D} sdpa-{name:24s} {ms:.3f} ms {tf(ms):6.1f} TFLOP/s", flush=True)
    o = torch.empty_like(q)
    configs = []
    for fn in ("attn_ptr", "attn_desc"):
        for bm, bn, w, st in [(64, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 128, 4, 2)]:
            configs.append((fn, False, bm, bn, w, st))
    for bm, bn, w, st in [(128, 128, 4, 2), (128, 128, 4, 3), (128, 64, 4, 2), (128, 64, 4, 3), (128, 64, 4, 4),
                          (256, 64, 4, 2), (256, 128, 4, 2), (128, 128, 8, 2), (128, 64, 8, 3)]:
        configs.append(("attn_desc", True, bm, bn, w, st))
    for fn, ws, bm, bn, w, st in configs:
        kern = getattr(K, fn)
        grid = (S // bm, B * H)
        tag = f"{fn[5:]}{'+ws' if ws else ''} {bm}x{bn} w{w} s{st}"
        try:
            run = lambda: kern[grid](q, k, v, o, D ** -0.5, B * H, N_CTX=S, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, WS=ws,
                                     num_warps=w, num_stages=st)
            run(); torch.cuda.synchronize()
            err = (o.float() - ref).abs().max().item()
            ms = do_bench(run, warmup=50, rep=300, return_mode="median")
            print(f"D{D} {tag:30s} {ms:.3f} ms {tf(ms):6.1f} TFLOP/s err {err:.1e}", flush=True)
        except Exception as e:
            print(f"D{D} {tag:30s} FAIL {str(e).splitlines()[0][:150] if str(e) else type(e).__name__}", flush=True)

import flashlight  # noqa: E402


def vanilla(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1) @ v
for D in (64, 128):
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
    f = flashlight.compile(vanilla, choose_faster=False)
    f(q, k, v)
    ms = do_bench(lambda: f(q, k, v), warmup=50, rep=300, return_mode="median")
    print(f"D{D} flashlight (current)            {ms:.3f} ms {4*B*H*S*S*D/ms/1e9:6.1f} TFLOP/s", flush=True)


# warp-specialised kernels on 30 fresh inputs each (2 and 3 pipeline stages), then a causal kernel whose
# unmasked key loop is warp-specialised
for D in (64, 128):
    for st in (2, 3):
        bad, worst = 0, 0.0
        for trial in range(30):
            g = torch.Generator("cuda").manual_seed(100 + trial)
            q, k, v = [(1 + trial % 3) * torch.randn(B, 8, 2048, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
            o = torch.empty_like(q)
            try:
                K.attn_desc[(2048 // 128, B * 8)](q, k, v, o, D ** -0.5, B * 8, N_CTX=2048, HEAD_DIM=D, BLOCK_M=128,
                                                  BLOCK_N=128 if D == 64 or st == 2 else 64, WS=True, num_warps=4, num_stages=st)
            except Exception as e:
                print("fail", str(e)[:100]); break
            err = (o.float() - ref).abs().max().item()
            worst = max(worst, err) if err == err else worst
            bad += not (err < 0.05)
        print(f"WS D{D} s{st}: {bad}/30 bad, worst ok err {worst:.1e}", flush=True)

for D in (64, 128):
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = [torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True).float()
    flops = 2 * B * H * S * S * D
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), warmup=50, rep=300, return_mode="median")
    print(f"causal D{D} cudnn {ms:.3f} ms {flops/ms/1e9:6.1f}", flush=True)
    o = torch.empty_like(q)
    for ws, bm, bn, w, st in ((False, 128, 64, 8, 3), (False, 128, 64, 4, 3), (True, 128, 128, 4, 2), (True, 128, 64, 4, 2)):
        try:
            run = lambda: K.attn_desc_causal[(S // bm, B * H)](q, k, v, o, D ** -0.5, B * H, N_CTX=S, HEAD_DIM=D,
                                                               BLOCK_M=bm, BLOCK_N=bn, WS=ws, num_warps=w, num_stages=st)
            run(); torch.cuda.synchronize()
            err = (o.float() - ref).abs().max().item()
            ms = do_bench(run, warmup=50, rep=300, return_mode="median")
            print(f"causal D{D} ws={ws} {bm}x{bn} w{w} s{st} {ms:.3f} ms {flops/ms/1e9:6.1f} err {err:.1e}", flush=True)
        except Exception as e:
            print(f"causal D{D} ws={ws} {bm}x{bn} FAIL {str(e).splitlines()[0][:120]}", flush=True)
