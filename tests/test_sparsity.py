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


def test_copies_are_forwarded_but_not_values_that_differ_between_loop_bodies():
    lines = ["t_view = t_bmm  # aten.view", "t_view2 = t_view", "t_where = t_view2  # mask dropped",
             "t_where = tl.where(t_gt, float(\"-inf\"), t_view2)", "t_exp = tl.exp(t_where - t_view2)",
             "m_a = m_new_a"]
    assert _forward_copies(lines) == [
        "t_where = t_bmm  # mask dropped", "t_where = tl.where(t_gt, float(\"-inf\"), t_bmm)",
        "t_exp = tl.exp(t_where - t_bmm)", "m_a = m_new_a"]
