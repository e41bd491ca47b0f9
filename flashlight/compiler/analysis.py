"""Find attention regions in a normalised aten graph.

A region ends at a ``·V`` matmul whose left operand ``P`` is computed, through elementwise ops and
reductions over the key axis, from one or more score matmuls ``Q·Kᵀ``. Every value inside the region
is given *axes*: for each of its dimensions, which kernel axes it spans (batch axes ``b0, b1, …``,
query ``m``, key ``n``, the contraction axis ``d<i>`` of each score matmul, and ``e`` for the value
features), or ``()`` for a broadcast dimension. Tensors read from outside the region (leaves) are
reached through chains of view ops; those chains become index arithmetic (see indexing.py).

Nothing here decides *how* to compute the region: that is rewrite.py (online reductions) and
codegen.py (Triton). Anything this module cannot place raises ``NotFusable`` with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from flashlight.compiler.indexing import VIEW_OPS

aten = torch.ops.aten
prims = torch.ops.prims
LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)


class NotFusable(Exception):
    """The region cannot be fused; the message says why (shown by ``flashlight.explain``)."""


class SplitsAxis(NotFusable):
    """A reshape splits kernel axis `axis` (of size `size`) into an outer part of `outer` and the rest.
    For a batch axis the analysis starts again with that axis split in two (Swin's windows: [B·nW, H, N, N]
    viewed as [B, nW, H, N, N] to add a mask per window)."""

    def __init__(self, message, axis, size, outer):
        super().__init__(message)
        self.axis, self.size, self.outer = axis, size, outer


# Elementwise ops the kernel can compute, by arity class. The spelling in Triton lives in codegen.
ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
    aten.exp.default, aten.exp2.default, aten.log.default, aten.tanh.default, aten.sigmoid.default,
    aten.relu.default, aten.abs.default, aten.sqrt.default, aten.rsqrt.default,
    aten.reciprocal.default, aten.maximum.default, aten.minimum.default, aten.clamp_min.default,
    aten.clamp_max.default, aten.clamp.default, aten.pow.Tensor_Scalar, aten.where.self,
    aten.eq.Tensor, aten.eq.Scalar, aten.ne.Tensor, aten.ne.Scalar, aten.lt.Tensor, aten.lt.Scalar,
    aten.le.Tensor, aten.le.Scalar, aten.gt.Tensor, aten.gt.Scalar, aten.ge.Tensor, aten.ge.Scalar,
    aten.logical_and.default, aten.logical_or.default, aten.logical_not.default,
    aten.bitwise_and.Tensor, aten.bitwise_or.Tensor, aten.bitwise_not.default,
    aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.erf.default,
    aten.log1p.default, aten.expm1.default, aten.sin.default, aten.cos.default,
    aten.sign.default, aten.square.default, prims.where.default,
    # integer division and remainder (chunked and strided masks: i // 64 == j // 64, (i - j) % 4 == 0), fused
    # by a constant divisor >= 1 (_divides_integers_by_a_constant; codegen._integer_division spells them)
    aten.floor_divide.default, aten.div.Tensor_mode, aten.remainder.Scalar, aten.remainder.Tensor,
    aten.fmod.Scalar, aten.fmod.Tensor,
}
INTEGER_DIVISIONS = {aten.floor_divide.default, aten.div.Tensor_mode}
REMAINDERS = {aten.remainder.Scalar, aten.remainder.Tensor, aten.fmod.Scalar, aten.fmod.Tensor}
WHERE = {aten.where.self, prims.where.default}
CASTS = {aten._to_copy.default, prims.convert_element_type.default}
# table[index]: a load from a tensor at a position computed per score element (bias tables indexed
# by bucketed distance); the gathered dim gets a pseudo kernel axis "g<i>" indexed by that value
GATHERS = {aten.index.Tensor}
REDUCTIONS = {aten.amax.default, aten.sum.dim_IntList}
MATMULS = {aten.bmm.default, aten.mm.default}
CONSTANTS = {aten.scalar_tensor.default, aten.full.default, aten.zeros.default, aten.ones.default,
             aten.full_like.default, aten.zeros_like.default, aten.ones_like.default}
IOTAS = {aten.arange.default, aten.arange.start, aten.arange.start_step}


def shape_of(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if val is None:
        raise NotFusable(f"no shape recorded for {node}")
    if any(not isinstance(s, int) for s in val.shape):
        raise NotFusable("dynamic (symbolic) shapes are not supported yet: compile with dynamic=False")
    return tuple(val.shape)


def dtype_of(node):
    return node.meta["val"].dtype


@dataclass
class Access:
    """One way the kernel reads a value from outside the region."""
    source: fx.Node              # the tensor (or arange / constant) the view chain starts from
    chain: tuple                 # view nodes from source to the consumed value, in order
    axes: tuple                  # kernel axes of each dim of the consumed value
    kind: str                    # "tensor" | "iota" | "const"
    dtype: torch.dtype           # dtype of the consumed value (after casts in the chain)
    gather: tuple = ()           # ((pseudo axis, index node, its axes), ...) for table[index] loads


@dataclass
class ScoreMatmul:
    node: fx.Node
    q: Access
    k: Access
    axis: str                    # its contraction axis, e.g. "d0"


@dataclass
class Region:
    pv: fx.Node                              # the ·V matmul (bmm/mm)
    p: fx.Node                               # the probabilities fed to it
    value: Access                            # V
    batch_sizes: tuple
    sizes: dict                              # axis -> size
    nodes: list                              # internal nodes, graph order
    axes: dict                               # internal node -> axes per dim
    scores: list                             # ScoreMatmul, in graph order
    accesses: dict = field(default_factory=dict)   # (consumer, arg index) -> Access
    leaves: list = field(default_factory=list)     # tensor sources, in kernel-argument order
    epilogue: list = field(default_factory=list)   # elementwise ops after ·V (gating, e @ v / l…)
    learned: set = field(default_factory=set)      # leaves that require grad (training): never a mask

    @property
    def output(self):
        """The node whose value the fused op produces."""
        return self.epilogue[-1] if self.epilogue else self.pv

    @property
    def batch_axes(self):
        return tuple(f"b{i}" for i in range(len(self.batch_sizes)))

    def leaf_index(self, node):
        return self.leaves.index(node)


def flat_axes(axes):
    return tuple(a for dim in axes for a in dim)


def constant_value(node):
    """The value of a constant tensor (scalar_tensor, full, zeros…, through views), else None."""
    src, _ = _source_of(node) if isinstance(node, fx.Node) else (None, ())
    if not isinstance(src, fx.Node) or src.op != "call_function" or src.target not in CONSTANTS:
        return None
    t = src.target
    if t is aten.scalar_tensor.default:
        value = src.args[0]
    elif t in (aten.full.default, aten.full_like.default):
        value = src.args[1]
    else:
        value = 0 if t in (aten.zeros.default, aten.zeros_like.default) else 1
    return typed_scalar(value, src.meta["val"].dtype if "val" in src.meta else None)


def literal(v) -> str:
    """A Python number as kernel code (infinities and NaN as float("...")); NotFusable for anything else."""
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else f'float("{v}")'
    if isinstance(v, int):
        return str(v)
    raise NotFusable(f"unsupported literal {v!r}")


def typed_scalar(value, dtype):
    """`value` as the Python scalar a tensor of `dtype` holds: ones(dtype=bool) is True, not 1.0, so the
    generated code combines it with masks as a boolean (`t & 1.0` does not compile)."""
    if dtype is None or not isinstance(value, (bool, int, float)):
        return value
    if dtype == torch.bool:
        return bool(value)
    if not dtype.is_floating_point and not dtype.is_complex:
        return int(value)
    return float(value)


def _source_of(node):
    """Walk back through view ops: (source node, chain of view nodes from source to node)."""
    chain = []
    while isinstance(node, fx.Node) and node.target in VIEW_OPS:
        chain.append(node)
        node = node.args[0]
    return node, tuple(reversed(chain))


def _is_computable(node):
    if isinstance(node, fx.Node) and (node.target in INTEGER_DIVISIONS or node.target in REMAINDERS):
        return _divides_integers_by_a_constant(node)
    return isinstance(node, fx.Node) and node.op == "call_function" and (
        node.target in ELEMENTWISE or node.target in REDUCTIONS or node.target in GATHERS)


def _divides_integers_by_a_constant(node) -> bool:
    """An integer division or remainder by a constant >= 1 (a chunk size, a stride): computed in the kernel.
    Others (of floats, by a tensor) stay outside the region, computed by Inductor and read as a tensor."""
    val, divisor = node.meta.get("val"), node.args[1] if len(node.args) > 1 else None
    return val is not None and not val.dtype.is_floating_point and val.dtype != torch.bool and \
        isinstance(divisor, int) and not isinstance(divisor, bool) and divisor >= 1


def _feed_forward(node, src) -> bool:
    """Is the 2-D matmul `node` of `src` a feed-forward layer's second matmul rather than attention's ·V?
    - src batched but flattened to rows ([B, S, F] viewed as [B·S, F]): each row is mapped on its own, where
      ·V sums over the keys of one batch entry (explain listed every MLP as a region);
    - src 2-D with no reduction between it and the matmuls before it, as `w2(silu(w1 x) * w3 x)` on the
      tokens a mixture of experts routes to one expert (attention's rows are normalised over the keys):
      cuBLAS runs it well (Mixtral's experts were fused as flash attention)."""
    val = src.meta.get("val")
    if node.target is not aten.mm.default or val is None:
        return False
    if val.dim() > 2:   # symbolic batch sizes count as rows of a batch too
        return not all(isinstance(s, int) and s == 1 for s in val.shape[:-2])
    return val.dim() == 2 and not any(n.target in REDUCTIONS for n in _behind(src, stop=_is_projection))


def _of_a_linear_output(node, src) -> bool:
    """Is the batched matmul `node` the scores' Q·Kᵀ of a projection's output rather than ·V? Behind src
    (a bias added to a 2-D matmul of the tokens: nn.MultiheadAttention's packed in-projection) lie only 2-D
    matmuls and no reduction over keys, where attention's probabilities come from batched scores or are
    normalised over the keys."""
    if node.target is not aten.bmm.default:
        return False
    behind = list(_behind(src, stop=_is_projection))
    matmuls = [n for n in behind if _is_projection(n)]
    return bool(matmuls) and all(n.target is not aten.bmm.default for n in matmuls) and \
        not any(n.target in REDUCTIONS for n in behind)


def _is_projection(n) -> bool:
    return n.target in MATMULS or n.target is aten.addmm.default


def _behind(start, stop=lambda n: False):
    """The nodes `start` is computed from (itself included), each once; the search goes on behind a node
    unless stop(node)."""
    stack, seen = [start], set()
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        yield n
        if not stop(n):
            stack.extend(n.all_input_nodes)


def find_pv_candidates(gm: fx.GraphModule):
    """Matmuls whose left operand is computed (elementwise or by reductions) from another matmul.

    The search behind P goes through any op, so that a region blocked by e.g. top-k is still found
    and analyse() can say why it is not fused.
    """
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in MATMULS:
            continue
        src, _ = _source_of(node.args[0])
        if not _is_computable(src) or _feed_forward(node, src) or _of_a_linear_output(node, src):
            continue
        # behind a projection with a bias (Linear) lies another layer's matmul, not this one's scores
        if any(n.target in MATMULS for n in _behind(src, stop=_is_projection)):
            out.append(node)
    return out


def _regroup(axes, from_shape, to_shape, sizes):
    """Axes of a tensor of `to_shape` that is a reshape of one of `from_shape` with `axes`."""
    flat = [(a, sizes[a]) for dim, size in zip(axes, from_shape) if size != 1 for a in dim]
    out = []
    for size in to_shape:
        group, need = [], size
        while need > 1:
            if not flat:
                raise NotFusable(f"reshape {from_shape} -> {to_shape} splits a kernel axis")
            a, s = flat.pop(0)
            if need % s:
                message = f"reshape {from_shape} -> {to_shape} splits a kernel axis"
                if s % need == 0:
                    raise SplitsAxis(message, a, s, need)
                raise NotFusable(message)
            group.append(a)
            need //= s
        out.append(tuple(group))
    if flat:
        raise NotFusable(f"reshape {from_shape} -> {to_shape} splits a kernel axis")
    return tuple(out)


def _view_input_axes(node, out_axes, sizes):
    """Axes of a view node's input given the axes of its output (backward propagation)."""
    t = node.target
    inp = node.args[0]
    in_shape, out_shape = shape_of(inp), shape_of(node)
    if t in (aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.view_copy.default,
             aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims):
        return _regroup(out_axes, out_shape, in_shape, sizes)
    if t in (aten.expand.default, aten.expand_copy.default):
        lead = len(out_shape) - len(in_shape)
        return tuple(ax if s_in == s_out else () for ax, s_in, s_out in
                     zip(out_axes[lead:], in_shape, out_shape[lead:]))
    if t in (aten.permute.default, aten.permute_copy.default, aten.transpose.int, aten.t.default):
        if t is aten.transpose.int:
            order = list(range(len(out_shape)))
            a, b = node.args[1] % len(order), node.args[2] % len(order)
            order[a], order[b] = order[b], order[a]
        elif t is aten.t.default:
            order = [1, 0] if len(out_shape) == 2 else [0]
        else:
            order = [o % len(out_shape) for o in node.args[1]]
        inv = [0] * len(order)
        for i, o in enumerate(order):
            inv[o] = i
        return tuple(out_axes[inv[j]] for j in range(len(order)))
    if t is aten.slice.Tensor:
        if in_shape != out_shape:
            raise NotFusable("slicing inside the attention region (e.g. extra logits) is not supported yet")
        return out_axes
    if t is aten.select.int:
        raise NotFusable("select inside the attention region is not supported")
    return out_axes  # clone / alias / dtype casts


def _broadcast_input_axes(out_axes, out_shape, in_shape):
    off = len(out_shape) - len(in_shape)
    if off < 0:
        raise NotFusable("elementwise input of higher rank than its output")
    return tuple(out_axes[off + i] if s == out_shape[off + i] else () for i, s in enumerate(in_shape))


def _norm(axes, shape, sizes):
    """Canonical axes: size-1 dims are broadcast (), size-1 axes never index anything."""
    return tuple(tuple(x for x in a if sizes.get(x, 2) != 1) if s != 1 else () for a, s in zip(axes, shape))


RANDOM = ("bernoulli", "native_dropout", "rand", "randn", "rand_like", "randn_like", "randint", "multinomial")


def analyse(gm: fx.GraphModule, pv: fx.Node) -> Region:
    """Build the Region ending at the ·V matmul `pv`, or raise NotFusable."""
    if any(0 in shape_of(m) for m in (pv, *pv.args[:2]) if isinstance(m, fx.Node)):
        raise NotFusable("a tensor of size 0 (an empty batch, no queries or no keys): nothing to compute")
    try:
        region = _analyse(gm, pv)
    except NotFusable as e:
        random = _random_ops_before(pv.args[0])
        if random:   # dropout (training, p > 0) traces to a Bernoulli mask multiplied into the probabilities
            raise NotFusable(f"dropout with p > 0 is not fused (random {', '.join(random)} on the way to "
                             f"the ·V product): left to Inductor; [{e}]") from None
        raise
    for acc in region.accesses.values():   # a random mask over the scores, drawn whole outside: dropout
        if acc.kind == "tensor" and {"m", "n"} <= set(flat_axes(acc.axes)):
            random = _random_ops_before(acc.source)
            if random:
                raise NotFusable(f"dropout with p > 0 is not fused (random {', '.join(random)}, a mask over "
                                 "the scores): left to Inductor")
    return region


def _random_ops_before(node):
    return sorted(n.name for n in _behind(node) if n.op == "call_function" and
                  getattr(n.target, "__name__", "").split(".")[0].rstrip("_") in RANDOM)


def _analyse(gm: fx.GraphModule, pv: fx.Node) -> Region:
    batch_sizes = None   # the probabilities' batch dims, until a reshape splits one of them
    for _ in range(8):
        try:
            return _analyse_with_batch(gm, pv, batch_sizes)
        except SplitsAxis as e:
            current = list(batch_sizes or shape_of(_source_of(pv.args[0])[0])[:-2])
            if not e.axis.startswith("b"):   # batch axes are b0, b1, …
                raise NotFusable(str(e)) from None
            i = int(e.axis[1:])
            batch_sizes = tuple(current[:i] + [e.outer, e.size // e.outer] + current[i + 1:])
    raise NotFusable("reshapes split the batch dims more than 8 times")


def _analyse_with_batch(gm: fx.GraphModule, pv: fx.Node, batch_sizes) -> Region:
    # a mask or bias that does not depend on the scores but is used outside the attention too (the same
    # mask added in every layer) is computed again in the kernel, as if it were the region's alone (the
    # graph keeps it for its other users); where the kernel cannot compute it, it is read as a tensor
    # (shared="read"); failing that, every mask or bias the kernel cannot compute is read as a tensor, as
    # it reaches the scores (shared="frontier": transformers' masks indexing the padding mask per batch and key)
    first = _RegionBuilder(gm, pv, batch_sizes)
    try:
        return first.build(shared="recomputed")
    except SplitsAxis:
        raise
    except NotFusable as recomputed:
        for shared in (["read"] if first.recomputed else []) + ["frontier"]:
            try:
                return _RegionBuilder(gm, pv, batch_sizes).build(shared=shared)
            except SplitsAxis:
                raise
            except NotFusable:
                pass
        raise recomputed from None


class _RegionBuilder:
    """The steps of analyse(), in order, over the state they share (sizes, axes, accesses…)."""

    def __init__(self, gm: fx.GraphModule, pv: fx.Node, batch_sizes=None):
        self.gm, self.pv = gm, pv
        self.p, _ = _source_of(pv.args[0])
        p_shape = shape_of(self.p)
        if len(p_shape) < 2:
            raise NotFusable("probabilities of rank < 2")
        self.batch_sizes = batch_sizes = tuple(batch_sizes or p_shape[:-2])   # finer, where a reshape splits one
        self.M, self.N = p_shape[-2:]
        if self.N == 1:   # (the key axis, of size 1, vanishes in the views: no layout to read the scores by)
            raise NotFusable("a single key: each row normalises one score, there is nothing to tile over the "
                             "keys; left to Inductor")
        batch_axes = tuple(f"b{i}" for i in range(len(batch_sizes)))
        pv_shape = shape_of(pv)
        self.Dv = pv_shape[-1]
        self.sizes = sizes = {a: s for a, s in zip(batch_axes, batch_sizes)}
        sizes.update(m=self.M, n=self.N, e=self.Dv)
        if pv.target is aten.bmm.default:
            if pv_shape[0] != math.prod(batch_sizes):
                contracted = shape_of(pv.args[0])[-1]
                if contracted != self.N and contracted in batch_sizes:
                    raise NotFusable(f"the matmul after the scores contracts one of their batch axes (of size "
                                     f"{contracted}: the heads?), not the keys: scores or probabilities mixed "
                                     "across heads, as talking-heads attention mixes them, need every head's "
                                     "tile at once; left to Inductor")
                raise NotFusable("·V batch does not match the probabilities' batch dims")
            lhs_axes = (batch_axes, ("m",), ("n",))
            self.v_axes = (batch_axes, ("n",), ("e",))
        else:
            if batch_sizes:
                raise NotFusable("2-D ·V matmul of batched probabilities")
            lhs_axes = (("m",), ("n",))
            self.v_axes = (("n",), ("e",))
        self.lhs_axes = _norm(lhs_axes, shape_of(pv.args[0]), sizes)
        self.canon = tuple(batch_sizes) + (self.M, self.Dv)     # the ·V result: [batch, m, e]
        self.canon_axes = _norm(tuple((a,) for a in batch_axes) + (("m",), ("e",)), self.canon, sizes)
        self.axes: dict = {}
        self.accesses: dict = {}
        self.internal: set = set()
        self.recomputed: set = set()   # internal values the graph also keeps for users outside the region
        self.scores: list = []
        self.epilogue: list = []

    def assign(self, node, ax):
        ax = _norm(ax, shape_of(node), self.sizes)
        if node in self.axes and self.axes[node] != ax:
            raise NotFusable(f"{node.name} is used with inconsistent broadcasting ({self.axes[node]} vs {ax})")
        self.axes[node] = ax

    def make_access(self, consumer, idx, arg, ax):
        src, chain = _source_of(arg)
        if src in self.internal:
            raise NotFusable(f"{arg.name} mixes a region value into an operand")
        if not isinstance(src, fx.Node):
            raise NotFusable(f"unsupported operand {arg!r}")
        if src.op == "call_function" and src.target in IOTAS:
            kind = "iota"
        elif src.op == "call_function" and src.target in CONSTANTS:
            kind = "const"
        else:
            kind = "tensor"
        acc = Access(src, chain, _norm(ax, shape_of(arg), self.sizes), kind, dtype_of(arg))
        self.accesses[(consumer, idx)] = acc
        return acc

    def find_epilogue(self):
        """Views and elementwise ops on the ·V result that keep its [batch, m, e] shape (gates)."""
        epilogue, last = self.epilogue, self.pv
        while len(last.users) == 1:
            u = next(iter(last.users))
            if u.op != "call_function" or shape_of(u) != self.canon or not (
                    u.target in VIEW_OPS and u.args[0] is last or u.target in ELEMENTWISE) or \
                    u.target in (aten.slice.Tensor, aten.select.int):
                break
            epilogue.append(u)
            last = u
        while epilogue and epilogue[-1].target in VIEW_OPS:  # a trailing view is not worth fusing
            epilogue.pop()

    def build(self, shared: str) -> Region:
        self.find_epilogue()
        self.collect_internal(shared)
        self.check_nothing_escapes()
        self.propagate_axes()
        return self.finish()

    def escapes(self, n) -> bool:
        return any(u not in self.internal and u is not self.pv and u not in self.epilogue for u in n.users)

    def collect_internal(self, shared="recomputed"):
        """The internal nodes: reachable from P through computable ops and views of them. A value that does
        not depend on the scores (a mask or bias built from positions or data) but is also used outside
        the attention: `shared="recomputed"` computes it in the kernel all the same, "read" reads it as a
        tensor (and what only it needed is not computed). `shared="frontier"` reads as tensors all such values
        where they meet the scores, shared or not (for masks the kernel cannot compute)."""
        stops: set = set()
        while True:
            self.internal.clear()
            self._collect_internal(stops)
            if shared == "frontier":   # score-independent values where they meet the scores
                found = {n for n in self.internal if not self._depends_on_scores(n) and n.op == "call_function"
                         and n.target not in IOTAS and n.target not in CONSTANTS and
                         any(u in self.internal and self._depends_on_scores(u) for u in n.users)}
            else:
                found = {n for n in self.internal if self.escapes(n) and not self._depends_on_scores(n)}
            if shared == "recomputed":
                self.recomputed = found
                return
            if not found:
                return
            stops |= found

    def _depends_on_scores(self, node) -> bool:
        stack, seen = [node], set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n.target in MATMULS:
                return True
            stack.extend(a for a in n.all_input_nodes if a in self.internal)
        return False

    def _collect_internal(self, stops):
        pv, internal = self.pv, self.internal
        work = [pv.args[0]]
        for u in self.epilogue:
            # row values of the score program (e.g. the softmax sum in `e @ v / e.sum(-1)`) are internal;
            # anything else after ·V (a gate) is a leaf
            work += [a for a in u.all_input_nodes if a not in self.epilogue and a is not pv and
                     _is_computable(_source_of(a)[0]) and _reaches_matmul(a)]
        while work:
            n = work.pop()
            if n in internal or not isinstance(n, fx.Node) or n in stops:
                continue
            src, _ = _source_of(n)
            if n.target in VIEW_OPS and not (_is_computable(src) or
                                             (src.op == "call_function" and src.target in MATMULS)):
                continue  # a view chain over a leaf: an access, not internal
            if n.target in MATMULS:
                if n is pv:
                    raise NotFusable("cyclic region")
                internal.add(n)  # a score matmul: its operands are leaves
                continue
            if not (_is_computable(n) or n.target in VIEW_OPS):
                continue
            internal.add(n)
            work.extend(n.all_input_nodes)

    def check_nothing_escapes(self):
        """Internal values must not escape: the full score matrix is never materialised."""
        for n in self.internal - self.recomputed:
            for u in n.users:
                if u not in self.internal and u is not self.pv and u not in self.epilogue:
                    raise NotFusable(
                        f"{n.name} ({n.target}) is also used outside the attention ({u.name}); fusing "
                        "would need the full score matrix")

    def propagate_axes(self):
        """Axes of every internal value and access, backwards, consumers before producers."""
        self.order = [n for n in self.gm.graph.nodes if n in self.internal]
        self.assign(self.pv.args[0], self.lhs_axes)
        for u in self.epilogue:
            self.axes[u] = self.canon_axes
            if u.target not in VIEW_OPS:
                self._elementwise_inputs(u, self.canon_axes, self.canon, skip={self.pv, *self.epilogue})
        for node in reversed(self.order):
            if node not in self.axes:
                raise NotFusable(f"{node.name} does not reach the ·V product")
            out_ax = self.axes[node]
            if node.target in MATMULS:
                self._score_matmul(node, out_ax)
            elif node.target in VIEW_OPS:
                self._input_axes(node, 0, node.args[0], _view_input_axes(node, out_ax, self.sizes))
            elif node.target in GATHERS:
                _gather_axes(node, out_ax, self.sizes, self.internal, self.assign, self.make_access)
            elif node.target in REDUCTIONS:
                self._reduction(node, out_ax)
            else:
                self._elementwise_inputs(node, out_ax, shape_of(node))

    def _input_axes(self, node, i, arg, ax):
        if arg in self.internal:
            self.assign(arg, ax)
        else:
            self.make_access(node, i, arg, ax)

    def _elementwise_inputs(self, node, out_ax, out_shape, skip=()):
        for i, arg in enumerate(node.args):
            if isinstance(arg, fx.Node) and arg not in skip:
                self._input_axes(node, i, arg, _broadcast_input_axes(out_ax, out_shape, shape_of(arg)))

    def _score_matmul(self, node, out_ax):
        if node.target is aten.bmm.default:
            g, m, n = out_ax
            if m not in (("m",), ()) or n != ("n",):
                raise NotFusable("score matmul is not laid out as (queries, keys) for the key reduction")
            if shape_of(node)[1] != self.M:
                raise NotFusable("score rows do not match the queries")
        else:
            if len(out_ax) != 2 or out_ax[1] != ("n",):
                raise NotFusable("score matmul is not laid out as (queries, keys)")
            g = None
        axis = f"d{len(self.scores)}"
        a, b = node.args[0], node.args[1]
        self.sizes[axis] = shape_of(a)[-1]
        a_ax = ((g,) if g is not None else ()) + (("m",), (axis,))
        b_ax = ((g,) if g is not None else ()) + ((axis,), ("n",))
        self.scores.append(ScoreMatmul(node, self.make_access(node, 0, a, a_ax),
                                       self.make_access(node, 1, b, b_ax), axis))

    def _reduction(self, node, out_ax):
        x, dims = node.args[0], node.args[1]
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        x_shape = shape_of(x)
        if dims is None or len(dims) != 1:
            raise NotFusable(f"{node.target} over several dims")
        d = dims[0] % len(x_shape)
        if x_shape[d] != self.N:
            raise NotFusable(f"{node.target} over dim {d} (size {x_shape[d]}), which is not the key dim "
                             f"({self.N} keys); extra logits concatenated to the scores (attention sinks) "
                             "are fused one column at a time")
        if "n" in flat_axes(out_ax):
            raise NotFusable(f"{node.target} over a dim other than the keys")
        if keep:
            if out_ax[d] != ():
                raise NotFusable(f"{node.target} reduces a dim that is not broadcast back")
            in_ax = out_ax[:d] + (("n",),) + out_ax[d + 1:]
        else:
            in_ax = out_ax[:d] + (("n",),) + out_ax[d:]
        self._input_axes(node, 0, x, in_ax)

    def finish(self) -> Region:
        if not self.scores:
            blockers = sorted({str(a.source.target) for a in self.accesses.values()
                               if a.kind == "tensor" and _reaches_matmul(a.source)})
            if blockers:
                raise NotFusable(f"the scores reach the ·V product only through {', '.join(blockers)}, "
                                 "which needs whole rows (or is not elementwise): left to Inductor")
            raise NotFusable("no score matmul Q·Kᵀ found")
        value = self.make_access(self.pv, 1, self.pv.args[1], self.v_axes)
        region = Region(self.pv, self.p, value, self.batch_sizes, self.sizes, self.order, self.axes,
                        self.scores, self.accesses, epilogue=self.epilogue)
        leaves = []
        for acc in list(self.accesses.values()):
            if acc.kind == "tensor" and acc.source not in leaves:
                leaves.append(acc.source)
        region.leaves = leaves
        _check_access_axes(region)
        return region


def _gather_axes(node, out_ax, sizes, internal, assign, make_access):
    """Axes for table[index]: the index spans the output dims it produced, the table is read along
    the other dims plus one pseudo axis (the gathered dim) whose position is the index value."""
    src, indices = node.args[0], node.args[1]
    used = [(d, ix) for d, ix in enumerate(indices) if ix is not None]
    if len(used) != 1:
        raise NotFusable("indexing with several index tensors inside the attention")
    (d, ix), = used
    if not isinstance(ix, fx.Node) or ix.meta["val"].dtype in (torch.bool, torch.uint8):
        raise NotFusable("boolean-mask indexing inside the attention")
    if _source_of(src)[0] in internal:
        raise NotFusable("indexing a value computed inside the attention")
    rank = len(shape_of(ix))
    g = f"g{sum(a.startswith('g') for a in sizes)}"
    sizes[g] = shape_of(src)[d]
    if ix in internal:
        assign(ix, out_ax[d:d + rank])
    else:
        make_access(node, 2, ix, out_ax[d:d + rank])   # accesses key 2: the index tensor
    acc = make_access(node, 0, src, out_ax[:d] + ((g,),) + out_ax[d + rank:])
    acc.gather = ((g, ix, flat_axes(out_ax[d:d + rank])),)


def _reaches_matmul(node, limit=200):
    stack, seen = [node], set()
    while stack and len(seen) < limit:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if n.target in MATMULS:
            return True
        stack.extend(n.all_input_nodes)
    return False


def _check_access_axes(region):
    allowed_score = set(region.batch_axes) | {"m", "n"}
    allowed_out = set(region.batch_axes) | {"m", "e"}
    for (consumer, idx), acc in region.accesses.items():
        used = set(flat_axes(acc.axes)) - {g for g, _, _ in acc.gather}
        if consumer in region.epilogue and not used <= allowed_out:
            raise NotFusable(f"{acc.source.name} is read along axes {sorted(used)} after ·V")
        if consumer in region.nodes and consumer.target not in MATMULS and not used <= allowed_score:
            raise NotFusable(f"{acc.source.name} is read along axes {sorted(used)} inside the score program")


def may_change_after(node: fx.Node) -> bool:
    """Whether `node`'s value may be changed after it runs: a later op writes into it in place, directly
    or through a view of it (as the ops' schemas declare aliasing and writes), or the graph returns it or
    a view of it (the caller may write into it)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for user in n.users:
            if user.op == "output":
                return True
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            schema = getattr(user.target, "_schema", None)
            if schema is None:
                continue
            for i, arg in enumerate(schema.arguments):
                value = user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)
                refers = value is n or (isinstance(value, (list, tuple)) and n in value)
                if refers and arg.alias_info is not None and arg.alias_info.is_write:
                    return True
            # a view of it (by its schema, or _unsafe_view and the like, which do not declare it): follow it
            if user.target in VIEW_OPS or any(r.alias_info is not None for r in schema.returns):
                stack.append(user)
    return False
