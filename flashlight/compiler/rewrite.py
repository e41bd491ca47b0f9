"""Rewrite a region's dependent reductions into their online (one pass over keys) form.

Every internal value is classified:

* **early** — computable from one key tile alone (scores, masks, biases, exp(s - running max)…).
  An early value may carry a *scale degree* ``{R: k}``: it is proportional to ``exp(-max_R)^k`` for a
  row max ``R`` that is only known at the end. Such values are computed against the running max and
  every accumulator they feed is rescaled by ``exp(m_old - m_new)^k`` when the running max moves.
  This is the one rule for ``amax``: it holds for softmax, several softmaxes, unnormalised exp…
  ``exp(x - c)`` for any row value ``c`` (the row max, or the max of it and extra logits such as
  attention sinks) is computed as ``exp(x - mu_R)`` with ``R`` a row max of ``x``; its true value
  carries the late coefficient ``exp(mu_R - c)`` per degree. ``mu_R`` is the row max, or 0 on rows
  where it is -inf, so eager's NaN for softmax over a fully masked row comes out as ``0 · inf``.
* **late** — a row value that needs whole rows (a max, a sum, anything computed from them). Late
  values are only known after the loop.
* **mixed** — a tile value that depends on late values (``exp(s - m) / l``, ``p1 - λ·p2``). It is
  factored into a sum of terms ``coef · elem`` with ``coef`` late and ``elem`` early. The rule for
  a linear reduction (``sum`` over keys, the ``·V`` product) is then: one accumulator per term,
  combined with the late coefficients after the loop.

Anything else (a non-linear function of a late value, max of a normalised value…) needs the whole
row before the pass and raises NotFusable with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from flashlight.compiler.analysis import GATHERS, MATMULS, WHERE, NotFusable, Region, constant_value, flat_axes
from flashlight.compiler.indexing import VIEW_OPS

aten = torch.ops.aten


@dataclass(frozen=True)
class Term:
    coef: str | None        # late row expression (None = 1)
    elem: str | None        # early tile expression (None = 1)
    degree: tuple = ()      # sorted ((max node name, k), ...)


@dataclass
class Accumulator:
    name: str
    kind: str               # "sum" ([BLOCK_M, 1]) or "dot" ([BLOCK_M, BLOCK_E])
    elem: str | None
    degree: tuple


@dataclass
class OnlineProgram:
    region: Region
    kind: dict = field(default_factory=dict)     # node -> early | stabsub | late | mixed
    degree: dict = field(default_factory=dict)   # early node -> tuple((max name, k), ...)
    max_groups: dict = field(default_factory=dict)  # amax node -> its argument node
    stab_max: dict = field(default_factory=dict)    # stabsub node -> amax node
    group_ref: dict = field(default_factory=dict)   # amax name -> the row value subtracted in exp(x - c)
    accumulators: list = field(default_factory=list)
    sum_value: dict = field(default_factory=dict)   # sum node -> late expression over accumulators
    out_expr: str = ""
    notes: list = field(default_factory=list)       # what was matched, for explain


def vname(node):
    return f"t_{node.name}"


def lname(node):
    return f"r_{node.name}"


def has_axis(region, node, axis):
    return axis in flat_axes(region.axes[node])


def _through_views(node, internal):
    while node in internal and node.target in VIEW_OPS:
        node = node.args[0]
    return node


def _merge(d1, d2, sign=1):
    out = dict(d1)
    for k, v in d2:
        out[k] = out.get(k, 0) + sign * v
    if any(v < 0 for v in out.values()):
        raise NotFusable("division by a value scaled by exp(-row max)")
    return tuple(sorted((k, v) for k, v in out.items() if v))


def _is_zero(x):
    return isinstance(x, (int, float)) and x == 0


def build(region: Region, operand, prog: OnlineProgram | None = None) -> OnlineProgram:
    """`operand(consumer, index)` gives the code of a node argument (literal, load or value name)."""
    prog = prog or OnlineProgram(region)
    classify(region, prog)
    factor_reductions(region, prog, operand)
    n_soft = len(prog.max_groups)
    prog.notes.append(f"{len(region.scores)} score matmul(s); {n_soft} running max(es); "
                      f"{sum(a.kind == 'sum' for a in prog.accumulators)} running sum(s); "
                      f"{sum(a.kind == 'dot' for a in prog.accumulators)} ·V accumulator(s)")
    return prog


def classify(region: Region, prog: OnlineProgram) -> None:
    """Step 1: every internal value early, stabsub, late or mixed, with its scale degree (module doc)."""
    internal = set(region.nodes)
    kind, degree = prog.kind, prog.degree

    def arg_info(node, i):
        a = node.args[i]
        if isinstance(a, fx.Node) and a in internal:
            return kind[a], degree.get(a, ())
        return "early", ()

    for node in region.nodes:
        t = node.target
        if t in MATMULS:
            kind[node], degree[node] = "early", ()
            continue
        if t in VIEW_OPS:
            src = node.args[0]
            kind[node] = kind[src]
            if src in degree:
                degree[node] = degree[src]
            if src in prog.stab_max:
                prog.stab_max[node] = prog.stab_max[src]
            continue
        if t is aten.amax.default:
            x = node.args[0]
            k, d = arg_info(node, 0)
            if k != "early" or d:
                raise NotFusable("max over keys of a value that is already normalised or rescaled")
            kind[node] = "late"
            prog.max_groups[node] = x
            continue
        if t is aten.sum.dim_IntList:
            kind[node] = "late"
            continue
        if t in GATHERS:  # table[index]: the index must be a tile value, known before the load
            ixs = [ix for ix in node.args[1] if isinstance(ix, fx.Node) and ix in internal]
            if any(kind[ix] != "early" or degree.get(ix) for ix in ixs):
                raise NotFusable("table indexed by a value that needs whole rows")
            kind[node], degree[node] = "early", ()
            continue
        infos = [arg_info(node, i) for i, a in enumerate(node.args) if isinstance(a, fx.Node)]
        kinds = {k for k, _ in infos}
        if "stabsub" in kinds:
            if t is not aten.exp.default:
                raise NotFusable(f"x - rowmax is used by {t}, not only by exp (cannot rescale online)")
            (src,) = [a for a in node.args if isinstance(a, fx.Node)]
            kind[node] = "early"
            degree[node] = ((prog.stab_max[src].name, 1),)
            continue
        if kinds <= {"early"}:
            kind[node] = "early"
            degree[node] = _early_degree(node, infos, arg_info)
            continue
        if t is aten.sub.Tensor and isinstance(node.args[1], fx.Node) and node.args[1] in internal:
            r = _through_views(node.args[1], internal)
            k0, d0 = arg_info(node, 0)
            if kind.get(r) == "late" and k0 == "early" and not d0 and has_axis(region, node, "n"):
                # x - c: c a row max (any), or another row value while x has a row max of its own
                R = r if r.target is aten.amax.default else _row_max_of(prog, node.args[0], internal)
                if R is not None:
                    if prog.group_ref.setdefault(R.name, r) is not r:
                        raise NotFusable(f"exp(x - c) with two different row values c for the row max {R.name}")
                    kind[node] = "stabsub"
                    prog.stab_max[node] = R
                    continue
        kind[node] = "mixed" if has_axis(region, node, "n") else "late"


def factor_reductions(region: Region, prog: OnlineProgram, operand) -> None:
    """Step 2: each linear reduction over keys (sum, ·V) as row coefficients × accumulators of early
    tile values (module doc); sets prog.accumulators, prog.sum_value and prog.out_expr."""
    internal = set(region.nodes)
    kind, degree = prog.kind, prog.degree
    memo: dict = {}

    def terms(node):
        if not isinstance(node, fx.Node) or node not in internal:
            raise AssertionError
        if node in memo:
            return memo[node]
        k = kind[node]
        if k == "early":
            deg = degree.get(node, ())
            coef = None
            for R, power in deg:  # exp(x - mu_R) · exp(mu_R - c) = exp(x - c)
                for _ in range(power):
                    coef = _mul(coef, f"tl.exp(mu_{R} - {lname(prog.group_ref[R])})")
            res = [Term(coef, vname(node), deg)]
        elif k == "late":
            res = [Term(lname(node), None, ())]
        elif k == "stabsub":
            raise NotFusable("x - rowmax used outside exp")
        else:
            res = _factor_mixed(node, terms, arg_terms, operand, kind, internal)
        memo[node] = res
        return res

    def arg_terms(node, i):
        a = node.args[i]
        if isinstance(a, fx.Node) and a in internal:
            return terms(a)
        return [Term(None, operand(node, i), ())]

    def reduce_terms(src_terms, kind_, label):
        out = []
        for tm in src_terms:
            # reuse an accumulator for an identical elem (e.g. the softmax sum shared by ·V)
            for acc in prog.accumulators:
                if acc.kind == kind_ and acc.elem == tm.elem and acc.degree == tm.degree:
                    break
            else:
                acc = Accumulator(f"{'l' if kind_ == 'sum' else 'acc'}{len(prog.accumulators)}",
                                  kind_, tm.elem, tm.degree)
                prog.accumulators.append(acc)
            out.append(_scaled(tm.coef, acc.name) if tm.coef else acc.name)
        return " + ".join(out) if out else "0.0"

    for node in region.epilogue:
        for a in node.all_input_nodes:
            if a in internal and kind[a] not in ("late",):
                raise NotFusable(f"{a.name} is used after ·V but varies along the keys")
        kind[node] = "late"
    kind[region.pv] = "late"

    for node in region.nodes:
        if node.target is aten.sum.dim_IntList:
            x = node.args[0]
            src_terms = terms(x) if x in internal else [Term(None, operand(node, 0), ())]
            prog.sum_value[node] = "(" + reduce_terms(src_terms, "sum", node.name) + ")"
    prog.out_expr = reduce_terms(terms(region.pv.args[0]), "dot", "out")


def _factor_mixed(node, terms, arg_terms, operand, kind, internal):
    """The terms (row coefficient × tile value) of a mixed value, from its arguments' terms."""
    t = node.target
    if t in VIEW_OPS:
        return terms(node.args[0])
    if t in (aten.add.Tensor, aten.sub.Tensor):
        sign = -1 if t is aten.sub.Tensor else 1
        alpha = node.kwargs.get("alpha", 1)
        rhs = arg_terms(node, 1)
        scale = sign * alpha
        if scale != 1:
            rhs = [Term(_mul(tm.coef, repr(float(scale))), tm.elem, tm.degree) for tm in rhs]
        return arg_terms(node, 0) + rhs
    if t is aten.neg.default:
        return [Term(_mul(tm.coef, "-1.0"), tm.elem, tm.degree) for tm in arg_terms(node, 0)]
    if t is aten.mul.Tensor or t is aten.mul.Scalar:
        out = []
        for a in arg_terms(node, 0):
            for b in arg_terms(node, 1):
                out.append(Term(_mul(a.coef, b.coef), _mul(a.elem, b.elem), _merge(a.degree, b.degree)))
        return out
    if t in (aten.div.Tensor, aten.div.Scalar):
        den = arg_terms(node, 1)
        if len(den) != 1:
            raise NotFusable("division by a sum of row-dependent terms")
        (b,) = den
        if b.degree:
            raise NotFusable("division by a value scaled by exp(-row max)")
        return [Term(_div(a.coef, b.coef), _div(a.elem, b.elem), a.degree) for a in arg_terms(node, 0)]
    if t in WHERE:
        cond = node.args[0]
        if isinstance(cond, fx.Node) and cond in internal and kind[cond] != "early":
            raise NotFusable("mask that depends on whole rows")
        c = operand(node, 0)
        out = []
        for i, keep in ((1, True), (2, False)):
            a = node.args[i]
            if _is_zero(a) or (isinstance(a, fx.Node) and constant_value(a) == 0):
                continue
            for tm in arg_terms(node, i):
                e = tm.elem or "1.0"
                elem = f"tl.where({c}, {e}, 0.0)" if keep else f"tl.where({c}, 0.0, {e})"
                out.append(Term(tm.coef, elem, tm.degree))
        return out
    raise NotFusable(f"{t} applied to a value that needs whole rows (after normalisation)")


def _row_max_of(prog, x, internal):
    """The row max (amax over keys) of x already in the program, if any."""
    x = _through_views(x, internal)
    for R, arg in prog.max_groups.items():
        if _through_views(arg, internal) is x:
            return R
    return None


def _early_degree(node, infos, arg_info):
    """Scale degree of an early elementwise value from its inputs' degrees (see module doc)."""
    t = node.target
    degs = [d for _, d in infos]
    if not any(degs):
        return ()
    if t in (aten.mul.Tensor, aten.mul.Scalar):
        out = ()
        for d in degs:
            out = _merge(out, d)
        return out
    if t in (aten.div.Tensor, aten.div.Scalar):
        d0 = arg_info(node, 0)[1] if isinstance(node.args[0], fx.Node) else ()
        d1 = arg_info(node, 1)[1] if isinstance(node.args[1], fx.Node) else ()
        return _merge(d0, d1, -1)
    if t in (aten.add.Tensor, aten.sub.Tensor, aten.maximum.default, aten.minimum.default):
        if len(set(degs)) != 1 or len(degs) != 2:
            raise NotFusable("sum of values with different exp(-row max) scales")
        return degs[0]
    if t in (aten.neg.default, aten.relu.default):
        return degs[0]
    if t in WHERE:
        vals = [a for a in node.args[1:]]
        ds = [arg_info(node, i + 1)[1] if isinstance(a, fx.Node) else () for i, a in enumerate(vals)]
        if arg_info(node, 0)[1]:
            raise NotFusable("mask computed from a rescaled value")
        nonzero = [d for a, d in zip(vals, ds) if not (_is_zero(a) or (isinstance(a, fx.Node) and constant_value(a) == 0))]
        if len(set(nonzero)) > 1:
            raise NotFusable("where() between values with different exp(-row max) scales")
        return nonzero[0] if nonzero else ()
    raise NotFusable(f"{t} of a value scaled by exp(-row max) cannot be rescaled online")


def _mul(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return f"({a}) * ({b})"


def _scaled(coef, acc):
    """coef · acc, written acc / x where coef is 1 / x: the backward's row step differentiates these lines
    with torch, and the derivative of 1 / x, -(1 / x)², overflows float32 once x < 1e-19 (a row of a
    softmax without max subtraction whose scores are all below -44), where that of acc / x does not."""
    prefix = "(1.0) / ("
    if coef.startswith(prefix) and _balanced(coef[len(prefix):-1]):
        return f"({acc}) / ({coef[len(prefix):-1]})"
    return _mul(coef, acc)


def _balanced(code: str) -> bool:
    depth = 0
    for ch in code:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _div(a, b):
    if b is None:
        return a
    return f"({a if a is not None else '1.0'}) / ({b})"
