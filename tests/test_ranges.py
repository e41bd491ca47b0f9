"""Integer index math in 32 bits where every value eager can give it fits, in 64 where one may not
(flashlight/compiler/ranges.py), checked on the generated source and against float64 eager."""
import math
import re

import pytest
import torch

import flashlight
from flashlight.harness import variant_registry as vr

from test_backward import check_grads
from test_compiler import TOL, rel_err, run_fused   # conftest sets TRITON_INTERPRET=1 before imports


def kernel_text(tmp_path, fn, inputs: dict, backward=False) -> str:
    """The generated kernels' source, after a call (and a backward) of the compiled fn."""
    torch._dynamo.reset()
    inputs = {k: x.detach().clone().requires_grad_(x.requires_grad) for k, x in inputs.items()}   # grads apart
    out = flashlight.compile(fn, dump=str(tmp_path))(**inputs)
    if backward:
        out.sum().backward()
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.py")))


def test_t5_buckets_are_computed_in_int32(tmp_path):
    """T5's bucket (abs, a float log, `.long()`, min, where) fits int32 in every defined value: log(0) = -inf
    at distance 0 converts to an undefined integer, which the where then replaces. Its kernels, forward and
    backward, hold no int64 arithmetic, and stay exact."""
    v = vr.get("t5_bias")
    shape = v.shape(B=1, H=2, Sq=72, Sk=72, D=16)
    inputs = v.make_inputs(shape, torch.float32, "cpu", requires_grad=True, seed=torch.randint(0, 10**6, ()).item())
    text = kernel_text(tmp_path, v.bind(shape), inputs, backward=True)
    assert "flashlight_bwd_dq" in text and ".to(tl.int32)" in text
    assert "int64" not in text
    check_grads(v.bind(shape), inputs)


def test_positions_past_int32_are_computed_in_int64(tmp_path):
    """`i * j` of positions offset by 50,000 passes 2**31: computed in int32 (as positions were) it wraps
    negative on a GPU and masks keys eager keeps; the kernel widens the positions to int64, as eager computes
    them. (The Triton interpreter does not wrap this product as the GPU does, so the spelling is what fails
    here without the widening; the values are checked against eager too.)"""
    def product_mask(q, k, v):
        S = q.shape[-2]
        i = torch.arange(S)[:, None] + 50_000
        j = torch.arange(S)[None, :] + 50_000
        keep = i * j >= 50_000 * 50_000 + 40 * 50_000
        s = (q @ k.mT).masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1) @ v

    q, k, v = (torch.randn(1, 2, 72, 16, requires_grad=True) for _ in range(3))
    text = kernel_text(tmp_path, product_mask, {"q": q, "k": k, "v": v}, backward=True)
    assert text.count(".to(tl.int64)") >= 3   # the forward's positions and both backward kernels'
    assert "index math: int64" in str(flashlight.explain(product_mask, q, k, v))
    check_grads(product_mask, {"q": q, "k": k, "v": v})


def test_an_integer_converted_from_data_stays_int64(tmp_path):
    """A bucket computed from loaded floats (`(d * 4).long()`) may hold any int64 value eager can: its
    conversion stays int64."""
    def data_buckets(q, k, v, d, table):
        ix = (d * 4).long().clamp(0, 15)
        return torch.softmax(q @ k.mT / 4 + table[ix], -1) @ v

    inputs = {"q": torch.randn(1, 2, 40, 16), "k": torch.randn(1, 2, 40, 16), "v": torch.randn(1, 2, 40, 16),
              "d": torch.rand(40, 40) * 5, "table": torch.randn(16)}
    text = kernel_text(tmp_path, data_buckets, inputs)
    assert ".to(tl.int64)" in text
    out, ref, _ = run_fused(data_buckets, **inputs)
    assert rel_err(out, ref) < TOL


def test_ranges_of_a_t5_bucket():
    """The analysis itself on T5's bucket ops, without a kernel: the defined values of `.long()` of the
    scaled log lie in [-5, 17] (log(1/8) to log(4095/8), scaled), the bucket in [0, 4111] before its min."""
    from flashlight.compiler import ranges
    dist = ranges.Ints(0, 4095)
    scaled = ranges._mul(ranges._log(ranges._mul(ranges._floats(dist), ranges._scalar(1 / 8))),
                         ranges._scalar(8 / math.log(16)))
    bucket = ranges._cast(scaled, torch.int64)
    assert (bucket.lo, bucket.hi, bucket.undefined) == (-5, 17, True)
    assert ranges._cast(ranges._log(ranges._floats(ranges.Ints(-3, 4))), torch.int64) == ranges.Ints(0, 1, True)
    assert ranges._cast(ranges.ANY_FLOAT, torch.int64) == ranges.ANY_INT   # unbounded: any int64


def test_tile_bounds_of_wide_positions_are_computed_in_int64(tmp_path):
    """A causal mask written on positions scaled past 2**31 (`(j + 60000) * 40000 <= (i + 60000) * 40000`):
    the kernel skips and keeps tiles by bounding the mask over each tile from the tile's first and last
    positions. Those bounds are multiplied as the positions are: in int32 they would wrap on a GPU and skip
    tiles the mask keeps, so they are int64 here too, in the forward and in both backward kernels."""
    def scaled_causal(q, k, v):
        S = q.shape[-2]
        i = torch.arange(S)[:, None] + 60_000
        j = torch.arange(S)[None, :] + 60_000
        s = (q @ k.mT).masked_fill(j * 40_000 > i * 40_000, float("-inf"))
        return torch.softmax(s, -1) @ v

    q, k, v = (torch.randn(1, 2, 100, 16, requires_grad=True) for _ in range(3))
    text = kernel_text(tmp_path, scaled_causal, {"q": q, "k": k, "v": v}, backward=True)
    bounds = [ln for ln in text.splitlines() if re.match(r"\s*iv\d+_[ab] = ", ln)]
    assert bounds and all("tl.int64" in ln for ln in bounds), bounds
    assert "tile_empty" in text   # the tiles are classified: the bounds are used
    check_grads(scaled_causal, {"q": q, "k": k, "v": v})


def chunked(q, k, v):
    """Llama 4's chunked attention: causal within chunks of 32 positions."""
    i, j = torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :]
    keep = (i // 32 == j // 32) & (j <= i)
    return torch.softmax((q @ k.mT / 4).masked_fill(~keep, float("-inf")), -1) @ v


def test_chunked_attention_fuses_skips_tiles_and_trains(tmp_path):
    """`i // 32 == j // 32`: floor division of positions (never negative) is Triton's `//`; the tiles of
    other chunks are skipped (bounded by the quotients of the tile's first and last positions) and tiles
    inside a chunk below the diagonal drop the mask, with the eager result in the forward and backward."""
    q, k, v = (torch.randn(2, 2, 100, 16, requires_grad=True) for _ in range(3))
    text = kernel_text(tmp_path, chunked, {"q": q, "k": k, "v": v}, backward=True)
    assert "// 32" in text and "tile_empty" in text and "mask dropped: the tile is kept whole" in text
    report = flashlight.explain(chunked, q, k, v)
    assert "classified by index arithmetic" in str(report), str(report)
    check_grads(chunked, {"q": q, "k": k, "v": v})
    for sparse in (True, False):   # the same values with every tile computed
        torch._dynamo.reset()
        out = flashlight.compile(chunked, inductor=False, block_sparse=sparse)(q, k, v)
        assert rel_err(out, chunked(q.double(), k.double(), v.double())) < TOL


DIVISIONS = {   # a mask or a bias from a division of a difference of positions, which is negative below the diagonal
    "remainder": lambda d: d % 3 == 0,
    "remainder_fn": lambda d: torch.remainder(d, 5) < 2,
    "fmod": lambda d: torch.fmod(d, 4) > -2,
    "floor_divide": lambda d: d // 16 >= -1,
    "trunc": lambda d: torch.div(d, 16, rounding_mode="trunc") == 0,
    "floor_mode": lambda d: torch.div(d, 7, rounding_mode="floor") > -3,
}


@pytest.mark.parametrize("name", list(DIVISIONS))
def test_divisions_of_values_that_may_be_negative_round_as_eager(name):
    """Rounded divisions and remainders of j - i, negative on one side of the diagonal: Triton's `//` and `%`
    round negative values as C does (and its interpreter as Python does), torch's floor_divide and remainder
    as Python does, fmod and trunc as C does. The kernel computes them on |j - i| and puts the sign back, so
    that eager's values come out on a GPU and in the interpreter alike; tiles are classified with the same
    arithmetic."""
    keep_of = DIVISIONS[name]

    def f(q, k, v):
        i, j = torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :]
        return torch.softmax((q @ k.mT / 4).masked_fill(~keep_of(j - i), float("-inf")), -1) @ v

    q, k, v = (torch.randn(1, 2, 100, 16) for _ in range(3))
    out, ref, report = run_fused(f, q, k, v)
    assert "tl.abs(" in report.regions[0].kernel_source
    assert rel_err(out, ref) < TOL


def test_divisions_by_tensors_or_of_floats_stay_outside_the_kernel():
    """A division by a tensor (which may hold 0: eager raises for integers) and a rounded division of floats
    are not computed in the kernel: Inductor computes them, and the kernel reads the result as a tensor (a
    mask of positions and data, fused as before), or the region is left to Inductor where the scores
    themselves are divided (explain says so)."""
    def by_data(q, k, v, w):
        i = torch.arange(q.shape[-2])[:, None]
        return torch.softmax((q @ k.mT).masked_fill(i // w[None, :] > 2, float("-inf")), -1) @ v

    def of_floats(q, k, v):
        s = q @ k.mT
        return torch.softmax(s - s // 2, -1) @ v

    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    out, ref, report = run_fused(by_data, q, k, v, torch.randint(1, 5, (40,)))
    inputs = next(ln for ln in str(report).splitlines() if "inputs:" in ln)
    assert "floor_divide" in inputs, str(report)   # computed outside, read as a tensor
    assert rel_err(out, ref) < TOL
    report = flashlight.explain(of_floats, q, k, v)
    assert not report.fused, str(report)
