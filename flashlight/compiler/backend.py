"""The torch.compile backend: fuse attention regions, hand everything else to Inductor.

``torch.compile(fn, backend="flashlight")`` (entry point ``torch_dynamo_backends``) calls
``flashlight_backend``. It normalises dynamo's graph (capture), finds regions (analysis), rewrites
them into online form and generates Triton (rewrite, codegen), replaces each fused region by a call
to the ``flashlight::fused_attention`` op (runtime), and compiles the resulting graph with Inductor.
A region that cannot be fused stays as it was and Inductor compiles it as usual.
"""
from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

from flashlight.compiler import choose
from flashlight.compiler.analysis import NotFusable, analyse, find_pv_candidates, may_change_after, shape_of
from flashlight.compiler.capture import KEPT_SDPA_CALLS, MASKED_SDPA_CALLS, normalize
from flashlight.compiler.backward import backward_for
from flashlight.compiler.codegen import generate
from flashlight.compiler.explain import RegionReport, Report
from flashlight.compiler.runtime import CompiledRegion, interpreting, register

aten = torch.ops.aten
prims = torch.ops.prims

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

last_report: Report | None = None   # the report of the most recent compile, for debugging


def _check_device(region):
    for sm in region.scores:
        for acc in (sm.q, sm.k):
            val = acc.source.meta["val"]
            if acc.dtype not in SUPPORTED_DTYPES:
                raise NotFusable(f"{acc.source.name} has dtype {acc.dtype}; the fused kernel supports "
                                 "float32, float16 and bfloat16")
            if val.device.type != "cuda" and not interpreting():
                raise NotFusable(f"inputs are on {val.device.type}: Triton kernels need a CUDA device "
                                 "(set TRITON_INTERPRET=1 to run them on CPU, slowly, for tests)")
    # Triton's interpreter multiplies bfloat16 tiles wrongly (tl.dot of two bfloat16 tiles, triton 3.6)
    operands = [acc for sm in region.scores for acc in (sm.q, sm.k)] + [region.value]
    if any(acc.dtype == torch.bfloat16 and acc.source.meta["val"].device.type != "cuda" for acc in operands):
        raise NotFusable("bfloat16 matmuls on the CPU: Triton's interpreter computes them wrongly; run on a GPU, "
                         "or in float16 or float32 on the CPU")


def region_subgraph(gm: fx.GraphModule, leaves, output) -> fx.GraphModule:
    """The region as a graph of its own: its leaves in, its output out, the user's ops in between."""
    needed, stack = set(), [output]
    while stack:
        n = stack.pop()
        if n in needed or n in leaves:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    g = fx.Graph()
    env = {leaf: g.placeholder(leaf.name) for leaf in leaves}
    for n in gm.graph.nodes:
        if n not in needed:
            continue
        env[n] = g.node_copy(n, lambda a: env[a])
        # the decompositions leave a few prims, which torch.autograd cannot differentiate: their aten twins
        if n.target is prims.where.default:
            env[n].target = torch.where
        elif n.target is prims.convert_element_type.default:
            env[n].target, env[n].args, env[n].kwargs = aten._to_copy.default, (env[n].args[0],), {"dtype": n.args[1]}
    g.output(env[output])
    return fx.GraphModule(gm, g)


def requires_grad_nodes(gm: fx.GraphModule, example_inputs) -> set:
    """Nodes whose value requires grad: a floating value computed from an input that requires grad."""
    out = set()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for n, x in zip(placeholders, example_inputs):
        if isinstance(x, torch.Tensor) and x.requires_grad:
            out.add(n)
    def floating(val):
        if isinstance(val, (list, tuple)):   # split, unbind…: read through getitem
            return any(floating(v) for v in val)
        # complex too: RoPE written with view_as_complex carries the gradient through complex values
        return isinstance(val, torch.Tensor) and (val.dtype.is_floating_point or val.dtype.is_complex)

    for n in gm.graph.nodes:
        if n.op == "call_function" and floating(n.meta.get("val")) and n.target is not aten.detach.default \
                and any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def training_saves(ks) -> str:
    """What a training forward keeps for its backward, and why an accumulator is among it."""
    kinds = [kind for _, kind in ks.saved]
    rows, vectors = kinds.count("row"), kinds.count("vector")
    if ks.row_program.get("from_out"):
        return f"{rows} per-row statistics; the output stands in for its ·V accumulator"
    what = f"{rows} per-row statistics and {vectors} ·V accumulator(s)"
    if ks.row_program.get("row_linear"):
        what += (" (the output could stand in for its accumulator, but it leaves the compiled graph, where "
                 "it may be written in place before the backward)")
    return what


def plan(gm: fx.GraphModule, training: bool = False, dump=None, config=None, block_sparse=True,
         example_inputs=(), cuda_graphs=False):
    """Analyse every attention region of a normalised graph: [(report, region, compiled | None)]."""
    out = []
    grad_nodes = requires_grad_nodes(gm, example_inputs) if training else set()
    for pv in find_pv_candidates(gm):
        rep = RegionReport(output=pv.name, fused=False)
        try:
            region = analyse(gm, pv)
            region.learned = {leaf for leaf in region.leaves if leaf in grad_nodes}
            rep.matched = {
                "inputs": [n.name for n in region.leaves],
                "score matmuls": [sm.node.name for sm in region.scores],
                "batch dims": tuple(region.batch_sizes),
                "queries × keys": (region.sizes["m"], region.sizes["n"]),
                "ops": sorted({str(n.target).replace("aten.", "") for n in region.nodes}),
            }
            ks = generate(region, block_sparse=block_sparse, training=training,
                          output_may_change=training and may_change_after(region.output))
            rep.kernel_source = ks.source
            rep.matched["online form"] = "; ".join(ks.notes)
            rep.matched["tile skipping"] = ks.tile_skipping
            if ks.cuda_core_dots:
                rep.matched["matmul units"] = (
                    "CUDA cores: float32 tiles at full precision (torch's default float32 matmul precision) have "
                    "no tensor-core instruction, so the kernels are far slower than with bfloat16, float16 or "
                    "TF32 (torch.set_float32_matmul_precision('high'))")
            if ks.int_bits == 64:
                rep.matched["index math"] = ("int64, as eager computes it: a value computed from positions may pass "
                                             "2**31 (ranges.py; int32 where none can, which is faster)")
            if training:
                rep.matched["training forward saves"] = training_saves(ks)
            _check_device(region)
            backward = None
            if training:
                try:
                    backward = backward_for(region, ks, block_sparse, [n in grad_nodes for n in region.leaves])
                except NotFusable as e:
                    rep.backward_fused, rep.backward_reason = False, str(e)
                    raise NotFusable(f"inputs require grad, and the backward cannot be generated: {e}") from None
                rep.backward_fused = True
                rep.backward_source = backward.source
            rep.fused = True
            compiled = CompiledRegion(ks, dict(config or {}), dump, backward_source=backward, cuda_graphs=cuda_graphs)
            if training:   # the user's own ops for the region, kept for a backward that fails to run
                compiled.reference = region_subgraph(gm, region.leaves, region.output)
            out.append((rep, region, compiled))
        except NotFusable as e:
            rep.reason = str(e)
            out.append((rep, None, None))
        except Exception as e:   # a bug of ours in generation must not become the user's exception
            rep.reason = f"code generation failed ({type(e).__name__}: {e}); left to Inductor"
            rep.fused = False
            warnings.warn(f"flashlight: region ending at {pv.name}: {rep.reason}", stacklevel=2)
            out.append((rep, None, None))
    return out


def replace_regions(gm: fx.GraphModule, planned) -> None:
    g = gm.graph
    for rep, region, compiled in planned:
        if compiled is None:
            continue
        key = register(compiled)
        out = region.output
        with g.inserting_before(out):
            leaves = _on_one_device(g, region)
            if compiled.backward_source is not None:   # training: the op that carries its backward
                res = g.call_function(torch.ops.flashlight.fused_attention_train.default, (leaves, key))
                fused = g.call_function(operator.getitem, (res, 0))
            else:
                fused = g.call_function(torch.ops.flashlight.fused_attention.default, (leaves, key))
            view = g.call_function(aten.view.default, (fused, list(shape_of(out))))
        view.meta = dict(out.meta)
        out.replace_all_uses_with(view)
    g.eliminate_dead_code()
    gm.recompile()


def _on_one_device(g: fx.Graph, region) -> list:
    """The region's inputs, each on the device of its queries: a tensor the program made on another device
    (transformers' BEiT builds its relative position index on the CPU and gathers a GPU table with it, which
    eager indexing allows) is copied there first, as eager copies it; the kernels read one device's memory."""
    device = region.scores[0].q.source.meta["val"].device
    leaves = []
    for leaf in region.leaves:
        val = leaf.meta.get("val")
        if isinstance(val, torch.Tensor) and val.device != device:
            leaf = g.call_function(aten._to_copy.default, (leaf,), {"device": device})
        leaves.append(leaf)
    return leaves


def normalize_and_plan(fn, example_inputs, **options):
    """normalize() then plan(): (aten graph, planned, notes). scaled_dot_product_attention calls with a mask
    are planned in their math form. If a region does not fuse, the graph is traced again with those calls
    left as they are: unless the math form fused that many more regions than there are such calls, some
    call's math did not fuse, and the calls stay (PyTorch's kernels beat that math unfused); a note says
    why."""
    training = choose.is_training(example_inputs)
    aten_gm = normalize(fn, example_inputs)
    planned = plan(aten_gm, training=training, example_inputs=example_inputs, **options)
    kept = aten_gm.meta.get(KEPT_SDPA_CALLS)
    kept = [f"{kept} scaled_dot_product_attention call(s) without a mask (or with dropout or is_causal) stay as "
            "they are: PyTorch's Flash and cuDNN kernels run them"] if kept else []
    as_math = aten_gm.meta.get(MASKED_SDPA_CALLS, 0)
    reasons = [rep.reason for rep, _, compiled in planned if compiled is None]
    if not as_math or not reasons:
        return aten_gm, planned, kept
    as_calls = normalize(fn, example_inputs, masked_sdpa_as_math=False)
    planned_as_calls = plan(as_calls, training=training, example_inputs=example_inputs, **options)
    fused = sum(compiled is not None for _, _, compiled in planned)
    if fused - sum(compiled is not None for _, _, compiled in planned_as_calls) >= as_math:
        return aten_gm, planned, kept   # every call's math fused; what did not fuse is not theirs
    for rep, _, compiled in planned_as_calls:   # what is left: the calls' reasons (node names permitting)
        if compiled is None and rep.reason in reasons:
            reasons.remove(rep.reason)
    notes = [f"scaled_dot_product_attention with a mask, traced as its math, does not fuse ({why}); the "
             "call stays as it is" for why in reasons]
    return as_calls, planned_as_calls, kept + notes


def fuse(gm, example_inputs, dump=None, config=None, block_sparse=True, cuda_graphs=False, compiled=None):
    """Normalise and fuse; returns (graph module to run, report, number of regions fused). `compiled`: a
    list that receives the CompiledRegion of each fused region."""
    aten_gm, planned, notes = normalize_and_plan(gm, example_inputs, dump=dump, config=config,
                                                 block_sparse=block_sparse, cuda_graphs=cuda_graphs)
    report = Report([rep for rep, _, _ in planned], notes=notes)
    if not planned:
        report.notes.append("no attention region (matmul → row program → matmul) in this graph")
    n_fused = sum(c is not None for _, _, c in planned)
    if compiled is not None:
        compiled.extend(c for _, _, c in planned if c is not None)
    if n_fused:
        replace_regions(aten_gm, planned)
    return aten_gm, report, n_fused


def has_symbolic_sizes(example_inputs) -> bool:
    def symbolic(x):
        return isinstance(x, torch.SymInt) or any(not isinstance(s, int) for s in x.shape)
    return any(isinstance(x, (torch.Tensor, torch.SymInt)) and symbolic(x) for x in example_inputs)


class PerShape:
    """A graph dynamo handed over with symbolic sizes (it marks a size dynamic once it sees it change).

    Fused kernels are generated for static sizes, so the graph is compiled again for each distinct
    concrete input layout on its first call, as `dynamic=False` would, and kept. Past LIMIT layouts
    (a size that takes ever new values) the graph goes to Inductor's dynamic-shape compile, with a
    warning and the reason in `last_report`, rather than compiling without end.
    """

    LIMIT = 32

    def __init__(self, gm, example_inputs, **options):
        self.gm, self.example_inputs, self.options = gm, example_inputs, options
        self.compiled = {}
        self.dynamic = None

    @staticmethod
    def layout(args):
        return tuple((tuple(a.shape), tuple(a.stride()), a.storage_offset(), a.dtype, a.device.type,
                      a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args)

    def __call__(self, *args):
        key = self.layout(args)
        fn = self.compiled.get(key)
        if fn is None:
            fn = self.dynamic or self._compile(key, list(args))
        return fn(*args)

    def _compile(self, key, args):
        global last_report
        if len(self.compiled) < self.LIMIT:
            fn = self.compiled[key] = flashlight_backend(self.gm, args, **self.options)
            last_report.notes.append(
                "sizes marked dynamic by dynamo: compiled for these concrete sizes, and again for each "
                f"new layout of the inputs (up to {self.LIMIT})")
            return fn
        why = (f"more than {self.LIMIT} distinct input layouts: left to Inductor's dynamic-shape compile "
               "(the fused kernels are generated for static sizes; pad or bucket the lengths to fuse)")
        warnings.warn(f"flashlight: {why}", stacklevel=2)
        last_report = Report([], notes=[why])
        self.dynamic = _compile_unfused(self.gm, self.example_inputs,
                                        inductor_settings(**{k: self.options.get(k) for k in ("inductor", "mode", "options")}))
        return self.dynamic


class FallBackOnFailure:
    """A graph with fused regions, and what to run if they fail: the same graph without fusion.

    Generated kernels are compiled by Triton and launched on the first call; a failure there (a
    compile error, too little shared memory, a launch error) is ours, not the user's. The first call
    that raises switches, once and for all, to the graph compiled without fusion, with a warning and
    the reason in the report. An exception the unfused graph raises too is the user's and propagates.
    """

    def __init__(self, fused, unfused, report: Report, inductor, timing=None):
        self.fused, self.unfused, self.report, self.inductor = fused, unfused, report, inductor
        self.timing = timing   # (normalised graph, its CompiledRegions): time it against Inductor (choose.py)
        self.fn = None   # set after the first call: the fused graph if it ran, else the unfused one

    def __call__(self, *args):
        if self.fn is not None:
            return self.fn(*args)
        try:
            out = self.fused(*args)
        except Exception as e:
            self.fall_back(e, args, "the fused kernel failed on its first call")
            return self.fn(*args)
        self.fn = self.fused
        if self.timing is not None:
            self.choose(args)
            self.timing = None   # decided once: the graph and regions it held are not needed again
        return out

    def choose(self, args):
        """Run Inductor's unfused graph instead where it is faster (choose.py); say which in the report."""
        aten_gm, regions = self.timing
        why = choose.why_not_timed(aten_gm, regions, args)
        if why is not None:
            self.report.notes.append(f"not timed against Inductor's unfused code: {why}")
            return
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        key = choose.choice_key([r.ks.source for r in regions], device, [r.config for r in regions])
        choice = choose.known_choice(key)
        try:
            unfused = None
            if choice is None or choice["runs"] == "inductor":
                unfused = _compile_unfused(self.unfused, list(args), self.inductor)
            if choice is None:
                choice = choose.choose(key, *choose.time_both(self.fused, unfused, args),
                                       training=choose.is_training(args))
        except Exception as e:   # timing is an optimisation: the fused graph, which ran, stays
            self.report.notes.append(f"timing against Inductor's unfused code failed ({type(e).__name__}: {e})")
            return
        if choice["runs"] == "inductor":
            self.fn = unfused
        choose.report_choice(self.report, choice)

    def fall_back(self, error, args, what):
        global last_report
        why = f"{what} ({type(error).__name__}: {error}); left to Inductor"
        for rep in self.report.regions:
            if rep.fused:
                rep.fused, rep.reason = False, why
        warnings.warn(f"flashlight: {why}", stacklevel=3)
        last_report = self.report
        self.fn = _compile_unfused(self.unfused, list(args), self.inductor)


def _compile_unfused(gm, example_inputs, inductor):
    """The graph as Inductor compiles it (`inductor`: True, or a dict of Inductor config patches), or as
    it is (False: run eagerly)."""
    if not inductor:
        return gm
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, example_inputs, config_patches=inductor if isinstance(inductor, dict) else None)


def inductor_settings(inductor=True, mode=None, options=None):
    """torch.compile's `mode` ("reduce-overhead": CUDA graphs, "max-autotune") and `options` for the
    Inductor compile of the graph around the fused regions, as config patches (True: defaults)."""
    if inductor is None:
        inductor = True
    if not inductor or not (mode and mode != "default" or options):
        return inductor
    from torch._inductor import list_mode_options
    return {**(list_mode_options(mode) if mode and mode != "default" else {}), **(options or {})}


def cuda_graphs(inductor) -> bool:
    """Will Inductor run the compiled graph as CUDA graphs (mode="reduce-overhead", or its config)?"""
    from torch._inductor import config
    if isinstance(inductor, dict) and "triton.cudagraphs" in inductor:
        return bool(inductor["triton.cudagraphs"])
    return bool(inductor) and bool(config.triton.cudagraphs)


def flashlight_backend(gm: fx.GraphModule, example_inputs, *, dump=None, config=None, inductor=True,
                       block_sparse=True, choose_faster=True, mode=None, options=None):
    """The torch.compile backend. `mode` and `options` are torch.compile's, applied to the Inductor
    compile of the rest of the graph (mode="reduce-overhead" runs it, fused kernels included, as CUDA
    graphs). `choose_faster`: on the first call on a GPU, time the graph against Inductor's unfused
    version and run the faster (choose.py)."""
    global last_report
    if has_symbolic_sizes(example_inputs):
        return PerShape(gm, example_inputs, dump=dump, config=config, inductor=inductor,
                        block_sparse=block_sparse, choose_faster=choose_faster, mode=mode, options=options)
    inductor = inductor_settings(inductor, mode, options)
    try:
        regions = []
        aten_gm, report, n_fused = fuse(gm, example_inputs, dump=dump, config=config, block_sparse=block_sparse,
                                        cuda_graphs=cuda_graphs(inductor), compiled=regions)
    except Exception as e:   # tracing the graph to aten ops (or a bug of ours) must not fail the user's program
        why = f"capturing the graph failed ({type(e).__name__}: {' '.join(str(e).split())[:300]}); left to Inductor"
        warnings.warn(f"flashlight: {why}", stacklevel=2)
        last_report = Report([], notes=[why])
        return _compile_unfused(gm, example_inputs, inductor)
    last_report = report
    if not n_fused:
        return _compile_unfused(gm, example_inputs, inductor)
    try:
        fused = _compile_unfused(aten_gm, example_inputs, inductor)
    except Exception as e:   # Inductor could not compile the graph around the fused op
        fallback = FallBackOnFailure(None, gm, report, inductor)
        fallback.fall_back(e, example_inputs, "compiling the graph around the fused kernel failed")
        return fallback.fn
    # Inductor's version is the alternative; inside CUDA graphs host time, what it could win on, is gone
    timing = (aten_gm, regions) if choose_faster and inductor and not cuda_graphs(inductor) else None
    return FallBackOnFailure(fused, gm, report, inductor, timing)
