"""AlphaFold 2 Evoformer MSA row attention with pair bias and a sigmoid output gate.
q, k, v, gate: [B, N, H, S, D] (N = MSA depth); pair bias: [B, 1, H, S, S], broadcast over N."""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import dense_flops, generator, randn

DESCRIPTION = "Evoformer MSA row attention: pair bias broadcast over the MSA dim, sigmoid gate"
PARAMS = {"N": 16}
INPUTS = ("q", "k", "v", "bias", "gate")
LEARNABLE = ("q", "k", "v", "bias", "gate")
SDPA_NOTE = "exact: pair bias passed as a broadcast float attn_mask, gate applied after"


def reference(q, k, v, bias, gate, N=16):
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(-1, -2) * scale + bias
    o = torch.softmax(s, dim=-1) @ v
    return torch.sigmoid(gate) * o


def make_inputs(shape, dtype, device, requires_grad=False, seed=0):
    g = generator(seed)
    B, N, H, Sq, Sk, D = shape.B, shape.N, shape.H, shape.Sq, shape.Sk, shape.D
    return {
        "q": randn(g, (B, N, H, Sq, D), dtype, device, requires_grad),
        "k": randn(g, (B, N, H, Sk, D), dtype, device, requires_grad),
        "v": randn(g, (B, N, H, Sk, shape.dv), dtype, device, requires_grad),
        "bias": randn(g, (B, 1, H, Sq, Sk), dtype, device, requires_grad),
        "gate": randn(g, (B, N, H, Sq, shape.dv), dtype, device, requires_grad),
    }


def flops(shape):
    return dense_flops(shape, batch=shape.N)


def flex(inputs, prep, attention=flex_attention, N=16):
    q, k, v, bias, gate = (inputs[n] for n in INPUTS)
    B, n, H, Sq, D = q.shape
    Sk, Dv = k.shape[-2], v.shape[-1]

    def pair_bias(score, b, h, q_idx, kv_idx):
        return score + bias[b // n, 0, h, q_idx, kv_idx]

    o = attention(q.reshape(B * n, H, Sq, D), k.reshape(B * n, H, Sk, D), v.reshape(B * n, H, Sk, Dv),
                  score_mod=pair_bias)
    return torch.sigmoid(gate) * o.view(B, n, H, Sq, Dv)


def sdpa(inputs, prep, N=16):
    q, k, v, bias, gate = (inputs[n] for n in INPUTS)
    return torch.sigmoid(gate) * F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
