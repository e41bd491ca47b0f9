"""Every generated kernel compiles for a Hopper GPU (sm_90), with the tiles a GPU would launch it with.

The interpreter runs kernels as Python: it accepts code that Triton's compiler rejects (a name assigned
only inside a loop and read after it is fine in Python, an error in Triton). Triton compiles for a GPU
target on a machine without one, down to the cubin, so each kernel a program launches here is also
compiled the way the GPU would: same source, same argument types, the GPU's default tiles, warps and
pipeline stages. Its shared memory must fit an H100 (228 KiB a block), or the launch would first have
to shrink its tiles.
"""
import pytest
import torch

import flashlight
from flashlight.harness import variant_registry as vr
from hopper_compile import H100_SHARED, compile_for_hopper, record_gpu_launches


@pytest.fixture
def gpu_launches(monkeypatch):
    """Launches of the generated kernels, made with the tiles a GPU would use (run by the interpreter)."""
    return record_gpu_launches(monkeypatch.setattr)


def check_compiles(tmp_path, launches):
    """compile_for_hopper, and every kernel's shared memory fits an H100; [[kernel, shared memory bytes]]."""
    compiled = compile_for_hopper(tmp_path, launches)
    for job, (name, used) in compiled:
        assert used <= H100_SHARED, (name, job["constexprs"], job["options"], used)
    return [row for _, row in compiled]


@pytest.mark.parametrize("name", vr.names())
def test_every_variants_kernels_compile_for_hopper(name, gpu_launches, tmp_path):
    """The inference forward, the training forward and both backward kernels (and their classification
    kernels) of every variant, in half precision."""
    v = vr.get(name)
    shape = v.shape(B=1, H=4, Sq=80, Sk=80, D=32, **({"N": 2} if name == "evoformer" else {}))
    # float16 (the interpreter lacks some bfloat16 constants), float32 for alibi: its float32 slopes promote
    # the scores, and CPU matmuls take no mixed dtypes
    dtype = torch.float32 if name == "alibi" else torch.float16
    inputs = v.make_inputs(shape, dtype, "cpu", requires_grad=True, seed=0)
    torch._dynamo.reset()
    fn = flashlight.compile(v.bind(shape), inductor=False)
    with torch.no_grad():
        fn(**inputs)
    out = fn(**inputs)
    out.backward(torch.randn_like(out))
    compiled = check_compiles(tmp_path, gpu_launches)
    kernels = {n for _, n, _, _ in gpu_launches}
    assert any(n.startswith("flashlight_bwd_dkv") for n in kernels) and \
        sum(n.startswith("flashlight_attention") for n in kernels) == 2, kernels
    assert len(compiled) >= 4


def test_the_compile_is_the_gpus_with_pipelined_loads(gpu_launches, tmp_path):
    """Launches are compiled as Triton's JIT specialises them (unit strides constant, aligned pointers and
    strides divisible by 16 marked): the forward's K and V tiles are then loaded ahead, num_stages deep, into
    shared memory, as on the GPU (compiled with every argument unknown they were not: a quarter of it)."""
    def causal(q, k, v):
        s = (q @ k.transpose(-1, -2) * 0.125).masked_fill(torch.ones(256, 256, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1) @ v
    q, k, v = (torch.randn(1, 2, 256, 64, dtype=torch.float16) for _ in range(3))
    torch._dynamo.reset()
    flashlight.compile(causal, inductor=False)(q, k, v)
    [(source, name, args, kwargs)] = [launch for launch in gpu_launches if launch[1].startswith("flashlight_attention")]
    [(_, shared)] = check_compiles(tmp_path, gpu_launches)
    tiles = kwargs["num_stages"] * 2 * kwargs["BLOCK_N"] * 64 * 2   # stages × (K and V) × BLOCK_N × D × 2 bytes
    assert shared >= tiles, (shared, kwargs)


def test_grouped_key_value_kernel_compiles_for_hopper(gpu_launches, tmp_path):
    """GQA's dK/dV kernel loops over the query heads of a group and stores after the loop (a name set
    only in the loop would compile in the interpreter and fail here)."""
    def gqa(q, k, v):
        k, v = k.repeat_interleave(4, dim=1), v.repeat_interleave(4, dim=1)
        s = (q @ k.transpose(-1, -2) * 0.125).masked_fill(torch.ones(80, 80, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1) @ v
    q = torch.randn(1, 8, 80, 64, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(1, 2, 80, 64, dtype=torch.float16, requires_grad=True) for _ in range(2))
    torch._dynamo.reset()
    out = flashlight.compile(gqa, inductor=False)(q, k, v)
    out.backward(torch.randn_like(out))
    assert any("for g in range(0, 4)" in src for src, n, _, _ in gpu_launches if n.startswith("flashlight_bwd_dkv"))
    check_compiles(tmp_path, gpu_launches)


@pytest.mark.parametrize("spelling", ["Mistral's log of a 0/1 mask", "Llama's hstack with the cache's columns"])
def test_reference_causal_mask_kernels_compile_for_hopper(spelling, gpu_launches, tmp_path):
    """The tile classification of the reference implementations' causal masks (the log of the mask's bounds,
    test_backward.test_reference_implementations_causal_masks_skip_tiles) compiles for sm_90."""
    from test_backward import _reference_causal_mask

    def f(q, k, v):
        mask = _reference_causal_mask(spelling, q.shape[-2], 40, q.dtype)
        return torch.softmax(q @ k.transpose(-1, -2) * 0.125 + mask, -1) @ v
    q, k, v = (torch.randn(1, 2, 130, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
    torch._dynamo.reset()
    out = flashlight.compile(f, inductor=False)(q, k, v)
    out.backward(torch.randn_like(out))
    assert all("tile_empty" in src for src, n, _, _ in gpu_launches if n.startswith("flashlight_"))
    check_compiles(tmp_path, gpu_launches)


def _model_files():
    import test_model_files as mf
    return [mf.Bert, mf.GPT2, mf.Bloom, mf.Falcon, mf.Phi, mf.EinsumInPlace, mf.T5, mf.CrossAttention, mf.Gemma2,
            mf.RotaryComplex, mf.Swin]


@pytest.mark.parametrize("cls", _model_files(), ids=lambda c: c.__name__)
def test_model_file_kernels_compile_for_hopper(cls, gpu_launches, tmp_path):
    """The attention modules as model files write them (test_model_files.py), trained one step in half
    precision: every kernel of their forward and backward compiles for sm_90."""
    import test_model_files as mf
    model = cls().half()
    args = tuple(a.half() if a.is_floating_point() else a for a in mf._inputs(cls.__name__))
    torch._dynamo.reset()
    flashlight.compile(model, inductor=False)(*args).float().square().mean().backward()
    assert any(n.startswith("flashlight_bwd_dq") for _, n, _, _ in gpu_launches)
    check_compiles(tmp_path, gpu_launches)


@pytest.mark.parametrize("mask", ["bool", "float", "float32 float", "mha key_padding_mask", "mha float attn_mask"])
def test_masked_sdpa_kernels_compile_for_hopper(mask, gpu_launches, tmp_path):
    """scaled_dot_product_attention with a mask, traced as its math (a boolean mask; a float mask, whose
    rows removed everywhere are a per-row input; nn.MultiheadAttention's merged masks), trained one step in
    half precision: every kernel compiles for sm_90. In float32 a float mask's -inf is clamped to a value
    that absorbs a score, so its tiles are classified by a kernel of its own: that compiles too."""
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    keep = torch.rand(2, 1, 80, 80) > 0.3
    if mask.startswith("mha"):
        mha = nn.MultiheadAttention(64, 4, batch_first=True).half()
        pad = torch.zeros(2, 80, dtype=torch.bool)
        pad[1, -16:] = True
        kw = {"key_padding_mask": pad} if mask == "mha key_padding_mask" else \
            {"attn_mask": nn.Transformer.generate_square_subsequent_mask(80).half()}
        x = torch.randn(2, 80, 64, dtype=torch.float16, requires_grad=True)
        fn, args = (lambda x: mha(x, x, x, need_weights=False, **kw)[0]), (x,)
    else:
        dtype = torch.float32 if mask.startswith("float32") else torch.float16
        m = keep if mask == "bool" else torch.zeros(2, 1, 80, 80, dtype=dtype).masked_fill(~keep, float("-inf"))
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m)  # noqa: E731
        args = tuple(torch.randn(2, 4, 80, 32, dtype=dtype, requires_grad=True) for _ in range(3))
    torch._dynamo.reset()
    out = flashlight.compile(fn, inductor=False, choose_faster=False)(*args)
    out.float().square().mean().backward()
    assert any(n.startswith("flashlight_bwd_dkv") for _, n, _, _ in gpu_launches)
    if mask.startswith("float32"):
        assert any(n.startswith("classify_tiles") for _, n, _, _ in gpu_launches), [n for _, n, _, _ in gpu_launches]
    check_compiles(tmp_path, gpu_launches)


@pytest.mark.parametrize("D", [64, 128])
def test_forward_and_causal_backward_kernels_do_not_spill(D, gpu_launches, tmp_path):
    """At the GPU's default tiles the forward kernels of plain and masked attention, and causal attention's
    backward kernels, fit Hopper's registers: ptxas spills nothing (scripts/register_audit.py,
    results/register_audit.txt). A change to the generated code that raises its register pressure fails here
    before it costs time on a GPU."""
    names = ["vanilla", "causal", "sliding_window", "document_mask", "softcap", "sinks"]
    for name in names:
        v = vr.get(name)
        shape = v.shape(B=1, H=4, Sq=128, Sk=128, D=D)
        inputs = v.make_inputs(shape, torch.float16, "cpu", requires_grad=name == "causal", seed=0)
        torch._dynamo.reset()
        out = flashlight.compile(v.bind(shape), inductor=False)(**inputs)
        if name == "causal":
            out.backward(torch.randn_like(out))
    compiled = compile_for_hopper(tmp_path, gpu_launches, ptxas=True)
    kernels = [job["name"] for job, _ in compiled]
    assert sum(k.startswith("flashlight_attention") for k in kernels) >= len(names)
    assert any(k.startswith("flashlight_bwd_dkv") for k in kernels) and any(k.startswith("flashlight_bwd_dq") for k in kernels)
    spills = [(job["name"], job["constexprs"], job["options"], row[2:]) for job, row in compiled if row[3] or row[4]]
    assert not spills, spills


def test_a_head_dim_of_one_compiles_for_hopper(gpu_launches, tmp_path):
    """A head dim of size 1: Triton multiplies 16 wide at least, so the score matmuls read Q and K
    zero-padded to the block (the 1-wide matmul did not compile for sm_90: on a GPU the region fell back
    to Inductor at its first call), forward and backward."""
    def attn(q, k, v):
        return torch.softmax(q @ k.mT, -1) @ v
    q, k, v = (torch.randn(1, 2, 80, 1, dtype=torch.float16, requires_grad=True) for _ in range(3))
    torch._dynamo.reset()
    out = flashlight.compile(attn, inductor=False)(q, k, v)
    out.backward(torch.randn_like(out))
    assert len(check_compiles(tmp_path, gpu_launches)) == 3   # forward, dQ, dK/dV
