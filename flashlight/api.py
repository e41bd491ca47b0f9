"""Public API: compile, explain, counters."""
from __future__ import annotations

import contextlib
import functools
import types

import torch

from flashlight.compiler import choose
from flashlight.compiler.backend import flashlight_backend, fuse, normalize_and_plan
from flashlight.compiler.explain import Report
from flashlight.compiler.runtime import counters  # noqa: F401  (re-exported)


def compile(fn, *, dump=None, config=None, inductor=True, block_sparse=True, choose_faster=True, fullgraph=False,
            dynamic=False, **kwargs):
    """torch.compile `fn` with the flashlight backend.

    dump: directory where generated kernels are written (also FLASHLIGHT_DUMP=dir).
    config: tile config for the fused kernels, e.g. {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8}.
    inductor: compile the rest of the graph with Inductor (False runs it eagerly: quicker to start).
    block_sparse: skip key tiles that a -inf mask provably removes (False computes every tile).
    choose_faster: on the first call on a GPU, time the graph against Inductor's unfused version where
        that is cheap (inference, small sizes) and run the faster from then on (False: always the fused).
    mode, options (torch.compile's): apply to the Inductor compile around the fused regions;
        mode="reduce-overhead" runs the graph, fused kernels included, as CUDA graphs.
    """
    backend = functools.partial(flashlight_backend, dump=dump, config=config, inductor=inductor,
                                block_sparse=block_sparse, choose_faster=choose_faster)
    functools.update_wrapper(backend, flashlight_backend)
    return torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=dynamic, **kwargs)


def explain(fn, *args, **kwargs) -> Report:
    """Trace `fn(*args, **kwargs)` and report, per attention region, what fused and why not.

    `fn` is anything torch.compile takes: a function (closing over tensors or not) or an nn.Module,
    whose parameters and buffers become inputs of the graph, as dynamo lifts them. Where a region fuses,
    `fn` also runs once through torch.compile's graph capture (no compiling): if that does not capture it as
    one graph, the report is of the graphs it does capture, as flashlight.compile would fuse them."""
    names = list(kwargs)
    state = {}
    if isinstance(fn, torch.nn.Module):
        state = {**dict(fn.named_parameters()), **dict(fn.named_buffers())}
    keys = list(state)
    n_call = len(args) + len(names)

    def flat(*xs):
        call_args, call_kwargs = xs[:len(args)], dict(zip(names, xs[len(args):n_call]))
        with _module_state_swapped(fn, dict(zip(keys, xs[n_call:]))):
            out = fn(*call_args, **call_kwargs)
        # the output's tensors only: a model may return objects a trace cannot (transformers' caches)
        return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    inputs = [*args, *kwargs.values(), *state.values()]
    try:
        _, planned, notes = normalize_and_plan(flat, inputs)
    except Exception as e:   # not traceable whole: Python control flow on tensor values
        return _explain_graph_by_graph(fn, args, kwargs, f"the program cannot be traced whole ({type(e).__name__}: "
                                                         f"{' '.join(str(e).split())[:200]})")
    if any(rep.fused for rep, _, _ in planned):
        # what torch.compile captures may be less than the whole trace: a graph break (dynamo cannot trace a
        # call, e.g. nn.MultiheadAttention's deprecation warning for masks of mixed types) leaves code in
        # torch's own files to run eagerly, and then the report must say what compile really fuses
        try:
            graphs, reasons = _dynamo_graphs(fn, args, kwargs)
        except Exception:   # (out of memory on a huge shape, say): the whole trace's report stands
            graphs = None
        if graphs is not None and len(graphs) != 1:
            why = ("torch.compile does not capture it whole" + (f" (graph break: {'; '.join(reasons)[:300]})"
                   if reasons else "") + "; what no graph holds runs eagerly, unfused")
            return _explain_graph_by_graph(fn, args, kwargs, why, graphs)
    report = Report([rep for rep, _, _ in planned], notes=notes)
    if not planned:
        report.notes.append("no attention region (matmul → row program → matmul) found")
    _known_choice(report, inputs)
    return report


@contextlib.contextmanager
def _module_state_swapped(module, new_state: dict):
    """The module's parameters and buffers (named as in `new_state`) replaced by `new_state`'s tensors while
    inside, every module holding one (tied weights: the same tensor held by several modules, or one module
    reached by several names) included; put back on exit. torch.func.functional_call does not put back a
    parameter of a module reached by two names (T5's shared embedding), which left a traced tensor in the
    user's model."""
    if not new_state:
        yield
        return
    old_state = dict(module.named_parameters())
    old_state.update(module.named_buffers())
    replacement = {id(old_state[name]): t for name, t in new_state.items()}
    swapped = []   # (holder dict, key, original)
    for sub in module.modules():   # each module object once
        for holder in (sub._parameters, sub._buffers):
            for key, t in holder.items():
                if t is not None and id(t) in replacement:
                    swapped.append((holder, key, t))
    try:
        for holder, key, t in swapped:
            holder[key] = replacement[id(t)]
        yield
    finally:
        for holder, key, t in swapped:
            holder[key] = t


def _dynamo_graphs(fn, args, kwargs):
    """[(graph, example inputs)] as torch.compile captures `fn` (dynamo's graphs, left as they are), and
    dynamo's graph-break reasons. Runs `fn` once, graph by graph, eagerly."""
    from torch._dynamo.utils import counters as dynamo_counters

    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    before = dict(dynamo_counters["graph_break"])
    torch.compile(_fresh_entry(fn), backend=keep)(*args, **kwargs)
    reasons = [_break_reason(r) for r, n in dynamo_counters["graph_break"].items() if n > before.get(r, 0)]
    return graphs, reasons


def _fresh_entry(fn):
    """`fn` behind a function of a code object of its own: dynamo keeps compiled code per code object (at
    most 8 entries, then it runs the code eagerly), and explain's captures, each with a backend of its own,
    must not fill the entries of the caller's function (a later flashlight.compile of it would not fuse)."""
    def call(*args, **kwargs):
        return fn(*args, **kwargs)
    return types.FunctionType(call.__code__.replace(), call.__globals__, call.__name__, call.__defaults__,
                              call.__closure__)


def _break_reason(text: str) -> str:
    """Dynamo's graph-break message in a line: its explanation where it gives one."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    explained = [line.removeprefix("Explanation:").strip() for line in lines if line.startswith("Explanation:")]
    return (explained or lines or [""])[0]


def _explain_graph_by_graph(fn, args, kwargs, why: str, graphs=None) -> Report:
    """A program that cannot be traced whole (Python control flow on tensor values: transformers' OPT
    decides by a random number whether a layer runs), or that torch.compile does not capture whole, is split
    into graphs by dynamo, as torch.compile does (`graphs`: already captured); each graph is explained as
    flashlight.compile's backend sees it."""
    if graphs is None:
        graphs, _ = _dynamo_graphs(fn, args, kwargs)
    regions, notes = [], []
    for number, (gm, example_inputs) in enumerate(graphs, 1):
        try:   # as flashlight.compile's backend analyses it
            regions.extend(fuse(gm, example_inputs)[1].regions)
        except Exception as e:   # as the backend: such a graph is left to Inductor
            notes.append(f"graph {number}: capturing it failed ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); left to Inductor")
    report = Report(regions, notes=[f"traced by torch.compile in {len(graphs)} graph(s): {why}", *notes])
    if not regions:
        report.notes.append("no attention region (matmul → row program → matmul) found")
    inputs = [*args, *kwargs.values()]
    if isinstance(fn, torch.nn.Module):
        inputs += list(fn.parameters())
    _known_choice(report, inputs)
    return report


def _known_choice(report: Report, inputs) -> None:
    """What flashlight.compile runs for these kernels on this GPU, if its first call has timed them
    against Inductor's unfused code (compiler/choose.py)."""
    fused = [r for r in report.regions if r.fused]
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not fused or not tensors:
        return
    choice = choose.known_choice(choose.choice_key([r.kernel_source for r in fused], tensors[0].device))
    if choice is not None:
        choose.report_choice(report, choice)
