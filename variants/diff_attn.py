"""Differential attention (Ye et al., 2024): (softmax(Q1 K1ᵀ s) − λ·softmax(Q2 K2ᵀ s)) V.
λ is a learnable scalar tensor; at the paper's shape D = 64 and Dv = 2·D = 128."""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import dense_flops, generator, randn

DESCRIPTION = "differential attention: two softmaxes subtracted (learnable λ), one ·V"
PARAMS = {}
INPUTS = ("q1", "k1", "q2", "k2", "v", "lam")
LEARNABLE = ("q1", "k1", "q2", "k2", "v", "lam")
SDPA_NOTE = "exact by linearity: two SDPA calls, sdpa(q1,k1,v) − λ·sdpa(q2,k2,v)"


def default_dv(D):
    return 2 * D


def reference(q1, k1, q2, k2, v, lam):
    s = q1.shape[-1] ** -0.5
    p = torch.softmax(q1 @ k1.mT * s, -1) - lam * torch.softmax(q2 @ k2.mT * s, -1)
    return p @ v


def make_inputs(shape, dtype, device, requires_grad=False, seed=0):
    g = generator(seed)
    B, H, Sq, Sk, D = shape.B, shape.H, shape.Sq, shape.Sk, shape.D
    out = {}
    for name, S in (("q1", Sq), ("k1", Sk), ("q2", Sq), ("k2", Sk)):
        out[name] = randn(g, (B, H, S, D), dtype, device, requires_grad)
    out["v"] = randn(g, (B, H, Sk, shape.dv), dtype, device, requires_grad)
    lam = 0.5 + 0.1 * torch.randn((), generator=g)
    out["lam"] = lam.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return out


def flops(shape):
    return dense_flops(shape, n_scores=2)


def flex(inputs, prep, attention=flex_attention):
    x = inputs
    return attention(x["q1"], x["k1"], x["v"]) - x["lam"] * attention(x["q2"], x["k2"], x["v"])


def sdpa(inputs, prep):
    x = inputs
    a1 = F.scaled_dot_product_attention(x["q1"], x["k1"], x["v"])
    a2 = F.scaled_dot_product_attention(x["q2"], x["k2"], x["v"])
    return a1 - x["lam"] * a2
