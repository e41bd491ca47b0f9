"""Attention as model files write it, trained: each module is compiled with flashlight, takes one
backward step, and must fuse forward and backward with every parameter's gradient matching a float64 copy
(CPU, Triton interpreter). The spellings are those of popular model code: masks as tensors filled with
finfo.min, in-place writes on the scores, upcasts, baddbmm, embeddings as bias tables, cross attention,
Swin's windows."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashlight

from test_compiler import TOL, rel_err   # conftest sets TRITON_INTERPRET=1 before imports

B, S, C, H = 2, 40, 32, 4
D = C // H
NEG = torch.finfo(torch.float32).min


def heads(t, s=S):
    return t.view(B, s, H, D).transpose(1, 2)


def merge(t):
    return t.transpose(1, 2).reshape(B, -1, C)


class Bert(nn.Module):
    """The extended padding mask (1 - m) * finfo.min of shape [B, 1, 1, S], division by sqrt(d)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x, pad):
        q, k, v = (heads(t) for t in self.qkv(x).split(C, -1))
        ext = (1.0 - pad[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D) + ext
        return self.o(merge(torch.matmul(F.softmax(s, dim=-1), v)))


class GPT2(nn.Module):
    """A registered boolean tril buffer sliced per call, torch.where with a finfo.min tensor, `/ torch.full`."""

    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.register_buffer("bias", torch.tril(torch.ones(64, 64, dtype=torch.bool))[None, None], persistent=False)

    def forward(self, x):
        q, k, v = (heads(t) for t in self.c_attn(x).split(C, 2))
        w = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], v.size(-1) ** 0.5, dtype=q.dtype)
        w = torch.where(self.bias[:, :, :S, :S], w, torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype))
        return self.c_proj(merge(torch.matmul(F.softmax(w, dim=-1).type(v.dtype), v)))


class Bloom(nn.Module):
    """ALiBi through baddbmm on [B*H, S, D] batches, a boolean causal mask filled with finfo.min, fp32 softmax."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.register_buffer("slopes", torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)]), persistent=False)

    def forward(self, x, causal):
        q, k, v = (heads(t).reshape(B * H, S, D) for t in self.qkv(x).split(C, -1))
        alibi = (self.slopes[:, None] * torch.arange(S)[None, :]).repeat(B, 1)[:, None, :]
        s = torch.baddbmm(alibi, q, k.transpose(-1, -2), beta=1.0, alpha=1 / math.sqrt(D))
        s = s.view(B, H, S, S).masked_fill(causal, torch.finfo(s.dtype).min)
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(x.dtype)
        return self.o(merge(torch.bmm(p.view(B * H, S, S), v).view(B, H, S, D)))


class Falcon(nn.Module):
    """The scores divided in place (`s /= sqrt(d)`), an integer attention mask compared with 0."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x, am):
        q, k, v = (heads(t) for t in self.qkv(x).split(C, -1))
        s = q @ k.transpose(-1, -2)
        s /= math.sqrt(D)
        s = s.masked_fill(am[:, None, None, :] == 0, torch.finfo(s.dtype).min)
        return self.o(merge(F.softmax(s, dim=-1) @ v))


class Phi(nn.Module):
    """q and k upcast to float32 before the score matmul, an additive causal mask, softmax back to v's dtype."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(C, 3 * C), nn.Linear(C, C)

    def forward(self, x, mask):
        q, k, v = (heads(t) for t in self.qkv(x).split(C, -1))
        w = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(2, 3)) / math.sqrt(D) + mask
        return self.o(merge(torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32).to(v.dtype), v)))


class EinsumInPlace(nn.Module):
    """einsum in both matmuls, a learned per-head temperature, the causal mask written with masked_fill_."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C)
        self.temp = nn.Parameter(torch.rand(H, 1, 1) + 0.5)

    def forward(self, x):
        q, k, v = (t.view(B, S, H, D) for t in self.qkv(x).split(C, -1))
        s = torch.einsum("bihd,bjhd->bhij", q, k) * self.temp
        s.masked_fill_(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
        return self.o(torch.einsum("bhij,bjhd->bihd", s.softmax(-1), v).reshape(B, S, C))


class T5(nn.Module):
    """A relative-position bias through nn.Embedding over buckets of j - i, no score scaling."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o, self.rel = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, C, bias=False), nn.Embedding(32, H)

    def forward(self, x):
        q, k, v = (heads(t) for t in self.qkv(x).split(C, -1))
        rel = torch.arange(S)[None, :] - torch.arange(S)[:, None]
        bucket = (rel > 0).long() * 16 + torch.clamp(rel.abs(), max=15)
        s = torch.matmul(q, k.transpose(3, 2)) + self.rel(bucket).permute(2, 0, 1)[None]
        return self.o(merge(torch.matmul(F.softmax(s.float(), dim=-1).type_as(s), v)))


class CrossAttention(nn.Module):
    """Queries from x, keys and values from a 23-token memory, a boolean key-padding mask."""

    def __init__(self):
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(C, C), nn.Linear(C, 2 * C), nn.Linear(C, C)

    def forward(self, x, mem, keep):
        q = heads(self.q(x))
        k, v = (heads(t, mem.shape[1]) for t in self.kv(mem).split(C, -1))
        s = (q @ k.transpose(-2, -1) / D ** 0.5).masked_fill(~keep[:, None, None, :], float("-inf"))
        return self.o(merge(s.softmax(-1) @ v))


class Gemma2(nn.Module):
    """transformers' Gemma-2 eager attention: GQA by repeat_kv (expand + reshape), query_pre_attn_scalar
    scaling, tanh soft-capping, the sliding-window mask as an added [B, 1, S, S] tensor of 0 / finfo.min
    (sliced to the keys), the softmax in float32."""

    def __init__(self, kv_heads=2, window=8, cap=50.0):
        super().__init__()
        self.kvh, self.window, self.cap = kv_heads, window, cap
        self.q, self.o = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.kv = nn.Linear(C, 2 * kv_heads * D, bias=False)

    def forward(self, x, mask):
        q = heads(self.q(x))
        k, v = (t.view(B, S, self.kvh, D).transpose(1, 2) for t in self.kv(x).split(self.kvh * D, -1))
        k, v = (t[:, :, None].expand(B, self.kvh, H // self.kvh, S, D).reshape(B, H, S, D) for t in (k, v))
        s = torch.matmul(q, k.transpose(2, 3)) * 16.0 ** -0.5
        s = torch.tanh(s / self.cap) * self.cap
        s = s + mask[:, :, :, : k.shape[-2]]
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o(merge(torch.matmul(p, v)))


class RotaryComplex(nn.Module):
    """Llama's original RoPE through complex numbers (view_as_complex · polar), GQA by repeat_interleave,
    an added causal mask from torch.full(finfo.min).triu(1): the gradient reaches q and k through complex
    values."""

    def __init__(self):
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False), nn.Linear(C, C)

    @staticmethod
    def rope(x):
        inv = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
        ang = torch.arange(x.shape[-2]).float()[:, None] * inv[None]
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], D // 2, 2))
        return torch.view_as_real(xc * torch.polar(torch.ones_like(ang), ang)).flatten(-2).type_as(x)

    def forward(self, x, mask):
        q = self.rope(heads(self.q(x)))
        k, v = (t.reshape(B, S, H // 2, D).transpose(1, 2) for t in self.kv(x).split(C // 2, -1))
        k, v = self.rope(k).repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        s = q @ k.transpose(-1, -2) / D ** 0.5 + mask
        return self.o(merge(F.softmax(s, dim=-1) @ v))



class Swin(nn.Module):
    """Shifted-window attention: a relative position bias table read at a registered index buffer, and a
    0 / -100 mask per window added through a view that splits the batch of windows ([B·nW, H, N, N] as
    [B, nW, H, N, N])."""

    def __init__(self, ws=4):
        super().__init__()
        self.qkv, self.o = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.table = nn.Parameter(torch.randn((2 * ws - 1) ** 2, H) * 0.02)
        c = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + (ws - 1)
        self.register_buffer("index", rel[..., 0] * (2 * ws - 1) + rel[..., 1], persistent=False)

    def forward(self, x, mask):
        Bw, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(Bw, N, 3, H, D).permute(2, 0, 3, 1, 4)
        s = (q * D ** -0.5) @ k.transpose(-2, -1)
        s = s + self.table[self.index.view(-1)].view(N, N, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        nW = mask.shape[0]
        s = s.view(Bw // nW, nW, H, N, N) + mask.unsqueeze(1).unsqueeze(0)
        s = s.view(-1, H, N, N)
        return self.o((F.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(Bw, N, C))

def _inputs(name):
    g = torch.Generator().manual_seed(int(torch.randint(0, 10**6, ())))
    x = torch.randn(B, S, C, generator=g)
    causal = torch.ones(S, S, dtype=torch.bool).triu(1)[None, None]
    pad = torch.ones(B, S, dtype=torch.long)
    pad[1, -7:] = 0
    return {
        "Bert": (x, pad), "GPT2": (x,), "Bloom": (x, causal), "Falcon": (x, pad),
        "Phi": (x, torch.zeros(1, 1, S, S).masked_fill(causal, NEG)), "EinsumInPlace": (x,), "T5": (x,),
        "CrossAttention": (x, torch.randn(B, 23, C, generator=g), torch.arange(23)[None, :] < torch.tensor([[23], [15]])),
        "Gemma2": (x, _sliding_mask(window=8, left_pad=3)),
        "RotaryComplex": (x, torch.full((S, S), NEG).triu(1)),
        "Swin": (torch.randn(B * 4, 16, C, generator=g), _window_masks()),
    }[name]


def _window_masks(nW=4, N=16):
    """Per window [nW, N, N] of 0 / -100, as Swin's shifted windows: tokens of different image regions
    do not attend to each other."""
    region = torch.zeros(nW, N, dtype=torch.long)
    region[1:, N // 2:] = 1
    region[3, ::3] = 2
    return torch.zeros(nW, N, N).masked_fill(region[:, :, None] != region[:, None, :], -100.0)


def _sliding_mask(window, left_pad):
    """[B, 1, S, S] of 0 / finfo.min: causal within `window` keys, batch 1 left-padded (its first queries
    see no key: eager averages them over every key)."""
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    keep = ((j <= i) & (i - j < window)).expand(B, 1, S, S).clone()
    keep[1, :, :, :left_pad] = False
    return torch.zeros(B, 1, S, S).masked_fill(~keep, NEG)


@pytest.mark.parametrize("cls", [Bert, GPT2, Bloom, Falcon, Phi, EinsumInPlace, T5, CrossAttention, Gemma2,
                                 RotaryComplex, Swin],
                         ids=lambda c: c.__name__)
def test_model_file_attention_trains_fused(cls):
    model = cls()
    reference = copy.deepcopy(model).double()
    args = _inputs(cls.__name__)
    torch._dynamo.reset()
    before = dict(flashlight.counters)
    flashlight.compile(model)(*args).square().mean().backward()
    for c in ("fused_launches", "fused_backward_launches"):
        assert flashlight.counters[c] > before.get(c, 0), (c, str(flashlight.explain(model, *args)))
    reference(*(a.double() if a.is_floating_point() else a for a in args)).square().mean().backward()
    for (name, p), p64 in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.grad, p64.grad) < TOL, (name, rel_err(p.grad, p64.grad))



def test_autocast_training_fuses_through_the_casts():
    """A float32 model trained under autocast (float16 on the CPU, as bfloat16 on a GPU): the projections
    cast to half precision on their way into the attention, and the gradients flow back through those casts
    into float32 parameters; they match eager autocast's to half precision."""
    model = GPT2()
    reference = copy.deepcopy(model)
    (x,) = _inputs("GPT2")
    torch._dynamo.reset()
    before = flashlight.counters["fused_backward_launches"]
    with torch.autocast("cpu", dtype=torch.float16):
        out = flashlight.compile(model)(x)
    out.float().square().mean().backward()
    assert flashlight.counters["fused_backward_launches"] > before
    with torch.autocast("cpu", dtype=torch.float16):
        ref = reference(x)
    ref.float().square().mean().backward()
    assert rel_err(out, ref) < 2e-3
    for (name, p), p_ref in zip(model.named_parameters(), reference.parameters()):
        assert p.grad.dtype == torch.float32 and rel_err(p.grad, p_ref.grad) < 5e-3, (name, rel_err(p.grad, p_ref.grad))

class EmbeddedTokens(nn.Module):
    """Token embeddings with a padding index (BERT's: the padding row gets no gradient) feeding attention."""

    def __init__(self, vocab=40, C=32, H=4):
        super().__init__()
        self.H = H
        self.emb = nn.Embedding(vocab, C, padding_idx=0)
        self.qkv = nn.Linear(C, 3 * C)

    def forward(self, ids):
        B, S = ids.shape
        q, k, v = self.qkv(self.emb(ids)).view(B, S, 3, self.H, -1).permute(2, 0, 3, 1, 4)
        return torch.softmax(q @ k.mT * q.shape[-1] ** -0.5, -1) @ v


def test_an_embedding_with_a_padding_index_keeps_its_gradient_rule():
    """The embedding stays an embedding in the captured graph, so the padding row's gradient is zero as in
    eager (taken as a plain gather it summed the padding tokens' gradients into it)."""
    model = EmbeddedTokens()
    reference = copy.deepcopy(model).double()
    ids = torch.randint(0, 40, (B, S))
    ids[:, :4] = 0
    torch._dynamo.reset()
    before = flashlight.counters["fused_backward_launches"]
    flashlight.compile(model)(ids).square().mean().backward()
    assert flashlight.counters["fused_backward_launches"] > before
    reference(ids).square().mean().backward()
    assert torch.all(model.emb.weight.grad[0] == 0)
    for (name, p), p64 in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.grad, p64.grad) < TOL, (name, rel_err(p.grad, p64.grad))



class SharedEmbeddingEncoder(nn.Module):
    """T5's layout: one embedding module reached by two names (`shared` and `encoder.embed`), and an output
    head tied to its weight."""

    def __init__(self, vocab=40, C=32, H=4):
        super().__init__()
        self.H = H
        self.shared = nn.Embedding(vocab, C)
        self.encoder = nn.Module()
        self.encoder.embed = self.shared
        self.qkv = nn.Linear(C, 3 * C)
        self.head = nn.Linear(C, vocab, bias=False)
        self.head.weight = self.shared.weight

    def forward(self, ids):
        B, S = ids.shape
        q, k, v = self.qkv(self.encoder.embed(ids)).view(B, S, 3, self.H, -1).permute(2, 0, 3, 1, 4)
        o = torch.softmax(q @ k.mT * q.shape[-1] ** -0.5, -1) @ v
        return self.head(o.transpose(1, 2).reshape(B, S, -1))


def test_explain_leaves_a_module_with_shared_weights_as_it_was():
    """explain traces the module with its weights swapped for traced tensors and puts every one back, in
    each module holding it (torch.func.functional_call left a traced tensor in a module reached by two
    names, and the compiled call that followed crashed on it); the model then trains fused."""
    model = SharedEmbeddingEncoder()
    reference = copy.deepcopy(model).double()
    weight = model.shared.weight
    ids = torch.randint(0, 40, (B, S))
    assert flashlight.explain(model, ids).fused
    assert model.shared.weight is weight and model.encoder.embed.weight is weight and model.head.weight is weight
    assert all(type(p) is nn.Parameter for p in model.parameters())
    torch._dynamo.reset()
    before = flashlight.counters["fused_backward_launches"]
    flashlight.compile(model)(ids).square().mean().backward()
    assert flashlight.counters["fused_backward_launches"] > before
    reference(ids).square().mean().backward()
    for (name, p), p64 in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.grad, p64.grad) < TOL, (name, rel_err(p.grad, p64.grad))

def padded_causal(q, k, v, pad):
    """The padding looked up per (batch, key) by two index tensors, as transformers' vmapped mask functions
    do, in a mask this one attention uses: the kernel cannot index that way, so it reads the mask."""
    Bq, Sq = pad.shape
    keep = pad[torch.arange(Bq)[:, None, None], torch.arange(Sq)[None, None, :]][:, None] & \
        (torch.arange(Sq)[None, :] <= torch.arange(Sq)[:, None])
    s = (q @ k.mT * q.shape[-1] ** -0.5).masked_fill(~keep, torch.finfo(q.dtype).min)
    return torch.softmax(s, -1) @ v


def test_a_mask_the_kernel_cannot_compute_is_read_as_a_tensor():
    from test_backward import check_grads

    pad = torch.ones(B, S, dtype=torch.bool)
    pad[1, :7] = False   # left padding: batch 1's first queries see no key
    inputs = {n: torch.randn(B, 3, S, 16, requires_grad=True) for n in "qkv"}
    report = flashlight.explain(padded_causal, **inputs, pad=pad)
    assert report.fused and "bitwise_not" in report.regions[0].matched["inputs"], str(report)
    torch._dynamo.reset()
    check_grads(padded_causal, {**inputs, "pad": pad})


def test_added_window_mask_skips_tiles_in_training():
    """Gemma-2's added sliding-window mask is classified per tile in the training forward and both
    backward kernels (small tiles: most are outside the window), and training stays exact."""
    from flashlight.compiler import runtime

    model = Gemma2(window=6)
    reference = copy.deepcopy(model).double()
    x, mask = _inputs("Gemma2")[0], _sliding_mask(window=6, left_pad=3)
    torch._dynamo.reset()
    before = dict(flashlight.counters)
    tiles = {"BLOCK_M": 16, "BLOCK_N": 16}
    flashlight.compile(model, config={**tiles, "backward": tiles})(x, mask).square().mean().backward()
    region = list(runtime._REGISTRY.values())[-1]
    assert "def classify_tiles_" in region.ks.source and "tile_empty" in region.backward_source.source
    assert flashlight.counters["classifications"] - before.get("classifications", 0) >= 3   # forward, dQ, dK/dV
    reference(x.double(), mask.double()).square().mean().backward()
    for (name, p), p64 in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.grad, p64.grad) < TOL, (name, rel_err(p.grad, p64.grad))


class VmapMaskTwoLayers(nn.Module):
    """transformers' way since its masking_utils: the 4-D mask is built by vmapping a mask function over
    (batch, query, key) indices, once per forward, and added in every layer; GQA by repeat_kv."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(C, C + 2 * C // 2) for _ in range(2))
        self.o = nn.ModuleList(nn.Linear(C, C) for _ in range(2))

    def forward(self, x, pad):
        def keep(b, i, j):
            return (j <= i) & (pad[b, j] > 0)
        idx = torch.arange(S)
        rows = torch.vmap(torch.vmap(torch.vmap(keep, (None, None, 0)), (None, 0, None)), (0, None, None))
        mask = torch.where(rows(torch.arange(B), idx, idx)[:, None], 0.0, NEG)       # [B, 1, S, S]
        for qkv, o in zip(self.qkv, self.o):
            q, k, v = qkv(x).split([C, C // 2, C // 2], -1)
            q = heads(q)
            k, v = (t.view(B, S, H // 2, D).transpose(1, 2) for t in (k, v))
            k, v = (t[:, :, None].expand(B, H // 2, 2, S, D).reshape(B, H, S, D) for t in (k, v))
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + mask, -1)
            x = x + o(merge(p @ v))
        return x


def test_vmap_built_mask_shared_by_two_layers_trains_fused():
    """A graph that runs vmap cannot be traced under functorch's functionalize transform: the capture
    functionalizes it the way AOTAutograd does instead (before, the failed trace left a functorch level
    behind and the fallback compile crashed). The mask both layers add is read as a tensor by each fused
    region, not computed in one of them."""
    model = VmapMaskTwoLayers()
    reference = copy.deepcopy(model).double()
    x = torch.randn(B, S, C)
    pad = torch.ones(B, S, dtype=torch.long)
    pad[1, :5] = 0                      # left padding: the first rows of sequence 1 see no key
    torch._dynamo.reset()
    before = dict(flashlight.counters)
    flashlight.compile(model)(x, pad).square().mean().backward()
    assert flashlight.counters["fused_launches"] - before.get("fused_launches", 0) == 2
    assert flashlight.counters["fused_backward_launches"] - before.get("fused_backward_launches", 0) == 2
    reference(x.double(), pad).square().mean().backward()
    for (name, p), p64 in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.grad, p64.grad) < TOL, (name, rel_err(p.grad, p64.grad))


def test_a_vmap_graph_that_cannot_be_captured_runs_on_inductor(monkeypatch):
    """If neither functionalization traces the graph, it runs unfused with a warning: the functorch levels
    the failed traces left behind are popped first (they made Inductor's own compile fail)."""
    from flashlight.compiler import capture

    def fails(fn):
        def inner(*args):
            raise RuntimeError("cannot trace this graph")
        return inner
    monkeypatch.setattr(capture, "_dispatch_functionalize", fails)
    model = VmapMaskTwoLayers()
    x, pad = torch.randn(B, S, C), torch.ones(B, S, dtype=torch.long)
    torch._dynamo.reset()
    with pytest.warns(UserWarning, match="capturing the graph failed"):
        out = flashlight.compile(model)(x, pad)
    assert rel_err(out, model(x, pad)) < TOL
    assert not torch._C._functorch.get_interpreter_stack()


class SharedCausalMask(nn.Module):
    """One causal mask, built from positions once per forward and added in both layers."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(C, 3 * C) for _ in range(2))

    def forward(self, x):
        i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
        mask = torch.where(j <= i, 0.0, NEG)
        for qkv in self.qkv:
            q, k, v = (heads(t) for t in qkv(x).chunk(3, -1))
            x = x + merge(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D) + mask, -1) @ v)
        return x


def test_a_mask_shared_by_layers_is_computed_in_each_kernel():
    """The shared mask is index arithmetic: each layer's kernel computes it (and skips the tiles it removes)
    rather than reading an S×S tensor, though the graph also uses it outside either region."""
    model = SharedCausalMask()
    reference = copy.deepcopy(model).double()
    x = torch.randn(B, S, C)
    report = flashlight.explain(model, x)
    assert report.fused and len([r for r in report.regions if r.fused]) == 2, str(report)
    for r in report.regions:
        assert not any(name.startswith("where") for name in r.matched["inputs"]), str(report)
        assert "index arithmetic" in r.matched["tile skipping"], str(report)
    torch._dynamo.reset()
    flashlight.compile(model)(x).square().mean().backward()
    reference(x.double()).square().mean().backward()
    for (name, p), p64 in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.grad, p64.grad) < TOL, (name, rel_err(p.grad, p64.grad))


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("compiled", ["the model", "each block"])
def test_activation_checkpointing_trains_fused(compiled, use_reentrant):
    """torch.utils.checkpoint as training code uses it: inside a compiled model, or around each compiled
    block. The first call compiles under the checkpoint's saved-tensor hooks; tracing must not save
    through them (non-reentrant checkpointing compares the count with the recomputation's, and the first
    step failed that check). Forward and backward fuse, gradients match float64 eager."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    blocks = nn.ModuleList([GPT2(), GPT2()])

    def run(blocks, x, wrap=lambda b: b):
        for b in blocks:
            x = x + checkpoint(wrap(b), x, use_reentrant=use_reentrant)
        return x

    ref_blocks = copy.deepcopy(blocks).double()
    x = torch.randn(B, S, C, requires_grad=True)
    ref_x = x.detach().double().requires_grad_()
    torch._dynamo.reset()
    before = flashlight.counters["fused_launches"], flashlight.counters["fused_backward_launches"]
    if compiled == "the model":
        out = flashlight.compile(lambda x: run(blocks, x))(x)
    else:
        forwards = {id(b): flashlight.compile(b.forward) for b in blocks}
        out = run(blocks, x, wrap=lambda b: forwards[id(b)])
    g = torch.randn_like(out)
    out.backward(g)
    run(ref_blocks, ref_x).backward(g.double())
    assert flashlight.counters["fused_launches"] > before[0]
    assert flashlight.counters["fused_backward_launches"] >= before[1] + 2
    assert rel_err(x.grad, ref_x.grad) < TOL
    for p, q in zip(blocks.parameters(), ref_blocks.parameters()):
        assert rel_err(p.grad, q.grad) < TOL


def _sdpa_masks():
    keep = torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[:, :, :3] = False                                    # rows the mask removes everywhere: SDPA gives 0
    return {"bool": keep, "finfo.min added": torch.where(keep, 0.0, NEG), "2-D bool, scale": keep[0, 0],
            "-inf added": torch.where(keep, 0.0, float("-inf")),
            "causal of -inf": nn.Transformer.generate_square_subsequent_mask(S)}


@pytest.mark.parametrize("mask", ["bool", "finfo.min added", "2-D bool, scale", "GQA", "learned bias", "-inf added",
                                  "causal of -inf"])
def test_scaled_dot_product_attention_with_a_mask_trains_fused(mask):
    """F.scaled_dot_product_attention given a mask (transformers' default attention passes its padding and
    causal masks so) is traced in its math form and fuses, forward and backward, with SDPA's meaning: a
    boolean mask keeps True, a float mask is added, a row masked everywhere gives zeros. Gradients of q, k,
    v (and of a learned bias passed as the mask) match float64 SDPA. A mask (not a learned bias) skips the
    tiles it removes in the forward and in the backward."""
    from flashlight.compiler import runtime

    torch.manual_seed(0)
    kv_heads = 2 if mask == "GQA" else H
    q = torch.randn(B, H, S, D, requires_grad=True)
    k, v = (torch.randn(B, kv_heads, S, D, requires_grad=True) for _ in range(2))
    kwargs = {"enable_gqa": True} if mask == "GQA" else {"scale": 0.3} if mask == "2-D bool, scale" else {}
    attn_mask = torch.randn(1, H, S, S, requires_grad=True) if mask == "learned bias" else \
        _sdpa_masks()["bool" if mask == "GQA" else mask]
    leaves = [q, k, v] + ([attn_mask] if attn_mask.requires_grad else [])

    def attn(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, **kwargs)

    torch._dynamo.reset()
    before = flashlight.counters["fused_launches"], flashlight.counters["fused_backward_launches"]
    out = flashlight.compile(attn, choose_faster=False)(q, k, v, attn_mask)
    assert flashlight.counters["fused_launches"] == before[0] + 1
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, g)
    assert flashlight.counters["fused_backward_launches"] == before[1] + 1
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_mask = ref_leaves[3] if len(leaves) == 4 else attn_mask if attn_mask.dtype == torch.bool else attn_mask.double()
    with sdpa_kernel([SDPBackend.MATH]):   # SDPA's definition (its CPU flash kernel folds a finite row's max)
        ref = attn(*ref_leaves[:3], ref_mask)
    assert rel_err(out, ref) < TOL
    if attn_mask.dtype == torch.bool or mask == "-inf added":      # rows removed everywhere: zeros
        assert out[:, :, :3].abs().max() == 0
    region = list(runtime._REGISTRY.values())[-1]
    skips = "tile_empty" in region.ks.source and "tile_empty" in region.backward_source.source
    assert skips == (mask != "learned bias"), mask
    for got, want in zip(grads, torch.autograd.grad(ref, ref_leaves, g.double())):
        assert rel_err(got, want) < TOL


def test_scaled_dot_product_attention_without_a_mask_stays_a_call():
    """Without a mask (or with is_causal) the call stays: PyTorch's Flash and cuDNN kernels run it."""
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    for kwargs in ({}, {"is_causal": True}):
        report = flashlight.explain(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs), q, k, v)
        assert not report.regions and "no attention region" in report.notes[-1]
        assert "1 scaled_dot_product_attention call(s) without a mask" in report.notes[0]


def test_a_masked_sdpa_whose_math_does_not_fuse_stays_a_call():
    """Where the math form of a masked SDPA call does not fuse (here: float64, which the kernels do not take),
    the graph is traced again with the call as it is, so Inductor runs PyTorch's kernel rather than the
    unfused math; the other region of the graph still fuses, and the report says why."""
    from flashlight.compiler import backend

    keep = _sdpa_masks()["bool"]

    def two(q, k, v, q64, k64, v64):
        plain = torch.softmax(q @ k.mT * D ** -0.5, -1) @ v
        return plain, F.scaled_dot_product_attention(q64, k64, v64, attn_mask=keep)

    args = [torch.randn(B, H, S, D) for _ in range(3)] + [torch.randn(B, H, S, D, dtype=torch.float64) for _ in range(3)]
    aten_gm, report, n_fused = backend.fuse(two, args)
    assert n_fused == 1 and "does not fuse" in " ".join(report.notes) and "float64" in " ".join(report.notes)
    assert any("scaled_dot_product" in str(n.target) for n in aten_gm.graph.nodes)
    plain, masked = aten_gm(*args)
    assert rel_err(masked, F.scaled_dot_product_attention(*args[3:], attn_mask=keep)) < 1e-12
    assert rel_err(plain, torch.softmax(args[0] @ args[1].mT * D ** -0.5, -1) @ args[2]) < TOL


def test_a_transformer_reports_the_attention_calls_it_leaves_to_pytorch():
    """nn.Transformer with a causal target mask and padding: its encoder's self-attention and the decoder's
    cross-attention (masked) fuse; the decoder's self-attention, told tgt_is_causal, calls SDPA's kernel with
    is_causal and no mask inside nn.MultiheadAttention, and stays a call: the report counts those calls."""
    import torch.nn as nn

    torch.manual_seed(0)
    model = nn.Transformer(d_model=C, nhead=H, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=64,
                           dropout=0.0, batch_first=True)
    src, tgt = torch.randn(B, S, C), torch.randn(B, S - 3, C)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, -5:] = True
    kwargs = dict(tgt_mask=nn.Transformer.generate_square_subsequent_mask(S - 3), tgt_is_causal=True,
                  src_key_padding_mask=pad, memory_key_padding_mask=pad)
    report = flashlight.explain(lambda s, t: model(s, t, **kwargs), src, tgt)
    assert len(report.regions) == 3 and all(r.fused for r in report.regions), str(report)
    assert any(n.startswith("2 scaled_dot_product_attention call(s)") for n in report.notes), str(report)


@pytest.mark.parametrize("mask", ["key_padding_mask", "float causal attn_mask", "bool attn_mask",
                                  "float causal and padding"])
def test_multihead_attention_module_trains_fused(mask):
    """nn.MultiheadAttention as nn.TransformerEncoderLayer calls it (need_weights=False): its
    F.multi_head_attention_forward calls PyTorch's SDPA kernel with the merged mask inside a Python-level
    torch function, where the call itself is not seen; the kernel op is traced as the math instead (with its
    output's layout, which the reshapes after it rely on) and fuses forward and backward. The packed
    in-projection's Q·Kᵀ is not reported as a region of its own."""
    import torch.nn as nn

    torch.manual_seed(0)
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, -5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(S)
    kwargs = {"key_padding_mask": {"key_padding_mask": pad}, "float causal attn_mask": {"attn_mask": causal},
              "bool attn_mask": {"attn_mask": causal.isinf()},
              # merged by nn.MultiheadAttention into a new [B·H, S, S] mask every call: classified every call
              "float causal and padding": {"attn_mask": causal,
                                           "key_padding_mask": torch.zeros(B, S).masked_fill(pad, float("-inf"))}}[mask]
    mha = nn.MultiheadAttention(C, H, batch_first=True)
    ref = copy.deepcopy(mha).double()
    x = torch.randn(B, S, C, requires_grad=True)
    g = torch.randn(B, S, C)

    def attn(x):
        return mha(x, x, x, need_weights=False, **kwargs)[0]

    report = flashlight.explain(attn, x)
    assert len(report.regions) == 1 and report.regions[0].fused and report.regions[0].backward_fused, str(report)
    torch._dynamo.reset()
    before = flashlight.counters["fused_launches"], flashlight.counters["fused_backward_launches"]
    classified = flashlight.counters["classifications"]
    out = flashlight.compile(attn, choose_faster=False)(x)
    out.backward(g)
    assert (flashlight.counters["fused_launches"], flashlight.counters["fused_backward_launches"]) == \
        (before[0] + 1, before[1] + 1)
    assert flashlight.counters["classifications"] > classified, mask   # the mask's tiles were classified
    x64 = x.detach().double().requires_grad_()
    ref_kwargs = {k: v.double() if v.is_floating_point() else v for k, v in kwargs.items()}
    ref_out = ref(x64, x64, x64, need_weights=False, **ref_kwargs)[0]
    ref_out.backward(g.double())
    assert rel_err(out, ref_out) < TOL and rel_err(x.grad, x64.grad) < TOL
    for p, q in zip(mha.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < TOL
