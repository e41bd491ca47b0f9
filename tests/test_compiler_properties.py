"""Property tests: random attention programs from a grammar of score ops, masks, normalisations and
epilogues, on random shapes and layouts. Each must be fused-and-correct or fallen-back-and-correct."""
import os

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import flashlight

from test_compiler import TOL, rel_err

SCORE_OPS = ["scale", "head_bias", "softcap", "alibi", "table", "index_table"]
# a relative-position index buffer, as Swin and BEiT register one: a table read at it is a load at a loaded index
_INDEX = torch.randint(0, 6, (40, 40), generator=torch.Generator().manual_seed(0))
MASKS = ["none", "causal", "window", "padding", "finfo_causal", "ones_tril", "triu_finfo", "int_band",
         "finfo_padding", "triu_inf_added"]
NORMS = ["softmax", "handwritten", "no_max", "sigmoid", "relu_sum", "sinks", "exp2", "pow2", "log_softmax"]
DROPOUTS = ["none", "p0", "module_eval"]
EPILOGUES = ["none", "gate"]
_DROPOUT_EVAL = torch.nn.Dropout(0.2).eval()
# FLASHLIGHT_PROPERTY_SCALE=100 draws 100 times as many programs: a longer search, run by hand (CONTRIBUTING.md)
SCALE = int(os.environ.get("FLASHLIGHT_PROPERTY_SCALE", "1"))


def grouped(x, G, repeat_kv):
    """K or V shared by G query heads each (GQA), as model files spell it: transformers' repeat_kv (expand
    and reshape) or repeat_interleave."""
    if G == 1:
        return x
    if not repeat_kv:
        return x.repeat_interleave(G, 1)
    B, Hk, S, D = x.shape
    return x[:, :, None].expand(B, Hk, G, S, D).reshape(B, Hk * G, S, D)


def build(score_op, mask, norm, epilogue, dropout="none", G=1, repeat_kv=False):
    def attn(q, k, v, hb, keep, gate):
        k, v = grouped(k, G, repeat_kv), grouped(v, G, repeat_kv)
        s = q @ k.transpose(-1, -2)
        i = torch.arange(q.shape[-2])[:, None]
        j = torch.arange(k.shape[-2])[None, :]
        if score_op == "scale":
            s = s * 0.3
        elif score_op == "head_bias":
            s = s + hb[:, None, None]
        elif score_op == "softcap":
            s = torch.tanh(s / 5.0) * 5.0
        elif score_op == "table":   # a per-head bias table gathered by clamped relative distance
            s = s + torch.outer(torch.arange(9.0) - 4, hb)[(j - i).clamp(-4, 4) + 4].permute(2, 0, 1)
        elif score_op == "index_table":   # a learned table (here hb) read at an index tensor
            s = s + hb[_INDEX[:s.shape[-2], :s.shape[-1]] % hb.shape[0]]
        else:
            s = s - hb[:, None, None].abs() * (i - j).abs()
        if mask == "causal":
            s = s.masked_fill(j > i, float("-inf"))
        elif mask == "window":
            s = torch.where((j <= i) & (i - j < 7), s, float("-inf"))
        elif mask == "padding":
            s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
        elif mask == "finfo_causal":
            s = s.masked_fill(j > i, torch.finfo(s.dtype).min)
        elif mask == "ones_tril":   # a boolean constant mask
            s = s.masked_fill(~torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool).tril(), float("-inf"))
        elif mask == "triu_finfo":
            above = torch.triu(torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool), 1)
            s = s.masked_fill(above, torch.finfo(s.dtype).min)
        elif mask == "int_band":    # an integer constant, compared
            band = torch.full((s.shape[-2], s.shape[-1]), 2, dtype=torch.int64).tril(-3)
            s = torch.where(band == 2, torch.finfo(s.dtype).max * -1, s)
        elif mask == "triu_inf_added":   # nn.Transformer.generate_square_subsequent_mask, added
            s = s + torch.full((s.shape[-2], s.shape[-1]), float("-inf")).triu(1)
        elif mask == "finfo_padding":   # rows of a batch may be fully masked: uniform weights, as eager
            s = s.masked_fill(~keep[:, None, None, :], torch.finfo(s.dtype).min)
        if norm == "softmax":
            p = s.softmax(-1)
        elif norm == "handwritten":
            e = (s - s.amax(-1, keepdim=True)).exp()
            p = e / e.sum(-1, keepdim=True)
        elif norm == "no_max":
            e = s.clamp_max(30.0).exp()
            p = e / e.sum(-1, keepdim=True)
        elif norm == "sigmoid":
            p = torch.sigmoid(s)
        elif norm == "exp2":
            e = torch.exp2(s - s.amax(-1, keepdim=True))
            p = e / e.sum(-1, keepdim=True)
        elif norm == "pow2":
            e = 2 ** (s - s.max(-1, keepdim=True).values)
            p = e / e.sum(-1, keepdim=True)
        elif norm == "log_softmax":
            p = torch.log_softmax(s, -1).exp()
        elif norm == "sinks":       # one extra logit per head, softmaxed with the row, sliced off
            B, H, M, _ = s.shape
            p = torch.cat([s, hb.view(1, H, 1, 1).expand(B, H, M, 1)], -1).softmax(-1)[..., :-1]
        else:
            r = torch.relu(s)
            p = r / (r.sum(-1, keepdim=True) + 1.0)
        if dropout == "p0":
            p = torch.nn.functional.dropout(p, p=0.0)
        elif dropout == "module_eval":
            p = _DROPOUT_EVAL(p)
        o = p @ v
        return o * torch.sigmoid(gate) if epilogue == "gate" else o
    return attn


@settings(max_examples=20 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(score_op=st.sampled_from(SCORE_OPS), mask=st.sampled_from(MASKS), norm=st.sampled_from(NORMS),
       epilogue=st.sampled_from(EPILOGUES), dropout=st.sampled_from(DROPOUTS), B=st.integers(1, 2), H=st.integers(1, 3),
       Sq=st.integers(1, 40), Sk=st.integers(1, 40), D=st.sampled_from([8, 12, 16, 20]),
       Dv=st.sampled_from([8, 12, 16]), transposed=st.booleans(), seed=st.integers(0, 2**16),
       G=st.sampled_from([1, 2]), repeat_kv=st.booleans())
def test_random_programs_fuse_or_fall_back_correctly(score_op, mask, norm, epilogue, dropout, B, H, Sq, Sk, D, Dv,
                                                     transposed, seed, G, repeat_kv):
    q, k, v, hb, keep, gate = _inputs(seed, B, H, G, Sq, Sk, D, Dv, transposed)
    fn = build(score_op, mask, norm, epilogue, dropout, G, repeat_kv)
    args = (q, k, v, hb, keep, gate)
    report = flashlight.explain(fn, *args)
    assert report.regions, "every program here has one attention region"
    assert report.fused or report.regions[0].reason
    torch._dynamo.reset()
    before = flashlight.counters["fused_launches"]
    out = flashlight.compile(fn, inductor=False)(*args)
    assert (flashlight.counters["fused_launches"] > before) == report.fused
    ref = fn(*(a.double() if a.is_floating_point() else a for a in args))
    assert rel_err(out, ref) < TOL, str(report)


def _inputs(seed, B, H, G, Sq, Sk, D, Dv, transposed):
    """q (H·G heads), k and v (H heads), a per-head parameter, a padding mask and a gate, from `seed`."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if transposed:  # views as they come out of a projection: [B, S, H, D] -> [B, H, S, D]
        q, k, v = rn(B, Sq, H * G, D).transpose(1, 2), rn(B, Sk, H, D).transpose(1, 2), rn(B, Sk, H, Dv).transpose(1, 2)
    else:
        q, k, v = rn(B, H * G, Sq, D), rn(B, H, Sk, D), rn(B, H, Sk, Dv)
    return q, k, v, rn(H * G), torch.rand(B, Sk, generator=g) > 0.3, rn(B, H * G, Sq, Dv)


def rel_err_where_finite(out, ref):
    """Relative error over the entries where the float64 reference is a number (a fully masked row
    makes eager's gradient NaN; the fused kernels skip such tiles, so NaN need not spread the same way)."""
    ok = torch.isfinite(ref)
    out, ref = out.double()[ok], ref.double()[ok]
    assert torch.isfinite(out).all(), "a non-finite gradient where eager's is finite"
    # a gradient that is exactly zero in exact arithmetic (a per-row bias under softmax) is float noise
    # in both, and one summed from hundreds of O(1) terms that nearly cancel (a per-head bias's: 0.04 from
    # terms of 0.1 to 1) is off by a few 1e-6 in float32 whoever sums it: measured against a floor of 1
    # (these gradients are O(1) to O(10) when their terms do not cancel), not against their tiny norm
    return ((out - ref).norm() / ref.norm().clamp_min(1.0)).item()


@settings(max_examples=12 * SCALE, deadline=None, suppress_health_check=list(HealthCheck))
@given(score_op=st.sampled_from(SCORE_OPS), mask=st.sampled_from(MASKS), norm=st.sampled_from(NORMS),
       epilogue=st.sampled_from(EPILOGUES), B=st.integers(1, 2), H=st.integers(1, 3),
       Sq=st.integers(1, 40), Sk=st.integers(1, 40), D=st.sampled_from([8, 12, 16, 20]),
       Dv=st.sampled_from([8, 12, 16]), transposed=st.booleans(), seed=st.integers(0, 2**16),
       frozen=st.sets(st.sampled_from(["q", "k", "v", "hb", "gate"]), max_size=4), G=st.sampled_from([1, 2]),
       repeat_kv=st.booleans())
def test_random_programs_train_correctly(score_op, mask, norm, epilogue, B, H, Sq, Sk, D, Dv, transposed, seed,
                                         frozen, G, repeat_kv):
    """The same grammar with the floating inputs requiring grad, but for a `frozen` few (a frozen projection,
    a fixed bias): fused forward and generated backward, or a fallback, and the gradients of q, k, v, the
    per-head parameter and the gate that are asked for equal to float64 autograd's."""
    q, k, v, hb, keep, gate = _inputs(seed, B, H, G, Sq, Sk, D, Dv, transposed)
    leaves = [t.detach().requires_grad_(name not in frozen) for name, t in zip(("q", "k", "v", "hb"), (q, k, v, hb))] + \
        [keep, gate.requires_grad_("gate" not in frozen)]
    fn = build(score_op, mask, norm, epilogue, G=G, repeat_kv=repeat_kv)
    report = flashlight.explain(fn, *leaves)
    torch._dynamo.reset()
    before = flashlight.counters["fused_backward_launches"]
    out = flashlight.compile(fn, inductor=False)(*leaves)
    assume(out.requires_grad)   # what trains is read (hb is not, by every program)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    out.backward(grad_out)
    fused_bwd = report.fused and report.regions[0].backward_fused
    assert (flashlight.counters["fused_backward_launches"] > before) == bool(fused_bwd), str(report)
    ref_leaves = [t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t for t in leaves]
    ref = fn(*ref_leaves)
    ref.backward(grad_out.double())
    eager_leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t.is_floating_point() else t
                    for t in leaves]
    fn(*eager_leaves).backward(grad_out)   # eager float32: how far float32 itself lands from float64
    assert rel_err_where_finite(out.detach(), ref.detach()) < TOL, str(report)
    for name, x, r, e in zip(("q", "k", "v", "hb", "keep", "gate"), leaves, ref_leaves, eager_leaves):
        if r.is_floating_point() and r.grad is not None:
            err, eager_err = rel_err_where_finite(x.grad, r.grad), rel_err_where_finite(e.grad, r.grad)
            assert err < TOL or err < 10 * eager_err, f"d{name}: {err:.3g} (eager float32: {eager_err:.3g})\n{report}"
