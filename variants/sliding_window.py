"""Causal sliding-window attention: query i sees keys i - window < j <= i."""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import block_mask, dense_flops, mask_density, qkv

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


def flex_prepare(inputs, window=1024):
    q, k = inputs["q"], inputs["k"]

    def sliding(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return block_mask(sliding, None, None, q.shape[-2], k.shape[-2], q.device)


def flex(inputs, bm, attention=flex_attention, window=1024):
    return attention(inputs["q"], inputs["k"], inputs["v"], block_mask=bm)


def sdpa_prepare(inputs, window=1024):
    """The Sq×Sk boolean mask, materialised once."""
    q, k = inputs["q"], inputs["k"]
    i = torch.arange(q.shape[-2], device=q.device)[:, None]
    j = torch.arange(k.shape[-2], device=q.device)[None, :]
    return (j <= i) & (i - j < window)


def sdpa(inputs, mask, window=1024):
    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], attn_mask=mask)
