"""Capture: turn a dynamo graph (or a plain function) into a normalised aten graph.

Decompositions make the matcher see few spellings: every softmax becomes amax/sub/exp/sum/div,
masked_fill becomes where, einsum/matmul become bmm with views, repeat_interleave becomes
expand + reshape. Node metadata (shapes, the user's source lines) is kept for the later stages.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._decomp import get_decompositions
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten

_DECOMPOSE = [
    aten._softmax, aten._safe_softmax, aten.softmax, aten._log_softmax, aten.masked_fill,
    aten.tril, aten.triu, aten.repeat_interleave.self_int, aten.rsub, aten.baddbmm, aten.addcmul,
    aten.hardtanh, aten.softplus, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar,
]


def decompositions():
    ops = []
    for op in _DECOMPOSE:
        ops.append(op)
    return get_decompositions(ops)


def _values_only_max(gm: fx.GraphModule) -> None:
    """`x.max(dim, keepdim).values` traces to max.dim + getitem; when the indices are unused it is amax."""
    g = gm.graph
    g.eliminate_dead_code()
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not aten.max.dim:
            continue
        if not all(u.target is operator.getitem and u.args[1] == 0 for u in node.users):
            continue
        x, dim = node.args[0], node.args[1]
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        with g.inserting_before(node):
            amax = g.call_function(aten.amax.default, (x, [dim], keep))
        for u in list(node.users):
            amax.meta = dict(u.meta)
            u.replace_all_uses_with(amax)
            g.erase_node(u)
        g.erase_node(node)
    gm.recompile()


def normalize(fn, example_inputs) -> fx.GraphModule:
    """Trace `fn` (a GraphModule from dynamo or any callable) on `example_inputs` into aten ops."""
    if isinstance(fn, fx.GraphModule):
        gm = fn

        def fn(*args):
            return fx.Interpreter(gm).run(*args)

    fake_mode = detect_fake_mode(example_inputs)
    with fx.traceback.preserve_node_meta():
        if fake_mode is not None:
            example_inputs = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) and
                              not isinstance(x, FakeTensor) else x for x in example_inputs]
            with fake_mode:
                gm = make_fx(fn, decomposition_table=decompositions(), tracing_mode="real",
                             record_stack_traces=True)(*example_inputs)
        else:
            gm = make_fx(fn, decomposition_table=decompositions(), tracing_mode="fake",
                         record_stack_traces=True)(*example_inputs)
    _values_only_max(gm)
    return gm
