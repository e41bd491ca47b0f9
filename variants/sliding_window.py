"""Causal sliding-window attention: query i sees keys i - window < j <= i."""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import cached_block_mask, dense_flops, mask_density, qkv

DESCRIPTION = "causal sliding-window (local) attention"
PARAMS = {"window": 1024}
INPUTS = ("q", "k", "v")
SDPA_NOTE = "exact, but materialises an Sq×Sk boolean attn_mask"


def reference(q, k, v, window=1024):
    Sq, Sk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(-2, -1) * scale
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    keep = (j <= i) & (i - j < window)
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def make_inputs(shape, dtype, device, requires_grad=False, seed=0):
    return qkv(shape, dtype, device, requires_grad, seed)


def flops(shape):
    w = shape.window
    return dense_flops(shape, mask_density(lambda i, j: (j <= i) & (i - j < w), shape.Sq, shape.Sk))


def flex(inputs, attention=flex_attention, window=1024):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    bm = cached_block_mask(("sliding_window", window), sliding, None, None, q.shape[-2], k.shape[-2], q.device)
    return attention(q, k, v, block_mask=bm)


def sdpa(inputs, window=1024):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    i = torch.arange(q.shape[-2], device=q.device)[:, None]
    j = torch.arange(k.shape[-2], device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (i - j < window))
