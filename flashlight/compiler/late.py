"""Row values of a fused region in PyTorch: the first step of the backward (see backward.py).

A training forward stores, per row, its online accumulators and running maxes. The lines the kernel
ran after its key loop (row sums, normalisers, the ·V combination, the epilogue) are plain
elementwise Triton over rows; here they run again in PyTorch, over every row at once, through a
small stand-in for ``triton.language`` (``_TorchTL``). torch.autograd then differentiates them, so
the gradient of each row value comes from torch's own derivative formulas, whatever the program:
the gradient of the ·V product before the epilogue, of every row sum, and of the inputs that only
row values read (sink logits, gates, λ used after ·V). The tensors are [rows] or [rows, Dv]:
nothing here is of size queries × keys.
"""
from __future__ import annotations

import functools
import math
import random
import re

import torch

from flashlight.compiler.analysis import LOG2E


class _Addr:
    """A pointer plus offsets, as `in0_ptr + offs` builds it in a kernel."""

    def __init__(self, base, offs=0, source=None):
        self.base, self.offs, self.source = base, offs, source

    def __add__(self, other):
        return _Addr(self.base, self.offs + other, self.source)

    __radd__ = __add__


class _TorchTL:
    """The part of triton.language the after-the-loop lines use, on torch tensors."""
    float32, float16, bfloat16, float64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
    int1, int32, int64 = torch.bool, torch.int32, torch.int64

    def __init__(self, random_loads=None):
        self.random_loads = random_loads   # for check_shift_invariance: loads give random values

    @staticmethod
    def _t(x):
        return x if isinstance(x, torch.Tensor) else torch.tensor(x, dtype=torch.float64)

    def maximum(self, a, b):
        a, b = torch.broadcast_tensors(self._t(a), self._t(b).to(self._t(a).dtype))
        return torch.maximum(a, b)

    def minimum(self, a, b):
        a, b = torch.broadcast_tensors(self._t(a), self._t(b).to(self._t(a).dtype))
        return torch.minimum(a, b)

    def where(self, c, a, b):
        return torch.where(self._t(c).bool(), a, b)

    def full(self, shape, value, dtype):
        return torch.full([1 if isinstance(s, str) else s for s in shape], value, dtype=dtype)

    def load(self, addr, mask=None, other=0):
        if self.random_loads is not None:
            shape = torch.as_tensor(addr.offs).shape
            return self.random_loads(addr.source, shape)
        flat, offs = addr.base, torch.as_tensor(addr.offs)
        safe = offs.clamp(0, flat.numel() - 1)
        small = flat.requires_grad and flat.numel() <= 4096 and safe.numel() > flat.numel()
        val = _ReadSmall.apply(flat, safe) if small else flat[safe]
        if mask is not None:
            val = torch.where(torch.as_tensor(mask), val, torch.as_tensor(other, dtype=val.dtype))
        return val


for _name, _fn in {"exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "sigmoid": torch.sigmoid,
                   "abs": torch.abs, "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "erf": torch.erf,
                   "sin": torch.sin, "cos": torch.cos}.items():   # tl.exp(x) and the like
    setattr(_TorchTL, _name, lambda self, x, _fn=_fn: _fn(self._t(x)))


class _ReadSmall(torch.autograd.Function):
    """flat[index] for a small input read by many rows (a sink logit per head): its gradient is summed
    per entry by a comparison with every entry, a dense reduction, rather than scattered (compiled, a
    scatter of a million row gradients into a few dozen addresses serialises on atomic adds)."""

    @staticmethod
    def forward(ctx, flat, index):
        ctx.save_for_backward(index)
        ctx.entries = flat.numel()
        return flat[index]

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        grad = grad.expand(index.shape).reshape(-1, 1)
        hit = index.reshape(-1, 1) == torch.arange(ctx.entries, device=index.device)
        return torch.where(hit, grad, 0).sum(0), None


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The memory a kernel pointer to `t` reaches, as a 1-D tensor (differentiable back to t)."""
    span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if s > 0)
    return t.as_strided((span,), (1,))


def _row_index(batch_axes, sizes, device):
    """offs_m and each batch index, over all rows (row-major over batch axes, then queries)."""
    M = sizes["m"]
    batch = math.prod(sizes[a] for a in batch_axes) if batch_axes else 1
    row = torch.arange(batch * M, device=device)
    names = {"offs_m": row % M, "mask_m": torch.ones(batch * M, dtype=torch.bool, device=device)}
    rem = row // M
    for a in reversed(batch_axes):
        names[a] = (rem % sizes[a])[:, None]
        rem = rem // sizes[a]
    E = sizes["e"]
    names["offs_e"] = torch.arange(E, device=device)
    names["mask_e"] = torch.ones(E, dtype=torch.bool, device=device)
    return names


def run_rows(program: dict, inputs, params, saved, tl=None):
    """Run the after-the-loop lines: the namespace after them (row values by kernel name)."""
    sizes = program["sizes"]
    device = saved[0].device if saved else inputs[0].device
    ns = {"tl": tl or _TorchTL(), "float": float}
    ns.update(_row_index(program["batch_axes"], sizes, device))
    ns.update(dict(zip(program["param_names"], params)))
    for i, t in enumerate(inputs):
        ns[f"in{i}_ptr"] = _Addr(_flat(t) if isinstance(t, torch.Tensor) else t, source=t)
    for (name, kind), t in zip(program["saved"], saved):
        # (a single element stands for a value the same in every row and column: stored_to_saved's ones)
        ns[name] = t.reshape(-1, 1) if kind == "row" or t.numel() == 1 else t.reshape(-1, sizes["e"])
    exec(_compiled("\n".join(program["lines"])), ns)
    return ns


@functools.lru_cache(maxsize=256)
def _compiled(source: str):
    return compile(source, "<flashlight row program>", "exec")


def row_scaled_accumulator(program: dict, trials: int = 3) -> str | None:
    """The ·V accumulator the output stands in for, or None. When the output is that one accumulator times
    a factor of its row's sums and maxes alone (softmax with any mask or score bias: out = acc / l), a
    training forward need not store it: the backward divides the output by the factor (the output is
    stored in its own dtype either way, as FlashAttention keeps O). Only programs whose after-the-loop
    lines read no input qualify, so the factor is positive wherever the row has a key (1/l with l ≥ 1);
    linearity is checked on random rows."""
    vectors = [name for name, kind in program["saved"] if kind == "vector"]
    if len(vectors) != 1 or any("tl.load(" in ln for ln in program["lines"]):
        return None
    acc, E = vectors[0], program["sizes"]["e"]
    prog = dict(program, sizes=dict(program["sizes"], m=4, **{a: 1 for a in program["batch_axes"]}))
    inputs = [torch.zeros(1, dtype=torch.float64) for _ in range(program["leaves"])]
    params = [0] * len(program["param_names"])
    for trial in range(trials):
        g = torch.Generator().manual_seed(trial)
        saved = [torch.randn((4, E), generator=g, dtype=torch.float64) if kind == "vector" else
                 torch.randn((4, 1), generator=g, dtype=torch.float64) if name.startswith("m_") else
                 torch.rand((4, 1), generator=g, dtype=torch.float64) + 0.5 for name, kind in program["saved"]]
        out = run_rows(prog, inputs, params, saved)["out"]
        factor = _with_unit_accumulator(prog, inputs, params, saved, acc)["out"]
        if not (torch.allclose(out, factor * saved[[n for n, _ in program["saved"]].index(acc)], rtol=1e-9)
                and torch.allclose(factor, factor[:, :1].expand_as(factor), rtol=1e-12)):
            return None
    return acc


def output_is_pv(program: dict) -> bool:
    """Whether the output is the ·V product itself (through views and casts): d out / d(P·V) is then 1,
    and the backward's kernels use dO as it is."""
    rhs = {}
    for ln in program["lines"]:
        m = re.match(r"\s*(\w+) = (.*?)\s*(#.*)?$", ln)
        if m:
            rhs[m.group(1)] = m.group(2)
    name, seen = "out", set()
    while name != program["pv"] and name not in seen:
        seen.add(name)
        m = re.fullmatch(r"\(?(\w+)\)?(\.to\(tl\.(float|bfloat)\d+\))?", rhs.get(name, ""))
        if m is None:
            return False
        name = m.group(1)
    return name == program["pv"]


def _with_unit_accumulator(program, inputs, params, saved, acc, device=None):
    """The row values with `acc` set to ones (one element stands for every row and column): for a value
    linear in acc, its factor per row (d value / d acc). saved[acc's index] is not read."""
    i = [n for n, _ in program["saved"]].index(acc)
    ones = torch.ones(1, 1, dtype=torch.float64 if device is None else torch.float32, device=device)
    return run_rows(program, inputs, params, [*saved[:i], ones, *saved[i + 1:]])


def stored_to_saved(program: dict, inputs, params, stored):
    """(every saved row value in program["saved"]'s order, d out / d(P·V) per row or None), from what the
    forward stored. Where the output is linear in one accumulator (row_scaled_accumulator) the factor
    comes from the row values; where the output also stands in for that accumulator, `stored` ends with
    the output, and the accumulator is the output divided by its row factor (detached: it is data, as a
    stored one is)."""
    acc = program.get("row_linear")
    if acc is None:
        return list(stored), None
    from_out = program.get("from_out") is not None
    out = stored[-1] if from_out else None
    saved = list(stored[:-1] if from_out else stored)
    i = [n for n, _ in program["saved"]].index(acc)
    if from_out:
        saved.insert(i, None)
    with torch.no_grad():
        rows = [t.float() if t is not None and t.is_floating_point() else t for t in saved]
        device = stored[-1].device
        unit = _with_unit_accumulator(program, inputs, params, rows, acc, device)
        if from_out:
            saved[i] = (out.reshape(-1, program["sizes"]["e"]).float() / unit["out"]).to(out.dtype)
    # d out / d(P·V): the kernels take dLoss/d(P·V) as dO times this (P·V is acc times its own factor)
    return saved, unit["out"] / unit[program["pv"]]


def row_backward(program: dict, inputs, needs, params, saved, grad_out, row_names, dpv_dtype=None):
    """The row step of the backward: (dPV [rows, Dv], the values of `row_names`, each [rows] float32,
    {input index: gradient} for the inputs that row values read). Row names: g_<sum> the gradient of a
    row sum, mu_<max> the value a row was normalised by, r_<node> a row value. dPV is given in
    `dpv_dtype` (the kernels multiply it in the value's dtype), float32 by default."""
    sums = program["sums"]
    leaves = [t.detach().requires_grad_(bool(n)) if isinstance(t, torch.Tensor) and t.is_floating_point()
              else t for t, n in zip(inputs, needs)]
    saved, dpv_scale = stored_to_saved(program, [t.detach() if isinstance(t, torch.Tensor) else t for t in inputs],
                                    params, saved)
    with torch.enable_grad():
        saved = [s.detach().float().requires_grad_(s.is_floating_point()) for s in saved]
        ns = run_rows(program, leaves, params, saved)
        out = ns["out"]
        go = grad_out.reshape(out.shape).to(out.dtype)
        leaf_ix = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor) and t.requires_grad]
        targets = [ns[program["pv"]]] + [ns[f"r_{s}"] for s in sums] + [leaves[i] for i in leaf_ix]
        live = [i for i, t in enumerate(targets) if t.requires_grad]
        got = torch.autograd.grad(out, [targets[i] for i in live], go, allow_unused=True) if live else []
        grads = [None] * len(targets)
        for i, g in zip(live, got):
            grads[i] = g
    R, E = out.shape[0], program["sizes"]["e"]
    dpv = grads[0]
    if dpv_scale is not None:   # the kernels form dPV from dO (and dpv_scale where it is not 1)
        dpv = out.new_empty(0)
    elif dpv is None:
        dpv = torch.zeros(R, E, device=out.device, dtype=dpv_dtype or torch.float32)
    else:
        dpv = dpv.expand(R, E).to(dpv_dtype or torch.float32).contiguous()
    sum_grads = dict(zip((f"g_{s}" for s in sums), grads[1:1 + len(sums)]))
    rows = []
    for name in row_names:
        if name in sum_grads:
            val = sum_grads[name] if sum_grads[name] is not None else torch.zeros(R, device=out.device)
        elif name == "dpv_scale":
            val = dpv_scale.expand(R, dpv_scale.shape[-1])[:, 0]
        elif name.startswith("mu_"):
            val = ns[program["mu_of"][name[3:]]]
        elif name.startswith("gr_"):     # gr_<sum>[__<x>]: the sum's gradient times the row value x (the sum)
            s, _, x = name[3:].partition("__")
            x = x or s
            g = sum_grads[f"g_{s}"]
            val = ns[f"r_{x}"] * (g if g is not None else 0.0)
        elif name.startswith("lse2_"):   # lse2_<x>__<max>: log2 of exp(max)·x, x a row sum of exps
            x, m = name[5:].split("__")
            val = ns[program["mu_of"][m]] * LOG2E + torch.log2(ns[f"r_{x}"])
        else:
            val = ns[name]
        # as they are where they already have that layout (a value the forward stored): the kernels read
        # each through a pointer of its own, so no copy of the forward's values into a table is made
        rows.append(val.detach().float().reshape(-1).expand(R).contiguous())
    leaf_grads = {i: g for i, g in zip(leaf_ix, grads[1 + len(sums):]) if g is not None}
    return dpv, rows, leaf_grads


def compile_row_backward(program: dict, needs, params, row_names, dpv_dtype, inputs, saved, grad_out):
    """row_backward for these tensors' shapes, dtypes and devices, traced to one aten graph (its autograd
    included) with make_fx and compiled by Inductor: a few fused kernels instead of dozens of small
    ops and the autograd machinery on every call. Returns a function of (inputs, saved, grad_out)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    n_in, n_saved = len(inputs), len(saved)
    grad_ix: list = []

    def flat(*tensors):
        dpv, rows, grads = row_backward(program, tensors[:n_in], needs, params,
                                        tensors[n_in:n_in + n_saved], tensors[-1], row_names, dpv_dtype)
        grad_ix[:] = sorted(grads)
        return [dpv, *rows] + [grads[i] for i in grad_ix]

    # detached: the step differentiates inside itself; inputs that require grad would make Inductor
    # compile a training graph around it
    example = [t.detach() for t in (*inputs, *saved, grad_out)]
    gm = make_fx(flat)(*example)
    compiled = torch._inductor.compile(gm, example)

    def step(inputs, saved, grad_out):
        dpv, *rest = compiled(*(t.detach() for t in (*inputs, *saved, grad_out)))
        rows, grads = rest[:len(row_names)], rest[len(row_names):]
        return dpv, rows, dict(zip(grad_ix, grads))
    return step


def check_shift_invariance(program: dict, trials: int = 3):
    """None if the region's output does not depend on any row max except through exp(x - max)
    normalised away (softmax in every spelling, sinks); else why not. The backward drops the row max's
    own gradient (the argmax path), which is exact only then."""
    if not program["maxes"]:
        return None
    sizes = program["sizes"]
    for trial in range(trials):
        rng = random.Random(trial)
        cache: dict = {}

        def random_loads(base, shape, cache=cache, rng=rng):
            key = (id(base), tuple(shape))
            if key not in cache:
                g = torch.Generator().manual_seed(rng.randrange(1 << 30))
                cache[key] = torch.randn(shape, generator=g, dtype=torch.float64)
            return cache[key]

        fake_sizes = dict(sizes, m=2, **{a: 1 for a in program["batch_axes"]})
        prog = dict(program, sizes=fake_sizes)
        g = torch.Generator().manual_seed(trial)
        saved = []
        for name, kind in program["saved"]:
            shape = (2, 1) if kind == "row" else (2, sizes["e"])
            val = torch.rand(shape, generator=g, dtype=torch.float64) + 0.5
            if name.startswith("m_"):
                val = torch.randn(shape, generator=g, dtype=torch.float64)
            saved.append(val)
        params = [0] * len(program["param_names"])
        inputs = [torch.zeros(1, dtype=torch.float64) for _ in range(program["leaves"])]
        base = run_rows(prog, inputs, params, saved, tl=_TorchTL(random_loads))["out"]
        shifted = dict(prog, lines=[_shift_max(ln, program["maxes"]) for ln in program["lines"]])
        moved = run_rows(shifted, inputs, params, saved, tl=_TorchTL(random_loads))["out"]
        if not torch.allclose(base, moved, rtol=1e-9, atol=1e-12, equal_nan=True):
            return ("the output depends on a row max itself, not only through exp(x - max) normalised "
                    "away; its gradient would need the argmax, which the fused backward does not compute")
    return None


def _shift_max(line, maxes):
    """`r_<amax> = m_<amax>` with the max moved by a constant (the stabiliser mu stays)."""
    for R, name in maxes.items():
        if line.startswith(f"{name} = m_{R}"):
            return f"{name} = m_{R} + 0.375"
    return line
