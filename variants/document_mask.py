"""Document masking (packed sequences): query i sees key j iff both belong to the same document.
Document ids are a runtime tensor [B, S]; the mask is formed inside the function."""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from flashlight.harness.variant_registry import block_mask, dense_flops, generator, qkv

DESCRIPTION = "packed documents: attend only within the same document (runtime doc ids)"
PARAMS = {"docs": 8, "equal": True}
INPUTS = ("q", "k", "v", "doc_ids")
MASK_INPUTS = ("doc_ids",)  # new every batch in training: the runner also reports prep + call (per_batch_ms)
SDPA_NOTE = "exact, but materialises a B×Sq×Sk boolean attn_mask"


def reference(q, k, v, doc_ids, docs=8, equal=True):
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(-2, -1) * scale
    same_doc = doc_ids[:, None, :, None] == doc_ids[:, None, None, :]
    s = s.masked_fill(~same_doc, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def document_ids(B, S, docs, equal, seed):
    """[B, S] int64, non-decreasing; `docs` documents of equal length or random lengths (each >= 1)."""
    if equal:
        return (torch.arange(S) * docs // S).expand(B, S).contiguous()
    g = generator(seed + 1)
    ids = []
    for _ in range(B):
        cuts = torch.randperm(S - 1, generator=g)[: docs - 1] + 1
        starts = torch.zeros(S, dtype=torch.int64)
        starts[cuts] = 1
        ids.append(torch.cumsum(starts, 0))
    return torch.stack(ids)


def check(shape):
    if shape.Sq != shape.Sk:
        raise ValueError("document_mask needs Sq == Sk (one doc-id sequence for queries and keys)")
    if not 1 <= shape.docs <= shape.Sq:
        raise ValueError(f"document_mask needs 1 <= docs <= S, got docs={shape.docs}")


def make_inputs(shape, dtype, device, requires_grad=False, seed=0):
    check(shape)
    inputs = qkv(shape, dtype, device, requires_grad, seed)
    inputs["doc_ids"] = document_ids(shape.B, shape.Sq, shape.docs, shape.equal, seed).to(device)
    return inputs


def flops(shape):
    ids = document_ids(shape.B, shape.Sq, shape.docs, shape.equal, seed=0)
    kept = sum(float((torch.bincount(row).double() ** 2).sum()) for row in ids)
    return dense_flops(shape, kept / (shape.B * shape.Sq * shape.Sk))


def flex_prepare(inputs, docs=8, equal=True):
    """The block mask of this batch's documents (one per batch in training; heads share it), built with a
    compiled create_block_mask on CUDA as the FlexAttention docs advise for masks rebuilt every batch."""
    ids, S = inputs["doc_ids"], inputs["q"].shape[-2]

    def same_doc(b, h, q_idx, kv_idx):
        return ids[b, q_idx] == ids[b, kv_idx]

    return block_mask(same_doc, ids.shape[0], None, S, S, ids.device, compiled=True)


def flex(inputs, bm, attention=flex_attention, docs=8, equal=True):
    return attention(inputs["q"], inputs["k"], inputs["v"], block_mask=bm)


def sdpa_prepare(inputs, docs=8, equal=True):
    """This batch's B×1×S×S boolean mask, materialised (once per batch in training)."""
    ids = inputs["doc_ids"]
    return ids[:, None, :, None] == ids[:, None, None, :]


def sdpa(inputs, mask, docs=8, equal=True):
    return F.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], attn_mask=mask)
