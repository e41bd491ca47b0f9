"""Document masking (packed sequences): query i sees key j iff both belong to the same document.
Document ids are a runtime tensor [B, S]; the mask is formed inside the function."""
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from flashlight.harness.variant_registry import dense_flops, generator, qkv

DESCRIPTION = "packed documents: attend only within the same document (runtime doc ids)"
PARAMS = {"docs": 8, "equal": True}
INPUTS = ("q", "k", "v", "doc_ids")
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


_bm_cache = {}


def _block_mask(doc_ids, H, S):
    """Data-dependent block mask, rebuilt only when doc_ids changes (as a FlexAttention user would)."""
    key = (doc_ids.data_ptr(), doc_ids._version, tuple(doc_ids.shape), H, str(doc_ids.device))
    if key not in _bm_cache:

        def same_doc(b, h, q_idx, kv_idx):
            return doc_ids[b, q_idx] == doc_ids[b, kv_idx]

        _bm_cache.clear()
        _bm_cache[key] = create_block_mask(same_doc, doc_ids.shape[0], None, S, S, device=doc_ids.device)
    return _bm_cache[key]


def flex(inputs, attention=flex_attention, docs=8, equal=True):
    q, k, v, ids = inputs["q"], inputs["k"], inputs["v"], inputs["doc_ids"]
    return attention(q, k, v, block_mask=_block_mask(ids, q.shape[1], q.shape[-2]))


def sdpa(inputs, docs=8, equal=True):
    q, k, v, ids = inputs["q"], inputs["k"], inputs["v"], inputs["doc_ids"]
    mask = ids[:, None, :, None] == ids[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
