"""Causal softmax attention (top-left aligned: query i sees keys j <= i)."""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import block_mask, causal_density, dense_flops, qkv

DESCRIPTION = "causal softmax attention"
PARAMS = {}
INPUTS = ("q", "k", "v")


def reference(q, k, v):
    Sq, Sk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(-2, -1) * scale
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    s = s.masked_fill(j > i, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def make_inputs(shape, dtype, device, requires_grad=False, seed=0):
    return qkv(shape, dtype, device, requires_grad, seed)


def flops(shape):
    return dense_flops(shape, causal_density(shape.Sq, shape.Sk))


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_prepare(inputs):
    q, k = inputs["q"], inputs["k"]
    return block_mask(causal_mask, None, None, q.shape[-2], k.shape[-2], q.device)


def flex(inputs, bm, attention=flex_attention):
    return attention(inputs["q"], inputs["k"], inputs["v"], block_mask=bm)


def sdpa(inputs, prep):
    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], is_causal=True)
