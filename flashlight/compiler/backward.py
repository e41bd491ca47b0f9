"""Generate the backward of a fused attention region: two Triton kernels over recomputed score tiles.

The forward (codegen.py, ``training=True``) also stores its online accumulators and running maxes.
The backward is derived from the same analysed region and online program, never per variant:

1. Row values (late.py, PyTorch): the lines the forward runs after its key loop (row values, the
   ·V combination, the epilogue) are run again on the saved accumulators, all rows at once, and
   torch.autograd differentiates them. That gives the gradient of the ·V product (``dPV``), of every
   row sum (``g_<sum>``) and of the inputs only row values read (sink logits, gates), plus every row
   value the tiles need. Row tensors only, nothing of size queries × keys.
2. Tiles (this module): each score tile is recomputed at its true value (``exp(x - c)`` from the row
   value ``c`` it was normalised by), then differentiated in reverse, op by op, with torch's
   derivative formulas written in Triton (``_vjp``). Seeds: ``dP = dPV·Vᵀ`` for the probabilities fed
   to ·V, and ``g_<sum>`` for what each row sum adds up. The adjoint reaching each score matmul is
   dS: ``dQ = dS·K``, ``dK = dSᵀ·Q``, and ``dV = Pᵀ·dPV``. Score-side inputs (biases, slopes, λ,
   gathered tables, per-token gates) get their adjoint summed over the axes they are broadcast
   along, and added atomically into a float32 buffer of their own shape (a table gathered by index
   gets a scatter-add). One kernel per query tile (dQ and the score-side inputs), one per key tile
   (dK, dV); tiles every -inf mask removes are skipped in both.

The derivative of the row max is not propagated: the program must not depend on the max except
through exp(x - max) normalised away, which late.check_shift_invariance proves before fusing.
"""
from __future__ import annotations

import hashlib
import math
import re
import textwrap
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from flashlight.compiler.analysis import (GATHERS, MATMULS, WHERE, NotFusable, Region, constant_value, flat_axes,
                                         literal)
from flashlight.compiler.codegen import (CASTS, LOG2E, LoadSlot, _batch_decomposition, _batch_row, _classifier,
                                         _contig, constant_factor, cuda_core_dots,
                                         _Emitter, _forward_copies, _prune, access_layout, dot, source_header,
                                         tile_loops, tile_range_lines)
from flashlight.compiler.indexing import VIEW_OPS, freeze_chain
from flashlight.compiler.late import check_shift_invariance
from flashlight.compiler.rewrite import OnlineProgram, build, lname, vname
from flashlight.compiler.sparsity import emit_tile_skip

aten = torch.ops.aten

# gradient sums need no ordering between programs, only atomicity (triton's default, acq_rel, fences each add)
RELAXED = ', sem="relaxed"'


@dataclass
class BackwardSource:
    source: str
    dq_name: str | None           # None when no gradient is summed per query tile (only V's is asked for)
    dkv_name: str | None          # None when neither K nor V of any score needs a gradient
    dq_slots: tuple               # (input LoadSlots, gradient-buffer LoadSlots) of the dQ kernel
    dkv_slots: tuple
    grad_leaves: tuple            # leaf indices that get a gradient buffer, in kernel-argument order
    row_names: tuple              # per-row values the kernels load (late.py computes them), in order
    needs: tuple
    stored: tuple = ()            # inputs whose gradient is written whole in their own dtype (no zero fill)
    classifiers: tuple = (None, None)  # per kernel (dQ, dK/dV): its tile classification kernel, if masks read data
    value_leaf: int = 0           # the input ·V reads (the row step gives dPV in its dtype)
    range_rows: int = 1           # batch rows of the classification tables (the batch axes the masks read)
    classifier_reads: tuple = ()  # the inputs the classification kernels load (their tables depend on them only)
    row_checks: dict = field(default_factory=dict)  # saved row max -> threshold (finite mask fills, see codegen)
    reads_dout: bool = False      # the kernels read dO itself (times a factor per row where not 1): the output
                                  # is linear in one accumulator (late.row_scaled_accumulator)
    sizes: dict = field(default_factory=dict)
    batch: int = 1
    dkv_group: int = 1            # query heads per K/V head the dK/dV kernel loops over (its grid: batch / this)
    M: int = 0
    N: int = 0
    E: int = 0
    cuda_core_dots: bool = False  # float32 tiles at IEEE precision (codegen.cuda_core_dots): small tiles
    table_gradient: bool = False  # the dQ kernel sums a gathered table's gradient per entry (_table_gradient)


class _TileEmitter(_Emitter):
    """The forward's emitter, with loads placed by the axis this kernel loops over."""

    def __init__(self, region: Region, loop_axis: str):
        super().__init__(region, None)
        self.loop_axis = loop_axis   # "n": one program per query tile; "m": one per key tile
        # tile orientation: (rows, columns). Per key tile the tiles are transposed, [keys, queries], so
        # that dV = Pᵀ·dO and dK = dSᵀ·Q multiply computed tiles as they are (a transpose of a
        # computed tile costs a trip through shared memory; of a loaded one, nothing)
        self.ctx = ("m", "n") if loop_axis == "n" else ("n", "m")
        self.grad_slots: list = []
        self.grad_params: list = []
        self.full_code: dict = {}    # code -> the code used instead on tiles the masks keep whole
        self.stored: set = set()     # inputs whose gradient this kernel stores whole (see _exclusive)
        self.group = None            # (batch axis, G, inner): the K/V heads' query heads looped over (_kv_group)
        self.heads_together = False  # programs ordered batch index fastest (see _Kernel.body)

    def expr(self, node):
        # x / row value: one reciprocal per row, a multiply per element (division is slow on the GPU)
        if node.target is aten.div.Tensor and self.is_row_value(node.args[1]):
            return f"{self.float_operand(node, 0)} * (1.0 / {self.float_operand(node, 1)})"
        return super().expr(node)

    def is_row_value(self, a):
        return isinstance(a, fx.Node) and a in self.internal and self.prog.kind.get(a) == "late"

    def varies_with_keys(self, acc):   # here: varies along the loop axis
        axes = set(flat_axes(acc.axes)) | {a for _, _, ix in acc.gather for a in ix}
        return self.loop_axis in axes

    def operand(self, node, i, prog=None):
        a = node.args[i]
        if not isinstance(a, fx.Node):
            return literal(a)
        if a in self.internal or a is self.r.pv:
            return lname(a) if self.prog.kind[a] == "late" else vname(a)
        acc = self.r.accesses[(node, i)]
        return self.access(acc, self.ctx, self.loop if self.varies_with_keys(acc) else self.pre)

    def grad_address(self, acc, ctx):
        """(pointer + offsets, mask) of the gradient buffer (contiguous float32) of an access's tensor."""
        name = f"g{len(self.grad_slots)}"
        offs, params, used = self.address(acc, ctx, name)
        leaf = self.r.leaf_index(acc.source)
        self.grad_slots.append(LoadSlot(leaf, freeze_chain(acc.chain), acc.axes, params))
        self.grad_params += [p[0] for p in params]
        return f"grad{leaf}_ptr + {offs}", self.mask_expr(used, ctx)


def _floating(node):
    val = node.meta.get("val")
    return val is not None and val.dtype.is_floating_point


def _times(code, factor):
    return code if factor is None else f"{code} * {literal(factor)}"


def _vjp(em: _TileEmitter, node, g):
    """[(argument index, adjoint contribution)] of one op: torch's derivative formulas, in Triton."""
    t = node.target
    y = vname(node)
    x = lambda i: em.float_operand(node, i)  # noqa: E731
    if t in VIEW_OPS or t in CASTS:
        return [(0, g)] if node.args[0].meta["val"].dtype.is_floating_point else []
    if t in GATHERS:
        return [(0, g)]          # the table: a scatter-add at the gathered positions
    if node in em.prog.stab_max:          # x - c, c the row value it is normalised by (see module doc)
        return [(0, g)]
    if t in (aten.add.Tensor, aten.sub.Tensor):
        alpha = node.kwargs.get("alpha", 1)
        sign = -1 if t is aten.sub.Tensor else 1
        k = sign * alpha
        return [(0, g), (1, g if k == 1 else f"({literal(float(k))}) * {g}")]
    if t in (aten.add.Scalar, aten.sub.Scalar):
        return [(0, g)]
    if t is aten.mul.Tensor:
        return [(0, f"{g} * {x(1)}"), (1, f"{g} * {x(0)}")]
    if t is aten.mul.Scalar:
        return [(0, f"{g} * {x(1)}")]
    if t is aten.div.Tensor:
        inv = f"(1.0 / {x(1)})"
        return [(0, f"{g} * {inv}"), (1, f"-{g} * {y} * {inv}")]
    if t is aten.div.Scalar:
        return [(0, f"{g} / {x(1)}")]
    if t is aten.neg.default:
        return [(0, f"-{g}")]
    if t is aten.exp.default:
        return [(0, f"{g} * {y}")]
    if t is aten.exp2.default:
        return [(0, f"{g} * {y} * 0.6931471805599453")]
    if t is aten.log.default:
        return [(0, f"{g} / {x(0)}")]
    if t is aten.log1p.default:
        return [(0, f"{g} / (1.0 + {x(0)})")]
    if t is aten.expm1.default:
        return [(0, f"{g} * ({y} + 1.0)")]
    if t is aten.tanh.default:
        return [(0, f"{g} * (1.0 - {y} * {y})")]
    if t is aten.sigmoid.default:
        return [(0, f"{g} * {y} * (1.0 - {y})")]
    if t is aten.relu.default:
        return [(0, f"tl.where({y} > 0, {g}, 0.0)")]
    if t is aten.abs.default:
        return [(0, f"{g} * tl.where({x(0)} > 0, 1.0, tl.where({x(0)} < 0, -1.0, 0.0))")]
    if t is aten.sqrt.default:
        return [(0, f"{g} * 0.5 / {y}")]
    if t is aten.rsqrt.default:
        return [(0, f"{g} * -0.5 * {y} * {y} * {y}")]
    if t is aten.reciprocal.default:
        return [(0, f"-{g} * {y} * {y}")]
    if t is aten.square.default:
        return [(0, f"2.0 * {g} * {x(0)}")]
    if t is aten.erf.default:
        return [(0, f"{g} * 1.1283791670955126 * tl.exp(-{x(0)} * {x(0)})")]
    if t is aten.sin.default:
        return [(0, f"{g} * tl.cos({x(0)})")]
    if t is aten.cos.default:
        return [(0, f"-{g} * tl.sin({x(0)})")]
    if t in (aten.maximum.default, aten.minimum.default):
        # torch: the larger (smaller) input takes the gradient; ties split it evenly
        a, b = x(0), x(1)
        op = ">" if t is aten.maximum.default else "<"
        return [(0, f"tl.where({a} {op} {b}, {g}, tl.where({a} == {b}, 0.5 * {g}, 0.0))"),
                (1, f"tl.where({b} {op} {a}, {g}, tl.where({a} == {b}, 0.5 * {g}, 0.0))")]
    if t is aten.clamp_min.default:
        return [(0, f"tl.where({x(0)} >= {x(1)}, {g}, 0.0)")]
    if t is aten.clamp_max.default:
        return [(0, f"tl.where({x(0)} <= {x(1)}, {g}, 0.0)")]
    if t is aten.clamp.default:
        lo = node.args[1] if len(node.args) > 1 else None
        hi = node.args[2] if len(node.args) > 2 else None
        keep = [c for c in ((f"({x(0)} >= {literal(lo)})" if lo is not None else None),
                            (f"({x(0)} <= {literal(hi)})" if hi is not None else None)) if c]
        return [(0, f"tl.where({' & '.join(keep)}, {g}, 0.0)" if keep else g)]
    if t is aten.pow.Tensor_Scalar:
        p = node.args[1]
        if p == 1:
            return [(0, g)]
        if p == 2:
            return [(0, f"2.0 * {g} * {x(0)}")]
        if p == 0.5:
            return [(0, f"{g} * 0.5 / {y}")]
        if p == -1:
            return [(0, f"-{g} * {y} * {y}")]
        raise NotFusable(f"no derivative for pow with exponent {p}")
    if t in WHERE:
        c = em.operand(node, 0)
        out = [(1, f"tl.where({c}, {g}, 0.0)"), (2, f"tl.where({c}, 0.0, {g})")]
        kept = em.tiles.dropped.get(node) if em.tiles else None
        if kept:   # on tiles the masks keep whole, the kept branch takes all of the adjoint
            em.full_code[out[kept - 1][1]] = g
        return out
    if t in (aten.sign.default,) or not node.meta["val"].dtype.is_floating_point:
        return []   # piecewise constant, comparisons, logic: no gradient
    raise NotFusable(f"no derivative for {t} in the backward")


def backward_for(region: Region, ks, block_sparse: bool = True, requires_grad=None) -> BackwardSource:
    """The backward of a region whose training forward is `ks`, for the inputs that require grad;
    NotFusable (the reason) where the generated backward would not be exact. Generated now: the graph's
    nodes are gone once the region is replaced by the fused op."""
    why = check_shift_invariance(ks.row_program)
    if why:
        raise NotFusable(why)
    requires_grad = requires_grad or [True] * len(region.leaves)
    needs = tuple(_floating(leaf) and bool(rg) for leaf, rg in zip(region.leaves, requires_grad))
    reads_dout = bool(ks.row_program.get("row_linear"))   # the output is linear in one accumulator
    return generate_backward(region, needs, block_sparse, reads_dout=reads_dout,
                             scaled=reads_dout and not ks.row_program.get("out_is_pv"))


def generate_backward(region: Region, needs: tuple, block_sparse: bool = True,
                      reads_dout: bool = False, scaled: bool = False) -> BackwardSource:
    """The backward kernels of a region, for the leaves whose `needs` flag is set. `reads_dout`: the
    output is its one ·V accumulator times a factor per row, so dLoss/d(P·V) is dO times a factor per
    row (`scaled`; 1 where the output is the ·V product itself): the kernels read dO as given (no copy
    of dO of the output's size)."""
    dq = _tile_kernel(region, "n", needs, block_sparse, reads_dout, scaled)
    tiles = dq.em.tiles
    if not dq.em.grad_slots:   # no gradient per query tile (only V's is asked for: a frozen Q and K)
        dq = None
    dkv_needed = any(needs[region.leaf_index(a.source)] for sm in region.scores for a in (sm.k,)) or \
        needs[region.leaf_index(region.value.source)]
    dkv = _tile_kernel(region, "m", needs, block_sparse, reads_dout, scaled) if dkv_needed else None
    kernels = [k for k in (dq, dkv) if k is not None]
    row_names = tuple(sorted(set().union(*(k.rows for k in kernels)) - {"dpv"}))
    grad_leaves = tuple(i for i, n in enumerate(needs) if n)
    digest = hashlib.sha256((source_header() + "".join(k.text for k in kernels) + repr(row_names)).encode()
                            ).hexdigest()[:16]
    dq_name, dkv_name = (f"flashlight_bwd_dq_{digest}" if dq else None), (f"flashlight_bwd_dkv_{digest}" if dkv else None)
    sizes = region.sizes
    head = textwrap.dedent(f'''\
        # Generated by Flashlight: the backward of the fused attention region ending at `{region.pv.name}`.
        # batch dims {tuple(region.batch_sizes)}, queries {sizes["m"]}, keys {sizes["n"]}, value dim {sizes["e"]}
        ''') + source_header()
    source = head
    classifiers, reads = [], set()
    for kern, name in ((dq, dq_name), (dkv, dkv_name)):
        if kern is None:
            classifiers.append(None)
            continue
        cname = None
        if kern.classified:
            cname = f"classify_{name}"
            csrc = kern.classifier(cname)
            source += "\n\n" + csrc
            reads |= {int(i) for i in re.findall(r"\bin(\d+)_ptr\b", csrc.split("\n", 2)[2])}
        classifiers.append(cname)
        body = kern.body(row_names, grad_leaves)
        source += f"\n\n@triton.jit\ndef {name}({kern.signature(grad_leaves, len(row_names))}):\n" + body + "\n"
    range_rows = math.prod(sizes[a] for a in tiles.batch_axes) if tiles is not None and reads else 1
    # finite fills: the saved running max of each group, and the value at or below which a row was
    # removed everywhere (the forward's row check)
    row_checks = {f"m_{R.name}": float(t) for R, t in tiles.row_checks.items()} if tiles is not None else {}
    return BackwardSource(source, dq_name, dkv_name, (dq.em.slots, dq.em.grad_slots) if dq else ([], []),
                          (dkv.em.slots, dkv.em.grad_slots) if dkv else ([], []), grad_leaves, row_names,
                          tuple(needs), stored=tuple(sorted(set().union(*(k.em.stored for k in kernels)))),
                          sizes=dict(sizes), value_leaf=region.leaf_index(region.value.source),
                          classifiers=tuple(classifiers), range_rows=range_rows,
                          classifier_reads=tuple(sorted(reads)), row_checks=row_checks, reads_dout=reads_dout,
                          batch=math.prod(region.batch_sizes) if region.batch_sizes else 1,
                          cuda_core_dots=cuda_core_dots(region),
                          table_gradient=any(n.startswith("dtable") for k in kernels for n in k.carried),
                          dkv_group=dkv.em.group[1] if dkv and dkv.em.group else 1,
                          M=sizes["m"], N=sizes["n"], E=sizes["e"])


class _Kernel:
    """One backward kernel: a program per tile of the fixed axis, a loop over tiles of `loop_axis`."""

    def __init__(self, em, pre, loop, post, rows, text):
        self.em, self.pre, self.loop, self.post, self.rows, self.text = em, pre, loop, post, rows, text
        self.reads_dout = False   # dO read as given (set by _TileProgram.kernel)
        # masks that read data: the tiles they leave come from a classification kernel's table
        self.classified = em.tiles is not None and em.tiles.reads_tensors

    def classifier(self, name):
        """The source of this kernel's classification kernel (one program per tile pair)."""
        fixed = "m" if self.em.loop_axis == "n" else "n"
        ptrs = [f"in{i}_ptr" for i in range(len(self.em.r.leaves))]
        return _classifier(self.em, ptrs, ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"], fixed).format(name=name)

    def signature(self, grad_leaves, n_rows):
        r = self.em.r
        ptrs = [f"in{i}_ptr" for i in range(len(r.leaves))] + [f"grad{i}_ptr" for i in grad_leaves]
        ranges = (["ranges_ptr"] if self.classified else []) + \
            (["redo_ptr"] if self.em.tiles is not None and self.em.tiles.row_checks else [])
        dout = [f"dout_s{i}" for i in range(len(r.batch_axes) + 2)] if self.reads_dout else []
        rows = [f"row{k}_ptr" for k in range(n_rows)]   # one per row value: the forward's are read where they lie
        return ", ".join(ptrs + ["dout_ptr" if self.reads_dout else "dpv_ptr"] + rows + ranges + self.em.params +
                         self.em.grad_params + dout + ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"])

    def body(self, row_names, grad_leaves):
        em, r = self.em, self.em.r
        sizes = r.sizes
        M, N = sizes["m"], sizes["n"]
        R = (math.prod(r.batch_sizes) if r.batch_sizes else 1) * M
        fixed, loop_axis = ("m", "n") if em.loop_axis == "n" else ("n", "m")
        big = {"m": M, "n": N}
        block = {"m": "BLOCK_M", "n": "BLOCK_N"}
        # the names the forward's tile predicate uses: pid_m (query tile), start_n (first key)
        group = em.group
        programs = (math.prod(r.batch_sizes) if r.batch_sizes else 1) // (group[1] if group else 1)
        tiles = f"tl.cdiv({big[fixed]}, {block[fixed]})"
        if em.heads_together:
            # GQA: every batch index of one tile before the next tile. The query heads sharing K/V run side by
            # side (their K/V tiles stay in L2), and under a causal mask the longest programs start first (the
            # first key tiles see every later query; the last query tiles, every earlier key), so fewer long
            # dK/dV programs, G heads each, are left running alone at the end. (Elsewhere the tiles of one
            # head run side by side, sharing its tiles; measured on an H200, neither order won there.)
            lines = ["pid = tl.program_id(0)",
                     f"pid_b = pid % {programs}",
                     f"pid_n = pid // {programs}" if fixed == "n" else f"pid_m = {tiles} - 1 - pid // {programs}"]
        else:
            lines = ["pid = tl.program_id(0)", f"pid_{fixed} = pid % {tiles}", f"pid_b = pid // {tiles}"]
        if group:   # one program per K/V head: the query heads sharing it are looped over below
            a, G, inner = group
            lines += _batch_decomposition("pid_b", r.batch_axes, {**sizes, a: sizes[a] // G}, {a: f"{a}_kv"})
        else:
            lines += _batch_decomposition("pid_b", r.batch_axes, sizes)
        lines += [f"start_{fixed} = pid_{fixed} * {block[fixed]}",
                  f"offs_{fixed} = start_{fixed} + tl.arange(0, {block[fixed]})",
                  f"mask_{fixed} = offs_{fixed} < {big[fixed]}"]
        for a, bs in em.block_size.items():
            lines += [f"offs_{a} = tl.arange(0, {bs})", f"mask_{a} = offs_{a} < {sizes[a]}"]
        row_loads = self._row_loads(row_names, R)
        loop_head = [f"offs_{loop_axis} = start_{loop_axis} + tl.arange(0, {block[loop_axis]})",
                     f"mask_{loop_axis} = offs_{loop_axis} < {big[loop_axis]}"]
        tile_of = [] if em.loop_axis == "n" else ["pid_m = start_m // BLOCK_M"]
        if em.loop_axis == "n":
            pre = row_loads + self.pre
            head = loop_head + self.guard
        else:
            pre = list(self.pre)
            head = tile_of + loop_head + row_loads + self.guard
        live = set(self.carried) | {"_atomic"}
        inner = _prune(head + self.loop, live)
        L, B = big[loop_axis], block[loop_axis]
        if em.tiles is None:
            loops = [f"for start_{loop_axis} in range(0, {L}, {B}):"] + ["    " + ln for ln in inner]
            ranges = []
        else:
            # tiles every mask keeps whole run a body without the mask math
            inner_full = _prune(head + self.full_loop, live)
            ranges = tile_range_lines(em.tiles, em.r.sizes, loop_axis, fixed, tile_of + loop_head + self.guard)
            if em.tiles.row_checks:
                ranges += ["# a batch with a row that a finite mask fill removed everywhere (the forward computed",
                           "# its query tile over every key): every tile of this batch, as the forward did",
                           "redo = tl.load(redo_ptr + pid_b) != 0",
                           "lo = tl.where(redo, 0, lo)",
                           f"hi = tl.where(redo, {L}, hi)"]
            loops = tile_loops(loop_axis, B, inner_full, inner)
        used = set(_names("\n".join(ranges + loops + self.post)))
        per_head = _prune(pre, used) + ranges + loops
        lines += [""] + _prune(self.init, used | set(self.carried))
        if group:
            a, G, inner_size = group

            def head(g):   # the index along axis `a` of the group's query head g
                return f"{a}_kv * {G} + {g}" if inner_size == 1 else \
                    f"({a}_kv // {inner_size}) * {G * inner_size} + {g} * {inner_size} + {a}_kv % {inner_size}"
            lines += [f"{a} = {head(0)}  # the group's first head: the gradients' addresses after the loop read it",
                      f"for g in range(0, {G}):  # the {G} query heads sharing this K/V head: dK, dV summed here",
                      f"    {a} = {head('g')}",
                      f"    pid_b = {_batch_row(r.batch_axes, sizes)}"]
            lines += ["    " + ln if ln else "" for ln in per_head]
        else:
            lines += per_head
        lines += [""] + self.post
        lines = _forward_copies(lines)
        return "\n".join("    " + ln if ln else "" for ln in lines)

    def _row_loads(self, row_names, R):
        em = self.em
        E = em.r.sizes["e"]
        out = ["row = pid_b * {M} + offs_m".format(M=em.r.sizes["m"])]
        if "dpv" in self.rows and self.reads_dout:
            axes = em.r.batch_axes
            at = "".join(f"{a} * dout_s{i} + " for i, a in enumerate(axes))
            out.append(f"dpv = tl.load(dout_ptr + {at}offs_m[:, None] * dout_s{len(axes)} + offs_e[None, :] * "
                       f"dout_s{len(axes) + 1}, mask=mask_m[:, None] & mask_e[None, :], other=0.0)  "
                       "# dO, as given" + (": dLoss/d(P·V) is dO times dpv_scale, a factor per row"
                                           if "dpv_scale" in self.rows else " (dLoss/d(P·V): out is P·V)"))
        elif "dpv" in self.rows:
            out.append(f"dpv = tl.load(dpv_ptr + row[:, None] * {E} + offs_e[None, :], "
                       f"mask=mask_m[:, None] & mask_e[None, :], other=0.0)  # dLoss/d(P·V), from the row pass")
        for k, name in enumerate(row_names):
            if name not in self.rows:
                continue
            what = ("  # log2 of the row's exp(max)·sum: p = exp2(x·log2(e) - this)" if name.startswith("lse2_") else
                    "  # the row sum's gradient times the row's divisor" if name.startswith("gr_") else "")
            out.append(f"{name} = tl.load(row{k}_ptr + row, mask=mask_m, other=0.0)" +
                       ("[:, None]" if em.loop_axis == "n" else "[None, :]") + what)
            if name.startswith("mu_"):
                R_ = name[3:]
                out.append(f"s2_{R_} = tl.where(tl.abs({name}) > 1e38, 1.0, {LOG2E})")
                out.append(f"mu2_{R_} = {name} * s2_{R_}")
        return out


def _names(text):
    return re.findall(r"[A-Za-z_]\w*", text)


def _broadcast_subdims(acc, region) -> list:
    """[(batch or tile axis, size, inner size)] of each sub-dim (size > 1) along which an access does not
    move: its tensor is broadcast there (GQA's K/V over the query heads of a group, stride 0)."""
    shape = tuple(acc.source.meta["val"].shape)
    layout, _ = access_layout(acc.chain, acc.axes, shape, _contig(shape), 0, region.sizes)
    out = []
    for (_, _, axis, subdims) in layout:
        inner = math.prod(s for s, _ in subdims)
        for s, st in subdims:
            inner //= s
            if s > 1 and st == 0:
                out.append((axis, s, inner))
    return out


def _exclusive(acc, region, group=None) -> bool:
    """Does each program of a kernel own its tile of this input's gradient? True when the input is read
    once in the region, whole, along every batch axis and with no broadcast (stride-0) dimension but the
    kernel's `group` (a sub-dim its programs loop over, see _kv_group): then the gradient is stored in
    the input's dtype, with no zero fill, no atomics and no conversion after."""
    if sum(a.source is acc.source for a in region.accesses.values()) != 1 or acc.gather:
        return False
    if not {a for a in region.batch_axes if region.sizes[a] > 1} <= set(flat_axes(acc.axes)):
        return False
    return _broadcast_subdims(acc, region) in ([], [group]) and _covers_whole(acc, region)


def _covers_whole(acc, region) -> bool:
    """Does the access reach every element of its tensor (a view of it permuted or reshaped, not a slice:
    Falcon's queries are a slice of one fused projection)? Stored by tiles, the gradient of a slice would
    leave the rest of the buffer unwritten."""
    shape = tuple(acc.source.meta["val"].shape)
    layout, offset = access_layout(acc.chain, acc.axes, shape, _contig(shape), 0, region.sizes)
    expected = 1   # the sub-dims, by stride, must tile the tensor from its first element
    for stride, size in sorted((st, s) for *_, parts in layout for s, st in parts if s > 1 and st != 0):
        if stride != expected:
            return False
        expected *= size
    return offset == 0 and expected == math.prod(shape)


def _kv_group(region, needs):
    """GQA / MQA: (batch axis, G, inner size) of the one sub-dim of a batch axis along which every input
    whose gradient the dK/dV kernel gives (K of each score, V) is broadcast, the G query heads that share
    a K/V head. The kernel then gives one program per K/V head and loops over the G heads inside, summing
    their dK and dV in registers: each program owns its gradient tile (stored in the input's dtype)
    instead of G programs adding into a float32 buffer. None where that is not so."""
    leaf = region.leaf_index
    targets = [sm.k for sm in region.scores if needs[leaf(sm.k.source)]]
    targets += [region.value] if needs[leaf(region.value.source)] else []
    found = set()
    for acc in targets:
        sub = _broadcast_subdims(acc, region)
        if len(sub) != 1 or sub[0][0] not in region.batch_axes:
            return None
        found.add(sub[0])
    group = found.pop() if len(found) == 1 else None
    if group is None or not all(_exclusive(acc, region, group) for acc in targets):
        return None
    return group


def _write_gradient(em, acc, ctx, value, post):
    # a tile axis the input does not span (a size-1 dim: one query, one key) is summed away
    for dim, axis in enumerate(ctx):
        if axis not in flat_axes(acc.axes):
            value = f"tl.sum({value}, {dim}, keep_dims=True)"
    ptr, mask = em.grad_address(acc, ctx)
    leaf = em.r.leaf_index(acc.source)
    if _exclusive(acc, em.r, em.group):
        em.stored.add(leaf)
        post.append(f"tl.store({ptr}, {value}.to(grad{leaf}_ptr.dtype.element_ty)" +
                    (f", mask={mask})" if mask else ")"))
    else:
        post.append(f"tl.atomic_add({ptr}, {value}" + (f", mask={mask}" if mask else "") + RELAXED + ")")


def _small_table(acc, region) -> bool:
    """A table gathered by a computed index, small, and otherwise indexed by batch axes only (T5 buckets
    × heads): its gradient is summed per table entry in registers, not scattered element by element
    (millions of atomic adds into a few dozen addresses serialise)."""
    if len(acc.gather) != 1:
        return False
    g = acc.gather[0][0]
    rest = set(flat_axes(acc.axes)) - {g}
    return rest <= set(region.batch_axes) and region.sizes[g] <= 256


# passes of a table gradient unrolled (tables up to this many entries); a larger table loops over them
UNROLLED_TABLE_PASSES = 64


def _table_gradient(em, acc, codes, body, init, post, carried, valid):
    """Per query tile: sum the adjoint of every gathered element into its table entry, per query row, in a
    [BLOCK_M, entries] accumulator, then one atomic add of the whole table row per program. A pass adds, in
    every row, the elements of one entry (the row's lowest plus the pass number): one pass where each row of
    the tile reads one entry (T5: every tile far from the diagonal), more only where rows spread. For tables
    up to UNROLLED_TABLE_PASSES entries the passes are unrolled under a condition, not a loop, so that the
    key loop stays a single loop, which Triton pipelines (a loop inside it made T5's dQ kernel unpipelined)."""
    g = acc.gather[0][0]
    G = em.r.sizes[g]
    GB = 1 << max(4, (G - 1).bit_length())
    name = f"dtable{len(carried)}"
    idx = em.gather_code[g]
    c = " + ".join(codes)
    if valid:
        c = f"tl.where({valid}, {c}, 0.0)"
    init.append(f"{name} = tl.zeros([BLOCK_M, {GB}], tl.float32)  # d{acc.source.name}, per query and entry")
    body.append(f"contrib_{name} = tl.broadcast_to({c}, [BLOCK_M, BLOCK_N])  # d{acc.source.name}[index]")
    # clamped into the table: an element outside it (a padded row or key) adds 0, and then every pass is in it
    body.append(f"entries_{name} = tl.minimum(tl.maximum(tl.broadcast_to({idx}, [BLOCK_M, BLOCK_N]), 0), {G - 1})"
                ".to(tl.int32)")
    body.append(f"low_{name} = tl.min(entries_{name}, 1)  # each row's lowest entry")
    body.append(f"spread_{name} = tl.max(tl.max(entries_{name}, 1) - low_{name}, 0)")
    if GB <= UNROLLED_TABLE_PASSES:
        body += [f"for step in tl.static_range({GB}):", f"    if step <= spread_{name}:"]
        indent = " " * 8
    else:
        body.append(f"for step in range(0, spread_{name} + 1):")
        indent = " " * 4
    body.append(f"{indent}entry = (low_{name} + step)[:, None]")
    body.append(f"{indent}part = tl.sum(tl.where(entries_{name} == entry, contrib_{name}, 0.0), 1)[:, None]")
    body.append(f"{indent}{name} = tl.where(tl.arange(0, {GB})[None, :] == entry, {name} + part, {name})")
    carried.append(name)
    em.gather_code[g], saved = f"tl.arange(0, {GB})", em.gather_code[g]
    ptr, _ = em.grad_address(acc, em.ctx)
    em.gather_code[g] = saved
    total = f"tl.sum({name}, 0)"
    if G == 1:   # a table of one entry: its address does not move with the entry
        post.append(f"tl.atomic_add({ptr}, tl.sum({total}, 0){RELAXED})")
    else:
        post.append(f"tl.atomic_add({ptr}, {total}, mask=tl.arange(0, {GB}) < {G}{RELAXED})")


# a finite constant beyond this in the scores may be a mask fill (finfo.min, -1e9, -1e4): a row it fills everywhere
# has a max so large that its log-sum-exp, rounded to float32, loses the row sum (see _TileProgram.find_normalised)
LARGE_CONSTANT = 1024.0


def _large_constant(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (value == float("inf") or math.isfinite(value) and abs(value) > LARGE_CONSTANT)


def _moderate_scores(region: Region, x) -> bool:
    """Are the scores x made of the score matmuls, index arithmetic, conditions and constants no larger than
    ±LARGE_CONSTANT (or -inf) alone, so that no row max can be large but for huge Q·K products, as
    FlashAttention assumes? A tensor read into them may hold a finite mask fill (transformers' additive 0 /
    finfo.min masks, a mask kept as a parameter) and a large constant may be one."""
    internal = set(region.nodes)
    stack, seen = [x], set()
    while stack:
        n = stack.pop()
        if n in seen or n.target in MATMULS:
            continue
        seen.add(n)
        for i in ((1, 2) if n.target in WHERE else range(len(n.args))):   # a where's condition is no value
            a = n.args[i]
            if not isinstance(a, fx.Node):
                if _large_constant(a):
                    return False
                continue
            val = a.meta.get("val")
            if val is not None and not val.dtype.is_floating_point:
                continue   # indices and conditions
            if _large_constant(constant_value(a)):
                return False
            if a in internal:
                stack.append(a)
                continue
            acc = region.accesses.get((n, i))
            if acc is not None and acc.kind == "tensor":
                return False
    return True


def _sum_of_exps(x) -> bool:
    """Is the row value x a sum of exponentials (a softmax's row sum, a sink's exp added to it)? Then it is
    positive and its log is defined."""
    while x.target in VIEW_OPS or x.target in CASTS:
        x = x.args[0]
    if x.target is aten.exp.default:
        return True
    if x.target is aten.sum.dim_IntList:
        return isinstance(x.args[0], fx.Node) and _sum_of_exps(x.args[0])
    if x.target is aten.add.Tensor and x.kwargs.get("alpha", 1) == 1:
        return all(isinstance(a, fx.Node) and _sum_of_exps(a) for a in x.args)
    return False


def _tile_kernel(region: Region, loop_axis: str, needs, block_sparse, reads_dout=False, scaled=False) -> _Kernel:
    t = _TileProgram(region, loop_axis, needs, block_sparse, reads_dout, scaled)
    t.recompute()
    t.seed()
    t.reverse()
    t.accumulate()
    return t.kernel()


class _TileProgram:
    """The steps of one backward kernel's tile body, in order, over the lines and adjoints they share."""

    def __init__(self, region: Region, loop_axis: str, needs, block_sparse, reads_dout=False, scaled=False):
        self.r, self.loop_axis, self.needs, self.reads_dout = region, loop_axis, needs, reads_dout
        self.scaled = reads_dout and scaled   # dLoss/d(P·V) = dO · dpv_scale (a factor per row)
        em = self.em = _TileEmitter(region, loop_axis)
        group = _kv_group(region, needs)
        em.group = group if loop_axis == "m" else None
        em.heads_together = group is not None
        self.prog = em.prog = OnlineProgram(region)
        build(region, em.operand, self.prog)
        em.pre, em.loop = [], []           # what build() loaded for the forward's accumulators is not needed
        em.access_names.clear()
        # the tile predicate: per key tile, and per query tile where the query tile is fixed
        em.guard, em.guard_pre = [], []
        em.tiles = emit_tile_skip(region, em, em.guard, em.guard if loop_axis == "m" else em.guard_pre, finite=True) \
            if block_sparse else None
        self.kinds = self.prog.kind
        self.mask_any = em.need_mask["m"] or em.need_mask["n"]
        rows_ax, cols_ax = em.ctx
        self.tile = f"[BLOCK_{rows_ax.upper()}, BLOCK_{cols_ax.upper()}]"
        self.body = em.loop   # loads made while emitting land in order with the code that reads them
        # a tile axis of size 1 (one query, one key) is dropped from every value's axes, yet tiles along
        # it are full blocks with one live row: values count as spanning it, inputs' addresses do not
        self.single = {a for a in ("m", "n") if region.sizes[a] == 1}
        self.adj: dict = {}        # internal node -> [(contribution, tile axes it spans)]
        self.leaf_adj: dict = {}   # access key -> (access, [(contribution, tile axes)])
        self.score_adj: dict = {}  # score matmul -> its adjoint's name
        self.rows = {"dpv", "dpv_scale"} if self.scaled else {"dpv"}
        self.init, self.post, self.carried = [], [], []

    def full(self, acc, ctx, where):
        """A Q, K or V tile at its full block shape (_Emitter.block_tile)."""
        return self.em.block_tile(acc, ctx, where)

    def recompute(self):
        """1. The scores and the score program at their true values."""
        em, r, body = self.em, self.r, self.body
        self.tiles_of = {}
        for sm in r.scores:
            if self.loop_axis == "n":     # S = Q·Kᵀ: Q [BLOCK_M, D] once, K as [D, BLOCK_N] per key tile
                q = self.full(sm.q, ("m", sm.axis), em.pre)
                k = self.full(sm.k, (sm.axis, "n"), em.loop)
                a, b = q, k
            else:                         # Sᵀ = K·Qᵀ: K [BLOCK_N, D] once, Q as [D, BLOCK_M] per query tile
                k = self.full(sm.k, ("n", sm.axis), em.pre)
                q = self.full(sm.q, (sm.axis, "m"), em.loop)
                a, b = k, q
            self.tiles_of[sm.node] = (q, k)
            if sm.q.dtype != sm.k.dtype:
                a, b = f"{a}.to(tl.float32)", f"{b}.to(tl.float32)"
            body.append(f"# scores {sm.node.name} = Q·Kᵀ, recomputed" +
                        (" (transposed)" if self.loop_axis == "m" else ""))
            body.append(f"{vname(sm.node)} = {dot(a, b)}")
        self.element = [n for n in r.nodes
                        if n.target not in MATMULS and self.kinds[n] in ("early", "stabsub", "mixed")]
        em.per_element = set(self.element)
        em.plan_scale_folds(fold_max=False)   # the max is loaded here: only the exp takes the scale
        self.normalised = self.find_normalised()
        probabilities = {d: (e, x, R) for e, (divs, _, x, R) in self.normalised.items() for d in divs}
        self.full_lines = {}   # index in the body -> the line used instead on tiles the masks keep whole
        for node in self.element:   # all in the loop: loads the tile predicate made there may feed any
            if node in self.normalised:
                continue   # exp(x - max) itself is never needed: its divisions are computed directly
            if node in probabilities:
                e, x, R = probabilities[node]
                sub = e.args[0]
                y, c = em.scale_folds.get(sub) or (em.float_operand(sub, 0), 1.0)
                body.append(f"{vname(node)} = tl.exp2({y} * {literal(c * LOG2E)} - lse2_{x.name}__{R.name})  "
                            f"# {e.name} / {x.name}, from the row's log-sum-exp")
                continue
            body.append(f"{vname(node)} = {em.expr(node)}")
            if em.tiles and node in em.tiles.dropped:
                kept = em.where_operand(node, em.tiles.dropped[node])
                self.full_lines[len(body) - 1] = f"{vname(node)} = {kept}  # mask dropped: the tile is kept whole"

    def find_normalised(self) -> dict:
        """exp node -> (its divisions, its sum over the keys or None, the divisor, its max group): the
        softmaxes whose probabilities p = exp(x - max) / sum the tiles compute in one exp2 from the row's
        log-sum-exp, lse2 = max·log2(e) + log2(sum), as FlashAttention does; exp(x - max) is then never
        formed, and its adjoint is taken times the row's sum (so that it is (dP + g·sum)·p, see reverse).
        One value per query instead of three (max, sum, reciprocal) is what the dK/dV kernel holds for each
        query column of its tiles: measured on an H200, its step 10% faster at head dim 128.

        Only where the exp is used by nothing but divisions by one row value that is a sum of exps, and
        nothing can make a row's max large (_moderate_scores): for a row that a finite fill such as
        finfo.min removes everywhere, max·log2(e) + log2(sum) rounds to max·log2(e) and the row's
        probabilities would come out 1 instead of 1/sum; such programs keep exp(x - max) / sum."""
        em, r = self.em, self.r
        out = {}
        for sub, R in self.prog.stab_max.items():
            for e in sub.users:
                if e.target is not aten.exp.default or e not in em.per_element:
                    continue
                divs = [u for u in e.users if u.target is aten.div.Tensor and u.args[0] is e and
                        em.is_row_value(u.args[1]) and u in em.per_element]
                sums = [u for u in e.users if u.target is aten.sum.dim_IntList and "n" not in flat_axes(r.axes[u])]
                if not divs or len(sums) > 1 or len(divs) + len(sums) != len(e.users):
                    continue
                x = divs[0].args[1]
                if any(d.args[1] is not x for d in divs) or not _sum_of_exps(x):
                    continue
                if not _moderate_scores(r, sub.args[0]):
                    continue
                out[e] = (divs, sums[0] if sums else None, x, R)
        return out

    def give(self, consumer, i, code, src=None, factor=None):
        """Pass an adjoint contribution to argument i of consumer; `src`: the tile axes it spans (those
        of the consumer), so that it is summed over exactly the axes its target is broadcast along;
        `factor`: a constant the contribution is still to be multiplied by (see reverse)."""
        r = self.r
        src = set(flat_axes(r.axes[consumer])) & {"m", "n"} if src is None else src
        a = consumer.args[i]
        if isinstance(a, fx.Node) and a in self.em.internal:
            if self.kinds[a] != "late":   # row values: their gradient came from the row step
                self.adj.setdefault(a, []).append((code, src, factor))
            return
        acc = r.accesses.get((consumer, i))
        if acc is None or acc.kind != "tensor" or not self.needs[r.leaf_index(acc.source)]:
            return
        key = (acc.source, acc.chain, acc.axes, acc.gather)
        self.leaf_adj.setdefault(key, (acc, []))[1].append((_times(code, factor), src, None))

    def seed(self):
        """2. dP = dPV·Vᵀ for what ·V multiplies, the row gradient of each sum for what it sums."""
        em, r, body = self.em, self.r, self.body
        v = self.v = self.full(r.value, ("n", "e"), em.loop if self.loop_axis == "n" else em.pre)
        body.append("# dP = dO·Vᵀ: the adjoint of the probabilities fed to ·V" +
                    (" (dO read as given, times d out/d(P·V) per row)" if self.scaled else ""))
        scale = " * dpv_scale" if self.scaled else ""
        if self.loop_axis == "n":
            body.append(f"dp = {dot(f'dpv.to({v}.dtype)', f'tl.trans({v})')}{scale}")
        else:
            body.append(f"dp = {dot(v, f'tl.trans(dpv.to({v}.dtype))')}{scale}  # transposed, [keys, queries]")
        self.give(r.pv, 0, "dp", {"m", "n"})
        divisor = {s: x for (_, s, x, _) in self.normalised.values() if s is not None}
        for node in r.nodes:
            if node.target is aten.sum.dim_IntList:
                # a normalised exp takes its adjoint times its row's divisor x: the sum's gradient times x
                x = divisor.get(node)
                name = f"g_{node.name}" if x is None else f"gr_{node.name}" if x is node else f"gr_{node.name}__{x.name}"
                self.rows.add(name)
                self.give(node, 0, name)
        if self.mask_any:
            rows_ax, cols_ax = em.ctx
            body.append(f"valid = mask_{rows_ax}[:, None] & mask_{cols_ax}[None, :]")

    def reduce_to(self, code, axes, src, leaf=False):
        """A contribution spanning tile axes `src`, summed over those its target (`axes`) does not span."""
        ctx = self.em.ctx
        src = (set(src) & {"m", "n"}) | self.single
        tgt = (set(axes) & {"m", "n"}) | (set() if leaf else self.single)
        summed = [a for a in ctx if a in src and a not in tgt]
        if not summed:
            return code
        c = f"tl.broadcast_to({code}, [{', '.join(f'BLOCK_{a.upper()}' if a in src else '1' for a in ctx)}])"
        if self.mask_any:
            live = " & ".join(f"mask_{a}[:, None]" if d == 0 else f"mask_{a}[None, :]"
                              for d, a in enumerate(ctx) if a in src)
            c = f"tl.where({live}, {c}, 0.0)"
        if not tgt:   # a scalar (per batch index), as its pointer
            return f"tl.sum(tl.sum({c}, 1), 0)"
        for d, a in enumerate(ctx):
            if a in summed:
                c = f"tl.sum({c}, {d}, keep_dims=True)"
        return c

    def total(self, contribs, axes, leaf=False):
        return " + ".join(self.reduce_to(_times(c, f), axes, src, leaf) for c, src, f in contribs)

    def reverse(self):
        """3. Reverse through the score program, op by op, down to the score matmuls (dS).

        A multiply by a constant (the softmax scale) is not applied per element: its factor rides on the
        adjoint through views and casts, and where it reaches a score matmul it scales dQ or dK once,
        after their sum over the tiles (one multiply per gradient element instead of one per score)."""
        r = self.r
        divided = {d for divs, *_ in self.normalised.values() for d in divs}
        for node in reversed([n for n in r.nodes if n.target in MATMULS or n in set(self.element)]):
            contribs = self.adj.get(node)
            if not contribs:
                continue
            g = f"a_{node.name}"
            factor = None
            scaled = constant_factor(node)
            passes_on = node.target in MATMULS or node.target in VIEW_OPS or node.target in CASTS or scaled
            if len(contribs) == 1 and contribs[0][2] is not None and passes_on:
                (code, src, factor), = contribs
                contribs = [(code, src, None)]
            self.body.append(f"{g} = {self.total(contribs, set(flat_axes(r.axes[node])))}  "
                             f"# adjoint of {node.name} ({node.target})" +
                             (f" is this times {literal(factor)}" if factor is not None else ""))
            if node.target in MATMULS:
                self.score_adj[node] = (g, factor)
                continue
            if scaled is not None:
                i, c = scaled
                self.give(node, i, g, factor=c if factor is None else c * factor)
                continue
            if node in divided:   # p = e / x: e's adjoint, times x, is p's adjoint (see find_normalised)
                self.give(node, 0, g, factor=factor)
                continue
            if node in self.normalised:   # g is this exp's adjoint times x, and exp(x - max) = p·x
                self.body[-1] += "  (times the row's divisor)"
                self.give(node, 0, f"{g} * {vname(self.normalised[node][0][0])}", factor=factor)
                continue
            for i, code in _vjp(self.em, node, g):
                self.give(node, i, code, factor=factor)

    def _accumulate(self, name, shape, update, acc, ctx, what, factor=None):
        self.init.append(f"{name} = tl.zeros({shape}, tl.float32)  # {what} of {acc.source.name}")
        self.body.append(f"{name} = {name} + {update}  # {what}")
        self.carried.append(name)
        _write_gradient(self.em, acc, ctx, f"({_times(name, factor)})" if factor is not None else name, self.post)

    def accumulate(self):
        """4. What the gradients accumulate: dQ (per query tile) or dK, dV (per key tile), and the
        score-side inputs' adjoints (per query tile)."""
        em, r, body, needs = self.em, self.r, self.body, self.needs
        valid = "valid" if self.mask_any else None
        for sm in r.scores:
            if sm.node not in self.score_adj:
                continue
            g, factor = self.score_adj[sm.node]
            ds = f"ds_{sm.node.name}"
            body.append(f"{ds} = {f'tl.where(valid, {g}, 0.0)' if valid else g}  # dS")
            q, k = self.tiles_of[sm.node]
            bd = em.block_size[sm.axis]
            if self.loop_axis == "n" and needs[r.leaf_index(sm.q.source)]:    # dQ = dS·K
                self._accumulate(f"dq_{sm.node.name}", f"[BLOCK_M, {bd}]",
                                 dot(f"{ds}.to({k}.dtype)", f"tl.trans({k})"), sm.q, ("m", sm.axis), "dQ = dS·K",
                                 factor)
            if self.loop_axis == "m" and needs[r.leaf_index(sm.k.source)]:    # dK = dSᵀ·Q
                self._accumulate(f"dk_{sm.node.name}", f"[BLOCK_N, {bd}]",
                                 dot(f"{ds}.to({q}.dtype)", f"tl.trans({q})"), sm.k, ("n", sm.axis), "dK = dSᵀ·Q",
                                 factor)
        if self.loop_axis == "m" and needs[r.leaf_index(r.value.source)]:     # dV = Pᵀ·dO
            p = vname(r.pv.args[0])
            pm = f"tl.where(valid, {p}, 0.0)" if valid else p
            pm = f"{pm} * dpv_scale" if self.scaled else pm   # Pᵀ·(dO times a factor per query)
            self._accumulate("dv", f"[BLOCK_N, {em.block_size['e']}]",
                             dot(f"tl.broadcast_to({pm}, {self.tile}).to({self.v}.dtype)", f"dpv.to({self.v}.dtype)"),
                             r.value, ("n", "e"), "dV = Pᵀ·dO")
        if self.loop_axis != "n":
            return
        # score-side inputs: their adjoint, summed over what they are broadcast along, added in place
        for acc, codes in self.leaf_adj.values():
            if _small_table(acc, r):
                _table_gradient(em, acc, [c for c, _, _ in codes], body, self.init, self.post, self.carried, valid)
                continue
            axes = set(flat_axes(acc.axes)) | {a for _, _, ix in acc.gather for a in ix}
            ptr, mask = em.grad_address(acc, em.ctx)
            per_score = all({"m", "n"} <= (set(src) & {"m", "n"}) | self.single for _, src, _ in codes)
            if "n" not in axes and not acc.gather and per_score:
                # the same address on every key tile (λ, a per-head or per-query parameter): summed over the
                # keys in registers, per query, and added once after the loop, instead of a sum over the
                # whole tile and an atomic add to one address on every key tile
                name = f"dsum{len(self.carried)}"
                self.init.append(f"{name} = tl.zeros([BLOCK_M, 1], tl.float32)  # d{acc.source.name}, per query")
                body.append(f"{name} = {name} + {self.total(codes, axes | {'m'}, leaf=True)}  # d{acc.source.name}")
                self.carried.append(name)
                total = name if "m" in axes else f"tl.sum(tl.sum({name}, 1), 0)"
                self.post.append(f"tl.atomic_add({ptr}, {total}" + (f", mask={mask}" if mask else "") + RELAXED +
                                 f")  # d{acc.source.name}")
                continue
            code = self.total(codes, axes, leaf=True)
            if valid and "m" in axes and "n" in axes:
                code = f"tl.where(valid, {code}, 0.0)"
            body.append(f"_atomic = tl.atomic_add({ptr}, {code}" + (f", mask={mask}" if mask else "") + RELAXED + ")" +
                        f"  # d{acc.source.name}")

    def kernel(self) -> _Kernel:
        em = self.em
        text = "\n".join(em.pre + em.guard + self.body + self.post)
        full_loop = [self.full_lines.get(i, self._full_tile(ln)) for i, ln in enumerate(self.body)]
        # the row values the kernel reads once its dead lines are gone (each one loaded keeps its tensor
        # alive through the kernels: the forward's row max, read by an unused x - max, cost 2 MB a step)
        live = set(self.carried) | {"_atomic"}
        used = set().union(*(_names("\n".join(ln.split("  #")[0] for ln in _prune(em.guard_pre + em.pre + em.guard +
                                                                                 body + self.post, live)))
                             for body in (self.body, full_loop)))
        params = set(em.params) | set(em.grad_params)
        rows = {n for n in self.rows if n.startswith("dpv") or n in used}
        rows |= {n for n in used if n.startswith(("r_", "mu_", "g_", "gr_", "lse2_")) and n not in params}
        rows |= {"mu_" + n.split("_", 1)[1] for n in used if n.startswith(("mu2_", "s2_"))}
        rows = {n for n in rows if not n.startswith("s2_") and not n.startswith("mu2_")}
        kern = _Kernel(em, em.guard_pre + em.pre, self.body, self.post, rows, text)
        kern.reads_dout = self.reads_dout
        kern.init, kern.carried, kern.guard = self.init, self.carried + ["_atomic"], em.guard
        kern.full_loop = full_loop
        return kern

    def _full_tile(self, line):
        """A line as tiles the masks keep whole run it: each masked adjoint is the adjoint itself."""
        for masked, whole in self.em.full_code.items():
            line = line.replace(masked, whole)
        return line
