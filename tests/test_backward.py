"""The generated backward, on CPU through the Triton interpreter, against float64 eager autograd.

Every input that requires grad (q, k, v and the score-side tensors: slopes, λ, sinks, gates, tables)
gets its gradient from the fused backward and is compared with autograd through the float64 program.
"""
import copy
import math
import re

import pytest
import torch

import flashlight
from flashlight.harness import variant_registry as vr

from test_compiler import TOL, rel_err   # conftest sets TRITON_INTERPRET=1 before imports

torch._dynamo.config.cache_size_limit = 256


def check_grads(fn, inputs: dict, inductor=False, tol=TOL):
    """Fused forward and backward vs float64 autograd; returns {name: relative error}."""
    report = flashlight.explain(fn, **inputs)
    assert report.fused and all(r.backward_fused for r in report.regions if r.fused), str(report)
    torch._dynamo.reset()
    before = dict(flashlight.counters)
    out = flashlight.compile(fn, inductor=inductor)(**inputs)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    assert flashlight.counters["fused_launches"] > before.get("fused_launches", 0)
    assert flashlight.counters["fused_backward_launches"] > before.get("fused_backward_launches", 0)
    ref_inputs = {k: v.detach().double().requires_grad_(v.requires_grad) if v.is_floating_point() else v
                  for k, v in inputs.items()}
    ref = fn(**ref_inputs)
    ref.backward(grad_out.double())
    # Eager float32 autograd on the same inputs: a gradient that is a sum with heavy cancellation (a
    # scalar like diff_attn's λ whose true value happens to be near 0) is off by more than `tol` in
    # float32 whoever computes it, so such a gradient may be off by a few times what eager float32 is.
    eager_inputs = {k: v.detach().clone().requires_grad_(v.requires_grad) if v.is_floating_point() else v
                    for k, v in inputs.items()}
    fn(**eager_inputs).backward(grad_out)
    errors, allowed = {"out": rel_err(out, ref)}, {"out": tol}
    for name, x in inputs.items():
        if x.requires_grad:
            assert x.grad is not None, f"no gradient for {name}"
            errors[name] = rel_err(x.grad, ref_inputs[name].grad)
            allowed[name] = max(tol, 50 * rel_err(eager_inputs[name].grad, ref_inputs[name].grad))
    bad = {k: e for k, e in errors.items() if not e < allowed[k]}
    assert not bad, f"errors above {allowed}: {bad} (all: {errors})"
    return errors


VARIANT_SHAPES = {"sliding_window": dict(window=20), "evoformer": dict(N=2), "prefix_lm": dict(prefix=17)}


@pytest.mark.parametrize("name", vr.names())
def test_every_variant_gradients(name):
    v = vr.get(name)
    extra = {k: val for k, val in VARIANT_SHAPES.get(name, {}).items() if k in v.defaults}
    causal_like = name not in ("vanilla", "evoformer", "diff_attn")
    sq, sk = (72, 72) if causal_like else (40, 72)
    shape = v.shape(B=2, H=4, Sq=sq, Sk=sk, D=24, **extra)
    inputs = v.make_inputs(shape, torch.float32, "cpu", requires_grad=True,
                           seed=torch.randint(0, 10**6, ()).item())
    for k in v.module.LEARNABLE if hasattr(v.module, "LEARNABLE") else ():
        assert inputs[k].requires_grad
    check_grads(v.bind(shape), inputs)



@pytest.mark.parametrize("index", ["relative_positions", "tokens", "one_entry", "many_entries"])
def test_a_table_gathered_by_an_index_tensor(index):
    """A learned bias table read at an index tensor (Swin's and BEiT's relative position index, a
    registered buffer; a per-token bias table; a table of one entry): the dK/dV kernel, whose tiles are
    [keys, queries], reads the index in that orientation too (it read it as [queries, keys]: dK and dV
    were wrong), and a one-entry table is read and summed into at one address. The one entry scales the
    key position (a learned slope): added alone it would shift every row's scores equally, which the
    softmax cancels, and a gradient that is 0 exactly has no relative error to compare. Random indices
    spread every row over many entries (many passes of the per-entry sum); a table of 200 entries takes
    the looped passes instead of the unrolled ones."""
    B, H, M, N, D = 2, 3, 24, 40, 16
    ix = {"relative_positions": torch.randint(0, 49, (M, N)), "tokens": torch.randint(0, 49, (B, 1, 1, N)),
          "one_entry": torch.zeros(M, N, dtype=torch.long),
          "many_entries": torch.randint(0, 200, (M, N))}[index]
    if index == "many_entries":
        index = "relative_positions"

    def f(q, k, v, table):
        bias = table[ix.view(-1)].view(M, N, H).permute(2, 0, 1)[None] if index == "relative_positions" else \
            table[ix] * torch.arange(N) / N if index == "one_entry" else table[ix][..., 0]
        return torch.softmax(q @ k.mT * D ** -0.5 + bias, -1) @ v
    inputs = {"q": torch.randn(B, H, M, D, requires_grad=True), "k": torch.randn(B, H, N, D, requires_grad=True),
              "v": torch.randn(B, H, N, D, requires_grad=True),
              "table": torch.randn({"relative_positions": int(ix.max()) + 1, "tokens": 49, "one_entry": 1}[index],
                                   *{"relative_positions": (H,), "tokens": (1,), "one_entry": ()}[index],
                                   requires_grad=True)}
    check_grads(f, inputs)


def test_a_softmax_without_max_subtraction_keeps_finite_gradients_on_rows_far_below_zero():
    """`e = s.exp(); e / e.sum(-1)` on rows whose scores all lie near -60: their sums are about 1e-26, and the
    row step's derivative of 1 / sum overflowed float32 (inf, then NaN in dQ and dK) where eager's, of
    e / sum, does not."""
    def no_max(q, k, v, shift):
        e = (q @ k.mT - shift[:, None]).clamp_max(30.0).exp()
        return (e / e.sum(-1, keepdim=True)) @ v
    shift = torch.zeros(40)
    shift[[3, 17]] = 60.0
    check_grads(no_max, {**{n: (torch.randn(2, 2, 40, 16) * 0.3).requires_grad_() for n in "qkv"}, "shift": shift})


def gated_causal(q, k, v, gate):
    return sm_causal(q, k, v) * torch.sigmoid(gate)


@pytest.mark.parametrize("trained", ["v", "q", "k", "gate"])
def test_a_gradient_asked_of_one_input_only(trained):
    """Only V trained (a frozen Q and K, as a LoRA on the value projection alone trains): no kernel per
    query tile is generated (its loop had an empty body, and the generated backward fell back); only Q or
    only K: one kernel each; only an output gate: none, the row step gives its gradient."""
    inputs = {n: torch.randn(2, 2, 40, 16, requires_grad=n == trained) for n in ("q", "k", "v", "gate")}
    report = flashlight.explain(gated_causal, **inputs)
    kernels = re.findall(r"def (flashlight_bwd_\w+?)_", report.regions[0].backward_source)
    assert kernels == {"v": ["flashlight_bwd_dkv"], "q": ["flashlight_bwd_dq"], "k": ["flashlight_bwd_dkv"],
                       "gate": []}[trained]
    check_grads(gated_causal, inputs)


def _scaled_by(spelling):
    def attn(q, k, v, bias=None):
        s = q @ k.transpose(-2, -1)
        i = torch.arange(s.shape[-2])[:, None]
        j = torch.arange(s.shape[-1])[None, :]
        s = {"times": lambda: s * 0.3, "divided": lambda: s / 3.0, "negated": lambda: -s * 0.25,
             "twice": lambda: (s * 2.0) * 0.125, "bias after": lambda: s * 0.3 + bias,
             "bias before": lambda: (s + bias) * 0.3,
             "causal": lambda: (s * 0.3).masked_fill(j > i, float("-inf")),
             "where kept": lambda: torch.where(j <= i, s / 3.0, float("-inf")),
             "causal negated": lambda: (-s * 0.25).masked_fill(j > i, float("-inf")),
             "finfo.min fill": lambda: (s * 0.3).masked_fill(j > i, torch.finfo(s.dtype).min)}[spelling]()
        return torch.softmax(s, -1) @ v
    return attn


@pytest.mark.parametrize("spelling", ["times", "divided", "negated", "twice", "bias after", "bias before", "causal",
                                      "where kept", "causal negated", "finfo.min fill"])
def test_a_constant_scale_is_applied_to_dq_and_dk_once(spelling):
    """The softmax scale (x·c, x/c, -x, one constant after another) is not multiplied into every score of
    the backward: the exp's multiply-add takes it where the recomputed tile is read by nothing else (past a
    mask filling -inf too, if c > 0: the mask is then applied to the unscaled scores), and dQ and dK are
    multiplied by it once, after their sums. A bias added after the scale gets the unscaled adjoint; one
    added before it meets the factor first, which is then applied there, per score. A finite fill (or a
    negative scale behind a mask) keeps the multiply: the fill would be scaled too."""
    inputs = {n: torch.randn(2, 2, 40, 16, requires_grad=True) for n in ("q", "k", "v")}
    if spelling.startswith("bias"):
        inputs["bias"] = torch.randn(40, 40, requires_grad=True)
    attn = _scaled_by(spelling)
    source = flashlight.explain(attn, **inputs).regions[0].backward_source
    c = {"times": "0.3", "divided": "0.3333333333333333", "negated": "-0.25", "twice": "0.25",
         "bias after": "0.3", "bias before": "0.3", "causal": "0.3", "where kept": "0.3333333333333333",
         "causal negated": "-0.25", "finfo.min fill": "0.3"}[spelling]
    if spelling != "bias before":
        assert f"(dq_bmm * {c}).to(" in source and f"(dk_bmm * {c}).to(" in source, source
    else:
        assert "(dq_bmm * " not in source and f"* {c}" in source, source
    # the scale joins the exp's multiply-add: with log2(e) as one constant where the tiles compute the
    # probabilities from the row's log-sum-exp, or beside the row's own s2 where they keep exp(x - max)
    both = rf"{re.escape(repr(float(c) * math.log2(math.e)))} - lse2_|\({re.escape(c)} \* s2_\w+\)"
    folded = re.findall(rf"tl\.exp2\((\w+) \* (?:{both})", source)
    if spelling in ("times", "divided"):
        assert set(folded) == {"t_bmm"}, source
    elif spelling in ("causal", "where kept"):   # the mask applied to the unscaled scores, in both kernels
        assert set(folded) == {"t_where"} and re.search(r"t_where = tl\.where\(\w+, (t_bmm|float\(\"-inf\"\))",
                                                        source), source
        assert "t_where = t_bmm  # mask dropped" in source, source
    elif spelling in ("causal negated", "finfo.min fill"):
        assert not folded, source
    check_grads(attn, inputs)


def _lse_case(case):
    def attn(q, k, v, extra=None):
        s = q @ k.mT * 0.25
        i, j = torch.arange(s.shape[-2])[:, None], torch.arange(s.shape[-1])[None, :]
        if case == "softmax":
            return torch.softmax(s, -1) @ v
        if case == "causal":
            return torch.softmax(s.masked_fill(j > i, float("-inf")), -1) @ v
        if case == "sink":   # the row's divisor is its sum plus the sink's exp
            logits = torch.cat([s.masked_fill(j > i, float("-inf")), extra.view(1, -1, 1, 1).expand(
                *s.shape[:-1], 1)], -1)
            return torch.softmax(logits, -1)[..., :s.shape[-1]] @ v
        if case == "two softmaxes":
            return (torch.softmax(s, -1) - extra * torch.softmax(s * 0.5, -1)) @ v
        if case == "finfo.min fill":   # rows 0..2 see no key: eager averages them over every key
            return torch.softmax(s.masked_fill((j > i) | (i < 3), torch.finfo(s.dtype).min), -1) @ v
        if case == "-1e4 fill":
            return torch.softmax(s.masked_fill((j > i) | (i < 3), -1e4), -1) @ v
        if case in ("added mask", "learned bias"):
            return torch.softmax(s + extra, -1) @ v
        raise KeyError(case)
    return attn


@pytest.mark.parametrize("case, lse", [("softmax", True), ("causal", True), ("sink", True), ("two softmaxes", True),
                                       ("finfo.min fill", False), ("-1e4 fill", False), ("added mask", False),
                                       ("learned bias", False)])
def test_probabilities_come_from_the_row_log_sum_exp_where_no_row_max_can_be_large(case, lse):
    """The tiles compute p = exp2(x·c·log2(e) - lse2) from one value per row, lse2 = max·log2(e) + log2(sum)
    (the sum may include a sink's exp), and the exp's adjoint comes out times the row's sum, (dP + g·sum)·p,
    as FlashAttention computes it. Where a row's max may be large (a finite fill such as finfo.min, which
    leaves rows masked everywhere averaged over every key; any tensor added to the scores, which may hold
    one), lse2 would round the sum away, and the tiles keep exp(x - max) / sum. Gradients against float64
    either way."""
    B, H, S, D = 2, 2, 40, 16
    inputs = {n: torch.randn(B, H, S, D, requires_grad=True) for n in "qkv"}
    if case in ("sink", "two softmaxes"):
        inputs["extra"] = (torch.rand(H) if case == "sink" else torch.rand(())).requires_grad_()
    if case == "added mask":
        keep = torch.rand(B, 1, S, S) < 0.7
        keep[:, :, 5] = False
        inputs["extra"] = torch.zeros(B, 1, S, S).masked_fill(~keep, torch.finfo(torch.float32).min)
    if case == "learned bias":
        inputs["extra"] = torch.randn(H, S, S, requires_grad=True)
    attn = _lse_case(case)
    source = flashlight.explain(attn, **inputs).regions[0].backward_source
    assert ("lse2_" in source) == lse and ("exp2(" in source), source
    if lse:   # one row value per softmax besides the row gradient, and no exp(x - max) or division per score
        assert "* (1.0 / r_" not in source and "mu2_" not in source, source
        assert all(n.startswith(("gr_", "lse2_")) for n in re.findall(r"(\w+) = tl\.load\(row\d+_ptr", source))
    # every row value passed is read (one that is not would only keep its tensor alive through the kernels)
    assert set(re.findall(r"\brow\d+_ptr\b", source)) == set(re.findall(r"tl\.load\((row\d+_ptr)", source)), source
    check_grads(attn, inputs)


@pytest.mark.parametrize("param", ["scalar", "per head", "per query", "per key"])
def test_a_parameter_the_keys_do_not_index_is_summed_per_query_and_added_once(param):
    """A score-side input that is the same on every key (differential attention's λ, a per-head temperature,
    a per-query offset) gets its gradient summed over each key tile per query, in registers, and added to its
    buffer once after the key loop; one that the keys index (a per-key bias) is added per key tile. The
    gradients against float64 either way, with sizes that leave partial tiles."""
    B, H, M, N, D = 2, 3, 40, 56, 16
    shape = {"scalar": (), "per head": (H, 1, 1), "per query": (M, 1), "per key": (N,)}[param]

    def f(q, k, v, w):
        s = q @ k.mT * D ** -0.5
        i, j = torch.arange(M)[:, None], torch.arange(N)[None, :]
        s = s.masked_fill(j > i + 20, float("-inf"))
        return (torch.softmax(s, -1) - w * torch.softmax(s * 0.5, -1)) @ v \
            if param == "scalar" else torch.softmax(s * w if param == "per head" else s + w, -1) @ v
    inputs = {"q": torch.randn(B, H, M, D, requires_grad=True), "k": torch.randn(B, H, N, D, requires_grad=True),
              "v": torch.randn(B, H, N, D, requires_grad=True), "w": (torch.rand(shape) + 0.5).requires_grad_()}
    source = flashlight.explain(f, **inputs).regions[0].backward_source
    dq = source[source.index("def flashlight_bwd_dq"):source.index("def flashlight_bwd_dkv")]
    in_loop = [ln for ln in dq.splitlines() if "atomic_add" in ln and ln.startswith(" " * 8)]   # in a key loop
    after = [ln for ln in dq.splitlines() if "atomic_add" in ln and not ln.startswith(" " * 5)]
    assert (bool(in_loop), len(after)) == ((True, 0) if param == "per key" else (False, 1)), dq
    check_grads(f, inputs)


@pytest.mark.parametrize("D", [16, 128])
@pytest.mark.parametrize("spelling", ["times", "causal", "causal negated"])
def test_the_forward_takes_the_scale_out_of_its_running_max_at_small_head_dims(spelling, D):
    """Head dims up to 64: the forward's running max is c·max of the unscaled scores and the exp takes c in
    its multiply-add, the mask (-inf, c > 0) applied to the unscaled scores; at 128 it was measured slower
    and the forward keeps the multiply. Exact either way."""
    inputs = {n: torch.randn(1, 2, 40, D) for n in ("q", "k", "v")}
    attn = _scaled_by(spelling)
    source = flashlight.explain(attn, **inputs).regions[0].kernel_source
    c = "-0.25" if spelling == "causal negated" else "0.3"
    folded = D <= 64 and spelling != "causal negated"
    assert (f", 1, keep_dims=True) * {c})" in source) == folded, source
    assert bool(re.search(rf"tl\.exp2\(t_\w+ \* \({re.escape(c)} \* s2_", source)) == folded, source
    out = flashlight.compile(attn)(**inputs)
    ref = attn(**{k: v.double() for k, v in inputs.items()})
    assert rel_err(out, ref) < TOL


def test_a_softmax_stabilised_by_hand_fuses_and_trains():
    """`sim - sim.amax(-1, keepdim=True).detach()` before the softmax, with a -finfo.max mask and einsum, as
    research repositories write attention: the shift is read as none (the softmax subtracts its own max)."""
    def stabilised(q, k, v, keep):
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * 0.25
        sim = sim.masked_fill(~keep, -torch.finfo(sim.dtype).max)
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        return torch.einsum("b h i j, b h j d -> b h i d", sim.softmax(dim=-1), v)
    keep = torch.rand(2, 1, 1, 40) > 0.3
    keep[..., 0] = True
    check_grads(stabilised, {**{n: torch.randn(2, 3, 40, 16, requires_grad=True) for n in "qkv"}, "keep": keep})

def sm_causal(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    i = torch.arange(q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    return torch.softmax(s.masked_fill(j > i, float("-inf")), -1) @ v


def test_a_failing_generated_backward_falls_back_to_the_regions_own_ops(monkeypatch):
    from flashlight.compiler import runtime

    def broken(*args, **kwargs):
        raise RuntimeError("injected: the backward kernels did not compile")
    monkeypatch.setattr(runtime, "row_backward", broken)   # the first step of the generated backward
    q, k, v = (torch.randn(2, 2, 40, 16, requires_grad=True) for _ in range(3))
    torch._dynamo.reset()
    out = flashlight.compile(sm_causal, inductor=False)(q, k, v)
    with pytest.warns(UserWarning, match="generated backward failed"):
        out.backward(torch.ones_like(out))
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    sm_causal(*ref).backward(torch.ones_like(out).double())
    for x, r in zip((q, k, v), ref):
        assert rel_err(x.grad, r.grad) < TOL


def test_double_backward_is_a_clear_error():
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    torch._dynamo.reset()
    out = flashlight.compile(sm_causal, inductor=False)(q, k, v)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


class HFStyleAttention(torch.nn.Module):
    """Attention as model files write it: Linear projections, rotary embeddings, GQA by expand + reshape,
    an additive mask of 0 / finfo.min given as a [B, 1, S, S] tensor, an output projection."""

    def __init__(self, d=32, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, d // heads
        self.q = torch.nn.Linear(d, d)
        self.k = torch.nn.Linear(d, kv_heads * self.hd)
        self.v = torch.nn.Linear(d, kv_heads * self.hd)
        self.o = torch.nn.Linear(d, d)

    def rope(self, x):
        S, hd = x.shape[-2], x.shape[-1]
        freq = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = torch.arange(S, dtype=torch.float32)[:, None] * freq[None, :]
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def forward(self, x, mask):
        B, S, _ = x.shape
        q = self.rope(self.q(x).view(B, S, self.h, self.hd).transpose(1, 2))
        k = self.rope(self.k(x).view(B, S, self.kv, self.hd).transpose(1, 2))
        v = self.v(x).view(B, S, self.kv, self.hd).transpose(1, 2)
        g = self.h // self.kv
        k = k[:, :, None].expand(B, self.kv, g, S, self.hd).reshape(B, self.h, S, self.hd)
        v = v[:, :, None].expand(B, self.kv, g, S, self.hd).reshape(B, self.h, S, self.hd)
        s = q @ k.transpose(2, 3) / self.hd ** 0.5 + mask
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o((p @ v).transpose(1, 2).reshape(B, S, -1))


@pytest.mark.parametrize("inductor", [False, True])
def test_module_trains_like_eager(inductor):
    """A module with parameters, compiled and trained for a few steps, follows eager step for step."""
    torch.manual_seed(int(torch.randint(0, 10**6, ())))
    B, S = 2, 24
    fused, eager = HFStyleAttention(), HFStyleAttention()
    eager.load_state_dict(fused.state_dict())
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    mask = torch.zeros(B, 1, S, S).masked_fill(~causal, torch.finfo(torch.float32).min)
    mask[1, :, :, :5] = torch.finfo(torch.float32).min            # padding at the start of one sequence
    opt_f = torch.optim.SGD(fused.parameters(), lr=0.1)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    torch._dynamo.reset()
    compiled = flashlight.compile(fused, inductor=inductor)
    before = flashlight.counters["fused_backward_launches"]
    for _ in range(3):
        x = torch.randn(B, S, 32)
        for model, opt in ((compiled, opt_f), (eager, opt_e)):
            opt.zero_grad()
            model(x, mask).square().mean().backward()
            opt.step()
    assert flashlight.counters["fused_backward_launches"] >= before + 3
    for (name, a), b in zip(fused.named_parameters(), eager.parameters()):
        assert rel_err(a.detach(), b.detach()) < 1e-5, name


def _grouped(spelling, x, G):
    """x [B, Hkv, S, D] repeated for G query heads per K/V head, as model code spells it."""
    B, Hkv, S, D = x.shape
    if spelling == "repeat_interleave":
        return x.repeat_interleave(G, dim=1)
    if spelling == "repeat_kv":        # HF transformers: head h reads K/V head h // G
        return x[:, :, None].expand(B, Hkv, G, S, D).reshape(B, Hkv * G, S, D)
    if spelling == "group_outer":      # head h reads K/V head h % Hkv
        return x[:, None].expand(B, G, Hkv, S, D).reshape(B, G * Hkv, S, D)
    assert spelling == "mqa" and Hkv == 1
    return x.expand(B, G, S, D)


@pytest.mark.parametrize("spelling,mask", [("repeat_interleave", None), ("repeat_kv", "doc"),
                                           ("group_outer", "finfo"), ("mqa", "causal")])
def test_gqa_sums_key_and_value_gradients_over_the_group_in_the_kernel(spelling, mask):
    """GQA/MQA: one dK/dV program per K/V head loops over the query heads sharing it, so K's and V's
    gradients are stored whole in their dtype (no float32 sum buffer, no atomics), under every kind of
    mask the kernel's tile ranges come from (index arithmetic, a classified document table, the batch
    flags of a finite fill)."""
    from flashlight.compiler import runtime
    H, Hkv, S = 4, 1 if spelling == "mqa" else 2, 45
    G = H // Hkv

    def gqa(q, k, v, ids):
        s = q @ _grouped(spelling, k, G).transpose(-1, -2) * 0.25
        if mask == "doc":
            s = s.masked_fill(ids[:, None, :, None] != ids[:, None, None, :], float("-inf"))
        i, j = torch.arange(q.shape[-2])[:, None], torch.arange(S)[None, :]
        if mask == "causal":
            s = s.masked_fill(j > i, float("-inf"))
        if mask == "finfo":   # a window: rows before it are masked everywhere (eager's uniform average)
            s = torch.where((j <= i + 12) & (j > i - 8), s, torch.finfo(s.dtype).min)
        return torch.softmax(s, -1) @ _grouped(spelling, v, G)
    ids = torch.sort(torch.randint(0, 4, (2, S)), dim=1).values
    inputs = {"q": torch.randn(2, H, 33 if mask != "doc" else S, 16, requires_grad=True),
              "k": torch.randn(2, Hkv, S, 16, requires_grad=True),
              "v": torch.randn(2, Hkv, S, 8, requires_grad=True), "ids": ids}
    check_grads(gqa, inputs)
    bs = list(runtime._REGISTRY.values())[-1].backward_source
    assert bs.dkv_group == G and set(bs.stored) >= {1, 2} and "for g in range(0, " in bs.source
    assert "tl.atomic_add(grad" not in bs.source   # (the classifier's table is built with atomics)


def test_grouped_keys_with_per_head_values_keep_float32_sums():
    """K shared by a group, V per query head: the dK/dV kernel cannot own both, so it keeps one program per
    query head and sums dK into a float32 buffer (exact either way)."""
    from flashlight.compiler import runtime

    def gqa(q, k, v):
        s = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.25
        return torch.softmax(s, -1) @ v
    inputs = {"q": torch.randn(2, 4, 33, 16, requires_grad=True), "k": torch.randn(2, 2, 45, 16, requires_grad=True),
              "v": torch.randn(2, 4, 45, 8, requires_grad=True)}
    check_grads(gqa, inputs)
    bs = list(runtime._REGISTRY.values())[-1].backward_source
    assert bs.dkv_group == 1 and 1 not in bs.stored and "tl.atomic_add(grad1_ptr" in bs.source


def doc_attention(q, k, v, doc_ids):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    same = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    return torch.softmax(s.masked_fill(~same, float("-inf")), -1) @ v


def test_document_mask_backward_classifies_tiles_once_and_skips_them():
    """Documents of random lengths, so that query/key tiles are empty, kept whole or cut by a document
    boundary, in both backward kernels (per query tile and per key tile). Each kernel classifies its tiles
    with a kernel of its own; a second step with the same ids reuses the tables, ids changed in place are
    classified again, and every step's gradients are exact."""
    from flashlight.compiler import runtime
    from variants.document_mask import document_ids

    torch._dynamo.reset()
    fn = flashlight.compile(doc_attention, inductor=False)
    S = 200
    ids = document_ids(2, S, 5, False, seed=torch.randint(0, 10**6, ()).item())
    q, k, v = (torch.randn(2, 2, S, 16, requires_grad=True) for _ in range(3))

    def step():
        for x in (q, k, v):
            x.grad = None
        before = dict(runtime.counters)
        out = fn(q, k, v, ids)
        g = torch.randn_like(out)
        out.backward(g)
        ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
        doc_attention(*ref, ids).backward(g.double())
        for x, r in zip((q, k, v), ref):
            assert rel_err(x.grad, r.grad) < TOL
        return {c: runtime.counters[c] - before.get(c, 0) for c in ("classifications", "classifications_reused")}

    assert step() == {"classifications": 3, "classifications_reused": 0}   # forward, dQ kernel, dK/dV kernel
    assert step() == {"classifications": 0, "classifications_reused": 3}
    ids[:, S // 2:] += 1          # a new document boundary in the middle, written in place
    assert step() == {"classifications": 3, "classifications_reused": 0}
    bs = list(runtime._REGISTRY.values())[-1].backward_source
    assert all(bs.classifiers) and "mask dropped" in bs.source   # kept-whole tiles run without the mask


def test_document_ids_viewed_in_the_program_are_classified_once_across_steps():
    """The runner's document_mask views the ids inside the program: the backward gets them back from
    autograd as a new tensor object each step, on the same storage, and still reuses its tables; a new
    ids tensor (same values, new memory) is classified again."""
    from flashlight.compiler import runtime

    v = vr.get("document_mask")
    shape = v.shape(B=2, H=2, Sq=64, Sk=64, D=16, docs=3)
    x = v.make_inputs(shape, torch.float32, "cpu", requires_grad=True)
    torch._dynamo.reset()
    fn = flashlight.compile(v.bind(shape))

    def step():
        before = dict(runtime.counters)
        check = {n: t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point() else t
                 for n, t in x.items()}
        out = fn(**x)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x[n] for n in "qkv"], g)
        want = torch.autograd.grad(v.reference(**check), [check[n] for n in "qkv"], g.double())
        assert all(rel_err(a, b) < TOL for a, b in zip(got, want))
        return [runtime.counters[c] - before.get(c, 0) for c in ("classifications", "classifications_reused")]

    assert step() == [3, 0]
    assert step() == [0, 3]
    x["doc_ids"] = x["doc_ids"].clone()
    assert step() == [3, 0]


@pytest.mark.parametrize("name", ["evoformer", "sinks"])
def test_compiled_row_step_matches_the_op_by_op_one(monkeypatch, name):
    """The row step compiled by Inductor (as on the GPU) gives the same gradients, inputs read by row
    values included: the gate (one entry per row) and the sink logits (one per head, read by every row)."""
    from flashlight.compiler import runtime

    monkeypatch.setattr(runtime, "COMPILED_ROW_STEP", {"cpu"})
    v = vr.get(name)
    shape = v.shape(B=1, H=2, Sq=40, Sk=40, D=16, **({"N": 2} if name == "evoformer" else {}))
    inputs = v.make_inputs(shape, torch.float32, "cpu", requires_grad=True, seed=3)
    check_grads(v.bind(shape), inputs)
    region = list(runtime._REGISTRY.values())[-1]
    assert region._row_steps and region.row_step_failed is None


@pytest.mark.parametrize("name", ["causal", "causal+proj", "sinks", "evoformer"])
def test_half_precision_gradients_are_as_accurate_as_eager(name):
    """In 16-bit the forward saves its ·V accumulators in the output's dtype (as FlashAttention keeps O):
    every gradient stays within a small factor of eager autograd's own error against float64 (float16:
    Triton's interpreter computes bfloat16 wrongly, and both take the same path)."""
    v = vr.get(name.split("+")[0])
    shape = v.shape(B=1, H=4, Sq=96, Sk=96, D=32, **({"N": 2} if name == "evoformer" else {}))
    inputs = v.make_inputs(shape, torch.float16, "cpu", requires_grad=True, seed=5)
    fn = v.bind(shape)
    if name.endswith("+proj"):   # the output feeds a projection: it stands in for its accumulator (fp16)
        w, attention = torch.randn(32, 32, dtype=torch.float16) / 6, fn
        fn = lambda **x: attention(**x) @ w.to(x["q"].dtype)  # noqa: E731
    torch._dynamo.reset()
    out = flashlight.compile(fn, inductor=False)(**inputs)
    g = torch.randn_like(out)
    wrt = [x for x in inputs.values() if x.requires_grad]
    fused = torch.autograd.grad(out, wrt, g)
    eager = torch.autograd.grad(fn(**inputs), wrt, g)
    ref_in = {k: x.detach().double().requires_grad_(x.requires_grad) for k, x in inputs.items()}
    ref = torch.autograd.grad(fn(**ref_in), [x for x in ref_in.values() if x.requires_grad], g.double())
    for name_, a, b, r in zip([k for k, x in inputs.items() if x.requires_grad], fused, eager, ref):
        assert rel_err(a, r) < max(3 * rel_err(b, r), 1e-2), (name_, rel_err(a, r), rel_err(b, r))


def test_a_config_too_large_for_shared_memory_shrinks_until_it_fits():
    """float32 inputs or wide heads can ask more shared memory than the GPU has (Triton raises
    OutOfResources before launching): the backward tries fewer stages, then halved tiles, and remembers
    the config that fitted."""
    from triton.runtime.errors import OutOfResources

    from flashlight.compiler.runtime import launch_fitting

    tried = []

    def launch(c):   # a GPU whose shared memory holds BLOCK_M × BLOCK_N × stages <= 8192
        tried.append((c["BLOCK_M"], c["BLOCK_N"], c["num_stages"], c["num_warps"]))
        if c["BLOCK_M"] * c["BLOCK_N"] * c["num_stages"] > 8192:
            raise OutOfResources(c["BLOCK_M"] * c["BLOCK_N"] * c["num_stages"], 8192, "shared memory")

    fitted = {}
    cfg = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    got = launch_fitting(launch, cfg, fitted, "k")
    assert tried == [(128, 64, 3, 8), (128, 64, 2, 8), (64, 64, 2, 4)] and got == {**cfg, "BLOCK_M": 64,
                                                                                   "num_stages": 2, "num_warps": 4}
    tried.clear()
    assert launch_fitting(launch, cfg, fitted, "k") == got and len(tried) == 1   # remembered
    with pytest.raises(RuntimeError, match="fits"):
        launch_fitting(lambda c: launch({**c, "num_stages": 10**6}), cfg, {}, "k")


def _left_padded_inputs(S=130):
    """q, k, v that require grad and a key-padding mask for 2 batches; batch 1 is left padded so that its
    queries 0..44 see no key (rows a finite fill masks everywhere)."""
    pad = torch.ones(2, S, dtype=torch.bool)
    pad[1, :45] = False
    inputs = {n: torch.randn(2, 2, S, 16, requires_grad=True) for n in "qkv"}
    inputs["pad"] = pad
    return inputs


def test_finite_fill_masks_skip_tiles_in_training_with_exact_gradients():
    """finfo.min masks (GPT-2's and HF's spelling) skip tiles in the training forward and both backward
    kernels. A batch with a row masked everywhere (left padding) has that row averaged over every key in
    eager: the forward computes its query tile again, and the backward visits every tile of that batch.
    Gradients against float64 autograd, for a batch with such rows and one without."""
    from flashlight.compiler import runtime

    def f(q, k, v, pad):
        i = torch.arange(q.shape[-2])[:, None]
        j = torch.arange(k.shape[-2])[None, :]
        keep = (j <= i) & pad[:, None, None, :]
        return torch.where(keep, q @ k.mT * 0.25, torch.finfo(q.dtype).min).softmax(-1) @ v

    errors = check_grads(f, _left_padded_inputs())
    region = list(runtime._REGISTRY.values())[-1]
    assert "if redo:" in region.ks.source and "tile_empty" in region.backward_source.source
    assert "redo_ptr" in region.backward_source.source and region.backward_source.row_checks
    assert errors["q"] < TOL


@pytest.mark.parametrize("spelling", ["torch.tensor", "torch.tensor(...).to(device)", "one-element -1e9",
                                      "torch.full_like"])
def test_a_fill_written_as_a_tensor_skips_tiles(spelling):
    """A mask value made a tensor inside the function, as GPT-J, CodeGen and GPT-Neo write it
    (`torch.tensor(torch.finfo(dtype).min, dtype=dtype).to(device)`), or as `torch.full_like(s, value)`, is a
    number to the compiler: the masked tiles are skipped in the forward and both backward kernels, as for a
    float fill, and the row masked everywhere stays eager's average over every key. Before, the literal was
    read as a tensor and every tile was computed, and full_like's read of the scores kept the region from
    fusing. Gradients against float64 autograd."""
    from flashlight.compiler import runtime

    def f(q, k, v, pad):
        i = torch.arange(q.shape[-2])[:, None]
        j = torch.arange(k.shape[-2])[None, :]
        keep = (j <= i) & pad[:, None, None, :]
        s = q @ k.mT * 0.25
        if spelling == "torch.tensor":
            fill = torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype, device=s.device)
        elif spelling == "torch.tensor(...).to(device)":
            fill = torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype).to(s.device)
        elif spelling == "one-element -1e9":
            fill = torch.tensor([-1e9], dtype=s.dtype)
        else:
            fill = torch.full_like(s, torch.finfo(s.dtype).min)
        return torch.where(keep, s, fill).softmax(-1) @ v

    errors = check_grads(f, _left_padded_inputs())
    region = list(runtime._REGISTRY.values())[-1]
    assert "tile_empty" in region.ks.source and "if redo:" in region.ks.source, region.ks.source
    assert "tile_empty" in region.backward_source.source and region.backward_source.row_checks
    assert max(errors.values()) < TOL


@pytest.mark.parametrize("spelling", ["the reference in scaled_dot_product_attention's documentation",
                                      "ones_like(dtype=bool).tril()"])
def test_a_causal_mask_built_from_a_boolean_constant_skips_tiles(spelling):
    """`torch.ones(L, S, dtype=torch.bool).tril()` (the math that scaled_dot_product_attention's
    documentation gives for is_causal, copied into many model files) is `(j <= i) & True` once traced: the
    constant True is a mask true everywhere, so the causal tiles are classified by index arithmetic and
    skipped in the forward and both backward kernels. Before, the constant was taken for a number and no
    tile was skipped. Gradients against float64 autograd, with sizes that leave partial tiles."""
    from flashlight.compiler import runtime

    def documented(q, k, v):
        L, S = q.size(-2), k.size(-2)
        attn_bias = torch.zeros(L, S, dtype=q.dtype, device=q.device)
        temp_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril(diagonal=0)
        attn_bias.masked_fill_(temp_mask.logical_not(), float("-inf"))
        attn_weight = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.size(-1)))
        attn_weight += attn_bias
        return torch.softmax(attn_weight, dim=-1) @ v

    def ones_like(q, k, v):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        return s.masked_fill(~torch.ones_like(s, dtype=torch.bool).tril(), float("-inf")).softmax(-1) @ v

    inputs = {n: torch.randn(2, 2, 100, 16, requires_grad=True) for n in "qkv"}
    errors = check_grads(documented if spelling.startswith("the reference") else ones_like, inputs)
    region = list(runtime._REGISTRY.values())[-1]
    assert "tile_empty" in region.ks.source and "tile_empty" in region.backward_source.source
    assert max(errors.values()) < TOL


def _reference_causal_mask(spelling, S, window, dtype):
    """Causal masks as two reference implementations build them, added to the scores."""
    if spelling == "Mistral's log of a 0/1 mask":
        mask = torch.triu(torch.tril(torch.full((S, S), dtype=dtype, fill_value=1), diagonal=0), diagonal=-window)
        return torch.log(mask)
    # Meta's Llama: a KV cache's (empty) columns, then -inf above the diagonal
    mask = torch.triu(torch.full((S, S), float("-inf")), diagonal=1)
    return torch.hstack([torch.zeros((S, 0)), mask]).type(dtype)


@pytest.mark.parametrize("spelling", ["Mistral's log of a 0/1 mask", "Llama's hstack with the cache's columns"])
def test_reference_implementations_causal_masks_skip_tiles(spelling):
    """Mistral's reference adds log(mask) for a 0/1 sliding-window mask (log 0 = -inf), Meta's Llama
    reference hstacks the cache's columns (none at the first step) before its triu(-inf) mask. Both are
    classified by index arithmetic and skip tiles in the forward and both backward kernels; before, the
    log stopped the interval rules (no tile skipped) and the cat made the mask a tensor classified by a
    kernel of its own on every call. Gradients against float64 autograd."""
    from flashlight.compiler import runtime

    def f(q, k, v):
        mask = _reference_causal_mask(spelling, q.shape[-2], 40, q.dtype)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask, -1) @ v

    inputs = {n: torch.randn(2, 2, 130, 16, requires_grad=True) for n in "qkv"}
    errors = check_grads(f, inputs)
    region = list(runtime._REGISTRY.values())[-1]
    assert "tile_empty" in region.ks.source and "tile_empty" in region.backward_source.source
    assert not region.ks.classifier and not any(region.backward_source.classifiers), "index arithmetic only"
    assert max(errors.values()) < TOL


def test_added_masks_skip_tiles_in_training_unless_they_are_learned():
    """transformers' eager mask, [B, 1, S, S] of 0 / finfo.min added to the scores, skips tiles in the
    training forward and both backward kernels (left padding: rows that see no key are averaged over every
    key, as in eager). An added tensor that requires grad is a bias, not a mask: never classified, and its
    gradient is exact."""
    from flashlight.compiler import runtime

    def f(q, k, v, mask):
        return torch.softmax(q @ k.mT * 0.25 + mask, -1) @ v

    S = 130
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    keep = (j <= i).expand(2, 1, S, S).clone()
    keep[1, :, :, :45] = False              # batch 1: left padding, queries 0..44 see no key
    inputs = {n: torch.randn(2, 2, S, 16, requires_grad=True) for n in "qkv"}
    inputs["mask"] = torch.zeros(2, 1, S, S).masked_fill(~keep, torch.finfo(torch.float32).min)
    check_grads(f, inputs)
    region = list(runtime._REGISTRY.values())[-1]
    assert "if redo:" in region.ks.source and "def classify_tiles_" in region.ks.source
    assert "tile_empty" in region.backward_source.source and region.backward_source.row_checks

    inputs = {n: x.detach().requires_grad_() for n, x in inputs.items()}
    inputs["mask"] = torch.randn(2, 1, S, S).masked_fill(~keep, -1e3).requires_grad_()
    check_grads(f, inputs)
    region = list(runtime._REGISTRY.values())[-1]
    assert "tile_empty" not in region.ks.source and "tile_empty" not in region.backward_source.source


def test_softmax_training_forward_stores_the_output_not_its_accumulator(monkeypatch):
    """Where the output is its one ·V accumulator over the row sum (softmax, whatever the mask or score
    bias), the backward's kernels read dO as given, times d out/d(P·V) per row where an epilogue scales the
    output (compiled, as on the GPU). Where the output then feeds a projection, as in a model, the training
    forward stores only row sums and maxes and the backward divides the output by its row factor; an
    output the graph returns (the caller may write into it) keeps its accumulator. An output not linear in
    the accumulator (squared after ·V) or one whose row values read an input (sinks) keeps storing it."""
    from flashlight.compiler import runtime

    monkeypatch.setattr(runtime, "COMPILED_ROW_STEP", {"cpu"})
    w = torch.randn(24, 24)

    def projected(attention):   # the output feeds o_proj, as in a model
        return lambda q, k, v: attention(q, k, v) @ w.to(q.dtype)

    def stored(fn, inputs):
        check_grads(fn, inputs)
        region = list(runtime._REGISTRY.values())[-1]
        assert region._row_steps and region.row_step_failed is None
        return (region.ks.row_program.get("from_out"), [kind for _, kind in region.ks.saved],
                "dpv_ptr" in region.backward_source.source, "dpv_scale" in region.backward_source.row_names)

    def qkv():
        return {n: torch.randn(2, 3, 70, 24, requires_grad=True) for n in "qkv"}
    assert stored(projected(sm_causal), qkv()) == ("acc1", ["row", "row"], False, False)
    saves = [flashlight.explain(fn, **qkv()).regions[0].matched["training forward saves"]
             for fn in (projected(sm_causal), sm_causal)]
    assert "the output stands in" in saves[0] and "leaves the compiled graph" in saves[1], saves
    assert stored(projected(lambda q, k, v: sm_causal(q, k, v) * 0.5), qkv()) == ("acc1", ["row", "row"], False, True)
    assert stored(sm_causal, qkv()) == (None, ["row", "vector", "row"], False, False)   # returned
    assert stored(projected(lambda q, k, v: sm_causal(q, k, v) ** 2), qkv()) == (None, ["row", "vector", "row"],
                                                                                  True, False)
    v = vr.get("sinks")
    shape = v.shape(B=1, H=2, Sq=40, Sk=40, D=16)
    from_out, kinds, dpv, _ = stored(v.bind(shape), v.make_inputs(shape, torch.float32, "cpu", requires_grad=True))
    assert from_out is None and "vector" in kinds and dpv


def test_output_written_in_place_later_trains_exactly():
    """A model that scales the attention output in place (`y.mul_(0.5)` after `att @ v`; a stored output
    that the write changed once gave gradients 19% off): in-place ops become out-of-place before matching,
    so the write joins the region as its epilogue; gradients of a GPT-2 style module (projections,
    registered tril buffer) against float64."""
    from flashlight.compiler import runtime

    class Attention(torch.nn.Module):
        def __init__(self, d=32, h=2, T=40):
            super().__init__()
            self.h, self.c_attn, self.c_proj = h, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
            self.register_buffer("bias", torch.tril(torch.ones(T, T)).view(1, 1, T, T))

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in self.c_attn(x).split(C, 2))
            att = (q @ k.transpose(-2, -1)) * k.size(-1) ** -0.5
            y = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")).softmax(-1) @ v
            y.mul_(0.5)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    torch._dynamo.reset()
    model, x = Attention(), torch.randn(2, 40, 32)
    reference = Attention().double()
    reference.load_state_dict(model.state_dict())
    flashlight.compile(model)(x).square().mean().backward()
    reference(x.double()).square().mean().backward()
    region = list(runtime._REGISTRY.values())[-1]
    # in-place ops become out-of-place before matching: the write is the region's epilogue, and the
    # output the forward stores is the one the backward divides
    assert any("y.mul_(0.5)" in line for line in region.ks.row_program["lines"])
    for (name, p), p64 in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.grad, p64.grad) < TOL, (name, rel_err(p.grad, p64.grad))


def test_scores_written_in_place_fuse_forward_and_backward():
    """`s.mul_(scale); s.masked_fill_(mask, -inf)`, as older model files write it: in-place ops become
    out-of-place ones before matching, so the region fuses and trains like the out-of-place spelling."""
    def in_place(q, k, v):
        s = q @ k.transpose(-2, -1)
        s.mul_(q.shape[-1] ** -0.5)
        s.masked_fill_(torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).triu(1), float("-inf"))
        return s.softmax(-1) @ v

    check_grads(in_place, {n: torch.randn(2, 3, 50, 24, requires_grad=True) for n in "qkv"})


def test_what_only_the_row_step_reads_is_freed_before_the_gradients_are_allocated(monkeypatch):
    """The training forward's output (saved where it stands in for its accumulator) or its stored ·V
    accumulator is read only by the backward's row step, so it is freed before the backward kernels
    allocate dQ, dK, dV: the backward's peak holds no output-sized tensor more than FlexAttention's."""
    import weakref

    from flashlight.compiler import runtime

    seen = {}
    rows, generated = runtime.CompiledRegion.rows, runtime.CompiledRegion._generated_backward

    def watched_rows(self, inputs, saved, grad_out, needs):
        seen["wide"] = [weakref.ref(t) for t in saved if t.numel() > self.ks.batch * self.ks.M]
        seen["row stats"] = [weakref.ref(t) for t in saved if t.numel() == self.ks.batch * self.ks.M]
        return rows(self, inputs, saved, grad_out, needs)

    def watched_backward(self, *args):
        seen["alive"] = [r() is not None for r in seen["wide"]]
        # without finite mask fills the kernels need no forward row statistic: freed with the row step
        seen["row stats alive"] = [r() is not None for r in seen["row stats"]]
        return generated(self, *args)

    monkeypatch.setattr(runtime.CompiledRegion, "rows", watched_rows)
    monkeypatch.setattr(runtime.CompiledRegion, "_generated_backward", watched_backward)
    w = torch.randn(24, 24)
    for fn in (lambda q, k, v: sm_causal(q, k, v) @ w.to(q.dtype),   # output saved (feeds a projection)
               sm_causal):   # returned: its accumulator is stored
        # Inductor compiles the backward graph around the ops and frees each tensor after its last use
        check_grads(fn, {n: torch.randn(2, 3, 70, 24, requires_grad=True) for n in "qkv"}, inductor=True)
        assert len(seen["wide"]) == 1 and seen["alive"] == [False], seen
        assert len(seen["row stats"]) == 2 and not any(seen["row stats alive"]), seen


def test_region_key_follows_the_backward_source():
    """Graphs Inductor caches on disk call the ops by the region's key, with the row table's shape the
    fake kernel gave then: a different generated backward (a new flashlight, the same forward) is a new
    key, never a cached graph calling it with the old shapes."""
    import dataclasses

    from flashlight.compiler import runtime
    torch._dynamo.reset()
    q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
    flashlight.compile(sm_causal, inductor=False)(q, k, v).sum().backward()
    region = list(runtime._REGISTRY.values())[-1]
    changed = dataclasses.replace(region.backward_source, source=region.backward_source.source + "\n# changed")
    assert dataclasses.replace(region, backward_source=changed).key != region.key
    assert dataclasses.replace(region, backward_source=region.backward_source).key == region.key


@pytest.mark.parametrize("name,inductor", [("sinks", False), ("causal", True), ("diff_attn", True)])
def test_row_step_traced_into_the_backward_graph(monkeypatch, name, inductor):
    """Where the row step is traced into the backward graph (on GPUs; forced here on CPU), it runs as
    that graph's own ops, the rows op is never called, and every gradient (sinks: the sink logit's
    comes from the row step itself) is exact."""
    from flashlight.compiler import runtime

    def no_op(*args):
        raise AssertionError("the rows op ran: the row step was not traced into the graph")
    monkeypatch.setattr(runtime, "INLINE_ROW_STEP", {"cpu", "cuda"})
    monkeypatch.setattr(runtime.CompiledRegion, "rows", no_op)
    v = vr.get(name)
    shape = v.shape(B=2, H=4, Sq=40, Sk=40, D=16)
    torch._dynamo.reset()
    check_grads(v.bind(shape), v.make_inputs(shape, torch.float32, "cpu", requires_grad=True, seed=3),
                inductor=inductor)


@pytest.mark.parametrize("inductor", [False, True])
def test_stored_row_values_reach_the_backward_kernels_in_place(monkeypatch, inductor):
    """Row values the forward stored (a row's max, its sum) are passed to the backward kernels as they are,
    each through a pointer of its own: the traced row step makes no table of copies of them (on a GPU
    that copy was two more kernel launches on every training step's host path). The kernels read them where
    they keep exp(x - max) / sum: here, a mask filled with finfo.min (elsewhere they read the row's
    log-sum-exp, which the row step computes)."""
    from flashlight.compiler import runtime

    monkeypatch.setattr(runtime, "INLINE_ROW_STEP", {"cpu", "cuda"})
    stored, passed = [], []
    forward, backward = runtime.CompiledRegion.__call__, runtime.CompiledRegion._generated_backward

    def recording_forward(self, inputs):
        res = forward(self, inputs)
        stored.extend(t.untyped_storage().data_ptr() for t in res[1])
        return res

    def recording_backward(self, inputs, row_saved, rows, grad_out, needs):
        passed.extend(t.untyped_storage().data_ptr() for t in rows[1:1 + len(self.backward_source.row_names)])
        return backward(self, inputs, row_saved, rows, grad_out, needs)
    monkeypatch.setattr(runtime.CompiledRegion, "__call__", recording_forward)
    monkeypatch.setattr(runtime.CompiledRegion, "_generated_backward", recording_backward)
    torch._dynamo.reset()
    def finfo_causal(q, k, v):
        s = q @ k.mT * q.shape[-1] ** -0.5
        i, j = torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :]
        return torch.softmax(s.masked_fill(j > i, torch.finfo(s.dtype).min), -1) @ v
    check_grads(finfo_causal, {n: torch.randn(2, 3, 40, 16, requires_grad=True) for n in "qkv"}, inductor=inductor)
    assert len(passed) >= 2 and set(stored) & set(passed), (stored, passed)


class SlicedQueries(torch.nn.Module):
    """Falcon's layout: one fused projection, of which the queries are a slice; K and V (one head, as in
    multi-query attention) are gathered from it, so the fused output is read once, in part."""

    def __init__(self, C=32, H=4):
        super().__init__()
        self.H, self.D = H, C // H
        self.qkv = torch.nn.Linear(C, C + 2 * self.D)

    def forward(self, x):
        B, S, _ = x.shape
        fused = self.qkv(x).view(B, S, self.H + 2, self.D)
        q = fused[:, :, :-2].transpose(1, 2)         # a slice of the fused output
        k = fused[:, :, [-2]].transpose(1, 2)        # copies (indexed by a list, as Falcon's _split_heads)
        v = fused[:, :, [-1]].transpose(1, 2)
        return torch.softmax(q @ k.mT * self.D ** -0.5, -1) @ v


def test_one_region_trains_on_inputs_of_two_layouts_in_turn():
    """A region's backward finds its stride arguments, grids and gradient buffers once per layout of its
    inputs (a plan each): contiguous inputs and transposed views of the same values, in turn, get exact
    gradients every time, from two plans."""
    from flashlight.compiler import runtime
    B, H, S, D = 1, 2, 40, 16

    def attention(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * D ** -0.5, -1) @ v

    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    flashlight.compile(attention)(*(t.clone().requires_grad_() for t in (q, k, v)))
    region = list(runtime._REGISTRY.values())[-1]
    grad_out = torch.randn(B, H, S, D)
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    attention(*ref).backward(grad_out.double())
    for turn in range(4):
        if turn % 2:   # the same values as [B, S, H, D] memory viewed as [B, H, S, D]
            xs = [t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v)]
        else:
            xs = [t.clone().requires_grad_() for t in (q, k, v)]
        out = torch.ops.flashlight.fused_attention_train(xs, region.key)[0]
        grads = torch.autograd.grad(out, xs, grad_out.reshape(out.shape))
        for g, r in zip(grads, ref):
            assert rel_err(g, r.grad) < TOL
    assert len(region._backward_plans) == 2


def test_a_gradient_of_a_sliced_input_zeroes_the_rest(monkeypatch):
    """Only the queries' part of the fused projection is read by the region: its gradient elsewhere is
    zero, not whatever the buffer held (a gradient stored tile by tile covered only the slice). New
    buffers are filled with NaN here, as reused memory may hold anything."""
    empty = torch.empty

    def dirty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    monkeypatch.setattr(torch, "empty", dirty)
    torch.manual_seed(0)
    model = SlicedQueries()
    ref = copy.deepcopy(model).double()
    x = torch.randn(2, 24, 32)
    torch._dynamo.reset()
    report = flashlight.explain(model, x)
    assert report.fused and all(r.backward_fused for r in report.regions if r.fused), str(report)
    flashlight.compile(model, inductor=False)(x).square().sum().backward()
    ref(x.double()).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.isfinite(p.grad).all(), name
        assert rel_err(p.grad, q.grad) < TOL, name


def test_a_row_step_that_cannot_be_traced_runs_as_its_op(monkeypatch):
    from flashlight.compiler import runtime

    def fails(*args):
        raise RuntimeError("not traceable")
    monkeypatch.setattr(runtime, "INLINE_ROW_STEP", {"cpu", "cuda"})
    monkeypatch.setattr(runtime.CompiledRegion, "rows_traced", fails)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="tracing the backward's row step into the graph failed"):
        check_grads(sm_causal, {n: torch.randn(2, 3, 40, 16, requires_grad=True) for n in "qkv"})


@pytest.mark.parametrize("dtype, precision, cuda_cores", [(torch.float32, "highest", True),
                                                         (torch.float32, "high", False),
                                                         (torch.float16, "highest", False)])
def test_float32_tiles_at_full_precision_get_cuda_core_tiles(dtype, precision, cuda_cores):
    """No tensor-core instruction multiplies float32 at full precision: Triton multiplies such tiles with
    FMAs on the CUDA cores, where the tensor-core tiles spill (a float32 differential-attention step 17×
    slower on an H200). Their kernels, forward and both backward ones, get runtime.CUDA_CORE_TILES on a
    GPU; TF32 (torch.set_float32_matmul_precision("high")) and 16-bit tiles keep tensor-core tiles."""
    from flashlight.compiler import runtime

    def diff(q1, k1, q2, k2, v, lam):
        return (torch.softmax(q1 @ k1.mT * 0.25, -1) - lam * torch.softmax(q2 @ k2.mT * 0.25, -1)) @ v
    torch.manual_seed(0)
    inputs = {n: torch.randn(1, 2, 40, 16, dtype=dtype, requires_grad=True) for n in ("q1", "k1", "q2", "k2")}
    inputs["v"] = torch.randn(1, 2, 40, 32, dtype=dtype, requires_grad=True)
    inputs["lam"] = torch.tensor(0.4, dtype=dtype, requires_grad=True)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(precision)
        torch._dynamo.reset()
        out = flashlight.compile(diff, inductor=False)(**inputs)
        out.backward(torch.randn_like(out))
        report = flashlight.explain(diff, **inputs)
    finally:
        torch.set_float32_matmul_precision(before)
    region = list(runtime._REGISTRY.values())[-1]
    bs = region.backward_source
    assert region.ks.cuda_core_dots is cuda_cores and bs.cuda_core_dots is cuda_cores
    # explain says so, and what would use the tensor cores
    assert ("set_float32_matmul_precision('high')" in str(report)) is cuda_cores
    forward, backward = runtime.default_config(region.ks, "cuda"), runtime.backward_config(bs, "cuda")
    if cuda_cores:
        assert forward == runtime.CUDA_CORE_TILES
        assert backward == {"dq": runtime.CUDA_CORE_TILES, "dkv": runtime.CUDA_CORE_TILES}
    else:   # two ·V accumulators of 32 columns: the tensor-core defaults
        assert forward["BLOCK_M"] * forward["BLOCK_N"] > 32 * 32
        assert backward["dq"]["BLOCK_M"] * backward["dq"]["BLOCK_N"] > 32 * 32


def test_backward_tiles_given_for_one_kernel_leave_the_others_default():
    """compile(config={"backward": {"dkv": tiles}}) tiles the dK/dV kernel only: the dQ kernel keeps its
    default tiles (it used to get the whole dict, without tiles, and the backward fell back to the region's
    own ops), on a GPU as on the CPU, and the gradients are exact."""
    from flashlight.compiler import runtime

    dkv = {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    torch.manual_seed(0)
    inputs = {n: torch.randn(1, 2, 48, 16, requires_grad=True) for n in ("q", "k", "v")}
    before = flashlight.counters["fused_backward_launches"]
    out = flashlight.compile(lambda q, k, v: torch.softmax(q @ k.mT * 0.25, -1) @ v, inductor=False,
                             config={"backward": {"dkv": dkv}})(**inputs)
    out.backward(torch.ones_like(out))
    region = list(runtime._REGISTRY.values())[-1]
    assert flashlight.counters["fused_backward_launches"] > before and region.backward_failed is None
    bs = region.backward_source
    for device in ("cpu", "cuda"):
        tiles = runtime.backward_config(bs, device, {"dkv": dkv})
        assert tiles == {"dq": runtime.backward_config(bs, device)["dq"], "dkv": dkv}
    ref = {n: t.detach().double().requires_grad_() for n, t in inputs.items()}
    (torch.softmax(ref["q"] @ ref["k"].mT * 0.25, -1) @ ref["v"]).sum().backward()
    assert all(rel_err(inputs[n].grad, ref[n].grad) < TOL for n in inputs)


@pytest.mark.parametrize("D,Dv", [(1, 16), (16, 1), (1, 1)])
def test_head_dims_of_size_one_get_exact_gradients(D, Dv):
    """A head dim of size 1 is dropped from the loads' axes; the backward read such a Q, K or V tile
    broadcast over the padded head-dim block, so every score matmul summed the one column 16 times
    (gradients 1e10 off, with a correct forward). The padding columns are zeros now, in the forward too
    (test_hopper_compile: its 1-wide matmul did not compile for a GPU)."""
    def attn(q, k, v):
        return torch.softmax(q @ k.mT / 4, -1) @ v
    g = torch.Generator().manual_seed(torch.randint(0, 10**6, ()).item())
    inputs = {"q": torch.randn(1, 2, 40, D, generator=g), "k": torch.randn(1, 2, 40, D, generator=g),
              "v": torch.randn(1, 2, 40, Dv, generator=g)}
    check_grads(attn, {n: x.requires_grad_() for n, x in inputs.items()})


def test_a_softmax_written_with_logsumexp_trains_fused():
    """`exp(s - s.logsumexp(-1, keepdim=True))` with a causal mask: its exp(s - (log(sum) + c)) is read as
    exp(s - c) / sum, the softmax, forward and backward."""
    def log_space(q, k, v):
        s = (q @ k.mT / 4).masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
        return torch.exp(s - torch.logsumexp(s, -1, keepdim=True)) @ v
    check_grads(log_space, {n: torch.randn(2, 2, 40, 16, requires_grad=True) for n in "qkv"})
