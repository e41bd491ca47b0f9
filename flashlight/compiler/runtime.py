"""The fused op: load generated kernels (cached in-process and on disk), compute launch arguments, launch.

Compiled regions are registered under a key (hash of the kernel source and launch config) and
called through one custom op, ``flashlight::fused_attention(inputs, key)``. Because it is a
``torch.library`` op, Inductor treats it as an opaque kernel, and ``register_autograd`` is where the
generated backward will attach (recompute from the saved log-sum-exp).
"""
from __future__ import annotations

import collections
import functools
import hashlib
import importlib.util
import math
import os
import re
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flashlight.compiler.codegen import KernelSource, access_layout
from flashlight.compiler.late import compile_row_backward, row_backward
from flashlight.compiler.launch import Launcher

counters: collections.Counter = collections.Counter()
# devices whose backward row step is compiled by Inductor (on the CPU it runs op by op: there the kernels
# run in Triton's interpreter, and compiling would only add minutes of C++ builds to the tests)
COMPILED_ROW_STEP = {"cuda"}
# devices where the row step's torch ops are traced into the backward graph itself (Inductor compiles them
# with the rest of it) rather than run by an op of their own (see _backward)
INLINE_ROW_STEP = {"cuda"}

_REGISTRY: dict = {}        # key -> CompiledRegion
OPS_PROTOCOL = ("4: the backward is fused_attention_rows then fused_attention_backward, which gets the "
                "forward's row statistics only for finite-fill row checks; row values are tensors of their own")
launch_configs: dict = {}   # kernel name -> the config of its latest launch (the runner reports it)
_MODULES: dict = {}         # source hash -> loaded kernel function


def cache_dir() -> Path:
    base = os.environ.get("FLASHLIGHT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "flashlight")
    path = Path(base) / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def load_kernel(ks: KernelSource, dump_dir=None):
    """Write the source to the on-disk cache (Triton needs a real file) and import it once.

    Returns the module: it holds the attention kernel and, for data-dependent masks, the tile
    classification kernel."""
    return load_source(ks.source, ks.name, dump_dir)


def load_source(source: str, name: str, dump_dir=None):
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    if dump_dir := dump_dir or os.environ.get("FLASHLIGHT_DUMP"):
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        (Path(dump_dir) / f"{name}.py").write_text(source)
    key = (digest, interpreting())
    if key in _MODULES:
        return _MODULES[key]
    path = cache_dir() / f"{name}.py"
    if not path.exists() or path.read_text() != source:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        tmp.replace(path)
    mod_name = f"flashlight_kernels.{name}_{int(interpreting())}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    _MODULES[key] = mod
    return mod


# Float32 tiles at IEEE precision are multiplied on the CUDA cores with operands in registers
# (codegen.cuda_core_dots), where the tensor-core tiles below spill. H200, float32, B8 H6 S1024 D64 (the
# training example's GPU model), ten forward and up to nine backward configs side by side
# (results/h200_fp32_tiles.txt): 32×32 with 4 warps and 2 stages in every kernel was within 4% of the best
# each time; fwd+bwd against the tensor-core defaults: causal 4.51 → 3.29 ms, differential attention
# 98.7 → 12.5 ms (still slower than Inductor's cuBLAS matmuls there: the chooser runs those).
CUDA_CORE_TILES = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def default_config(ks: KernelSource, device_type: str) -> dict:
    """A safe starting tile config; tuning (issue: autotuning) replaces it with measured ones."""
    if device_type != "cuda":
        return {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    if ks.cuda_core_dots:
        return dict(CUDA_CORE_TILES)
    e = 1 << max(4, (ks.sizes["e"] - 1).bit_length())
    n_dot = ks.n_dot
    d = max((1 << max(4, (s - 1).bit_length())) for a, s in ks.sizes.items() if a.startswith("d"))
    width = n_dot * e
    if width <= 128 and d <= 64:
        # H100, bf16, every variant at S1k and S4k (2026-11-25, six configs side by side): 64×64 tiles
        # with 4 warps were the fastest or within 3% of it; 128×64 with 8 warps lost up to 27% on
        # masked variants (sliding window, documents, ALiBi) and was never more than 3% ahead
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}
    if n_dot == 1 and max(d, e) <= 256:
        # H200, bf16, B4 H32 S4096 (2026-11-26, scripts/backward_breakdown.py --forward, side by side):
        # D128, ten variants: 128×64 with 8 warps beat the earlier 128×32 on nine (alibi 1.83 → 1.41 ms,
        # sliding window 0.93 → 0.73, vanilla 2.50 → 2.33) and lost 1% on the tenth; 128×128 was at most
        # 3% faster but spills registers. D256 (vanilla, causal): 128×64, 8 warps, 2 stages (the most
        # the shared memory holds) 4.24 / 2.38 ms against 6.06 / 3.29 with 64×32 tiles
        return {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3 if max(d, e) <= 128 else 2}
    block_n = 64 if d <= 64 else 32
    return {"BLOCK_M": 64, "BLOCK_N": block_n, "num_warps": 4, "num_stages": 3}



# Tuned configs. The tuner (flashlight.tune, which imports this module) registers how to look up the
# best stored config of a kernel, and bumps tuned_generation when it finds a new best in this process
# (compiled regions then look again). The runtime imports nothing of the tuner.
_tuned_lookup = None  # (KernelSource, torch.device) -> dict | None; never tunes, never raises
tuned_generation = 0


def register_tuned_lookup(lookup) -> None:
    global _tuned_lookup
    _tuned_lookup = lookup


@dataclass
class _BackwardKernel:
    """One backward kernel of a plan (see CompiledRegion._backward_plan)."""
    name: str
    config: dict          # the tiles asked for; `launch` holds the launch the fitted ones gave
    size: int             # the tiled size (queries for dQ, keys for dK/dV) and its block's name
    fixed: str
    programs: int         # programs per tile: batch rows (over K/V heads for dK/dV)
    scalars: list         # stride arguments: inputs, gradient buffers, dO
    in_args: list         # the inputs' stride arguments alone (the classification kernel reads them)
    classifier: str | None
    tiles: tuple = ()     # (BLOCK_M, BLOCK_N) of `launch`
    launch: tuple | None = None   # (kernel, grid, scalars, constexprs, options), once tiles that fit are found


@dataclass
class _BackwardPlan:
    kernels: list
    grads: list           # (input index, shape, dtype, stored whole in its dtype) of each gradient buffer
    row_grads: dict       # input index -> the position of its row-step gradient in rows()'s outputs


@dataclass
class CompiledRegion:
    ks: KernelSource
    config: dict = field(default_factory=dict)
    dump_dir: str | None = None
    _kernel: object = field(default=None, repr=False)
    _args: dict = field(default_factory=dict, repr=False)   # input layouts -> stride arguments
    _tuned: tuple | None = field(default=None, repr=False)  # (tuned_generation, stored best config or None)
    _classified: dict = field(default_factory=dict, repr=False)  # classifier -> (what it read, state, table)
    _no_classes: dict = field(default_factory=dict, repr=False)  # (classifier, tiles) -> table, or None:
                                                                 # its first table had nothing to skip or drop
    backward_source: object = field(default=None, repr=False)   # training: its BackwardSource
    _backward_module: object = field(default=None, repr=False)
    _backward_plans: dict = field(default_factory=dict, repr=False)  # (needs, layouts) -> _BackwardPlan
    reference: object = field(default=None, repr=False)   # the region's own ops (fx.GraphModule), training
    backward_failed: str | None = None                    # why the generated backward was given up
    _row_steps: dict = field(default_factory=dict, repr=False)   # layout -> compiled row step
    _fitted: dict = field(default_factory=dict, repr=False)      # (kernel, device, config) -> the one that fits
    row_step_failed: str | None = None                    # why the row step runs op by op
    _row_grad_leaves: dict = field(default_factory=dict, repr=False)  # needs pattern -> row_grad_leaves
    _backward_configs: dict = field(default_factory=dict, repr=False)  # device type -> backward tiles
    _launcher: Launcher = field(default_factory=Launcher, repr=False)   # launches its kernels (launch.py)
    _fit: dict = field(default_factory=dict, repr=False)   # (kernel, device, tuned_generation) -> config launched
    _saved_layout: list | None = field(default=None, repr=False)   # (shape, dtype) of each stored row value
    cuda_graphs: bool = False   # run inside CUDA graphs (mode="reduce-overhead"): keep no device tensor
                                # between calls (a graph's memory pool must own every tensor it made)

    @property
    def key(self):
        # the ops' protocol and the backward's source are in the key: graphs Inductor and AOTAutograd
        # cached on disk call the ops by key, with the shapes their fake kernels gave (the row values'
        # count and layout); one cached by an older flashlight would call them the old way
        graphs = "cuda graphs\n" if self.cuda_graphs else ""
        backward = self.backward_source.source if self.backward_source is not None else ""
        return hashlib.sha256((OPS_PROTOCOL + graphs + self.ks.source + backward).encode()).hexdigest()[:20]

    def launch_args(self, inputs):
        """Stride/offset arguments, replayed from the view chains once per input layout."""
        layout = tuple((tuple(t.shape), tuple(t.stride())) for t in inputs)
        if layout not in self._args:
            self._args[layout] = self._compute_args(inputs)
        return self._args[layout]

    def _compute_args(self, inputs):
        return slot_args(self.ks.slots, inputs, self.ks.sizes)

    def launch_config(self, device: torch.device) -> dict:
        """The explicit config, else the best one tuning stored for this kernel on this device (looked
        up once, and again after tune() runs in this process; never tunes), else the default."""
        forward = {k: v for k, v in self.config.items() if k != "backward"}
        if forward:
            return forward
        if self._tuned is None or self._tuned[0] != tuned_generation:
            self._tuned = (tuned_generation, _tuned_lookup(self.ks, device) if _tuned_lookup else None)
        return self._tuned[1] or default_config(self.ks, device.type)

    def __call__(self, inputs):
        """The forward; a training region also returns what its backward starts from."""
        device = inputs[0].device
        if self._kernel is None:
            self._kernel = load_kernel(self.ks, self.dump_dir)
        ks, module = self.ks, self._kernel
        args = self.launch_args(inputs)
        out = torch.empty(ks.out_shape, dtype=ks.out_dtype, device=device)
        if self._saved_layout is None:
            rows = ks.batch * ks.M
            self._saved_layout = [((rows,) if kind == "row" else (rows, ks.sizes["e"]), saved_dtype(ks, kind))
                                  for _, kind in ks.saved]
        saved = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in self._saved_layout]

        def launch(c):   # a config asking more shared memory than this GPU has shrinks (launch_fitting)
            bm, bn = c["BLOCK_M"], c["BLOCK_N"]
            ranges = [self.tile_ranges(inputs, args, bm, bn)] if ks.classifier else []
            self._launcher(getattr(module, ks.name), (math.ceil(ks.M / bm) * ks.batch,),
                           [*inputs, out, *saved, *ranges], args, {"BLOCK_M": bm, "BLOCK_N": bn},
                           {"num_warps": c.get("num_warps", 4), "num_stages": c.get("num_stages", 2)})
        launch_configs[ks.name] = self._launch_fitted(launch, ks.name, device, lambda: self.launch_config(device))
        counters["fused_launches"] += 1
        return (out, saved) if ks.row_program is not None else out

    def _launch_fitted(self, launch, name, device, config):
        """launch(c) with the config of kernel `name` that fits this GPU: found on the first call from
        config() (launch_fitting), then reused (again found after tuning stores a new best)."""
        key = (name, device, tuned_generation)
        c = self._fit.get(key)
        if c is None:
            c = self._fit[key] = launch_fitting(launch, config(), self._fitted, (name, device.index))
        else:
            launch(c)
        return c

    # The backward is two ops, so that what only its row step reads (the output, a stored ·V accumulator)
    # is freed before the kernels' gradients are allocated, as Inductor does for FlexAttention's backward:
    # rows() gives what the kernels start from, backward() the gradients.

    def row_grad_leaves(self, inputs, needs):
        """The inputs that the after-the-loop lines read and that need a gradient: rows() gives each a
        gradient of its own (static, so that the op's fake kernel knows its outputs)."""
        key = tuple(bool(n) and t.is_floating_point() for t, n in zip(inputs, needs))
        if key not in self._row_grad_leaves:   # per call on the host path: found once per pattern
            lines = "\n".join(self.ks.row_program["lines"])
            self._row_grad_leaves[key] = [i for i, wanted in enumerate(key)
                                          if wanted and re.search(rf"\bin{i}_ptr\b", lines)]
        return self._row_grad_leaves[key]

    def rows_like(self, inputs, needs):
        """rows()'s outputs as empty tensors: [dPV, each row value, a gradient per row_grad_leaves]."""
        (dpv_shape, dpv_dtype), row_shape = self._rows_layout(inputs)
        x = inputs[0]
        return [x.new_empty(dpv_shape, dtype=dpv_dtype)] + [
            x.new_empty(row_shape, dtype=torch.float32) for _ in self.backward_source.row_names] + [
            torch.empty_like(inputs[i]) for i in self.row_grad_leaves(inputs, needs)]

    def _rows_layout(self, inputs):
        bs, rows = self.backward_source, self.ks.batch * self.ks.M
        dpv_shape = (0,) if self.ks.row_program.get("row_linear") else (rows, self.ks.sizes["e"])
        return (dpv_shape, inputs[bs.value_leaf].dtype), (rows,)

    def rows(self, inputs, saved, grad_out, needs):
        """The backward's row step (late.row_backward) in the layout rows_like() promises. If it fails,
        the generated backward is given up (backward() then runs the region's own ops)."""
        needs = tuple(bool(n) for n in needs)
        if self.backward_failed is None:
            try:
                dpv, row_values, grads = self.row_step(inputs, saved, grad_out, needs)(inputs, saved, grad_out)
                (dpv_shape, dpv_dtype), row_shape = self._rows_layout(inputs)
                # an op's outputs may not alias its inputs: a row value the forward stored is copied here
                # (rows_traced, which AOTAutograd traces into the graph instead, passes it as it is)
                stored = {t.untyped_storage().data_ptr() for t in (*inputs, *saved, grad_out)}
                row_values = [_in_layout(v, row_shape, torch.float32) for v in row_values]
                return [_in_layout(dpv, dpv_shape, dpv_dtype)] + [
                    v.clone() if v.untyped_storage().data_ptr() in stored else v for v in row_values] + [
                    _like(grads[i], inputs[i]) if i in grads else torch.zeros_like(inputs[i])
                    for i in self.row_grad_leaves(inputs, needs)]
            except Exception as e:
                self._give_up_backward(e)
        return [t.zero_() for t in self.rows_like(inputs, needs)]

    def rows_traced(self, inputs, saved, grad_out, needs):
        """rows()'s values as plain torch ops, for AOTAutograd to trace into the backward graph: Inductor
        then compiles the row step with the rest of that graph and launches its kernels from the graph's
        own code, with no op of ours and no compiled step of its own on the host path between the
        forward's kernel and the backward's (that path was a GPU idle gap every training step)."""
        needs = tuple(bool(n) for n in needs)
        bs = self.backward_source
        dpv, row_values, grads = row_backward(self.ks.row_program, inputs, needs, self.launch_args(inputs), saved,
                                              grad_out, bs.row_names, inputs[bs.value_leaf].dtype)
        (dpv_shape, dpv_dtype), row_shape = self._rows_layout(inputs)
        return [dpv.reshape(dpv_shape).to(dpv_dtype).contiguous()] + [
            v.reshape(row_shape).float().contiguous() for v in row_values] + [
            grads[i] if i in grads else torch.zeros_like(inputs[i]) for i in self.row_grad_leaves(inputs, needs)]

    def _give_up_backward(self, e):
        if self.reference is None:
            raise e
        self.backward_failed = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        warnings.warn(f"flashlight: the generated backward failed ({self.backward_failed}); this "
                      "region's gradients now come from its own ops under autograd", stacklevel=3)

    def backward(self, inputs, row_saved, rows, grad_out, needs):
        """Gradients of the inputs flagged in `needs` (None for the others), from rows()'s outputs and the
        forward's saved per-row values (`row_saved`, see row_saved()): the generated backward, or, if it fails to
        compile or launch, the user's own ops for the region under torch.autograd (with one warning:
        correct, but it materialises the scores, as eager does)."""
        needs = tuple(bool(n) for n in needs)
        if self.backward_failed is None:
            try:
                return self._generated_backward(inputs, row_saved, rows, grad_out, needs)
            except Exception as e:
                self._give_up_backward(e)
        counters["backward_fallbacks"] += 1
        with torch.enable_grad():
            xs = [x.detach().requires_grad_(n) for x, n in zip(inputs, needs)]
            out = self.reference(*xs)
            wanted = [x for x, n in zip(xs, needs) if n]
            got = iter(torch.autograd.grad(out, wanted, grad_out.reshape(out.shape), allow_unused=True))
        return [(next(got) if n else None) for n in needs]

    def _generated_backward(self, inputs, row_saved, rows, grad_out, needs):
        bs = self.backward_source
        # what a step repeats is found once per layout of its tensors (host time: the GPU waits on it at
        # short sequence lengths); the launches of a plan go through their fitted configs after its first step
        device = inputs[0].device
        key = (needs, device, grad_out.stride() if bs.reads_dout else None, *[(t.shape, t.stride()) for t in inputs])
        plan = self._backward_plans.get(key)
        if plan is None:
            plan = self._backward_plans[key] = self._backward_plan(inputs, grad_out, needs)
        n_rows = len(bs.row_names)
        dpv = grad_out if bs.reads_dout else rows[0]   # the kernels read dO with its strides, or dPV
        row_values = rows[1:1 + n_rows]
        grads = {i: torch.empty(shape, dtype=dtype, device=device) if stored else
                 torch.zeros(shape, dtype=torch.float32, device=device) for i, shape, dtype, stored in plan.grads}
        tensors = [*inputs, *(grads[i] for i in bs.grad_leaves), dpv, *row_values]   # each kernel's, in order
        redo = self._redo_batches(row_saved) if bs.row_checks else None
        for k in plan.kernels:
            if k.launch is None:   # the plan's first step: the tiles that fit this GPU (launch_fitting), kept

                def launch(c, k=k, tensors=tensors):
                    fn, grid, scalars, constexprs, options = self._backward_launch(k, c)
                    tiles = (c["BLOCK_M"], c["BLOCK_N"])
                    self._launcher(fn, grid, tensors + self._tile_tables(k, tiles, inputs, redo), scalars, constexprs,
                                   options)
                c = self._launch_fitted(launch, k.name, device, lambda k=k: k.config)
                k.launch, k.tiles = self._backward_launch(k, c), (c["BLOCK_M"], c["BLOCK_N"])
                continue
            fn, grid, scalars, constexprs, options = k.launch
            self._launcher(fn, grid, tensors + self._tile_tables(k, k.tiles, inputs, redo), scalars, constexprs, options)
        counters["fused_backward_launches"] += 1
        del tensors
        out = []
        row_grads = plan.row_grads
        for i, t in enumerate(inputs):
            if not needs[i]:
                out.append(None)
                continue
            # popped: a float32 sum buffer (GQA's dK/dV, bias gradients) is freed as soon as it is converted
            g = grads.pop(i) if i in grads else torch.zeros(t.shape, dtype=torch.float32, device=device)
            if i in row_grads:
                g = g + rows[row_grads[i]].to(g.dtype)
            out.append(g if g.dtype == t.dtype else g.to(t.dtype))
            del g
        return out

    def _backward_plan(self, inputs, grad_out, needs) -> "_BackwardPlan":
        """What every backward step with tensors of these layouts does the same: the kernels' stride arguments,
        grids and configs, the gradient buffers' shapes, where each row gradient lies in rows()'s outputs."""
        bs = self.backward_source
        if any(n and not b for n, b in zip(needs, bs.needs)):
            raise RuntimeError("a gradient is asked of an input that did not require grad when the region "
                               "was compiled")
        if self._backward_module is None and (bs.dq_name or bs.dkv_name):   # none: the row step gives every gradient
            self._backward_module = load_source(bs.source, bs.dq_name or bs.dkv_name, self.dump_dir)
        device = inputs[0].device
        if device.type not in self._backward_configs:
            self._backward_configs[device.type] = backward_config(bs, device.type, self.config.get("backward"))
        cfg = self._backward_configs[device.type]
        grads = [(i, tuple(inputs[i].shape), inputs[i].dtype, i in bs.stored) for i in bs.grad_leaves]
        # gradient buffers are contiguous: their strides follow from the shapes
        buffers = {i: torch.empty(shape, device="meta") for i, shape, _, _ in grads}
        dout_args = list(grad_out.stride()) if bs.reads_dout else []
        kernels = []
        # (kernel, tiles, tiled size, its block, programs per tile: batch rows, over K/V heads for dK/dV)
        for name, c, size, fixed, programs, slots, classifier in (
                (bs.dq_name, cfg["dq"], bs.M, "BLOCK_M", bs.batch, bs.dq_slots, bs.classifiers[0]),
                (bs.dkv_name, cfg["dkv"], bs.N, "BLOCK_N", bs.batch // bs.dkv_group, bs.dkv_slots, bs.classifiers[1])):
            if name is None:
                continue
            in_slots, grad_slots = slots
            in_args = slot_args(in_slots, inputs, bs.sizes)
            scalars = [*in_args, *slot_args(grad_slots, buffers, bs.sizes), *dout_args]
            kernels.append(_BackwardKernel(name, c, size, fixed, programs, scalars, in_args, classifier))
        n_rows = len(bs.row_names)
        row_grads = {i: 1 + n_rows + j for j, i in enumerate(self.row_grad_leaves(inputs, needs))}
        return _BackwardPlan(kernels, grads, row_grads)

    def _backward_launch(self, k, c):
        """(kernel, grid, stride arguments, meta-parameters, options) of a backward kernel with tiles c."""
        return (getattr(self._backward_module, k.name), (math.ceil(k.size / c[k.fixed]) * k.programs,), k.scalars,
                {"BLOCK_M": c["BLOCK_M"], "BLOCK_N": c["BLOCK_N"]},
                {"num_warps": c.get("num_warps", 4), "num_stages": c.get("num_stages", 1)})

    def _tile_tables(self, k, tiles, inputs, redo):
        """The tables a backward kernel with these tiles (BLOCK_M, BLOCK_N) reads after its row values: the
        tiles that masks reading data leave (classified per tile pair, reused), and the batches to visit
        whole (finite mask fills)."""
        tables = []
        if k.classifier:
            bs = self.backward_source
            bm, bn = tiles
            tables.append(self.classification(self._backward_module, k.classifier, bs.classifier_reads, bs.range_rows,
                                              inputs, k.in_args, bm, bn, k.fixed))
        if redo is not None:
            tables.append(redo)
        return tables

    def row_saved(self, saved):
        """The forward's stored per-row values (not its [rows, Dv] accumulators), in ks.saved's order."""
        return [t for t, (_, kind) in zip(saved, self.ks.saved) if kind == "row"]

    def _redo_batches(self, row_saved):
        """Per batch index (int32): has it a row whose running max is at or below a finite mask fill's
        threshold, one the forward computed over every key (codegen._recompute_unskipped)? The backward
        then visits every tile of that batch. Computed on the device, without a sync."""
        ks, bs = self.ks, self.backward_source
        names = [name for name, kind in ks.saved if kind == "row"]
        low = None   # per batch: its lowest row max at or below the threshold (a few launches: host time)
        for m, t in bs.row_checks.items():
            flag = row_saved[names.index(m)].view(ks.batch, ks.M).amin(1) <= t
            low = flag if low is None else low | flag
        return low.to(torch.int32)

    def row_step(self, inputs, saved, grad_out, needs):
        """The backward's row step (late.row_backward) as a function of (inputs, saved, grad_out): on the
        devices in COMPILED_ROW_STEP, traced and compiled by Inductor once per layout (falling back, with
        one warning, to running it op by op if that fails), elsewhere op by op."""
        bs = self.backward_source
        step = (self.ks.row_program, needs, self.launch_args(inputs), bs.row_names, inputs[bs.value_leaf].dtype)
        if inputs[0].device.type not in COMPILED_ROW_STEP or self.row_step_failed:
            return functools.partial(_row_step_eager, *step)
        key = tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in (*inputs, *saved, grad_out)) + (needs,)
        if key not in self._row_steps:
            try:
                self._row_steps[key] = compile_row_backward(*step, inputs, saved, grad_out)
            except Exception as e:
                self.row_step_failed = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                warnings.warn(f"flashlight: compiling the backward's row step failed ({self.row_step_failed}); "
                              "it runs op by op instead (the same values, more launches)", stacklevel=2)
                return functools.partial(_row_step_eager, *step)
        return self._row_steps[key]

    def tile_ranges(self, inputs, args, bm, bn):
        """Which key tiles each query tile of the forward needs, for a mask that reads data."""
        ks = self.ks
        return self.classification(self._kernel, ks.classifier, ks.classifier_reads, ks.range_rows,
                                   inputs, args, bm, bn, "BLOCK_M")

    def classification(self, module, classifier, read_ix, range_rows, inputs, args, bm, bn, fixed):
        """A classification kernel's table (per tile of the `fixed` axis: the tiles of the other that
        masks reading data leave), reused while the tensors it reads are the same memory, unmodified,
        with the same tiles. Same memory: the same storage, alive all along (a tensor the backward gets
        back from autograd is a new object each step, on the storage the forward read)."""
        ks = self.ks
        m_tiles, n_tiles = math.ceil(ks.M / bm), math.ceil(ks.N / bn)
        judged = (classifier, bm, bn) in self._no_classes
        if self._no_classes.get((classifier, bm, bn)) is not None:   # a bias, not a mask: every tile computed
            counters["classifications_skipped"] += 1
            return self._no_classes[(classifier, bm, bn)]
        reads = [inputs[i] for i in read_ix]
        # inside CUDA graphs the classification kernel is part of the graph: replays classify the new data
        state = None if self.cuda_graphs else _classification_state(reads, args, bm, bn)
        cached = self._classified.get(classifier)
        if state is not None and cached is not None:
            refs, old_state, table = cached
            if old_state == state and all(r() is t.untyped_storage() for r, t in zip(refs, reads)):
                counters["classifications_reused"] += 1
                return table
        rows = m_tiles if fixed == "BLOCK_M" else n_tiles
        table = torch.zeros(range_rows * rows * 5, dtype=torch.int32, device=inputs[0].device)
        self._launcher(getattr(module, classifier), (range_rows * m_tiles * n_tiles,), [*inputs, table], args,
                       {"BLOCK_M": bm, "BLOCK_N": bn}, {"num_warps": 4, "num_stages": 1})
        counters["classifications"] += 1
        if not judged and state is not None and ks.may_be_bias:
            # A tensor added to the scores may be a bias (Evoformer's pair bias) rather than a mask: if its
            # first table has no tile to skip and none kept whole, classifying costs a launch and a read of
            # the tensors for nothing, so from now on every tile is computed with its mask math, as the
            # table that says so (exact for any data; one device sync, once).
            L, block = (ks.N, bn) if fixed == "BLOCK_M" else (ks.M, bm)
            dense = torch.tensor([L, math.ceil(L / block) * block, 0, 0, 0], dtype=torch.int32,
                                 device=table.device).repeat(range_rows * rows)
            self._no_classes[(classifier, bm, bn)] = dense if torch.equal(table, dense) else None
        # storages are held weakly (torch keeps one Python object per live storage), so a freed tensor
        # never matches a new one at the same address
        if state is None:
            self._classified.pop(classifier, None)
        else:
            self._classified[classifier] = ([weakref.ref(t.untyped_storage()) for t in reads], state, table)
        return table


def saved_dtype(ks, kind):
    """What a training forward stores per row: running sums and maxes in float32; ·V accumulators in the
    output's dtype (the backward only forms row sums of dO times them, as FlashAttention does with O; a
    float32 copy would add 4 bytes per output element to the memory a training step holds)."""
    return ks.out_dtype if kind == "vector" and ks.out_dtype in (torch.float16, torch.bfloat16) else torch.float32


def smaller_configs(config: dict):
    """The configs to try, in order, when `config` asks for more shared memory than the GPU has (float32
    inputs, wide heads): itself, then fewer pipeline stages (down to 2), then the larger tile halved (with
    at most 4 warps), down to 16 × 16."""
    c = dict(config)
    while True:
        yield c
        if c.get("num_stages", 1) > 2:
            c = {**c, "num_stages": c["num_stages"] - 1}
        elif max(c["BLOCK_M"], c["BLOCK_N"]) > 16:
            big = "BLOCK_M" if c["BLOCK_M"] >= c["BLOCK_N"] else "BLOCK_N"
            c = {**c, big: c[big] // 2, "num_warps": min(c.get("num_warps", 4), 4)}
        else:
            return


def launch_fitting(launch, config: dict, fitted: dict, key) -> dict:
    """launch(config), or the first of smaller_configs(config) that fits the GPU's shared memory (Triton
    raises OutOfResources before anything runs); remembered in `fitted` for the next call. Returns it."""
    from triton.runtime.errors import OutOfResources

    memo = (key, tuple(sorted(config.items())))
    for c in ([fitted[memo]] if memo in fitted else smaller_configs(config)):
        try:
            launch(c)
        except OutOfResources:
            counters["configs_shrunk"] += 1
            continue
        fitted[memo] = c
        return c
    raise RuntimeError(f"no tile config from {config} down to 16×16 fits this GPU's shared memory")


def _row_step_eager(program, needs, params, row_names, dpv_dtype, inputs, saved, grad_out):
    return row_backward(program, inputs, needs, params, saved, grad_out, row_names, dpv_dtype)


def slot_args(slots, tensors, sizes):
    """The stride/offset arguments of a kernel's loads (or gradient stores), from the real tensors."""
    params = []
    for slot in slots:
        t = tensors[slot.leaf]
        layout, off = access_layout(slot.chain, slot.axes, tuple(t.shape), tuple(t.stride()), 0, sizes)
        table = {(i, j, q): st for (i, j, a, subdims) in layout for q, (s, st) in enumerate(subdims)}
        for p in slot.params:
            params.append(off if p[1] == "offset" else table[(p[1], p[2], p[3])])
    return params


def backward_config(bs, device_type: str, given: dict | None = None) -> dict:
    """Tiles of the two backward kernels, {"dq": {...}, "dkv": {...}}; `given` (compile(config=
    {"backward": ...})) sets both with one flat dict, or each by name (one not named keeps its default)."""
    if given and ("dq" in given or "dkv" in given):
        default = backward_config(bs, device_type)
        return {"dq": given.get("dq", default["dq"]), "dkv": given.get("dkv", default["dkv"])}
    if given:
        return {"dq": given, "dkv": given}
    if device_type != "cuda":
        cpu = {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
        return {"dq": cpu, "dkv": cpu}
    if bs.cuda_core_dots:
        return {"dq": dict(CUDA_CORE_TILES), "dkv": dict(CUDA_CORE_TILES)}
    # the key-tile kernel keeps dV and every dK in registers: narrower key tiles when they are wide
    width = sum((1 << max(4, (s - 1).bit_length())) for a, s in bs.sizes.items() if a.startswith("d") or a == "e")
    # H200, bf16, B4 H32 S4096 D64, five configs side by side (2026-11-26): causal fwd+bwd 5.00 ms with
    # 64×64 tiles in both kernels, 4.64 with 32 queries × 128 keys in the dK/dV kernel; differential
    # attention (Dv 128) 31.2 → 23.0 ms with 32 × 64 there
    # H100 (2026-11-26, scripts/backward_breakdown.py, eight configs): 128 queries × 64 keys, 8 warps in the
    # dQ kernel for wide programs (differential attention 15.4 → 14.3 ms), 64 × 64 otherwise (causal 3.14
    # vs 3.22 ms); the dK/dV tiles above stayed best on both
    dq = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3} if width <= 128 else \
        {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    if bs.table_gradient:
        # a table's gradient summed per query row and entry: narrower key tiles (H200, T5 bias, B4 H32
        # S4096, five dQ configs side by side: fwd+bwd 39.1 → 30.7 ms at D64, 44.7 → 32.4 at D128)
        dq = {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3}
    dkv = {"BLOCK_M": 32, "BLOCK_N": 128 if width <= 128 else 64, "num_warps": 4, "num_stages": 3}
    return {"dq": dq, "dkv": dkv}


def _classification_state(tensors, args, bm, bn):
    """What a classification depends on besides the tensors' identity: their version counters (bumped by
    every in-place write), layouts, the launch arguments and tiles. None where reuse cannot be proven
    safe: inference tensors keep no version counter, and a CUDA graph being captured must contain the
    classification kernel itself."""
    if any(t.is_cuda for t in tensors) and torch.cuda.is_current_stream_capturing():
        return None
    try:
        versions = tuple(t._version for t in tensors)
    except RuntimeError:
        return None
    layouts = tuple([(t.data_ptr(), t.storage_offset(), t.shape, t.stride()) for t in tensors])
    # args: the list cached for this layout (never changed), so that the comparison finds it identical at once
    return versions, layouts, args, bm, bn


def register(region: CompiledRegion) -> str:
    key = region.key
    _REGISTRY.pop(key, None)   # the registry's order is that of the latest registrations
    _REGISTRY[key] = region
    return key


def lookup(key: str) -> CompiledRegion:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise RuntimeError(f"flashlight: no compiled region {key!r} in this process "
                           "(was the graph compiled by flashlight in another process?)") from None


# The op is defined with the low-level Library API rather than torch.library.custom_op: the latter
# checks aliasing and autograd in Python on every call, which cost about 50 µs per launch on an H100
# host, as much as the kernel at short sequence lengths. register_autograd works on either.
_LIB = torch.library.Library("flashlight", "DEF")
_LIB.define("fused_attention(Tensor[] inputs, str key) -> Tensor")


def fused_attention(inputs: list[torch.Tensor], key: str) -> torch.Tensor:
    return lookup(key)(inputs)


_LIB.impl("fused_attention", fused_attention, "CompositeExplicitAutograd")


@torch.library.register_fake("flashlight::fused_attention", lib=_LIB)
def _(inputs, key):
    ks = lookup(key).ks
    return inputs[0].new_empty(ks.out_shape, dtype=ks.out_dtype)


# Training: the forward also returns the per-row state its backward starts from; the backward is an op
# of its own, so AOTAutograd puts it in the backward graph and Inductor compiles the rest around it.
_LIB.define("fused_attention_train(Tensor[] inputs, str key) -> Tensor[]")
_LIB.define("fused_attention_rows(Tensor[] inputs, Tensor[] saved, Tensor grad_out, bool[] needs, str key) "
            "-> Tensor[]")
_LIB.define("fused_attention_backward(Tensor[] inputs, Tensor[] row_saved, Tensor[] rows, Tensor grad_out, "
            "bool[] needs, str key) -> Tensor[]")


def fused_attention_train(inputs, key):
    out, saved = lookup(key)(inputs)
    return [out, *saved]


def fused_attention_rows(inputs, saved, grad_out, needs, key):
    return lookup(key).rows(inputs, saved, grad_out, needs)


def fused_attention_backward(inputs, row_saved, rows, grad_out, needs, key):
    grads = lookup(key).backward(inputs, row_saved, rows, grad_out, needs)
    return [x.new_empty(0) if g is None else _like(g, x) for g, x in zip(grads, inputs)]


def _in_layout(t, shape, dtype):
    """t as a contiguous tensor of this shape and dtype (as it is, when it already is one: this runs on
    every backward step, and each no-op conversion is a few microseconds of host time)."""
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
        t = t.reshape(shape).to(dtype).contiguous()
    return t


def _like(g, x):
    """g with the strides the op promises (those of empty_like(x), as the fake kernel below): Inductor
    checks them, and autograd's own gradients (the fallback) may come in another layout."""
    if g.stride() == x.stride() and x.is_contiguous() or g.stride() == _empty_like_strides(x.shape, x.stride()):
        return g
    return torch.empty_like(x).copy_(g)


@functools.lru_cache(maxsize=1024)
def _empty_like_strides(shape, stride):
    """The strides torch.empty_like gives a tensor of this layout (found once per layout: each backward
    step asks it of every input, and a transposed view's answer costs an allocation on the meta device)."""
    return torch.empty_like(torch.empty_strided(shape, stride, device="meta")).stride()


_LIB.impl("fused_attention_train", fused_attention_train, "CompositeExplicitAutograd")
_LIB.impl("fused_attention_rows", fused_attention_rows, "CompositeExplicitAutograd")
_LIB.impl("fused_attention_backward", fused_attention_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("flashlight::fused_attention_train", lib=_LIB)
def _(inputs, key):
    ks = lookup(key).ks
    rows = ks.batch * ks.M
    return [inputs[0].new_empty(ks.out_shape, dtype=ks.out_dtype)] + [
        inputs[0].new_empty((rows,) if kind == "row" else (rows, ks.sizes["e"]), dtype=saved_dtype(ks, kind))
        for _, kind in ks.saved]


@torch.library.register_fake("flashlight::fused_attention_rows", lib=_LIB)
def _(inputs, saved, grad_out, needs, key):
    return lookup(key).rows_like(inputs, needs)


@torch.library.register_fake("flashlight::fused_attention_backward", lib=_LIB)
def _(inputs, row_saved, rows, grad_out, needs, key):
    return [torch.empty_like(x) if n else x.new_empty(0) for x, n in zip(inputs, needs)]


def _setup_context(ctx, inputs, output):
    leaves, key = inputs
    ctx.key, ctx.n = key, len(leaves)
    # the output itself where it stands in for a ·V accumulator (late.row_scaled_accumulator)
    from_out = lookup(key).ks.row_program.get("from_out")
    ctx.save_for_backward(*leaves, *output[1:], *output[:1 if from_out else 0])


def _backward(ctx, grads):
    if torch.is_grad_enabled():   # create_graph=True: a gradient of this gradient would be asked for
        raise RuntimeError("flashlight: double backward (a gradient of a gradient) through a fused attention "
                           "region is not supported; compile without flashlight for that computation")
    saved = ctx.saved_tensors
    leaves, state = list(saved[:ctx.n]), list(saved[ctx.n:])
    needs = [bool(n) for n in ctx.needs_input_grad[0]]
    ks = lookup(ctx.key).ks
    g_out = grads[0] if grads[0] is not None else leaves[0].new_zeros(ks.out_shape, dtype=ks.out_dtype)
    # the row step, then the kernels: the output and accumulators the row step reads are freed before the
    # gradients are allocated
    region = lookup(ctx.key)
    rows = None
    if leaves[0].device.type in INLINE_ROW_STEP and region.backward_failed is None:
        try:   # its torch ops join the backward graph being traced
            rows = region.rows_traced(leaves, state, g_out, needs)
        except Exception as e:
            warnings.warn(f"flashlight: tracing the backward's row step into the graph failed ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]}); it runs as an op of its own", stacklevel=2)
    if rows is None:
        rows = torch.ops.flashlight.fused_attention_rows(leaves, state, g_out, needs, ctx.key)
    # the forward's row statistics reach the kernels only for finite mask fills' row checks (_redo_batches):
    # elsewhere they are the row step's alone, and freed with it, as the output is
    checks = region.backward_source is not None and region.backward_source.row_checks
    row_saved = region.row_saved(state) if checks else []
    res = torch.ops.flashlight.fused_attention_backward(leaves, row_saved, rows, g_out, needs, ctx.key)
    return [r if n else None for r, n in zip(res, needs)], None


torch.library.register_autograd("flashlight::fused_attention_train", _backward, setup_context=_setup_context,
                                lib=_LIB)
