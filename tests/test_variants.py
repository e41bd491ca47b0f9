"""Each variant's plain-PyTorch reference against an independent float64 formulation
(dense masks + explicit math / SDPA math), its FlexAttention (eager) and SDPA formulations."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from flashlight.harness import variant_registry as registry
from flashlight.harness.variant_registry import Unsupported

F64 = torch.float64
SMALL = dict(B=2, H=4, Sq=48, Sk=48, D=16)
PARAMS = {"t5_bias": {"buckets": 16, "max_distance": 40}, "sliding_window": {"window": 9}, "prefix_lm": {"prefix": 11}, "document_mask": {"docs": 4, "equal": False},
          "softcap": {"cap": 2.0}, "evoformer": {"N": 3}, "gqa": {"groups": 2}}


def attend(q, k, v, bias=None, keep=None, score_fn=None):
    """Textbook attention with einsum, a dense additive bias and a dense boolean mask."""
    s = torch.einsum("...id,...jd->...ij", q, k) / math.sqrt(q.shape[-1])
    if score_fn is not None:
        s = score_fn(s)
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    return torch.einsum("...ij,...jd->...id", torch.softmax(s, -1), v)


def tril(Sq, Sk, diag=0):
    return torch.ones(Sq, Sk, dtype=torch.bool).tril(diag)


def independent(name, x, shape):
    p = shape.params
    Sq, Sk, H = shape.Sq, shape.Sk, shape.H
    if name == "vanilla":
        return F.scaled_dot_product_attention(x["q"], x["k"], x["v"])
    if name == "causal":
        return attend(x["q"], x["k"], x["v"], keep=tril(Sq, Sk))
    if name == "alibi":
        bias = torch.zeros(H, Sq, Sk, dtype=F64)
        for h in range(H):
            slope = 2.0 ** (-8.0 * (h + 1) / H)
            for i in range(Sq):
                bias[h, i] = torch.tensor([-slope * (i - j) for j in range(Sk)], dtype=F64)
        return attend(x["q"], x["k"], x["v"], bias=bias, keep=tril(Sq, Sk))
    if name == "softcap":
        cap = p["cap"]
        return attend(x["q"], x["k"], x["v"], keep=tril(Sq, Sk), score_fn=lambda s: cap * torch.tanh(s / cap))
    if name == "sliding_window":
        return attend(x["q"], x["k"], x["v"], keep=tril(Sq, Sk) & ~tril(Sq, Sk, -p["window"]))
    if name == "prefix_lm":
        keep = tril(Sq, Sk)
        keep[:, : p["prefix"]] = True
        return attend(x["q"], x["k"], x["v"], keep=keep)
    if name == "document_mask":
        keeps = []
        for row in x["doc_ids"].tolist():
            lengths = [row.count(d) for d in sorted(set(row))]
            keeps.append(torch.block_diag(*[torch.ones(n, n) for n in lengths]).bool())
        return attend(x["q"], x["k"], x["v"], keep=torch.stack(keeps)[:, None])
    if name == "diff_attn":
        a1 = attend(x["q1"], x["k1"], x["v"])
        a2 = attend(x["q2"], x["k2"], x["v"])
        return a1 - x["lam"] * a2
    if name == "evoformer":
        outs = [attend(x["q"][:, n], x["k"][:, n], x["v"][:, n], bias=x["bias"][:, 0]) for n in range(p["N"])]
        return torch.sigmoid(x["gate"]) * torch.stack(outs, 1)
    if name == "gqa":
        g = p["groups"]
        heads = [attend(x["q"][:, h], x["k"][:, h // g], x["v"][:, h // g], keep=tril(Sq, Sk)) for h in range(H)]
        return torch.stack(heads, 1)
    if name == "sinks":  # softmax over the row's scores and one sink logit: p_j = e^s_j / (Σ e^s + e^sink)
        s = torch.einsum("bhid,bhjd->bhij", x["q"], x["k"]) / math.sqrt(x["q"].shape[-1])
        e = torch.exp(s).masked_fill(~tril(Sq, Sk), 0.0)
        den = e.sum(-1, keepdim=True) + torch.exp(x["sink"])[None, :, None, None]
        return torch.einsum("bhij,bhjd->bhid", e / den, x["v"])
    if name == "t5_bias":  # T5's bucket rule written out per distance with Python floats
        half = p["buckets"] // 2
        exact = half // 2

        def bucket(rel):
            n = abs(rel)
            if n < exact:
                b = n
            else:
                b = min(half - 1, exact + int(math.log(n / exact) / math.log(p["max_distance"] / exact) * (half - exact)))
            return b + (half if rel > 0 else 0)

        idx = torch.tensor([[bucket(j - i) for j in range(Sk)] for i in range(Sq)])
        return attend(x["q"], x["k"], x["v"], bias=x["table"][idx].permute(2, 0, 1))
    raise AssertionError(f"no independent formulation for {name}: add one to tests/test_variants.py")


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


VARIANTS = registry.names()


def setup(name, seed=0, **shape_kw):
    v = registry.get(name)
    shape = v.shape(**{**SMALL, **shape_kw}, **PARAMS.get(name, {}))
    return v, shape, v.make_inputs(shape, F64, "cpu", seed=seed)


def test_registry_lists_every_variant():
    assert set(VARIANTS) >= {"vanilla", "causal", "alibi", "softcap", "sliding_window", "prefix_lm",
                             "document_mask", "diff_attn", "evoformer", "gqa"}


def test_unknown_variant_lists_known_names():
    with pytest.raises(registry.UnknownVariant) as e:
        registry.get("nope")
    assert "nope" in str(e.value) and "diff_attn" in str(e.value) and "vanilla" in str(e.value)


@pytest.mark.parametrize("name", VARIANTS)
def test_reference_matches_independent_math(name):
    v, shape, x = setup(name)
    out = v.bind(shape)(**x)
    assert torch.isfinite(out).all()
    assert rel(out, independent(name, x, shape)) < 1e-12


@pytest.mark.parametrize("name", VARIANTS)
def test_flex_formulation(name):
    v, shape, x = setup(name)
    if not v.has_flex:
        pytest.skip("no flex formulation")
    assert rel(v.flex(x, shape), v.bind(shape)(**x)) < 1e-10


@pytest.mark.parametrize("name", VARIANTS)
def test_sdpa_formulation(name):
    v, shape, x = setup(name)
    try:
        out = v.sdpa(x, shape)
    except Unsupported as e:
        assert name in str(e)
        return
    assert rel(out, v.bind(shape)(**x)) < 1e-10


@pytest.mark.parametrize("name", VARIANTS)
def test_make_inputs(name):
    v, shape, x = setup(name)
    assert tuple(x) == v.input_names
    for t in x.values():
        if t.is_floating_point():
            assert t.dtype == F64 and not t.requires_grad
            assert (t != 0).all(), "random normal inputs, never zeros"
    _, _, x2 = setup(name, seed=0)
    _, _, x3 = setup(name, seed=1)
    for n in x:
        assert torch.equal(x[n], x2[n])
    assert any(not torch.equal(x[n], x3[n]) for n in x if x[n].is_floating_point())
    xg = v.make_inputs(shape, torch.float32, "cpu", requires_grad=True)
    assert all(xg[n].requires_grad and xg[n].dtype == torch.float32 for n in v.learnable)


@pytest.mark.parametrize("name", VARIANTS)
def test_backward_runs(name):
    v, shape, _ = setup(name)
    x = v.make_inputs(shape, F64, "cpu", requires_grad=True)
    grads = torch.autograd.grad(v.bind(shape)(**x).sum(), [x[n] for n in v.learnable])
    assert all(torch.isfinite(g).all() for g in grads)


def test_flops():
    B, H, S, D = 2, 4, 64, 16
    dense = 4 * B * H * S * S * D
    assert registry.get("vanilla").flops(registry.get("vanilla").shape(B, H, S, S, D)) == dense
    c = registry.get("causal")
    assert c.flops(c.shape(B, H, S, S, D)) == dense * (S + 1) / (2 * S)
    d = registry.get("diff_attn")
    sh = d.shape(B, H, S, S, D)
    assert sh.dv == 2 * D and d.flops(sh) == 2 * B * H * S * S * (2 * D + 2 * D)
    w = registry.get("sliding_window")
    assert w.flops(w.shape(B, H, S, S, D, window=S)) == c.flops(c.shape(B, H, S, S, D))
    assert w.flops(w.shape(B, H, S, S, D, window=8)) < c.flops(c.shape(B, H, S, S, D))
    m = registry.get("document_mask")
    assert m.flops(m.shape(B, H, S, S, D, docs=4)) == dense / 4


def test_unknown_param_rejected():
    with pytest.raises(ValueError, match="window"):
        registry.get("causal").shape(1, 1, 8, 8, 16, window=3)


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(["causal", "sliding_window", "prefix_lm", "alibi", "gqa", "document_mask"]),
       Sq=st.integers(1, 40), extra=st.integers(0, 24), seed=st.integers(0, 2**16))
def test_masks_property(name, Sq, extra, seed):
    """Random (Sq, Sk) shapes, Sq <= Sk (document_mask: Sq == Sk): reference == independent math."""
    Sk = Sq if name == "document_mask" else Sq + extra
    docs = {"docs": min(3, Sq), "equal": False} if name == "document_mask" else {}
    v = registry.get(name)
    params = {**PARAMS.get(name, {}), **docs}
    if name == "prefix_lm":
        params["prefix"] = min(params["prefix"], Sk)
    shape = v.shape(1, 2, Sq, Sk, 16, **params)
    x = v.make_inputs(shape, F64, "cpu", seed=seed)
    assert rel(v.bind(shape)(**x), independent(name, x, shape)) < 1e-12
