"""Causal attention with ALiBi: score += slope_h * (j - i), slope_h = 2^(-8 (h+1) / H)."""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import block_mask, causal_density, dense_flops, qkv

DESCRIPTION = "causal attention + ALiBi linear position bias per head"
PARAMS = {}
INPUTS = ("q", "k", "v")
SDPA_NOTE = "exact, but materialises an H×Sq×Sk float bias as attn_mask"


def slopes(H, device):
    return torch.exp2(-8.0 * torch.arange(1, H + 1, device=device, dtype=torch.float32) / H)


def reference(q, k, v):
    H, Sq, Sk = q.shape[-3], q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(-2, -1) * scale
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    m = slopes(H, q.device)[:, None, None]
    s = s + m * (j - i)
    s = s.masked_fill(j > i, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def make_inputs(shape, dtype, device, requires_grad=False, seed=0):
    return qkv(shape, dtype, device, requires_grad, seed)


def flops(shape):
    return dense_flops(shape, causal_density(shape.Sq, shape.Sk))


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_prepare(inputs):
    """The causal block mask and the per-head slopes, built once."""
    q, k = inputs["q"], inputs["k"]
    return block_mask(causal_mask, None, None, q.shape[-2], k.shape[-2], q.device), slopes(q.shape[-3], q.device)


def flex(inputs, prep, attention=flex_attention):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    bm, m = prep

    def alibi(score, b, h, q_idx, kv_idx):
        return score + m[h] * (kv_idx - q_idx)

    return attention(q, k, v, score_mod=alibi, block_mask=bm)


def sdpa_prepare(inputs):
    """SDPA takes ALiBi only as a dense additive mask: an H×Sq×Sk bias (−inf above the diagonal), built once."""
    q, k = inputs["q"], inputs["k"]
    Sq, Sk = q.shape[-2], k.shape[-2]
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    bias = slopes(q.shape[-3], q.device)[:, None, None] * (j - i)
    return bias.masked_fill(j > i, float("-inf")).to(q.dtype)


def sdpa(inputs, bias):
    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], attn_mask=bias)
