"""Causal attention with a learnable sink logit per head (as in gpt-oss / StreamingLLM's sink tokens):
the sink joins each row's softmax as one extra column, then is sliced off, so rows may give weight to
"nothing". Written the plain way: concatenate, softmax, slice."""
import torch
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import Unsupported, block_mask, causal_density, dense_flops, generator, qkv

DESCRIPTION = "causal attention + one learnable sink logit per head (concatenated, softmaxed, sliced off)"
PARAMS = {}
INPUTS = ("q", "k", "v", "sink")
LEARNABLE = ("q", "k", "v", "sink")


def reference(q, k, v, sink):
    B, H, Sq, D = q.shape
    Sk = k.shape[-2]
    s = q @ k.transpose(-2, -1) * D ** -0.5
    i = torch.arange(Sq, device=q.device)[:, None]
    j = torch.arange(Sk, device=q.device)[None, :]
    s = s.masked_fill(j > i, float("-inf"))
    logits = torch.cat([s, sink.view(1, H, 1, 1).expand(B, H, Sq, 1)], dim=-1)
    return torch.softmax(logits, dim=-1)[..., :Sk] @ v


def make_inputs(shape, dtype, device, requires_grad=False, seed=0):
    inputs = qkv(shape, dtype, device, requires_grad, seed)
    sink = torch.randn(shape.H, generator=generator(seed + 7), dtype=torch.float32) + 1.0
    inputs["sink"] = sink.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return inputs


def flops(shape):
    return dense_flops(shape, causal_density(shape.Sq, shape.Sk))


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def flex_prepare(inputs):
    q, k = inputs["q"], inputs["k"]
    return block_mask(causal_mask, None, None, q.shape[-2], k.shape[-2], q.device)


def flex(inputs, bm, attention=flex_attention):
    # softmax over [scores, sink] = softmax(scores) · sigmoid(lse - sink), lse the scores' log-sum-exp
    q, k, v, sink = inputs["q"], inputs["k"], inputs["v"], inputs["sink"]
    out, lse = attention(q, k, v, block_mask=bm, return_lse=True)
    return out * torch.sigmoid(lse - sink.view(1, -1, 1)).unsqueeze(-1).to(out.dtype)


def sdpa(inputs, prep):
    raise Unsupported("sinks: SDPA cannot add a per-head extra logit to the softmax")
