"""Vanilla (full, non-causal) softmax attention."""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import dense_flops, qkv

DESCRIPTION = "softmax(Q Kᵀ / sqrt(D)) V, no mask"
PARAMS = {}
INPUTS = ("q", "k", "v")


def reference(q, k, v):
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(-2, -1) * scale
    p = torch.softmax(s, dim=-1)
    return p @ v


def make_inputs(shape, dtype, device, requires_grad=False, seed=0):
    return qkv(shape, dtype, device, requires_grad, seed)


def flops(shape):
    return dense_flops(shape)


def flex(inputs, prep, attention=flex_attention):
    return attention(inputs["q"], inputs["k"], inputs["v"])


def sdpa(inputs, prep):
    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"])
