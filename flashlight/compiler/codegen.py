"""Emit the Triton source of one attention region: a loop over key blocks with online reductions.

The kernel reads like the FlashAttention tutorial kernel: load a query tile, loop over key tiles
(scores = Q·Kᵀ, the user's elementwise program, running max, rescaled accumulators), combine the
accumulators with the row values after the loop, store once. Every line computing a user op carries
a comment naming it. Shapes are static per kernel (the cache key holds them); strides are arguments.
"""
from __future__ import annotations

import hashlib
import math
import re
import textwrap
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from flashlight.compiler.analysis import (CASTS, GATHERS, INTEGER_DIVISIONS, LOG2E, MATMULS, REMAINDERS, WHERE, Access,
                                         NotFusable, Region, constant_value, literal, flat_axes, shape_of)
from flashlight.compiler.indexing import VIEW_OPS, GroupedView, apply_view, freeze_chain, split_over_axes
from flashlight.compiler.late import output_is_pv, row_scaled_accumulator
from flashlight.compiler.ranges import analyse, index_bits, integer_division, operand_range
from flashlight.compiler.rewrite import OnlineProgram, build, lname, vname
from flashlight.compiler.sparsity import emit_tile_skip

aten = torch.ops.aten

# largest tile any config may use along m / n: shapes divisible by it need no bounds masks
MAX_BLOCK = 128


def _tl_dtype(dt):
    return {torch.float32: "tl.float32", torch.float16: "tl.float16", torch.bfloat16: "tl.bfloat16",
            torch.float64: "tl.float64", torch.bool: "tl.int1", torch.int32: "tl.int32",
            torch.int64: "tl.int64"}[dt]


# The Triton spelling of the elementwise ops the region may contain: UNARY (one argument), BINARY (an infix
# operator between two).
UNARY = {aten.neg.default: "-({})", aten.exp.default: "tl.exp({})", aten.exp2.default: "tl.exp2({})",
         aten.log.default: "tl.log({})", aten.sigmoid.default: "tl.sigmoid({})",
         aten.tanh.default: "(2.0 * tl.sigmoid(2.0 * ({})) - 1.0)",
         aten.relu.default: "tl.maximum({}, 0.0)", aten.abs.default: "tl.abs({})",
         aten.sqrt.default: "tl.sqrt({})", aten.rsqrt.default: "tl.rsqrt({})",
         aten.reciprocal.default: "(1.0 / ({}))", aten.erf.default: "tl.erf({})",
         aten.log1p.default: "tl.log(1.0 + ({}))", aten.expm1.default: "(tl.exp({}) - 1.0)",
         aten.sin.default: "tl.sin({})", aten.cos.default: "tl.cos({})",
         aten.square.default: "(({0}) * ({0}))",
         aten.sign.default: "tl.where(({0}) > 0, 1.0, tl.where(({0}) < 0, -1.0, 0.0))"}
BINARY = {aten.eq.Tensor: "==", aten.eq.Scalar: "==", aten.ne.Tensor: "!=", aten.ne.Scalar: "!=",
          aten.lt.Tensor: "<", aten.lt.Scalar: "<", aten.le.Tensor: "<=", aten.le.Scalar: "<=",
          aten.gt.Tensor: ">", aten.gt.Scalar: ">", aten.ge.Tensor: ">=", aten.ge.Scalar: ">=",
          aten.logical_and.default: "&", aten.logical_or.default: "|",
          aten.bitwise_and.Tensor: "&", aten.bitwise_or.Tensor: "|"}


@dataclass
class LoadSlot:
    """How launch time computes the stride/offset arguments of one access."""
    leaf: int            # index of the tensor in the kernel's inputs
    chain: tuple         # view nodes
    axes: tuple
    params: list         # [(param name, dim, axis position, sub-dim index) | (name, "offset")]


@dataclass
class KernelSource:
    source: str
    name: str
    slots: list
    n_leaves: int
    out_shape: tuple
    out_dtype: torch.dtype
    sizes: dict = field(default_factory=dict)
    batch: int = 1
    M: int = 0
    n_dot: int = 1               # ·V accumulators (register pressure: picks BLOCK_M)
    notes: list = field(default_factory=list)
    N: int = 0
    classifier: str | None = None  # name of the tile classification kernel (data-dependent masks)
    range_rows: int = 1            # batch rows of its table (product of the batch axes the mask reads)
    classifier_reads: tuple = ()   # the inputs the classification kernel loads (its table depends on them only)
    tile_skipping: str = "no"      # how key tiles are skipped, for explain
    may_be_bias: bool = False      # a tensor added to the scores is among what the classifier reads
    saved: tuple = ()              # training: [(variable, "row" | "vector")] stored per row for the backward
                                   # (less the accumulator the output stands in for: row_program["from_out"])
    row_program: dict | None = None  # training: the after-the-loop lines, for late.py
    params: tuple = ()             # names of the stride arguments, in launch order
    cuda_core_dots: bool = False   # float32 tiles at IEEE precision (see cuda_core_dots): small tiles
    int_bits: int = 32             # integers computed from positions: int32, or int64 where one may pass 2**31


def access_layout(chain, axes, shape, stride, offset, sizes):
    """Per (dim, axis): the sub-dims (size, stride) of the access, and its start offset."""
    gv = GroupedView.of(shape, stride, offset)
    for v in chain:
        gv = apply_view(gv, v)
    out = []
    for i, dim_axes in enumerate(axes):
        if not dim_axes:
            continue
        parts = split_over_axes(gv.dims[i], [sizes[a] for a in dim_axes])
        for j, a in enumerate(dim_axes):
            out.append((i, j, a, parts[j]))
    return out, gv.offset


def _contig(shape):
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(st))


class _Loads:
    """Indexing and loads of a region's inputs in a kernel: tile offsets, masks, addresses, loads."""

    def __init__(self, region: Region, config):
        self.r = region
        self.cfg = config
        self.sizes = region.sizes
        self.access_names: dict = {}   # access key -> variable name
        self.iota_code: dict = {}      # variable name -> expression of a positions access
        self.gather_code: dict = {}    # pseudo axis of a table[index] load -> code of the index
        self.slots: list = []
        self.params: list = []
        self.pre: list = []
        self.loop: list = []
        self.post: list = []
        self.k = 0
        self.internal = set(region.nodes)
        # integers computed from positions or converted to int64: int32 where every value fits (ranges.py)
        self.value_ranges = analyse(region)
        self.int_bits = index_bits(region, self.value_ranges)
        D = {a: s for a, s in self.sizes.items() if a.startswith("d")}
        self.block = {"m": "BLOCK_M", "n": "BLOCK_N", "e": "BLOCK_E"}
        self.block.update({a: f"BLOCK_{a.upper()}" for a in D})
        self.block_size = {a: 1 << max(4, (s - 1).bit_length()) for a, s in self.sizes.items()
                           if a == "e" or a.startswith("d")}
        self.need_mask = {
            "m": self.sizes["m"] % MAX_BLOCK != 0, "n": self.sizes["n"] % MAX_BLOCK != 0,
            **{a: self.block_size[a] != self.sizes[a] for a in self.block_size}}

    # ---- indexing -------------------------------------------------------------------------------
    def index_expr(self, axis, ctx):
        """How axis `axis` is indexed in a tile whose (row, col) axes are `ctx`."""
        if axis.startswith("b"):
            return axis
        if axis in self.gather_code:
            return f"({self.gather_code[axis]})"
        row, col = ctx
        if axis == row:
            return f"offs_{axis}[:, None]" if col else f"offs_{axis}"
        if axis == col:
            return f"offs_{axis}[None, :]"
        raise NotFusable(f"axis {axis} read in a tile of ({row}, {col})")

    def mask_expr(self, axes, ctx):
        parts = []
        for a in axes:
            if a in self.need_mask and self.need_mask[a]:
                row, col = ctx
                parts.append(f"mask_{a}[:, None]" if a == row and col else
                             f"mask_{a}" if a == row else f"mask_{a}[None, :]")
        return " & ".join(parts) if parts else None

    def address(self, acc: Access, ctx, name):
        """(offset expression, stride parameters, axes the address moves along) of a tensor access.

        Strides are kernel arguments `{name}_s<i>`, computed at launch from the real tensor (or, for
        a gradient buffer, from a contiguous tensor of the same shape) through the view chain."""
        src_shape = shape_of(acc.source)
        layout, off = access_layout(acc.chain, acc.axes, src_shape, _contig(src_shape), 0, self.sizes)
        params = []

        def stride(i, j, q, st):
            params.append((f"{name}_s{len(params)}", i, j, q))
            return params[-1][0]
        terms, used_axes = self._terms(layout, ctx, stride)
        for g, _, ix_axes in acc.gather:
            # table[index]: positions past the end of a tile may index outside the table (a table of
            # one entry is read at one address, a scalar that a tile's mask cannot mask)
            if g in used_axes:
                used_axes += [a for a in ix_axes if a not in used_axes]
        if off != 0:
            params.append((f"{name}_off", "offset"))
            terms.insert(0, f"{name}_off")
        return (" + ".join(terms) if terms else "0"), params, used_axes

    def _terms(self, layout, ctx, stride):
        """One `index * stride` term per moving sub-dim of an access layout, and the axes that move it;
        `stride(i, j, q, value)` spells the stride (a kernel argument, or a literal for positions)."""
        terms, used_axes = [], []
        for (i, j, a, subdims) in layout:
            idx = self.index_expr(a, ctx)
            inner = math.prod(s for s, _ in subdims)
            for q, (s, st) in enumerate(subdims):
                inner //= s
                if s == 1 or st == 0:
                    continue   # broadcast (expand): this axis does not move the address
                if a not in used_axes:
                    used_axes.append(a)
                term = idx if inner == 1 else f"({idx} // {inner})"
                if q > 0:
                    term = f"({term} % {s})"
                st_code = stride(i, j, q, st)
                terms.append(term if st_code == "1" else f"{term} * {st_code}")
        return terms, used_axes

    def access(self, acc: Access, ctx, where):
        key = (acc.source, acc.chain, acc.axes, ctx, acc.gather)
        if key in self.access_names:
            return self.access_names[key]
        if acc.kind == "const":
            val = constant_value(acc.source)
            name = literal(val)
            self.access_names[key] = name
            return name
        name = f"x{self.k}"
        self.k += 1
        if acc.kind == "iota":
            start, step = _iota_params(acc.source)
            layout, off = access_layout(acc.chain, acc.axes, shape_of(acc.source), (1,), 0, self.sizes)
            terms, _ = self._terms(layout, ctx, lambda i, j, q, st: str(st))
            expr = " + ".join(terms) if terms else "0"
            if off:
                expr = f"{off} + {expr}"
            rhs = f"{literal(start)} + {literal(step)} * ({expr})" if (start, step) != (0, 1) else expr
            # in int64 where int32 would overflow and eager's int64 does not (ranges.index_bits)
            code = f"({rhs}).to(tl.int64)" if self.int_bits == 64 else rhs
            where.append(f"{name} = {code}  # {acc.source.name}: positions")
            self.iota_code[name] = rhs
        else:
            offs, params, used_axes = self.address(acc, ctx, name)
            leaf = self.r.leaf_index(acc.source)
            self.slots.append(LoadSlot(leaf, freeze_chain(acc.chain), acc.axes, params))
            self.params += [p[0] for p in params]
            mask = self.mask_expr(used_axes, ctx)
            load = f"tl.load(in{leaf}_ptr + {offs}" + (f", mask={mask}, other=0)" if mask else ")")
            src_dt = acc.source.meta["val"].dtype
            if acc.dtype != src_dt:
                load += f".to({_tl_dtype(acc.dtype)})"
            where.append(f"{name} = {load}  # {acc.source.name}{''.join(' → ' + v.name for v in acc.chain)}")
        self.access_names[key] = name
        return name

class _Emitter(_Loads):
    """The kernel's code for the region's ops: operands (names, literals, loads) and each op's spelling."""

    ctx = ("m", "n")   # the score tile's (rows, columns); the backward's per-key-tile kernel has (n, m)

    def operand(self, node, i, prog=None):
        a = node.args[i]
        if not isinstance(a, fx.Node):
            return literal(a)
        if a in self.internal or a is self.r.pv or a in self.r.epilogue:
            kind = self.prog.kind[a]
            return lname(a) if kind == "late" else vname(a)
        acc = self.r.accesses[(node, i)]
        if node in self.r.epilogue:
            return self.access(acc, ("m", "e"), self.post)
        where = self.loop if self.varies_with_keys(acc) else self.pre
        return self.access(acc, self.ctx, where)

    per_element = None     # the nodes this kernel computes per score (None: every user counts)
    folded_wheres = None   # where node -> (index of the scores operand, their code before the scale)
    scale_folds = None     # softmax sub -> (code, c): exp(sub) = exp2(code·(c·s2) - mu2) (plan_scale_folds)
    max_scale = None       # running max -> (code, c): the max over the scores is c·max(code)

    def plan_scale_folds(self, fold_max: bool):
        """Before the loop body is emitted: where the softmax scale c can join the exp's multiply-add
        (scaled_only_here). fold_max (the forward): the running max over the scaled scores may read them
        too, taken as c·max of the unscaled ones (c > 0)."""
        self.folded_wheres, self.scale_folds, self.max_scale = {}, {}, {}
        for sub, R in self.prog.stab_max.items():
            also = {R} if fold_max and sub.args[0] is R.args[0] else set()
            folded = self.scaled_only_here(sub, also)
            if folded:
                self.scale_folds[sub] = folded
                if also:
                    self.max_scale[R] = folded

    def scaled_only_here(self, sub, also=()):
        """(code, c) where the first operand of the softmax's `sub` is y·c for a constant c, through float
        casts, views and at most one where that fills -inf (a mask), and nothing this kernel computes per
        score reads y·c or what follows it but the sub and `also` (the forward's running max; then c > 0):
        exp(sub) is then exp2(code·(c·s2) - mu2). code: y itself, or, past a where, the where's value
        computed on y, registered in folded_wheres (the where and the casts after it then hold the scores
        divided by c, c > 0, so the sub must feed only exps)."""
        chain, x, where = [sub], sub.args[0], None
        while isinstance(x, fx.Node) and x in self.internal:
            if x.target in VIEW_OPS or (x.target in CASTS and x.args[0].meta["val"].dtype.is_floating_point
                                        and x.meta["val"].dtype in (torch.float32, torch.float64)):
                # (a cast that rounds, to 16 bits, would round the scaled scores: not folded past)
                chain.append(x)
                x = x.args[0]
            elif where is None and x.target in WHERE:
                k = [i for i in (1, 2) if isinstance(x.args[i], fx.Node) and constant_value(x.args[i]) is None
                     and _minus_inf(x.args[3 - i])]
                if not k:
                    return None
                where = (x, k[0])
                chain.append(x)
                x = x.args[k[0]]
            else:
                break
        scaled = constant_factor(x) if isinstance(x, fx.Node) and x in self.internal else None
        if scaled is None:
            return None
        i, c = scaled
        if (where is not None or also) and c <= 0:
            return None
        if where is not None and not all(u.target is aten.exp.default for u in self.reads(sub)):
            return None
        if not all(set(self.reads(n)) <= set(chain) | set(also) for n in [x] + chain[1:]):
            return None
        if where is None:
            return self.float_operand(x, i), c
        self.folded_wheres[where[0]] = (where[1], self.float_operand(x, i))
        return self.float_operand(sub, 0), c

    def reads(self, node):
        """The users of a node that this kernel computes per score."""
        return [u for u in node.users if self.per_element is None or u in self.per_element]

    def where_operand(self, node, i):
        """Operand i of a where, as emitted: the scores before their scale where the scale is folded."""
        folded = (self.folded_wheres or {}).get(node)
        return folded[1] if folded and folded[0] == i else self.float_operand(node, i)

    def varies_with_keys(self, acc: Access):
        """Is the access a different tile for every key tile (so it is loaded inside the loop)?"""
        if "n" in flat_axes(acc.axes):
            return True
        return any("n" in ix_axes for _, _, ix_axes in acc.gather)

    def float_operand(self, node, i):
        code = self.operand(node, i)
        a = node.args[i]
        if isinstance(a, fx.Node) and not a.meta["val"].dtype.is_floating_point and \
                node.meta["val"].dtype.is_floating_point:
            return f"({code}).to(tl.float32)"
        return code

    def expr(self, node):
        t = node.target
        f = lambda i: self.float_operand(node, i)  # noqa: E731
        o = lambda i: self.operand(node, i)  # noqa: E731
        if t in CASTS:
            src_dt, dt = node.args[0].meta["val"].dtype, node.meta["val"].dtype
            if dt == torch.int64 and self.int_bits == 32:   # every value fits 32 bits (ranges.index_bits)
                return f"({o(0)}).to(tl.int32)"
            return o(0) if dt == src_dt else f"({o(0)}).to({_tl_dtype(dt)})"  # e.g. .long() truncates
        if t in VIEW_OPS:
            return o(0)
        if t in GATHERS:
            # table[index]: the index was computed per score element above, the table is loaded there
            acc = self.r.accesses[(node, 0)]
            for g, ix, _ in acc.gather:
                self.gather_code[g] = o_index(self, node, ix)
            return o(0)
        if t in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
            alpha = node.kwargs.get("alpha", 1)
            op = "+" if t in (aten.add.Tensor, aten.add.Scalar) else "-"
            rhs = f(1) if alpha == 1 else f"{literal(alpha)} * {f(1)}"
            if node in self.prog.stab_max:
                return f"{f(0)} - mu_{self.prog.stab_max[node].name}"
            return f"{f(0)} {op} {rhs}"
        if t in (aten.mul.Tensor, aten.mul.Scalar):
            return f"{f(0)} * {f(1)}"
        if t in (aten.div.Tensor, aten.div.Scalar):
            if node.kwargs.get("rounding_mode"):
                raise NotFusable("div with rounding_mode")
            a, b = f(0), f(1)
            if not node.meta["val"].dtype.is_floating_point:
                raise NotFusable("integer division")
            return f"{_as_float(node, 0, a)} / {_as_float(node, 1, b)}"
        if t is aten.exp.default and node.args[0] in self.prog.stab_max:
            # exp(x - max) as exp2(x·s2 - max·s2), s2 = log2(e): one fused multiply-add before the
            # hardware exp2 instead of a subtract and a multiply (see the max update for s2 = 1)
            sub, R = node.args[0], self.prog.stab_max[node.args[0]].name
            scaled = (self.scale_folds or {}).get(sub)
            if scaled:   # x = y·c (the softmax scale) read by nothing else: c joins s2 in the same multiply-add
                y, c = scaled
                return f"tl.exp2({y} * ({literal(c)} * s2_{R}) - mu2_{R})"
            return f"tl.exp2({self.float_operand(sub, 0)} * s2_{R} - mu2_{R})"
        if t in INTEGER_DIVISIONS or t in REMAINDERS:
            return self._integer_division(node)
        if t in UNARY:
            return UNARY[t].format(f(0))
        if t in (aten.logical_not.default, aten.bitwise_not.default):
            if node.args[0].meta["val"].dtype != torch.bool:
                raise NotFusable("bitwise not of integers")
            return f"({o(0)} == 0)"
        if t in BINARY:
            return f"({o(0)} {BINARY[t]} {o(1)})"
        if t is aten.maximum.default:
            return f"tl.maximum({f(0)}, {f(1)})"
        if t is aten.minimum.default:
            return f"tl.minimum({f(0)}, {f(1)})"
        if t is aten.clamp_min.default:
            return f"tl.maximum({f(0)}, {f(1)})"
        if t is aten.clamp_max.default:
            return f"tl.minimum({f(0)}, {f(1)})"
        if t is aten.clamp.default:
            x = f(0)
            lo = node.args[1] if len(node.args) > 1 else None
            hi = node.args[2] if len(node.args) > 2 else None
            if lo is not None:
                x = f"tl.maximum({x}, {literal(lo)})"
            if hi is not None:
                x = f"tl.minimum({x}, {literal(hi)})"
            return x
        if t is aten.pow.Tensor_Scalar:
            p = node.args[1]
            x = f(0)
            if p == 2:
                return f"(({x}) * ({x}))"
            if p == 0.5:
                return f"tl.sqrt({x})"
            if p == -1:
                return f"(1.0 / ({x}))"
            if p == 1:
                return x
            raise NotFusable(f"pow with exponent {p}")
        if t in WHERE:
            return f"tl.where({o(0)}, {self.where_operand(node, 1)}, {self.where_operand(node, 2)})"
        raise NotFusable(f"no Triton spelling for {t}")

    def block_tile(self, acc, ctx, where):
        """A Q, K or V tile at its full block shape: a size-1 query or key dim is read broadcast (its other
        rows are masked later); a head dim of size 1 is the value in column 0 and zeros after it (broadcast,
        a matmul would sum the column once per padding column; as it is, 1 wide, Triton cannot multiply it)."""
        name = self.access(acc, ctx, where)
        missing = [i for i, a in enumerate(ctx) if a not in flat_axes(acc.axes)]
        if not missing:
            return name
        shape = ", ".join(f"BLOCK_{a.upper()}" if a in ("m", "n") else str(self.block_size[a]) for a in ctx)
        code = f"tl.broadcast_to({name}, [{shape}])"
        for i in missing:
            if ctx[i] not in ("m", "n"):
                index = f"offs_{ctx[i]}" + ("[:, None]" if i == 0 else "[None, :]")
                code = f"tl.where({index} == 0, {code}, 0.0)"
        where.append(f"{name}_full = {code}")
        return f"{name}_full"

    def _integer_division(self, node):
        """a // b (floor_divide, div with rounding_mode floor or trunc), remainder and fmod of integers by a
        divisor b >= 1 (ranges.py shows it). Where a >= 0 too, floor and truncation agree, as do remainder
        and fmod: Triton's `//` and `%`. Otherwise they are computed on |a|, where they agree as well: Triton
        rounds a negative quotient as C does (towards 0), its interpreter as Python does (down).
        ranges.integer_division spells them."""
        if not _int_dtype(node.meta["val"].dtype):
            raise NotFusable(f"{node.target} of floats")
        mode = node.kwargs.get("rounding_mode", "floor")
        if mode not in ("floor", "trunc"):
            raise NotFusable(f"div with rounding_mode={mode!r}")
        a, b = (operand_range(self.r, self.value_ranges, node, i) for i in (0, 1))
        if b is None or b.lo < 1:
            raise NotFusable(f"{node.target} by a divisor that may be 0 or negative (only divisors >= 1 are fused)")
        return integer_division(node.target, mode, self.operand(node, 0), self.operand(node, 1),
                                a is not None and a.lo >= 0)


def _int_dtype(dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _minus_inf(a) -> bool:
    value = constant_value(a) if isinstance(a, fx.Node) else a
    return isinstance(value, float) and value == float("-inf")


def constant_factor(node):
    """(index of the tensor operand, c) where the node is that operand times a constant c (x * c, x / c,
    -x), else None."""
    t, args, val = node.target, node.args, node.meta.get("val")
    if val is None or not val.dtype.is_floating_point:
        return None
    if t is aten.neg.default:
        return 0, -1.0
    if t not in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar) or len(args) != 2:
        return None
    tensor = [i for i, a in enumerate(args) if isinstance(a, fx.Node)]
    if len(tensor) != 1 or node.kwargs.get("rounding_mode"):
        return None
    i = tensor[0]
    c = args[1 - i]
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
        return None
    if t in (aten.div.Tensor, aten.div.Scalar):
        if i != 0 or c == 0 or not math.isfinite(1.0 / c):
            return None
        return 0, 1.0 / c
    return i, float(c)


def o_index(em, node, ix):
    """Code of the index value of a table[index] node: an internal value, or a loaded tensor."""
    if ix in em.internal:
        return vname(ix)
    acc = em.r.accesses[(node, 2)]   # in the tile's orientation, as the table load it addresses
    return em.access(acc, em.ctx, em.loop if em.varies_with_keys(acc) else em.pre)


def _as_float(node, i, code):
    a = node.args[i]
    if isinstance(a, fx.Node) and not a.meta["val"].dtype.is_floating_point and "to(tl.float32)" not in code:
        return f"({code}).to(tl.float32)"
    if isinstance(a, int) and not isinstance(a, bool):
        return f"{a}.0"
    return code


def _iota_params(node):
    t = node.target
    if t is aten.arange.default:
        return 0, 1
    if t is aten.arange.start:
        return node.args[0], 1
    return node.args[0], node.args[2]


def _comment(node):
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
        if lines:
            return f"{node.target}  ← {lines[-1][:90]}"
    return str(node.target)


def generate(region: Region, block_sparse: bool = True, training: bool = False,
             output_may_change: bool = False) -> KernelSource:
    """The forward kernel of a region. With `training`, it also stores what the backward starts from:
    every online accumulator and running max, per row (backward.py, late.py); the output stands in for
    an accumulator where it can (late.row_scaled_accumulator), unless something may write into the output
    before the backward runs (`output_may_change`: a later in-place op, or the caller it is returned to)."""
    em = _Emitter(region, None)
    em.training, em.output_may_change = training, output_may_change
    prog = em.prog = OnlineProgram(region)
    # tile classification first, so that the loads it reads come before the loop bodies using them
    em.guard, em.guard_pre = [], []
    em.tiles = emit_tile_skip(region, em, em.guard, em.guard_pre, finite=True) if block_sparse else None
    build(region, em.operand, prog)
    kinds = prog.kind
    sizes = region.sizes
    r = region

    # Q tiles (hoisted) and K tiles (in the loop) of each score matmul
    for sm in r.scores:
        # a contraction 1 wide is padded with zeros to the block (Triton multiplies 16 wide at least)
        tile = em.block_tile if sizes[sm.axis] == 1 else em.access
        q = tile(sm.q, ("m", sm.axis), em.pre)
        em.loop.append(f"# scores {sm.node.name} = Q·Kᵀ  (contraction over {sm.axis}, {sizes[sm.axis]} wide)")
        k = tile(sm.k, (sm.axis, "n"), em.loop)
        if sm.q.dtype != sm.k.dtype:
            q, k = f"{q}.to(tl.float32)", f"{k}.to(tl.float32)"
        em.loop.append(f"{vname(sm.node)} = {dot(q, k)}")

    # early values: those free of the running max first, then the max updates, then the rest
    phase_a, phase_c = [], []
    for node in r.nodes:
        if node.target in MATMULS or kinds[node] not in ("early", "stabsub"):
            continue
        rescaled = kinds[node] == "stabsub" or prog.degree.get(node)
        (phase_c if rescaled else phase_a).append(node)

    em.full_tile_lines = {}  # index in em.loop -> the line used instead on tiles the masks keep whole

    # the scale out of the running max and into the exp's multiply-add: H200, bf16, B4 H32 S4096, fwd, one
    # call alternating the two: head dim 64 causal 0.797 -> 0.708 / 0.739 ms, vanilla 1.368 -> 1.329; head
    # dim 128 slower, vanilla 2.310 -> 2.405 / 2.426, causal 1.311 -> 1.354 / 1.360: folded at 64 and below
    em.plan_scale_folds(fold_max=max((n for a, n in sizes.items() if a.startswith("d")), default=0) <= 64)

    def emit(node, where):
        code = em.expr(node)
        where.append(f"{vname(node)} = {code}  # {_comment(node)}")
        if em.tiles and node in em.tiles.dropped and where is em.loop:
            kept = em.where_operand(node, em.tiles.dropped[node])
            em.full_tile_lines[len(where) - 1] = f"{vname(node)} = {kept}  # mask dropped: the tile is kept whole"

    for node in phase_a:
        emit(node, em.loop if "n" in flat_axes(r.axes[node]) else em.pre)

    mask_n = em.need_mask["n"]
    full = "[BLOCK_M, BLOCK_N]"

    def tile(code):
        return f"tl.broadcast_to({code}, {full})" if code != "1.0" else f"tl.full({full}, 1.0, tl.float32)"

    for R, x in prog.max_groups.items():
        nm = R.name
        code, c = em.max_scale.get(R, (em.operand(R, 0), None))   # c: the scale, taken out of the max
        xv = tile(code)
        if mask_n:
            xv = f"tl.where(mask_n[None, :], {xv}, float(\"-inf\"))"
        row_max = f"tl.max({xv}, 1, keep_dims=True)" + (f" * {literal(c)}" if c is not None else "")
        em.loop += [
            f"# running max for {nm} ({_comment(R)})",
            f"m_new_{nm} = tl.maximum(m_{nm}, {row_max})",
            f"alpha_{nm} = tl.where(m_new_{nm} == float(\"-inf\"), 1.0, tl.exp(m_{nm} - m_new_{nm}))",
            f"mu_{nm} = tl.where(m_new_{nm} == float(\"-inf\"), 0.0, m_new_{nm})",
            # a max beyond ±1e38 (finfo.min masks) cannot be scaled by log2(e) without overflow; there
            # every x - max is 0 or below -1e31 (float spacing), so exp2(x - max) = exp(x - max) exactly
            f"s2_{nm} = tl.where(tl.abs(mu_{nm}) > 1e38, 1.0, {LOG2E})",
            f"mu2_{nm} = mu_{nm} * s2_{nm}",
        ]
    for node in phase_c:
        emit(node, em.loop)

    # V tile and accumulator updates
    v = None
    if any(a.kind == "dot" for a in prog.accumulators):
        v = em.access(r.value, ("n", "e"), em.loop)
    for acc in prog.accumulators:
        scale = " * ".join(f"alpha_{R}" for R, k in acc.degree for _ in range(k))
        elem = tile(acc.elem or "1.0")
        if mask_n:
            elem = f"tl.where(mask_n[None, :], {elem}, 0.0)"
        if acc.kind == "sum":
            contrib = f"tl.sum({elem}, 1, keep_dims=True)"
        else:
            contrib = dot(f"({elem}).to({v}.dtype)", v)
        prev = f"{acc.name} * {scale}" if scale else acc.name
        em.loop.append(f"{acc.name} = {prev} + {contrib}")
    for R in prog.max_groups:
        em.loop.append(f"m_{R.name} = m_new_{R.name}")

    # after the loop: the row values (mu: the max, 0 where a row saw only -inf, as in the loop)
    for R in prog.max_groups:
        em.post.append(f"mu_{R.name} = tl.where(m_{R.name} == float(\"-inf\"), 0.0, m_{R.name})")
    for node in r.nodes:
        if kinds[node] != "late":
            continue
        if node.target is aten.amax.default:
            code = f"m_{node.name}"
        elif node.target is aten.sum.dim_IntList:
            code = prog.sum_value[node]
        else:
            code = em.expr(node)
        em.post.append(f"{lname(node)} = {code}  # {_comment(node)}")
    em.post.append(f"{lname(r.pv)} = {prog.out_expr}  # {_comment(r.pv)}")
    for node in r.epilogue:
        em.post.append(f"{lname(node)} = {em.expr(node)}  # {_comment(node)}")
    em.post.append(f"out = {lname(r.output)}")

    return _assemble(em, prog)


_ASSIGN = re.compile(r"\s*([A-Za-z_]\w*) = (.*)")


def _prune(lines, live_out):
    """Drop assignments whose value nothing reads (e.g. the mask on tiles kept whole): the loop
    bodies are built once and specialised, and dead lines would only obscure the kernel."""
    live, keep = set(live_out), []
    for ln in reversed(lines):
        m = _ASSIGN.match(ln)
        if m is None:   # a loop header or a call: kept, and what it reads stays live
            keep.append(ln)
            if not ln.lstrip().startswith("#"):
                live |= set(re.findall(r"[A-Za-z_]\w*", ln.split("  #")[0]))
            continue
        name, rhs = m.group(1), m.group(2).split("  #")[0]
        if name in live:
            keep.append(ln)
            live |= set(re.findall(r"[A-Za-z_]\w*", rhs))
    keep.reverse()
    # a comment heading nothing (its section was pruned) goes too
    return [ln for i, ln in enumerate(keep)
            if not (ln.startswith("#") and (i + 1 == len(keep) or keep[i + 1].startswith("#")))]


_COPY = re.compile(r"\s*(t_\w+) = ((?:t_|x)\w*)(?:  #.*)?$")


def _forward_copies(lines):
    """Drop `t_a = t_b` lines (views and reshapes of a tile are the same tile) and read t_b where t_a
    was read. Only for names every one of whose assignments copies the same value (a mask dropped on
    full tiles copies in one loop body and computes in the other: it stays)."""
    rhs = {}
    for ln in lines:
        m = _ASSIGN.match(ln)
        if m and m.group(1).startswith("t_"):
            c = _COPY.match(ln)
            rhs.setdefault(m.group(1), set()).add(c.group(2) if c else None)
    alias = {name: next(iter(v)) for name, v in rhs.items() if len(v) == 1 and None not in v}
    for name in alias:   # follow chains: t_c = t_b, t_b = t_a
        while alias[name] in alias:
            alias[name] = alias[alias[name]]
    if not alias:
        return lines
    word = re.compile(r"\b(" + "|".join(map(re.escape, alias)) + r")\b")
    out = []
    for ln in lines:
        c = _COPY.match(ln)
        if c and c.group(1) in alias:
            continue
        code, sep, comment = ln.partition("  #")
        out.append(word.sub(lambda m: alias[m.group(1)], code) + sep + comment)
    return out


def _batch_decomposition(index, axes, sizes, names=None):
    """Lines splitting a flat program index into batch indices (row-major over `axes`; `names`: the
    variable an axis's index goes to, where not the axis's own name)."""
    lines, rem = [], index
    names = names or {}
    for i in reversed(range(len(axes))):
        a = axes[i]
        if i == 0:
            lines.append(f"{names.get(a, a)} = {rem}")
        else:
            lines.append(f"{names.get(a, a)} = {rem} % {sizes[a]}")
            lines.append(f"rem_{a} = {rem} // {sizes[a]}")
            rem = f"rem_{a}"
    return lines


def _batch_row(axes, sizes):
    """The flat row-major index of `axes` (inverse of _batch_decomposition)."""
    row = "0"
    for a in axes:
        row = a if row == "0" else f"({row}) * {sizes[a]} + {a}"
    return row


def _assemble(em: _Emitter, prog: OnlineProgram) -> KernelSource:
    r = em.r
    tiles = em.tiles
    sizes = r.sizes
    M, N, E = sizes["m"], sizes["n"], sizes["e"]
    batch = math.prod(r.batch_sizes) if r.batch_sizes else 1
    ptrs = [f"in{i}_ptr" for i in range(len(r.leaves))]
    consts = ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
    classified = tiles is not None and tiles.reads_tensors
    saved = _saved_values(prog) if em.training else []
    row_program = _row_program(em, prog, saved) if em.training else None
    if row_program is not None and (acc := row_scaled_accumulator(row_program)):
        row_program["row_linear"] = acc   # the backward reads dO as given (times d out/d(P·V) per row)
        row_program["out_is_pv"] = output_is_pv(row_program)
        if not em.output_may_change:
            row_program["from_out"] = acc   # the output stands in for it: not stored
            saved = [s for s in saved if s[0] != acc]
    sig = ", ".join(ptrs + ["out_ptr"] + [f"save{i}_ptr" for i in range(len(saved))] +
                    (["ranges_ptr"] if classified else []) + em.params + consts)
    carried = {a.name for a in prog.accumulators} | {f"m_{R.name}" for R in prog.max_groups}
    offs_n = ["offs_n = start_n + tl.arange(0, BLOCK_N)", f"mask_n = offs_n < {N}"]
    masked_body = _prune(offs_n + em.guard + em.loop, carried)

    body = ["pid = tl.program_id(0)",
            f"pid_m = pid % tl.cdiv({M}, BLOCK_M)",
            f"pid_b = pid // tl.cdiv({M}, BLOCK_M)"]
    body += _batch_decomposition("pid_b", r.batch_axes, sizes)
    body.append("offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)")
    body.append(f"mask_m = offs_m < {M}")
    for a, bs in em.block_size.items():
        body.append(f"offs_{a} = tl.arange(0, {bs})")
        body.append(f"mask_{a} = offs_{a} < {sizes[a]}")
    body.append("")
    body.append("# loaded once per query tile")
    pre_at = len(body)
    for R in prog.max_groups:
        body.append(f"m_{R.name} = tl.full([BLOCK_M, 1], float(\"-inf\"), tl.float32)  # running max of {R.name}")
    for acc in prog.accumulators:
        shape = "[BLOCK_M, 1]" if acc.kind == "sum" else f"[BLOCK_M, {em.block_size['e']}]"
        what = "running sum" if acc.kind == "sum" else "·V accumulator"
        body.append(f"{acc.name} = tl.zeros({shape}, tl.float32)  # {what} of {acc.elem}")
    body.append("")
    classifier_src = None
    if tiles is None:
        body.append(f"for start_n in range(0, {N}, BLOCK_N):")
        body += ["    " + ln for ln in masked_body]
    else:
        if classified:
            classifier_src = _classifier(em, ptrs, consts)
        body += tile_range_lines(tiles, sizes, "n", "m", offs_n + em.guard)
        full_loop = [em.full_tile_lines.get(i, ln) for i, ln in enumerate(em.loop)]
        body += tile_loops("n", "BLOCK_N", _prune(offs_n + em.guard + full_loop, carried), masked_body)
        if tiles.row_checks:
            body += _recompute_unskipped(em, prog, tiles, masked_body)
    body.append("")
    body.append("# combine the accumulators with the row values")
    body += em.post
    omask = em.mask_expr(["m", "e"], ("m", "e"))
    body.append(f"out_offs = pid_b * {M * E} + offs_m[:, None] * {E} + offs_e[None, :]")
    body.append("tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty)" +
                (f", mask={omask})" if omask else ")"))
    if saved:
        body.append("# for the backward: the accumulators and running maxes of these rows")
        body.append(f"row = pid_b * {M} + offs_m")
        for i, (name, kind) in enumerate(saved):
            if kind == "row":
                body.append(f"tl.store(save{i}_ptr + row[:, None], {name}, mask=mask_m[:, None])")
            else:
                body.append(f"tl.store(save{i}_ptr + row[:, None] * {E} + offs_e[None, :], "
                            f"{name}.to(save{i}_ptr.dtype.element_ty)" +
                            (f", mask={omask})" if omask else ")"))
    # the per-query-tile lines, less those only the classification kernel needed
    used = set(re.findall(r"[A-Za-z_]\w*", "\n".join(body[pre_at:])))
    body[pre_at:pre_at] = _prune(em.guard_pre + em.pre, used)
    body = _forward_copies(body)
    src_body = "\n".join("    " + ln if ln else "" for ln in body)
    digest = hashlib.sha256((source_header() + sig + src_body + (classifier_src or "")).encode()).hexdigest()[:16]
    name = f"flashlight_attention_{digest}"
    header = textwrap.dedent(f'''\
        # Generated by Flashlight: fused attention region ending at `{r.pv.name}`.
        # {"; ".join(prog.notes)}
        # batch dims {tuple(r.batch_sizes)}, queries {M}, keys {N}, value dim {E}
        ''') + source_header()
    source = header
    classifier, classifier_reads = None, ()
    if classifier_src:
        classifier = f"classify_tiles_{digest}"
        source += "\n\n" + classifier_src.format(name=classifier)
        body_only = classifier_src.split("\n", 2)[2]   # below the signature, which lists every input
        classifier_reads = tuple(sorted({int(i) for i in re.findall(r"\bin(\d+)_ptr\b", body_only)}))
    source += f"\n\n@triton.jit\ndef {name}({sig}):\n" + src_body + "\n"
    out_shape = tuple(r.batch_sizes) + (M, E)
    range_rows = math.prod(sizes[a] for a in tiles.batch_axes) if classified else 1
    skipping = "no" if tiles is None else (
        "key tiles classified by a kernel of their own (the mask reads data), again only when "
        "the tensors it reads change" if classified
        else "key tiles classified by index arithmetic in the kernel")
    if tiles is not None and tiles.added:
        skipping += ("; a tensor added to the scores removes a tile where it is at most -1e30 (finfo.min of "
                     "float32/bfloat16) on all of it, and is not read where it is 0 on all of it"
                     + ("; if its first classification finds neither, it is taken for a bias and not "
                        "classified again" if classified else ""))
    return KernelSource(source, name, em.slots, len(r.leaves), out_shape, r.output.meta["val"].dtype,
                        saved=tuple(saved), row_program=row_program, params=tuple(em.params),
                        sizes=dict(sizes), batch=batch, M=M,
                        n_dot=sum(a.kind == "dot" for a in prog.accumulators), notes=list(prog.notes),
                        N=N, classifier=classifier, range_rows=range_rows,
                        classifier_reads=classifier_reads, tile_skipping=skipping,
                        may_be_bias=bool(classifier and tiles.added), cuda_core_dots=cuda_core_dots(r),
                        int_bits=em.int_bits)


def tile_range_lines(tiles, sizes, axis: str, fixed: str, head) -> list:
    """Lines giving lo, hi (the tiles of `axis` the masks leave, for this tile of `fixed`) and full_lo,
    full_hi, n_full (those they keep whole): from the classification kernel's table where the masks read
    data, else a scan of index arithmetic over the tiles (`head`: the lines that set offs/mask of `axis`
    and the tile predicate). Shared by the forward and both backward kernels."""
    L, B, Bf = sizes[axis], f"BLOCK_{axis.upper()}", f"BLOCK_{fixed.upper()}"
    if tiles.reads_tensors:
        row = _batch_row(tiles.batch_axes, sizes)
        row = f"pid_{fixed}" if row == "0" else f"({row}) * tl.cdiv({sizes[fixed]}, {Bf}) + pid_{fixed}"
        return ["# the tiles the masks leave, and those they keep whole: from the classification kernel",
                f"ranges = ranges_ptr + ({row}) * 5",
                f"lo = {L} - tl.load(ranges + 0)",
                "hi = tl.load(ranges + 1)",
                f"full_lo = {L} - tl.load(ranges + 2)",
                "full_hi = tl.load(ranges + 3)",
                "n_full = tl.load(ranges + 4)"]
    lines = ["# the tiles the masks leave, and those they keep whole (index arithmetic, no loads)",
             f"lo = tl.full([], {L}, tl.int32)", "hi = tl.full([], 0, tl.int32)",
             f"full_lo = tl.full([], {L}, tl.int32)", "full_hi = tl.full([], 0, tl.int32)",
             "n_full = tl.full([], 0, tl.int32)",
             f"for start_{axis} in range(0, {L}, {B}):"]
    lines += ["    " + ln for ln in _prune(head, {"tile_empty", "tile_full"})]
    return lines + [f"    lo = tl.minimum(lo, tl.where(tile_empty, {L}, start_{axis}))",
                    f"    hi = tl.maximum(hi, tl.where(tile_empty, 0, start_{axis} + {B}))",
                    f"    full_lo = tl.minimum(full_lo, tl.where(tile_full, start_{axis}, {L}))",
                    f"    full_hi = tl.maximum(full_hi, tl.where(tile_full, start_{axis} + {B}, 0))",
                    "    n_full += tl.where(tile_full, 1, 0)"]


def tile_loops(axis: str, block: str, full_body, masked_body) -> list:
    """The two loops over the tiles [lo, hi) of `axis`: those the masks keep whole without the mask math
    (if they form one run: no branch in the loop), then the others with it."""
    lines = ["# tiles kept whole run without the mask math, if they form one run (no branch in the loop)",
             f"one_run = (n_full > 0) & (full_hi - full_lo == n_full * {block})",
             "full_lo = tl.where(one_run, full_lo, hi)",
             "full_hi = tl.where(one_run, full_hi, hi)",
             "",
             f"for start_{axis} in range(full_lo, full_hi, {block}):"]
    lines += ["    " + ln for ln in full_body]
    lines += ["",
              "# the other tiles the masks leave, [lo, full_lo) and [full_hi, hi), with the mask",
              f"for j in range(lo, hi - (full_hi - full_lo), {block}):",
              f"    start_{axis} = tl.where(j < full_lo, j, j + (full_hi - full_lo))"]
    return lines + ["    " + ln for ln in masked_body]


def _recompute_unskipped(em: _Emitter, prog: OnlineProgram, tiles, masked_body) -> list:
    """Lines that compute this query tile again over every key tile, if one of its rows kept no score
    above a finite mask fill (+ margin): eager gives such a row its softmax over every key, the skipped
    tiles included (a uniform average where all are masked), so skipping was exact only for the others."""
    N = em.r.sizes["n"]
    low = " | ".join(f"(m_{R.name} <= {float(t)!r})" for R, t in tiles.row_checks.items())
    lines = ["",
             "# a row with no score above the mask's fill (+ margin) averages over every key, skipped ones",
             "# too, as in eager: compute this query tile again without skipping",
             f"redo = tl.max(tl.where(mask_m[:, None] & ({low}), 1, 0)) > 0",
             "if redo:"]
    for R in prog.max_groups:
        lines.append(f"    m_{R.name} = tl.full([BLOCK_M, 1], float(\"-inf\"), tl.float32)")
    for acc in prog.accumulators:
        shape = "[BLOCK_M, 1]" if acc.kind == "sum" else f"[BLOCK_M, {em.block_size['e']}]"
        lines.append(f"    {acc.name} = tl.zeros({shape}, tl.float32)")
    lines.append(f"    for start_n in range(0, {N}, BLOCK_N):")
    lines += ["        " + ln for ln in masked_body]
    return lines


def dot(a: str, b: str) -> str:
    """tl.dot of two tiles at the kernel's float32 matmul precision (DOT_PRECISION, see dot_precision)."""
    return f"tl.dot({a}, {b}, input_precision=DOT_PRECISION)"


def dot_precision() -> str:
    """How float32 tiles are multiplied, as torch multiplies float32 matrices: "ieee" at torch's default
    float32 matmul precision ("highest"), "tf32" once the user allows TF32
    (torch.set_float32_matmul_precision("high") or torch.backends.cuda.matmul.allow_tf32), as Inductor
    does, and FlexAttention (torch.backends.cuda.matmul.fp32_precision first, where set). 16-bit tiles
    are multiplied the same way either way."""
    setting = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")
    if setting != "none":
        return "ieee" if setting == "ieee" else "tf32"
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def cuda_core_dots(region: Region) -> bool:
    """Does a matmul of the region's kernels take float32 tiles at IEEE precision? No tensor-core
    instruction multiplies float32 at full precision, so Triton multiplies such tiles with FMAs on the CUDA
    cores, holding operands in registers: they want far smaller tiles than tensor-core tiles do
    (runtime.default_config)."""
    dtypes = {a.dtype for sm in region.scores for a in (sm.q, sm.k)} | {region.value.dtype}
    return torch.float32 in dtypes and dot_precision() == "ieee"


def source_header() -> str:
    """The imports and module constants every generated kernel file starts with."""
    return ("import triton\nimport triton.language as tl\n\n"
            f"DOT_PRECISION = tl.constexpr({dot_precision()!r})  # float32 tiles: torch's float32 matmul precision\n")


def _saved_values(prog: OnlineProgram):
    """[(kernel variable, "row" | "vector")]: what a training forward stores per row."""
    out = [(acc.name, "row" if acc.kind == "sum" else "vector") for acc in prog.accumulators]
    return out + [(f"m_{R.name}", "row") for R in prog.max_groups]


def _row_program(em: _Emitter, prog: OnlineProgram, saved) -> dict:
    """What late.py needs to run the forward's after-the-loop lines again in PyTorch."""
    r = em.r
    sums = [n.name for n in r.nodes if n.target is aten.sum.dim_IntList]
    mu_of = {R.name: lname(prog.group_ref[R.name]) if R.name in prog.group_ref else f"m_{R.name}"
             for R in prog.max_groups}
    maxes = {R.name: lname(R) for R in prog.max_groups}
    live = {"out", lname(r.pv), *(lname(n) for n in r.nodes if n.target is aten.sum.dim_IntList),
            *mu_of.values(), *(lname(n) for n in r.nodes if prog.kind.get(n) == "late")}
    lines = _prune(em.pre + em.post, live)
    return {"lines": lines, "saved": list(saved), "sums": sums, "pv": lname(r.pv), "mu_of": mu_of,
            "maxes": maxes, "batch_axes": list(r.batch_axes), "sizes": dict(r.sizes),
            "leaves": len(r.leaves), "param_names": list(em.params)}


def _classifier(em: _Emitter, ptrs, consts, fixed: str = "m") -> str:
    """A kernel that classifies every (query tile, key tile) for masks that read data.

    One program per tile pair, over only the batch axes the masks read; each folds its tile into the
    row of its `fixed` tile ("m": the query tile, as the forward and the dQ kernel loop over keys; "n":
    the key tile, for the dK/dV kernel) with atomics: [L - lowest live start, highest live end,
    L - lowest full start, highest full end, number of full tiles] (L the looped axis' size; all start
    at zero).
    """
    tiles, sizes = em.tiles, em.r.sizes
    M, N = sizes["m"], sizes["n"]
    loop = "n" if fixed == "m" else "m"
    L = sizes[loop]
    size = {"m": M, "n": N}
    sig = ", ".join(ptrs + ["ranges_ptr"] + em.params + consts)
    body = ["pid = tl.program_id(0)",
            f"pid_n = pid % tl.cdiv({N}, BLOCK_N)",
            f"pid_m = (pid // tl.cdiv({N}, BLOCK_N)) % tl.cdiv({M}, BLOCK_M)",
            f"pid_b = pid // (tl.cdiv({N}, BLOCK_N) * tl.cdiv({M}, BLOCK_M))"]
    body += _batch_decomposition("pid_b", tiles.batch_axes, sizes)
    body += ["start_m = pid_m * BLOCK_M",
             "offs_m = start_m + tl.arange(0, BLOCK_M)",
             f"mask_m = offs_m < {M}",
             "start_n = pid_n * BLOCK_N",
             "offs_n = start_n + tl.arange(0, BLOCK_N)",
             f"mask_n = offs_n < {N}"]
    body += _prune(em.guard_pre + em.guard, {"tile_empty", "tile_full"})
    F = f"BLOCK_{fixed.upper()}"
    body += [f"ranges = ranges_ptr + (pid_b * tl.cdiv({size[fixed]}, {F}) + pid_{fixed}) * 5",
             f"tl.atomic_max(ranges + 0, tl.where(tile_empty, 0, {L} - start_{loop}))",
             f"tl.atomic_max(ranges + 1, tl.where(tile_empty, 0, start_{loop} + BLOCK_{loop.upper()}))",
             f"tl.atomic_max(ranges + 2, tl.where(tile_full, {L} - start_{loop}, 0))",
             f"tl.atomic_max(ranges + 3, tl.where(tile_full, start_{loop} + BLOCK_{loop.upper()}, 0))",
             "tl.atomic_add(ranges + 4, tl.where(tile_full, 1, 0))"]
    body = _forward_copies(body)
    text = "\n".join("    " + ln for ln in body)
    what = "key tiles of this query tile" if fixed == "m" else "query tiles of this key tile"
    return ("@triton.jit\ndef {name}(" + sig.replace("{", "{{").replace("}", "}}") + "):\n"
            f"    # which {what} the masks remove, and which they keep whole\n"
            + text.replace("{", "{{").replace("}", "}}") + "\n")
