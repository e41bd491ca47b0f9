"""Capture: turn a dynamo graph (or a plain function) into a normalised aten graph.

Decompositions make the matcher see few spellings: every softmax becomes amax/sub/exp/sum/div,
masked_fill becomes where, einsum/matmul become bmm with views, repeat_interleave becomes
expand + reshape. Node metadata (shapes, the user's source lines) is kept for the later stages.

Concatenations along a dim are split where the program only computes elementwise on them, reduces
over that dim or slices whole pieces back out (attention sinks: extra logits concatenated to the
scores, normalised together, sliced off). Then every piece is an ordinary value again:
``amax(cat([s, x]))`` is ``maximum(amax(s), amax(x))``, ``sum`` likewise with ``add``, and
``cat([s, x])[..., :N]`` is ``s``.

``F.scaled_dot_product_attention`` given a mask (``attn_mask``, no dropout) is traced in its math form, so
that the mask can skip tiles: PyTorch's fused kernels read such a mask whole or fall back to the math
(the backend keeps the call as it is where that form does not fuse). Without a mask the call stays: the
Flash and cuDNN kernels it runs are faster than a generated kernel.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._decomp import get_decompositions
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.proxy_tensor import make_fx

from flashlight.compiler.analysis import CASTS, ELEMENTWISE

aten = torch.ops.aten

_DECOMPOSE = [
    aten._softmax, aten._safe_softmax, aten.softmax, aten._log_softmax, aten.masked_fill,
    aten.tril, aten.triu, aten.repeat_interleave.self_int, aten.rsub, aten.baddbmm, aten.addcmul,
    aten.hardtanh, aten.softplus, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar,
    aten.logsumexp,
]


def _embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    """weight[indices] (a table gathered by the scores: T5's bias), where its gradient is that of the
    gather too. With a padding index (BERT's word embeddings: that row gets no gradient) or gradients
    scaled by frequency the op stays as it is, and autograd keeps what it means."""
    if padding_idx != -1 or scale_grad_by_freq or sparse:
        return NotImplemented
    return weight[indices]


def decompositions():
    return {**get_decompositions(_DECOMPOSE), aten.embedding.default: _embedding}


def _scaled_dot_product_attention_as_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                          scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention with a mask, as its math: scores scaled (1/sqrt(E) unless `scale`), a
    boolean mask keeps True, a float mask is added, and a row that the mask removes everywhere (-inf) gives
    zeros, as SDPA does (its safe softmax). NotImplemented (the call stays) without a mask, with dropout (its
    random numbers) or is_causal.

    A row removed everywhere is computed from finite scores and zeroed after ·V: a softmax over a row of
    -inf is NaN, and NaN times the zero gradient of such a row would reach dV. So a boolean mask fills with
    the dtype's lowest finite value (a partly removed row is the same: exp of the fill minus the row's max
    is 0), and a float mask's -inf becomes that value too."""
    if attn_mask is None or dropout_p != 0.0 or is_causal or query.dim() < 2:
        return NotImplemented
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        if query.shape[-3] % key.shape[-3]:
            return NotImplemented
        group = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(group, -3), value.repeat_interleave(group, -3)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    s = query @ key.transpose(-2, -1) * scale
    lowest = torch.finfo(s.dtype).min
    if attn_mask.dtype == torch.bool:
        s = s.masked_fill(attn_mask.logical_not(), lowest)
        m = s.amax(-1, keepdim=True)   # the softmax's max, spelled out: the removed rows test it too
        removed = m == lowest
    else:   # -inf added is the lowest finite value added; a second running max finds the rows it removes
        # everywhere (a mask computed per call, as nn.MultiheadAttention merges its masks, is read once: no
        # classification pass and no pass over it outside the kernel)
        removed = (s + attn_mask).amax(-1, keepdim=True) == float("-inf")
        s = s + attn_mask.clamp_min(lowest)
        m = s.amax(-1, keepdim=True)
    e = torch.exp(s - m)
    out = (e / e.sum(-1, keepdim=True)) @ value
    return torch.where(removed, 0.0, out).to(query.dtype)


class _MaskedSdpaAsMath(torch.overrides.TorchFunctionMode):
    """Calls of F.scaled_dot_product_attention with a mask run as _scaled_dot_product_attention_as_math;
    `calls` counts them, `kept` the calls left as they are."""

    def __init__(self):
        super().__init__()
        self.calls = self.kept = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            out = _scaled_dot_product_attention_as_math(*args, **kwargs)
            if out is not NotImplemented:
                self.calls += 1
                return out
            self.kept += 1
        return func(*args, **kwargs)


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


def _row_max_of(node, x):
    """Is `node` x's max over its last dim (keepdim), through detach?"""
    while isinstance(node, fx.Node) and node.target is aten.detach.default:
        node = node.args[0]
    return _is_last_dim_amax(node, x)


def _is_last_dim_amax(node, x) -> bool:
    if not (isinstance(node, fx.Node) and node.target is aten.amax.default and node.args[0] is x):
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", [])
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    val = x.meta.get("val")
    return bool(keep) and val is not None and [d % val.dim() for d in dims] == [val.dim() - 1]


def _pre_shifted_softmax(gm: fx.GraphModule) -> None:
    """`y = x - x.amax(-1, keepdim=True).detach()` fed only to a softmax (as research code stabilises a
    softmax by hand) is read as x: the softmax subtracts its own row max from y, and a value per row
    subtracted before it changes nothing; the matcher then sees the one softmax of x."""
    g = gm.graph
    for y in list(g.nodes):
        if y.op != "call_function" or y.target is not aten.sub.Tensor or not _row_max_of(y.args[1], y.args[0]):
            continue
        maxes = {u for u in y.users if _is_last_dim_amax(u, y)}
        if maxes and all(u in maxes or (u.target is aten.sub.Tensor and u.args[0] is y and u.args[1] in maxes)
                         for u in y.users):
            for u in list(y.users):
                u.replace_input_with(y, y.args[0])
    g.eliminate_dead_code()
    gm.recompile()


def _natural_exponentials(gm: fx.GraphModule) -> None:
    """Every exponential in base e, so the matcher knows one softmax:

    - ``base ** x`` (pow.Scalar, a positive constant base; exp2) is ``exp(x * ln(base))``;
    - ``exp(a - log(b))`` is ``exp(a) / b`` where b is a sum of exponentials (never negative: a negative b's
      log is NaN in eager): ``log_softmax(x).exp()`` becomes the ordinary softmax, and
      the exp(a) the log-sum-exp already computed is reused (through the cast a 16-bit log_softmax ends
      with: the exp of the rounded log-probability becomes the rounded probability);
    - ``exp(a - (log(b) + c))`` is ``exp((a - c) - log(b))``, then as above: ``(x - x.logsumexp(-1,
      keepdim=True)).exp()``, whose log-sum-exp is log(sum(exp(x - c))) + c; unsqueezed after it
      (``logsumexp(x, -1)[..., None]``), c is squeezed in it and b is unsqueezed in the division."""
    import math

    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.exp2.default:
            x, base = node.args[0], 2.0
        elif node.target is aten.pow.Scalar and isinstance(node.args[0], (int, float)) and \
                not isinstance(node.args[0], bool) and node.args[0] > 0 and node.args[0] != 1:
            x, base = node.args[1], float(node.args[0])
        else:
            continue
        if not isinstance(x, fx.Node) or not x.meta["val"].is_floating_point():
            continue
        if base == math.e:
            arg = x
        elif base > 1 and x.target is aten.sub.Tensor and isinstance(x.args[1], fx.Node) and \
                x.args[1].target is aten.amax.default and x.args[1].args[0] is x.args[0]:
            # (s - max s) * ln(base) is y - max y for y = s * ln(base) > 0: the softmax's own form
            y = _emit(g, node, aten.mul.Tensor, [x.args[0], math.log(base)])
            arg = _emit(g, node, aten.sub.Tensor, [y, _emit(g, node, aten.amax.default, [y, *x.args[1].args[1:]])])
        else:
            arg = _emit(g, node, aten.mul.Tensor, [x, math.log(base)])
        new = _emit(g, node, aten.exp.default, [arg])
        new.meta = {**node.meta, **{"val": new.meta["val"]}}
        node.replace_all_uses_with(new)
        g.erase_node(node)
    for node in list(g.nodes):   # exp(a - (log b + c)) is exp((a - c) - log b): torch.logsumexp's form
        sub = node.args[0] if node.op == "call_function" and node.target is aten.exp.default else None
        if not (isinstance(sub, fx.Node) and sub.target is aten.sub.Tensor and len(sub.args) == 2 and not sub.kwargs
                and isinstance(sub.args[0], fx.Node) and isinstance(sub.args[1], fx.Node)):
            continue
        a, lse, view = sub.args[0], sub.args[1], None
        if lse.target is aten.unsqueeze.default:   # logsumexp(s, -1)[..., None]: its keepdim=False form
            view, lse = lse, lse.args[0]
        if lse.target is not aten.add.Tensor or lse.kwargs:
            continue
        logs = [t for t in lse.args if isinstance(t, fx.Node) and t.target is aten.log.default]
        if len(logs) != 1:
            continue
        log, c = logs[0], next(t for t in lse.args if t is not logs[0])
        if view is not None:   # c is then the squeezed row value; log b is unsqueezed back
            if not (isinstance(c, fx.Node) and c.target in (aten.squeeze.dims, aten.squeeze.dim)):
                continue
            c, log = c.args[0], _emit(g, node, aten.unsqueeze.default, [log, *view.args[1:]])
        shifted = next((x for x in a.users if x.target is aten.sub.Tensor and x.args == (a, c) and not x.kwargs
                        and x in _ancestors_upto(node)), None) or _emit(g, sub, aten.sub.Tensor, [a, c])
        node.replace_input_with(sub, _emit(g, node, aten.sub.Tensor, [shifted, log]))
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not aten.exp.default:
            continue
        sub, cast = node.args[0], None
        if isinstance(sub, fx.Node) and sub.target in CASTS and isinstance(sub.args[0], fx.Node):
            # 16-bit log_softmax runs in float32 and casts its result back: exp(cast(a - log b))
            cast, sub = sub, sub.args[0]
        if not (isinstance(sub, fx.Node) and sub.target is aten.sub.Tensor and len(sub.args) == 2 and
                not sub.kwargs and isinstance(sub.args[1], fx.Node)):
            continue
        log, view = sub.args[1], None
        if log.target is aten.unsqueeze.default and isinstance(log.args[0], fx.Node):
            view, log = log, log.args[0]
        if log.target is not aten.log.default or not _sum_of_exponentials(log.args[0]):
            continue   # exp(a - log(b)) is exp(a) / b only where b >= 0 (eager's log of a negative b is NaN)
        a, b = sub.args[0], log.args[0]
        if view is not None:   # exp(a - log(b)[..., None]) is exp(a) / b[..., None]
            b = _emit(g, node, aten.unsqueeze.default, [b, *view.args[1:]])
        if not isinstance(a, fx.Node):
            continue
        exp_a = next((u for u in a.users if u.target is aten.exp.default and u is not node), None)
        if exp_a is None or exp_a not in _ancestors_upto(node):
            exp_a = _emit(g, node, aten.exp.default, [a])
        new = _emit(g, node, aten.div.Tensor, [exp_a, b])
        if cast is not None:   # the probabilities in the dtype the exp had (computed before the cast)
            new = _emit(g, node, cast.target, [new, *cast.args[1:]], dict(cast.kwargs))
        node.replace_all_uses_with(new)
        g.erase_node(node)
    g.eliminate_dead_code()
    gm.recompile()


def _sum_of_exponentials(b) -> bool:
    """Is b a sum of exponentials (through casts: a 16-bit log_softmax sums in float32), never negative?"""
    while isinstance(b, fx.Node) and b.target in CASTS:
        b = b.args[0]
    if not (isinstance(b, fx.Node) and b.target is aten.sum.dim_IntList):
        return False
    e = b.args[0]
    while isinstance(e, fx.Node) and e.target in CASTS:
        e = e.args[0]
    return isinstance(e, fx.Node) and e.target is aten.exp.default


def _ancestors_upto(node):
    """Nodes `node` depends on (so they come before it in the graph)."""
    seen, stack = set(), [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _dim_of(node, dim):
    return dim % len(node.meta["val"].shape)


def _width(node, dim):
    """Size of `node` along `dim` counted from the right (its rank may be lower: broadcasting)."""
    shape = node.meta["val"].shape
    return shape[dim] if -dim <= len(shape) else 1


def _emit(g, before, target, args, kwargs=None):
    with g.inserting_before(before):
        node = g.call_function(target, tuple(args), kwargs or {})
    val = lambda a: a.meta["val"] if isinstance(a, fx.Node) else [val(x) for x in a] \
        if isinstance(a, (list, tuple)) else a  # noqa: E731
    node.meta["val"] = target(*[val(a) for a in args], **(kwargs or {}))
    node.meta["stack_trace"] = before.meta.get("stack_trace")
    return node


def _split_one_use(g, cat, use):
    """Rewrite one user of `cat` over its pieces; returns False when it cannot (left as it is)."""
    pieces, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else 0
    rank = len(cat.meta["val"].shape)
    neg = _dim_of(cat, dim) - rank                      # the cat dim, counted from the right
    if any(len(p.meta["val"].shape) != rank for p in pieces):
        return False   # cat skips empty 1-D pieces of any rank (a cache not filled yet): left as it is
    widths = [p.meta["val"].shape[neg] for p in pieces]
    starts = [sum(widths[:i]) for i in range(len(widths))]
    total = sum(widths)
    t = use.target
    if (t in ELEMENTWISE or t in CASTS) and rank == len(use.meta["val"].shape):   # casts: bf16 softmax upcasts
        parts = []
        for piece, start, width in zip(pieces, starts, widths):
            args = []
            for a in use.args:
                if a is cat:
                    args.append(piece)
                elif isinstance(a, fx.Node) and _width(a, neg) == total and total != 1:
                    args.append(_emit(g, use, aten.slice.Tensor, [a, neg, start, start + width]))
                elif isinstance(a, fx.Node) and _width(a, neg) != 1:
                    return False
                else:
                    args.append(a)
            parts.append(_emit(g, use, t, args, dict(use.kwargs)))
        new = _emit(g, use, aten.cat.default, [parts, dim])
    elif t in (aten.amax.default, aten.sum.dim_IntList) and len(use.args) > 1 and \
            list(use.args[1] or []) and len(use.args[1]) == 1 and _dim_of(cat, use.args[1][0]) - rank == neg:
        keep = use.args[2] if len(use.args) > 2 else use.kwargs.get("keepdim", False)
        combine = aten.maximum.default if t is aten.amax.default else aten.add.Tensor
        new = None
        for piece, width in zip(pieces, widths):
            if width == 1:   # a reduction over one element is the element
                part = piece if keep else _emit(g, use, aten.squeeze.dim, [piece, neg])
            else:
                part = _emit(g, use, t, [piece, [neg], keep])
            new = part if new is None else _emit(g, use, combine, [new, part])
    elif t is aten.slice.Tensor and _dim_of(cat, use.args[1]) - rank == neg and \
            (len(use.args) < 5 or use.args[4] == 1):
        lo = use.args[2] if len(use.args) > 2 and use.args[2] is not None else 0
        hi = use.args[3] if len(use.args) > 3 and use.args[3] is not None else total
        lo, hi = (max(0, min(x + total if x < 0 else x, total)) for x in (lo, hi))
        chosen = [p for p, s0, w in zip(pieces, starts, widths) if lo <= s0 and s0 + w <= hi]
        if sum(_width(p, neg) for p in chosen) != hi - lo or not chosen:
            return False   # the slice cuts through a piece
        new = chosen[0] if len(chosen) == 1 else _emit(g, use, aten.cat.default, [chosen, dim])
    else:
        return False
    use.replace_all_uses_with(new)
    g.erase_node(use)
    return True


def _split_concats(gm: fx.GraphModule) -> None:
    """Push elementwise ops, reductions over the cat dim and slices of whole pieces through cat."""
    g = gm.graph
    changed = True
    while changed:
        changed = False
        for node in list(g.nodes):
            if node.op == "call_function" and node.target is aten.cat.default and node.users and \
                    all(isinstance(p, fx.Node) for p in node.args[0]):
                for use in list(node.users):
                    changed |= _split_one_use(g, node, use)
        g.eliminate_dead_code()
    gm.recompile()


def _functorch_depth() -> int:
    try:
        return len(torch._C._functorch.get_interpreter_stack() or [])
    except Exception:   # a torch without it: nothing to restore
        return 0


def _pop_functorch_levels(depth: int) -> None:
    """Pop the functorch transforms a failed trace left on functorch's stack above `depth`: tracing a graph
    that runs vmap (transformers builds its masks with vmap) under functionalize can raise inside both,
    and the levels left behind made the Inductor compile that follows fail too (an internal assert)."""
    from torch._functorch.pyfunctorch import TransformType
    ft = torch._C._functorch
    pop = {TransformType.Vmap: ft._vmap_decrement_nesting, TransformType.Grad: ft._grad_decrement_nesting,
           TransformType.Jvp: ft._jvp_decrement_nesting, TransformType.Functionalize: ft._func_decrement_nesting}
    while _functorch_depth() > depth:
        pop[ft.peek_interpreter_stack().key()]()


def _dispatch_functionalize(fn):
    """`fn` functionalized by FunctionalTensorMode (Python functionalization, as AOTAutograd does): unlike
    functorch's functionalize transform it traces graphs that run vmap (transformers builds its masks with
    vmap). Writes into the inputs are copied back at the end, as functorch's remove="mutations" does."""
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    def unwrap(t):
        torch._sync(t)
        return torch._from_functional_tensor(t.elem)

    def inner(*args):
        skip = torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(torch._C.DispatchKey.Functionalize))
        with skip, FunctionalTensorMode():
            wrapped = [FunctionalTensor.to_functional(a) if isinstance(a, torch.Tensor) else a for a in args]
            out = torch.utils._pytree.tree_map_only(FunctionalTensor, unwrap, fn(*wrapped))
            written = [(a, unwrap(w)) for a, w in zip(args, wrapped)
                       if isinstance(w, FunctionalTensor) and torch._functionalize_has_data_mutation(w.elem)]
        for a, value in written:
            a.copy_(value)
        return out
    return inner


def normalize(fn, example_inputs, masked_sdpa_as_math: bool = True) -> fx.GraphModule:
    """Trace `fn` (a GraphModule from dynamo or any callable) on `example_inputs` into aten ops: in-place
    ops become out-of-place ones (`s.masked_fill_(m, -inf)` on the scores is `masked_fill`), so the matcher
    sees one spelling; writes into the function's inputs stay, as copies at the end. Functionalized by
    functorch's transform, or where that fails (a graph that runs vmap) by FunctionalTensorMode.
    `masked_sdpa_as_math`: scaled_dot_product_attention calls with a mask in their math form (see above)."""
    depth = _functorch_depth()
    modes = []   # one per trace attempt: the last one's count of SDPA calls in math form goes with the graph
    if masked_sdpa_as_math:
        fn = _with_masked_sdpa_as_math(fn, modes)
    with _apart_from_saved_tensor_hooks():
        try:
            gm = _normalize(fn, example_inputs, lambda f: torch.func.functionalize(f, remove="mutations"),
                            masked_sdpa_as_math)
        except Exception:
            _pop_functorch_levels(depth)
            try:
                gm = _normalize(fn, example_inputs, _dispatch_functionalize, masked_sdpa_as_math)
            except Exception:
                _pop_functorch_levels(depth)
                raise
    gm.meta[MASKED_SDPA_CALLS] += modes[-1].calls if modes else 0   # the calls seen, besides the kernels
    # the calls left as PyTorch's kernels, counted in the graph: those the function mode passed on, and those
    # inside torch functions it cannot see into (nn.MultiheadAttention's is_causal call)
    gm.meta[KEPT_SDPA_CALLS] = sum(n.op == "call_function" and n.target in _SDPA_FORWARD_KERNELS for n in gm.graph.nodes)
    return gm


MASKED_SDPA_CALLS = "flashlight_masked_sdpa_calls"   # gm.meta: how many SDPA calls normalize() traced as math
KEPT_SDPA_CALLS = "flashlight_kept_sdpa_calls"       # and how many it left as calls (no mask, dropout, is_causal)


def _with_masked_sdpa_as_math(fn, modes: list):
    if isinstance(fn, fx.GraphModule):
        gm = fn

        def fn(*args):
            return fx.Interpreter(gm).run(*args)

    def traced(*args):
        modes.append(_MaskedSdpaAsMath())
        with modes[-1]:
            return fn(*args)
    return traced


def _apart_from_saved_tensor_hooks():
    """Tracing runs the program's ops on fake tensors that require grad, and autograd saves some of them;
    saved-tensor hooks of the caller's must not see those. Non-reentrant activation checkpointing counts
    the tensors its forward saves and compares the count in the recomputation: a first call that compiled
    (traced) under it failed that check. Hooks of our own, innermost, take the trace's saves."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)


# PyTorch's SDPA kernels, as a trace meets them where the call was not seen (inside a Python-level torch
# function such as F.multi_head_attention_forward, which nn.MultiheadAttention runs): the mask's argument
_SDPA_KERNELS = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: "attn_mask",
    aten._scaled_dot_product_efficient_attention.default: "attn_bias",
    aten._scaled_dot_product_cudnn_attention.default: "attn_bias",
    aten._scaled_dot_product_fused_attention_overrideable.default: "attn_bias",
}


_SDPA_FORWARD_KERNELS = {*_SDPA_KERNELS, aten._scaled_dot_product_flash_attention.default}


def _masked_sdpa_kernels_as_math(gm: fx.GraphModule) -> int:
    """Replace each SDPA kernel given a mask (no dropout, not causal, only its output read) by
    _scaled_dot_product_attention_as_math, traced on the kernel's inputs; returns how many."""
    from torch.fx.operator_schemas import normalize_function

    replaced = 0
    for node in list(gm.graph.nodes):
        mask_arg = _SDPA_KERNELS.get(node.target) if node.op == "call_function" else None
        if mask_arg is None:
            continue
        kw = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        mask = kw.get(mask_arg)
        # read: only its output (a forward's trace leaves the log-sum-exp and the like unread)
        if mask is None or kw.get("dropout_p", 0.0) != 0.0 or kw.get("is_causal", False) or \
                not all(u.target is operator.getitem and (u.args[1] == 0 or not u.users) for u in node.users):
            continue
        ins = [kw["query"], kw["key"], kw["value"], mask]
        vals = [n.meta["val"] for n in ins]
        scale = kw.get("scale")
        # the kernel's output layout: the trace after it relied on it (a .contiguous() it made a no-op)
        want = next(u for u in node.users if u.args[1] == 0).meta["val"].stride() if node.users else None

        def math(q, k, v, m):
            out = _scaled_dot_product_attention_as_math(q, k, v, m, scale=scale)
            if want is not None and out.stride() != tuple(want):
                order = sorted(range(out.dim()), key=lambda d: -want[d])   # outermost first
                out = out.permute(order).contiguous().permute([order.index(d) for d in range(out.dim())])
            return out
        with detect_fake_mode(vals):
            sub = make_fx(math, decomposition_table=decompositions(), tracing_mode="real")(*vals)
        if any(n.op == "get_attr" for n in sub.graph.nodes):   # constants to carry over: the kernel stays
            continue
        env, out = {}, None
        placeholders = iter(ins)
        with gm.graph.inserting_before(node):
            for n in sub.graph.nodes:
                if n.op == "placeholder":
                    env[n] = next(placeholders)
                elif n.op == "output":
                    out = env[n.args[0]]
                else:
                    env[n] = gm.graph.node_copy(n, lambda a: env[a])
        for user in list(node.users):
            if user.args[1] == 0:
                user.replace_all_uses_with(out)
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        replaced += 1
    if replaced:
        gm.recompile()
    return replaced


def _normalize(fn, example_inputs, functionalize, masked_sdpa_as_math=False) -> fx.GraphModule:
    if isinstance(fn, fx.GraphModule):
        gm = fn

        def fn(*args):
            return fx.Interpreter(gm).run(*args)

    fn = functionalize(fn)
    fake_mode = detect_fake_mode(example_inputs)
    with fx.traceback.preserve_node_meta():
        if fake_mode is not None:
            example_inputs = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) and
                              not isinstance(x, FakeTensor) else x for x in example_inputs]
            with fake_mode:
                gm = make_fx(fn, decomposition_table=decompositions(), tracing_mode="real",
                             record_stack_traces=True)(*example_inputs)
        else:
            # tensors the function closes over (a module's weights, a mask built outside) are real:
            # they become constants of the graph, as in torch.compile
            gm = make_fx(fn, decomposition_table=decompositions(), tracing_mode="fake",
                         record_stack_traces=True, _allow_non_fake_inputs=True)(*example_inputs)
    gm.meta[MASKED_SDPA_CALLS] = _masked_sdpa_kernels_as_math(gm) if masked_sdpa_as_math else 0
    _drop_aliases(gm)
    _tensor_literals(gm)
    _likes_as_constants(gm)
    _drop_empty_cat_pieces(gm)
    _values_only_max(gm)
    _pre_shifted_softmax(gm)
    _natural_exponentials(gm)
    _split_concats(gm)
    return gm


def _tensor_literals(gm: fx.GraphModule) -> None:
    """A one-element tensor the traced code creates from a number (`torch.tensor(torch.finfo(dtype).min,
    dtype=..., device=...)`, GPT-J's and CodeGen's mask value) is traced as a constant of the graph and a
    `lift_fresh_copy` of it: it becomes `full(shape, value)`, so that the matcher sees the number (a fill that
    skips tiles, a literal in the kernel) instead of a tensor it must read. The value cannot change between
    calls: it was a number when traced. Constants the code closes over (no lift_fresh_copy) stay tensors."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.lift_fresh_copy.default:
            continue
        const = node.args[0]
        t = getattr(gm, const.target, None) if const.op == "get_attr" and isinstance(const.target, str) else None
        val = node.meta.get("val")
        if not isinstance(t, torch.Tensor) or isinstance(t, FakeTensor) or t.is_meta or t.numel() != 1 or \
                val is None or t.is_complex():
            continue   # a value to read: only a real one-element constant is a number here
        _replace_by_full(gm, node, t.shape, t.item(), t.dtype, val.device)
        if not const.users:
            gm.graph.erase_node(const)
        changed = True
    if changed:
        gm.recompile()


def _replace_by_full(gm: fx.GraphModule, node, shape, value, dtype, device) -> None:
    """node, a tensor of one value throughout, replaced by `full(shape, value)` (its meta kept)."""
    with gm.graph.inserting_before(node):
        full = gm.graph.call_function(aten.full.default, (list(shape), value),
                                      {"dtype": dtype, "layout": torch.strided, "device": device, "pin_memory": False})
    full.meta = dict(node.meta)
    node.replace_all_uses_with(full)
    gm.graph.erase_node(node)


_LIKES = {aten.full_like.default: None, aten.zeros_like.default: 0, aten.ones_like.default: 1}


def _likes_as_constants(gm: fx.GraphModule) -> None:
    """`torch.full_like(s, v)` (`torch.where(keep, s, torch.full_like(s, float("-inf")))`), `zeros_like`,
    `ones_like` read only the layout of s: each becomes `full(shape, v)`, so that the scores are not taken
    for a value used outside the attention (which kept such programs from fusing) and the fill is a number.
    Only where s is contiguous with a static shape, so that the constant's layout is the one full gives."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LIKES or not isinstance(node.args[0], fx.Node):
            continue
        val, kw = node.args[0].meta.get("val"), node.kwargs
        if not isinstance(val, torch.Tensor) or any(not isinstance(d, int) for d in val.shape) \
                or not val.is_contiguous() or kw.get("layout") not in (None, torch.strided) \
                or kw.get("memory_format") not in (None, torch.preserve_format, torch.contiguous_format):
            continue
        value = node.args[1] if node.target is aten.full_like.default else _LIKES[node.target]
        if not isinstance(value, (bool, int, float)):   # a symbolic value: left as it is
            continue
        _replace_by_full(gm, node, val.shape, value, kw.get("dtype") or val.dtype, kw.get("device") or val.device)
        changed = True
    if changed:
        gm.recompile()


def _drop_empty_cat_pieces(gm: fx.GraphModule) -> None:
    """Pieces with no elements add nothing to a cat: Meta's Llama reference builds its causal mask as
    `torch.hstack([torch.zeros((S, 0)), torch.full((S, S), -inf).triu(1)])` (the zeros are for a KV cache,
    empty at the first step), and with them gone the mask is index arithmetic again, not a tensor to
    classify on every call. Only where every piece kept has the cat's dtype (so no type promotion is lost);
    a cat left with one piece of its own shape is that piece."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.cat.default:
            continue
        pieces, out = node.args[0], node.meta.get("val")
        if out is None or not all(isinstance(p, fx.Node) and isinstance(p.meta.get("val"), torch.Tensor)
                                  for p in pieces):
            continue
        kept = [p for p in pieces if p.meta["val"].numel() > 0]
        if len(kept) == len(pieces) or not kept or any(p.meta["val"].dtype != out.dtype for p in kept):
            continue
        if len(kept) == 1 and tuple(kept[0].meta["val"].shape) == tuple(out.shape) and \
                all(u.op != "output" for u in node.users):
            node.replace_all_uses_with(kept[0])
            gm.graph.erase_node(node)
        else:
            node.args = (kept, *node.args[1:])
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def _drop_aliases(gm: fx.GraphModule) -> None:
    """`aten.alias(x)` is x (a view of all of it: FunctionalTensorMode leaves them where a value is returned
    as a view): its users read x, so the matcher sees x's own users."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is aten.alias.default and \
                all(u.op != "output" for u in node.users):   # a returned view stays one
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.recompile()
