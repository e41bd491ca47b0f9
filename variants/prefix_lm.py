"""Prefix-LM attention: bidirectional over the first `prefix` keys, causal after (prefix=None: Sk/4)."""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import block_mask, dense_flops, mask_density, qkv

DESCRIPTION = "prefix-LM: full attention to a prefix, causal elsewhere"
PARAMS = {"prefix": None}
INPUTS = ("q", "k", "v")
SDPA_NOTE = "exact, but materialises an Sq×Sk boolean attn_mask"


def _prefix(prefix, Sk):
    return Sk // 4 if prefix is None else int(prefix)


def reference(q, k, v, prefix=None):
    Sq, Sk = q.shape[-2], k.shape[-2]
    p = _prefix(prefix, Sk)
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(-2, -1) * scale
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    s = torch.where((j <= i) | (j < p), s, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def make_inputs(shape, dtype, device, requires_grad=False, seed=0):
    return qkv(shape, dtype, device, requires_grad, seed)


def flops(shape):
    p = _prefix(shape.prefix, shape.Sk)
    return dense_flops(shape, mask_density(lambda i, j: (j <= i) | (j < p), shape.Sq, shape.Sk))


def flex_prepare(inputs, prefix=None):
    q, k = inputs["q"], inputs["k"]
    p = _prefix(prefix, k.shape[-2])

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < p)

    return block_mask(prefix_lm, None, None, q.shape[-2], k.shape[-2], q.device)


def flex(inputs, bm, attention=flex_attention, prefix=None):
    return attention(inputs["q"], inputs["k"], inputs["v"], block_mask=bm)


def sdpa_prepare(inputs, prefix=None):
    """The Sq×Sk boolean mask, materialised once."""
    q, k = inputs["q"], inputs["k"]
    p = _prefix(prefix, k.shape[-2])
    i = torch.arange(q.shape[-2], device=q.device)[:, None]
    j = torch.arange(k.shape[-2], device=q.device)[None, :]
    return (j <= i) | (j < p)


def sdpa(inputs, mask, prefix=None):
    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], attn_mask=mask)
