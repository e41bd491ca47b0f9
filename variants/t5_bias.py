"""T5 relative position bias: a learned table [buckets, H] indexed by the bucketed distance j - i
(exact buckets for small distances, logarithmic ones up to max_distance; bidirectional, as in
T5's encoder). The bias is gathered per score element inside the function."""
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import dense_flops, generator, qkv

DESCRIPTION = "T5 relative position bias: learned table indexed by bucketed distance (gather)"
PARAMS = {"buckets": 32, "max_distance": 128}
INPUTS = ("q", "k", "v", "table")
LEARNABLE = ("q", "k", "v", "table")
SDPA_NOTE = "exact, but materialises an H×Sq×Sk float bias as attn_mask"


def bucket(rel, buckets=32, max_distance=128):
    """T5's bidirectional bucket of a relative distance (an int tensor of any shape)."""
    half = buckets // 2
    exact = half // 2
    n = rel.abs()
    log_ratio = torch.log(n.float() / exact) / math.log(max_distance / exact)
    large = (exact + (log_ratio * (half - exact)).long()).clamp_max(half - 1)
    return (rel > 0).long() * half + torch.where(n < exact, n, large)


def reference(q, k, v, table, buckets=32, max_distance=128):
    scale = q.shape[-1] ** -0.5
    i = torch.arange(q.shape[-2], device=q.device)[:, None]
    j = torch.arange(k.shape[-2], device=q.device)[None, :]
    bias = table[bucket(j - i, buckets, max_distance)].permute(2, 0, 1)   # [H, Sq, Sk]
    s = q @ k.transpose(-2, -1) * scale + bias
    return torch.softmax(s, dim=-1) @ v


def make_inputs(shape, dtype, device, requires_grad=False, seed=0):
    inputs = qkv(shape, dtype, device, requires_grad, seed)
    table = torch.randn(shape.buckets, shape.H, generator=generator(seed + 5), dtype=torch.float32)
    inputs["table"] = table.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return inputs


def flops(shape):
    return dense_flops(shape)


def flex_prepare(inputs, buckets=32, max_distance=128):
    """The bucket of every distance j - i, once: index d = j - i + Sq - 1 of a [Sq + Sk - 1] int table."""
    q, k = inputs["q"], inputs["k"]
    Sq, Sk = q.shape[-2], k.shape[-2]
    rel = torch.arange(-(Sq - 1), Sk, device=q.device)
    return bucket(rel, buckets, max_distance)


def flex(inputs, dist_bucket, attention=flex_attention, buckets=32, max_distance=128):
    """The idiomatic form: a per-distance bias [H, Sq + Sk - 1] (gathered from the learnable table in the call,
    so gradients reach it; a few thousand elements) read in score_mod by one index."""
    q, k, v, table = inputs["q"], inputs["k"], inputs["v"], inputs["table"]
    dist_bias = table.t()[:, dist_bucket].contiguous()      # [H, Sq + Sk - 1]
    off = q.shape[-2] - 1

    def t5(score, b, h, q_idx, kv_idx):
        return score + dist_bias[h, kv_idx - q_idx + off]

    return attention(q, k, v, score_mod=t5)


def sdpa_prepare(inputs, buckets=32, max_distance=128):
    """The Sq×Sk bucket index, once (it depends on positions only)."""
    q, k = inputs["q"], inputs["k"]
    i = torch.arange(q.shape[-2], device=q.device)[:, None]
    j = torch.arange(k.shape[-2], device=q.device)[None, :]
    return bucket(j - i, buckets, max_distance)


def sdpa(inputs, idx, buckets=32, max_distance=128):
    """SDPA takes the bias only dense: an H×Sq×Sk tensor gathered from the learnable table in the call
    (contiguous, so SDPA's fused kernels accept it)."""
    q, k, v, table = inputs["q"], inputs["k"], inputs["v"], inputs["table"]
    bias = table.t().to(q.dtype)[:, idx]                      # [H, Sq, Sk], contiguous
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
