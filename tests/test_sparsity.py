"""Tile classification: key tiles a -inf mask removes are skipped, tiles it keeps whole drop the mask.

Small tiles (16×16) on shapes that are not multiples of them give every kind of tile (empty, full,
partial, ragged edge) in a few key blocks. Each case is checked against float64 eager math and
against the same kernel with tile skipping off, on fresh random data.
"""
import os

import pytest
import torch

import flashlight
from flashlight.compiler.codegen import _forward_copies, _prune

assert os.environ.get("TRITON_INTERPRET") == "1"
TOL = 1e-4
SMALL_TILES = {"BLOCK_M": 16, "BLOCK_N": 16}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), "NaN pattern differs from eager"
    out, ref = out.nan_to_num(), ref.nan_to_num()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def positions(q, k):
    return torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :]


def doc_mask(q, k, v, ids):
    s = q @ k.mT * q.shape[-1] ** -0.5
    same = ids[:, None, :, None] == ids[:, None, None, :]
    return s.masked_fill(~same, float("-inf")).softmax(-1) @ v


def doc_causal(q, k, v, ids):
    i, j = positions(q, k)
    s = (q @ k.mT).masked_fill(j > i, float("-inf"))
    s = s.masked_fill(ids[:, None, :, None] != ids[:, None, None, :], float("-inf"))
    return s.softmax(-1) @ v


def key_padding(q, k, v, pad):
    s = q @ k.mT
    return torch.where(pad[:, None, None, :], float("-inf"), s).softmax(-1) @ v


def head_windows(q, k, v, win):
    i, j = positions(q, k)
    far = (i - j).abs() > win[None, :, None, None]
    return torch.softmax((q @ k.mT).masked_fill(far, float("-inf")), -1) @ v


def causal(q, k, v):
    i, j = positions(q, k)
    return torch.softmax((q @ k.mT).masked_fill(j > i, float("-inf")), -1) @ v


def window_causal(q, k, v):
    i, j = positions(q, k)
    keep = (j <= i) & (i - j < 25)
    return torch.where(keep, q @ k.mT, float("-inf")).softmax(-1) @ v


def prefix_lm(q, k, v):
    i, j = positions(q, k)
    return torch.softmax((q @ k.mT).masked_fill((j > i) & (j >= 37), float("-inf")), -1) @ v


def sorted_docs(B, S, g):
    """Random document lengths, different in every batch row."""
    rows = []
    for _ in range(B):
        cuts = torch.randperm(S - 1, generator=g)[:4] + 1
        starts = torch.zeros(S, dtype=torch.int64)
        starts[cuts] = 1
        rows.append(torch.cumsum(starts, 0))
    return torch.stack(rows)


def case(name, g):
    B, H, S, D = 2, 2, 100, 16
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    if name == "documents":
        return doc_mask, (q, k, v, sorted_docs(B, S, g))
    if name == "unsorted documents":   # full tiles are scattered: no single run of them
        return doc_mask, (q, k, v, torch.randint(0, 2, (B, S), generator=g))
    if name == "documents and causal":
        return doc_causal, (q, k, v, sorted_docs(B, S, g))
    if name == "key padding":
        lengths = torch.randint(S // 3, S, (B,), generator=g)
        return key_padding, (q, k, v, torch.arange(S)[None, :] >= lengths[:, None])
    if name == "per-head windows":
        return head_windows, (q, k, v, torch.tensor([7, 200]))
    return {"causal": causal, "window": window_causal, "prefix": prefix_lm}[name], (q, k, v)


DATA = ["documents", "unsorted documents", "documents and causal", "key padding", "per-head windows"]
AFFINE = ["causal", "window", "prefix"]


@pytest.mark.parametrize("name", DATA + AFFINE)
def test_tile_classes_give_the_eager_result(name):
    g = torch.Generator().manual_seed(torch.randint(0, 10**6, ()).item())
    fn, args = case(name, g)
    report = flashlight.explain(fn, *args)
    src = report.regions[0].kernel_source
    # data masks are classified by their own kernel, position masks by index arithmetic in the kernel
    assert ("def classify_tiles_" in src) == (name in DATA), src
    assert "mask dropped: the tile is kept whole" in src
    outs = {}
    for sparse in (True, False):
        torch._dynamo.reset()
        before = flashlight.counters["fused_launches"]
        outs[sparse] = flashlight.compile(fn, inductor=False, config=SMALL_TILES, block_sparse=sparse)(*args)
        assert flashlight.counters["fused_launches"] > before
    ref = fn(*[a.double() if a.is_floating_point() else a for a in args])
    assert rel_err(outs[True], ref) < TOL
    assert rel_err(outs[False], ref) < TOL


def test_fully_masked_rows_are_nan_with_tile_skipping():
    # queries of an all-padding batch row see no key: eager gives NaN, so must the kernel
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 1, 40, 16, generator=g) for _ in range(3))
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1] = True
    torch._dynamo.reset()
    out = flashlight.compile(key_padding, inductor=False, config=SMALL_TILES)(q, k, v, pad)
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    assert rel_err(out, key_padding(q.double(), k.double(), v.double(), pad)) < TOL


def test_prune_keeps_what_the_carried_values_need():
    lines = ["a = x + 1", "b = a * 2  # used", "c = y", "# heading of nothing", "# scores", "acc = acc + b"]
    assert _prune(lines, {"acc"}) == ["a = x + 1", "b = a * 2  # used", "# scores", "acc = acc + b"]


def test_classification_is_reused_only_while_its_inputs_are_unchanged():
    # document ids change rarely (once per batch), queries every call: the tile table follows the ids
    g = torch.Generator().manual_seed(torch.randint(0, 10**6, ()).item())
    B, H, S, D = 2, 2, 64, 16
    torch._dynamo.reset()
    fused = flashlight.compile(doc_mask, inductor=False, config=SMALL_TILES)

    def check(ids, reused):
        q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
        before = dict(flashlight.counters)
        out = fused(q, k, v, ids)
        assert rel_err(out, doc_mask(q.double(), k.double(), v.double(), ids)) < TOL
        assert flashlight.counters["classifications_reused"] - before.get("classifications_reused", 0) == reused
        assert flashlight.counters["classifications"] - before.get("classifications", 0) == 1 - reused

    ids = sorted_docs(B, S, g)
    check(ids, reused=0)
    check(ids, reused=1)                      # same tensor, new q/k/v
    ids[:, S // 2:] += 7                      # in place: new documents start mid-sequence
    check(ids, reused=0)
    check(ids, reused=1)
    check(ids.clone(), reused=0)              # equal contents, another tensor: not proven the same
    del ids
    check(torch.zeros(B, S, dtype=torch.int64), reused=0)   # may reuse the freed memory: must not match
    with torch.inference_mode():
        frozen = sorted_docs(B, S, g)         # inference tensors keep no version counter
    check(frozen, reused=0)
    check(frozen, reused=0)
    # in CUDA graphs (mode="reduce-overhead") the classification is part of the graph: never kept
    torch._dynamo.reset()
    fused = flashlight.compile(doc_mask, config=SMALL_TILES, mode="reduce-overhead")
    check(ids := sorted_docs(B, S, g), reused=0)
    check(ids, reused=0)


def test_copies_are_forwarded_but_not_values_that_differ_between_loop_bodies():
    lines = ["t_view = t_bmm  # aten.view", "t_view2 = t_view", "t_where = t_view2  # mask dropped",
             "t_where = tl.where(t_gt, float(\"-inf\"), t_view2)", "t_exp = tl.exp(t_where - t_view2)",
             "m_a = m_new_a"]
    assert _forward_copies(lines) == [
        "t_where = t_bmm  # mask dropped", "t_where = tl.where(t_gt, float(\"-inf\"), t_bmm)",
        "t_exp = tl.exp(t_where - t_bmm)", "m_a = m_new_a"]


# ---- masks added to the scores, as model files write them ------------------------------------------
F32_MIN = torch.finfo(torch.float32).min


def added(q, k, v, mask):
    return torch.softmax(q @ k.mT * q.shape[-1] ** -0.5 + mask, -1) @ v


def bert_padding(q, k, v, keep):   # BERT's extended mask, built from a float padding mask in the function
    return torch.softmax(q @ k.mT + (1.0 - keep[:, None, None, :]) * F32_MIN, -1) @ v


def where_built(q, k, v):          # a causal mask built by where from positions, then added
    i, j = positions(q, k)
    return torch.softmax(q @ k.mT + torch.where(j > i, F32_MIN, 0.0), -1) @ v


def square_subsequent(q, k, v):    # nn.Transformer.generate_square_subsequent_mask: triu of a full -inf
    mask = torch.triu(torch.full((q.shape[-2], k.shape[-2]), float("-inf")), diagonal=1)
    return torch.softmax(q @ k.mT + mask, -1) @ v


def cast_mask(q, k, v, keep):      # a boolean mask cast to numbers and scaled: (~keep).float() * finfo.min
    return torch.softmax(q @ k.mT + (~keep).float() * F32_MIN, -1) @ v


def sigmoid_added(q, k, v, mask):  # sigmoid attention: no row sum, a masked score is 0 on its own
    return torch.sigmoid(q @ k.mT * q.shape[-1] ** -0.5 + mask) @ v


class BufferSlice(torch.nn.Module):   # GPT-2's registered buffer, sliced to the sequence, as an additive mask
    def __init__(self, n=128):
        super().__init__()
        keep = torch.ones(n, n, dtype=torch.bool).tril()
        self.register_buffer("mask", torch.zeros(1, 1, n, n).masked_fill(~keep, F32_MIN))

    def forward(self, q, k, v):
        T = q.shape[-2]
        return torch.softmax(q @ k.mT + self.mask[:, :, :T, :T], -1) @ v


def hf_mask(B, S, fill, pad_from=None, window=None):
    """transformers' eager mask: [B, 1, S, S] of 0 / fill, causal (a sliding window), left padding in batch 1
    (its first `pad_from` queries see no key: eager averages them over every key)."""
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    keep = (j <= i) & (i - j < (window or S))
    keep = keep.expand(B, 1, S, S).clone()
    if pad_from:
        keep[1, :, :, :pad_from] = False
    return torch.zeros(B, 1, S, S).masked_fill(~keep, fill)


def added_case(name, g):
    B, H, S, D = 2, 2, 100, 16
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    if name == "hf causal, left padding":
        return added, (q, k, v, hf_mask(B, S, F32_MIN, pad_from=30))
    if name == "hf sliding window":
        return added, (q, k, v, hf_mask(B, S, -1e38, window=24))
    if name == "bert padding":
        keep = torch.ones(B, S)
        keep[1, 60:] = 0
        return bert_padding, (q, k, v, keep)
    if name == "where-built causal":
        return where_built, (q, k, v)
    if name == "triu of -inf":
        return square_subsequent, (q, k, v)
    if name == "buffer slice":
        return BufferSlice(), (q, k, v)
    if name == "cast boolean":
        return cast_mask, (q, k, v, hf_mask(B, S, F32_MIN, pad_from=30) == 0)
    if name == "sigmoid":
        return sigmoid_added, (q, k, v, hf_mask(B, S, F32_MIN, pad_from=30))
    # fp16's finfo.min does not absorb a float32 score: computed, never skipped, still exact
    return added, (q, k, v, hf_mask(B, S, torch.finfo(torch.float16).min, pad_from=30))


ADDED = ["hf causal, left padding", "hf sliding window", "bert padding", "where-built causal", "triu of -inf",
         "buffer slice", "cast boolean", "sigmoid", "fp16 min"]


@pytest.mark.parametrize("name", ADDED)
def test_added_masks_skip_tiles_and_keep_the_eager_result(name):
    """A mask added to the scores skips the tiles where it is at or below -1e30 (finfo.min of float32 and
    bfloat16) and drops its load where it is 0 on the whole tile. Probe: NaN values in a key block every
    query's mask removes reach the output only if that block is computed (0 · NaN)."""
    g = torch.Generator().manual_seed(torch.randint(0, 10**6, ()).item())
    fn, args = added_case(name, g)
    src = flashlight.explain(fn, *args).regions[0].kernel_source
    assert "tile_empty" in src and "mask dropped: the tile is kept whole" in src
    assert ("def classify_tiles_" in src) == (name not in ("where-built causal", "triu of -inf")), src
    outs = {}
    before = flashlight.counters["fused_launches"]
    for sparse in (True, False):
        torch._dynamo.reset()
        outs[sparse] = flashlight.compile(fn, inductor=False, config=SMALL_TILES, block_sparse=sparse)(*args)
    assert flashlight.counters["fused_launches"] == before + 2   # the fused kernels ran, none fell back
    ref = fn(*[a.double() if a.is_floating_point() else a for a in args])
    # rows that see no key keep only a few float32 bits of their scores next to -65504: held to eager
    # float32's own distance from float64 there (within 3x)
    tol = max(TOL, 3 * rel_err(fn(*args), ref))
    assert rel_err(outs[True], ref) < tol and rel_err(outs[False], ref) < tol
    if name in ("hf causal, left padding", "sigmoid", "fp16 min"):
        # batch 1's keys 0..29 are masked for every query; its first 30 queries see no key at all, so
        # their query tiles (rows 0..31) are computed again without skipping
        q, k, v, mask = args
        v = v.clone()
        v[1, :, :16] = float("nan")
        torch._dynamo.reset()
        out = flashlight.compile(fn, inductor=False, config=SMALL_TILES)(q, k, v, mask)
        skipped = not torch.isnan(out[1, :, 32:]).any()
        assert skipped == (name != "fp16 min")


def sdpa_float_mask(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


SDPA_FLOAT = ["causal of -inf (generate_square_subsequent_mask)", "finfo.min, left padding", "-inf, left padding"]


@pytest.mark.parametrize("name", SDPA_FLOAT)
def test_scaled_dot_product_attention_float_masks_skip_tiles(name):
    """A float mask given to F.scaled_dot_product_attention is added twice in its math (raw, to find the
    rows it removes everywhere, which SDPA makes zeros; clamped to finfo.min, for the softmax): both adds
    are one mask, so tiles it removes are skipped and tiles it keeps whole drop it, with SDPA's result:
    zeros for a row of -inf, eager's average over every key for a row of finfo.min. Probe: NaN values in
    keys every query's mask removes reach the output only if their block is computed."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(torch.randint(0, 10**6, ()).item())
    B, H, S, D = 2, 2, 100, 16
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    if name.startswith("causal"):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(S)
    else:
        fill = F32_MIN if name.startswith("finfo") else float("-inf")
        mask = hf_mask(B, S, fill, pad_from=30)   # batch 1: keys 0..29 removed, queries 0..29 see none
    src = flashlight.explain(sdpa_float_mask, q, k, v, mask).regions[0].kernel_source
    assert "tile_empty" in src and "mask dropped: the tile is kept whole" in src and "def classify_tiles_" in src
    with sdpa_kernel([SDPBackend.MATH]):   # SDPA's definition
        ref = sdpa_float_mask(q.double(), k.double(), v.double(), mask.double())
    for sparse in (True, False):
        torch._dynamo.reset()
        out = flashlight.compile(sdpa_float_mask, inductor=False, config=SMALL_TILES, block_sparse=sparse)(q, k, v, mask)
        assert rel_err(out, ref) < TOL, (sparse, rel_err(out, ref))
    if not name.startswith("causal"):
        assert (out[1, :, :30].abs().max() == 0) == (name.startswith("-inf"))   # removed rows: zeros
        v = v.clone()
        v[1, :, :16] = float("nan")
        torch._dynamo.reset()
        out = flashlight.compile(sdpa_float_mask, inductor=False, config=SMALL_TILES)(q, k, v, mask)
        assert not torch.isnan(out[1, :, 32:]).any()   # the removed key block was skipped for these rows


def test_an_added_bias_is_classified_once_then_every_tile_is_computed():
    """A tensor added to the scores may be a bias (Evoformer's pair bias) rather than a mask: when its first
    classification finds no tile to skip and none kept whole, later calls skip the classification kernel
    and compute every tile with the bias, exactly; a real mask keeps being classified as it changes."""
    g = torch.Generator().manual_seed(torch.randint(0, 10**6, ()).item())
    B, H, S, D = 2, 2, 64, 16
    torch._dynamo.reset()
    fused = flashlight.compile(added, inductor=False, config=SMALL_TILES)

    def call(mask):
        q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
        before = dict(flashlight.counters)
        out = fused(q, k, v, mask)
        assert rel_err(out, added(q.double(), k.double(), v.double(), mask.double())) < TOL
        return {c: flashlight.counters[c] - before.get(c, 0) for c in ("classifications", "classifications_skipped")}

    assert call(torch.randn(B, H, S, S, generator=g)) == {"classifications": 1, "classifications_skipped": 0}
    assert call(torch.randn(B, H, S, S, generator=g)) == {"classifications": 0, "classifications_skipped": 1}

    torch._dynamo.reset()
    fused = flashlight.compile(added, inductor=False, config=SMALL_TILES)
    for window in (24, 40):   # new masks: classified each time
        mask = hf_mask(B, S, F32_MIN, window=window).expand(B, H, S, S)
        assert call(mask) == {"classifications": 1, "classifications_skipped": 0}
