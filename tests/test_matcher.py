"""The matcher on FX graphs: what capture + analysis find in normalised aten graphs (no kernel runs)."""
import pytest
import torch

from flashlight.compiler.analysis import NotFusable, analyse, find_pv_candidates
from flashlight.compiler.capture import normalize

aten = torch.ops.aten


def regions(fn, *args):
    gm = normalize(fn, list(args))
    return gm, find_pv_candidates(gm)


def test_one_region_per_value_product_with_its_score_matmuls_and_axes():
    def diff(q1, k1, q2, k2, v, lam):
        p = torch.softmax(q1 @ k1.mT, -1) - lam * torch.softmax(q2 @ k2.mT, -1)
        return p @ v

    q1, k1, q2, k2 = (torch.randn(2, 3, 16, 8) for _ in range(4))
    gm, pvs = regions(diff, q1, k1, q2, k2, torch.randn(2, 3, 16, 12), torch.tensor(0.5))
    assert len(pvs) == 1
    r = analyse(gm, pvs[0])
    assert len(r.scores) == 2 and r.batch_sizes == (2, 3)
    assert r.sizes["m"] == 16 and r.sizes["n"] == 16 and r.sizes["e"] == 12
    assert [sm.axis for sm in r.scores] == ["d0", "d1"]
    assert r.scores[0].q.axes[-2:] == (("m",), ("d0",)) and r.scores[1].k.axes[-2:] == (("d1",), ("n",))
    assert len(r.leaves) == 6   # q1, k1, q2, k2, v, lam — no materialised score matrix


def test_projection_views_and_gqa_become_index_arithmetic_not_copies():
    def gqa(x, wq, wk, wv):
        B, S, _ = x.shape
        q = (x @ wq).view(B, S, 4, 8).transpose(1, 2)
        k = (x @ wk).view(B, S, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        v = (x @ wv).view(B, S, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
        return torch.softmax(q @ k.mT, -1) @ v

    gm, pvs = regions(gqa, torch.randn(2, 16, 32), torch.randn(32, 32), torch.randn(32, 16), torch.randn(32, 16))
    (pv,) = [p for p in pvs if _safe(gm, p)]
    r = analyse(gm, pv)
    k_chain = [n.target for n in r.scores[0].k.chain]
    assert aten.expand.default in k_chain      # the GQA repeat is an expand in the chain: stride 0
    assert r.scores[0].k.kind == "tensor" and r.batch_sizes == (2, 4)


def _safe(gm, pv):
    try:
        analyse(gm, pv)
        return True
    except NotFusable:
        return False


def test_sinks_concatenation_is_split_before_the_matcher():
    def sinks(q, k, v, sink):
        B, H, M, _ = q.shape
        s = torch.cat([q @ k.mT, sink.view(1, H, 1, 1).expand(B, H, M, 1)], -1)
        return s.softmax(-1)[..., :-1] @ v

    q = torch.randn(1, 2, 8, 4)
    gm, pvs = regions(sinks, q, q, q, torch.randn(2))
    assert not any(n.target is aten.cat.default for n in gm.graph.nodes)
    r = analyse(gm, pvs[0])
    assert aten.maximum.default in {n.target for n in r.nodes}   # max(row max of scores, sink)


def test_whole_row_ops_are_found_but_not_matched():
    def topk(q, k, v):
        s = q @ k.mT
        s = s.masked_fill(s < s.topk(3, -1).values[..., -1:], float("-inf"))
        return s.softmax(-1) @ v

    q = torch.randn(1, 2, 8, 4)
    gm, pvs = regions(topk, q, q, q)
    assert len(pvs) == 1
    try:
        analyse(gm, pvs[0])
        raise AssertionError("top-k must not be matched")
    except NotFusable as e:
        assert "whole rows" in str(e) or "also used outside" in str(e)


def test_a_single_key_is_not_matched_and_says_why():
    """With one key (Sk = 1) each row's softmax is over one score: the reason says so (it used to say the
    score matmul was not laid out as (queries, keys), the size-1 key axis having vanished in the views)."""
    def attn(q, k, v):
        return torch.softmax(q @ k.mT * 0.25, -1) @ v

    q, k = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 1, 8)
    gm, pvs = regions(attn, q, k, k)
    assert len(pvs) == 1
    with pytest.raises(NotFusable, match="single key"):
        analyse(gm, pvs[0])


def test_scores_mixed_across_heads_say_so():
    """Talking-heads attention mixes the heads' scores (and probabilities) by a matmul over the head axis:
    a tile holds one head, so it is not fused, and the reason names the mixing rather than a batch
    mismatch."""
    H = 4
    w_logits, w_weights = torch.randn(H, H), torch.randn(H, H)

    def talking_heads(q, k, v):
        s = torch.einsum("bhqk,hg->bgqk", q @ k.mT * 0.25, w_logits)
        return torch.einsum("bhqk,hg->bgqk", s.softmax(-1), w_weights) @ v

    q, k, v = (torch.randn(2, H, 24, 8) for _ in range(3))
    gm, pvs = regions(talking_heads, q, k, v)
    reasons = []
    for pv in pvs:
        with pytest.raises(NotFusable) as e:
            analyse(gm, pv)
        reasons.append(str(e.value))
    assert any("talking-heads" in r for r in reasons), reasons
