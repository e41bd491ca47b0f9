"""Causal grouped-query attention: K/V have H / groups heads, expanded with repeat_interleave."""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import block_mask, causal_density, dense_flops, qkv

DESCRIPTION = "causal GQA: `groups` query heads share each K/V head"
PARAMS = {"groups": 4}
INPUTS = ("q", "k", "v")


def reference(q, k, v, groups=4):
    Sq, Sk = q.shape[-2], k.shape[-2]
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(-2, -1) * scale
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    s = s.masked_fill(j > i, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def check(shape):
    if shape.H % shape.groups:
        raise ValueError(f"gqa: H={shape.H} is not divisible by groups={shape.groups}")


def make_inputs(shape, dtype, device, requires_grad=False, seed=0):
    check(shape)
    return qkv(shape, dtype, device, requires_grad, seed, kv_heads=shape.H // shape.groups)


def flops(shape):
    return dense_flops(shape, causal_density(shape.Sq, shape.Sk))


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_prepare(inputs, groups=4):
    q, k = inputs["q"], inputs["k"]
    return block_mask(causal_mask, None, None, q.shape[-2], k.shape[-2], q.device)


def flex(inputs, bm, attention=flex_attention, groups=4):
    return attention(inputs["q"], inputs["k"], inputs["v"], block_mask=bm, enable_gqa=True)


def sdpa(inputs, prep, groups=4):
    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], is_causal=True, enable_gqa=True)
