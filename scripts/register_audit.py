"""Registers, spills and shared memory of every generated kernel on Hopper, without a GPU.

    python scripts/register_audit.py                                   # every variant, D64, float16
    python scripts/register_audit.py --D 128 --variants causal,gqa
    python scripts/register_audit.py --dtype float32 --only-spills
    python scripts/register_audit.py --variants gqa --config '{"backward": {"dkv": {"BLOCK_M": 32, "BLOCK_N": 64}}}'

Each variant's inference forward, training forward and backward kernels (and tile classification
kernels) are generated on the CPU (Triton's interpreter runs them once, at B1 H4 S128) with the tiles a
GPU would launch them with (runtime.default_config / backward_config for "cuda"; --config: flashlight.compile's
config, to audit other tiles), then compiled for sm_90
as Triton's JIT specialises a launch, and ptxas reports registers per thread and spill bytes. A kernel
that spills, or asks for more shared memory than a GPU has (its launch then shrinks the tiles), is a
lead for a tile or code change to measure on a GPU; the audit itself measures no time. bfloat16 kernels
compute wrongly in the interpreter, so 16-bit tiles are audited as float16 (the same code and registers).
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"   # the kernels run on the CPU first: set before triton is imported
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402

import flashlight  # noqa: E402
from flashlight.harness import variant_registry as vr  # noqa: E402
from hopper_compile import H100_SHARED, compile_for_hopper, record_gpu_launches  # noqa: E402


def kind(kernel: str) -> str:
    for prefix, what in (("flashlight_attention", "forward"), ("flashlight_bwd_dq", "dQ"),
                         ("flashlight_bwd_dkv", "dK/dV"), ("classify", "classify")):
        if kernel.startswith(prefix):
            return what
    return kernel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default=",".join(vr.names()))
    ap.add_argument("--D", type=int, default=64)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--only-spills", action="store_true", help="print only kernels that spill or exceed shared memory")
    ap.add_argument("--config", type=json.loads, default=None,
                    help='flashlight.compile(config=...) as JSON: forward tiles, and {"backward": {"dq": .., "dkv": ..}}')
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    launches = record_gpu_launches()
    print(f"{'variant':15s} {'kernel':9s} {'tiles':>10s} {'warps':>5s} {'stages':>6s} {'regs':>5s} "
          f"{'spill st/ld B':>14s} {'shared B':>9s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.variants.split(","):
            v = vr.get(name)
            shape = v.shape(B=1, H=4, Sq=128, Sk=128, D=a.D, **({"N": 2} if name == "evoformer" else {}))
            launches.clear()
            torch._dynamo.reset()
            inputs = v.make_inputs(shape, dtype, "cpu", requires_grad=True, seed=0)
            try:
                fn = flashlight.compile(v.bind(shape), inductor=False, config=a.config)
                with torch.no_grad():
                    fn(**inputs)
                out = fn(**inputs)
                out.backward(torch.randn_like(out))
                compiled = compile_for_hopper(tmp, launches, ptxas=True)
            except Exception as e:   # a variant that does not run at this dtype/head dim: say so, go on
                print(f"{name:15s} failed: {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}")
                continue
            for job, (kernel, shared, regs, spill_st, spill_ld) in compiled:
                if a.only_spills and not (spill_st or spill_ld or shared > H100_SHARED):
                    continue
                c, o = job["constexprs"], job["options"]
                tiles = f"{c.get('BLOCK_M', '-')}x{c.get('BLOCK_N', '-')}"
                print(f"{name:15s} {kind(kernel):9s} {tiles:>10s} {o['num_warps']:>5d} {o['num_stages']:>6d} "
                      f"{regs:>5d} {f'{spill_st}/{spill_ld}':>14s} {shared:>9d}"
                      + ("  > an H100's shared memory" if shared > H100_SHARED else ""), flush=True)


if __name__ == "__main__":
    main()
