"""Value ranges of the integers a kernel computes, to spell them in 32 bits wherever that is exact.

torch does index math in int64 (`arange`, `.long()`); 64-bit integer arithmetic costs a GPU several
instructions per op, and a T5 relative-position bucket (abs, a float log, `.long()`, min, where) computed
per score element made its kernels' index math cost more than their matmuls. The kernel spells these
integers in int32 when every value eager can give them fits int32, and widens positions to int64 where one
may not (int32 positions would overflow where eager's int64 do not: `i * j` at long sequences).

Ranges are intervals, found in one pass over the region's ops. Floats carry what a float→int conversion
needs: bounds of their finite values, a gap (no finite value lies strictly between 0 and ±gap: integers
converted to float, then scaled), and whether ±inf or NaN may occur. Converting ±inf or NaN to an integer is
undefined in eager too (T5 takes log(0) = -inf at distance 0, converts it, and then selects another value
there), so such elements only mark the result as possibly undefined; the check is on the defined values.

The ranges also decide how an integer division or remainder by a divisor >= 1 is spelled (integer_division):
Triton's `//` and `%` where the dividend is never negative, the sign put back around |dividend| otherwise."""
import math
from dataclasses import dataclass

import torch
from torch import fx

from flashlight.compiler.analysis import (CASTS, GATHERS, INTEGER_DIVISIONS, REMAINDERS, WHERE, Region, constant_value,
                                          shape_of)
from flashlight.compiler.indexing import VIEW_OPS

aten = torch.ops.aten
INT32 = (-2**31, 2**31 - 1)
INF = math.inf


@dataclass(frozen=True)
class Ints:
    lo: float
    hi: float
    undefined: bool = False   # may hold a value converted from ±inf or NaN (undefined in eager too)


@dataclass(frozen=True)
class Floats:
    lo: float                 # bounds of the finite values (±inf: unbounded)
    hi: float
    gap: float | None = None  # no finite value strictly between 0 and ±gap
    specials: frozenset = frozenset()   # of "-inf", "+inf", "nan"


ANY_INT = Ints(-INF, INF, True)
ANY_FLOAT = Floats(-INF, INF, None, frozenset({"-inf", "+inf", "nan"}))


def _is_int(dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex


def _scalar(v):
    if isinstance(v, bool):
        return Ints(int(v), int(v))
    if isinstance(v, int):
        return Ints(v, v)
    if isinstance(v, float):
        if math.isnan(v):
            return Floats(INF, -INF, None, frozenset({"nan"}))
        if math.isinf(v):
            return Floats(INF, -INF, None, frozenset({"+inf" if v > 0 else "-inf"}))
        return Floats(v, v, abs(v) or None)
    return None


def _mul_bounds(a, b):
    def times(x, y):   # bounds of finite products: an unbounded side times 0 is 0
        return 0.0 if x == 0 or y == 0 else x * y
    corners = [times(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    return min(corners), max(corners)


def _floats(v) -> Floats:
    if isinstance(v, Ints):   # an integer read as a float: its nonzero values are at least 1 in size
        return Floats(v.lo, v.hi, 1.0, frozenset({"nan"}) if v.undefined else frozenset())
    return v


def _add(a, b, sign=1):
    if isinstance(a, Ints) and isinstance(b, Ints):
        lo, hi = (a.lo + b.lo, a.hi + b.hi) if sign > 0 else (a.lo - b.hi, a.hi - b.lo)
        return Ints(lo, hi, a.undefined or b.undefined)
    a, b = _floats(a), _floats(b)
    lo, hi = (a.lo + b.lo, a.hi + b.hi) if sign > 0 else (a.lo - b.hi, a.hi - b.lo)
    specials = set(a.specials | b.specials)
    if {"+inf", "-inf"} <= specials:
        specials.add("nan")
    if sign < 0:
        specials |= {"+inf" if "-inf" in b.specials else "", "-inf" if "+inf" in b.specials else ""} - {""}
    return Floats(lo, hi, None, frozenset(specials))


def _mul(a, b):
    lo, hi = _mul_bounds(a, b)
    if isinstance(a, Ints) and isinstance(b, Ints):
        return Ints(lo, hi, a.undefined or b.undefined)
    a, b = _floats(a), _floats(b)
    gap = a.gap * b.gap if a.gap and b.gap else None
    specials = set(a.specials | b.specials)
    if specials & {"+inf", "-inf"}:
        specials |= {"+inf", "-inf", "nan"}
    return Floats(lo, hi, gap, frozenset(specials))


def _neg(a):
    if isinstance(a, Ints):
        return Ints(-a.hi, -a.lo, a.undefined)
    flip = {"+inf": "-inf", "-inf": "+inf", "nan": "nan"}
    return Floats(-a.hi, -a.lo, a.gap, frozenset(flip[s] for s in a.specials))


def _abs(a):
    lo = 0 if a.lo <= 0 <= a.hi else min(abs(a.lo), abs(a.hi))
    hi = max(abs(a.lo), abs(a.hi))
    if isinstance(a, Ints):
        return Ints(lo, hi, a.undefined)
    specials = {"+inf" if s != "nan" else "nan" for s in a.specials}
    return Floats(lo, hi, a.gap, frozenset(specials))


def _log(a):
    a = _floats(a)
    specials = set()
    if a.lo < 0 or "-inf" in a.specials or "nan" in a.specials:
        specials.add("nan")
    if a.lo <= 0 <= a.hi:
        specials.add("-inf")
    if "+inf" in a.specials:
        specials.add("+inf")
    if a.hi <= 0:
        return Floats(INF, -INF, None, frozenset(specials))
    low = a.lo if a.lo > 0 else (a.gap or 0.0)
    return Floats(math.log(low) if low > 0 else -INF, math.log(a.hi), None, frozenset(specials))


def _union(a, b):
    if isinstance(a, Ints) and isinstance(b, Ints):
        return Ints(min(a.lo, b.lo), max(a.hi, b.hi), a.undefined or b.undefined)
    a, b = _floats(a), _floats(b)
    gap = min(a.gap, b.gap) if a.gap and b.gap else None
    return Floats(min(a.lo, b.lo), max(a.hi, b.hi), gap, a.specials | b.specials)


def _extreme(a, b, largest: bool):
    pick = max if largest else min
    if isinstance(a, Ints) and isinstance(b, Ints):
        return Ints(pick(a.lo, b.lo), pick(a.hi, b.hi), a.undefined or b.undefined)
    a, b = _floats(a), _floats(b)
    return Floats(pick(a.lo, b.lo), pick(a.hi, b.hi), None, a.specials | b.specials)


def _cast(a, dtype):
    if dtype == torch.bool:
        return Ints(0, 1, getattr(a, "undefined", False) or "nan" in getattr(a, "specials", ()))
    if not _is_int(dtype):
        return _floats(a)
    if isinstance(a, Ints):
        info = torch.iinfo(dtype)
        return a if info.min <= a.lo and a.hi <= info.max else Ints(info.min, info.max, a.undefined)
    if math.isinf(a.lo) or math.isinf(a.hi):
        return ANY_INT
    if a.lo > a.hi:   # no finite value: only infinities or NaN
        return Ints(0, 0, True)
    return Ints(math.trunc(a.lo), math.trunc(a.hi), bool(a.specials))


def _integer_division(t, mode, a, b):
    """a // b (floor or truncated), remainder (the divisor's sign) or fmod (the dividend's) of integers, by
    divisors b >= 1 only (what codegen fuses)."""
    if not isinstance(a, Ints) or not isinstance(b, Ints) or b.lo < 1 or math.isinf(a.lo) or math.isinf(a.hi):
        return ANY_INT
    undefined = a.undefined or b.undefined
    if t in INTEGER_DIVISIONS:
        if mode == "trunc":
            def q(x, y):
                return -(-x // y) if x < 0 else x // y
        else:
            def q(x, y):
                return x // y
        ends = [q(x, y) for x in (a.lo, a.hi) for y in (b.lo, b.hi) if not math.isinf(y)] or [0]
        if math.isinf(b.hi):   # an unbounded divisor takes quotients towards 0 (or -1, flooring)
            ends += [0, -1]
        return Ints(min(ends), max(ends), undefined)
    biggest = b.hi - 1
    if t in (aten.remainder.Scalar, aten.remainder.Tensor):   # the divisor's sign: 0 .. b - 1
        return Ints(0, min(biggest, a.hi) if a.lo >= 0 else biggest, undefined)
    return Ints(max(-biggest, a.lo) if a.lo < 0 else 0, min(biggest, a.hi) if a.hi > 0 else 0, undefined)


def _float_unary(t, a):
    a = _floats(a)
    if t is aten.sigmoid.default:
        return Floats(0.0, 1.0, None, a.specials & {"nan"})
    if t is aten.tanh.default:
        return Floats(-1.0, 1.0, None, a.specials & {"nan"})
    if t is aten.relu.default:
        return _extreme(a, Ints(0, 0), largest=True)
    if t is aten.log.default:
        return _log(a)
    return ANY_FLOAT


def _positions(acc) -> Ints:
    """The values of an arange: start, start + step, ..., over its length."""
    t, args = acc.source.target, acc.source.args
    start = 0 if t is aten.arange.default else args[0]
    step = args[2] if t is aten.arange.start_step else 1
    last = start + step * (shape_of(acc.source)[0] - 1)
    return Ints(min(start, last), max(start, last))


def _value(x, region: Region, values, node, i):
    """The range of an operand: a Python scalar, an internal node, or a value read from outside."""
    if not isinstance(x, fx.Node):
        return _scalar(x)
    if x in values:
        return values[x]
    acc = region.accesses.get((node, i))
    if acc is None:
        return None
    dtype = acc.dtype
    if acc.kind == "iota":
        return _positions(acc) if _is_int(dtype) else _floats(_positions(acc))
    if acc.kind == "const":
        return _scalar(constant_value(acc.source))
    if dtype == torch.bool:
        return Ints(0, 1)
    return Ints(torch.iinfo(dtype).min, torch.iinfo(dtype).max) if _is_int(dtype) else ANY_FLOAT


def analyse(region: Region) -> dict:
    """Each internal node's range (any value of its dtype where the op is not one this module knows)."""
    values = {}
    for n in region.nodes:
        if not isinstance(n.meta.get("val"), torch.Tensor):
            values[n] = ANY_FLOAT
            continue
        dtype = n.meta["val"].dtype
        args = [_value(a, region, values, n, i) for i, a in enumerate(n.args)]
        args = [a if a is not None else (ANY_INT if _dtype(x) is not None and _is_int(_dtype(x)) else ANY_FLOAT)
                for a, x in zip(args, n.args)]
        values[n] = _transfer(n, args, dtype)
    return values


def _dtype(x):
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _transfer(n, args, dtype):
    t = n.target
    unknown = ANY_INT if _is_int(dtype) else ANY_FLOAT
    if t in CASTS:
        return _cast(args[0], dtype)
    if t in VIEW_OPS:
        return args[0]
    if t in GATHERS:
        return unknown
    if t in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
        b = args[1]
        alpha = n.kwargs.get("alpha", 1)
        if alpha != 1:
            b = _mul(b, _scalar(alpha))
        return _add(args[0], b, 1 if t in (aten.add.Tensor, aten.add.Scalar) else -1)
    if t in (aten.mul.Tensor, aten.mul.Scalar):
        return _mul(args[0], args[1])
    if t in (aten.div.Tensor, aten.div.Scalar):
        c = constant_value(n.args[1]) if isinstance(n.args[1], fx.Node) else n.args[1]
        if isinstance(c, (int, float)) and not isinstance(c, bool) and c != 0 and math.isfinite(c):
            return _mul(_floats(args[0]), _scalar(1.0 / c))
        return unknown
    if t is aten.neg.default:
        return _neg(args[0])
    if t is aten.abs.default:
        return _abs(args[0])
    if dtype == torch.bool:   # comparisons, logical ops
        return Ints(0, 1)
    if t is aten.bitwise_and.Tensor and args[0].lo >= 0 and args[1].lo >= 0:
        return Ints(0, min(args[0].hi, args[1].hi), args[0].undefined or args[1].undefined)
    if t in (aten.maximum.default, aten.clamp_min.default):
        return _extreme(args[0], args[1], largest=True)
    if t in (aten.minimum.default, aten.clamp_max.default):
        return _extreme(args[0], args[1], largest=False)
    if t is aten.clamp.default:
        x = args[0]
        if len(args) > 1 and n.args[1] is not None:
            x = _extreme(x, args[1], largest=True)
        if len(args) > 2 and n.args[2] is not None:
            x = _extreme(x, args[2], largest=False)
        return x
    if t in WHERE:
        return _union(args[1], args[2])
    if (t in INTEGER_DIVISIONS or t in REMAINDERS) and _is_int(dtype):
        return _integer_division(t, n.kwargs.get("rounding_mode", "floor"), *args)
    if t is aten.pow.Tensor_Scalar and n.args[1] == 1:
        return args[0]
    if not _is_int(dtype):
        return _float_unary(t, args[0]) if args else unknown
    return unknown


def operand_range(region: Region, values: dict, node, i):
    """The range of operand i of an internal node (values: analyse(region)); None where unknown."""
    return _value(node.args[i], region, values, node, i)


def _fits(v: Ints) -> bool:
    """Within int32, with a margin of 1/64: float bounds here are float64 arithmetic, eager's float32 or
    16-bit (a bfloat16 value near 2**31 may round 1/256 above the bound found here)."""
    margin = 2**31 // 64
    return INT32[0] + margin <= v.lo and v.hi <= INT32[1] - margin


def index_bits(region: Region, values: dict | None = None) -> int:
    """32 where every integer the kernel computes from positions or converts to int64 fits int32 in all
    its defined values (the kernel then spells those conversions and positions in int32), else 64 (the
    kernel computes them in int64, as eager). Integers only read from tensors keep their own dtype: int64
    data stays int64, and mixing it in widens as in torch."""
    values = analyse(region) if values is None else values
    own = set()   # nodes whose bits the kernel chooses: computed from positions or from an int64 conversion
    for n in region.nodes:
        reads_iota = any(isinstance(a, fx.Node) and (acc := region.accesses.get((n, i))) is not None and
                         acc.kind == "iota" for i, a in enumerate(n.args))
        widened = n.target in CASTS and _dtype(n) == torch.int64 and _dtype(n.args[0]) != torch.int64
        if reads_iota or widened or any(a in own for a in n.args if isinstance(a, fx.Node)):
            own.add(n)
    for n in own:
        dtype = _dtype(n)
        if dtype is not None and _is_int(dtype) and dtype != torch.bool and not _fits(values[n]):
            return 64
    for acc in region.accesses.values():
        if acc.kind == "iota" and not _fits(_positions(acc)):
            return 64
        if acc.gather and acc.source.meta["val"].numel() >= 2**31:   # index × stride in int32
            return 64
    return 32


def integer_division(target, mode: str, x: str, y: str, nonnegative: bool) -> str:
    """Triton code of x // y (rounding `mode`: floor or trunc), remainder or fmod, for a divisor y >= 1."""
    division = target in INTEGER_DIVISIONS
    if nonnegative:
        return f"({x} {'//' if division else '%'} {y})"
    quotient, rest = f"(tl.abs({x}) // {y})", f"(tl.abs({x}) % {y})"   # of |x|: the same in both roundings
    if division and mode == "trunc":
        return f"tl.where({x} < 0, -{quotient}, {quotient})"
    if division:   # floor: one lower where x < 0 leaves a remainder
        return f"tl.where({x} < 0, -{quotient} - tl.where({rest} != 0, 1, 0), {quotient})"
    if target in (aten.fmod.Scalar, aten.fmod.Tensor):   # the dividend's sign
        return f"tl.where({x} < 0, -{rest}, {rest})"
    return f"tl.where(({x} < 0) & ({rest} != 0), {y} - {rest}, {rest})"   # remainder: the divisor's sign
