"""Causal attention with tanh soft-capping of the scores (Gemma 2 / Grok): s -> cap * tanh(s / cap)."""
import torch
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import Unsupported, block_mask, causal_density, dense_flops, qkv

DESCRIPTION = "causal attention with tanh soft-capping of the scores"
PARAMS = {"cap": 20.0}
INPUTS = ("q", "k", "v")


def reference(q, k, v, cap=20.0):
    Sq, Sk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(-2, -1) * scale
    s = torch.tanh(s / cap) * cap
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


def flex_prepare(inputs, cap=20.0):
    q, k = inputs["q"], inputs["k"]
    return block_mask(causal_mask, None, None, q.shape[-2], k.shape[-2], q.device)


def flex(inputs, bm, attention=flex_attention, cap=20.0):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]

    def softcap(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return attention(q, k, v, score_mod=softcap, block_mask=bm)


def sdpa(inputs, prep, cap=20.0):
    raise Unsupported("softcap: tanh soft-capping transforms the scores; SDPA takes only an additive mask")
