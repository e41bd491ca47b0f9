"""Block sparsity: prove, per key tile, that a -inf mask removes the whole tile, and skip it.

Two analyses, both generic over the user's mask expression:

1. *Kill check* (compile time, abstract interpretation): for each mask ``where(c, x, -inf)`` (or
   ``where(c, -inf, x)``), force the masked value to -inf and evaluate the region over the values
   {-inf, 0, unknown finite}. If every running max sees -inf and every running sum / ·V term sees 0,
   a tile on which the mask holds everywhere contributes nothing and may be skipped. A finite fill
   (finfo.min, -1e9, -1e4: at most FINITE_FILL) is not -inf: in a row that keeps a score above
   fill + ROW_MARGIN its exp(fill - max) is 0 in float32, so skipping is exact there, but a row masked
   everywhere averages over every key in eager. Such fills skip tiles only when the masked value reaches
   the softmax through scaling by constants (a known value, not lifted by an unknown bias), and the
   forward then checks each row's max after its loops: a query tile with a row at or below the
   threshold is computed again without skipping (codegen._recompute_unskipped). In training the
   backward finds such rows from the saved row maxes and visits every tile of their batch.
2. *Tile predicate* (run time, interval arithmetic in the kernel): the mask condition is evaluated
   over the tile's index ranges (positions from arange are affine in the query/key offsets) and the
   min/max of any data it reads (document ids, padding) — giving "true everywhere" / "false
   everywhere" as two scalars. Causal, sliding-window, prefix-LM and document masks all fall out.

A tile is *empty* when some -inf mask removes all of it (skipped), *full* when every analysed mask
keeps all of it (its mask math is dropped: the kernel runs a second loop body without it). Masks over
positions only are classified by a scan inside the kernel (pure index arithmetic, no loads); masks
that read data are classified by a small kernel of their own, one program per (query tile, key
tile), over only the batch axes the mask reads (document ids do not vary by head); its table is reused
while the tensors it reads are unchanged (runtime.CompiledRegion.tile_ranges).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from flashlight.compiler.analysis import (INTEGER_DIVISIONS, MATMULS, REMAINDERS, WHERE, Region, constant_value,
                                         flat_axes, literal)
from flashlight.compiler.indexing import VIEW_OPS
from flashlight.compiler.ranges import integer_division, operand_range

aten = torch.ops.aten
prims = torch.ops.prims

NINF, ZERO, TOP = "-inf", "0", "?"


def _literal(a):
    return a if isinstance(a, (int, float)) and not isinstance(a, bool) else None


def _const_of(region, node, i):
    """The literal value of argument i of node, if it is a literal or a constant tensor."""
    a = node.args[i]
    if not isinstance(a, fx.Node):
        return _literal(a)
    acc = region.accesses.get((node, i))
    return constant_value(a) if acc is not None and acc.kind == "const" else None


def _ninf_branch(region, w):
    """For a where node: 1 if its true branch is -inf, 2 if its false branch is, else None."""
    for i in (1, 2):
        v = _const_of(region, w, i)
        if v is not None and v == float("-inf"):
            return i
    return None


def _abstract(region: Region, forced: set):
    """Abstract value of every internal node with the `forced` where nodes set to -inf."""
    val: dict = {}

    def arg(node, i):
        a = node.args[i]
        if isinstance(a, fx.Node) and a in val:
            return val[a]
        c = _const_of(region, node, i)
        if c is not None:
            return NINF if c == float("-inf") else ZERO if c == 0 else TOP
        return TOP

    def pos(node, i):
        c = _const_of(region, node, i)
        return c is not None and c > 0 and not math.isinf(c)

    for n in region.nodes:
        t = n.target
        if n in forced:
            val[n] = NINF
        elif t in MATMULS or t in (aten.amax.default, aten.sum.dim_IntList):
            val[n] = TOP
        elif t in VIEW_OPS:
            val[n] = arg(n, 0)
        elif t in WHERE:
            a, b = arg(n, 1), arg(n, 2)
            val[n] = a if a == b else TOP
        elif t in (aten.add.Tensor, aten.sub.Tensor):
            a, b = arg(n, 0), arg(n, 1)
            if a == ZERO and b == ZERO:
                val[n] = ZERO
            elif a == NINF and b != NINF or t is aten.add.Tensor and b == NINF and a != NINF:
                val[n] = NINF
            else:
                val[n] = TOP
        elif t in (aten.mul.Tensor, aten.mul.Scalar):
            a, b = arg(n, 0), arg(n, 1)
            if ZERO in (a, b) and NINF not in (a, b):
                val[n] = ZERO
            elif a == NINF and pos(n, 1) or b == NINF and pos(n, 0):
                val[n] = NINF
            else:
                val[n] = TOP
        elif t in (aten.div.Tensor, aten.div.Scalar):
            a = arg(n, 0)
            val[n] = ZERO if a == ZERO and arg(n, 1) not in (ZERO,) else NINF if a == NINF and pos(n, 1) else TOP
        elif t in (aten.exp.default, aten.exp2.default, aten.sigmoid.default, aten.relu.default):
            a = arg(n, 0)
            val[n] = ZERO if a in (NINF, ZERO) and t is aten.relu.default or a == NINF else TOP
        else:
            val[n] = TOP
    return val


def skippable_masks(region: Region, finite: bool = False):
    """[(cond node, where-arg index of the fill, where nodes, row checks)] whose fill alone empties a
    tile, grouped by condition. -inf fills need no row check ({}). With `finite`, fills at or below
    FINITE_FILL (finfo.min, -1e9, -1e4) too, when the masked value reaches the softmax only through
    scaling by constants: their row checks {amax node: threshold} are what must hold after the loop for
    skipping to have been exact (module doc)."""
    groups: dict = {}
    for n in region.nodes:
        if n.target in WHERE and isinstance(n.args[0], fx.Node):
            fill = _fill_branch(region, n, finite)
            if fill is not None:
                br, value = fill
                groups.setdefault((n.args[0], br, value), set()).add(n)
    if finite:   # adds of one mask (SDPA's float mask: raw for its removed rows, clamped for the softmax)
        for add, i in additive_masks(region):  # are one group: a skipped tile must leave out both
            groups.setdefault((added_mask_source(region, add.args[i]), ADDED, ABSORBED), set()).add(add)
    maxes = [n.args[0] for n in region.nodes if n.target is aten.amax.default]
    sums = [n.args[0] for n in region.nodes if n.target is aten.sum.dim_IntList]
    out = []
    for (cond, br, value), ws in groups.items():
        if value == float("-inf"):
            val, checks = _abstract(region, ws), {}
            ok = all(val.get(x) == NINF for x in maxes)
        else:
            val, checks = _abstract_finite(region, ws, value)
            ok = checks is not None and all(_is_fill(val.get(x)) for x in maxes)
        ok = ok and all(val.get(x) == ZERO for x in sums) and val.get(region.pv.args[0]) == ZERO
        if ok:
            out.append((cond, br, ws, checks))
    return out


# An added mask (`scores + mask`, as model files add a [B, 1, S, S] mask of 0 / finfo.min) removes a score
# where the mask is at or below ABSORBING: in float32 a score of magnitude below 5e29 does not move it above
# ABSORBED, so the sum is a fill as a where's is, known up to that bound (every use of a fill in
# _abstract_finite holds for an upper bound), and the same row checks make skipping exact. fp16's
# finfo.min (-65504) does not absorb a score, so such a mask is computed, not skipped.
ADDED = "added"
ABSORBING = -1e30
ABSORBED = -5e29


def additive_masks(region: Region):
    """[(add node, index of its mask operand)]: `x + mask` where x depends on the scores and the mask does
    not, reads tensor data or is made by a where (not a position-only bias), and reads nothing learned
    (`region.learned`: a bias that trains is no mask, and classifying it again after every step would
    cost more than it saves)."""
    internal = set(region.nodes)
    learned = getattr(region, "learned", set())
    scored: set = set()
    for n in region.nodes:
        if n.target in MATMULS or any(a in scored for a in n.all_input_nodes):
            scored.add(n)

    def mask_like(node, i):
        """Reads data or holds a where; None where it reads something learned or a gathered table."""
        a = node.args[i]
        if not isinstance(a, fx.Node):
            return False
        if a in internal:
            if a in scored:
                return None
            parts = [mask_like(a, j) for j in range(len(a.args))]
            return None if None in parts else any(parts) or a.target in WHERE
        acc = region.accesses.get((node, i))
        if acc is None or acc.gather or acc.source in learned:
            return None
        return acc.kind == "tensor"

    out = []
    for n in region.nodes:
        if n.target is not aten.add.Tensor or n.kwargs.get("alpha", 1) != 1 or n not in scored \
                or not n.meta["val"].dtype.is_floating_point:
            continue
        for i in (0, 1):
            other = n.args[1 - i]
            if isinstance(other, fx.Node) and other in scored and mask_like(n, i):
                out.append((n, i))
                break
    return out


def added_mask_source(region: Region, mask):
    """The mask an added operand comes from: `mask.clamp_min(c)` with c at or below ABSORBING is at or below
    it exactly where the mask is (so scaled_dot_product_attention's float mask, added raw to find the rows
    it removes and clamped to finfo.min for the softmax, is one mask)."""
    if isinstance(mask, fx.Node) and mask in set(region.nodes) and mask.target is aten.clamp_min.default:
        c = _const_of(region, mask, 1)
        if c is not None and not isinstance(c, bool) and c <= ABSORBING:
            return mask.args[0]
    return mask


# A finite fill at or below FINITE_FILL removes a score as -inf does wherever its row keeps one score
# above fill + ROW_MARGIN: exp(fill - max) < e^-256 is 0 in float32, in eager as in the kernel. A row
# whose max is not above that (every score masked: eager averages over every key) is recomputed.
FINITE_FILL = -1e4
ROW_MARGIN = 256.0


def _fill_branch(region, w, finite):
    """(index, value) of a where's branch that is -inf, or (with `finite`) a constant <= FINITE_FILL."""
    for i in (1, 2):
        v = _const_of(region, w, i)
        if v is None or isinstance(v, bool):
            continue
        if v == float("-inf") or finite and math.isfinite(v) and v <= FINITE_FILL:
            return i, float(v)
    return None


def _is_fill(v):
    return isinstance(v, tuple) and v[0] == "fill"


def _abstract_finite(region: Region, forced: set, fill: float):
    """Abstract values with the `forced` where nodes set to the finite `fill`: ("fill", v) a known masked
    value, ("shifted", v, R) that value minus the row max R, ZERO, TOP. Only scaling by positive
    constants, adding constants, views and casts keep a masked value known (an unknown addend could lift
    it back). Returns (values, {amax node: threshold}) or (values, None) where a shifted value is used
    other than by exp."""
    val: dict = {}
    checks: dict = {}
    internal = set(region.nodes)

    def arg(node, i):
        a = node.args[i]
        if isinstance(a, fx.Node) and a in val:
            return val[a]
        c = _const_of(region, node, i)
        return ("const", float(c)) if c is not None and not isinstance(c, bool) else TOP

    def row_max(a):
        while isinstance(a, fx.Node) and a in internal and a.target in VIEW_OPS:
            a = a.args[0]
        return a if isinstance(a, fx.Node) and a in internal and a.target is aten.amax.default else None

    def check(R, v):
        checks[R] = max(checks.get(R, -math.inf), v + ROW_MARGIN)

    for n in region.nodes:
        t = n.target
        args = [arg(n, i) for i in range(len(n.args))]
        if n in forced:
            val[n] = ("fill", fill)
        elif t in VIEW_OPS or t in (prims.convert_element_type.default, aten._to_copy.default):
            val[n] = args[0]
        elif t is aten.amax.default:
            if _is_fill(args[0]):
                check(n, args[0][1])
            val[n] = TOP
        elif t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            a, b = args[0], args[1]
            k = b[1] if b[0] == "const" else None
            if _is_fill(a) and k is not None and k > 0 and math.isfinite(k):
                val[n] = ("fill", a[1] * k if t in (aten.mul.Tensor, aten.mul.Scalar) else a[1] / k)
            elif t in (aten.mul.Tensor, aten.mul.Scalar) and ZERO in (a, b):
                val[n] = ZERO                    # every value here is finite: 0 · x = 0
            elif a == ZERO and b != ZERO:
                val[n] = ZERO
            else:
                val[n] = TOP
        elif t in (aten.add.Tensor, aten.sub.Tensor, aten.add.Scalar, aten.sub.Scalar):
            a, b = args[0], args[1]
            alpha = n.kwargs.get("alpha", 1)
            R = row_max(n.args[1]) if t is aten.sub.Tensor else None
            if _is_fill(a) and R is not None and alpha == 1:
                val[n] = ("shifted", a[1], R)
            elif _is_fill(a) and b[0] == "const" and math.isfinite(b[1]):
                sign = -1 if t in (aten.sub.Tensor, aten.sub.Scalar) else 1
                val[n] = ("fill", a[1] + sign * alpha * b[1])
            else:
                val[n] = ZERO if a == ZERO and b == ZERO else TOP
        elif t in WHERE:
            a, b = args[1], args[2]
            val[n] = a if a == b else ("fill", max(a[1], b[1])) if _is_fill(a) and _is_fill(b) else TOP
        elif t is aten.sigmoid.default:   # sigmoid attention: 1 / (1 + e^256) is 0 in float32, no row check
            val[n] = ZERO if _is_fill(args[0]) and args[0][1] <= -ROW_MARGIN else TOP
        elif t in (aten.exp.default, aten.exp2.default):
            a = args[0]
            if isinstance(a, tuple) and a[0] == "shifted":
                check(a[2], a[1])
                val[n] = ZERO
            elif _is_fill(a) and a[1] <= -ROW_MARGIN:
                val[n] = ZERO
            else:
                val[n] = TOP
        else:
            val[n] = TOP
    if any(isinstance(v, tuple) and v[0] == "shifted" and not all(
            u.target in (aten.exp.default, aten.exp2.default) for u in n.users) for n, v in val.items()):
        return val, None
    return val, checks


class IntervalEmitter:
    """Emits scalar Triton code bounding a node's value over the current tile."""

    def __init__(self, region, emitter, lines, pre_lines):
        self.r = region
        self.em = emitter
        self.lines = lines            # per key tile
        self.pre = pre_lines          # per query tile (no key axis)
        self.memo: dict = {}
        self.k = 0
        self.reads_tensors = False    # does the predicate load data (not only positions)?
        self.batch_axes: set = set()  # batch axes the predicate depends on

    def fresh(self):
        self.k += 1
        return f"iv{self.k}"

    def operand(self, node, i):
        a = node.args[i]
        if not isinstance(a, fx.Node):
            v = _literal(a)
            if v is None and isinstance(a, bool):
                v = int(a)
            if v is None:
                return None
            return ("num", literal(v), literal(v))
        if a in set(self.r.nodes):
            return self.value(a)
        acc = self.r.accesses.get((node, i))
        if acc is None:
            return None
        if acc.kind == "const":
            c = _const_of(self.r, node, i)
            c = int(c) if isinstance(c, bool) else c   # as for a literal bool above
            return None if c is None else ("num", literal(c), literal(c))
        axes = set(flat_axes(acc.axes))
        self.batch_axes |= {a for a in axes if a.startswith("b")}
        lines = self.lines if "n" in axes else self.pre
        x = self.em.access(acc, ("m", "n"), lines)
        if acc.kind == "iota":
            return self._iota_interval(x, acc)
        self.reads_tensors = True
        xs = f"{x}.to(tl.int32)" if acc.dtype == torch.bool else x
        lo, hi = xs, xs
        valid = self.em.mask_expr([a for a in ("m", "n") if a in axes], ("m", "n"))
        if valid and acc.dtype.is_floating_point:   # positions past the end load 0: leave them out
            lo, hi = (f"tl.where({valid}, {xs}, float('{inf}'))" for inf in ("inf", "-inf"))
        name = self.fresh()
        if axes & {"m", "n"}:
            lines.append(f"{name}_lo = tl.min({lo})  # smallest {acc.source.name} on this tile")
            lines.append(f"{name}_hi = tl.max({hi})")
        else:   # one value per batch entry (a row check over the whole mask): a scalar, nothing to reduce
            lines.append(f"{name}_lo = {lo}  # {acc.source.name}, one value on this tile")
            lines.append(f"{name}_hi = {hi}")
        if acc.dtype == torch.bool:
            return ("bool", f"({name}_lo == 1)", f"({name}_hi == 0)")
        return ("num", f"{name}_lo", f"{name}_hi")

    # a tile's first and last query / key offsets (out-of-range offsets included: a wider interval
    # only makes the classification more conservative)
    FIRST = {"m": "(pid_m * BLOCK_M)", "n": "start_n"}
    LAST = {"m": "(pid_m * BLOCK_M + BLOCK_M - 1)", "n": "(start_n + BLOCK_N - 1)"}

    def _iota_interval(self, x, acc):
        name = self.fresh()
        lines = self.lines if "n" in flat_axes(acc.axes) else self.pre
        code = self.em.iota_code.get(x, "")
        tile_axes = set(re.findall(r"offs_([mn])\b", code))
        if len(tile_axes) == 1 and "//" not in code and "%" not in code:
            # affine in one tile offset: the extremes are at its first and last value (scalar math,
            # no reduction across the tile)
            (a,) = tile_axes
            at = lambda end: re.sub(rf"offs_{a}(\[[^\]]*\])?", end[a], code)  # noqa: E731
            # in int64 where the kernel's positions are (ranges.index_bits): their bounds' products may pass 2**31
            wide = (lambda c: f"tl.cast({c}, tl.int64)") if self.em.int_bits == 64 else (lambda c: c)  # noqa: E731
            lines.append(f"{name}_a = {wide(at(self.FIRST))}  # {acc.source.name} at the tile's first {a}")
            lines.append(f"{name}_b = {wide(at(self.LAST))}")
            lines.append(f"{name}_lo = tl.minimum({name}_a, {name}_b)")
            lines.append(f"{name}_hi = tl.maximum({name}_a, {name}_b)")
        else:
            lines.append(f"{name}_lo = tl.min({x})")
            lines.append(f"{name}_hi = tl.max({x})")
        return ("num", f"{name}_lo", f"{name}_hi")

    def value(self, node):
        if node in self.memo:
            return self.memo[node]
        res = self._value(node)
        self.memo[node] = res
        return res

    def _value(self, n):
        t = n.target
        if t in VIEW_OPS:
            res = self.value(n.args[0]) if n.args[0] in set(self.r.nodes) else self.operand(n, 0)
            if res is not None and res[0] == "bool" and n.meta["val"].dtype != torch.bool:
                # a mask cast to numbers ((~keep).float() * -1e30): 1 where true, 0 where false
                _, true_everywhere, false_everywhere = res
                return self._emit("num", f"tl.where({true_everywhere}, 1.0, 0.0)",
                                  f"tl.where({false_everywhere}, 0.0, 1.0)")
            return res
        ops = [self.operand(n, i) if isinstance(n.args[i], fx.Node) or _literal(n.args[i]) is not None
               else None for i in range(len(n.args))]
        if any(o is None for o in ops):
            return None
        if t in (aten.logical_not.default, aten.bitwise_not.default):
            (ka, at, af), = ops
            return ("bool", af, at) if ka == "bool" else None
        if t in INTEGER_DIVISIONS or t in REMAINDERS:
            return self._division_interval(n, ops)
        bounds = _interval_of(n, ops)
        return None if bounds is None else self._emit(*bounds)

    def _division_interval(self, n, ops):
        """Bounds of x // c over a tile (c a constant >= 1; both roundings are non-decreasing in x: the
        quotients of the bounds), and of x % c: within one period of c the remainders of the bounds, else
        0 .. c - 1 (a remainder's sign is the divisor's; fmod's only where x >= 0)."""
        (kx, lo, hi), (kc, c, _) = ops
        value = _literal(n.args[1]) if not isinstance(n.args[1], fx.Node) else None
        if kx != "num" or kc != "num" or not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return None
        x_range = operand_range(self.r, self.em.value_ranges, n, 0)
        nonnegative = x_range is not None and x_range.lo >= 0
        mode = n.kwargs.get("rounding_mode", "floor")
        if n.target in INTEGER_DIVISIONS:
            return self._emit("num", integer_division(n.target, mode, lo, c, nonnegative),
                              integer_division(n.target, mode, hi, c, nonnegative))
        if n.target in (aten.fmod.Scalar, aten.fmod.Tensor) and not nonnegative:
            return None
        floor = aten.floor_divide.default
        same = f"({integer_division(floor, 'floor', lo, c, nonnegative)} == " \
               f"{integer_division(floor, 'floor', hi, c, nonnegative)})"
        return self._emit("num", f"tl.where({same}, {integer_division(n.target, mode, lo, c, nonnegative)}, 0)",
                          f"tl.where({same}, {integer_division(n.target, mode, hi, c, nonnegative)}, {value - 1})")

    def _emit(self, kind, lo, hi):
        name = self.fresh()
        a, b = ("T", "F") if kind == "bool" else ("lo", "hi")
        self.lines.append(f"{name}_{a} = {lo}")
        self.lines.append(f"{name}_{b} = {hi}")
        return (kind, f"{name}_{a}", f"{name}_{b}")


# Interval rules: given the (kind, lo, hi) bounds of an op's arguments over a tile ("num": numbers lo..hi;
# "bool": T = true everywhere, F = false everywhere), the bounds of its result, as Triton expressions.
_COMPARISONS = {aten.lt.Tensor: "<", aten.lt.Scalar: "<", aten.le.Tensor: "<=", aten.le.Scalar: "<=",
                aten.gt.Tensor: ">", aten.gt.Scalar: ">", aten.ge.Tensor: ">=", aten.ge.Scalar: ">=",
                aten.eq.Tensor: "==", aten.eq.Scalar: "==", aten.ne.Tensor: "!=", aten.ne.Scalar: "!="}
_AND = (aten.logical_and.default, aten.bitwise_and.Tensor)
_OR = (aten.logical_or.default, aten.bitwise_or.Tensor)


def _interval_of(n, ops):
    """(kind, lo, hi) of node n from its operands' bounds, or None where no rule applies."""
    t = n.target
    if t in _COMPARISONS:
        return _comparison_interval(_COMPARISONS[t], *ops)
    if t in _AND or t in _OR:
        (ka, at, af), (kb, bt, bf) = (_as_bool(o) for o in ops)
        if ka != "bool" or kb != "bool":
            return None
        if t in _AND:
            return ("bool", f"({at} & {bt})", f"({af} | {bf})")
        return ("bool", f"({at} | {bt})", f"({af} & {bf})")
    if t in WHERE:
        (kc, ct, cf), (ka, alo, ahi), (kb, blo, bhi) = ops
        if kc != "bool" or ka != "num" or kb != "num":
            return None
        return ("num", f"tl.where({ct}, {alo}, tl.where({cf}, {blo}, tl.minimum({alo}, {blo})))",
                f"tl.where({ct}, {ahi}, tl.where({cf}, {bhi}, tl.maximum({ahi}, {bhi})))")
    if any(o[0] != "num" for o in ops):
        return None
    return _arithmetic_interval(n, ops)


def _as_bool(op):
    """A constant 1 or 0 (operand() gives boolean constants as numbers) as the bounds of a mask that is true
    or false everywhere: `torch.ones(L, S, dtype=torch.bool).tril()` is `(j <= i) & True`."""
    kind, lo, hi = op
    if kind == "num" and lo == hi and lo in ("1", "0", "1.0", "0.0"):
        return ("bool", "True", "False") if float(lo) else ("bool", "False", "True")
    return op


def _comparison_interval(op, a, b):
    (ka, alo, ahi), (kb, blo, bhi) = a, b
    if ka != "num" or kb != "num":
        return None
    if op in (">", ">="):  # a > b  is  b < a
        alo, ahi, blo, bhi = blo, bhi, alo, ahi
        op = "<" if op == ">" else "<="
    if op == "<":
        return ("bool", f"({ahi} < {blo})", f"({alo} >= {bhi})")
    if op == "<=":
        return ("bool", f"({ahi} <= {blo})", f"({alo} > {bhi})")
    T = f"(({alo} == {ahi}) & ({blo} == {bhi}) & ({alo} == {blo}))"
    F = f"(({ahi} < {blo}) | ({bhi} < {alo}))"
    return ("bool", F, T) if op == "!=" else ("bool", T, F)


def _arithmetic_interval(n, ops):
    t = n.target
    if t in (aten.add.Tensor, aten.add.Scalar) and n.kwargs.get("alpha", 1) == 1:
        (_, alo, ahi), (_, blo, bhi) = ops
        return ("num", f"{alo} + {blo}", f"{ahi} + {bhi}")
    if t in (aten.sub.Tensor, aten.sub.Scalar) and n.kwargs.get("alpha", 1) == 1:
        (_, alo, ahi), (_, blo, bhi) = ops
        return ("num", f"{alo} - {bhi}", f"{ahi} - {blo}")
    if t is aten.neg.default:
        (_, alo, ahi), = ops
        return ("num", f"-({ahi})", f"-({alo})")
    if t is aten.log.default:   # increasing; log(0) = -inf (Mistral's reference: log of a 0/1 mask), NaN below 0
        (_, alo, ahi), = ops
        return ("num", f"tl.log({alo} * 1.0)", f"tl.log({ahi} * 1.0)")
    if t is aten.abs.default:
        (_, alo, ahi), = ops
        return ("num", f"tl.where({alo} >= 0, {alo}, tl.where({ahi} <= 0, -({ahi}), 0))",
                f"tl.maximum(-({alo}), {ahi})")
    if t in (aten.mul.Tensor, aten.mul.Scalar):   # by a constant only
        c = _literal(n.args[1]) if not isinstance(n.args[1], fx.Node) else _literal(n.args[0]) \
            if not isinstance(n.args[0], fx.Node) else None
        if c is None:
            return None
        (_, lo, hi) = ops[0] if isinstance(n.args[0], fx.Node) else ops[1]
        return ("num", f"{lo} * {c!r}", f"{hi} * {c!r}") if c >= 0 else ("num", f"{hi} * {c!r}", f"{lo} * {c!r}")
    return None


@dataclass
class TileClassifier:
    """Scalar predicates over one (query tile, key tile), emitted as lines of Triton."""
    empty: str                       # name of a scalar: the masks remove every score of the tile
    full: str                        # name of a scalar: the masks keep every score of the tile
    dropped: dict = field(default_factory=dict)   # where node -> index of the branch kept on full tiles
    reads_tensors: bool = False      # classified by a separate kernel (True) or a scan in the kernel
    batch_axes: tuple = ()           # batch axes the classification depends on
    row_checks: dict = field(default_factory=dict)  # amax node -> threshold its rows' max must exceed
                                                    # (finite fills) for the skipped tiles to add nothing
    added: int = 0                   # how many of the masks are tensors added to the scores


def emit_tile_skip(region: Region, emitter, lines, pre_lines, finite: bool = False):
    """Emit the tile predicates into `lines` (per key tile) and `pre_lines` (per query tile); `finite`:
    finite fills may skip tiles too (the forward then checks each row's max, TileClassifier.row_checks)."""
    empty, full, dropped, row_checks = [], [], {}, {}
    iv = IntervalEmitter(region, emitter, lines, pre_lines)
    for cond, br, ws, checks in skippable_masks(region, finite):
        if br == ADDED:   # cond is the mask added to the scores (by each add in ws, raw or clamped)
            index = {add: i for add, i in additive_masks(region) if add in ws}   # the mask's operand
            if cond in set(region.nodes):
                res = iv.value(cond)
            else:   # an input: read where an add (or the clamp before it) takes it as an operand
                reader, i = next(((a, i) for a, i in index.items() if a.args[i] is cond),
                                 next((a.args[i], 0) for a, i in index.items()))
                res = iv.operand(reader, i)
            if res is None or res[0] != "num":
                continue
            _, lo, hi = res
            empty.append(f"({hi} <= {ABSORBING!r})")
            full.append(f"(({lo} == 0) & ({hi} == 0))")
            dropped.update({add: 1 - i for add, i in index.items()})
            for R, threshold in checks.items():
                row_checks[R] = max(row_checks.get(R, -math.inf), threshold)
            continue
        res = iv.value(cond) if cond in set(region.nodes) else iv.operand(next(iter(ws)), 0)
        if res is None or res[0] != "bool":
            continue
        _, true_everywhere, false_everywhere = res
        # -inf in the true branch: the tile is removed where cond is true everywhere, kept where false
        empty.append(true_everywhere if br == 1 else false_everywhere)
        full.append(false_everywhere if br == 1 else true_everywhere)
        dropped.update({w: 3 - br for w in ws})
        for R, threshold in checks.items():
            row_checks[R] = max(row_checks.get(R, -math.inf), threshold)
    if not empty:
        return None
    lines.append(f"tile_empty = {' | '.join(empty)}  # the masks remove every score of this tile")
    lines.append(f"tile_full = {' & '.join(full)}  # the masks keep every score of this tile")
    return TileClassifier("tile_empty", "tile_full", dropped, iv.reads_tensors,
                          tuple(a for a in region.batch_axes if a in iv.batch_axes), row_checks,
                          sum(1 for w in dropped if w.target is aten.add.Tensor))
